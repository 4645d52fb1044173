"""Plots of a sweep's results (rows of the results store), for the run report.

The hierarchy and bias plots live in :mod:`hiercluster.report.plots`; these read result rows
(dicts with the columns of :mod:`hiercluster.run.records`) and per-spec layer statistics.
Each plot has a ``*_figure`` function that builds the figure (what the tests inspect)
and a ``plot_*`` function that writes it as a PNG.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import matplotlib.text
import matplotlib.ticker

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from hiercluster.evaluation.metrics import headline
from hiercluster.report.plots import (
    MAX_LEVELS_SHOWN,
    new_figure,
    save_figure,
    spread_by_k,
)
from hiercluster.report.rows import dim_value, row_method, varying_dims

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.transforms import Bbox

_STATS = ("min", "q1", "median", "q3", "max")


# --- the y range: the within-tolerance region, the collapse clipped ------------------------------

# The drop axis starts at -0.5 pp: quantized models a little better than float stay in view.
DROP_FLOOR_PP = -0.5
# ... and ends at 3 x tolerance, so the tolerance line sits a third of the way up and a 2-bit
# collapse (tens of pp) no longer squeezes every other point into one pixel row.
TOLERANCES_IN_VIEW = 3.0
# A tolerance of 0 (allowed) still gets an axis a reader can see differences on.
MIN_TOP_PP = 1.0
# When nothing is beyond twice that range, the axis simply grows to show every point: clipping
# a point just above 3 x tolerance would hide more than it saves.
GROW_LIMIT = 2.0
# Fraction of the span left free above and below, so markers at the edge stay whole.
MARGIN = 0.06
# The random grouping's band: the old 0.12 was invisible on white; 0.3 shows a band under a
# same-coloured line and still lets lines behind it through.
BAND_ALPHA = 0.3
# Bands drawn at most: ten overlapping bands (the demo's levels) read as one green blob, so a
# run with more grouped levels gets the reference's band and the coarsest learned level's
# (where a grouping's advantage, and the random spread, are largest).
MAX_BANDS = 3
# Marker per rounding method (the triangles are kept for the off-scale markers).
METHOD_MARKERS = "osDPXhp8"


def drop_view(drops: Iterable[float], tolerance: float) -> tuple[float, float]:
    """The y range (pp) for drops: from -0.5 to 3 x ``tolerance``, grown to fit modest outliers.

    Drops beyond :data:`GROW_LIMIT` times that range (a collapse) are left outside: the
    plots draw them as markers at the edge with their values noted.

    Examples
    --------
    >>> [round(v, 2) for v in drop_view([0.1, 0.9, 48.9], tolerance=1.0)]
    [-0.71, 3.21]
    >>> [round(v, 2) for v in drop_view([0.1, 4.5], tolerance=1.0)]
    [-0.8, 4.8]
    """
    top = max(TOLERANCES_IN_VIEW * tolerance, MIN_TOP_PP)
    bottom = DROP_FLOOR_PP
    finite = [d for d in drops if math.isfinite(d)]
    if finite and max(finite) <= GROW_LIMIT * top:
        top = max(top, max(finite))
    if finite and min(finite) >= -GROW_LIMIT * top:
        bottom = min(bottom, min(finite))
    pad = MARGIN * (top - bottom)
    return bottom - pad, top + pad


def _value_range(values: Sequence[float]) -> str:
    """``"48.9"`` for one value (or several equal), ``"22–79"`` for a spread: the true values behind off-scale markers."""
    digits = 1 if max(values) - min(values) < 1 else 0  # a narrow spread keeps its decimal
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return low if low == high else f"{low}–{high}"


_NOTE_BOX = {"boxstyle": "round,pad=0.15", "fc": "white", "ec": "0.6", "lw": 0.5, "alpha": 0.9}


def _mark_off_scale(
    ax: Axes, points: Sequence[tuple[float, float, Any]], lo: float, hi: float
) -> dict[str, list[tuple[float, float]]]:
    """Draw each (x, y, colour) point outside ``lo..hi`` as a triangle on that edge.

    Returns ``{"above": [(x, y), ...], "below": [...]}`` of the points drawn, for the notes
    giving their true values.
    """
    off: dict[str, list[tuple[float, float]]] = {}
    for word, edge, marker in (("above", hi, "^"), ("below", lo, "v")):
        out = [(x, y, c) for x, y, c in points if (y > hi if word == "above" else y < lo)]
        if out:
            ax.scatter([x for x, _, _ in out], [edge] * len(out), marker=marker, s=45, c=[c for _, _, c in out],
                       edgecolors="black", linewidths=0.5, clip_on=False, zorder=5, gid="off-scale")
            off[word] = [(x, y) for x, y, _ in out]
    return off


def _note_per_column(ax: Axes, off: Mapping[str, list[tuple[float, float]]], lo: float, hi: float) -> None:
    """One note of the true values per x under (over) the triangles: the drop plot's bit columns."""
    for word, pts in off.items():
        edge, va, dy = (hi, "top", -9) if word == "above" else (lo, "bottom", 9)
        for x in dict.fromkeys(x for x, _ in pts):
            ys = [y for x2, y in pts if x2 == x]
            note = _value_range(ys) if len(ys) == 1 else f"{len(ys)}: {_value_range(ys)}"
            ax.annotate(note, (x, edge), xytext=(0, dy),
                        textcoords="offset points", ha="center", va=va, fontsize=7, gid="off-scale-note", zorder=6,
                        bbox=_NOTE_BOX)


