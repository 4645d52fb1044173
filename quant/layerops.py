"""The weights a model multiplies by, and a layer's computation with a replacement weight.

:func:`weight_slots` lists every weight that a matmul (or convolution) of the model uses:
the ``weight`` of each Conv1d/2d/3d and Linear module, and the projection weights that
``nn.MultiheadAttention`` holds as parameters of its own (``in_proj_weight``, or
``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when key and value have other
sizes). The attention's ``out_proj`` is an ``nn.Linear`` subclass and is listed as a
layer. :func:`quant.quantize_model` quantizes exactly these weights, so that no weight a
matmul uses stays float32 while the report's average bits say otherwise.

Calibrated methods (AdaRound, GPTQ, BN re-estimation) evaluate a Conv/Linear layer with
weights other than its own: soft-rounded, partly quantized, or candidate ones. The
functions here give ``f(x, w)``, the layer's output for input ``x`` with weight ``w`` and
no bias, computed with the same functional call ``nn.Conv*d`` / ``nn.Linear`` make, so
that ``f(x, layer.weight) + bias`` equals ``layer(x)``. The bias is left out because
every caller compares outputs of the same layer, where it cancels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from quant.errors import QuantError

WeightForward = Callable[[Tensor, Tensor], Tensor]

_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}

#: Modules whose forward multiplies its input by the module's ``weight``.
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
#: ``nn.MultiheadAttention``'s own projection parameters (``None`` ones are skipped).
ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@dataclass(frozen=True, eq=False)
class WeightSlot:
    """One weight that a matmul uses: its name in reports and plans, its module and attribute.

    A Conv/Linear layer's slot is named like the module (``"layer1.0.conv1"``; plans and
    reports have always used these names). An attention projection's slot is named like
    its parameter (``"encoder.layers.0.self_attn.in_proj_weight"``): it is not a module,
    so no hook sees its input.
    """

    name: str
    module: nn.Module
    attr: str

    @property
    def weight(self) -> nn.Parameter:
        """The parameter itself (assign with ``slot.weight.copy_`` under ``torch.no_grad``)."""
        return getattr(self.module, self.attr)

    @property
    def is_layer(self) -> bool:
        """Whether the weight belongs to a Conv/Linear module (whose calls hooks can observe)."""
        return self.attr == "weight"

    @property
    def state_key(self) -> str:
        """The weight's key in the model's ``state_dict``."""
        if not self.is_layer:
            return self.name
        return f"{self.name}.weight" if self.name else "weight"


def weight_slots(model: nn.Module) -> list[WeightSlot]:
    """Every weight that a matmul of ``model`` uses, in ``named_modules`` order (see the module doc).

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))
    >>> [(s.name, s.state_key) for s in weight_slots(net)]
    [('0', '0.weight'), ('1.in_proj_weight', '1.in_proj_weight'), ('1.out_proj', '1.out_proj.weight')]
    """
    slots = []
    for name, module in model.named_modules():
        if isinstance(module, LAYER_TYPES):
            slots.append(WeightSlot(name, module, "weight"))
        elif isinstance(module, nn.MultiheadAttention):
            for attr in ATTENTION_WEIGHTS:
                if getattr(module, attr, None) is not None:
                    slots.append(WeightSlot(f"{name}.{attr}" if name else attr, module, attr))
    return slots


def weight_forward(layer: nn.Module) -> WeightForward:
    """``f(x, w)``: ``layer``'s output for input ``x`` with weight ``w`` and no bias.

    Honours stride, padding (numbers, ``"same"``, ``"valid"``), dilation, groups and
    ``padding_mode``: ``"reflect"``, ``"replicate"`` and ``"circular"`` pad with
    :func:`torch.nn.functional.pad` first and then convolve without padding, exactly as
    ``nn.Conv*d`` does. The layer's settings are read once, when ``f`` is built.

    Parameters
    ----------
    layer : nn.Conv1d, nn.Conv2d, nn.Conv3d or nn.Linear
        Subclasses count (``nn.LazyConv2d`` once materialized, QAT modules).

    Returns
    -------
    Callable[[Tensor, Tensor], Tensor]
        ``f(x, w)`` with ``w`` shaped like ``layer.weight``.

    Raises
    ------
    QuantError
        For any other module type (``nn.ConvTranspose2d`` included), naming it.

    Examples
    --------
    >>> import torch
    >>> conv = nn.Conv2d(2, 4, 3, padding="same", padding_mode="reflect")
    >>> x = torch.randn(1, 2, 5, 5)
    >>> f = weight_forward(conv)
    >>> torch.allclose(f(x, conv.weight) + conv.bias[:, None, None], conv(x), atol=1e-6)
    True
    """
    if isinstance(layer, nn.Linear):
        return _linear
    for kind, conv in _CONV.items():
        if isinstance(layer, kind):
            return _conv_forward(layer, conv)
    raise QuantError(
        f"weight_forward: unsupported layer type {type(layer).__name__}; allowed: Conv1d, Conv2d, Conv3d, Linear"
    )


def _linear(x: Tensor, w: Tensor) -> Tensor:
    return F.linear(x, w)


def _conv_forward(layer: nn.Module, conv: Callable[..., Tensor]) -> WeightForward:
    stride, dilation, groups = layer.stride, layer.dilation, layer.groups
    if layer.padding_mode == "zeros":
        padding = layer.padding  # a tuple, or the string "same"/"valid", which F.conv*d accept

        def forward(x: Tensor, w: Tensor) -> Tensor:
            return conv(x, w, None, stride, padding, dilation, groups)

        return forward
    # nn.Conv*d precomputes the F.pad amounts (asymmetric for "same" with an even kernel).
    pad, mode = tuple(layer._reversed_padding_repeated_twice), layer.padding_mode
    unpadded = (0,) * len(layer.kernel_size)

    def forward_padded(x: Tensor, w: Tensor) -> Tensor:
        return conv(F.pad(x, pad, mode=mode), w, None, stride, unpadded, dilation, groups)

    return forward_padded
