"""The ``vllm-duo`` command line.

Subcommands:

- ``vllm-duo patterns list``: the bundled DuoAttention patterns.
- ``vllm-duo patterns show NAME|PATH``: the retrieval/streaming split of one pattern at a given
  sparsity or threshold, the KV-cache saving it buys, optionally a PNG heat map.
- ``vllm-duo calibrate MODEL_DIR --out DIR``: learn a pattern for a local model
  (:mod:`vllm_duo.calibration`; needs torch and transformers, not vLLM).

The ``patterns`` commands are pure: they use :mod:`vllm_duo.patterns` and
:mod:`vllm_duo.settings` only and never import vLLM, so they work on a machine without it.
Commands that need an engine import it inside their own handler, never at module level.

Every problem with the user's input is reported as one line ``vllm-duo: error: <message>`` on
stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from vllm_duo import __version__
from vllm_duo.errors import DuoConfigError
from vllm_duo.patterns import (
    BundledPattern,
    HeadPlan,
    check_shape,
    list_bundled,
    load_gates,
    render_png,
    resolve_pattern,
    select_retrieval,
)
from vllm_duo.settings import (
    DEFAULT_RECENT,
    DEFAULT_SINK,
    DEFAULT_SPARSITY,
    ENV_PATTERN,
    ENV_RECENT,
    ENV_SINK,
    ENV_SPARSITY,
    ENV_THRESHOLD,
    MAX_TOKENS,
    DuoSettings,
)

__all__ = ["main"]

PROG = "vllm-duo"
DEFAULT_CONTEXT = 8192
# Bytes per K or V element in the KV-cache estimate: fp16 / bf16, vLLM's default cache dtype.
KV_ELEMENT_BYTES = 2

# Flag <-> environment variable of the same setting, so DuoSettings does the validation and
# its messages are rewritten to name the flag the user actually typed.
_FLAG_ENV = {
    "sparsity": ENV_SPARSITY,
    "threshold": ENV_THRESHOLD,
    "sink": ENV_SINK,
    "recent": ENV_RECENT,
}
_INT_RE = re.compile(r"[0-9]+")


# --------------------------------------------------------------------------------------------
# Output helpers (the only places that print)
# --------------------------------------------------------------------------------------------


def _out(line: str = "") -> None:
    """Write one line of command output to stdout."""
    print(line, file=sys.stdout)


def _error_line(message: str) -> None:
    """Write the single ``vllm-duo: error: ...`` line to stderr (newlines folded)."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"{PROG}: error: {text}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------


class _UsageError(Exception):
    """A command-line syntax error found by argparse; reported like any other bad input."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors become :class:`_UsageError` instead of usage + exit.

    Subparsers inherit the class, so every level reports errors the same one-line way.
    """

    def error(self, message: str) -> NoReturn:
        """Raise instead of printing the usage block and exiting."""
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _build_parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        description="DuoAttention for vLLM: inspect head patterns.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    patterns = commands.add_parser(
        "patterns",
        help="list and inspect DuoAttention head patterns",
        description="List and inspect DuoAttention head patterns (no vLLM needed).",
    )
    pattern_commands = patterns.add_subparsers(
        dest="patterns_command", metavar="SUBCOMMAND", required=True
    )

    listing = pattern_commands.add_parser(
        "list",
        help="list the bundled patterns",
        description="List the patterns bundled with vllm-duo.",
    )
    listing.set_defaults(handler=_cmd_patterns_list)

    show = pattern_commands.add_parser(
        "show",
        help="show the retrieval/streaming split of a pattern",
        description=(
            "Show which KV heads of a pattern become retrieval heads at a given sparsity or "
            "threshold, and the KV-cache saving that buys."
        ),
    )
    show.add_argument(
        "pattern",
        metavar="NAME|PATH",
        help="bundled pattern name (case-insensitive) or a pattern directory / TSV file",
    )
    selection = show.add_mutually_exclusive_group()
    selection.add_argument(
        "--sparsity",
        metavar="X",
        help=(
            "fraction of all KV heads that become streaming heads, in [0, 1] (default: the "
            f"bundled pattern's recommended sparsity, else {DEFAULT_SPARSITY})"
        ),
    )
    selection.add_argument(
        "--threshold",
        metavar="T",
        help="instead of --sparsity: heads with gate >= T become retrieval heads",
    )
    show.add_argument(
        "--sink",
        metavar="S",
        help=f"sink tokens kept by streaming heads (default {DEFAULT_SINK})",
    )
    show.add_argument(
        "--recent",
        metavar="W",
        help=f"recent tokens kept by streaming heads (default {DEFAULT_RECENT})",
    )
    show.add_argument(
        "--context",
        metavar="L",
        help=f"context length in tokens for the KV estimates (default {DEFAULT_CONTEXT})",
    )
    show.add_argument(
        "--png",
        metavar="FILE",
        help="also write a heat map of the gates with the retrieval heads marked",
    )
    show.set_defaults(handler=_cmd_patterns_show)
    _add_calibrate_parser(commands)
    _add_bench_parser(commands)
    return parser


