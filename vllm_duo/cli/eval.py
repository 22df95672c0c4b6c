"""``vllm-duo eval MODEL``: long-context accuracy of a pattern, as the DuoAttention paper shows it.

Needle-in-a-haystack heat maps over (context length, depth), accuracy against sparsity, and
agreement with full attention on natural text, every method in its own vLLM process
(:mod:`vllm_duo.evaluation`). vLLM is imported by the workers only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from pathlib import Path

from vllm_duo.cli.common import flag_text, out, parse_token_counts, pattern_message
from vllm_duo.errors import DuoConfigError
from vllm_duo.settings import KV_CACHE_DTYPES

_DEFAULT_METHODS = "full,duo,streaming,random"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The ``eval`` subcommand."""
    from vllm_duo.evaluation.config import PARTS
    from vllm_duo.evaluation.passkey import FAMILIES

    parser = commands.add_parser(
        "eval",
        help="long-context accuracy of a pattern: heat maps, sparsity sweep, agreement",
        description=(
            "Evaluate a pattern inside vLLM against full attention (the stock backend), "
            "all-streaming and a random pattern: needle-in-a-haystack accuracy per (context "
            "length, depth) as heat maps, accuracy and KV bytes per token against sparsity, "
            "and per-position KL / top-1 agreement with full attention on long natural text. "
            "Every method runs in its own process. Writes a table, eval.json and PNGs to "
            "--out. Prompt families: heldout (Newton's Opticks, RULER-style wording, 7-digit "
            "keys; never seen by calibration), calibration (the prompts vllm-duo calibrate "
            "trains on), dev (for debugging)."
        ),
    )
    parser.add_argument("model", metavar="MODEL_DIR", help="local Hugging Face model directory")
    parser.add_argument(
        "--pattern",
        metavar="NAME|PATH",
        default=None,
        help="pattern evaluated as 'duo' (default: the bundled pattern of the model)",
    )
    parser.add_argument(
        "--baseline",
        metavar="PATH",
        default=None,
        help="a second pattern to compare, run like duo as method 'baseline'",
    )
    parser.add_argument(
        "--methods",
        default=_DEFAULT_METHODS,
        metavar="LIST",
        help=f"comma-separated, from full, duo, streaming, random, baseline "
        f"(default {_DEFAULT_METHODS}; --baseline adds baseline)",
    )
    parser.add_argument(
        "--sparsity",
        default="0.5",
        metavar="S",
        help="sparsity of the heat maps and the agreement (default 0.5)",
    )
    parser.add_argument(
        "--sparsities",
        default="0.25,0.5,0.75,0.9",
        metavar="LIST",
        help="points of the sparsity sweep (default 0.25,0.5,0.75,0.9)",
    )
    parser.add_argument(
        "--lengths",
        default=None,
        metavar="LIST",
        help="heat-map prompt lengths, e.g. 1K,2K,8176 (default 1K steps up to "
        "the model's context, the last one leaving room for the answer)",
    )
    parser.add_argument(
        "--depths",
        default="10",
        metavar="N|LIST",
        help="a count of evenly spread depths, or fractions 0.1,0.5,... (default 10)",
    )
    parser.add_argument(
        "--per-cell",
        type=int,
        default=1,
        metavar="K",
        help="cases per (length, depth) cell (default 1)",
    )
    parser.add_argument(
        "--sweep-lengths",
        default=None,
        metavar="LIST",
        help="lengths of each sweep point (default: the heat-map lengths up to "
        "half the model's context)",
    )
    parser.add_argument(
        "--sweep-depths",
        default=None,
        metavar="N|LIST",
        help="depths of each sweep point (default: every other heat-map depth)",
    )
    parser.add_argument(
        "--families",
        default="heldout",
        metavar="LIST",
        help=f"prompt families, from {', '.join(FAMILIES)} (default heldout)",
    )
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        metavar="LIST",
        help=f"what to run, from {', '.join(PARTS)} (default all)",
    )
    parser.add_argument(
        "--agreement-length",
        default=None,
        metavar="T",
        help="tokens per agreement window (default: the longest length)",
    )
    parser.add_argument(
        "--agreement-windows",
        type=int,
        default=2,
        metavar="K",
        help="agreement windows, spread over the text (default 2)",
    )
    parser.add_argument(
        "--sink", type=int, default=64, metavar="S", help="sink tokens (default 64)"
    )
    parser.add_argument(
        "--recent", type=int, default=256, metavar="W", help="recent tokens (default 256)"
    )
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float16", "float32"),
        help="engine dtype (default bfloat16)",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=KV_CACHE_DTYPES,
        help="every engine's KV cache dtype, full attention's too (default auto: the model's)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=16,
        metavar="N",
        help="tokens generated per answer (default 16)",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="SEED", help="case seed (default 0)")
    parser.add_argument(
        "--out",
        default="eval-results",
        metavar="DIR",
        help="where eval.json, the PNGs and logs go (default eval-results)",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    parser.set_defaults(handler=_cmd_eval)


def _list(flag: str, raw: str) -> tuple[str, ...]:
    values = tuple(part.strip() for part in raw.split(",") if part.strip())
    if not values:
        raise DuoConfigError(f"{flag_text(flag, raw)} is empty: give a comma-separated list.")
    return values


def _fractions(flag: str, raw: str) -> tuple[float, ...]:
    values = []
    for part in _list(flag, raw):
        try:
            values.append(float(part))
        except ValueError:
            raise DuoConfigError(
                f"{flag_text(flag, raw)}: {part!r} is not a number; expected fractions in "
                f"[0, 1] separated by commas, e.g. 0.25,0.5."
            ) from None
    return tuple(values)


def _depths(flag: str, raw: str) -> tuple[float, ...]:
    from vllm_duo.evaluation.config import default_depths

    text = raw.strip()
    if text.isdigit():
        if not 1 <= int(text) <= 100:
            raise DuoConfigError(f"{flag_text(flag, raw)}: expected a count in [1, 100].")
        return default_depths(int(text))
    return _fractions(flag, raw)


def _model_config(model: Path) -> dict:
    """The model's config.json, with one clear error for a missing or wrong directory."""
    if not model.is_dir() or not (model / "config.json").is_file():
        what = "does not exist" if not model.exists() else "has no config.json"
        raise DuoConfigError(
            f"MODEL_DIR '{model}' {what}: pass a local Hugging Face model directory (config.json, "
            f"weights, tokenizer), e.g. the default model from `python -m "
            f"vllm_duo.default_model`."
        )
    return json.loads((model / "config.json").read_text(encoding="utf-8"))


def _model_id(model: Path) -> str:
    """The id a converted checkpoint records (vllm-duo's marker), else the directory name."""
    try:
        recorded = json.loads((model / "duo_prepared.json").read_text(encoding="utf-8"))["model"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    return recorded if isinstance(recorded, str) and recorded else model.resolve().name


def _pattern(spec: str | None, model: Path, shape: tuple[int, int], flag: str) -> Path:
    from vllm_duo.patterns import check_shape, load_gates, resolve_pattern

    try:
        path, _ = resolve_pattern(spec, None if spec else _model_id(model), shape)
    except DuoConfigError as exc:
        message = pattern_message(str(exc), spec or "")
        raise DuoConfigError(f"{flag}: {message}") from None
    check_shape(load_gates(path), shape[0], shape[1], f"{flag} {path}")
    return path


def _cmd_eval(args: argparse.Namespace) -> int:
    """``vllm-duo eval MODEL_DIR``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm_duo.evaluation import report
    from vllm_duo.evaluation.config import EvalConfig, default_lengths

    model = Path(args.model).expanduser()
    hf = _model_config(model)
    layers = int(hf["num_hidden_layers"])
    kv_heads = int(hf.get("num_key_value_heads") or hf["num_attention_heads"])
    head_size = int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
    shape = {"num_layers": layers, "num_kv_heads": kv_heads, "head_size": head_size}
    max_context = int(hf.get("max_position_embeddings") or 2048)
    pattern = _pattern(args.pattern, model, (layers, kv_heads), "--pattern")
    baseline = (
        _pattern(args.baseline, model, (layers, kv_heads), "--baseline") if args.baseline else None
    )
    methods = _list("methods", args.methods)
    if baseline is not None and "baseline" not in methods:
        methods = (*methods, "baseline")
    lengths = (
        parse_token_counts("lengths", args.lengths)
        if args.lengths
        else default_lengths(max_context, args.max_tokens)
    )
    depths = _depths("depths", args.depths)
    sweep_lengths = (
        parse_token_counts("sweep-lengths", args.sweep_lengths)
        if args.sweep_lengths
        else tuple(n for n in lengths if n <= max_context // 2) or lengths[:1]
    )
    sweep_depths = _depths("sweep-depths", args.sweep_depths) if args.sweep_depths else depths[::2]
    sparsity = _fractions("sparsity", args.sparsity)
    if len(sparsity) != 1:
        raise DuoConfigError(f"{flag_text('sparsity', args.sparsity)}: expected one number.")
    agreement_length = (
        parse_token_counts("agreement-length", args.agreement_length)[0]
        if args.agreement_length
        else max(lengths)
    )
    config = EvalConfig(
        model=model,
        pattern=pattern,
        out=Path(args.out),
        max_context=max_context,
        lengths=lengths,
        depths=depths,
        methods=methods,
        baseline=baseline,
        sparsity=sparsity[0],
        sparsities=_fractions("sparsities", args.sparsities),
        sweep_lengths=sweep_lengths,
        sweep_depths=sweep_depths,
        per_cell=args.per_cell,
        families=_list("families", args.families),
        parts=_list("parts", args.parts),
        agreement_length=agreement_length,
        agreement_windows=args.agreement_windows,
        sink=args.sink,
        recent=args.recent,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        seed=args.seed,
        max_tokens=args.max_tokens,
    )
    from transformers import AutoTokenizer

    from vllm_duo.evaluation.run import run_eval

    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    # SIGTERM unwinds like Ctrl-C, so the running worker is stopped too; a rerun with the same
    # settings and --out reuses the jobs that had finished.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    results = run_eval(config, tokenizer)
    summary = report.analyse(results, shape)
    meta = results["meta"]
    command = "vllm-duo " + " ".join(shlex.quote(a) for a in args.argv)
    meta["command"] = command
    title = (
        f"{model.name}, pattern {Path(pattern).name}, S={config.sink} W={config.recent}, "
        f"{config.dtype}"
        + (f", KV cache {config.kv_cache_dtype}" if config.kv_cache_dtype != "auto" else "")
        + f"; {meta['machine']}; {meta['date']}"
    )
    out(title)
    for line in report.table(results, summary):
        out(line)
    config.out.mkdir(parents=True, exist_ok=True)
    report.write_json(config.out / "eval.json", results, summary)
    if results.get("agreement"):
        import numpy as np

        for method, data in results["agreement"].items():
            np.savez_compressed(
                config.out / f"agreement-{method}.npz", kl=data["kl"], top1=data["top1"]
            )
    out(f"wrote {config.out / 'eval.json'}")
    if not args.no_plot:
        written = []
        for family, fam in summary["families"].items():
            if fam["niah"]:
                written.append(
                    report.plot_niah(
                        config.out / f"niah-{family}.png",
                        results,
                        summary,
                        family,
                        f"{family} family; {title}",
                    )
                )
        if any(f["sweep"] for f in summary["families"].values()):
            written.append(report.plot_sweep(config.out / "sweep.png", results, summary, title))
        if results.get("agreement"):
            written.append(report.plot_agreement(config.out / "agreement.png", results, title))
        for path in written:
            out(f"wrote {path}")
    return 0
