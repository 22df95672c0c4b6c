"""``vllm-duo calibrate MODEL_DIR --out DIR``: learn a pattern for a local model.

Needs torch and transformers (:mod:`vllm_duo.calibration`), never vLLM; both are imported
inside the handler so ``vllm-duo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import shlex

from vllm_duo.cli.common import PROG, add_option, library_log, out
from vllm_duo.patterns import load_gates


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The ``calibrate`` subcommand (defaults shown from :class:`CalibrationConfig`)."""
    import dataclasses

    from vllm_duo.calibration.train import METHODS, CalibrationConfig

    defaults = {f.name: f.default for f in dataclasses.fields(CalibrationConfig)}
    calibrate = commands.add_parser(
        "calibrate",
        help="learn a DuoAttention pattern for a local model",
        description=(
            "Learn one gate per (layer, KV head) by distilling the model's full-attention "
            "hidden states on synthetic multi-passkey prompts (weights frozen, offline), and "
            "write a pattern directory (full_attention_heads.tsv, config.json, model.json) "
            "usable as VLLM_DUO_PATTERN. See docs/calibration.md."
        ),
    )
    calibrate.add_argument("model", metavar="MODEL_DIR", help="local Hugging Face model directory")
    calibrate.add_argument(
        "--out", required=True, metavar="DIR", help="pattern directory to write (created)"
    )
    options: list[tuple[str, type, str, str]] = [
        ("sink", int, "S", "sink tokens kept by streaming heads"),
        ("recent", int, "W", "recent tokens kept by streaming heads"),
        ("steps", int, "N", "optimizer steps"),
        ("lr", float, "LR", "learning rate of the gates (Adam)"),
        ("reg", float, "R", "weight of the L1 term mean(|gate|)"),
        ("min_len", int, "T", "shortest prompt in tokens"),
        ("max_len", int, "T", "longest prompt in tokens"),
        ("passkeys", int, "K", "pass keys hidden per prompt"),
        ("seed", int, "SEED", "data seed"),
        ("batch_size", int, "B", "prompts per step"),
        ("save_every", int, "K", "write DIR/checkpoint.pt every K steps"),
    ]
    for field, kind, metavar, text in options:
        add_option(calibrate, field, kind, metavar, text, defaults[field])
    calibrate.add_argument(
        "--device",
        default=defaults["device"],
        metavar="DEV",
        help=f"cpu, cuda or cuda:N (default {defaults['device']})",
    )
    calibrate.add_argument(
        "--dtype",
        default=defaults["dtype"],
        choices=("auto", "float32", "bfloat16", "float16"),
        help="model dtype; auto = float32 on CPU, bfloat16 on CUDA (default auto)",
    )
    from vllm_duo.calibration.data import GENERATED, LENGTH_DISTS
    from vllm_duo.evaluation.texts import SOURCES

    calibrate.add_argument(
        "--method",
        default=defaults["method"],
        choices=METHODS,
        help="gates: DuoAttention's gate distillation; attention-mass: a cheap baseline that "
        "ranks heads by the attention their answer positions pay outside sink + window on "
        f"--steps prompts, no training (default {defaults['method']})",
    )
    calibrate.add_argument(
        "--haystack",
        default=defaults["haystack"],
        choices=(*SOURCES, GENERATED),
        help="text the pass keys hide in: an offline text source, or generated filler "
        f"sentences (default {defaults['haystack']})",
    )
    calibrate.add_argument(
        "--length-dist",
        default=defaults["length_dist"],
        choices=LENGTH_DISTS,
        help="how each step's prompt length is drawn from [--min-len, --max-len]; log-uniform "
        f"gives each doubling of the length the same share of steps (default "
        f"{defaults['length_dist']})",
    )
    calibrate.add_argument(
        "--model-id",
        default=None,
        metavar="ID",
        help="model id recorded in model.json (default: the id the directory records, else "
        "its name)",
    )
    calibrate.add_argument("--resume", action="store_true", help="continue the checkpoint in DIR")
    calibrate.set_defaults(handler=_cmd_calibrate)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    """``vllm-duo calibrate MODEL_DIR --out DIR``."""
    # Offline: never reach for the Hugging Face Hub (set before transformers is imported).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm_duo.calibration.train import CalibrationConfig, calibrate

    config = CalibrationConfig(
        model=args.model,
        out=args.out,
        sink=args.sink,
        recent=args.recent,
        steps=args.steps,
        lr=args.lr,
        reg=args.reg,
        min_len=args.min_len,
        max_len=args.max_len,
        seed=args.seed,
        device=args.device,
        batch_size=args.batch_size,
        resume=args.resume,
        passkeys=args.passkeys,
        save_every=args.save_every,
        dtype=args.dtype,
        model_id=args.model_id,
        haystack=args.haystack,
        length_dist=args.length_dist,
        method=args.method,
    )
    with library_log():  # resume, step and checkpoint lines of a job that runs for hours
        out_dir = calibrate(config, progress=True)
    gates = load_gates(out_dir)
    layers, kv_heads = gates.shape
    out(f"pattern written to {out_dir}")
    out(
        f"gates: {layers} layers x {kv_heads} KV heads, mean {gates.mean():.3f}, "
        f"{(gates < 0.5).mean():.0%} below 0.5"
    )
    out(f"inspect: {PROG} patterns show {shlex.quote(str(out_dir))}")
    out(
        f"serve:   VLLM_DUO_PATTERN={shlex.quote(str(out_dir))} vllm serve MODEL "
        f"--attention-backend DUO"
    )
    return 0
