"""AdaRound: learned up-or-down rounding of one layer's weights (Nagel et al., 2020).

Round-to-nearest minimizes each weight's own error; what matters is the layer's output.
AdaRound keeps the grid (scale, zero point) fixed and learns, for every weight, whether
it goes to the level just below or just above it, minimizing the output reconstruction
error on calibration data plus a regularizer that drives each choice to 0 or 1:

    min_V  mean((f(x, W_soft(V)) - y)^2) / E_rtn  +  lambda * mean(1 - |2 h(V) - 1|^beta)

with ``W_soft = lower + h(V) * (upper - lower)``, ``h`` the rectified sigmoid
``clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, ``zeta = 1.1``, ``gamma = -0.1``,
``y`` the float layer's output (computed by the caller) and ``E_rtn`` the same mean
squared error with round-to-nearest weights on all captured data. The regularizer is
off for the first ``warmup`` share of the iterations; then ``beta`` falls linearly from
``beta_start`` to ``beta_end`` (BRECQ's ``LinearTempDecay``; AIMET uses a cosine).

Normalization (a deliberate change from the paper's ``||.||^2 + lambda * sum``): BRECQ
sums the squared error over each sample's outputs and the regularizer over the weights,
so the balance between the two terms moves with the activations' scale, the number of
output positions and the number of weights. Measured on random 2-bit Conv2d layers
(1,000 steps, lambda = 0.01): 43% of the rounding variables were still undecided on a
64-channel 7x7 layer and 66% on a 16-channel 28x28 one, and the lambda that decided them
differed between the two. Dividing the error by round-to-nearest's and averaging the
regularizer makes both terms dimensionless, so one ``lambda`` serves every layer:
``lambda = 1`` means the regularizer at its largest costs as much as rounding to nearest.

The method is generic over schemes: "below" and "above" come from each channel's
ascending level table (:meth:`quant.QParams.levels`), so the non-uniform ``pow2`` grid
works like the affine ones. The code of the ``i``-th ascending level is ``qmin + i``.
On the ``binary`` grid ``{-a, +a}`` the two levels bracket every weight inside
``(-a, a)``: AdaRound learns a sign for each of those (a sign flip is worth learning
near 0, where the two levels are about equally far), and the weights beyond ``+-a``
keep their own sign.

Pure pieces (:func:`rectified_sigmoid`, :func:`initial_logits`, :func:`bracket`,
:func:`rounding_regularizer`, :func:`beta_at`) are separate from the optimization loop
(:func:`adaround`); the module-walking driver that captures each layer's inputs lives in
:mod:`quant.calibrate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from quant import _validate as check
from quant.errors import QuantError
from quant.functional import QParams, dequantize, quantize

ZETA = 1.1
GAMMA = -0.1

#: Samples per chunk when the reconstruction error is measured on all captured data.
EVAL_CHUNK = 256


@dataclass(frozen=True)
class AdaRoundOptions:
    """Settings of :func:`adaround`; validates itself on construction.

    Parameters
    ----------
    iters : int, default 1000
        Optimizer steps. BRECQ and AIMET take 10,000-20,000 small steps (lr 1e-3 to
        4e-3); with the normalized loss, 1,000 steps at ``lr=0.1`` reach the same
        quality in about 5 s per ResNet-20 layer on one CPU core.
    batch_size : int, default 16
        Samples per step, drawn without replacement from the captured inputs. At equal
        cost, more steps of smaller batches did better than fewer larger ones.
    lr : float, default 0.1
        Adam learning rate on the rounding logits ``V``.
    reg_weight : float, default 20.0
        ``lambda``, weight of the rounding regularizer relative to round-to-nearest's
        reconstruction error (see the module docstring; it is not the paper's 0.01,
        which weighs an unnormalized sum).
    beta_start, beta_end : float, default 20.0 and 2.0
        Exponent of the regularizer at the end of the warm-up and at the last step;
        ``beta_end <= beta_start``.
    warmup : float, default 0.2
        Share of the iterations without the regularizer, in [0, 1).

    Notes
    -----
    Defaults tuned on six layers of the shipped ResNet-20 (first conv, 16/32/64-channel
    3x3 convs, a 1x1 shortcut, the classifier; the float model's inputs from 1,024
    training images; MSE grid) at 2 and 3 bits, over iters 500-2000, batch 8-32, lr
    0.03-0.3 and lambda 3-30. The best settings were within a few percent of each other.
    With these, the output error is 7-48% of round-to-nearest's at 2 bits (first conv
    22%, 1x1 shortcut 48%) and 9-50% at 3 bits, and no rounding variable is left
    undecided on any of the six layers; lambda = 10 left up to 0.7% undecided, lambda = 3
    up to 13%.

    Raises
    ------
    ValueError
        Naming the field, the value and what is allowed.

    Examples
    --------
    >>> AdaRoundOptions(iters=200).batch_size
    16
    >>> AdaRoundOptions(warmup=1.0)
    Traceback (most recent call last):
    ...
    ValueError: AdaRoundOptions.warmup=1.0 is invalid; allowed: a number in [0, 1)
    """

    iters: int = 1000
    batch_size: int = 16
    lr: float = 0.1
    reg_weight: float = 20.0
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2

    def __post_init__(self) -> None:
        owner = "AdaRoundOptions"
        check.int_in(owner, "iters", self.iters, 1, 10**9)
        check.int_in(owner, "batch_size", self.batch_size, 1, 10**9)
        inf = math.inf
        # Normalized to float so that equal settings compare equal (lr=1 vs lr=1.0).
        number = {
            "lr": check.number_in(owner, "lr", self.lr, 0.0, inf, lo_open=True, hi_open=True),
            "reg_weight": check.number_in(owner, "reg_weight", self.reg_weight, 0.0, inf, lo_open=False, hi_open=True),
            "beta_start": check.number_in(owner, "beta_start", self.beta_start, 0.0, inf, lo_open=True, hi_open=True),
            "beta_end": check.number_in(owner, "beta_end", self.beta_end, 0.0, inf, lo_open=True, hi_open=True),
            "warmup": check.number_in(owner, "warmup", self.warmup, 0.0, 1.0, lo_open=False, hi_open=True),
        }
        for name, value in number.items():
            object.__setattr__(self, name, value)
        if self.beta_end > self.beta_start:
            raise ValueError(
                f"AdaRoundOptions.beta_end={self.beta_end!r} is invalid; allowed: a number in (0, beta_start={self.beta_start!r}]"
            )


@dataclass(frozen=True, eq=False)
class AdaRoundResult:
    """What :func:`adaround` learned for one layer.

    Attributes
    ----------
    codes : Tensor
        Integer codes shaped like the weight, dtype ``params.grid.code_dtype``; decode
        with ``dequantize(codes, params)``.
    soft : Tensor
        Final rounding variables ``h(V)`` in [0, 1], shaped like the weight; 0 where a
        weight has no level above it (at or beyond the top of its range, or below the
        bottom), where the code is the edge level whatever ``h``.
    loss_before : float
        Reconstruction MSE (mean over every output element of all captured samples)
        with round-to-nearest codes under the same parameters.
    loss_after : float
        The same with the final codes. Can exceed ``loss_before``; the caller decides
        which codes to keep.
    """

    codes: Tensor
    soft: Tensor
    loss_before: float
    loss_after: float


class Bracket(NamedTuple):
    """The two grid levels around each weight (see :func:`bracket`)."""

    index: Tensor  # int64, position of ``lower`` in the ascending level table
    lower: Tensor  # float32 level just below (or at) the weight
    upper: Tensor  # float32 next level above; equal to ``lower`` where there is none

    @property
    def movable(self) -> Tensor:
        """True where rounding up is possible (``upper > lower``)."""
        return self.upper > self.lower


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``; reaches 0 and 1 at finite ``V``.

    Examples
    --------
    >>> rectified_sigmoid(torch.tensor([-10.0, 0.0, 10.0]))
    tensor([0.0000, 0.5000, 1.0000])
    """
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_logits(rest: Tensor) -> Tensor:
    """``V`` with ``h(V) = rest`` for ``rest`` in [0, 1]: ``logit((rest - gamma) / (zeta - gamma))``.

    Examples
    --------
    >>> rest = torch.tensor([0.0, 0.25, 0.5, 1.0])
    >>> torch.allclose(rectified_sigmoid(initial_logits(rest)), rest, atol=1e-6)
    True
    """
    return torch.logit((rest - GAMMA) / (ZETA - GAMMA))