def _corner_note(ax: Axes, off: Mapping[str, list[tuple[float, float]]], unit: str) -> None:
    """One note in the upper left corner (the pareto plot's empty corner: small and accurate)."""
    lines = [f"{len(pts)} off scale {word}: {_value_range([y for _, y in pts])}{unit}" for word, pts in off.items()]
    if lines:
        ax.annotate("\n".join(lines), (0.01, 0.99), xycoords="axes fraction", ha="left", va="top", fontsize=7,
                    gid="off-scale-note", zorder=6, bbox=_NOTE_BOX)


# --- drop vs bits ---------------------------------------------------------------------------------


def best_per_point(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, int], Mapping[str, Any]]:
    """``{(plan, level, bits): row}``: the row with the smallest drop, as the headline picks among specs.

    Ties go to the earlier row (the headline's rule, :func:`hiercluster.evaluation.metrics.min_bits`).

    Examples
    --------
    >>> rows = [{"plan": "full", "level": "k=2", "bits": 4, "drop": 0.5, "tag": "a"},
    ...         {"plan": "full", "level": "k=2", "bits": 4, "drop": 0.2, "tag": "b"}]
    >>> best_per_point(rows)[("full", "k=2", 4)]["tag"]
    'b'
    """
    best: dict[tuple[str, str, int], Mapping[str, Any]] = {}
    for r in rows:
        key = (r["plan"], r["level"], r["bits"])
        if key not in best or r["drop"] < best[key]["drop"]:
            best[key] = r
    return best


def _level_colors(levels: Sequence[str]) -> dict[str, Any]:
    """Viridis per level (its light yellow end cut off: unreadable on white); the reference in black."""
    cmap = matplotlib.colormaps["viridis"]
    learned = [lv for lv in levels if lv != "reference"]
    colors: dict[str, Any] = {lv: cmap(0.85 * i / max(1, len(learned) - 1)) for i, lv in enumerate(learned)}
    if "reference" in levels:
        colors["reference"] = "black"
    return colors


