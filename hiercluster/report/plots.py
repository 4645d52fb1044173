"""Figures as PNG files, drawn headless.

Figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas directly,
so nothing here touches pyplot's global state or needs a display. Every function
writes one file, creating its folder, and returns its path.

Figures stay readable at any number of classes: a dendrogram of more than
:data:`MAX_LEAVES` classes is cut to its top clusters, the prediction-share chart shows
the :data:`MAX_SHARE_CLASSES` classes with the largest shares, and no PNG has a side
longer than :data:`MAX_FIGURE_PX` (measured at 1,000 classes: 840 x 33,720 and 66,180 px
before these caps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hiercluster.errors import HierclusterError
from quant._files import write_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from hiercluster.hierarchy.clustering import ClassHierarchy

#: No saved PNG is wider or taller than this: the resolution is lowered for a larger figure.
MAX_FIGURE_PX = 2000
#: A dendrogram of more classes shows its top clusters only, each labelled with its size.
MAX_LEAVES = 40
#: The prediction-share chart of more classes shows the classes with the largest shares
#: (float or quantized) and one bar for the mean share of the others.
MAX_SHARE_CLASSES = 20
#: Class names quoted in the label of a cluster of the truncated dendrogram.
CLUSTER_NAMES = 2
#: Levels shown by a plot legend or a per-level table of the report; of more, a spread over k.
MAX_LEVELS_SHOWN = 12


def spread_by_k(ks: Mapping[str, int], n: int = MAX_LEVELS_SHOWN, keep: Sequence[str] = ()) -> list[str]:
    """At most ``n`` of the levels ``ks`` (name -> k), spread evenly over log k; all when they fit.

    The ``keep`` names (the reference grouping, say) are always among them; of the others,
    the smallest and the largest k are, and the rest lie nearest to log-spaced k between
    them. The names come back in the order of ``ks``.

    Examples
    --------
    >>> ks = {f"k={k}": k for k in range(2, 1001)} | {"reference": 20}
    >>> spread_by_k(ks, 6, keep=["reference"])
    ['k=2', 'k=9', 'k=45', 'k=211', 'k=1000', 'reference']
    """
    names = list(ks)
    if len(names) <= n:
        return names
    kept = [name for name in dict.fromkeys(keep) if name in ks][:n]
    rest = sorted((name for name in names if name not in kept), key=lambda name: ks[name])  # stable: ties keep order
    slots = n - len(kept)
    if slots > 0:
        logk = np.log(np.maximum([ks[name] for name in rest], 1))
        chosen: list[int] = []
        for target in np.linspace(logk[0], logk[-1], slots):
            # The nearest level not taken yet: slots < len(rest), so one is always left.
            chosen.append(next(int(i) for i in np.argsort(np.abs(logk - target), kind="stable") if i not in chosen))
        kept += [rest[i] for i in chosen]
    return [name for name in names if name in set(kept)]


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
    """Write ``fig`` as a PNG at ``path`` (parent folders created); returns the path.

    The resolution is lowered from ``dpi`` when needed so that neither side of the PNG
    exceeds :data:`MAX_FIGURE_PX`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dpi = min(dpi, MAX_FIGURE_PX / max(fig.get_size_inches()))
    write_atomic(path, lambda handle: fig.savefig(handle, format="png", dpi=dpi))
    return path


