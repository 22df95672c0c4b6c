"""Runs every method of ``vllm-duo eval`` in its own worker process and gathers the results.

The plan is one job per (method, sparsity, mode): ``full`` runs vLLM's stock backend,
``streaming`` is the pattern at sparsity 1, and ``duo`` / ``random`` / ``baseline`` run once
per sparsity point. A job's cases are the heat-map grid (at ``--sparsity`` only) and the
sweep grid (at the sweep's sparsities), de-duplicated, so no case runs twice per method.
Agreement jobs (``hidden`` mode) return every position's final hidden state on windows of
natural text; KL and top-1 agreement are computed here, against full attention.

Never imports vLLM: workers do (:mod:`vllm_duo.evaluation.worker`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vllm_duo.errors import DuoConfigError
from vllm_duo.evaluation.config import EvalConfig
from vllm_duo.evaluation.passkey import PasskeyCase, build_cases
from vllm_duo.machine import cpu_description
from vllm_duo.patterns import load_gates
from vllm_duo.settings import ENV_PATTERN, ENV_RECENT, ENV_SINK, ENV_SPARSITY
from vllm_duo.worker_process import read_rows, run_worker

__all__ = ["Job", "plan_jobs", "run_eval"]

AGREEMENT_SOURCE = "newton-opticks"
"""The natural text of the agreement measurement (never seen by calibration)."""

CaseKey = tuple[str, int, float, int]


def case_key(case: PasskeyCase) -> CaseKey:
    return (case.family, case.length, case.depth, case.index)


@dataclass
class Job:
    """One worker process: a method at one sparsity, generating answers or hidden states."""

    method: str
    sparsity: float | None
    mode: str
    cases: list[PasskeyCase] = field(default_factory=list)
    windows: list[list[int]] = field(default_factory=list)

    @property
    def tag(self) -> str:
        point = "" if self.sparsity is None else f"-{self.sparsity:g}"
        return f"{self.method}{point}-{self.mode}"

    @property
    def size(self) -> int:
        return len(self.cases) if self.mode == "generate" else len(self.windows)


def random_pattern(reference: Path, directory: Path, seed: int) -> Path:
    """Uniformly random gates with the shape of ``reference``: which heads stream is chance."""
    shape = load_gates(reference).shape
    gates = np.random.default_rng(seed).random(shape)
    directory.mkdir(parents=True, exist_ok=True)
    np.savetxt(directory / "full_attention_heads.tsv", gates, delimiter="\t", fmt="%.6f")
    return directory


def agreement_windows(tokenizer: Any, length: int, count: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens spread evenly over the agreement text."""
    from vllm_duo.evaluation.texts import SentencePool

    # Sentence by sentence (as the passkey haystacks), not the whole book in one call.
    pool = SentencePool(tokenizer, AGREEMENT_SOURCE)
    ids = [token for sentence in pool.ids for token in sentence]
    if len(ids) < length:
        raise DuoConfigError(
            f"--agreement-length={length}: the agreement text has only {len(ids)} tokens."
        )
    step = (len(ids) - length) // max(1, count - 1)
    return [ids[i * step : i * step + length] for i in range(count)]


def plan_jobs(config: EvalConfig, tokenizer: Any) -> list[Job]:
    """Every job of the run, full attention first (the others are compared with it)."""
    niah: list[PasskeyCase] = []
    sweep: list[PasskeyCase] = []
    for family in config.families:
        if "niah" in config.parts:
            niah += build_cases(
                tokenizer, family, config.lengths, config.depths, config.seed, config.per_cell
            )
        if "sweep" in config.parts:
            sweep += build_cases(
                tokenizer,
                family,
                config.sweep_lengths,
                config.sweep_depths,
                config.seed,
                config.per_cell,
            )
    windows = []
    if "agreement" in config.parts:
        windows = agreement_windows(tokenizer, config.agreement_length, config.agreement_windows)

    def union(*groups: list[PasskeyCase]) -> list[PasskeyCase]:
        seen: dict[CaseKey, PasskeyCase] = {}
        for group in groups:
            for case in group:
                seen.setdefault(case_key(case), case)
        return list(seen.values())

    jobs: list[Job] = []
    for method in config.methods:
        if method in ("full", "streaming"):
            points: tuple[float | None, ...] = (None if method == "full" else 1.0,)
        else:
            points = config.sweep_points
        for point in points:
            fixed = method in ("full", "streaming")
            cases = union(
                niah if fixed or point == config.sparsity else [],
                sweep if fixed or point in config.sparsities else [],
            )
            if cases:
                jobs.append(Job(method, point, "generate", cases=cases))
            if windows and (fixed or point == config.sparsity):
                jobs.append(Job(method, point, "hidden", windows=windows))
    return jobs


