"""Sensitivity proxy for mixed precision: what rounding one layer to ``b`` bits costs.

:func:`layer_costs` estimates, for every quantizable weight ``l`` and candidate width
``b``, the damage of quantizing *only* that weight to ``b`` bits, from calibration
batches alone; :func:`quant.allocation.allocate_bits` then picks one width per layer
under an average-bits budget.

The proxy
---------
The cost is the layer's output error on the calibration inputs, per output position::

    cost_l(b) = sum_o dW_o A dW_o^T = ||dW X^T||^2 / N,     A = X^T X / N

where ``X`` (``N x cols``) holds the layer's inputs as the matrix multiplies them (im2col
rows for a convolution: every sample at every output position), ``dW = Q_b(W) - W`` is
the round-to-nearest error of the (BatchNorm-folded) weight on the grid ``quantize_model``
would use at ``b`` bits (``spec`` at width ``b``; width 1 is the binary grid,
:func:`quant.spec.spec_for_width`), and ``dW_o`` is output channel ``o``'s row. ``A`` is
half of GPTQ's Hessian ``H = (2/N) X^T X``, collected by the same accumulator
(:class:`quant.gptq.HessianAccumulator`) in one forward pass of the float model over the
calibration batches, with hooks on every layer at once; each width then costs one
rounding of the weight and a small matrix product.

A layer whose samples give many rows (an early convolution: hundreds of positions per
image) takes ``A`` from the first samples of every batch, enough for at least
``max(16384, 32 * cols)`` rows and 128 samples; on the shipped ResNet-20 that is about
a fifth of the multiply-adds of all rows. Attention projections (and ``out_proj``, whose module
``nn.MultiheadAttention`` never calls) see every row, recorded inside
``F.multi_head_attention_forward``.

Why this proxy
~~~~~~~~~~~~~~
- It is the quantity the calibrated methods minimize layer by layer (GPTQ's objective,
  AdaRound's reconstruction loss), on the same data, so it ranks the layers by the error
  those methods start from. Unlike the weight error ``||dW||^2`` it sees which inputs
  carry energy: a column multiplying near-zero inputs is cheap to round.
- It needs no labels, no gradients and one forward pass: a fraction of one GPTQ run (the
  issue's target: allocation plus quantization within 2x one GPTQ run).
- The alternatives cost more: measuring each layer's accuracy drop takes
  ``layers x widths`` evaluations; GPTQ's own residual error per layer and width takes
  ``widths`` GPTQ runs (round to nearest overestimates what GPTQ leaves, by a similar
  factor across layers).
- Per output *position*, not per sample: summing over positions weights the early,
  large feature maps up. On the shipped ResNet-20 (1,024 calibration images, GPTQ with
  BN re-estimation, widths {1, 2, 3, 4, 8}) that allocation lost 1.2 pp more test
  accuracy at 1.5 average bits (91.87% against 93.02%).
- No output-sensitivity weighting: scaling each output channel by its squared loss
  gradient (a K-FAC-style Fisher with labels sampled from the model) costs a
  forward-backward pass, about as much as the rest of the proxy, and did not allocate
  better there: 93.01% / 92.11% against 93.02% / 92.18% at 1.5 / 1.25 average bits.
  BatchNorm-folded layers have outputs on comparable scales, so their plain output
  errors already add up to a fair ranking.

Summing per-layer costs assumes the layers' errors add up independently; the
allocator relies on it.

Examples
--------
>>> import torch
>>> import torch.nn as nn
>>> from quant import QuantSpec
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
>>> sizes, costs = layer_costs(net, QuantSpec(), [2, 4, 8], [torch.randn(16, 1, 8, 8)])
>>> sizes
{'0': 36, '3': 432}
>>> costs["3"][2] > costs["3"][4] > costs["3"][8] > 0
True
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from quant._validate import short_repr
from quant.calibrate import batch_inputs
from quant.device import model_device, to_device
from quant.errors import QuantError
from quant.fold import fold_batchnorm
from quant.functional import fake_quantize
from quant.gptq import HessianAccumulator
from quant.layerops import WeightSlot, weight_slots
from quant.spec import QuantSpec, bits_range, spec_for_width, width_allowed

#: The candidate widths the issue names; pass them (or a subset) as ``widths``.
DEFAULT_WIDTHS = (1, 2, 3, 4, 8)
#: Samples per chunk when an input batch becomes im2col rows (bounds that buffer).
_CHUNK = 128
#: A layer's ``A`` comes from at least ``max(_MIN_ROWS, _ROWS_PER_COLUMN * cols)`` im2col
#: rows and at least ``_MIN_SAMPLES`` samples (all of them when there are fewer): enough
#: for a ``cols x cols`` second moment, and a fraction of the work for the early
#: convolutions, whose every sample gives hundreds of rows.
_MIN_ROWS = 16384
_ROWS_PER_COLUMN = 32
_MIN_SAMPLES = 128
# nn.MultiheadAttention.forward(query, key, value, ...): which input each projection multiplies.
_ATTENTION_INPUTS = {"q_proj_weight": "query", "k_proj_weight": "key", "v_proj_weight": "value"}
_ATTENTION_ARGS = ("query", "key", "value")


@dataclass
class _Part:
    """Rows ``rows`` of a weight, and the accumulator of the input those rows multiply."""

    rows: slice
    acc: HessianAccumulator


def layer_costs(
    model: nn.Module,
    spec: QuantSpec,
    widths: Sequence[int],
    calibration: Iterable,
    *,
    layers: Sequence[str] | None = None,
) -> tuple[dict[str, int], dict[str, dict[int, float]]]:
    """Weight count and, per candidate width, the output-error cost of every quantizable weight.

    Parameters
    ----------
    model : nn.Module
        The float model; not modified (BatchNorm is folded into a copy, as
        :func:`quant.quantize_model` does, so the costs are those of the weights it rounds).
    spec : QuantSpec
        The weight quantizer: scheme, granularity and clipping of every width
        (``spec_for_width(spec, b)``; width 1 is binary).
    widths : sequence of int
        Candidate widths, e.g. :data:`DEFAULT_WIDTHS`; each must be one a plan may give
        a layer under ``spec.scheme`` (:func:`quant.spec.width_allowed`). To restrict
        one layer's candidates, drop entries of its cost table before allocating.
    calibration : iterable
        Batches of unlabeled inputs (tensors, or ``(x, y)`` tuples whose labels are
        ignored): the only data the costs see. Never the evaluation data.
    layers : sequence of str, optional
        Names (as :func:`quant.layerops.weight_slots` and plans name them) of the weights
        to cost; default all of them. Leave out the layers a plan keeps float.

    Returns
    -------
    sizes : dict of str to int
        Weight count per layer, in model order.
    costs : dict of str to dict of int to float
        Per layer, width -> ``sum_o dW_o A dW_o^T`` (see the module docstring), widths
        ascending. A layer that the calibration data never reaches costs 0 at every width
        (its output cannot change the model's output there), with a warning naming it.

    Raises
    ------
    ValueError
        For an empty or invalid ``widths`` (naming the width and what ``spec.scheme``
        allows) or an unknown name in ``layers``.
    QuantError
        For empty calibration data, a NaN/Inf in a layer's input or in a weight (the
        weight's layer is named), a model without quantizable weights, or a weight that
        is not float32/float64.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    candidates = _check_widths(widths, spec)
    batches = batch_inputs(calibration)
    folded = fold_batchnorm(model)
    slots = _select(weight_slots(folded), layers, type(model).__name__)
    parts = _collect(folded, slots, batches)
    sizes, costs, unreached = {}, {}, []
    for slot in slots:
        sizes[slot.name] = slot.weight.numel()
        if any(part.acc.rows == 0 for part in parts[slot.name]):
            unreached.append(slot.name)
            costs[slot.name] = dict.fromkeys(candidates, 0.0)
            continue
        costs[slot.name] = {b: _cost(slot, spec_for_width(spec, b), parts[slot.name]) for b in candidates}
    if unreached:
        warnings.warn(
            f"layer(s) {unreached} are not called on the calibration data: they cost 0 at every width, so the "
            "allocator gives them the narrowest one",
            stacklevel=2,
        )
    return sizes, costs


def _check_widths(widths: Sequence[int], spec: QuantSpec) -> list[int]:
    """Distinct candidate widths, ascending; each must suit ``spec.scheme``."""
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Iterable):
        raise ValueError(f"widths={short_repr(widths)} is invalid; allowed: a list of bit widths such as [1, 2, 3, 4, 8]")
    widths = list(widths)
    if not widths:
        raise ValueError("widths=[] is invalid; allowed: a non-empty list of bit widths such as [1, 2, 3, 4, 8]")
    lowest, highest = bits_range(spec.scheme)
    for b in widths:
        if isinstance(b, bool) or not isinstance(b, int) or not width_allowed(spec.scheme, b):
            allowed = "1 (binary) only" if spec.scheme == "binary" else f"1 (binary) or {lowest}..{highest}"
            raise ValueError(f"widths: {short_repr(b)} is not a width scheme {spec.scheme!r} can represent; allowed: {allowed}")
    return sorted(set(widths))


