"""Error and distribution statistics of a tensor and its quantized version (pure functions)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from quant.clipping import sort_rows


def squared_error(x: Tensor, x_hat: Tensor) -> float:
    """``sum((x - x_hat)^2)`` accumulated in float64."""
    diff = (x.detach().to(torch.float64) - x_hat.detach().to(torch.float64)).reshape(-1)
    return float(torch.dot(diff, diff))


def sqnr_db(x: Tensor, x_hat: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - x_hat)^2)`` in dB.

    ``inf`` when the error is zero (including an all-zero ``x`` reproduced exactly);
    ``-inf`` when ``x`` is all zero but ``x_hat`` is not.

    Examples
    --------
    >>> round(sqnr_db(torch.tensor([1.0, -1.0]), torch.tensor([0.5, -1.0])), 3)
    9.031
    """
    signal = x.detach().to(torch.float64).reshape(-1)
    noise = squared_error(x, x_hat)
    power = float(torch.dot(signal, signal))
    if noise == 0.0:
        return math.inf
    if power == 0.0:
        return -math.inf
    return 10.0 * math.log10(power / noise)


def five_numbers(x: Tensor) -> dict[str, float]:
    """min, Q1, median, Q3, max (linear interpolation, numpy's default), from one sort.

    Examples
    --------
    >>> five_numbers(torch.arange(5.0))
    {'min': 0.0, 'q1': 1.0, 'median': 2.0, 'q3': 3.0, 'max': 4.0}
    """
    ordered = sort_rows(x.detach().to(torch.float32).reshape(1, -1))[0].to(torch.float64)
    n = ordered.numel()

    def at(q: float) -> float:
        pos = q * (n - 1)
        below = math.floor(pos)
        above = min(below + 1, n - 1)
        return float(ordered[below] + (pos - below) * (ordered[above] - ordered[below]))

    return {"min": at(0.0), "q1": at(0.25), "median": at(0.5), "q3": at(0.75), "max": at(1.0)}


def per_channel_zero_fraction(x: Tensor) -> Tensor:
    """Fraction of exact zeros in each slice along axis 0 (float64, ``(C,)``)."""
    rows = x.detach().reshape(x.shape[0], -1) if x.dim() > 0 else x.detach().reshape(1, 1)
    return (rows == 0).to(torch.float64).mean(dim=1)


def per_channel_distinct(x: Tensor) -> Tensor:
    """Number of distinct values in each slice along axis 0 (int64, ``(C,)``)."""
    rows = x.detach().to(torch.float32)
    rows = rows.reshape(rows.shape[0], -1) if rows.dim() > 0 else rows.reshape(1, 1)
    ordered = sort_rows(rows)
    return (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1).to(torch.int64) + 1
