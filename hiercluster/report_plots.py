"""Plots of a sweep's results (rows of the results store), for the run report.

The hierarchy and bias plots live in :mod:`hiercluster.plots`; these read result rows
(dicts with the columns of :mod:`hiercluster.store`) and per-spec layer statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from hiercluster.plots import save_figure  # noqa: E402
from hiercluster.report import row_method, uniform_rows  # noqa: E402

_STATS = ("min", "q1", "median", "q3", "max")


def plot_accuracy_vs_bits(rows: Sequence[Mapping[str, Any]], path: str | Path, dpi: int = 110) -> Path:
    """Grouped accuracy vs bits, one panel per scheme and method, one line per level, a band for its random baseline."""
    rows = uniform_rows(rows)
    panel = lambda r: (r["scheme"], r["clipping"], row_method(r))  # noqa: E731
    schemes = list(dict.fromkeys(panel(r) for r in rows))
    levels = list(dict.fromkeys(r["level"] for r in rows))
    ncols = min(4, max(1, len(schemes)))  # wrap: a grid with several methods has many panels
    nrows = -(-max(1, len(schemes)) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 4.2 * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False, sharey=True).flat)
    for ax in axes[len(schemes):]:
        ax.set_visible(False)
    axes = axes[: max(1, len(schemes))]
    cmap = matplotlib.colormaps["viridis"]
    for ax, (scheme, clipping, method) in zip(axes, schemes):
        for i, level in enumerate(levels):
            sel = sorted((r for r in rows if panel(r) == (scheme, clipping, method) and r["level"] == level),
                         key=lambda r: r["bits"])
            if not sel:
                continue
            color = "black" if level == "reference" else cmap(i / max(1, len(levels) - 1))
            bits = [r["bits"] for r in sel]
            acc = [100 * r["acc_quant"] for r in sel]
            lo = [100 * (r["random_acc_quant_mean"] - r["random_acc_quant_std"]) for r in sel]
            hi = [100 * (r["random_acc_quant_mean"] + r["random_acc_quant_std"]) for r in sel]
            ax.plot(bits, acc, marker="o", color=color, label=level, linestyle="--" if level == "reference" else "-")
            ax.fill_between(bits, lo, hi, color=color, alpha=0.12, linewidth=0)
        ax.set_title(f"{scheme} ({clipping}, {method})")
        ax.set_xlabel("weight bits")
        panel_bits = sorted({r["bits"] for r in rows if panel(r) == (scheme, clipping, method)})
        ax.set_xticks(panel_bits)  # whole bit widths only, also for a panel with one width
        ax.set_xlim(max(panel_bits) + 0.5, min(panel_bits) - 0.5)  # fewer bits to the right
        ax.grid(alpha=0.3)
    for ax in axes[::ncols]:
        ax.set_ylabel("grouped accuracy % (band: random grouping mean ± std)")
    axes[-1].legend(fontsize=7, loc="lower left", title="level")
    return save_figure(fig, path, dpi)


def plot_pareto(
    rows: Sequence[Mapping[str, Any]], float_accuracy: float, path: str | Path, level: str, dpi: int = 110
) -> Path:
    """Fine accuracy vs bit-packed size for every spec; the float model as a star."""
    sel = [r for r in rows if r["level"] == level]
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    markers = dict(zip(dict.fromkeys(r["plan"] for r in sel), "osD^v<>"))
    for scheme, method in dict.fromkeys((r["scheme"], row_method(r)) for r in sel):
        for plan, marker in markers.items():
            pts = [r for r in sel if (r["scheme"], row_method(r), r["plan"]) == (scheme, method, plan)]
            if pts:
                ax.scatter([r["packed_bytes"] / 1024 for r in pts], [100 * r["fine_acc"] for r in pts],
                           marker=marker, label=f"{scheme}, {method}, {plan}", alpha=0.8)
                for r in pts:
                    ax.annotate(str(r["bits"]), (r["packed_bytes"] / 1024, 100 * r["fine_acc"]), fontsize=6,
                                xytext=(2, 2), textcoords="offset points")
    if sel:
        ax.scatter([sel[0]["fp32_bytes"] / 1024], [100 * float_accuracy], marker="*", s=150, color="black", label="FP32")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("bit-packed model size (KB, log scale)")
    ax.set_ylabel("fine accuracy %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path, dpi)


def _pick_layers(names: Sequence[str], n: int = 3) -> list[str]:
    if len(names) <= n:
        return list(names)
    return [names[0], names[len(names) // 2], names[-1]]


def plot_quartiles(details: Mapping[str, Mapping[str, Any]], path: str | Path, bits: int = 4, dpi: int = 110) -> Path:
    """Five-number summaries of a few layers' weights: FP32 and each scheme at ``bits`` (the seed's figure).

    ``details`` maps spec keys to :meth:`ResultsStore.spec_details` dicts (the caller picks
    which specs); the one at ``bits`` is used per scheme, or the nearest bit width.
    """
    specs = [d for d in details.values() if d]
    available = sorted({d["spec"]["bits"] for d in specs})
    chosen_bits = min(available, key=lambda b: (abs(b - bits), b)) if available else bits
    chosen = {}
    for d in specs:
        if d["spec"]["bits"] == chosen_bits:
            chosen.setdefault(d["spec"]["scheme"], d)
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    if not chosen:
        return save_figure(fig, path, dpi)
    first = next(iter(chosen.values()))
    quantized = [layer["name"] for layer in first["layers"] if layer.get("bits") and layer["bits"] < 32]
    if not quantized:
        fig.text(0.5, 0.5, "no quantized layers in these specs", ha="center", va="center")
        return save_figure(fig, path, dpi)
    layers = _pick_layers(quantized)
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    for ax, name in zip(axes, layers):
        boxes = []
        by_name = {layer["name"]: layer for layer in first["layers"]}
        boxes.append(_box(by_name[name], "before", "FP32"))
        for scheme, d in chosen.items():
            layer = next((entry for entry in d["layers"] if entry["name"] == name), None)
            if layer is not None:
                boxes.append(_box(layer, "after", scheme))
        ax.bxp(boxes, showfliers=False)
        ax.set_title(f"{name} ({chosen_bits}-bit)", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("weight value (whiskers: min / max)")
    return save_figure(fig, path, dpi)


def _box(layer: Mapping[str, Any], when: str, label: str) -> dict[str, Any]:
    s = {k: float(layer[f"{when}_{k}"]) for k in _STATS}
    return {"label": label, "whislo": s["min"], "q1": s["q1"], "med": s["median"], "q3": s["q3"], "whishi": s["max"]}
