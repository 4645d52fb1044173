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
