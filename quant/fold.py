"""Fold BatchNorm into the preceding Conv/Linear: ``W' = W * g/sigma``, ``b' = (b - mu) * g/sigma + beta``.

Quantization always happens on folded weights: that is what a deployed integer model
computes with. Which layers feed which BatchNorm is found from the model's dataflow
with ``torch.fx`` symbolic tracing: a pair is folded only when the BatchNorm's input is
the direct output of the Conv/Linear, that output has no other consumer, and each module
is called exactly once. A model that cannot be traced (data-dependent control flow)
falls back to registration order: a Conv/Linear immediately followed by a BatchNorm
among the children of the same parent (``nn.Sequential(conv, bn, ...)``, or attributes
``conv1``/``bn1`` assigned one after the other), with matching channel counts. The
fallback trusts that registration order is call order, as ``torch.ao`` fusion does.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.fx
import torch.nn as nn

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _compatible(layer: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(layer, FOLDABLE) or not isinstance(bn, BATCHNORMS):
        return False
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return (
        bn.num_features == out
        and bn.running_mean is not None  # track_running_stats=False has nothing to fold
        and bn.running_var is not None
    )


def _pairs_from_graph(model: nn.Module) -> list[tuple[str, str]]:
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), BATCHNORMS) or not node.args:
            continue
        source = node.args[0]
        if (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and len(source.users) == 1
            and calls[source.target] == 1
            and calls[node.target] == 1
            and _compatible(modules[source.target], modules[node.target])
        ):
            pairs.append((source.target, node.target))
    return pairs


def _pairs_from_order(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for (first, layer), (second, bn) in zip(children, children[1:]):
            if _compatible(layer, bn):
                prefix = f"{parent_name}." if parent_name else ""
                pairs.append((prefix + first, prefix + second))
    return pairs


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(layer_name, batchnorm_name)`` pairs that :func:`fold_batchnorm` folds.

    Examples
    --------
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    >>> find_conv_bn_pairs(net)
    [('0', '1')]
    """
    try:
        return _pairs_from_graph(model)
    except Exception:  # noqa: BLE001 - any tracing failure means "use the fallback"
        return _pairs_from_order(model)


@torch.no_grad()
def _fold_pair(layer: nn.Module, bn: nn.Module) -> None:
    # float64 so that the folded layer matches conv->bn to ~1e-7 relative, not 1e-5.
    weight = layer.weight.detach().to(torch.float64)
    bias = layer.bias.detach().to(torch.float64) if layer.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    gamma = bn.weight.detach().to(torch.float64) if bn.weight is not None else 1.0
    beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else 0.0
    factor = gamma / torch.sqrt(bn.running_var.to(torch.float64) + bn.eps)
    new_weight = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
    new_bias = (bias - bn.running_mean.to(torch.float64)) * factor + beta
    grad = layer.weight.requires_grad
    layer.weight = nn.Parameter(new_weight.to(layer.weight.dtype), requires_grad=grad)
    layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype), requires_grad=grad)


def fold_pairs(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """Fold the given pairs into ``model`` in place; each BatchNorm becomes ``nn.Identity``."""
    for layer_name, bn_name in pairs:
        _fold_pair(model.get_submodule(layer_name), model.get_submodule(bn_name))
        parent_name, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, nn.Identity())
    return model


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every foldable Conv/Linear + BatchNorm pair folded.

    The BatchNorm's running statistics are used (eval-mode semantics); the folded
    layer gets a bias, and the BatchNorm is replaced by ``nn.Identity`` so module
    names stay the same. ``model`` itself is not changed. See the module docstring for
    how pairs are found.

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    nn.Module
        The folded copy; in eval mode its outputs equal ``model.eval()``'s up to float rounding.

    Examples
    --------
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
    >>> folded = fold_batchnorm(net)
    >>> folded
    Sequential(
      (0): Conv2d(1, 4, kernel_size=(3, 3), stride=(1, 1))
      (1): Identity()
    )
    >>> x = torch.randn(2, 1, 5, 5)
    >>> torch.allclose(folded(x), net(x), atol=1e-6)
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    pairs = find_conv_bn_pairs(model)
    return fold_pairs(copy.deepcopy(model), pairs)
