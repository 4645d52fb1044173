"""Figures as PNG files, drawn headless.

Figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas directly,
so nothing here touches pyplot's global state or needs a display. Every function
writes one file, creating its folder, and returns its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hiercluster.errors import HierclusterError
from quant._files import write_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from hiercluster.hierarchy import ClassHierarchy


def new_figure(width: float, height: float) -> Figure:
    """A ``width`` x ``height`` inch figure with constrained layout on its own Agg canvas (no pyplot).

    The canvas is attached so that text sizes can be measured before saving
    (:meth:`~matplotlib.backend_bases.FigureCanvasBase.get_renderer`).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda handle: fig.savefig(handle, format="png", dpi=dpi))
    return path


def plot_dendrogram(hierarchy: ClassHierarchy, path: str | Path, title: str | None = None, dpi: int = 120) -> Path:
    """Draw a fitted hierarchy as a dendrogram with the class names as leaf labels.

    Examples
    --------
    >>> import tempfile
    >>> from hiercluster.hierarchy import ClassHierarchy
    >>> h = ClassHierarchy.from_groups([[0, 1], [2]], ["Sandal", "Sneaker", "Bag"])
    >>> plot_dendrogram(h, tempfile.mkdtemp() + "/tree.png").stat().st_size > 0
    True
    """
    from scipy.cluster.hierarchy import dendrogram

    if not hasattr(hierarchy, "linkage_matrix_"):
        raise HierclusterError("plot_dendrogram needs a fitted ClassHierarchy")
    n = hierarchy.n_classes_
    fig = new_figure(7.0, max(2.5, 0.28 * n + 1.0))
    ax = fig.add_subplot()
    dendrogram(
        hierarchy.linkage_matrix_,
        labels=hierarchy.class_names_,
        orientation="left",
        ax=ax,
        color_threshold=0,
        above_threshold_color="#33577a",
        leaf_font_size=9 if n <= 40 else 6,
    )
    ax.set_xlabel("merge height")
    kind = f"{hierarchy.linkage} linkage, {hierarchy.metric}" if hierarchy.linkage else "hand-made grouping"
    ax.set_title(title or f"Class hierarchy ({kind})")
    ax.spines[["top", "right", "left"]].set_visible(False)
    return save_figure(fig, path, dpi)


def plot_prediction_share(
    share_float: Sequence[float] | np.ndarray,
    share_quant: Sequence[float] | np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    title: str = "Share of predictions per class",
    labels: tuple[str, str] = ("float", "quantized"),
    dpi: int = 120,
) -> Path:
    """Bar chart of the fraction of predictions per class, float vs quantized.

    A dashed line marks the uniform share 1/C; a low-bit model that collapses its
    predictions onto a few classes shows tall bars there and near-empty ones elsewhere.

    Examples
    --------
    >>> import tempfile
    >>> p = plot_prediction_share([0.5, 0.5], [0.9, 0.1], ["a", "b"], tempfile.mkdtemp() + "/share.png")
    >>> p.suffix
    '.png'
    """
    sf, sq = np.asarray(share_float, dtype=float), np.asarray(share_quant, dtype=float)
    n = len(class_names)
    if sf.shape != (n,) or sq.shape != (n,):
        raise HierclusterError(
            f"prediction shares must have one value per class ({n}), got {sf.shape} and {sq.shape}"
        )
    fig = new_figure(max(5.0, 0.55 * n + 1.5), 3.8)
    ax = fig.add_subplot()
    x = np.arange(n)
    width = 0.4
    ax.bar(x - width / 2, sf, width, label=labels[0], color="#4c78a8")
    ax.bar(x + width / 2, sq, width, label=labels[1], color="#e45756")
    ax.axhline(1.0 / n, color="0.4", linestyle="--", linewidth=1, label="uniform 1/C")
    ax.set_xticks(x, list(class_names), rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center")
    ax.set_ylabel("share of predictions")
    ax.set_title(title)
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return save_figure(fig, path, dpi)


__all__ = ["plot_dendrogram", "plot_prediction_share"]
