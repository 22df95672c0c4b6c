"""DUO/stock ratios, the terminal table, JSON and plots of a bench run (no vLLM import)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_duo.bench.config import ideal_decode_ratio, ideal_prefill_ratio

# (key, label, stock/duo or duo/stock, ideal kind). "Higher is better for DUO" everywhere:
# times and bytes are stock over DUO, rates and capacities DUO over stock.
METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("prefill_s", "prefill speed-up", "stock/duo", "prefill"),
    ("decode_s_per_token", "decode speed-up", "stock/duo", "decode"),
    ("throughput_tok_s", "throughput gain", "duo/stock", "decode"),
    ("kv_bytes_per_token", "KV bytes saved", "stock/duo", "decode"),
    ("max_concurrency", "max concurrency", "duo/stock", "decode"),
)


def _ratio(stock: float, duo: float, direction: str) -> float:
    top, bottom = (stock, duo) if direction == "stock/duo" else (duo, stock)
    return top / bottom if bottom and math.isfinite(bottom) else float("nan")


def compare(
    stock_rows: Sequence[dict[str, Any]],
    duo_rows: Sequence[dict[str, Any]],
    *,
    retrieval_fraction: float,
    sink: int,
    recent: int,
    kv_dtype_gain: float = 1.0,
) -> list[dict[str, Any]]:
    """One row per context length measured by both backends, with ratios and ideals.

    ``kv_dtype_gain``: bytes per cached element of stock's cache dtype over DUO's (2 for
    DUO with fp8 against stock in bf16); it multiplies the KV-bytes (decode) ideals.
    """
    duo_by_context = {row["context"]: row for row in duo_rows}
    rows = []
    for stock in stock_rows:
        duo = duo_by_context.get(stock["context"])
        if duo is None:
            continue
        context = stock["context"]
        ideals = {
            "decode": kv_dtype_gain * ideal_decode_ratio(context, retrieval_fraction, sink, recent),
            "prefill": ideal_prefill_ratio(context, retrieval_fraction, sink, recent),
        }
        row: dict[str, Any] = {"context": context, "stock": stock, "duo": duo}
        for key, _, direction, ideal in METRICS:
            ratio = _ratio(stock[key], duo[key], direction)
            row[key] = {"ratio": ratio, "ideal": ideals[ideal],
                        "of_ideal": ratio / ideals[ideal]}  # fmt: skip
        rows.append(row)
    return rows


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Terminal lines: absolute numbers per backend, then ratio (ideal) per metric."""
    header = ["context", "prefill stock/DUO", "decode/tok stock/DUO", "tok/s stock/DUO",
              "KV B/tok stock/DUO", "max conc. stock/DUO"]  # fmt: skip
    body = []
    for row in rows:
        s, d = row["stock"], row["duo"]
        body.append(
            [
                f"{row['context']:,}",
                f"{_fmt_seconds(s['prefill_s'])} / {_fmt_seconds(d['prefill_s'])}",
                f"{_fmt_seconds(s['decode_s_per_token'])} / "
                f"{_fmt_seconds(d['decode_s_per_token'])}",
                f"{s['throughput_tok_s']:.1f} / {d['throughput_tok_s']:.1f}",
                f"{s['kv_bytes_per_token']:,.0f} / {d['kv_bytes_per_token']:,.0f}",
                f"{s['max_concurrency']:.2f} / {d['max_concurrency']:.2f}",
            ]
        )
    ratio_header = ["context"] + [label for _, label, _, _ in METRICS]
    ratio_body = [
        [f"{row['context']:,}"]
        + [f"{row[key]['ratio']:.2f}x ({row[key]['ideal']:.2f}x)" for key, *_ in METRICS]
        for row in rows
    ]
    lines = _grid(header, body)
    lines += ["", "DUO/stock ratio, higher is better (ideal from DESIGN.md section 8):"]
    lines += _grid(ratio_header, ratio_body)
    return lines


def _grid(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths)).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in body)]


def write_json(path: Path, meta: dict[str, Any], rows: Sequence[dict[str, Any]]) -> None:
    path.write_text(json.dumps({"meta": meta, "rows": list(rows)}, indent=2) + "\n")


def plot(path: Path, rows: Sequence[dict[str, Any]], title: str) -> None:
    """Ratio against context length per metric, measured (dots) and ideal (crosses, dashed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError(
            "plots need matplotlib: pip install 'vllm-duo[plots]' (or pass --no-plot)"
        ) from exc
    contexts = [row["context"] for row in rows]
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6), sharex=True)
    for axis, (key, label, _, _) in zip(axes, METRICS):
        axis.plot(contexts, [row[key]["ratio"] for row in rows], "o-", label="measured")
        axis.plot(contexts, [row[key]["ideal"] for row in rows], "kx--", label="ideal")
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xscale("log", base=2)
        axis.set_xticks(contexts, [f"{c // 1024}K" if c >= 1024 else str(c) for c in contexts])
        axis.set_title(label)
        axis.set_xlabel("context (tokens)")
        axis.set_ylim(bottom=0)
    axes[0].set_ylabel("DUO / stock (higher is better)")
    axes[0].legend(loc="lower right")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
