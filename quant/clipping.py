"""Range setting ("clipping"): the per-row interval ``[lo, hi]`` that the grid spans.

``minmax`` keeps the whole range; ``percentile`` takes a percentile of the values;
``mse`` picks, for every row at once, the shrink ratio ``r`` of the min-max range whose
quantization error ``||x - Q(x)||^2`` is smallest (the MMSE criterion of Choukroun et
al., 2019). Ratios are searched on a coarse grid (0.2..1.0, step 0.05), then on a fine
grid (step 0.005) around each row's best coarse ratio. Ratio 1.0 is always a candidate
and the winner is re-checked against it with the real quantizer, so ``mse`` never has
a larger error than ``minmax``. ``coherent`` (:mod:`quant.coherent_grid`) searches the scale and
the integer zero point for the grid whose rounding error is least coherent.

``binary`` has no range: :func:`binary_scale` gives its ``a`` in closed form.

The choice is deterministic and, for the sign-symmetric grids (``pow2`` and narrow-range
``symmetric``, where ``Q(-x) = -Q(x)``), exactly sign-invariant: there the error depends
only on ``|x|``, so the search runs on ``|x|`` and ``x`` and ``-x`` get the same range
bit for bit. Candidates whose ranges give the same grid (same scale and zero point, e.g.
several ratios rounding to one power of two with ``pow2_scale``) count as one, the
widest; errors within a relative ``NEAR_TIE_RTOL`` of the smallest are ties, and ties
go to the widest range (the largest ratio), so rounding noise in the float64 error
formula cannot decide between grids that are equally good.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from quant.errors import QuantError
from quant.schemes import EPS, Grid

COARSE_RATIOS = torch.linspace(1.0, 0.2, 17)  # descending: ties keep the wider range
FINE_OFFSETS = torch.linspace(-0.05, 0.05, 21)
MIN_RATIO = 0.2
# Errors this close (relative) to the least one are ties, won by the widest range.
NEAR_TIE_RTOL = 1e-12

# Elements per evaluation chunk: a chunk of candidates x rows stays in the L2/L3 cache.
_CHUNK_ELEMENTS = 1 << 20


def minmax_range(rows: Tensor, *, symmetric: bool) -> tuple[Tensor, Tensor]:
    """``lo = min(min(x), 0)``, ``hi = max(max(x), 0)``; ``+-max|x|`` when ``symmetric``."""
    # amin + amax is faster than torch.aminmax on CPU (two vectorized passes).
    lo, hi = rows.amin(dim=-1), rows.amax(dim=-1)
    # min/max propagate NaN and carry Inf, so this check costs no extra pass.
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        nan = int(torch.isnan(rows).sum())
        inf = int(torch.isinf(rows).sum())
        raise QuantError(f"tensor contains {nan} NaN and {inf} Inf value(s); only finite values can be quantized")
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    if symmetric:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    return lo, hi


def binary_scale(rows: Tensor) -> Tensor:
    """``a = mean|x|`` per row (``(C,)`` float32, at least float32 tiny): the binary grid's level.

    For any ``a > 0`` the nearest of ``{-a, +a}`` to ``x`` is ``sign(x) * a``, so the
    squared error is ``sum (|x| - a)^2``, least at ``a = mean|x|``: this is both the
    ``minmax`` and the ``mse`` choice for binary. The mean is taken in float64 (float32
    on MPS) and rounded once; a row of zeros gets the smallest positive ``a`` (a scale
    is always positive, as for the other schemes).

    Raises
    ------
    QuantError
        If ``rows`` holds a NaN or an Inf.

    Examples
    --------
    >>> binary_scale(torch.tensor([[-1.0, 3.0], [0.0, 0.0]]))
    tensor([2.0000e+00, 1.1755e-38])
    """
    dtype = torch.float32 if rows.device.type == "mps" else torch.float64
    # The 1-norm of float32 values in float64 cannot overflow, so a non-finite mean means a NaN or Inf.
    mean_abs = torch.linalg.vector_norm(rows, ord=1, dim=-1, dtype=dtype) / rows.shape[-1]
    if not torch.isfinite(mean_abs).all():
        minmax_range(rows, symmetric=True)  # raises, counting the NaN and Inf values
    return mean_abs.to(torch.float32).clamp_(min=EPS)


def sort_rows(rows: Tensor) -> Tensor:
    """Each row sorted ascending (numpy's SIMD sort on CPU: several times faster than torch.sort)."""
    if rows.device.type == "cpu":
        return torch.from_numpy(np.sort(rows.detach().numpy(), axis=-1))
    return torch.sort(rows, dim=-1).values


def _quantile_sorted(sorted_rows: Tensor, q: float) -> Tensor:
    # Linear interpolation between order statistics, numpy's default method.
    n = sorted_rows.shape[-1]
    pos = q * (n - 1)
    below = math.floor(pos)
    above = min(below + 1, n - 1)
    frac = pos - below
    lower = sorted_rows[..., below].to(torch.float64)
    upper = sorted_rows[..., above].to(torch.float64)
    return (lower + frac * (upper - lower)).to(torch.float32)


def percentile_range(rows: Tensor, percentile: float, *, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Range from the ``percentile`` of each row (of ``|x|`` when ``symmetric``).

    Sort-based, so it has no size limit (``torch.quantile`` refuses > 16M elements).
    """
    q = percentile / 100.0
    if symmetric:
        hi = _quantile_sorted(sort_rows(rows.abs()), q).clamp(min=0)
        return -hi, hi
    ordered = sort_rows(rows)
    return _quantile_sorted(ordered, 1.0 - q).clamp(max=0), _quantile_sorted(ordered, q).clamp(min=0)


def mse_range(rows: Tensor, lo: Tensor, hi: Tensor, grid: Grid, *, pow2_scale: bool = False) -> tuple[Tensor, Tensor]:
    """Shrink ``[lo, hi]`` per row by the ratio that minimizes the squared quantization error."""
    sign_symmetric = is_sign_symmetric(grid)
    if sign_symmetric:
        # Q(-x) = -Q(x), so ||x - Q(x)||^2 depends on |x| only: searching on |x| makes the
        # choice for x and -x identical, whatever order the error sums run in.
        rows = rows.abs()
    evaluate = _choose_evaluator(rows, grid, nonnegative=sign_symmetric)
    ratios = COARSE_RATIOS.to(rows.device)[:, None].expand(-1, rows.shape[0])
    coarse = evaluate(lo * ratios, hi * ratios, pow2_scale)
    best = pick_ratio(ratios, coarse, lo, hi, grid, pow2_scale)
    fine_ratios = (best + FINE_OFFSETS.to(rows.device)[:, None]).clamp(MIN_RATIO, 1.0)
    fine = evaluate(lo * fine_ratios, hi * fine_ratios, pow2_scale)
    winner = pick_ratio(torch.cat([ratios, fine_ratios]), torch.cat([coarse, fine]), lo, hi, grid, pow2_scale)
    # The search may rank by a float64 formula; confirm against the real quantizer that
    # the winner is no worse than the full range, so mse <= minmax holds exactly. A
    # near-tie keeps the full range, as in the search.
    check = torch.stack([winner, torch.ones_like(winner)])
    exact = direct_errors(rows, lo * check, hi * check, grid, pow2_scale)
    better = exact[0] < exact[1] - NEAR_TIE_RTOL * exact[1].abs()
    winner = torch.where(better, winner, 1.0)
    return lo * winner, hi * winner


def is_sign_symmetric(grid: Grid) -> bool:
    """Whether the grid's levels are symmetric about 0 (``pow2``, narrow-range ``symmetric``)."""
    return grid.scheme == "pow2" or (grid.scheme == "symmetric" and grid.qmin == -grid.qmax)


def pick_ratio(ratios: Tensor, errors: Tensor, lo: Tensor, hi: Tensor, grid: Grid, pow2_scale: bool) -> Tensor:
    """Per row (``(C,)``), the ratio of least error among ``(K, C)`` candidates, deterministically.

    Candidates are ranked widest first; consecutive ones whose ranges give the same
    scale and zero point are one grid and all take the error of the widest. Among the
    candidates within a relative ``NEAR_TIE_RTOL`` of the least error, the widest wins.
    """
    order = torch.sort(ratios, dim=0, descending=True, stable=True).indices
    ratios, errors = ratios.gather(0, order), errors.gather(0, order)
    scale, zero_point = grid.params(lo * ratios, hi * ratios, pow2_scale)
    same = (scale[1:] == scale[:-1]) & (zero_point[1:] == zero_point[:-1])
    index = torch.arange(ratios.shape[0], device=ratios.device)[:, None].expand_as(ratios)
    first = torch.cat([index[:1], torch.where(same, 0, index[1:])]).cummax(dim=0).values
    errors = errors.gather(0, first)
    least = errors.min(dim=0).values
    near = errors <= least + NEAR_TIE_RTOL * least.abs()
    chosen = near.to(torch.uint8).argmax(dim=0, keepdim=True)  # the first, i.e. widest, near-tie
    return ratios.gather(0, chosen)[0]


def direct_errors(
    rows: Tensor, lo: Tensor, hi: Tensor, grid: Grid, pow2_scale: bool, reduce: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """``||x - Q(x)||^2`` per candidate range and row (``(K, C)`` float64) with the real quantizer.

    ``reduce`` maps the float64 errors ``Q(x) - x`` of a chunk of candidates (``(k, C, N)``)
    to ``(k, C)``; the default is the squared norm.
    """
    scale, zero_point = grid.params(lo, hi, pow2_scale)
    scale, zero_point = scale[..., None], zero_point[..., None]
    step = max(1, _CHUNK_ELEMENTS // max(1, rows.numel()))
    out = []
    for k in range(0, scale.shape[0], step):
        s, z = scale[k : k + step], zero_point[k : k + step]
        diff = grid.dequantize(grid.quantize(rows, s, z), s, z).sub_(rows).to(torch.float64)
        out.append(torch.linalg.vecdot(diff, diff) if reduce is None else reduce(diff))
    return torch.cat(out)


class _SortedErrors:
    """``||x - Q(x)||^2`` for many candidate grids from one sort of each row.

    With the row sorted and its prefix sums P, the values assigned to level ``l_i`` form
    a contiguous run between the midpoints of adjacent levels, so
    ``sum (x - l_i)^2 = sum x^2 - 2 l_i S_i + n_i l_i^2`` with ``S_i``, ``n_i`` read off P
    at the midpoints' positions. A candidate then costs ``O(levels * log N)`` per row
    instead of ``O(N)``. Values exactly at a midpoint are equally far from both
    levels, so the tie rule does not change the error. ``nonnegative``: the rows hold
    no negative value (``|x|`` for a sign-symmetric grid), so only the levels ``>= 0``
    are searched.
    """

    def __init__(self, rows: Tensor, grid: Grid, *, nonnegative: bool = False) -> None:
        if nonnegative and not is_sign_symmetric(grid):
            raise ValueError(f"nonnegative needs a sign-symmetric grid, got {grid}")
        self.grid = grid
        # Levels >= 0 of a sign-symmetric grid: the last qmax + 1 (codes 0..qmax).
        self.n_levels = grid.qmax + 1 if nonnegative else grid.qmax - grid.qmin + 1
        self.sorted = sort_rows(rows).to(torch.float64)
        prefix = torch.cumsum(self.sorted, dim=-1)
        self.prefix = torch.nn.functional.pad(prefix, (1, 0))
        self.sumsq = torch.linalg.vecdot(self.sorted, self.sorted)

    def __call__(self, lo: Tensor, hi: Tensor, pow2_scale: bool) -> Tensor:
        step = max(1, _CHUNK_ELEMENTS // (lo.shape[-1] * self.n_levels))
        return torch.cat([self._chunk(lo[k : k + step], hi[k : k + step], pow2_scale) for k in range(0, lo.shape[0], step)])

    def _chunk(self, lo: Tensor, hi: Tensor, pow2_scale: bool) -> Tensor:
        scale, zero_point = self.grid.params(lo, hi, pow2_scale)
        levels = self.grid.levels(scale[..., None], zero_point[..., None])[..., -self.n_levels :]
        levels = levels.to(torch.float64)  # (K, C, n)
        k, c, n = levels.shape
        mids = (levels[..., 1:] + levels[..., :-1]) * 0.5
        pos = torch.searchsorted(self.sorted, mids.permute(1, 0, 2).reshape(c, k * (n - 1)).contiguous())
        pos = pos.reshape(c, k, n - 1)
        edges = torch.cat(
            [pos.new_zeros(c, k, 1), pos, pos.new_full((c, k, 1), self.sorted.shape[-1])], dim=-1
        )  # (C, K, n+1)
        sums = self.prefix.gather(-1, edges.reshape(c, -1)).reshape(c, k, n + 1).diff(dim=-1)
        counts = edges.diff(dim=-1).to(torch.float64)
        lv = levels.permute(1, 0, 2)
        err = (counts * lv * lv - 2.0 * lv * sums).sum(-1) + self.sumsq[:, None]
        return err.T


def _choose_evaluator(rows: Tensor, grid: Grid, *, nonnegative: bool = False) -> Callable[[Tensor, Tensor, bool], Tensor]:
    n_levels = grid.qmax + 1 if nonnegative else grid.qmax - grid.qmin + 1
    length = rows.shape[-1]
    # Rough per-candidate cost per row: a binary search per level vs ~4 passes over the row.
    if n_levels * math.log2(length + 1) < 4 * length:
        return _SortedErrors(rows, grid, nonnegative=nonnegative)
    return lambda lo, hi, pow2_scale: direct_errors(rows, lo, hi, grid, pow2_scale)