def largest(values: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest ``values``, largest first (ties: the lower index first).

    Examples
    --------
    >>> largest([0.1, 0.5, 0.2, 0.5], 3).tolist()
    [1, 3, 2]
    """
    order = np.argsort(-np.asarray(values, dtype=float), kind="stable")
    return order[: max(0, n)]


def _cluster_labels(linkage: np.ndarray, names: Sequence[str]) -> list[str]:
    """Label of every node of ``linkage``: a class's name, or a cluster's first names and size.

    Node ``i < n`` is class ``i``; node ``n + j`` is the cluster merged at row ``j``.

    Examples
    --------
    >>> _cluster_labels(np.array([[0, 1, 1.0, 2], [2, 3, 2.0, 3]]), ["a", "b", "c"])[3:]
    ['a, b (2)', 'c, a, … (3)']
    """
    n = len(names)
    heads: list[list[str]] = [[name] for name in names]
    sizes = [1] * n
    for a, b in linkage[:, :2].astype(int):
        heads.append((heads[a] + heads[b])[:CLUSTER_NAMES])
        sizes.append(sizes[a] + sizes[b])
    labels = list(names)
    for head, size in zip(heads[n:], sizes[n:]):
        labels.append(", ".join(head) + (", …" if size > len(head) else "") + f" ({size})")
    return labels


def plot_dendrogram(hierarchy: ClassHierarchy, path: str | Path, title: str | None = None, dpi: int = 120) -> Path:
    """Draw a fitted hierarchy as a dendrogram with the class names as leaf labels.

    A hierarchy of more than :data:`MAX_LEAVES` classes is drawn down to its top
    :data:`MAX_LEAVES` clusters (the tree cut at that many groups): each leaf is then a
    cluster, labelled with its first class names and its size in parentheses.

    Examples
    --------
    >>> import tempfile
    >>> from hiercluster.hierarchy.clustering import ClassHierarchy
    >>> h = ClassHierarchy.from_groups([[0, 1], [2]], ["Sandal", "Sneaker", "Bag"])
    >>> plot_dendrogram(h, tempfile.mkdtemp() + "/tree.png").stat().st_size > 0
    True
    """
    from scipy.cluster.hierarchy import dendrogram

    if not hasattr(hierarchy, "linkage_matrix_"):
        raise HierclusterError("plot_dendrogram needs a fitted ClassHierarchy")
    n = hierarchy.n_classes_
    truncated = n > MAX_LEAVES
    leaves = MAX_LEAVES if truncated else n
    fig = new_figure(8.5 if truncated else 7.0, max(2.5, 0.28 * leaves + 1.0))
    ax = fig.add_subplot()
    linkage = np.asarray(hierarchy.linkage_matrix_, dtype=float)
    labels = _cluster_labels(linkage, list(hierarchy.class_names_))
    dendrogram(
        linkage,
        truncate_mode="lastp" if truncated else None,
        p=leaves,
        leaf_label_func=labels.__getitem__,
        orientation="left",
        ax=ax,
        color_threshold=0,
        above_threshold_color="#33577a",
        leaf_font_size=9 if truncated else (9 if n <= 40 else 6),
    )
    ax.set_xlabel("merge height")
    kind = f"{hierarchy.linkage} linkage, {hierarchy.metric}" if hierarchy.linkage else "hand-made grouping"
    top = f"\ntop {leaves} clusters of {n} classes; (n): classes in a cluster" if truncated else ""
    ax.set_title((title or f"Class hierarchy ({kind})") + top)
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
    Of more than :data:`MAX_SHARE_CLASSES` classes, the ones with the largest share
    (float or quantized) are drawn, and a last bar gives the mean share of the others
    (comparable with 1/C).

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
    names = list(class_names)
    if n > MAX_SHARE_CLASSES:
        shown = largest(np.maximum(sf, sq), MAX_SHARE_CLASSES)
        rest = np.setdiff1d(np.arange(n), shown)
        names = [names[i] for i in shown] + [f"others (mean of {len(rest)})"]
        sf = np.append(sf[shown], sf[rest].mean())
        sq = np.append(sq[shown], sq[rest].mean())
        title = f"{title}\n{MAX_SHARE_CLASSES} of {n} classes: the largest shares, float or quantized"
    bars = len(names)
    fig = new_figure(max(5.0, 0.55 * bars + 1.5), 3.8 if bars == n else 4.4)
    ax = fig.add_subplot()
    x = np.arange(bars)
    width = 0.4
    ax.bar(x - width / 2, sf, width, label=labels[0], color="#4c78a8")
    ax.bar(x + width / 2, sq, width, label=labels[1], color="#e45756")
    ax.axhline(1.0 / n, color="0.4", linestyle="--", linewidth=1, label="uniform 1/C")
    ax.set_xticks(x, names, rotation=45 if bars > 6 else 0, ha="right" if bars > 6 else "center")
    ax.set_ylabel("share of predictions")
    ax.set_title(title)
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return save_figure(fig, path, dpi)


__all__ = ["largest", "plot_dendrogram", "plot_prediction_share"]
