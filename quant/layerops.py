"""A layer's computation as a function of its input and of a replacement weight.

Calibrated methods (AdaRound, GPTQ, BN re-estimation) evaluate a Conv/Linear layer with
weights other than its own: soft-rounded, partly quantized, or candidate ones. The
functions here give ``f(x, w)``, the layer's output for input ``x`` with weight ``w`` and
no bias, computed with the same functional call ``nn.Conv*d`` / ``nn.Linear`` make, so
that ``f(x, layer.weight) + bias`` equals ``layer(x)``. The bias is left out because
every caller compares outputs of the same layer, where it cancels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from quant.errors import QuantError

WeightForward = Callable[[Tensor, Tensor], Tensor]

_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


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
