"""The weights a model multiplies by, and a layer's computation with a replacement weight.

:func:`weight_slots` lists every weight that a matmul (or convolution) of the model uses:
the ``weight`` of each Conv1d/2d/3d and Linear module, and the projection weights that
``nn.MultiheadAttention`` holds as parameters of its own (``in_proj_weight``, or
``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when key and value have other
sizes). The attention's ``out_proj`` is an ``nn.Linear`` subclass and is listed as a
layer. :func:`quant.quantize_model` quantizes exactly these weights; every other
parameter of two or more dimensions (:func:`unquantized_weights`: transposed convolutions,
``nn.Bilinear``, embeddings, ...) stays float32 and is counted at 32 bits in the report's
average bits, with a warning naming it, so that no float weight goes unreported.

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


def unquantized_weights(model: nn.Module, slots: list[WeightSlot] | None = None) -> list[tuple[str, nn.Parameter, str]]:
    """Parameters of two or more dimensions that are no slot's weight: they stay float.

    ``nn.ConvTranspose*d`` (whose output channels lie on axis 1, while every quantizer
    here works on axis 0), ``nn.Bilinear``, ``nn.Embedding``, RNN weights, position
    embeddings and class tokens. :func:`quant.quantize_model` counts them at 32 bits in
    ``avg_bits`` and warns with their names, so that no float weight goes unreported.
    A parameter shared with a slot (a tied weight) is the slot's and is not listed.

    Parameters
    ----------
    model : nn.Module
    slots : list of WeightSlot, optional
        ``weight_slots(model)``, when the caller has it already.

    Returns
    -------
    list of (str, nn.Parameter, str)
        Parameter name (as in ``named_parameters``), the parameter, and the type name of
        the module that holds it, in ``named_parameters`` order.

    Examples
    --------
    >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.ConvTranspose1d(4, 2, 3))
    >>> [(name, kind) for name, _, kind in unquantized_weights(net)]
    [('0.weight', 'Embedding'), ('2.weight', 'ConvTranspose1d')]
    """
    slots = weight_slots(model) if slots is None else slots
    in_slots = {id(slot.weight) for slot in slots}
    found = []
    for name, param in model.named_parameters():
        if param.dim() >= 2 and id(param) not in in_slots:
            owner = model.get_submodule(name.rpartition(".")[0])
            found.append((name, param, type(owner).__name__))
    return found


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
