"""The clipping range of each row for a spec: one dispatch over the clipping methods.

Kept apart from :mod:`quant.clipping` (min-max, percentile, MSE) and
:mod:`quant.coherent_grid` (which builds on clipping's helpers), so that neither
imports the other in a circle.
"""

from __future__ import annotations

from torch import Tensor

from quant.clipping import minmax_range, mse_range, percentile_range
from quant.coherent_grid import coherent_range
from quant.schemes import Grid
from quant.spec import QuantSpec


def clip_range(rows: Tensor, spec: QuantSpec, grid: Grid) -> tuple[Tensor, Tensor]:
    """Per-row clip range of ``rows`` (float32, ``(C, N)``) under ``spec.clipping``.

    Returns ``(lo, hi)``, each ``(C,)`` float32 with ``lo <= 0 <= hi``; for the
    symmetric schemes ``lo == -hi``.

    Raises
    ------
    QuantError
        If ``rows`` holds a NaN or an Inf.

    Examples
    --------
    >>> import torch
    >>> rows = torch.tensor([[-1.0, 0.5, 2.0]])
    >>> clip_range(rows, QuantSpec(), Grid.make("asymmetric", 8))
    (tensor([-1.]), tensor([2.]))
    """
    symmetric = spec.scheme != "asymmetric"
    lo, hi = minmax_range(rows, symmetric=symmetric)
    if spec.clipping == "percentile":
        return percentile_range(rows, spec.percentile, symmetric=symmetric)
    if spec.clipping == "mse":
        return mse_range(rows, lo, hi, grid, pow2_scale=spec.pow2_scale)
    if spec.clipping == "coherent":
        return coherent_range(rows, lo, hi, grid, pow2_scale=spec.pow2_scale)
    return lo, hi


__all__ = ["clip_range"]
