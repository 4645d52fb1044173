"""Evaluation from kept logits: one forward pass per model, every metric afterwards.

:func:`collect_logits` runs a model once over a loader; everything else in this module
works on the logits it returns, never re-running the model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn


def collect_logits(
    model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], progress: bool = False, desc: str = "eval"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over ``loader`` in inference mode; returns ``(logits, labels)``.

    The model is put in eval mode. Logits are float32 ``(N, C)``, labels int64 ``(N,)``.
    """
    model.eval()
    logits, labels = [], []
    batches = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc=desc, leave=False, unit="batch")
    with torch.inference_mode():
        for x, y in batches:
            logits.append(model(x).float())
            labels.append(torch.as_tensor(y).long())
    return torch.cat(logits), torch.cat(labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy as a fraction in [0, 1]."""
    return float((logits.argmax(1) == labels).float().mean()) if len(labels) else float("nan")
