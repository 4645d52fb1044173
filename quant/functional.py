"""Quantization of single tensors: choose parameters, quantize, dequantize, fake-quantize.

Pure tensor functions (no ``nn.Module`` here). Per-channel means one set of parameters
per slice along axis 0 (output channels of Conv/Linear weights). Arithmetic is float32,
as in DESIGN.md "Quantizers"; for ``asymmetric`` and ``symmetric`` the values equal
``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine``
bit for bit given the same scale and zero point.

Idempotence: ``quantize(dequantize(codes, params), params)`` gives back the same values
exactly (reusing the parameters). Re-choosing parameters from ``Q(x)`` gives ``Q(x)``
again exactly for ``pow2`` (``a`` is itself a level) and ``binary`` (the float64 mean of
``n`` copies of ``a`` is ``a``; on MPS, which has no float64, to a float32 step); for the
affine schemes the fresh scale is computed from float32-rounded extremes and can differ
in its last bit, so ``Q(Q(x))`` then matches ``Q(x)`` to a few float32 steps of the scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quant.clipping import binary_scale
from quant.errors import QuantError
from quant.ranges import clip_range
from quant.schemes import Grid
from quant.spec import QuantSpec

#: One quantized tensor: its integer codes and the parameters that give them values.
Quantized = tuple[Tensor, "QParams"]


@dataclass(frozen=True, eq=False)
class QParams:
    """Parameters that map integer codes to values.

    Attributes
    ----------
    scheme : str
        ``"asymmetric"``, ``"symmetric"``, ``"pow2"`` or ``"binary"``.
    bits : int
        Code width; every code lies in ``[qmin, qmax]``, at most ``2**bits`` values.
    scale : Tensor
        float32, shape ``(C,)`` per channel or ``()`` per tensor. For ``pow2`` it is
        ``a``, the largest level magnitude; for ``binary`` the level ``a`` of ``{-a, +a}``.
    zero_point : Tensor
        int32, same shape as ``scale`` (always 0 for ``symmetric``, ``pow2`` and ``binary``).
    qmin, qmax : int
        Code range. For ``pow2`` it is ``[-L, L]``, ``L = 2^(bits-1)-1``: code 0 is
        zero, code ``+-i`` the level ``+-a * 2^-(L-i)``. For ``binary`` it is ``[0, 1]``:
        code 0 is ``-a``, code 1 is ``+a``.
    axis : int or None
        0 for per-channel parameters, None for per-tensor.

    Examples
    --------
    >>> p = choose_qparams(torch.tensor([[-1.0, 1.0], [0.0, 2.0]]), QuantSpec(scheme="pow2", bits=3))
    >>> p.qmin, p.qmax, p.axis
    (-3, 3, 0)
    >>> p.levels()[1]
    tensor([-2.0000, -1.0000, -0.5000,  0.0000,  0.5000,  1.0000,  2.0000])
    """

    scheme: str
    bits: int
    scale: Tensor
    zero_point: Tensor
    qmin: int
    qmax: int
    axis: int | None

    @property
    def grid(self) -> Grid:
        return Grid(self.scheme, self.bits, self.qmin, self.qmax)

    def levels(self) -> Tensor:
        """Every representable value, ascending: ``(C, n)`` per channel, ``(n,)`` per tensor."""
        return self.grid.levels(self.scale[..., None], self.zero_point[..., None])

    def to(self, device: torch.device | str) -> QParams:
        """The same parameters on another device."""
        return QParams(self.scheme, self.bits, self.scale.to(device), self.zero_point.to(device), self.qmin, self.qmax, self.axis)


def _rows(x: Tensor, per_channel: bool) -> Tensor:
    """``x`` as float32 rows: ``(C, N)`` per channel (axis 0), ``(1, N)`` per tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise QuantError(f"expected a floating-point tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise QuantError(f"cannot quantize an empty tensor (shape {tuple(x.shape)})")
    rows = x.detach().to(torch.float32)
    return rows.reshape(x.shape[0], -1) if per_channel and x.dim() > 0 else rows.reshape(1, -1)


def _param_view(params: QParams, x: Tensor) -> tuple[Tensor, Tensor]:
    """Scale and zero point shaped to broadcast against ``x``'s rows."""
    expected = x.shape[0] if params.axis == 0 else 1
    if params.scale.numel() != expected:
        raise ValueError(
            f"parameters hold {params.scale.numel()} channel(s) but the tensor of shape {tuple(x.shape)} "
            f"has {expected} along axis {params.axis}"
        )
    return params.scale.reshape(-1, 1), params.zero_point.reshape(-1, 1)


def choose_qparams(x: Tensor, spec: QuantSpec) -> QParams:
    """Quantization parameters of ``x`` under ``spec`` (range from ``spec.clipping``).

    Parameters
    ----------
    x : Tensor
        Floating-point tensor; per channel uses axis 0. A 0-d tensor is per tensor.
    spec : QuantSpec

    Returns
    -------
    QParams

    Raises
    ------
    QuantError
        If ``x`` is empty, not floating point, holds NaN/Inf, or its range overflows float32.

    Examples
    --------
    >>> p = choose_qparams(torch.tensor([-1.0, 0.0, 2.0]), QuantSpec(bits=2, granularity="per_tensor"))
    >>> p.scale, p.zero_point
    (tensor(1.), tensor(1, dtype=torch.int32))
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    per_channel = spec.granularity == "per_channel" and x.dim() > 0
    rows = _rows(x, per_channel)
    grid = Grid.make(spec.scheme, spec.bits, spec.narrow_range)
    if grid.scheme == "binary":
        # No range to set: a = mean|x|, the least-squares level (minmax and mse alike).
        scale = binary_scale(rows)
        zero_point = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
    else:
        lo, hi = clip_range(rows, spec, grid)
        scale, zero_point = grid.params(lo, hi, spec.pow2_scale)
    if not torch.isfinite(scale).all():
        raise QuantError("the tensor's range overflows float32 (max - min is above 3.4e38); rescale it first")
    if not per_channel:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    return QParams(spec.scheme, spec.bits, scale, zero_point, grid.qmin, grid.qmax, 0 if per_channel else None)


def quantize(x: Tensor, spec: QuantSpec | QParams) -> Quantized:
    """Integer codes of ``x``, with the parameters that decode them.

    Parameters
    ----------
    x : Tensor
        Floating-point tensor.
    spec : QuantSpec or QParams
        A spec (parameters are chosen from ``x``), or fixed parameters to reuse.

    Returns
    -------
    codes : Tensor
        Same shape as ``x``, in ``[params.qmin, params.qmax]``, in the smallest integer
        dtype holding that range: uint8 (asymmetric <= 8 bits, binary), int8 (symmetric,
        pow2 <= 8 bits), int16, or int32 (asymmetric 16 bits).
    params : QParams

    Examples
    --------
    >>> codes, p = quantize(torch.tensor([-1.0, 0.0, 0.4, 2.0]), QuantSpec(bits=2, granularity="per_tensor"))
    >>> codes
    tensor([0, 1, 1, 3], dtype=torch.uint8)
    >>> dequantize(codes, p)
    tensor([-1.,  0.,  0.,  2.])
    """
    if isinstance(spec, QParams):
        params = spec
        rows = _rows(x, params.axis == 0)
        if not torch.isfinite(rows).all():
            raise QuantError("tensor contains NaN or Inf values; only finite values can be quantized")
    else:
        params = choose_qparams(x, spec)
        rows = _rows(x, params.axis == 0)
    scale, zero_point = _param_view(params, x)
    return params.grid.quantize(rows, scale, zero_point).reshape(x.shape), params


def dequantize(codes: Tensor, params: QParams) -> Tensor:
    """float32 values of ``codes`` (as returned by :func:`quantize`).

    Examples
    --------
    >>> p = choose_qparams(torch.tensor([0.0, 3.0]), QuantSpec(bits=2, granularity="per_tensor"))
    >>> dequantize(torch.tensor([0, 1, 2, 3], dtype=torch.uint8), p)
    tensor([0., 1., 2., 3.])
    """
    if codes.is_floating_point():
        raise QuantError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    scale, zero_point = _param_view(params, codes)
    rows = codes.reshape(scale.shape[0], -1) if codes.dim() > 0 else codes.reshape(1, 1)
    return params.grid.dequantize(rows, scale, zero_point).reshape(codes.shape)


def fake_quantize(x: Tensor, spec: QuantSpec | QParams) -> Tensor:
    """``dequantize(*quantize(x, spec))``: ``x`` rounded onto its grid, in ``x``'s dtype.

    Examples
    --------
    >>> fake_quantize(torch.tensor([0.1, 0.9, 2.0]), QuantSpec(bits=2, granularity="per_tensor"))
    tensor([0.0000, 0.6667, 2.0000])
    """
    codes, params = quantize(x, spec)
    return dequantize(codes, params).to(x.dtype)


def quantize_residual(x: Tensor, spec: QuantSpec, terms: int = 2) -> tuple[Quantized, ...]:
    """Multi-tensor quantization: ``x ~= Q1(x) + Q2(x - Q1(x)) + ...``, each term at ``spec``.

    Each term quantizes what the previous ones left over, so the error never grows
    (0 is always a level, and each element goes to its nearest level; for ``binary``,
    ``a = mean|r|`` lowers ``||r||^2`` by ``n a^2`` per channel, to within the float32
    rounding of ``a``).

    Examples
    --------
    >>> x = torch.tensor([[0.1, 0.35, 0.8, -0.6]])
    >>> one = fake_quantize(x, QuantSpec(bits=2))
    >>> two = dequantize_sum(quantize_residual(x, QuantSpec(bits=2)))
    >>> bool(((two - x) ** 2).sum() <= ((one - x) ** 2).sum())
    True
    """
    if isinstance(terms, bool) or not isinstance(terms, int) or terms < 1:
        raise ValueError(f"terms={terms!r} is invalid; allowed: an integer >= 1")
    parts: list[Quantized] = []
    approx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    target = x.detach().to(torch.float32)
    for _ in range(terms):
        codes, params = quantize(target - approx, spec)
        parts.append((codes, params))
        approx = approx + dequantize(codes, params)
    return tuple(parts)


def dequantize_sum(parts: tuple[Quantized, ...] | list[Quantized]) -> Tensor:
    """Sum of the dequantized terms of :func:`quantize_residual`, added in order (float32)."""
    total = dequantize(*parts[0])
    for codes, params in parts[1:]:
        total = total + dequantize(codes, params)
    return total