def bracket(rows: Tensor, levels: Tensor) -> Bracket:
    """For every weight, the level just below (or at) it and the next level above.

    Parameters
    ----------
    rows : Tensor
        ``(C, N)`` float32 weights, one row per set of parameters.
    levels : Tensor
        ``(C, n)`` ascending level tables (``(1, n)`` for per-tensor parameters).

    Returns
    -------
    Bracket
        ``index`` is the position of the largest level ``<= w`` (the last of equal
        levels); a weight below the lowest level gets index 0 and a weight at or above
        the highest gets ``n - 1``, both with ``upper == lower`` (the edge level).

    Examples
    --------
    >>> b = bracket(torch.tensor([[-5.0, 0.5, 1.0, 9.0]]), torch.tensor([[-1.0, 0.0, 1.0, 2.0]]))
    >>> b.index, b.lower, b.upper
    (tensor([[0, 1, 2, 3]]), tensor([[-1.,  0.,  1.,  2.]]), tensor([[-1.,  1.,  2.,  2.]]))
    """
    top = levels.shape[-1] - 1
    above = torch.searchsorted(levels.contiguous(), rows.contiguous(), right=True)  # count of levels <= w
    below_range = above == 0
    index = (above - 1).clamp(min=0)
    up_index = torch.where(below_range, index, (index + 1).clamp(max=top))
    return Bracket(index, torch.gather(levels, 1, index), torch.gather(levels, 1, up_index))


