"""Scores, tables, JSON and plots of ``vllm-duo eval`` (pure: no vLLM).

Input: the raw results of :func:`vllm_duo.evaluation.run.run_eval` (one row per answered
case, per-position agreement arrays). Everything here is arithmetic on those rows, so it is
tested without engines.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vllm_duo.evaluation.agreement import position_bins, summarise
from vllm_duo.evaluation.passkey import FAMILIES
from vllm_duo.patterns import HeadPlan, load_gates, select_retrieval

__all__ = [
    "WORKING_ACCURACY",
    "accuracy",
    "analyse",
    "kv_bytes_per_token",
    "plot_agreement",
    "plot_niah",
    "plot_sweep",
    "table",
    "working_range",
    "write_json",
]

WORKING_ACCURACY = 0.8
"""Full attention must answer at least this share of a length's cases for the passkey targets
to apply there; beyond, the model itself cannot do the task and agreement is the measure."""

DUO_TARGET = 0.95
"""DUO's accuracy over full attention's, within the working range."""

CLEARLY_BELOW = 0.2
"""All-streaming and random count as clearly below DUO when at least this much lower."""

Row = dict[str, Any]


def _point(method: str, sparsity: float | None, main: float) -> float | None:
    """The sparsity a method's rows carry at the heat maps' point."""
    return {"full": None, "streaming": 1.0}.get(method, main)


def accuracy(
    rows: Sequence[Row],
    *,
    family: str,
    method: str,
    sparsity: float | None,
    lengths: Sequence[int] | None = None,
    depths: Sequence[float] | None = None,
) -> float | None:
    """Share of correct answers among the matching rows (None when there are none)."""
    hits = [
        r["correct"]
        for r in rows
        if r["family"] == family
        and r["method"] == method
        and r["sparsity"] == sparsity
        and (lengths is None or r["length"] in lengths)
        and (depths is None or r["depth"] in depths)
    ]
    return sum(hits) / len(hits) if hits else None


def working_range(per_length: dict[int, float | None]) -> list[int]:
    """Lengths, shortest first, up to the first where full attention drops below 80%."""
    lengths = []
    for length in sorted(per_length):
        value = per_length[length]
        if value is None or value < WORKING_ACCURACY:
            break
        lengths.append(length)
    return lengths


def kv_bytes_per_token(
    pattern: Path, sparsity: float, context: int, sink: int, recent: int, shape: dict[str, int]
) -> float:
    """KV-cache bytes per token at ``context`` tokens with 16-bit K and V (full: ratio 1)."""
    full = 2 * shape["num_layers"] * shape["num_kv_heads"] * shape["head_size"] * 2
    plan = HeadPlan.from_mask(select_retrieval(load_gates(pattern), sparsity=sparsity))
    return full * plan.kv_bytes_ratio(context, sink, recent)


def analyse(results: dict[str, Any], shape: dict[str, int]) -> dict[str, Any]:
    """Everything the report shows, as plain numbers (the JSON's ``summary``)."""
    settings = results["meta"]["settings"]
    rows = results["answers"]
    main = settings["sparsity"]
    methods = settings["methods"]
    lengths, depths = tuple(settings["lengths"]), tuple(settings["depths"])
    summary: dict[str, Any] = {"families": {}}
    for family in settings["families"]:
        fam: dict[str, Any] = {"niah": {}, "sweep": {}}
        if "niah" in settings["parts"]:
            for method in methods:
                point = _point(method, None, main)
                per_length = {
                    n: accuracy(
                        rows,
                        family=family,
                        method=method,
                        sparsity=point,
                        lengths=[n],
                        depths=depths,
                    )
                    for n in lengths
                }
                grid = [
                    [
                        accuracy(
                            rows,
                            family=family,
                            method=method,
                            sparsity=point,
                            lengths=[n],
                            depths=[d],
                        )
                        for n in lengths
                    ]
                    for d in depths
                ]
                fam["niah"][method] = {
                    "per_length": per_length,
                    "all": accuracy(
                        rows,
                        family=family,
                        method=method,
                        sparsity=point,
                        lengths=lengths,
                        depths=depths,
                    ),
                    "grid": grid,
                }
            if "full" in fam["niah"]:
                fam.update(_targets(fam["niah"], rows, family, main, lengths, depths))
        if "sweep" in settings["parts"]:
            sweep_lengths, sweep_depths = settings["sweep_lengths"], settings["sweep_depths"]
            for method in methods:
                points = {"full": [None], "streaming": [1.0]}.get(method, settings["sparsities"])
                fam["sweep"][method] = {
                    str(p): accuracy(
                        rows,
                        family=family,
                        method=method,
                        sparsity=p,
                        lengths=sweep_lengths,
                        depths=sweep_depths,
                    )
                    for p in points
                }
        summary["families"][family] = fam
    if "sweep" in settings["parts"]:
        context = max(settings["lengths"])
        # Bytes depend only on how many heads stream, which the sparsity fixes for any pattern.
        pattern = Path(results["meta"]["pattern"])
        summary["kv_bytes_per_token"] = {
            "context": context,
            "full": kv_bytes_per_token(
                pattern, 0.0, context, settings["sink"], settings["recent"], shape
            ),
            "by_sparsity": {
                str(s): kv_bytes_per_token(
                    pattern, s, context, settings["sink"], settings["recent"], shape
                )
                for s in (*settings["sparsities"], 1.0)
            },
        }
    if results.get("agreement"):
        bins = position_bins(
            [n for n in lengths if n > settings["sink"] + settings["recent"]]
            + [settings["agreement_length"]],
            settings["sink"] + settings["recent"],
        )
        noise = [(0, settings["sink"] + settings["recent"])]
        summary["agreement"] = {
            method: {
                "bins": summarise(data["kl"], data["top1"], bins),
                "within_sink_and_window": summarise(data["kl"], data["top1"], noise)[0],
            }
            for method, data in results["agreement"].items()
        }
    return summary


def _targets(
    niah: dict[str, Any],
    rows: Sequence[Row],
    family: str,
    main: float,
    lengths: Sequence[int],
    depths: Sequence[float],
) -> dict[str, Any]:
    """The issue's passkey targets, evaluated within full attention's working range."""
    working = working_range(niah["full"]["per_length"])
    out: dict[str, Any] = {"working_range": working}
    if not working:
        return out
    full = accuracy(
        rows, family=family, method="full", sparsity=None, lengths=working, depths=depths
    )
    out["in_range"] = {"full": full}
    for method in niah:
        if method != "full":
            out["in_range"][method] = accuracy(
                rows,
                family=family,
                method=method,
                sparsity=_point(method, None, main),
                lengths=working,
                depths=depths,
            )
    duo = out["in_range"].get("duo")
    if duo is not None and full:
        out["duo_over_full"] = duo / full
        out["duo_target_met"] = duo / full >= DUO_TARGET
        for other in ("streaming", "random"):
            value = out["in_range"].get(other)
            if value is not None:
                out[f"{other}_clearly_below"] = value <= duo - CLEARLY_BELOW
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _k(tokens: int) -> str:
    return f"{tokens / 1024:.1f}K".replace(".0K", "K")


def table(results: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """The terminal report: accuracy per length, targets, sweep and agreement."""
    from vllm_duo.cli.common import table as columns

    settings = results["meta"]["settings"]
    lines: list[str] = []
    main = settings["sparsity"]
    for family, fam in summary["families"].items():
        spec = FAMILIES[family]
        lines.append(f"== {family} family: {spec.source} text, {spec.digits}-digit keys ==")
        if fam["niah"]:
            header = ["method", *[_k(n) for n in settings["lengths"]], "all"]
            body = []
            for method, data in fam["niah"].items():
                point = _point(method, None, main)
                name = method if point is None else f"{method} @{point:g}"
                body.append(
                    [
                        name,
                        *[_pct(data["per_length"][n]) for n in settings["lengths"]],
                        _pct(data["all"]),
                    ]
                )
            lines.append(
                f"needle in a haystack, {len(settings['depths'])} depths x "
                f"{settings['per_cell']} per length:"
            )
            lines += columns(header, body)
            working = fam.get("working_range", [])
            if working:
                lines.append(
                    f"full attention answers >= {WORKING_ACCURACY:.0%} up to {_k(working[-1])}: "
                    "the passkey targets apply there"
                )
                in_range = fam["in_range"]
                parts = [f"{m} {_pct(v)}" for m, v in in_range.items()]
                lines.append(f"within that range: {', '.join(parts)}")
                if "duo_over_full" in fam:
                    verdict = "met" if fam["duo_target_met"] else "MISSED"
                    lines.append(
                        f"DUO / full = {fam['duo_over_full']:.3f} (target >= "
                        f"{DUO_TARGET}): {verdict}"
                    )
                for other in ("streaming", "random"):
                    key = f"{other}_clearly_below"
                    if key in fam:
                        verdict = "yes" if fam[key] else "NO"
                        lines.append(f"{other} at least {CLEARLY_BELOW:.0%} below DUO: {verdict}")
            elif "full" in fam["niah"]:
                lines.append(
                    f"full attention answers < {WORKING_ACCURACY:.0%} at every length: "
                    "no passkey target applies; see agreement"
                )
        if fam["sweep"]:
            sparsities = [str(s) for s in settings["sparsities"]]
            header = ["method", *[f"s={s}" for s in sparsities], "s=1"]
            body = []
            for method, points in fam["sweep"].items():
                if method == "full":
                    body.append(
                        [method, *[_pct(points["None"])] * len(sparsities), _pct(points["None"])]
                    )
                elif method == "streaming":
                    body.append([method, *["" for _ in sparsities], _pct(points["1.0"])])
                else:
                    body.append([method, *[_pct(points.get(s)) for s in sparsities], ""])
            kv = summary.get("kv_bytes_per_token")
            if kv:
                body.append(
                    [
                        f"KV B/token @{_k(kv['context'])} (full {kv['full']:.0f})",
                        *[f"{kv['by_sparsity'][s]:.0f}" for s in sparsities],
                        f"{kv['by_sparsity']['1.0']:.0f}",
                    ]
                )
            lengths = ",".join(_k(n) for n in settings["sweep_lengths"])
            lines.append(f"sparsity sweep ({lengths}, {len(settings['sweep_depths'])} depths):")
            lines += columns(header, body)
        lines.append("")
    if summary.get("agreement"):
        lines.append(
            f"agreement with full attention on natural text ({settings['agreement_windows']} "
            f"windows of {settings['agreement_length']} tokens, sparsity {main:g}, beyond "
            f"S+W={settings['sink'] + settings['recent']}): mean KL (nats) / top-1 agreement"
        )
        methods = list(summary["agreement"])
        first = summary["agreement"][methods[0]]["bins"]
        header = ["positions", *methods]
        body = []
        for i, b in enumerate(first):
            cells = []
            for method in methods:
                row = summary["agreement"][method]["bins"][i]
                cells.append(f"{row['kl_mean']:.4f} / {100 * row['top1']:.1f}%")
            body.append([f"{b['from']}-{b['to']}", *cells])
        noise = [summary["agreement"][m]["within_sink_and_window"] for m in methods]
        body.append(
            ["< S+W (noise)", *[f"{n['kl_mean']:.4f} / {100 * n['top1']:.1f}%" for n in noise]]
        )
        lines += columns(header, body)
    return lines


def write_json(path: Path, results: dict[str, Any], summary: dict[str, Any]) -> None:
    """``eval.json``: settings, machine, timings, the summary and every answer."""
    data = {"meta": results["meta"], "summary": summary, "answers": results["answers"]}
    path.write_text(json.dumps(data, indent=1, default=_plain) + "\n", encoding="utf-8")


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _wrap(title: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(title, width=width))


def plot_niah(
    path: Path, results: dict[str, Any], summary: dict[str, Any], family: str, title: str
) -> Path:
    """Heat maps of accuracy over (length, depth), one panel per method, side by side."""
    settings = results["meta"]["settings"]
    niah = summary["families"][family]["niah"]
    lengths, depths = settings["lengths"], settings["depths"]
    figure = _figure(1.2 + 2.9 * len(niah), 3.8)
    for i, (method, data) in enumerate(niah.items()):
        axes = figure.add_subplot(1, len(niah), i + 1)
        grid = np.array([[np.nan if v is None else v for v in row] for row in data["grid"]])
        image = axes.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        axes.set_xticks(range(len(lengths)), [_k(n) for n in lengths], rotation=45)
        # Depth labels on the first panel only: on the others they run into the panel before.
        axes.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths] if i == 0 else [])
        point = _point(method, None, settings["sparsity"])
        label = method if point is None else f"{method} @{point:g}"
        axes.set_title(f"{label}\n{_pct(data['all'])} correct", fontsize=10)
        axes.set_xlabel("context tokens")
        if i == 0:
            axes.set_ylabel("needle depth")
    figure.colorbar(image, ax=figure.axes, shrink=0.8, label="accuracy")
    figure.suptitle(_wrap(title, 40 + 30 * len(niah)), fontsize=10, y=1.08)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    return path


