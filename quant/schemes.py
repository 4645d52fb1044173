"""The integer grids of the schemes: range -> parameters, values -> codes -> values.

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


@dataclass(frozen=True)
class Grid:
    """Code range and level layout of one scheme at one bit width.

    Codes are integers in ``[qmin, qmax]``: ``asymmetric`` uses ``[0, 2^b-1]``,
    ``symmetric`` ``[-(2^(b-1)-1), 2^(b-1)-1]`` (or ``-2^(b-1)`` at the bottom when not
    narrow), ``pow2`` ``[-L, L]`` with ``L = 2^(b-1)-1``: code 0 is zero and code ``+-i``
    is the level ``+-a*2^-(L-i)``, so codes grow with the value like the affine ones.
    ``binary`` (1 bit) ``[0, 1]``: code 0 is ``-a`` and code 1 is ``+a`` (the "scale" is
    ``a``, the zero point 0), so the codes pack at one bit with no offset; a value goes
    to ``+a`` when it is ``>= 0`` (``sign(0) := +1``, ``-0.0`` included), else to ``-a``.
    Codes are stored in the smallest integer dtype holding ``[qmin, qmax]``.
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
        if scheme == "binary":
            if bits != 1:
                raise ValueError(f"scheme 'binary' has 1-bit codes, got bits={bits}")
            return cls(scheme, 1, 0, 1)
        raise ValueError(f"unknown scheme {scheme!r}")

    @property
    def code_dtype(self) -> torch.dtype:
        for dtype in (torch.uint8, torch.int8, torch.int16):
            info = torch.iinfo(dtype)
            if info.min <= self.qmin and self.qmax <= info.max:
                return dtype
        return torch.int32

    def params(self, lo: Tensor, hi: Tensor, pow2_scale: bool = False) -> tuple[Tensor, Tensor]:
        """Scale (float32) and zero point (int32) for the clip range ``[lo, hi]`` with ``lo <= 0 <= hi``.

        For ``pow2`` the "scale" is ``a``, the largest level. ``binary`` has no range to
        map: its ``a`` comes from the values (:func:`quant.clipping.binary_scale`).
        """
        if self.scheme == "binary":
            raise ValueError("the binary scale a is chosen from the values (quant.clipping.binary_scale), not from a range")
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
        """Integer codes of ``x`` (float32) for per-row ``scale`` / ``zero_point`` shaped ``(..., 1)``."""
        if self.scheme == "pow2":
            return _pow2_codes(x, scale, self.qmax).to(self.code_dtype)
        if self.scheme == "binary":
            # a > 0, so the nearest of {-a, +a} is the sign; codes broadcast against the parameters as the others do.
            codes = torch.ge(x, 0.0).to(self.code_dtype)
            shape = torch.broadcast_shapes(x.shape, scale.shape)
            return codes if codes.shape == shape else codes.expand(shape).clone()
        # round(x * (1/s)) with the reciprocal in float32, then clamp, exactly as
        # torch.fake_quantize_per_*_affine do; clamping the step before adding z is the
        # same integer arithmetic.
        steps = x * torch.reciprocal(scale)
        steps.round_()
        steps.clamp_(min=(self.qmin - zero_point).to(steps.dtype), max=(self.qmax - zero_point).to(steps.dtype))
        return steps.add_(zero_point).to(self.code_dtype)

    def dequantize(self, codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        """float32 values of integer codes, parameters broadcasting as in :meth:`quantize`."""
        if self.scheme == "pow2":
            table = _pow2_table(scale, self.qmax)
            index = codes.to(torch.int64).add_(self.qmax)
            return torch.gather(table.expand(*index.shape[:-1], table.shape[-1]), -1, index)
        if self.scheme == "binary":
            # 2q - 1 is exactly -1 or +1, so the values are exactly -a and +a.
            return codes.to(torch.float32).mul(2.0).sub_(1.0) * scale
        values = codes.to(torch.float32)
        if torch.broadcast_shapes(values.shape, scale.shape) != values.shape:
            return (values - zero_point) * scale
        # (q - z) * s: q - z is an exact small integer in float32, as in torch's kernel.
        return values.sub_(zero_point).mul_(scale)

    def levels(self, scale: Tensor, zero_point: Tensor) -> Tensor:
        """Every representable value, ascending, along a new last dimension of ``qmax-qmin+1``."""
        if self.scheme == "pow2":
            return _pow2_table(scale, self.qmax)
        codes = torch.arange(self.qmin, self.qmax + 1, dtype=torch.int32, device=scale.device)
        return self.dequantize(codes, scale, zero_point)


def _round_up_pow2(a: Tensor) -> Tensor:
    # frexp is exact: a = m * 2^e with m in [0.5, 1); a is a power of two iff m == 0.5.
    mantissa, exponent = torch.frexp(a)
    return torch.where(mantissa == 0.5, a, torch.ldexp(torch.ones_like(a), exponent))


def _pow2_magnitudes(a: Tensor, levels: int) -> Tensor:
    """``a * 2^-k`` for ``k = L-1, ..., 0`` (ascending), exact in float64."""
    shifts = torch.arange(levels - 1, -1, -1, device=a.device, dtype=torch.int64)
    powers = ((1023 - shifts) << 52).view(torch.float64)  # 2^-k from the exponent bits: exact
    return a.to(torch.float64) * powers


def _pow2_table(a: Tensor, levels: int) -> Tensor:
    """The ``2L+1`` pow2 values per row, ascending: ``-a, ..., -a*2^-(L-1), 0, a*2^-(L-1), ..., a``.

    Each is ``a * 2^-k`` rounded once to float32 (exact unless it is subnormal).
    """
    positive = _pow2_magnitudes(a, levels).to(torch.float32)
    zero = torch.zeros((*positive.shape[:-1], 1), dtype=torch.float32, device=a.device)
    return torch.cat([-positive.flip(-1), zero, positive], dim=-1)


def _round_up_f32(exact: Tensor) -> Tensor:
    """The smallest float32 >= each float64 value."""
    nearest = exact.to(torch.float32)
    return torch.where(nearest.to(torch.float64) < exact, torch.nextafter(nearest, torch.full_like(nearest, torch.inf)), nearest)


def _pow2_codes(x: Tensor, a: Tensor, levels: int) -> Tensor:
    """Signed pow2 codes (int32) of float32 ``x``: nearest level in the linear domain.

    The decision thresholds between magnitudes are ``a*2^-L`` (between 0 and the
    smallest level) and ``T_k = 0.75*a*2^-k`` (between ``a*2^-k`` and ``a*2^-(k+1)``).
    For a float32 ``v`` and a real ``m``, ``v >= m`` iff ``v >= roundup32(m)``, and
    ``roundup32(0.75*a*2^-k) = roundup32(0.75*a) * 2^-k`` while it stays normal. The bit
    pattern of a non-negative float is monotone in its value and the one of ``T * 2^-k``
    is ``bits(T) - k*2^23``, so the number of thresholds ``T_k <= |x|`` is
    ``clamp(L-1 + (bits(|x|) - bits(T_0)) >> 23, 0, L-1)``: exact, vectorized, no search.
    Rows whose smallest threshold would be subnormal are first scaled by a power of two
    (exact; a value pushed to inf is beyond ``a`` and still gets the top code). Ties go
    to the larger magnitude on both sides, so ``Q(-x) = -Q(x)``.
    """
    exponent = torch.bitwise_right_shift(a.view(torch.int32), 23)  # a >= EPS is normal
    shift = torch.clamp(levels + 1 - exponent, min=0)
    if bool(shift.any()):
        factor = torch.bitwise_left_shift(shift + 127, 23).view(torch.float32)  # 2^shift, exact
        x, a = x * factor, a * factor
    t0 = _round_up_f32(a.to(torch.float64) * 0.75).view(torch.int32)
    bottom = a.view(torch.int32) - (levels << 23)  # bits of a*2^-L, normal by construction
    bits = x.contiguous().view(torch.int32)
    negative = torch.bitwise_right_shift(bits, 31)  # -1 where the sign bit is set, else 0
    magnitude = torch.bitwise_and(bits, 0x7FFFFFFF)
    count = torch.bitwise_right_shift(magnitude - t0, 23)
    count.add_(levels - 1).clamp_(0, levels - 1)
    count.add_(magnitude >= bottom)
    # Two's-complement negation where negative: (c ^ -1) - (-1) = -c.
    return count.bitwise_xor_(negative).sub_(negative)