def _add_option(
    parser: argparse.ArgumentParser,
    field: str,
    kind: type,
    metavar: str,
    text: str,
    default: object,
) -> None:
    """``--field-name`` for a config dataclass field, its default shown in the help."""
    parser.add_argument("--" + field.replace("_", "-"), dest=field, type=kind, default=default,
                        metavar=metavar, help=f"{text} (default {default})")  # fmt: skip


def _add_calibrate_parser(commands: argparse._SubParsersAction) -> None:
    """The ``calibrate`` subcommand (defaults shown from :class:`CalibrationConfig`)."""
    import dataclasses

    from vllm_duo.calibration.train import CalibrationConfig

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
        _add_option(calibrate, field, kind, metavar, text, defaults[field])
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
    calibrate.add_argument(
        "--model-id",
        default=None,
        metavar="ID",
        help="model id recorded in model.json (default: the id the directory records, else "
        "its name)",
    )
    calibrate.add_argument("--resume", action="store_true", help="continue the checkpoint in DIR")
    calibrate.set_defaults(handler=_cmd_calibrate)


def _add_bench_parser(commands: argparse._SubParsersAction) -> None:
    """The ``bench`` subcommand (defaults shown from :class:`BenchConfig`)."""
    import dataclasses

    from vllm_duo.bench.config import BenchConfig, SyntheticModel

    defaults = {f.name: f.default for f in dataclasses.fields(BenchConfig)}
    model_defaults = {f.name: f.default for f in dataclasses.fields(SyntheticModel)}
    bench = commands.add_parser(
        "bench",
        help="measure DUO against the stock backend (speed, memory, capacity)",
        description=(
            "Run the stock attention backend and DUO in the same run, on the same model and "
            "prompts, over context lengths: prefill time, decode time per token, decode "
            "throughput of concurrent requests, KV bytes held per token and vLLM's maximum "
            "concurrency, each as a DUO/stock ratio next to the ideal. Writes a table, "
            "bench.json and bench.png. Default model: a random-weight Llama with "
            "Llama-3-8B's attention (32 query heads, 8 KV heads, head size 128)."
        ),
    )
    contexts = ",".join(f"{c // 1024}K" for c in defaults["contexts"])
    bench.add_argument(
        "--contexts",
        default=contexts,
        metavar="LIST",
        help=f"context lengths, e.g. 4K,8K,32768 (default {contexts})",
    )
    bench.add_argument(
        "--quick", action="store_true", help="a smoke run: contexts 2K,4K and 8 decode tokens"
    )
    bench.add_argument(
        "--out",
        default="bench-results",
        metavar="DIR",
        help="where bench.json, bench.png and logs go (default bench-results)",
    )
    bench.add_argument(
        "--model",
        default=None,
        metavar="MODEL_DIR",
        help="a local model instead of the synthetic one (needs --pattern)",
    )
    bench.add_argument(
        "--pattern",
        default=None,
        metavar="DIR",
        help="pattern directory (default: random gates for the synthetic model)",
    )
    bench.add_argument("--no-plot", action="store_true", help="skip bench.png")
    options: list[tuple[str, type, str, str, dict]] = [
        ("sparsity", float, "S", "fraction of streaming heads", defaults),
        ("sink", int, "S", "sink tokens", defaults),
        ("recent", int, "W", "recent-window tokens", defaults),
        ("decode_tokens", int, "N", "tokens decoded per request", defaults),
        ("concurrency", int, "B", "requests decoding together for throughput", defaults),
        ("max_num_batched_tokens", int, "T", "prefill chunk (tokens per step)", defaults),
        ("kv_cache_gib", float, "GIB", "KV cache of each engine", defaults),
        ("seed", int, "SEED", "prompt and pattern seed", defaults),
        ("num_layers", int, "N", "synthetic model: layers", model_defaults),
        ("hidden_size", int, "H", "synthetic model: hidden width", model_defaults),
        ("intermediate_size", int, "I", "synthetic model: MLP width", model_defaults),
    ]
    for field, kind, metavar, text, source in options:
        _add_option(bench, field, kind, metavar, text, source[field])
    bench.add_argument("--dtype", default=defaults["dtype"],
                       choices=("bfloat16", "float16", "float32"),
                       help=f"model dtype (default {defaults['dtype']})")  # fmt: skip
    for flag, side in (("kv_cache_dtype", "DUO's"), ("stock_kv_cache_dtype", "the stock")):
        bench.add_argument(f"--{flag.replace('_', '-')}", default=defaults[flag],
                           metavar="DTYPE", help=f"{side} KV cache dtype: auto (the model's), "
                           f"fp8, fp8_e4m3 or fp8_e5m2 (default {defaults[flag]})")  # fmt: skip
    bench.set_defaults(handler=_cmd_bench)