def _llm_kwargs(config: EvalConfig, method: str) -> dict[str, Any]:
    import torch

    stock = None if torch.cuda.is_available() else "CPU_ATTN"
    return {
        "attention_backend": stock if method == "full" else "DUO",
        "dtype": config.dtype,
        "kv_cache_dtype": config.kv_cache_dtype,
        "max_model_len": config.max_context,
        "kv_cache_memory_bytes": 1 << 30,
        "enable_prefix_caching": False,
        "enforce_eager": True,
        "seed": config.seed,
    }


def _env(job: Job, patterns: dict[str, Path], config: EvalConfig, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_DUO_")}
    env.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        TMPDIR=str(tmp),
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
    )
    env.update(_duo_settings(job, patterns, config))
    return env


def _duo_settings(job: Job, patterns: dict[str, Path], config: EvalConfig) -> dict[str, str]:
    """The VLLM_DUO_* variables of a job (none for full attention)."""
    if job.method == "full":
        return {}
    return {
        ENV_PATTERN: str(patterns[job.method]),
        ENV_SPARSITY: repr(job.sparsity),
        ENV_SINK: str(config.sink),
        ENV_RECENT: str(config.recent),
    }


def _pattern_digest(job: Job, patterns: dict[str, Path]) -> str | None:
    """A digest of the gates a job runs with: a rerun reuses answers only for the same gates."""
    if job.method == "full":
        return None
    gates = Path(patterns[job.method]) / "full_attention_heads.tsv"
    return hashlib.sha256(gates.read_bytes()).hexdigest() if gates.is_file() else None


def _run_job(job: Job, config: EvalConfig, patterns: dict[str, Path], progress: Any) -> dict:
    work = config.out / "work"
    hidden = work / "hidden"
    hidden.mkdir(parents=True, exist_ok=True)
    results = work / f"{job.tag}.jsonl"
    request = work / f"{job.tag}.request.json"
    prompts = [list(c.prompt_ids) for c in job.cases] if job.mode == "generate" else job.windows
    text = json.dumps(
        {
            "model": str(config.model),
            "llm_kwargs": _llm_kwargs(config, job.method),
            "duo_env": _duo_settings(job, patterns, config),
            "pattern_digest": _pattern_digest(job, patterns),
            "mode": job.mode,
            "prompts": prompts,
            "max_tokens": config.max_tokens,
            "batch": 4 if job.mode == "generate" else 1,
            "hidden_dir": str(hidden),
            "tag": job.tag,
        }
    )
    reused = _finished(request, results, text, job)
    if reused is not None:
        # The same job already ran to the end in this --out (an interrupted eval, rerun).
        if progress is not None:
            progress.update(job.size)
        return reused
    if not _same_request(request, text):
        results.unlink(missing_ok=True)
        request.write_text(text)
    # else the same request stopped part way (a killed eval): the worker answers only the
    # prompts that have no line in `results` yet.
    log_path = config.out / "logs" / f"{job.tag}.log"
    started = time.time()
    done = 0
    if progress is not None:
        progress.set_postfix_str(job.tag)

    def poll() -> None:
        nonlocal done
        done = _advance(progress, results, done)

    run_worker(
        "vllm_duo.evaluation.worker", [str(request), str(results)], log_path=log_path,
        env_for=lambda tmp: _env(job, patterns, config, tmp), on_poll=poll,
        what=f"{job.tag} worker",
    )  # fmt: skip
    rows = read_rows(results)
    engine = next(r for r in rows if r["kind"] == "engine")
    return {
        "rows": [r for r in rows if r["kind"] != "engine"],
        "wall_s": time.time() - started,
        "startup_s": engine["startup_s"],
    }