def rounding_regularizer(h: Tensor, beta: float) -> Tensor:
    """``sum(1 - |2h - 1|^beta)``: 0 when every ``h`` is 0 or 1, largest at ``h = 0.5``.

    Examples
    --------
    >>> rounding_regularizer(torch.tensor([0.0, 1.0, 0.5]), 2.0)
    tensor(1.)
    """
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def beta_at(step: int, options: AdaRoundOptions) -> float | None:
    """Exponent of the regularizer at ``step`` (0-based); None during the warm-up.

    Falls linearly from ``beta_start`` at the end of the warm-up towards ``beta_end``,
    which the step after the last would reach.

    Examples
    --------
    >>> opts = AdaRoundOptions(iters=10, warmup=0.2, beta_start=20.0, beta_end=2.0)
    >>> [beta_at(s, opts) for s in (0, 1, 2, 6)]
    [None, None, 20.0, 11.0]
    """
    start = options.warmup * options.iters
    if step < start:
        return None
    progress = (step - start) / (options.iters - start)
    return options.beta_end + (options.beta_start - options.beta_end) * (1.0 - progress)


def _rows(weight: Tensor, params: QParams) -> Tensor:
    channels = weight.shape[0] if params.axis == 0 else 1
    return weight.detach().to(torch.float32).reshape(channels, -1)


def _check_inputs(weight: Tensor, params: QParams, inputs: Tensor, targets: Tensor, options: AdaRoundOptions) -> None:
    if not isinstance(options, AdaRoundOptions):
        raise TypeError(f"options must be an AdaRoundOptions, got {type(options).__name__}")
    if not isinstance(params, QParams):
        raise TypeError(f"params must be a QParams, got {type(params).__name__}")
    if not (isinstance(weight, Tensor) and weight.is_floating_point() and weight.dim() >= 1 and weight.numel() > 0):
        raise QuantError("adaround: weight must be a non-empty floating-point tensor with at least one dimension")
    if not torch.isfinite(weight).all():
        raise QuantError("adaround: weight contains NaN or Inf values; only finite values can be quantized")
    channels = weight.shape[0] if params.axis == 0 else 1
    if params.scale.numel() != channels:
        raise QuantError(
            f"adaround: parameters hold {params.scale.numel()} channel(s) but the weight of shape "
            f"{tuple(weight.shape)} has {channels} along axis {params.axis}"
        )
    if not (isinstance(inputs, Tensor) and isinstance(targets, Tensor)):
        raise TypeError("adaround: inputs and targets must be tensors")
    if inputs.dim() == 0 or inputs.shape[0] == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
        raise QuantError(
            f"adaround: inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must hold the same "
            "number (>= 1) of samples along dimension 0"
        )


@torch.no_grad()
def reconstruction_mse(
    forward: Callable[[Tensor, Tensor], Tensor], weight: Tensor, inputs: Tensor, targets: Tensor
) -> float:
    """Mean of ``(forward(x, weight) - y)^2`` over every output element of all samples.

    Runs in chunks of :data:`EVAL_CHUNK` samples on ``weight``'s device and sums in
    float64, so the figure does not depend on the chunking beyond float32 rounding of
    each output.

    Examples
    --------
    >>> x, w = torch.eye(2), torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> reconstruction_mse(lambda x, w: x @ w.T, w, x, torch.zeros(2, 2))
    1.25
    """
    device = weight.device
    total, count = 0.0, 0
    for start in range(0, inputs.shape[0], EVAL_CHUNK):
        x = inputs[start : start + EVAL_CHUNK].to(device, torch.float32)
        y = targets[start : start + EVAL_CHUNK].to(device, torch.float32)
        diff = (forward(x, weight) - y).double()
        total += float((diff * diff).sum())
        count += diff.numel()
    return total / count