# --------------------------------------------------------------------------------------------
# Flag validation (through DuoSettings, messages rewritten to name the flags)
# --------------------------------------------------------------------------------------------


def _flag_text(flag: str, raw: str) -> str:
    """``--flag=value`` as a user would type it (quoted only where a shell would need it)."""
    return f"--{flag}={shlex.quote(raw)}"


def _settings_from_flags(flags: dict[str, str | None]) -> DuoSettings:
    """Validate the given flag values exactly as the ``VLLM_DUO_*`` variables are validated.

    ``flags`` maps flag names (``sparsity``, ``threshold``, ``sink``, ``recent``) to the raw
    text the user passed, or None when the flag was not given.
    """
    given = {flag: raw for flag, raw in flags.items() if raw is not None}
    for flag, raw in given.items():
        # from_env treats a blank value as unset; a blank flag is a mistake, not a default.
        if not raw.strip():
            kind = "a float in [0, 1]" if flag in ("sparsity", "threshold") else "an integer"
            raise DuoConfigError(f"{_flag_text(flag, raw)} is empty: expected {kind}.")
    env = {_FLAG_ENV[flag]: raw for flag, raw in given.items()}
    try:
        return DuoSettings.from_env(env)
    except DuoConfigError as exc:
        message = str(exc)
        for flag, raw in given.items():
            var = _FLAG_ENV[flag]
            message = message.replace(f"{var}={raw!r}", _flag_text(flag, raw))
        for flag, var in _FLAG_ENV.items():
            message = message.replace(var, f"--{flag}")
        raise DuoConfigError(message) from None


def _parse_context(raw: str | None) -> int:
    """The ``--context`` value: a base-10 integer in [1, MAX_TOKENS]."""
    if raw is None:
        return DEFAULT_CONTEXT
    text = raw.strip()
    if not _INT_RE.fullmatch(text):
        raise DuoConfigError(
            f"{_flag_text('context', raw)} is not a base-10 integer: expected a context length "
            f"in tokens, an integer >= 1; example: --context=32768."
        )
    value = int(text)
    if not 1 <= value <= MAX_TOKENS:
        raise DuoConfigError(
            f"{_flag_text('context', raw)} is out of range: expected an integer in "
            f"[1, {MAX_TOKENS}] (context length in tokens)."
        )
    return value


def _pattern_message(message: str, spec: str) -> str:
    """Rewrite a resolve_pattern message about ``VLLM_DUO_PATTERN`` for the positional arg."""
    message = message.replace(f"{ENV_PATTERN}={spec!r}", f"pattern {spec!r}")
    message = message.replace(
        f"set {ENV_PATTERN} to a bundled pattern name", "pass a bundled pattern name"
    )
    return message.replace(" or to a directory containing", " or a directory containing")