def _select(slots: list[WeightSlot], layers: Sequence[str] | None, model_name: str) -> list[WeightSlot]:
    if not slots:
        raise QuantError(f"{model_name} has no Conv1d/2d/3d or Linear layer and no MultiheadAttention to quantize")
    for slot in slots:
        if slot.weight.dtype not in (torch.float32, torch.float64):
            raise QuantError(f"layer {slot.name!r} weight is {slot.weight.dtype}; convert the model with .float() first")
    if layers is None:
        return slots
    if isinstance(layers, str):
        raise ValueError(f"layers={layers!r} is invalid; allowed: a list of layer names")
    known = {slot.name for slot in slots}
    unknown = [name for name in layers if name not in known]
    if unknown:
        shown = ", ".join(repr(slot.name) for slot in slots[:8]) + (", ..." if len(slots) > 8 else "")
        raise ValueError(f"layers: {short_repr(unknown[0])} is not a quantizable weight of {model_name}; known: {shown}")
    wanted = set(layers)
    return [slot for slot in slots if slot.name in wanted]


def _collect(model: nn.Module, slots: list[WeightSlot], batches: list[Tensor]) -> dict[str, list[_Part]]:
    """Every slot's input accumulators, filled in one forward pass over ``batches``.

    Conv/Linear modules are observed by forward pre-hooks. ``nn.MultiheadAttention``
    multiplies its projection weights (and its ``out_proj``, whose module it never
    calls) inside ``F.multi_head_attention_forward``, where no hook reaches: a
    :class:`_AttentionInputs` mode intercepts that call instead.
    """
    out_projs = {id(m.out_proj.weight) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    parts: dict[str, list[_Part]] = {}
    watch: dict[int, list[tuple[str, HessianAccumulator]]] = {}  # id(weight) -> (argument it multiplies, accumulator)
    handles = []
    try:
        for slot in slots:
            if slot.is_layer and id(slot.weight) not in out_projs:
                feeder = _Feeder(slot.module, len(batches))
                parts[slot.name] = [_Part(slice(None), feeder.acc)]
                handles.append(slot.module.register_forward_pre_hook(feeder))
            else:
                parts[slot.name] = _attention_parts(slot, watch.setdefault(id(slot.weight), []))
        was_training = model.training
        model.eval()
        device = model_device(model)
        with torch.no_grad(), (_AttentionInputs(watch) if watch else contextlib.nullcontext()):
            for batch in batches:
                model(to_device(batch, device))  # calibration batches may stay on the CPU
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return parts


class _Feeder:
    """Forward pre-hook that adds the first ``per_batch`` samples of each input to a layer's accumulator.

    ``per_batch`` is set on the first call, from the rows one sample gives, so that the
    batches together give about ``max(_MIN_ROWS, _ROWS_PER_COLUMN * cols)`` rows and at
    least ``_MIN_SAMPLES`` samples, spread over every batch. An unbatched input is added whole.
    """

    def __init__(self, layer: nn.Module, batches: int) -> None:
        self.acc = HessianAccumulator(layer)
        self.batches = batches
        self.target = max(_MIN_ROWS, _ROWS_PER_COLUMN * layer.weight[0].numel())
        spatial = len(getattr(layer, "kernel_size", ()))
        self.batched_dims = spatial + 2 if spatial else 2  # Linear: (batch, ..., features)
        self.per_batch: int | None = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        if x.dim() < self.batched_dims:
            self.acc.add(x)
            return
        if self.per_batch is None:
            before = self.acc.rows
            self.acc.add(x[:1])
            rows = max(1, self.acc.rows - before)
            self.per_batch = max(math.ceil(self.target / (rows * self.batches)), math.ceil(_MIN_SAMPLES / self.batches))
            x = x[1 : self.per_batch]
        else:
            x = x[: self.per_batch]
        _add(self.acc, x)


def _add(acc: HessianAccumulator, x: Tensor) -> None:
    if x.dim() and not len(x):
        return  # a batch smaller than the samples already taken from it
    for chunk in x.split(_CHUNK) if x.dim() else (x,):  # chunks bound the im2col buffer
        acc.add(chunk)


def _attention_parts(slot: WeightSlot, watch: list[tuple[str, HessianAccumulator]]) -> list[_Part]:
    """Accumulators of an attention weight, one per input it multiplies, registered in ``watch``.

    The packed ``in_proj_weight`` multiplies query, key and value with a third of its rows
    each; ``q/k/v_proj_weight`` one of them; ``out_proj`` the heads' concatenated output.
    """
    weight = slot.weight
    if slot.is_layer:  # out_proj: an nn.Linear that the attention never calls
        watch.append(("output", HessianAccumulator(slot.module)))
        return [_Part(slice(None), watch[-1][1])]
    # A stand-in Linear of the input's width: the accumulator needs only its shape and device.
    args = _ATTENTION_ARGS if slot.attr == "in_proj_weight" else (_ATTENTION_INPUTS[slot.attr],)
    rows = weight.shape[0] // len(args)
    for arg in args:
        watch.append((arg, HessianAccumulator(nn.Linear(weight.shape[1], 1, bias=False, device=weight.device))))
    return [_Part(slice(i * rows, (i + 1) * rows), acc) for i, (_, acc) in enumerate(watch)]


class _AttentionInputs(TorchFunctionMode):
    """Adds the inputs of the watched attention weights to their accumulators.

    Intercepts ``F.multi_head_attention_forward``: query, key and value go to the
    accumulators of the projections that multiply them. For ``out_proj``, the call runs
    with an identity output projection (exact: one product by 1 per element), which
    returns the heads' concatenated output; that is recorded, and the real projection
    applied to it, so the model computes what it always does.
    """

    def __init__(self, watch: dict[int, list[tuple[str, HessianAccumulator]]]) -> None:
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        kwargs = kwargs or {}
        if func is not F.multi_head_attention_forward:
            return func(*args, **kwargs)
        call = _MHA_SIGNATURE.bind(*args, **kwargs)
        call.apply_defaults()
        a = call.arguments
        separate = a["use_separate_proj_weight"]
        for arg, key in zip(_ATTENTION_ARGS, ("q_proj_weight", "k_proj_weight", "v_proj_weight")):
            weight = a[key] if separate else a["in_proj_weight"]
            for wanted, acc in self.watch.get(id(weight), ()):
                if wanted == arg:
                    _add(acc, a[arg])
        out = self.watch.get(id(a["out_proj_weight"]))
        if not out:
            return func(*call.args, **call.kwargs)
        weight, bias = a["out_proj_weight"], a["out_proj_bias"]
        a["out_proj_weight"] = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
        a["out_proj_bias"] = None
        heads, attn_weights = func(*call.args, **call.kwargs)
        for _, acc in out:
            _add(acc, heads)
        return F.linear(heads, weight, bias), attn_weights


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _cost(slot: WeightSlot, spec: QuantSpec, parts: list[_Part]) -> float:
    """``sum_o dW_o A dW_o^T`` of round to nearest on ``spec``, ``A = H / 2`` per part and group."""
    weight = slot.weight.detach().to(torch.float32)
    try:
        error = fake_quantize(weight, spec) - weight
    except QuantError as err:
        raise QuantError(f"layer {slot.name!r} weight: {err}") from None
    total = 0.0
    for part in parts:
        hessian = part.acc.hessian.to("cpu", torch.float64)  # MPS has no float64
        groups, cols = hessian.shape[0], hessian.shape[1]
        d = error[part.rows].to("cpu", torch.float64).reshape(groups, -1, cols)  # (groups, out_g, cols)
        total += 0.5 * float(torch.einsum("goi,gij,goj->", d, hessian, d))
    return total
