"""The integer grids of the three schemes: range -> parameters, values -> codes -> values.

Everything here is a pure tensor function on "rows": a tensor whose last dimension runs
over the elements of one channel, with per-row parameters shaped to broadcast against it
(``scale[..., None]``). Leading dimensions broadcast, which lets the MSE search evaluate
many candidate ranges at once. Formulas follow DESIGN.md "Quantizers".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

EPS = torch.finfo(torch.float32).tiny

# Levels a*2^-k with k beyond this are below float32's smallest subnormal for every
# finite a (a < 2^128), so they all read as zero; capping k keeps tables small for
# pow2 at 9..16 bits without changing any result.
_POW2_MAX_SHIFT = 300


@dataclass(frozen=True)
class Grid:
    """Code range and level layout of one scheme at one bit width.

    Codes are integers in ``[qmin, qmax]``: ``asymmetric`` uses ``[0, 2^b-1]``,
    ``symmetric`` ``[-(2^(b-1)-1), 2^(b-1)-1]`` (or ``-2^(b-1)`` at the bottom when not
    narrow), ``pow2`` ``[-L, L]`` with ``L = 2^(b-1)-1``: code 0 is zero and code ``+-i``
    is the level ``+-a*2^-(L-i)``, so codes grow with the value like the affine ones.
    """

    scheme: str
    bits: int
    qmin: int
    qmax: int

    @classmethod
    def make(cls, scheme: str, bits: int, narrow_range: bool = True) -> Grid:
        half = 2 ** (bits - 1)
        if scheme == "asymmetric":
            return cls(scheme, bits, 0, 2**bits - 1)
        if scheme == "symmetric":
            return cls(scheme, bits, -(half - 1) if narrow_range else -half, half - 1)
        if scheme == "pow2":
            return cls(scheme, bits, -(half - 1), half - 1)
        raise ValueError(f"unknown scheme {scheme!r}")

    @property
    def pow2_levels(self) -> int:
        """``L``: number of nonzero magnitudes of the pow2 grid."""
        return self.qmax

    def params(self, lo: Tensor, hi: Tensor, pow2_scale: bool = False) -> tuple[Tensor, Tensor]:
        """Scale (float32) and zero point (int32) for the clip range ``[lo, hi]`` with ``lo <= 0 <= hi``.

        For ``pow2`` the "scale" is ``a``, the largest level.
        """
        if self.scheme == "asymmetric":
            # Same expressions, in the same order, as torch.ao's MinMaxObserver, so the
            # parameters agree with it bit for bit.
            scale = torch.clamp((hi - lo) / float(self.qmax - self.qmin), min=EPS)
            zero_point = self.qmin - torch.round(lo / scale).to(torch.int32)
            return scale, torch.clamp(zero_point, self.qmin, self.qmax)
        amax = torch.maximum(-lo, hi)
        zero_point = torch.zeros(amax.shape, dtype=torch.int32, device=amax.device)
        if self.scheme == "symmetric":
            # max(amax/qmax, eps) rather than max(amax, eps)/qmax: the latter can be a
            # subnormal whose reciprocal overflows to inf (and 0*inf is NaN).
            return torch.clamp(amax / float(self.qmax), min=EPS), zero_point
        a = torch.clamp(amax, min=EPS)
        return (_round_up_pow2(a) if pow2_scale else a), zero_point

    def quantize(self, x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        """int32 codes of ``x`` (float32) for per-row ``scale`` / ``zero_point`` shaped ``(..., 1)``."""
        if self.scheme == "pow2":
            index = _pow2_index(x.abs(), scale, self.pow2_levels)
            return (torch.sign(x).to(torch.int32) * index).to(torch.int32)
        # round(x * (1/s)) with the reciprocal in float32, then clamp, exactly as
        # torch.fake_quantize_per_*_affine do; clamping the step before adding z is the
        # same integer arithmetic and avoids one pass.
        steps = torch.round(x * torch.reciprocal(scale))
        steps.clamp_(min=(self.qmin - zero_point).to(steps.dtype), max=(self.qmax - zero_point).to(steps.dtype))
        return steps.add_(zero_point).to(torch.int32)

    def dequantize(self, codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        """float32 values of int codes, parameters broadcasting as in :meth:`quantize`."""
        if self.scheme == "pow2":
            magnitude = _pow2_magnitude(codes.abs(), scale, self.pow2_levels)
            return magnitude * torch.sign(codes).to(magnitude.dtype)
        return (codes - zero_point).to(torch.float32) * scale

    def levels(self, scale: Tensor, zero_point: Tensor) -> Tensor:
        """Every representable value, ascending, along a new last dimension ``qmax-qmin+1``."""
        codes = torch.arange(self.qmin, self.qmax + 1, dtype=torch.int32, device=scale.device)
        return self.dequantize(codes, scale, zero_point)


def _round_up_pow2(a: Tensor) -> Tensor:
    # frexp is exact: a = m * 2^e with m in [0.5, 1); a is a power of two iff m == 0.5.
    mantissa, exponent = torch.frexp(a)
    return torch.where(mantissa == 0.5, a, torch.ldexp(torch.ones_like(a), exponent))


def _exact_pow2_f64(shift: Tensor) -> Tensor:
    """``2.0**-shift`` in float64, built from the exponent bits so it is exact."""
    shift = shift.to(torch.int64).clamp(0, _POW2_MAX_SHIFT)
    return ((1023 - shift) << 52).view(torch.float64)


def _pow2_magnitude(index: Tensor, a: Tensor, levels: int) -> Tensor:
    """``fl32(a * 2^-(L-index))`` for index >= 1, 0 for index 0 (one rounding, in float64)."""
    exact = a.to(torch.float64) * _exact_pow2_f64(levels - index)
    return torch.where(index > 0, exact.to(torch.float32), 0.0)


def _pow2_thresholds(a: Tensor, levels: int) -> tuple[Tensor, int]:
    """Decision thresholds between adjacent magnitudes, ascending, as float32 rounded up.

    The midpoints are ``a*2^-L`` (between 0 and the smallest level) and ``0.75*a*2^-k``
    (between ``a*2^-k`` and ``a*2^-(k+1)``). For a float32 ``v`` and a real ``m``,
    ``v >= m`` iff ``v >= roundup32(m)``, so comparing with the rounded-up thresholds is
    the exact nearest-level decision (ties go to the larger magnitude). Thresholds below
    every float32 are not materialized: they are returned as a count, passed by any v > 0.
    """
    a64 = a.to(torch.float64)
    kept = min(levels - 1, _POW2_MAX_SHIFT - 1)  # how many 0.75*a*2^-k thresholds to build
    shifts = torch.arange(kept - 1, -1, -1, device=a.device)
    exact = 0.75 * a64 * _exact_pow2_f64(shifts)
    collapsed = levels - 1 - kept
    if collapsed == 0:
        exact = torch.cat([a64 * _exact_pow2_f64(torch.tensor(levels, device=a.device)), exact], dim=-1)
    else:
        collapsed += 1  # the bottom threshold a*2^-L is among the collapsed ones
    rounded = exact.to(torch.float32)
    rounded = torch.where(rounded.to(torch.float64) < exact, torch.nextafter(rounded, torch.tensor(torch.inf)), rounded)
    return rounded, collapsed


def _pow2_index(ax: Tensor, a: Tensor, levels: int) -> Tensor:
    """Magnitude index in ``[0, L]`` of the nearest pow2 level to ``ax = |x|`` (int32)."""
    thresholds, collapsed = _pow2_thresholds(a, levels)
    shape = torch.broadcast_shapes(ax.shape[:-1], thresholds.shape[:-1])
    thresholds = thresholds.expand(*shape, thresholds.shape[-1]).contiguous()
    values = ax.expand(*shape, ax.shape[-1]).contiguous()
    index = torch.searchsorted(thresholds, values, right=True, out_int32=True)
    if collapsed:
        index += (values > 0).to(torch.int32) * collapsed
    return index