# --------------------------------------------------------------------------------------------
# patterns list
# --------------------------------------------------------------------------------------------


def _shape_value(pattern: BundledPattern, key: str) -> str:
    value = pattern.shape.get(key)
    return "?" if value is None else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns separated by two spaces; no trailing blanks."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        lines.append("  ".join(cells).rstrip())
    return lines


def _cmd_patterns_list(args: argparse.Namespace) -> int:
    """``vllm-duo patterns list``."""
    bundled = list_bundled()
    if not bundled:
        _out("no bundled patterns are installed")
        return 0
    header = ("NAME", "MODEL IDS", "LAYERS x KV", "HEADS", "HEAD SIZE", "SPARSITY")
    rows: list[tuple[str, ...]] = []
    for pattern in bundled:
        rows.append(
            (
                pattern.name,
                pattern.model_ids[0],
                f"{pattern.num_layers} x {pattern.num_kv_heads}",
                _shape_value(pattern, "num_attention_heads"),
                _shape_value(pattern, "head_size"),
                f"{pattern.recommended_sparsity:g}",
            )
        )
        # Further model ids on continuation rows keep the table narrow.
        rows.extend(("", model_id, "", "", "", "") for model_id in pattern.model_ids[1:])
    for line in _table(header, rows):
        _out(line)
    _out()
    _out(
        "SPARSITY is the recommended fraction of streaming heads; "
        f"`{PROG} patterns show NAME` prints the per-layer split."
    )
    return 0


# --------------------------------------------------------------------------------------------
# patterns show
# --------------------------------------------------------------------------------------------


def _format_bytes(count: float) -> str:
    """Bytes as B / KiB / MiB with one decimal."""
    if count < 1024:
        return f"{count:.0f} B"
    if count < 1024**2:
        return f"{count / 1024:.1f} KiB"
    return f"{count / 1024**2:.1f} MiB"


def _wrap_title(lines: Sequence[str], kv_heads: int) -> str:
    """Wrap title lines to what fits above the heat map.

    render_png makes the figure about ``2 + 0.25 * heads`` inches wide (at most 14) at 100 dpi;
    a 12-pt title character is about 9 characters per inch of that width.
    """
    width = max(16, int(min(2.0 + 0.25 * kv_heads, 14.0) * 9))
    wrapped: list[str] = []
    for line in lines:
        wrapped.extend(textwrap.wrap(line, width=width) or [""])
    return "\n".join(wrapped)