def plot_sweep(path: Path, results: dict[str, Any], summary: dict[str, Any], title: str) -> Path:
    """Accuracy against sparsity, one curve per method and family; KV bytes on the right."""
    settings = results["meta"]["settings"]
    families = [f for f, d in summary["families"].items() if d["sweep"]]
    figure = _figure(5.5 * len(families), 4.2)
    styles = {"duo": "o-", "baseline": "s-", "random": "^--", "streaming": "D"}
    for i, family in enumerate(families):
        axes = figure.add_subplot(1, len(families), i + 1)
        sweep = summary["families"][family]["sweep"]
        for method, points in sweep.items():
            if method == "full":
                if points.get("None") is not None:
                    axes.axhline(
                        points["None"],
                        color="black",
                        linestyle=":",
                        label=f"full attention ({_pct(points['None'])})",
                    )
                continue
            xs = [float(s) for s, v in points.items() if v is not None]
            ys = [v for v in points.values() if v is not None]
            if xs:
                axes.plot(xs, ys, styles.get(method, "o-"), label=method)
        kv = summary.get("kv_bytes_per_token")
        if kv:
            right = axes.twinx()
            xs = sorted(float(s) for s in kv["by_sparsity"])
            ys = [kv["by_sparsity"][str(x)] / kv["full"] for x in xs]
            right.plot(
                [0.0, *xs],
                [1.0, *ys],
                color="grey",
                alpha=0.5,
                linewidth=1,
            )
            right.set_ylim(0, 1.05)
            right.set_ylabel(f"KV bytes per token at {_k(kv['context'])} / full (grey)")
        axes.set_ylim(-0.02, 1.02)
        axes.set_xlim(0, 1.03)
        axes.set_xlabel("sparsity (fraction of KV heads streaming)")
        axes.set_ylabel("accuracy")
        lengths = ",".join(_k(n) for n in settings["sweep_lengths"])
        axes.set_title(f"{family} family ({lengths})", fontsize=10)
        axes.legend(loc="lower left", fontsize=8)
    figure.suptitle(_wrap(title, 60 * len(families)), fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def plot_agreement(path: Path, results: dict[str, Any], title: str) -> Path:
    """Per-position KL (smoothed) and top-1 agreement against full attention."""
    settings = results["meta"]["settings"]
    figure = _figure(10, 4)
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    span = 128
    for method, data in results["agreement"].items():
        kl = np.asarray(data["kl"]).mean(axis=0)
        top1 = np.asarray(data["top1"], dtype=float).mean(axis=0)
        kernel = np.ones(span) / span
        xs = np.arange(span - 1, kl.shape[0])
        left.plot(xs, np.convolve(kl, kernel, mode="valid"), label=method, linewidth=1)
        right.plot(xs, np.convolve(top1, kernel, mode="valid"), label=method, linewidth=1)
    for axes in (left, right):
        axes.axvline(settings["sink"] + settings["recent"], color="grey", linestyle=":")
        axes.set_xlabel("position in the text (tokens)")
        axes.legend(fontsize=8)
    left.set_yscale("log")
    left.set_ylabel(f"KL(full || method), nats, mean of {span}")
    right.set_ylabel(f"top-1 agreement with full, mean of {span}")
    figure.suptitle(_wrap(title, 120), fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path