def _same_request(request: Path, text: str) -> bool:
    """Whether the job's request file holds this request (its results, if any, answer it)."""
    return request.exists() and request.read_text() == text


def _finished(request: Path, results: Path, text: str, job: Job) -> dict | None:
    """The results of an identical request that completed earlier, else None."""
    if not _same_request(request, text):
        return None
    rows = read_rows(results)
    done = [r for r in rows if r["kind"] != "engine"]
    if len(done) != job.size or not all(Path(r["path"]).exists() for r in done if "path" in r):
        return None
    engine = next(r for r in rows if r["kind"] == "engine")
    return {"rows": done, "wall_s": 0.0, "startup_s": engine["startup_s"], "reused": True}


def _advance(progress: Any, results: Path, done: int) -> int:
    count = sum(1 for r in read_rows(results) if r["kind"] != "engine")
    if progress is not None and count > done:
        progress.update(count - done)
    return count


def run_eval(config: EvalConfig, tokenizer: Any, *, show_progress: bool = True) -> dict[str, Any]:
    """Runs every job and returns the raw results (see :mod:`vllm_duo.evaluation.report`).

    Returns ``{"meta": ..., "answers": [...], "agreement": {...}}``: one answer row per
    (method, sparsity, case) and, per compared method, per-position KL and top-1 arrays.
    """
    config.out.mkdir(parents=True, exist_ok=True)
    patterns = {"duo": config.pattern, "streaming": config.pattern}
    if "random" in config.methods:
        patterns["random"] = random_pattern(
            config.pattern, config.out / "random-pattern", config.seed
        )
    if config.baseline is not None:
        patterns["baseline"] = config.baseline
    jobs = plan_jobs(config, tokenizer)
    progress = None
    if show_progress:
        from tqdm.auto import tqdm

        progress = tqdm(
            total=sum(j.size for j in jobs), desc="eval", unit="prompt", dynamic_ncols=True
        )
    began = time.time()
    answers: list[dict[str, Any]] = []
    hidden: dict[str, list[str]] = {}
    timings: list[dict[str, Any]] = []
    try:
        for job in jobs:
            result = _run_job(job, config, patterns, progress)
            timings.append(
                {
                    "job": job.tag,
                    "prompts": job.size,
                    "wall_s": result["wall_s"],
                    "startup_s": result["startup_s"],
                }
            )
            if job.mode == "generate":
                for row in result["rows"]:
                    case = job.cases[row["i"]]
                    answers.append(
                        {
                            **case.to_dict(),
                            "method": job.method,
                            "sparsity": job.sparsity,
                            "answer": row["text"],
                            "correct": case.correct(row["text"]),
                            "seconds": row["seconds"],
                        }
                    )
            else:
                hidden[job.method] = [
                    r["path"] for r in sorted(result["rows"], key=lambda r: r["i"])
                ]
    finally:
        if progress is not None:
            progress.close()
    agreement = _agreement(config, hidden)
    shutil.rmtree(config.out / "work" / "hidden", ignore_errors=True)
    meta = {
        "model": str(config.model),
        "pattern": str(config.pattern),
        "baseline": str(config.baseline) if config.baseline else None,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in config.__dict__.items()},
        "machine": cpu_description(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(began)),
        "wall_s": time.time() - began,
        "jobs": timings,
    }
    return {"meta": meta, "answers": answers, "agreement": agreement}


def _agreement(config: EvalConfig, hidden: dict[str, list[str]]) -> dict[str, Any]:
    """Per method: per-position KL and top-1 agreement against full attention, all windows."""
    if "full" not in hidden:
        return {}
    from vllm_duo.evaluation.agreement import load_lm_head, token_agreement

    lm_head = load_lm_head(config.model)
    out: dict[str, Any] = {}
    for method, paths in hidden.items():
        if method == "full":
            continue
        kl, agree = [], []
        for ref, test in zip(hidden["full"], paths):
            k, a = token_agreement(np.load(ref), np.load(test), lm_head)
            kl.append(k)
            agree.append(a)
        out[method] = {"kl": np.stack(kl), "top1": np.stack(agree)}
    return out
