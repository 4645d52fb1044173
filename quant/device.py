"""Where a model lives, and the one helper that moves batches there.

Every forward pass in :mod:`quant` on caller-given batches (calibration for GPTQ,
AdaRound, BN re-estimation, activation ranges) goes through :func:`to_device`, so a
model on a GPU works with calibration batches that stay on the CPU: each batch is moved
once, right before the forward pass that needs it, and nothing else in the package
assumes the CPU. Code that writes files (packing, saving) moves tensors to the CPU
itself.

Examples
--------
>>> import torch.nn as nn
>>> net = nn.Linear(3, 2)
>>> model_device(net)
device(type='cpu')
>>> x, y = to_device((torch.zeros(4, 3), torch.zeros(4)), model_device(net))
>>> net(x).shape
torch.Size([4, 2])
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn as nn

T = TypeVar("T")


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter, else of its first buffer, else the CPU.

    A model split across devices is not supported here: its first parameter's device is
    where its inputs go.

    Examples
    --------
    >>> model_device(nn.Sequential(nn.Linear(2, 2)))
    device(type='cpu')
    >>> model_device(nn.ReLU())
    device(type='cpu')
    """
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def to_device(batch: T, device: torch.device | str) -> T:
    """``batch`` with every tensor in it on ``device``; other values are returned as they are.

    ``batch`` may be a tensor, or a tuple (named tuples included), list or dict of
    batches, nested to any depth. A tensor already on ``device`` is returned itself (no
    copy). A pinned CPU tensor is copied to a CUDA device asynchronously
    (``non_blocking``), which is safe: the copy is ordered before any kernel that later
    reads it on the same stream. Dtypes are never changed.

    Parameters
    ----------
    batch : tensor, tuple, list or dict
        What a loader yields: ``x``, ``(x, y)``, ``{"image": x, ...}``.
    device : torch.device or str
        Where the tensors go (usually :func:`model_device` of the model that reads them).

    Returns
    -------
    The same structure (same container types) with tensors on ``device``.

    Examples
    --------
    >>> out = to_device({"x": torch.ones(2), "meta": [torch.zeros(1), "name"]}, "cpu")
    >>> out["meta"][1], out["x"].device
    ('name', device(type='cpu'))
    """
    device = torch.device(device)
    if isinstance(batch, torch.Tensor):
        # Pinned memory only matters for a host-to-CUDA copy; is_pinned() is not asked otherwise.
        non_blocking = device.type == "cuda" and batch.device.type == "cpu" and batch.is_pinned()
        return batch.to(device, non_blocking=non_blocking)  # type: ignore[return-value]
    if isinstance(batch, dict):
        return type(batch)((key, to_device(value, device)) for key, value in batch.items())  # type: ignore[call-arg]
    if isinstance(batch, tuple):
        items = [to_device(item, device) for item in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)  # type: ignore[return-value]
    if isinstance(batch, list):
        return type(batch)(to_device(item, device) for item in batch)  # type: ignore[return-value]
    return batch


def to_model_device(batch: T, model: nn.Module) -> T:
    """``to_device(batch, model_device(model))``: the batch where ``model`` can read it."""
    return to_device(batch, model_device(model))


__all__ = ["model_device", "to_device", "to_model_device"]