def _cmd_patterns_show(args: argparse.Namespace) -> int:
    """``vllm-duo patterns show NAME|PATH``."""
    spec: str = args.pattern
    if not spec.strip():
        raise DuoConfigError(
            f"pattern {spec!r} is empty: pass a bundled pattern name (`{PROG} patterns list`) or "
            f"a pattern directory / .tsv path."
        )
    settings = _settings_from_flags(
        {
            "sparsity": args.sparsity,
            "threshold": args.threshold,
            "sink": args.sink,
            "recent": args.recent,
        }
    )
    context = _parse_context(args.context)

    try:
        path, label = resolve_pattern(spec, None, None)
    except DuoConfigError as exc:
        raise DuoConfigError(_pattern_message(str(exc), spec)) from None
    bundled: BundledPattern | None = None
    if label.startswith("bundled:"):
        name = label.split(":", 1)[1]
        bundled = next((b for b in list_bundled() if b.name == name), None)

    gates = load_gates(path)
    if bundled is not None:
        check_shape(gates, bundled.num_layers, bundled.num_kv_heads, f"'{bundled.name}'")

    # Selection: explicit flag, else the bundled pattern's recommendation, else the default.
    if settings.threshold is not None:
        kwargs: dict[str, float] = {"threshold": settings.threshold}
        selection = f"threshold={settings.threshold:g} (--threshold)"
    elif args.sparsity is not None:
        kwargs = {"sparsity": float(settings.sparsity or 0.0)}
        selection = f"sparsity={kwargs['sparsity']:g} (--sparsity)"
    elif bundled is not None:
        kwargs = {"sparsity": bundled.recommended_sparsity}
        selection = f"sparsity={bundled.recommended_sparsity:g} (recommended for this pattern)"
    else:
        kwargs = {"sparsity": DEFAULT_SPARSITY}
        selection = f"sparsity={DEFAULT_SPARSITY:g} (default)"
    mask = select_retrieval(gates, **kwargs)
    plan = HeadPlan.from_mask(mask)

    layers, kv_heads = plan.num_layers, plan.num_kv_heads
    total = layers * kv_heads
    sink, recent = settings.sink, settings.recent
    ratio = plan.kv_bytes_ratio(context, sink, recent)
    fraction = plan.retrieval_fraction

    # Collect the report first and print it only once everything (the PNG too) has worked, so
    # an error never leaves half a report on stdout.
    lines: list[str] = []
    source = label if bundled is None else f"{label} ({path})"
    lines.append(f"pattern:    {source}")
    if bundled is not None:
        lines.append(f"model ids:  {', '.join(bundled.model_ids)}")
        shape = (
            f"{layers} layers x {kv_heads} KV heads, "
            f"{_shape_value(bundled, 'num_attention_heads')} attention heads, "
            f"head size {_shape_value(bundled, 'head_size')}"
        )
    else:
        shape = f"{layers} layers x {kv_heads} KV heads"
    lines.append(f"shape:      {shape}")
    lines.append(f"selection:  {selection}")
    lines.append(f"streaming:  sink={sink} recent={recent} tokens per streaming head")
    lines.append(
        f"retrieval:  {plan.num_retrieval}/{total} heads ({fraction:.1%}), "
        f"streaming: {plan.num_streaming}/{total}"
    )
    lines.append(f"per layer:  {plan.compact_counts()}")
    lines.append("")
    digits = len(str(layers - 1))
    for layer, heads in enumerate(plan.retrieval):
        lines.append(
            f"layer {layer:>{digits}}: {len(heads)}/{kv_heads} retrieval  heads "
            f"[{', '.join(str(h) for h in heads)}]"
        )
    lines.append("")

    kept = f"{ratio:.1%} of full attention"
    head_size = bundled.shape.get("head_size") if bundled is not None else None
    if isinstance(head_size, int) and not isinstance(head_size, bool) and head_size > 0:
        full = 2 * layers * kv_heads * head_size * KV_ELEMENT_BYTES
        lines.append(
            f"KV bytes per token at L={context} (16-bit KV cache): "
            f"{_format_bytes(full * ratio)} vs {_format_bytes(full)} for full attention ({kept})"
        )
    else:
        lines.append(
            f"KV bytes per token at L={context}: {kept} (head size unknown for a path pattern)"
        )
    lines.append(
        f"ideal decode KV-read reduction at L={context}: {1.0 / ratio:.2f}x  "
        f"(L / (r*L + (1-r)*(S+W)), r={fraction:.3f}, S+W={sink + recent})"
    )

    if args.png is not None:
        name = bundled.name if bundled is not None else os.path.basename(os.path.normpath(path))
        title_lines = [
            name,
            selection.split(" (")[0],
            f"{plan.num_retrieval}/{total} retrieval (outlined)",
        ]
        title = _wrap_title(title_lines, kv_heads)
        try:
            written = render_png(gates, args.png, mask=mask, title=title)
        except OSError as exc:
            raise DuoConfigError(
                f"--png={shlex.quote(args.png)} cannot be written ({exc.strerror or exc}): "
                f"check that the directory exists and is writable."
            ) from None
        lines.append(f"heat map written to {written}")
    for line in lines:
        _out(line)
    return 0


# --------------------------------------------------------------------------------------------
# calibrate
# --------------------------------------------------------------------------------------------


def _parse_contexts(raw: str) -> tuple[int, ...]:
    """``--contexts 4K,8K,32768`` -> (4096, 8192, 32768)."""
    values = []
    for part in raw.split(","):
        text = part.strip().upper()
        scale = 1024 if text.endswith("K") else 1
        digits = text[:-1] if scale > 1 else text
        if not _INT_RE.fullmatch(digits):
            raise DuoConfigError(
                f"{_flag_text('contexts', raw)}: {part.strip()!r} is not a token count; "
                "expected comma-separated integers, optionally with K (x1024), e.g. 4K,8K,32768."
            )
        values.append(int(digits) * scale)
    return tuple(values)


