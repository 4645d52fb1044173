"""`quantize_model`: fold BatchNorm, quantize every weight a matmul uses once, report.

The weights are those of :func:`quant.layerops.weight_slots`: every Conv/Linear weight
and the projection weights of ``nn.MultiheadAttention`` (``in_proj_weight`` and the
separate ``q/k/v_proj_weight``), which are not ``nn.Linear`` modules. Every other
parameter of two or more dimensions (``nn.ConvTranspose*d``, ``nn.Bilinear``, embeddings:
:func:`quant.layerops.unquantized_weights`) stays float32, counts 32 bits in the report's
average bits, and is named in a warning.

The returned model computes with fake-quantized float weights (the values the integer
codes stand for), so any backend runs it unchanged; the codes themselves travel in the
report for :func:`quant.save_packed` and :func:`quant.model_size`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from quant import activations, calibrate
from quant.errors import QuantError
from quant.fold import find_conv_bn_pairs, fold_pairs
from quant.functional import Quantized, dequantize_sum, quantize, quantize_residual
from quant.layerops import LAYER_TYPES, WeightSlot, unquantized_weights, weight_slots
from quant.metrics import sqnr_db
from quant.plan import QuantPlan, allowed_widths
from quant.report import LayerReport, QuantReport
from quant.spec import QuantSpec, spec_for_width, width_allowed

QUANTIZABLE = LAYER_TYPES
# How many float weights the warning of quantize_model names before "and N more".
_NAMES_LISTED = 5


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every Conv1d/2d/3d and Linear, in ``named_modules`` order.

    :func:`quant.layerops.weight_slots` adds the attention projection weights, which
    :func:`quantize_model` quantizes too.
    """
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def fp32_bytes(model: nn.Module) -> int:
    """4 bytes per floating-point element of ``model.state_dict()`` (parameters and buffers)."""
    return 4 * sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())


def _quantize_layer(name: str, weight: torch.Tensor, spec: QuantSpec, terms: int) -> tuple[Quantized, ...]:
    try:
        if terms == 1:
            return (quantize(weight, spec),)
        return quantize_residual(weight, spec, terms)
    except QuantError as err:
        raise QuantError(f"layer {name!r} weight: {err}") from None


