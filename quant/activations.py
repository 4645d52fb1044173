"""Activation quantization: calibrate a per-tensor quantizer for a layer's input, apply it with a hook.

Each quantized Conv/Linear gets a forward pre-hook that fake-quantizes its input with
fixed parameters. Parameters come from one calibration pass over caller-given batches
through the weight-quantized model (activations not yet quantized). Min-max
calibration is exact over all batches; ``mse`` and ``percentile`` work on a
deterministic strided sample of at most ``max_samples`` values per layer (plus the
exact extremes), which keeps memory bounded for large activations.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
import torch.nn as nn
from torch import Tensor

from quant.device import model_device, to_device
from quant.errors import QuantError
from quant.functional import QParams, choose_qparams, fake_quantize
from quant.spec import QuantSpec

DEFAULT_BATCHES = 8
DEFAULT_MAX_SAMPLES = 1 << 20


class ActivationQuantizer:
    """Forward pre-hook: replaces a module's first input by its fake-quantized value.

    A plain callable (not a module) so that the model's ``state_dict`` keys do not
    change; it is copied along with the model by ``copy.deepcopy``.
    """

    def __init__(self, params: QParams) -> None:
        self.params = params

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (fake_quantize(x, self.params), *args[1:])


def check_act_spec(spec: QuantSpec) -> None:
    """Activations use one per-tensor affine quantizer: refuse other specs with a clear message."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"act_spec must be a QuantSpec, got {type(spec).__name__}")
    if spec.granularity != "per_tensor":
        raise ValueError(f"act_spec.granularity={spec.granularity!r} is invalid; allowed: 'per_tensor'")
    if spec.scheme not in ("asymmetric", "symmetric"):
        raise ValueError(f"act_spec.scheme={spec.scheme!r} is invalid; allowed: 'asymmetric', 'symmetric'")


class _Observer:
    """Collects a bounded, deterministic sample of a layer's inputs plus their exact min and max."""

    def __init__(self, per_batch: int) -> None:
        self.per_batch = per_batch
        self.samples: list[Tensor] = []
        self.lo = math.inf
        self.hi = -math.inf

    def __call__(self, module: nn.Module, args: tuple) -> None:
        flat = args[0].detach().reshape(-1).to(torch.float32)
        if flat.numel() == 0:
            return
        lo, hi = torch.aminmax(flat)
        self.lo, self.hi = min(self.lo, float(lo)), max(self.hi, float(hi))
        stride = max(1, math.ceil(flat.numel() / self.per_batch))
        self.samples.append(flat[::stride].cpu())

    def values(self) -> Tensor:
        return torch.cat([*self.samples, torch.tensor([self.lo, self.hi])])


def batch_input(item: object) -> Tensor:
    """The input tensor of one calibration batch: a tensor, or the first item of an ``(x, y)`` tuple."""
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    if not isinstance(item, Tensor):
        raise QuantError(f"calibration batches must be tensors or (x, y) tuples, got {type(item).__name__}")
    return item


@torch.no_grad()
def calibrate(
    model: nn.Module,
    layers: list[str],
    spec: QuantSpec,
    batches: Iterable,
    *,
    max_batches: int = DEFAULT_BATCHES,
    max_samples: int = DEFAULT_MAX_SAMPLES,
) -> dict[str, QParams]:
    """Run up to ``max_batches`` batches through ``model`` and choose input parameters per layer.

    Parameters
    ----------
    model : nn.Module
        Run in eval mode (its mode is restored afterwards).
    layers : list of str
        Names of the modules whose inputs are observed.
    spec : QuantSpec
        Per-tensor, asymmetric or symmetric; its ``clipping`` picks min-max or MSE.
    batches : iterable
        Input tensors, or ``(x, y)`` tuples whose first element is the input.

    Returns
    -------
    dict
        Layer name -> QParams; a layer that saw no input during calibration is left out.
    """
    check_act_spec(spec)
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ValueError(f"calibration_batches={max_batches!r} is invalid; allowed: an integer >= 1")
    observers = {name: _Observer(max(1, max_samples // max_batches)) for name in layers}
    handles = [model.get_submodule(name).register_forward_pre_hook(obs) for name, obs in observers.items()]
    device = model_device(model)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for item in batches:
            if seen == max_batches:
                break
            model(to_device(batch_input(item), device))
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen == 0:
        raise QuantError("activation calibration needs at least one batch; `calibration` was empty")
    params = {}
    for name, obs in observers.items():
        if not obs.samples:
            warnings.warn(f"layer {name!r} received no input during calibration; its input stays float", stacklevel=3)
            continue
        try:
            params[name] = choose_qparams(obs.values(), spec)
        except QuantError as err:
            raise QuantError(f"input of layer {name!r}: {err}") from None
    return params


def attach(model: nn.Module, params: dict[str, QParams]) -> None:
    """Register an :class:`ActivationQuantizer` on each named layer of ``model``."""
    for name, p in params.items():
        layer = model.get_submodule(name)
        device = next((t.device for t in layer.parameters()), p.scale.device)
        layer.register_forward_pre_hook(ActivationQuantizer(p.to(device)))
