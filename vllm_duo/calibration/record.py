"""What a calibration run records about itself: the command that repeats it and its cost.

A long calibration spans sessions and machines (``--resume``), so its time is kept as
*stretches*, one per process: the machine, the start time and the length and seconds of every
step it ran. The checkpoint carries them; ``model.json`` gets their summary. Steps made by a
checkpoint older than this record have no times and are counted as untimed.

Pure module: no torch, no vLLM.
"""

from __future__ import annotations

import datetime
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vllm_duo.machine import cpu_description

# `vllm-duo calibrate` flags in the order its --help lists them; `tile` has no flag and
# `resume` says how a run was continued, not what it computes.
CLI_FIELDS = (
    "out", "sink", "recent", "steps", "lr", "reg", "min_len", "max_len", "passkeys", "seed",
    "batch_size", "save_every", "device", "dtype", "method", "haystack", "length_dist",
    "model_id",
)  # fmt: skip


def utc_now() -> str:
    """The current UTC time, to the second, ISO 8601."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line(
    settings: Mapping[str, Any], defaults: Mapping[str, Any], *, flag: Callable[[str], str]
) -> str:
    """The ``vllm-duo calibrate`` command that makes these settings (defaults left out).

    ``flag`` names a setting's command-line flag (``min_len`` -> ``--min-len``). The home
    directory is written as ``~`` so that the command works for another user.
    """

    def shown(value: Any) -> str:
        text = str(value)
        home = str(Path.home())
        return "~" + text[len(home) :] if text == home or text.startswith(home + "/") else text

    words = ["vllm-duo", "calibrate", shown(settings["model"])]
    for field in CLI_FIELDS:
        value = settings[field]
        if field != "out" and value == defaults.get(field):
            continue
        words += [flag(field), shown(value)]
    return " ".join(w if w.startswith("~") else shlex.quote(w) for w in words)


def new_stretch(first_step: int) -> dict[str, Any]:
    """The record of this process's part of a run, starting at ``first_step``."""
    return {
        "machine": cpu_description(),
        "started_utc": utc_now(),
        "first_step": first_step,
        "step_seconds": [],
    }


def summary(
    *,
    command: str,
    steps: int,
    unit: str,
    stretches: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """The ``calibration`` entry of ``model.json``: command, finish time and compute time.

    Args:
        command: what :func:`command_line` returns for the run.
        steps: steps (or prompts, for the attention-mass baseline) the pattern was made with.
        unit: ``"steps"`` or ``"prompts"``.
        stretches: :func:`new_stretch` records, each with ``step_seconds`` as
            ``[prompt_length, seconds]`` pairs.
    """
    parts = []
    for stretch in stretches:
        times = stretch["step_seconds"]
        if not times:
            continue
        first = stretch["first_step"]
        parts.append(
            {
                "machine": stretch["machine"],
                "started_utc": stretch["started_utc"],
                unit: f"{first + 1}-{first + len(times)}",
                "seconds": round(sum(seconds for _, seconds in times), 1),
            }
        )
    timed = sum(len(s["step_seconds"]) for s in stretches)
    return {
        "command": command,
        "finished_utc": utc_now(),
        unit: steps,
        f"{unit}_timed": timed,
        "seconds_timed": round(sum(p["seconds"] for p in parts), 1),
        "stretches": parts,
    }
