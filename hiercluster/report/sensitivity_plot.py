"""The layer-sensitivity bar plot: per weight slot, the drop when only it is quantized and the gain when only it stays float."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hiercluster.report.plots import new_figure, save_figure

# Inches per layer row, and the height of everything else (titles, axis labels).
_ROW_INCHES = 0.28
_FRAME_INCHES = 1.6


def plot_sensitivity(
    rows: Sequence[Any], path: str | Path, k: int, title: str | None = None, dpi: int = 110
) -> Path:
    """Horizontal bars per slot, in the model's order (top = first layer), with ±1 SE whiskers.

    Left panel: the drop (pp) when only this layer is quantized; right panel: the gain
    (pp) when only this layer stays float. Each panel shows the fine level and level k.

    Parameters
    ----------
    rows : sequence
        :class:`hiercluster.evaluation.sensitivity.LayerSensitivity` (or anything with
        its attributes).
    path : str or Path
        The PNG to write.
    k : int
        The grouped level's number of superclasses (for the legend).
    """
    names = [r.layer for r in rows]
    y = np.arange(len(rows))
    fig = new_figure(10.0, _FRAME_INCHES + _ROW_INCHES * max(len(rows), 1))
    axes = fig.subplots(1, 2, sharey=True)
    panels = (
        ("drop_fine", "se_drop_fine", "drop_k", "se_drop_k", "drop, only this layer quantized (pp)"),
        ("gain_fine", "se_gain_fine", "gain_k", "se_gain_k", "gain, only this layer kept float (pp)"),
    )
    height = 0.4
    for ax, (fine, se_fine, grouped, se_grouped, label) in zip(axes, panels):
        ax.barh(y - height / 2, [getattr(r, fine) for r in rows], height, xerr=[getattr(r, se_fine) for r in rows],
                label="fine", color="tab:blue", error_kw={"elinewidth": 0.8})
        ax.barh(y + height / 2, [getattr(r, grouped) for r in rows], height, xerr=[getattr(r, se_grouped) for r in rows],
                label=f"k={k}", color="tab:orange", error_kw={"elinewidth": 0.8})
        ax.axvline(0.0, color="black", linewidth=0.6)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, names, fontsize=7)
    axes[0].invert_yaxis()  # the first layer on top
    axes[0].legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi)