def adaround(
    weight: Tensor,
    params: QParams,
    inputs: Tensor,
    targets: Tensor,
    forward: Callable[[Tensor, Tensor], Tensor],
    options: AdaRoundOptions = AdaRoundOptions(),
    generator: torch.Generator | None = None,
) -> AdaRoundResult:
    """Learn up-or-down rounding of ``weight`` on ``params``' grid (AdaRound) for one layer.

    Parameters
    ----------
    weight : Tensor
        The float weight; its device is where the optimization runs.
    params : QParams
        The fixed grid (any scheme, per channel or per tensor), e.g. from
        :func:`quant.choose_qparams` with MSE clipping.
    inputs : Tensor
        Captured layer inputs, samples along dimension 0 (may stay on the CPU: each
        batch is moved to ``weight``'s device).
    targets : Tensor
        ``forward(inputs, weight)``: the float output the rounding should reproduce.
    forward : Callable[[Tensor, Tensor], Tensor]
        ``f(x, w)``, the layer without bias, e.g. :func:`quant.layerops.weight_forward`.
    options : AdaRoundOptions
    generator : torch.Generator, optional
        Draws the batches; a CPU generator seeded with 0 when omitted, so the result is
        reproducible either way (on CUDA, up to the nondeterminism of cuDNN kernels).

    Returns
    -------
    AdaRoundResult
        Codes ``qmin + index(lower) + (h >= 0.5)`` (``lower`` where there is no level
        above), the final ``h``, and the reconstruction MSE before (round to nearest)
        and after. The result is returned even if ``loss_after > loss_before``.

    Raises
    ------
    QuantError
        For a non-finite or empty weight, parameters of another channel count, or
        inputs and targets with different sample counts.

    Examples
    --------
    >>> from quant import QuantSpec, choose_qparams
    >>> g = torch.Generator().manual_seed(0)
    >>> w, x = torch.randn(4, 6, generator=g), torch.randn(64, 6, generator=g)
    >>> params = choose_qparams(w, QuantSpec(bits=2, clipping="mse"))
    >>> linear = lambda x, w: x @ w.T
    >>> res = adaround(w, params, x, linear(x, w), linear, AdaRoundOptions(iters=200))
    >>> res.codes.dtype, res.loss_after <= res.loss_before
    (torch.uint8, True)
    """
    _check_inputs(weight, params, inputs, targets, options)
    device = weight.device
    params = params.to(device)
    if generator is None:
        generator = torch.Generator().manual_seed(0)

    rows = _rows(weight, params)
    levels = params.levels().reshape(rows.shape[0], -1)
    around = bracket(rows, levels)
    movable = around.movable
    step = around.upper - around.lower
    # Fraction of the way from lower to upper, so that W_soft == W (clipped) at the start.
    rest = torch.where(movable, (rows - around.lower) / torch.where(movable, step, 1.0), 0.0).clamp_(0.0, 1.0)
    logits = initial_logits(rest).requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=options.lr)

    with torch.no_grad():
        nearest, _ = quantize(weight, params)  # quantize detaches and works in float32
        before = reconstruction_mse(forward, dequantize(nearest, params), inputs, targets)
    # Round-to-nearest's error is the unit of the reconstruction term (module docstring);
    # where it is 0 (weights already on the grid, or zero inputs) any unit will do.
    rec_unit = before if before > 0 else 1.0
    n_movable = max(int(movable.sum()), 1)

    samples = inputs.shape[0]
    batch = min(options.batch_size, samples)
    # The caller may be under no_grad (an evaluation loop); the logits need gradients.
    with torch.enable_grad():
        for it in range(options.iters):
            pick = torch.randperm(samples, generator=generator, device=generator.device)[:batch].to(inputs.device)
            x = inputs[pick].to(device, torch.float32)
            y = targets[pick.to(targets.device)].to(device, torch.float32)
            h = rectified_sigmoid(logits)
            diff = forward(x, (around.lower + h * step).reshape(weight.shape)) - y
            loss = diff.pow(2).mean() / rec_unit
            beta = beta_at(it, options)
            if beta is not None and options.reg_weight > 0:
                # Weights with no level above have nothing to decide: h = 0 adds 0 to the sum.
                decided = torch.where(movable, h, 0.0)
                loss = loss + options.reg_weight / n_movable * rounding_regularizer(decided, beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    with torch.no_grad():
        soft = torch.where(movable, rectified_sigmoid(logits), 0.0)
        up = (soft >= 0.5).to(torch.int64)
        codes = (around.index + params.qmin + up).to(params.grid.code_dtype).reshape(weight.shape)
        after = reconstruction_mse(forward, dequantize(codes, params), inputs, targets)
    return AdaRoundResult(codes, soft.reshape(weight.shape), before, after)