def _cmd_bench(args: argparse.Namespace) -> int:
    """``vllm-duo bench``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm_duo.bench import report
    from vllm_duo.bench.config import BenchConfig, SyntheticModel
    from vllm_duo.bench.run import run_bench

    if args.model is not None and args.pattern is None:
        raise DuoConfigError(
            f"--model {args.model} needs --pattern DIR: a pattern made for that model "
            "(random gates are only generated for the synthetic model)."
        )
    contexts = (2048, 4096) if args.quick else _parse_contexts(args.contexts)
    config = BenchConfig(
        contexts=contexts, sparsity=args.sparsity, sink=args.sink, recent=args.recent,
        decode_tokens=8 if args.quick else args.decode_tokens, concurrency=args.concurrency,
        max_num_batched_tokens=args.max_num_batched_tokens, dtype=args.dtype,
        kv_cache_gib=args.kv_cache_gib, seed=args.seed, kv_cache_dtype=args.kv_cache_dtype,
        stock_kv_cache_dtype=args.stock_kv_cache_dtype,
    )  # fmt: skip
    model = SyntheticModel(num_layers=args.num_layers, hidden_size=args.hidden_size,
                           intermediate_size=args.intermediate_size)  # fmt: skip
    out = Path(args.out)
    results = run_bench(
        config, out, model=model,
        model_path=Path(args.model) if args.model else None,
        pattern=Path(args.pattern) if args.pattern else None,
    )  # fmt: skip
    meta = results["meta"]
    rows = report.compare(results["stock"], results["duo"],
                          retrieval_fraction=meta["retrieval_fraction"], sink=config.sink,
                          recent=config.recent, kv_dtype_gain=config.kv_dtype_gain)  # fmt: skip
    shape = meta["model_shape"]
    kv = ""
    if (config.kv_cache_dtype, config.stock_kv_cache_dtype) != ("auto", "auto"):
        kv = f", KV cache DUO {config.kv_cache_dtype} / stock {config.stock_kv_cache_dtype}"
    title = (
        f"DUO vs stock, {shape['num_layers']} layers x {shape['num_heads']}q/"
        f"{shape['num_kv_heads']}kv heads (d={shape['head_dim']}), sparsity {config.sparsity}, "
        f"S={config.sink}, W={config.recent}, {config.dtype}{kv}; "
        f"{meta['gpu'] or meta['machine']}, {meta['date']}"
    )
    _out(title)
    for line in report.table(rows):
        _out(line)
    report.write_json(out / "bench.json", meta, rows)
    _out(f"\nwrote {out / 'bench.json'}")
    if not args.no_plot:
        report.plot(out / "bench.png", rows, title)
        _out(f"wrote {out / 'bench.png'}")
    return 0


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
    )
    out = calibrate(config, progress=True)
    gates = load_gates(out)
    layers, kv_heads = gates.shape
    _out(f"pattern written to {out}")
    _out(
        f"gates: {layers} layers x {kv_heads} KV heads, mean {gates.mean():.3f}, "
        f"{(gates < 0.5).mean():.0%} below 0.5"
    )
    _out(f"inspect: {PROG} patterns show {shlex.quote(str(out))}")
    _out(
        f"serve:   VLLM_DUO_PATTERN={shlex.quote(str(out))} vllm serve MODEL "
        f"--attention-backend DUO"
    )
    return 0


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the ``vllm-duo`` command line; returns the exit status.

    0 on success, 2 for any bad input (one ``vllm-duo: error: ...`` line on stderr).
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.handler(args))
    except SystemExit as exc:  # --help and --version exit through argparse
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    except _UsageError as exc:
        _error_line(str(exc))
        return 2
    except DuoConfigError as exc:
        _error_line(str(exc))
        return 2
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error worth a traceback.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except OSError as exc:
        _error_line(f"{exc.filename or 'I/O'}: {exc.strerror or exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
