"""GPTQ/OPTQ primitives: im2col inputs, the layer-input Hessian, and error-feedback rounding.

GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") rounds a weight matrix ``W`` (``out x cols``) onto a fixed grid
so that the layer output on calibration inputs ``X`` (``N x cols``) moves little:
it minimizes ``||(W - Wq) X^T||^2 = sum_r (w_r - q_r)^T H (w_r - q_r) / (2/N)`` with
``H = (2/N) X^T X``. Columns are rounded one at a time; the rounding error of column
``i`` is pushed onto the columns not yet rounded through row ``i`` of ``U``, the upper
Cholesky factor of ``H^-1`` (the optimal-brain-quantizer update), with lazy block
updates, dampening of ``H`` and, optionally, columns in descending ``diag(H)`` order.

Everything here works on one layer; the module walking (which inputs, in which order)
lives in the caller. Convolutions become matrices through :func:`input_columns`
(im2col), whose columns are in the order of ``weight.reshape(out, -1)`` per group.

Examples
--------
>>> import torch
>>> import torch.nn as nn
>>> from quant import QuantSpec, choose_qparams
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> layer = nn.Linear(8, 4)
>>> acc = HessianAccumulator(layer)
>>> acc.add(torch.randn(32, 8))
>>> params = choose_qparams(layer.weight, QuantSpec(bits=2))
>>> codes = gptq_codes(layer.weight, acc.hessian[0], params)
>>> codes.shape, codes.dtype
(torch.Size([4, 8]), torch.uint8)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from quant import _validate as check
from quant.errors import QuantError
from quant.functional import QParams
from quant.schemes import Grid, _round_up_f32

#: Layer types whose input GPTQ can turn into columns.
SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

# A failed damped Cholesky is retried with ten times the damping this many times; when
# damp is 0 the first retry uses _FIRST_RETRY_DAMP.
_DAMP_RETRIES = 4
_FIRST_RETRY_DAMP = 1e-4

_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


# ------------------------------------------------------------------ im2col and the Hessian


def _check_layer(layer: nn.Module) -> None:
    if not isinstance(layer, SUPPORTED_LAYERS):
        raise QuantError(
            f"GPTQ supports nn.Linear, nn.Conv1d, nn.Conv2d and nn.Conv3d layers, got {type(layer).__name__}"
        )


def _groups(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.Linear) else layer.groups


def _pad_pairs(layer: nn.modules.conv._ConvNd) -> list[tuple[int, int]]:
    """(before, after) padding of each spatial dim, exactly as the layer pads its input."""
    if layer.padding == "valid":
        return [(0, 0)] * len(layer.kernel_size)
    if layer.padding == "same":
        # torch puts the odd leftover of d*(k-1) after the input (see _ConvNd.__init__).
        totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in layer.padding]


def input_columns(layer: nn.Module, x: Tensor) -> Tensor:
    """im2col of a layer's input batch: the rows that the layer multiplies by its weight.

    Parameters
    ----------
    layer : nn.Linear, nn.Conv1d, nn.Conv2d or nn.Conv3d
    x : Tensor
        The input exactly as the layer receives it: ``(..., in_features)`` for Linear,
        ``(B, C, *spatial)`` or unbatched ``(C, *spatial)`` for a convolution.

    Returns
    -------
    Tensor
        float32, ``(groups, rows, cols)``: for group ``g``, row ``r`` is one output
        position's receptive field, its columns in the order of
        ``layer.weight[g*out_g:(g+1)*out_g].reshape(out_g, -1)``, so that
        ``cols[g] @ W_g.T`` is the layer output without bias at those positions (rows
        run over batch, then output positions in row-major order). Stride, dilation,
        groups, padding (ints, ``"same"``, ``"valid"``) and every ``padding_mode`` are
        honoured. Linear: ``groups = 1`` and ``x`` reshaped to ``(-1, in_features)``.
        The result is a transposed view of a ``(groups, cols, rows)`` buffer (the
        layout in which ``X^T X`` is fastest); call ``.contiguous()`` if needed.

    Raises
    ------
    QuantError
        For an unsupported layer type, or an input whose shape the layer would reject.

    Examples
    --------
    >>> conv = nn.Conv1d(2, 3, kernel_size=2, bias=False)
    >>> x = torch.arange(8.0).reshape(1, 2, 4)
    >>> cols = input_columns(conv, x)
    >>> cols.shape
    torch.Size([1, 3, 4])
    >>> cols[0, 0]  # channel 0 at positions 0-1, then channel 1 at positions 0-1
    tensor([0., 1., 4., 5.])
    >>> torch.allclose((cols[0] @ conv.weight.reshape(3, -1).T).T, conv(x)[0])
    True
    """
    return _columns_t(layer, x).transpose(1, 2)


def _columns_t(layer: nn.Module, x: Tensor) -> Tensor:
    """:func:`input_columns` transposed: ``(groups, cols, rows)`` float32."""
    _check_layer(layer)
    if not isinstance(x, Tensor):
        raise TypeError(f"the layer input must be a torch.Tensor, got {type(x).__name__}")
    x = x.detach()
    if isinstance(layer, nn.Linear):
        if x.dim() == 0 or x.shape[-1] != layer.in_features:
            raise QuantError(
                f"input of shape {tuple(x.shape)} does not fit nn.Linear({layer.in_features}, ...): "
                f"its last dimension must be {layer.in_features}"
            )
        return x.reshape(-1, layer.in_features).to(torch.float32).T[None]

    spatial = len(layer.kernel_size)
    if x.dim() == spatial + 1:
        x = x.unsqueeze(0)
    if x.dim() != spatial + 2 or x.shape[1] != layer.in_channels:
        raise QuantError(
            f"input of shape {tuple(x.shape)} does not fit {type(layer).__name__} with {layer.in_channels} "
            f"input channels: expected (batch, {layer.in_channels}, {spatial} spatial dims) or unbatched"
        )
    x = x.to(torch.float32)
    pairs = _pad_pairs(layer)
    if any(before or after for before, after in pairs):
        flat = [p for pair in reversed(pairs) for p in pair]  # F.pad lists the last dim first
        x = F.pad(x, flat, mode=_PAD_MODES[layer.padding_mode])
    for dim, (k, s, d) in enumerate(zip(layer.kernel_size, layer.stride, layer.dilation)):
        span = d * (k - 1) + 1
        if x.shape[2 + dim] < span:
            raise QuantError(
                f"input of shape {tuple(x.shape)} (after padding) is smaller than the dilated kernel "
                f"{span} along spatial dim {dim} of {type(layer).__name__}"
            )
        # Each unfold appends the window as a new last dim; ::d keeps the dilated taps.
        x = x.unfold(2 + dim, span, s)
        if d > 1:
            x = x[..., ::d]
    # (B, C, *out, *k) -> (C, *k, B, *out): weight order down, rows across. This copy reads
    # the input almost sequentially (about twice as fast as the (rows, cols) order).
    order = (1, *range(2 + spatial, 2 + 2 * spatial), 0, *range(2, 2 + spatial))
    per_group = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
    return x.permute(order).reshape(layer.groups, per_group, -1)


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


class HessianAccumulator:
    """Running ``H = (2/N) * sum_rows x x^T`` of one layer's input columns, per group.

    Fed one batch at a time; ``N`` counts the im2col rows seen. Each batch's ``X^T X`` is
    a float32 matrix product (on CPU about 8x faster than float64; its relative error,
    around 1e-6, is far below GPTQ's 1% damping), and the batches are summed in float64
    (float32 on MPS, which has no float64) on the layer's device.

    Parameters
    ----------
    layer : nn.Linear, nn.Conv1d, nn.Conv2d or nn.Conv3d

    Examples
    --------
    >>> acc = HessianAccumulator(nn.Linear(2, 1))
    >>> acc.add(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
    >>> acc.hessian, acc.rows
    (tensor([[[2., 2.],
             [2., 4.]]], dtype=torch.float64), 2)
    """

    def __init__(self, layer: nn.Module) -> None:
        _check_layer(layer)
        self.layer = layer
        cols = layer.weight[0].numel()
        device = layer.weight.device
        self._sum = torch.zeros((_groups(layer), cols, cols), dtype=_accumulator_dtype(device), device=device)
        self._rows = 0

    def add(self, x: Tensor) -> None:
        """Add one input batch ``x`` (the layer's raw input, as in :func:`input_columns`).

        Raises
        ------
        QuantError
            If ``x`` does not fit the layer or holds NaN/Inf.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"the layer input must be a torch.Tensor, got {type(x).__name__}")
        cols_t = _columns_t(self.layer, x.to(self._sum.device))
        gram = torch.bmm(cols_t, cols_t.transpose(1, 2))
        # NaN/Inf in x always reaches the product; checking the small product is cheap.
        if not torch.isfinite(gram).all():
            raise QuantError("the layer input holds NaN or Inf values (or overflows float32); the Hessian needs finite inputs")
        self._sum += gram
        self._rows += cols_t.shape[2]

    @property
    def rows(self) -> int:
        """Number of im2col rows (samples times output positions) added so far."""
        return self._rows

    @property
    def hessian(self) -> Tensor:
        """``(groups, cols, cols)`` Hessian ``(2/N) X^T X`` of the rows added so far."""
        if self._rows == 0:
            raise QuantError("no input was added to the HessianAccumulator; call add() with calibration batches first")
        return self._sum * (2.0 / self._rows)


# ------------------------------------------------------------------ GPTQ


@dataclass(frozen=True)
class GPTQOptions:
    """Settings of :func:`gptq_codes`; validates itself on construction.

    Parameters
    ----------
    damp : float, default 0.01
        Fraction of ``mean(diag H)`` added to the diagonal of ``H`` before inverting,
        in [0, 1].
    block_size : int, default 128
        Columns per lazy batch update, in [1, 2**31 - 1]; changes speed, not the result
        (beyond float rounding).
    act_order : bool, default True
        Round columns in descending ``diag(H)`` order (inputs with most energy first).
    rtn_fallback : bool, default False
        Per output channel, keep round-to-nearest's codes where their output error
        ``(w - q)^T H (w - q)`` (undamped ``H``) is smaller than GPTQ's. GPTQ is greedy
        and its error feedback can push weights past the clipped range, so on its own it
        loses to round to nearest on some channels (more often at 2 bits); with this,
        the result is never worse than round to nearest on the calibration data, layer
        by layer. Off by default: on the shipped ResNet-20 at 2 bits (min-max grid,
        1,024 calibration images) it lowered test accuracy from 93.18% to 92.64%, since
        a lower error of one layer on its own is not a lower error of the network.

    Raises
    ------
    ValueError
        Naming the field, the value and the allowed range.

    Examples
    --------
    >>> GPTQOptions(damp=0.1).block_size
    128
    >>> GPTQOptions(block_size=0)
    Traceback (most recent call last):
    ...
    ValueError: GPTQOptions.block_size=0 is invalid; allowed: an integer in [1, 2147483647]
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    rtn_fallback: bool = False

    def __post_init__(self) -> None:
        damp = check.number_in("GPTQOptions", "damp", self.damp, 0.0, 1.0, lo_open=False, hi_open=False)
        object.__setattr__(self, "damp", damp)
        check.int_in("GPTQOptions", "block_size", self.block_size, 1, 2**31 - 1)
        check.boolean("GPTQOptions", "act_order", self.act_order)
        check.boolean("GPTQOptions", "rtn_fallback", self.rtn_fallback)


def _column_params(params: QParams, out: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Scale and zero point shaped ``(out, 1)`` (per channel) or ``(1, 1)`` (per tensor)."""
    if not isinstance(params, QParams):
        raise TypeError(f"params must be a QParams, got {type(params).__name__}")
    expected = out if params.axis == 0 else 1
    if params.scale.numel() != expected:
        raise QuantError(
            f"params hold {params.scale.numel()} channel(s) but the weight has {out} output channels "
            f"(per-channel params need {out}, per-tensor params 1)"
        )
    return params.scale.reshape(-1, 1).to(device), params.zero_point.reshape(-1, 1).to(device)


def _inverse_cholesky(hessian: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp*mean(diag H)*I)^-1`` (float64).

    A factorization that fails is retried with ten times the damping.
    """
    mean_diag = hessian.diagonal().mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    tried = []
    for _ in range(1 + _DAMP_RETRIES):
        tried.append(damp)
        lower, info = torch.linalg.cholesky_ex(hessian + (damp * mean_diag) * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper
        damp = 10 * damp if damp > 0 else _FIRST_RETRY_DAMP
    raise QuantError(
        "GPTQ: the input Hessian is not positive definite even after damping with "
        f"{', '.join(f'{d:g}' for d in tried)} x mean(diag H); check the calibration inputs"
    )


def gptq_codes(weight: Tensor, hessian: Tensor, params: QParams, options: GPTQOptions = GPTQOptions()) -> Tensor:
    """GPTQ integer codes of one weight matrix on the fixed grid ``params``.

    Parameters
    ----------
    weight : Tensor
        ``(out, cols)`` floating point; row ``r`` is output channel ``r``.
    hessian : Tensor
        ``(cols, cols)`` input Hessian ``(2/N) X^T X`` (e.g. ``HessianAccumulator.hessian[g]``).
        Inputs that are always zero (``H_ii == 0``) are dead: their weights are
        treated as 0 (any value gives the same output on these inputs).
    params : QParams
        The grid, chosen beforehand from the whole weight: per channel (one scale per
        row) or per tensor. It is not changed; each column goes to its nearest level.
    options : GPTQOptions

    Returns
    -------
    Tensor
        ``(out, cols)`` codes in ``params.grid.code_dtype``, in the original column order;
        ``dequantize(codes, params)`` gives the quantized weight.

    Raises
    ------
    QuantError
        If shapes do not match, a value is NaN/Inf, or ``H`` stays singular after
        retrying with 10x, 100x, ... the damping.

    Notes
    -----
    Arithmetic is float32 on ``weight``'s device; the Cholesky factorizations are float64
    (on the CPU for an MPS weight).

    Examples
    --------
    Two correlated inputs: column 0 rounds 0.3 down to 0, and GPTQ pushes that error
    onto column 1 (``0.4 + 0.5 * 0.3 = 0.55``), which then rounds up; round to nearest
    would give 0 for both.

    >>> params = QParams("asymmetric", 2, torch.tensor([1.0]), torch.tensor([1], dtype=torch.int32), 0, 3, 0)
    >>> h = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    >>> gptq_codes(torch.tensor([[0.3, 0.4]]), h, params, GPTQOptions(damp=0.0, act_order=False))
    tensor([[1, 2]], dtype=torch.uint8)
    """
    if not isinstance(options, GPTQOptions):
        raise TypeError(f"options must be a GPTQOptions, got {type(options).__name__}")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise QuantError(f"GPTQ needs a 2-D floating-point weight (out, cols), got {_describe(weight)}")
    out, cols = weight.shape
    if weight.numel() == 0:
        raise QuantError(f"GPTQ cannot quantize an empty weight of shape {tuple(weight.shape)}")
    if not isinstance(hessian, Tensor) or tuple(hessian.shape) != (cols, cols):
        raise QuantError(f"the Hessian must have shape ({cols}, {cols}) for a weight with {cols} columns, got {_describe(hessian)}")
    device = weight.device
    w = weight.detach().to(torch.float32).clone()
    if not torch.isfinite(w).all():
        raise QuantError("the weight holds NaN or Inf values; only finite values can be quantized")
    scale, zero_point = _column_params(params, out, device)
    grid = params.grid

    chol_device = torch.device("cpu") if device.type == "mps" else device
    h = hessian.detach().to(device=chol_device, dtype=torch.float64).clone()
    if not torch.isfinite(h).all():
        raise QuantError("the Hessian holds NaN or Inf values; check the calibration inputs")
    dead = h.diagonal() == 0
    if bool(dead.any()):
        h.diagonal()[dead] = 1.0
        w[:, dead.to(device)] = 0.0
    perm = None
    if options.act_order:
        # stable: equal diagonals (e.g. dead inputs) keep their order, so results are reproducible.
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        h = h[perm][:, perm]
        w = w[:, perm.to(device)]
    u = _inverse_cholesky(h, options.damp).to(device=device, dtype=torch.float32)

    round_column = _column_rounder(grid, scale, zero_point)
    steps = torch.empty((out, cols), dtype=torch.float32, device=device)  # code - zero point
    for start in range(0, cols, options.block_size):
        stop = min(start + options.block_size, cols)
        block = w[:, start:stop].clone()
        errors = torch.empty_like(block)
        u_block = u[start:stop, start:stop]
        for i in range(stop - start):
            column = block[:, i : i + 1]
            value, step = round_column(column)
            steps[:, start + i : start + i + 1] = step
            error = (column - value) / u_block[i, i]
            # The OBQ update: move the unrounded columns to compensate for this error.
            block[:, i + 1 :] -= error * u_block[i : i + 1, i + 1 :]
            errors[:, i : i + 1] = error
        # Lazy batch update: the whole block's errors reach the later columns at once.
        w[:, stop:] -= errors @ u[start:stop, stop:]
    if perm is not None:
        steps = steps[:, torch.argsort(perm).to(device)]
    codes = steps.add_(zero_point).to(grid.code_dtype)  # exact: small integers in float32
    if options.rtn_fallback:
        codes = _keep_better_rows(weight, hessian, codes, scale, zero_point, grid, chol_device)
    return codes


def _column_rounder(grid: Grid, scale: Tensor, zero_point: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """``column (out, 1) -> (nearest level, code - zero point)``, both float32.

    The same codes as ``grid.quantize`` and the same values as ``grid.dequantize`` (an
    affine level 0 may come out as -0.0); constants are hoisted, as this runs once per
    column.
    """
    if grid.scheme == "pow2":
        return _pow2_rounder(grid, scale)
    if grid.scheme == "binary":
        return _binary_rounder(scale)
    inverse = torch.reciprocal(scale)
    low = (grid.qmin - zero_point).to(torch.float32)
    high = (grid.qmax - zero_point).to(torch.float32)

    def round_affine(column: Tensor) -> tuple[Tensor, Tensor]:
        steps = torch.round(column * inverse).clamp_(low, high)
        return steps * scale, steps

    return round_affine


def _binary_rounder(scale: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """Nearest of ``{-a, +a}``: ``+a`` (code 1) where the value is ``>= 0``, as ``grid.quantize`` decides.

    The grid stays fixed (``a`` from the float weight), so the error feedback decides
    only each weight's sign.
    """
    negative = -scale

    def round_binary(column: Tensor) -> tuple[Tensor, Tensor]:
        up = column >= 0
        return torch.where(up, scale, negative), up.to(torch.float32)

    return round_binary


def _pow2_rounder(grid: Grid, scale: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """Nearest pow2 level by counting thresholds, the same decisions as ``grid.quantize``.

    The magnitude code of ``|x|`` is the number of decision thresholds ``t <= |x|``:
    ``a*2^-L`` (between 0 and the smallest level) and ``0.75*a*2^-k`` (between
    ``a*2^-k`` and ``a*2^-(k+1)``). Each is exact in float64; for a float32 ``v``,
    ``v >= t`` iff ``v >= roundup32(t)``, so comparing with the thresholds rounded up to
    float32 decides exactly as the bit-level ``grid.quantize`` does, ties included.
    """
    levels = grid.qmax
    a = scale.to(torch.float64)  # (rows, 1)
    powers = torch.tensor([2.0**-k for k in range(levels - 2, -1, -1)], dtype=torch.float64, device=scale.device)
    thresholds = torch.cat([a * 2.0**-levels, 0.75 * a * powers], dim=1)  # exact products
    thresholds = _round_up_f32(thresholds)  # (rows, L), ascending
    table = grid.levels(scale, torch.zeros_like(scale, dtype=torch.int32))  # (rows, 2L+1)

    def round_pow2(column: Tensor) -> tuple[Tensor, Tensor]:
        magnitude = (column.abs() >= thresholds).sum(dim=1, keepdim=True)
        code = torch.where(column < 0, -magnitude, magnitude)
        value = torch.gather(table.expand(column.shape[0], -1), 1, code + levels)
        return value, code.to(torch.float32)

    return round_pow2


def _keep_better_rows(
    weight: Tensor, hessian: Tensor, codes: Tensor, scale: Tensor, zero_point: Tensor, grid: Grid, device: torch.device
) -> Tensor:
    """Per row, GPTQ's ``codes`` or round to nearest's, whichever has the smaller ``d^T H d``."""
    w = weight.detach().to(torch.float32)
    rtn = grid.quantize(w, scale, zero_point)
    h = hessian.detach().to(device=device, dtype=torch.float64)

    def output_error(c: Tensor) -> Tensor:
        # float64: the two errors can be close, and the comparison must not flip on rounding.
        d = (w - grid.dequantize(c, scale, zero_point)).to(device=device, dtype=torch.float64)
        return ((d @ h) * d).sum(dim=1)

    rtn_wins = (output_error(rtn) < output_error(codes)).to(codes.device)
    return torch.where(rtn_wins[:, None], rtn, codes)


def gptq_layer_codes(
    weight: Tensor, hessian: Tensor, params: QParams, groups: int, options: GPTQOptions = GPTQOptions()
) -> Tensor:
    """GPTQ codes of a Linear or (grouped) convolution weight of any rank.

    Parameters
    ----------
    weight : Tensor
        ``(out, in/groups, *kernel)`` (or ``(out, in)`` for Linear).
    hessian : Tensor
        ``(groups, cols, cols)`` with ``cols = weight[0].numel()``, as from
        :attr:`HessianAccumulator.hessian`.
    params : QParams
        Per-channel params (sliced to each group's output channels) or per-tensor ones
        (shared by all groups).
    groups : int
        The layer's ``groups`` (1 for Linear).
    options : GPTQOptions

    Returns
    -------
    Tensor
        Codes shaped like ``weight``, in ``params.grid.code_dtype``.

    Examples
    --------
    >>> from quant import QuantSpec, choose_qparams
    >>> conv = nn.Conv2d(4, 4, 3, groups=2)
    >>> acc = HessianAccumulator(conv)
    >>> acc.add(torch.randn(2, 4, 6, 6))
    >>> params = choose_qparams(conv.weight, QuantSpec(bits=3))
    >>> gptq_layer_codes(conv.weight, acc.hessian, params, groups=2).shape
    torch.Size([4, 2, 3, 3])
    """
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups={groups!r} is invalid; allowed: an integer >= 1")
    if not isinstance(weight, Tensor) or weight.dim() < 2:
        raise QuantError(f"GPTQ needs a weight of shape (out, in/groups, *kernel), got {_describe(weight)}")
    out = weight.shape[0]
    if out % groups:
        raise QuantError(f"the weight's {out} output channels do not split into groups={groups}")
    cols = weight[0].numel()
    if not isinstance(hessian, Tensor) or tuple(hessian.shape) != (groups, cols, cols):
        raise QuantError(f"the Hessian must have shape ({groups}, {cols}, {cols}) for this weight, got {_describe(hessian)}")
    _column_params(params, out, weight.device)  # checks the channel count once, for the whole weight
    out_g = out // groups
    pieces = []
    for g in range(groups):
        rows = slice(g * out_g, (g + 1) * out_g)
        group_params = params
        if params.axis == 0:
            group_params = QParams(
                params.scheme, params.bits, params.scale[rows], params.zero_point[rows], params.qmin, params.qmax, 0
            )
        pieces.append(gptq_codes(weight[rows].reshape(out_g, cols), hessian[g], group_params, options))
    return torch.cat(pieces).reshape(weight.shape)


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
