"""Error and distribution statistics of a tensor and its quantized version (pure functions)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from quant.clipping import sort_rows

QUARTILES = ("min", "q1", "median", "q3", "max")


def _energy(x: Tensor) -> float:
    x = x.detach().reshape(-1).to(torch.float64)
    return float(torch.dot(x, x))


def squared_error(x: Tensor, x_hat: Tensor) -> float:
    """``sum((x - x_hat)^2)``, the squares accumulated in float64.

    Examples
    --------
    >>> squared_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.5]))
    0.25
    """
    return _energy(x.detach().to(torch.float64) - x_hat.detach().to(torch.float64))


def sqnr_db(x: Tensor, x_hat: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - x_hat)^2)`` in dB.

    ``inf`` when the error is zero (including an all-zero ``x`` reproduced exactly);
    ``-inf`` when ``x`` is all zero but ``x_hat`` is not.

    Examples
    --------
    >>> round(sqnr_db(torch.tensor([1.0, -1.0]), torch.tensor([0.5, -1.0])), 3)
    9.031
    """
    return sqnr_from(x, squared_error(x, x_hat))


def sqnr_from(x: Tensor, noise: float) -> float:
    """SQNR in dB of ``x`` given the squared error ``noise`` already computed."""
    power = _energy(x)
    if noise == 0.0:
        return math.inf
    if power == 0.0:
        return -math.inf
    return 10.0 * math.log10(power / noise)


def five_numbers_sorted(ordered: Tensor) -> dict[str, float]:
    """min, Q1, median, Q3, max of an already sorted 1-D tensor (numpy's linear interpolation)."""
    n = ordered.numel()

    def at(q: float) -> float:
        pos = q * (n - 1)
        below = math.floor(pos)
        above = min(below + 1, n - 1)
        lo, hi = float(ordered[below]), float(ordered[above])
        return lo + (pos - below) * (hi - lo)

    return dict(zip(QUARTILES, (at(0.0), at(0.25), at(0.5), at(0.75), at(1.0))))


def five_numbers(x: Tensor) -> dict[str, float]:
    """min, Q1, median, Q3, max (linear interpolation, numpy's default), from one sort.

    Examples
    --------
    >>> five_numbers(torch.arange(5.0))
    {'min': 0.0, 'q1': 1.0, 'median': 2.0, 'q3': 3.0, 'max': 4.0}
    """
    return five_numbers_sorted(sort_rows(x.detach().to(torch.float32).reshape(1, -1))[0])


def _channel_rows(x: Tensor) -> Tensor:
    x = x.detach()
    return x.reshape(x.shape[0], -1) if x.dim() > 0 else x.reshape(1, 1)


def per_channel_zero_fraction(x: Tensor) -> Tensor:
    """Fraction of exact zeros in each slice along axis 0 (float64, ``(C,)``)."""
    rows = _channel_rows(x)
    return (rows == 0).sum(dim=1).to(torch.float64) / rows.shape[1]


def distinct_sorted(ordered: Tensor) -> Tensor:
    """Number of distinct values in each sorted row (int64, one per row)."""
    return (ordered[..., 1:] != ordered[..., :-1]).sum(dim=-1).to(torch.int64) + 1


def per_channel_distinct(x: Tensor) -> Tensor:
    """Number of distinct values in each slice along axis 0 (int64, ``(C,)``)."""
    return distinct_sorted(sort_rows(_channel_rows(x).to(torch.float32)))


def mean(x: Tensor) -> float:
    """Mean of all elements, accumulated in float64 (a float32 sum drifts on large weights).

    Examples
    --------
    >>> mean(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    3.0
    """
    return float(x.detach().to(torch.float64).mean())


def tukey_fences(stats: dict[str, float], k: float = 1.5) -> tuple[float, float]:
    """Tukey's fences ``(q1 - k IQR, q3 + k IQR)`` from :func:`five_numbers` statistics.

    Examples
    --------
    >>> tukey_fences({"q1": 1.0, "q3": 3.0})
    (-2.0, 6.0)
    """
    iqr = stats["q3"] - stats["q1"]
    return stats["q1"] - k * iqr, stats["q3"] + k * iqr


def outlier_fraction_sorted(ordered: Tensor, stats: dict[str, float] | None = None) -> float:
    """Share of an already sorted 1-D tensor's elements outside the Tukey fences of its own quartiles.

    ``stats`` is :func:`five_numbers_sorted` of ``ordered`` when the caller has it already.
    An element on a fence is not an outlier. NaN for an empty tensor.
    """
    n = ordered.numel()
    if n == 0:
        return math.nan
    lo, hi = tukey_fences(five_numbers_sorted(ordered) if stats is None else stats)
    # float64, so that the fences (computed in Python doubles) are not rounded to float32.
    values = ordered.to(torch.float64)
    return float(((values < lo) | (values > hi)).sum()) / n


def outlier_fraction(x: Tensor) -> float:
    """Share of ``x``'s elements outside Tukey's fences ``[q1 - 1.5 IQR, q3 + 1.5 IQR]`` of its quartiles.

    Examples
    --------
    >>> outlier_fraction(torch.tensor([0.0, 1.0, 2.0, 3.0, 100.0]))
    0.2
    """
    return outlier_fraction_sorted(sort_rows(x.detach().to(torch.float32).reshape(1, -1))[0])


def per_channel_range(x: Tensor) -> Tensor:
    """``max - min`` of each slice along axis 0 (float64, ``(C,)``)."""
    rows = _channel_rows(x).to(torch.float64)
    return rows.amax(dim=1) - rows.amin(dim=1)


def per_channel_range_ratio(before: Tensor, after: Tensor) -> Tensor:
    """Per output channel (axis 0), ``(max - min)`` of ``after`` over ``(max - min)`` of ``before`` (float64).

    Below 1, quantization shrank the channel's spread (clipping, or levels rounded to zero);
    above 1, it widened it. NaN where ``before``'s channel is constant: the ratio is undefined.

    Examples
    --------
    >>> per_channel_range_ratio(torch.tensor([[0.0, 4.0], [1.0, 1.0]]), torch.tensor([[0.0, 3.0], [1.0, 1.0]])).tolist()
    [0.75, nan]
    """
    if before.shape != after.shape:
        raise ValueError(f"per_channel_range_ratio: shapes differ, {tuple(before.shape)} and {tuple(after.shape)}")
    spread = per_channel_range(before)
    ratio = per_channel_range(after) / spread
    return torch.where(spread > 0, ratio, torch.full_like(ratio, math.nan))