def _set_bit_ticks(ax: Axes, bits: Sequence[int]) -> None:
    """Whole bit widths only, fewer bits to the right (also for a single width)."""
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(sorted(bits)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%d"))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlim(max(bits) + 0.5, min(bits) - 0.5)


def band_levels(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The levels whose random-grouping band is drawn: every grouped level, or a few of many.

    A level whose random groupings all equal the learned one (k = number of classes: a
    grouping into singletons is the identity) has a band of zero width and is left out. Of
    more than :data:`MAX_BANDS` levels, the reference and the coarsest learned level are kept.

    Examples
    --------
    >>> row = lambda lv, k, std: {"level": lv, "k": k, "drop": 1.0, "random_drop_mean": 1.0, "random_drop_std": std}
    >>> band_levels([row("k=10", 10, 0.0), row("k=5", 5, 0.2), row("k=2", 2, 0.3)])
    ['k=5', 'k=2']
    """
    levels = list(dict.fromkeys(r["level"] for r in rows))
    grouped = [lv for lv in levels if not all(
        r["random_drop_std"] == 0 and abs(r["random_drop_mean"] - r["drop"]) < 1e-9 for r in rows if r["level"] == lv)]
    if len(grouped) <= MAX_BANDS:
        return grouped
    k = {r["level"]: r["k"] for r in rows}
    learned = [lv for lv in grouped if lv != "reference"]
    coarsest = min(learned, key=lambda lv: k[lv]) if learned else None
    return [lv for lv in grouped if lv in ("reference", coarsest)]


def _draw_level(
    ax: Axes, level: str, points: Sequence[Mapping[str, Any]], color: Any, markers: Mapping[str, str], band: bool
) -> None:
    """One level's line of best drops, its random grouping band (if ``band``), and a marker per point's method."""
    bits = [r["bits"] for r in points]
    drops = [r["drop"] for r in points]
    ax.plot(bits, drops, color=color, linestyle="--" if level == "reference" else "-", linewidth=1.6, zorder=3,
            gid="level-line", label=level)
    for method, marker in markers.items():
        sel = [r for r in points if row_method(r) == method]
        if sel:
            ax.scatter([r["bits"] for r in sel], [r["drop"] for r in sel], marker=marker, s=26, color=color, zorder=4)
    if not band:
        return
    mean = [r["random_drop_mean"] for r in points]
    std = [r["random_drop_std"] for r in points]
    ax.fill_between(bits, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=color,
                    alpha=BAND_ALPHA, linewidth=0, zorder=2, gid="random-band")


def drop_vs_bits_figure(rows: Sequence[Mapping[str, Any]], tolerance: float) -> Figure:
    """Drop (pp) vs weight bits: one panel per plan, one line per level, the random grouping as a band.

    Each point is the spec with the lowest drop at that plan, level and width (what the
    headline picks among specs); its marker says its rounding method. The band is the
    drop of random groupings of the same sizes (mean ± std) on that same spec, so a line
    below its band is a hierarchy that beats chance. The y range is the within-tolerance
    region (:func:`drop_view`); drops beyond it are triangles on the edge with their values.
    The headline's winners (fewest bits within ``tolerance``) are ringed. Of more than
    :data:`~hiercluster.report.plots.MAX_LEVELS_SHOWN` levels, that many are drawn, spread
    over k (the reference grouping always among them), and the title says so.
    """
    plans = list(dict.fromkeys(r["plan"] for r in rows))
    all_levels = {r["level"]: r["k"] for r in rows}
    levels = spread_by_k(all_levels, MAX_LEVELS_SHOWN, keep=["reference"])
    methods = list(dict.fromkeys(row_method(r) for r in rows))
    markers = dict(zip(methods, METHOD_MARKERS))
    colors = _level_colors(levels)
    drawn = set(levels)
    best = {key: r for key, r in best_per_point(rows).items() if key[1] in drawn}
    banded = band_levels(list(best.values()))
    lo, hi = drop_view((r["drop"] for r in best.values()), tolerance)
    ncols = min(3, max(1, len(plans)))  # wrap: each panel needs ~4.5 in to keep 6+ bit columns apart
    nrows = -(-max(1, len(plans)) // ncols)
    panels_width = max(4.6 * ncols, 6.5)  # the two title lines need ~6.5 in, also above one panel
    fig = new_figure(panels_width + 2.4, 3.9 * nrows + 0.7)
    axes = list(fig.subplots(nrows, ncols, squeeze=False, sharey=True).flat)
    for ax in axes[len(plans):]:
        ax.set_visible(False)
    winners = {(t["winner"]["plan"], t["level"], t["winner"]["bits"]) for t in headline(rows, tolerance) if t["winner"]}
    for ax, plan in zip(axes, plans):
        n_specs = len({r["spec_key"] for r in rows if r["plan"] == plan})
        edge_points = []
        for level in levels:
            points = sorted((r for (p, lv, _), r in best.items() if (p, lv) == (plan, level)), key=lambda r: r["bits"])
            if not points:
                continue
            _draw_level(ax, level, points, colors[level], markers, band=level in banded)
            edge_points += [(r["bits"], r["drop"], colors[level]) for r in points]
            ringed = [r for r in points if (plan, level, r["bits"]) in winners and lo <= r["drop"] <= hi]
            ax.scatter([r["bits"] for r in ringed], [r["drop"] for r in ringed], s=130, facecolors="none",
                       edgecolors="red", linewidths=1.2, zorder=5, gid="headline-winner")
        _note_per_column(ax, _mark_off_scale(ax, edge_points, lo, hi), lo, hi)
        ax.axhline(0.0, color="0.3", linewidth=0.9, zorder=1)
        ax.axhline(tolerance, color="red", linestyle=":", linewidth=1.2, zorder=1, gid="tolerance")
        ax.set_title(f"plan {plan}  (best of {n_specs} specs per point)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_xlabel("weight bits")
        _set_bit_ticks(ax, sorted({r["bits"] for r in rows if r["plan"] == plan}))  # a plan's own widths: no empty columns
    axes[0].set_ylim(lo, hi)
    for ax in axes[::ncols]:
        ax.set_ylabel("drop pp (float − quantized; 0 = float)")
    # Centred over the panels, not the legend column beside them, which would overlap it.
    shown = "" if len(levels) == len(all_levels) else (
        f"\n{len(levels)} of {len(all_levels)} levels drawn, spread over k (results.csv has every level)")
    fig.suptitle("Drop vs weight bits, one panel per plan\n"
                 "each point: the spec with the lowest drop at its level and width (the headline's pick)" + shown,
                 fontsize=10, x=0.5 * panels_width / (panels_width + 2.4))
    fig.legend(handles=_drop_legend(levels, colors, markers, tolerance, banded), loc="outside right upper", fontsize=8,
               frameon=False)
    return fig


def _drop_legend(
    levels: Sequence[str], colors: Mapping[str, Any], markers: Mapping[str, str], tolerance: float, banded: Sequence[str]
) -> list[Any]:
    handles: list[Any] = [Line2D([], [], color=colors[lv], linestyle="--" if lv == "reference" else "-", label=lv)
                          for lv in levels]
    if banded:
        which = "" if len(banded) == len(levels) else "\n(bands: " + ", ".join(banded) + ")"
        handles.append(Patch(color="0.4", alpha=BAND_ALPHA, label=f"random grouping of\nthe same sizes: mean ± std{which}"))
    handles += [Line2D([], [], color="0.4", marker=m, linestyle="none", label=f"method {method}")
                for method, m in markers.items()]
    handles += [
        Line2D([], [], color="none", marker="o", markerfacecolor="none", markeredgecolor="red", markersize=10,
               label="headline: fewest bits\nwithin tolerance"),
        Line2D([], [], color="red", linestyle=":", label=f"tolerance {tolerance:g} pp"),
        Line2D([], [], color="0.5", marker="^", linestyle="none", markeredgecolor="black",
               label="off scale (drop pp noted;\n'n: a–b' for n levels)"),
    ]
    return handles


def plot_drop_vs_bits(rows: Sequence[Mapping[str, Any]], path: str | Path, tolerance: float, dpi: int = 110) -> Path:
    """Write :func:`drop_vs_bits_figure` as a PNG at ``path``; returns the path."""
    return save_figure(drop_vs_bits_figure(rows, tolerance), path, dpi)


# --- pareto ----------------------------------------------------------------------------------------

# Tick multipliers tried per decade on the log size axis, until at least MIN_LOG_TICKS fall in view.
LOG_SUBS = ((1.0,), (1.0, 2.0, 5.0), (1.0, 2.0, 3.0, 5.0, 7.0), tuple(float(m) for m in range(1, 10)))
# Fewer than 3 labelled ticks on a log axis hides its scale (the old plot had 2).
MIN_LOG_TICKS = 3


def log_ticks(lo: float, hi: float) -> list[float]:
    """Round tick values in ``lo..hi`` on a log axis: the coarsest of :data:`LOG_SUBS` giving >= 3 ticks.

    Examples
    --------
    >>> log_ticks(70, 1100)
    [100.0, 200.0, 500.0, 1000.0]
    >>> log_ticks(50, 90)
    [50.0, 60.0, 70.0, 80.0, 90.0]
    >>> log_ticks(87, 115)
    [89.5, 100.0, 112.0]
    """
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    ticks: list[float] = []
    for subs in LOG_SUBS:
        ticks = sorted({round(m * 10.0 ** e, 12) for e in range(first, last + 1) for m in subs})
        ticks = [t for t in ticks if lo <= t <= hi]
        if len(ticks) >= MIN_LOG_TICKS:
            return ticks
    # A range narrower than the steps of 1..9 per decade: three log-spaced values, 3 significant digits.
    inner = [lo * (hi / lo) ** f for f in (0.1, 0.5, 0.9)]
    return [float(f"{t:.3g}") for t in inner]


def _kb(value: float, _pos: Any = None) -> str:
    return f"{value:g}"


def pareto_frontier(points: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows no smaller row beats: sorted by packed size, each more accurate than all smaller ones.

    Examples
    --------
    >>> pts = [{"packed_bytes": 10, "fine_acc": 0.5}, {"packed_bytes": 20, "fine_acc": 0.4},
    ...        {"packed_bytes": 30, "fine_acc": 0.9}]
    >>> [p["packed_bytes"] for p in pareto_frontier(pts)]
    [10, 30]
    """
    frontier: list[Mapping[str, Any]] = []
    for r in sorted(points, key=lambda r: (r["packed_bytes"], -r["fine_acc"])):
        if not frontier or r["fine_acc"] > frontier[-1]["fine_acc"]:
            frontier.append(r)
    return frontier


def spec_labels(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """``{spec_key: label}``: the bits and the value of every other grid dimension that varies among ``rows``.

    The dimensions are the report's (:data:`hiercluster.report.DIMS`), values only, to fit a plot.

    Examples
    --------
    >>> rows = [{"spec_key": "a", "scheme": "pow2", "bits": 4, "plan": "full", "method": "rtn"},
    ...         {"spec_key": "b", "scheme": "pow2", "bits": 2, "plan": "first8", "method": "rtn"}]
    >>> spec_labels(rows)
    {'a': '4b full', 'b': '2b first8'}
    """
    dims = varying_dims(rows, skip=("bits",))
    return {r["spec_key"]: " ".join([f"{r['bits']}b"] + [dim_value(r, c) for c, _ in dims]) for r in rows}


def pareto_figure(
    rows: Sequence[Mapping[str, Any]], float_accuracy: float, level: str, tolerance: float | None = None
) -> Figure:
    """Fine accuracy vs bit-packed size for every spec at ``level``; the float model as a star.

    Colour is the scheme, the marker the rounding method. The frontier (no smaller spec is
    more accurate) is a step line and only its points are labelled, placed so that no two
    labels overlap. With ``tolerance``, the y range is the within-tolerance region below the
    float accuracy (:func:`drop_view`) and collapsed specs are triangles on the lower edge.
    """
    sel = [r for r in rows if r["level"] == level]
    fig = new_figure(8.6, 4.8)
    ax = fig.subplots()
    schemes = list(dict.fromkeys(r["scheme"] for r in sel))
    methods = list(dict.fromkeys(row_method(r) for r in sel))
    color = dict(zip(schemes, matplotlib.colormaps["tab10"].colors))
    markers = dict(zip(methods, METHOD_MARKERS))
    for scheme, method in dict.fromkeys((r["scheme"], row_method(r)) for r in sel):
        pts = [r for r in sel if (r["scheme"], row_method(r)) == (scheme, method)]
        ax.scatter([r["packed_bytes"] / 1024 for r in pts], [100 * r["fine_acc"] for r in pts], marker=markers[method],
                   color=color[scheme], s=30, alpha=0.75, zorder=3, gid="spec")
    frontier = pareto_frontier(sel)
    fp32_kb = sel[0]["fp32_bytes"] / 1024 if sel else None
    steps = [(r["packed_bytes"] / 1024, 100 * r["fine_acc"]) for r in frontier]
    if fp32_kb is not None and (not frontier or float_accuracy > frontier[-1]["fine_acc"]):
        steps.append((fp32_kb, 100 * float_accuracy))
    if steps:
        ax.plot([x for x, _ in steps], [y for _, y in steps], drawstyle="steps-post", color="0.35", linewidth=1,
                zorder=2, gid="frontier")
    if fp32_kb is not None:
        ax.scatter([fp32_kb], [100 * float_accuracy], marker="*", s=160, color="black", zorder=4)
    sizes = [r["packed_bytes"] / 1024 for r in sel] + ([fp32_kb] if fp32_kb else [])
    if sizes:
        xlo, xhi = min(sizes) / 1.15, max(sizes) * 1.15
        ax.set_xscale("log")
        ax.set_xlim(xlo, xhi)
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(log_ticks(xlo, xhi)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_kb))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    in_view = sel
    if tolerance is not None and sel:
        dlo, dhi = drop_view([100 * (float_accuracy - r["fine_acc"]) for r in sel], tolerance)
        ylo, yhi = 100 * float_accuracy - dhi, 100 * float_accuracy - dlo
        ax.set_ylim(ylo, yhi)
        ax.axhline(100 * float_accuracy - tolerance, color="red", linestyle=":", linewidth=1.2, gid="tolerance")
        off = _mark_off_scale(ax, [(r["packed_bytes"] / 1024, 100 * r["fine_acc"], color[r["scheme"]]) for r in sel],
                              ylo, yhi)
        _corner_note(ax, off, unit=" %")
        in_view = [r for r in sel if ylo <= 100 * r["fine_acc"] <= yhi]
    ax.set_xlabel("bit-packed model size (KB, log scale)")
    ax.set_ylabel(f"fine accuracy % ({level})")
    ax.set_title("Accuracy vs size; labelled: the frontier (no smaller spec is more accurate)", fontsize=10)
    ax.grid(alpha=0.3, which="major")
    fig.legend(handles=_pareto_legend(color, markers, tolerance), loc="outside right upper", fontsize=8, frameon=False)
    labels = spec_labels(sel)
    keys = {r["spec_key"] for r in in_view}
    _place_labels(fig, ax, [((r["packed_bytes"] / 1024, 100 * r["fine_acc"]), labels[r["spec_key"]])
                            for r in frontier if r["spec_key"] in keys],
                  dots=[(r["packed_bytes"] / 1024, 100 * r["fine_acc"]) for r in in_view])
    return fig


def _pareto_legend(color: Mapping[str, Any], markers: Mapping[str, str], tolerance: float | None) -> list[Any]:
    handles: list[Any] = [Line2D([], [], color=c, marker="o", linestyle="none", label=s) for s, c in color.items()]
    handles += [Line2D([], [], color="0.4", marker=m, linestyle="none", label=f"method {method}")
                for method, m in markers.items()]
    handles += [Line2D([], [], color="black", marker="*", markersize=11, linestyle="none", label="FP32"),
                Line2D([], [], color="0.35", drawstyle="steps-post", label="frontier")]
    if tolerance is not None:
        handles += [Line2D([], [], color="red", linestyle=":", label=f"float − {tolerance:g} pp"),
                    Line2D([], [], color="0.5", marker="v", linestyle="none", markeredgecolor="black",
                           label="off scale (noted)")]
    return handles


# Label positions tried around a point, in points: right, left, above, below, then further out.
_LABEL_OFFSETS = [(dx, dy) for dy in (4, -4, 14, -14, 24, -24, 36, -36, 50, -50) for dx in (6, -6)]


def _place_labels(
    fig: Figure, ax: Axes, labels: Sequence[tuple[tuple[float, float], str]], dots: Sequence[tuple[float, float]]
) -> None:
    """Label points greedily: each label takes the first offset whose box stays in the axes and
    overlaps no other label, note or dot (``dots``: every plotted point, in data coordinates).

    The layout is settled (one draw) and then frozen, so the boxes measured here are where
    the labels end up in the file. Falls back to ignoring dots, then to the first offset.
    """
    fig.canvas.draw()
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = [t.get_window_extent(renderer) for t in ax.texts]  # notes already there
    for xy, text in labels:
        own = _dot_box(ax, xy)
        others = [d for d in (_dot_box(ax, p) for p in dots) if not d.overlaps(own)]
        choice = None
        for avoid in (taken + others, taken):
            choice = _first_free(ax, xy, text, renderer, frame, avoid)
            if choice is not None:
                break
        if choice is None:
            choice = _annotate(ax, xy, text, *_LABEL_OFFSETS[0])
        taken.append(label_box(choice, renderer).expanded(1.05, 1.15))


def label_box(label: Any, renderer: Any) -> Bbox:
    """The display box of a label's text alone (an annotation's own box includes its leader line)."""
    label.update_positions(renderer)  # what Annotation.get_window_extent does before measuring its text
    return matplotlib.text.Text.get_window_extent(label, renderer)


def _first_free(ax: Axes, xy: tuple[float, float], text: str, renderer: Any, frame: Bbox, avoid: Sequence[Bbox]) -> Any:
    """The label at the first of :data:`_LABEL_OFFSETS` inside ``frame`` clear of ``avoid``, else None."""
    for dx, dy in _LABEL_OFFSETS:
        ann = _annotate(ax, xy, text, dx, dy)
        box = label_box(ann, renderer)
        if _inside(box, frame) and not any(box.overlaps(b) for b in avoid):
            return ann
        ann.remove()
    return None


def _annotate(ax: Axes, xy: tuple[float, float], text: str, dx: float, dy: float) -> Any:
    # A leader line on every label: a label beside a neighbour's point still says whose it is.
    return ax.annotate(
        text, xy, xytext=(dx, dy), textcoords="offset points", fontsize=7, zorder=6, gid="frontier-label",
        ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top",
        arrowprops={"arrowstyle": "-", "color": "0.45", "lw": 0.6, "shrinkA": 0, "shrinkB": 3},
        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
    )


def _dot_box(ax: Axes, xy: tuple[float, float], radius: float = 4.0) -> Bbox:
    from matplotlib.transforms import Bbox

    x, y = ax.transData.transform(xy)
    return Bbox.from_extents(x - radius, y - radius, x + radius, y + radius)


def _inside(box: Bbox, frame: Bbox) -> bool:
    return box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1


def plot_pareto(
    rows: Sequence[Mapping[str, Any]], float_accuracy: float, path: str | Path, level: str, dpi: int = 110,
    tolerance: float | None = None,
) -> Path:
    """Write :func:`pareto_figure` as a PNG at ``path``; returns the path."""
    return save_figure(pareto_figure(rows, float_accuracy, level, tolerance), path, dpi)


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