def quantize_model(
    model: nn.Module,
    spec: QuantSpec,
    plan: QuantPlan | None = None,
    *,
    method: str = "rtn",
    calibration: Iterable | None = None,
    bn_reestimate: bool = False,
    bias_correction: bool = False,
    act_spec: QuantSpec | None = None,
    calibration_batches: int = activations.DEFAULT_BATCHES,
    seed: int = 0,
    options: Any = None,
) -> tuple[nn.Module, QuantReport]:
    """Post-training quantization of every weight a matmul uses (and optionally the layers' inputs).

    The weights are every Conv/Linear weight and the projection weights of
    ``nn.MultiheadAttention`` (:func:`quant.layerops.weight_slots`); plans and reports name
    an attention projection by its parameter (``"blocks.0.attn.in_proj_weight"``).

    Steps: deep-copy ``model``; fold BatchNorm (:func:`quant.fold_batchnorm`); for each
    weight pick its bits from ``plan`` and its grid (scale, zero point) from
    ``spec``'s clipping (a weight the plan gives 1 bit gets the binary grid
    ``{-a, +a}``, ``a = mean|w|``, at ``spec``'s granularity, whatever ``spec``'s
    scheme); round every weight onto that grid with ``method``, once; give
    the worst layers a residual term if ``plan`` asks; optionally match output
    statistics (BN re-estimation or bias correction) and calibrate input quantizers on
    ``calibration``. Biases stay float32.

    Methods (``method``):

    - ``"rtn"``: round to nearest, no data (the default);
    - ``"gptq"``: GPTQ/OPTQ, column by column with error feedback through the inverse
      input Hessian (:mod:`quant.gptq`);
    - ``"adaround"``: learned up/down rounding per weight (:mod:`quant.adaround`); on
      a binary grid, a learned sign for the weights inside ``(-a, a)``.

    The calibrated methods go through the layers in the order the model calls them;
    each layer's target is the float weight's output on the inputs the layer receives
    from the already quantized layers before it (:mod:`quant.calibrate`). Residual
    layers of a plan keep their round-to-nearest terms. Attention projection weights are
    computed without calling a module, so no hook sees their inputs: they are rounded to
    nearest under every method and keep their scales under statistics matching (with a
    warning naming them), and ``act_spec`` leaves their inputs float.

    Every other parameter of two or more dimensions stays float32
    (:func:`quant.layerops.unquantized_weights`: ``nn.ConvTranspose*d``, whose output
    channels lie on axis 1, ``nn.Bilinear``, embeddings, RNN weights, position
    embeddings): it gets a float row in the report, counts 32 bits per element in
    ``avg_bits``, and a warning names it, so the average never hides a float weight.

    Parameters
    ----------
    model : nn.Module
        Float model; not modified.
    spec : QuantSpec
        Weight quantizer (its ``bits`` is the default width).
    plan : QuantPlan, optional
        Per-layer widths (1 = binary, under any scheme), float layers, residual layers.
    method : {"rtn", "gptq", "adaround"}, default "rtn"
        How weights are rounded onto their grid.
    calibration : iterable, optional
        Batches of unlabeled inputs (tensors, or ``(x, y)`` tuples whose labels are
        ignored), e.g. ~1,024 training images. Required by ``gptq``, ``adaround``,
        ``bn_reestimate``, ``bias_correction`` and ``act_spec``. Never the data you
        evaluate on.
    bn_reestimate : bool, default False
        After rounding, match each layer's per-channel output mean and variance on
        ``calibration`` to the float model's (scale into the per-channel quantization
        scale, shift into the bias).
    bias_correction : bool, default False
        Match the per-channel output mean only. Can hurt a model whose low-bit outputs
        have collapsed (2-bit round-to-nearest with MSE clipping went to 10% on the
        shipped ResNet-20). Exclusive with ``bn_reestimate``, which already matches the mean.
    act_spec : QuantSpec, optional
        Per-tensor asymmetric/symmetric quantizer for the input of every quantized
        layer except the first one (the first layer's input is the image itself, kept
        as given). Requires ``calibration``. Its ``clipping`` (``minmax`` or ``mse``)
        sets the calibration method.
    calibration_batches : int, default 8
        At most this many batches are used for activation calibration (the weight
        methods use every batch).
    seed : int, default 0
        Seeds the random choices of ``adaround`` (batch sampling).
    options : GPTQOptions or AdaRoundOptions, optional
        Settings of the method; defaults when omitted.

    Returns
    -------
    qmodel : nn.Module
        Folded copy with quantized weights (same module names as ``model``, BatchNorms
        replaced by ``nn.Identity``), in the same train/eval mode as ``model``.
    report : QuantReport
        Per-weight statistics, average bits (over every weight listed, float ones at 32,
        the weights no quantizer handles included), and the integer codes.

    Raises
    ------
    QuantError
        A weight holds NaN/Inf (the layer is named), the model has no weight to quantize, a
        weight is not float32/float64, or ``plan`` gives a layer a bit width that
        ``spec.scheme`` does not allow (the plan, the layer and the allowed range are
        named; :meth:`QuantPlan.check` finds this without a model), or a method that
        needs ``calibration`` got none.
    ValueError
        An unknown ``method``, or both ``bn_reestimate`` and ``bias_correction``.

    Examples
    --------
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10))
    >>> qnet, report = quantize_model(net.eval(), QuantSpec(bits=4), QuantPlan(last_layer_bits=8))
    >>> [(row.name, row.bits) for row in report.layers]
    [('0', 4), ('4', 8)]
    >>> report.folded
    (('0', '1'),)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    plan = QuantPlan() if plan is None else plan
    if not isinstance(plan, QuantPlan):
        raise TypeError(f"plan must be a QuantPlan, got {type(plan).__name__}")
    calibrate.check_method(method)
    if bn_reestimate and bias_correction:
        raise ValueError("bn_reestimate and bias_correction are exclusive: BN re-estimation already matches the mean")
    if act_spec is not None:
        activations.check_act_spec(act_spec)
        if calibration is None:
            raise ValueError("act_spec needs calibration batches: pass calibration=[x1, x2, ...]")
    if calibrate.needs_calibration(method, bn_reestimate, bias_correction) and calibration is None:
        what = f"method {method!r}" if method != "rtn" else ("bn_reestimate" if bn_reestimate else "bias_correction")
        raise QuantError(f"{what} needs calibration data: pass calibration=[batch, ...] of unlabeled inputs")
    batches = calibrate.batch_inputs(calibration) if calibration is not None else []

    pairs = find_conv_bn_pairs(model)
    qmodel = fold_pairs(copy.deepcopy(model), pairs)
    slots = weight_slots(qmodel)
    by_name = {slot.name: slot for slot in slots}
    if not slots:
        raise QuantError(f"{type(model).__name__} has no Conv1d/2d/3d or Linear layer and no MultiheadAttention to quantize")
    left_float = unquantized_weights(qmodel, slots)
    if left_float:
        warnings.warn(_left_float_message(left_float), stacklevel=2)
    names = [slot.name for slot in slots]
    unmatched = plan.unmatched_patterns(names)
    if unmatched:
        warnings.warn(f"plan {plan.name!r}: pattern(s) {unmatched} match no layer of {type(model).__name__}", stacklevel=2)

    widths: dict[str, int | None] = {}
    not_allowed = []
    for i, slot in enumerate(slots):
        name = slot.name
        if slot.weight.dtype not in (torch.float32, torch.float64):
            raise QuantError(f"layer {name!r} weight is {slot.weight.dtype}; convert the model with .float() first")
        bits, rule = plan.rule_for(name, spec.bits, first=i == 0, last=i == len(slots) - 1)
        widths[name] = bits
        if bits is not None and not width_allowed(spec.scheme, bits):
            not_allowed.append(f"layer {name!r} would get {bits} bits ({rule})")
    if all(bits is None for bits in widths.values()):
        raise QuantError(f"plan {plan.name!r} leaves every layer of {type(model).__name__} float (skip patterns {list(plan.skip)}): nothing to quantize")
    if not_allowed:
        # Checked before any weight is quantized; QuantPlan.check validates a plan without a model.
        raise QuantError(f"plan {plan.name!r}: {'; '.join(not_allowed)}, but {allowed_widths(spec.scheme)}")
    # Width 1 is the binary grid whatever spec's scheme (same granularity, a = mean|w|).
    specs: dict[str, QuantSpec | None] = {
        name: None if bits is None else spec_for_width(spec, bits) for name, bits in widths.items()
    }

    weights = {slot.name: slot.weight.detach().clone() for slot in slots}
    matching = bn_reestimate or bias_correction
    float_folded = copy.deepcopy(qmodel) if matching else None
    codes = {name: _quantize_layer(name, weights[name], s, 1) for name, s in specs.items() if s is not None}
    single = {name: dequantize_sum(parts) for name, parts in codes.items()}
    residual = plan.residual_layers({name: sqnr_db(weights[name], single[name]) for name in codes})
    for name in residual:
        codes[name] = _quantize_layer(name, weights[name], specs[name], 2)

    calibrated: dict[str, calibrate.LayerCalibration] = {}
    # Hooks see the inputs and outputs of modules only; the attention projections are not
    # modules, so the calibrated methods and the statistics matching leave them rounded to nearest.
    hooked = [slot.name for slot in slots if slot.is_layer]
    unhooked = [name for name in codes if not by_name[name].is_layer]
    if unhooked and (method != "rtn" or matching):
        what = " and ".join(w for w in (f"method {method!r}" if method != "rtn" else "",
                                         "bn_reestimate" if bn_reestimate else "",
                                         "bias_correction" if bias_correction else "") if w)
        warnings.warn(
            f"attention projection weights {unhooked} are rounded to nearest without {what}: nn.MultiheadAttention "
            "computes them without calling a module, so their inputs cannot be observed",
            stacklevel=2,
        )
    walk = calibrate.LayerWalk.trace(qmodel, hooked, batches[0]) if method != "rtn" or matching else None
    matcher = None
    if matching:
        # The float model's statistics need no order: one pass over the batches for all layers.
        quantized = [name for name in walk.order if name in codes and walk.calls.get(name, 0)]
        float_stats = calibrate.output_moments(float_folded, quantized, batches)
        pow2_scaled = frozenset(name for name, s in specs.items() if s is not None and s.pow2_scale)
        matcher = calibrate.StatisticsMatcher(qmodel, float_stats, variance=bool(bn_reestimate), fixed_scale=pow2_scaled)
        del float_folded
    if method != "rtn":
        # Residual layers keep their round-to-nearest terms; the layers after them are fitted to their output.
        kept = residual | set(unhooked)
        _write_codes(by_name, {name: codes[name] for name in kept})
        targets = {name: specs[name] for name in codes if name not in kept}
        fitted, calibrated = calibrate.round_layers(
            qmodel, walk, targets, weights, batches, method, seed=seed, options=options,
            fixed={name: codes[name] for name in residual if name not in unhooked}, matcher=matcher,
        )
        codes = {name: fitted.get(name, parts) for name, parts in codes.items()}
    else:
        _write_codes(by_name, codes)
        if matcher is not None:
            codes = calibrate.match_output_statistics(qmodel, walk, codes, batches, matcher)

    rows = []
    for slot in slots:
        name = slot.name
        row = LayerReport.measure(name, weights[name], slot.weight.detach(), specs[name], name in residual)
        rows.append(row.with_calibration(calibrated[name]) if name in calibrated else row)
    rows += [LayerReport.measure(name, p.detach(), p.detach(), None, False) for name, p, _ in left_float]

    act_params = {}
    if act_spec is not None:
        # The first layer's input is the raw image: it is left as the caller feeds it.
        targets = [name for name in names[1:] if name in codes and by_name[name].is_layer]
        if unhooked:
            warnings.warn(f"the inputs of attention projection weights {unhooked} stay float: act_spec quantizes "
                          "the inputs of Conv/Linear modules", stacklevel=2)
        act_params = activations.calibrate(qmodel, targets, act_spec, batches, max_batches=calibration_batches)
        activations.attach(qmodel, act_params)
        rows = [row.with_activation(act_params[row.name]) if row.name in act_params else row for row in rows]

    report = QuantReport(
        layers=tuple(rows),
        spec=spec,
        plan=plan,
        act_spec=act_spec,
        folded=tuple(pairs),
        fp32_bytes=fp32_bytes(model),
        codes=codes,
        activations=act_params,
        method=method,
        bn_reestimated=bool(bn_reestimate),
        bias_corrected=bool(bias_correction),
        unquantized=tuple(name for name, _, _ in left_float),
    )
    return qmodel, report


def _left_float_message(left_float: list[tuple[str, nn.Parameter, str]]) -> str:
    """The warning for the weights no quantizer handles: how many, their size, the first few names."""
    shown = ", ".join(f"{name!r} ({kind})" for name, _, kind in left_float[:_NAMES_LISTED])
    more = f" and {len(left_float) - _NAMES_LISTED} more" if len(left_float) > _NAMES_LISTED else ""
    numel = sum(p.numel() for _, p, _ in left_float)
    return (
        f"{len(left_float)} weight(s) of {numel} elements stay float32 and count 32 bits each in avg_bits "
        f"(quantize_model quantizes Conv/Linear and attention projection weights only): {shown}{more}"
    )


def _write_codes(slots: dict[str, WeightSlot], codes: dict[str, tuple[Quantized, ...]]) -> None:
    """Set each named weight to the values its codes stand for (in the weight's own dtype)."""
    with torch.no_grad():
        for name, parts in codes.items():
            weight = slots[name].weight
            weight.copy_(dequantize_sum(parts).to(weight.dtype))
