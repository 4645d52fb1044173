"""Accuracy vs average bits per hierarchy level: the frontier that mixed precision traces.

For every level, the specs no narrower spec beats (fewer or equal average bits and at
least the same grouped accuracy) form its frontier; the random groupings of the same
sizes, on those same specs, form a band around it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from hiercluster.report.figures import BAND_ALPHA, _level_colors, band_levels
from hiercluster.report.plots import MAX_LEVELS_SHOWN, new_figure, save_figure, spread_by_k

# Accuracy shown below the lowest float accuracy of the drawn levels, in pp; points lower sit on the edge.
VIEW_BELOW_FLOAT_PP = 12.0


def level_frontier(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One level's rows no narrower row beats: by average bits, each more accurate than all narrower ones.

    Examples
    --------
    >>> rows = [{"avg_bits": 2.0, "acc_quant": 0.9}, {"avg_bits": 1.5, "acc_quant": 0.95},
    ...         {"avg_bits": 3.0, "acc_quant": 0.97}, {"avg_bits": 1.0, "acc_quant": 0.5}]
    >>> [r["avg_bits"] for r in level_frontier(rows)]
    [1.0, 1.5, 3.0]
    """
    frontier: list[Mapping[str, Any]] = []
    for r in sorted(rows, key=lambda r: (r["avg_bits"], -r["acc_quant"])):
        if not frontier or r["acc_quant"] > frontier[-1]["acc_quant"]:
            frontier.append(r)
    return frontier


def has_mixed_precision(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any spec's average bits is not a whole width (a mixed-precision or partial plan)."""
    return any(abs(r["avg_bits"] - round(r["avg_bits"])) > 1e-6 for r in rows)


def frontier_figure(rows: Sequence[Mapping[str, Any]], tolerance: float) -> Figure:
    """Grouped accuracy (%) vs average bits per weight: one frontier line per level, random band around it.

    Each level's float accuracy is a dotted line of its colour, and its tolerance the band
    ``float - tolerance``; a frontier point under that line is beyond tolerance. Of more
    than :data:`~hiercluster.report.plots.MAX_LEVELS_SHOWN` levels, that many are drawn.
    """
    all_levels = {r["level"]: r["k"] for r in rows}
    levels = spread_by_k(all_levels, MAX_LEVELS_SHOWN, keep=["reference"])
    colors = _level_colors(levels)
    fronts = {lv: level_frontier([r for r in rows if r["level"] == lv]) for lv in levels}
    banded = set(band_levels([r for front in fronts.values() for r in front]))
    floats = {lv: 100 * front[0]["acc_float"] for lv, front in fronts.items() if front}
    bottom = min(floats.values(), default=0.0) - VIEW_BELOW_FLOAT_PP
    fig = new_figure(8.6, 4.8)
    ax = fig.subplots()
    for lv, front in fronts.items():
        if not front:
            continue
        x = [r["avg_bits"] for r in front]
        y = [max(100 * r["acc_quant"], bottom) for r in front]
        style = "--" if lv == "reference" else "-"
        ax.plot(x, y, style, color=colors[lv], marker="o", markersize=4, linewidth=1.5, label=lv, gid="frontier")
        off = [(xi, 100 * r["acc_quant"]) for xi, r in zip(x, front) if 100 * r["acc_quant"] < bottom]
        for xi, acc in off:
            ax.scatter([xi], [bottom], marker="v", color=colors[lv], edgecolors="black", zorder=5)
            ax.annotate(f"{acc:.0f}", (xi, bottom), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.axhline(floats[lv], color=colors[lv], linestyle=":", linewidth=0.8)
        if lv in banded:
            mean = [100 * r["random_acc_quant_mean"] for r in front]
            std = [100 * r["random_acc_quant_std"] for r in front]
            ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=colors[lv], alpha=BAND_ALPHA, linewidth=0, gid="random-band")
    ax.set_ylim(bottom - 1, 100.5)
    ax.invert_xaxis()  # fewer bits to the right, as in the drop plot
    ax.set_xlabel("average bits per weight")
    ax.set_ylabel("grouped accuracy % (quantized)")
    ax.grid(alpha=0.3)
    shown = "" if len(levels) == len(all_levels) else f"; {len(levels)} of {len(all_levels)} levels drawn"
    ax.set_title("Accuracy vs average bits: each level's frontier (no narrower spec is more accurate)" + shown,
                 fontsize=10)
    handles = [Line2D([], [], color=colors[lv], linestyle="--" if lv == "reference" else "-", marker="o",
                      markersize=4, label=lv) for lv in levels]
    handles += [Line2D([], [], color="0.4", linestyle=":", label="float accuracy of the level"),
                Patch(color="0.4", alpha=BAND_ALPHA, label="random grouping of the\nsame sizes: mean ± std"),
                Line2D([], [], color="0.5", marker="v", linestyle="none", markeredgecolor="black",
                       label=f"below the view\n(accuracy % noted); tolerance {tolerance:g} pp")]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    return fig


def plot_frontier(rows: Sequence[Mapping[str, Any]], path: str | Path, tolerance: float, dpi: int = 110) -> Path:
    """Write :func:`frontier_figure` as a PNG at ``path``; returns the path."""
    return save_figure(frontier_figure(rows, tolerance), path, dpi)


__all__ = ["frontier_figure", "has_mixed_precision", "level_frontier", "plot_frontier"]
