"""Forward passes: a model's logits over a loader, kept for every metric afterwards."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from quant.device import model_device, to_device


def collect_logits(
    model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], progress: bool = False, desc: str = "eval"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over ``loader`` in inference mode; returns ``(logits, labels)``.

    The model is put in eval mode and runs where it is: each batch's input is moved to
    the model's device (:func:`quant.device.to_device`) and its logits come back to the
    CPU, so every metric afterwards works on CPU tensors whatever the device.

    Returns
    -------
    logits : torch.Tensor
        float32 ``(N, C)`` on the CPU, whatever the model's dtype and device.
    labels : torch.Tensor
        int64 ``(N,)`` on the CPU (they never leave it).
    """
    model.eval()
    device = model_device(model)
    logits, labels = [], []
    batches = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc=desc, leave=False, unit="batch")
    with torch.inference_mode():
        for x, y in batches:
            # .float() before .cpu(): on a GPU the cast runs there, and one copy comes back per batch.
            logits.append(model(to_device(x, device)).float().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
    return torch.cat(logits), torch.cat(labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy as a fraction in [0, 1]."""
    return float((logits.argmax(1) == labels).double().mean()) if len(labels) else float("nan")
