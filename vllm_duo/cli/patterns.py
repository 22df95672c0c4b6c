"""``vllm-duo patterns list`` and ``vllm-duo patterns show NAME|PATH``.

Pure: uses :mod:`vllm_duo.patterns` and :mod:`vllm_duo.settings` only and never imports vLLM,
so these commands work on a machine without it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import textwrap
from collections.abc import Sequence

from vllm_duo.cli.common import (
    DEFAULT_CONTEXT,
    PROG,
    out,
    parse_context,
    pattern_message,
    settings_from_flags,
    table,
)
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
from vllm_duo.settings import DEFAULT_RECENT, DEFAULT_SINK, DEFAULT_SPARSITY

# Bytes per K or V element in the KV-cache estimate: fp16 / bf16, vLLM's default cache dtype.
KV_ELEMENT_BYTES = 2


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The ``patterns`` subcommand and its ``list`` / ``show`` subcommands."""
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


def _shape_value(pattern: BundledPattern, key: str) -> str:
    value = pattern.shape.get(key)
    return "?" if value is None else str(value)


def _cmd_patterns_list(args: argparse.Namespace) -> int:
    """``vllm-duo patterns list``."""
    bundled = list_bundled()
    if not bundled:
        out("no bundled patterns are installed")
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
    for line in table(header, rows):
        out(line)
    out()
    out(
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
    settings = settings_from_flags(
        {
            "sparsity": args.sparsity,
            "threshold": args.threshold,
            "sink": args.sink,
            "recent": args.recent,
        }
    )
    context = parse_context(args.context)

    try:
        path, label = resolve_pattern(spec, None, None)
    except DuoConfigError as exc:
        raise DuoConfigError(pattern_message(str(exc), spec)) from None
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
        out(line)
    return 0
