"""Baseline training: SGD with a one-cycle or cosine schedule, batch-level augmentation.

Augmentation (random crop after padding, horizontal flip) runs on whole batches of
tensors, which keeps training on 2 CPU cores fast for the small in-memory datasets.
"""

from __future__ import annotations

import platform
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from hiercluster.data.datasets import dataset_info, make_loader
from hiercluster.evaluation.inference import accuracy, collect_logits
from hiercluster.run.config import TrainConfig
from quant.device import model_device, to_device


def augment_batch(x: torch.Tensor, crop_padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop of each image after replicate-padding by ``crop_padding``; random horizontal flip."""
    n, _, h, w = x.shape
    if crop_padding > 0:
        p = crop_padding
        padded = F.pad(x, (p, p, p, p), mode="replicate")
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (n, h, 1)
        cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (n, 1, w)
        x = padded[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2).contiguous()
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def train_model(
    model: nn.Module,
    train_set: Dataset,
    cfg: TrainConfig,
    eval_set: Dataset | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model`` in place, on its device; returns a history with per-epoch loss and accuracies.

    The model trains where it is (move it first to train on a GPU); each batch is
    augmented on the CPU, then moved there (:func:`quant.device.to_device`), so the
    augmentation draws the same numbers on every device. Deterministic for a given
    ``cfg.seed`` on the same machine and device: the initial weights are the caller's,
    and shuffling and augmentation draw from generators seeded from it.
    """
    device = model_device(model)
    torch.manual_seed(cfg.seed)
    loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on BN and biases
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.momentum > 0,
    )
    steps = cfg.epochs * len(loader)
    if cfg.schedule == "onecycle":
        sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.25
        )
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    history: dict[str, list[float]] = {"loss": [], "train_acc": [], "test_acc": []}
    from tqdm.auto import tqdm

    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(
            loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not progress, leave=False, mininterval=2.0
        )
        for x, y in bar:
            x, y = to_device((augment_batch(x, cfg.crop_padding, cfg.hflip, gen), y), device)
            out = model(x)
            loss = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(y)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
        history["loss"].append(total_loss / max(seen, 1))
        history["train_acc"].append(correct / max(seen, 1))
        line = f"epoch {epoch + 1}/{cfg.epochs}: loss {total_loss / max(seen, 1):.4f}, train acc {correct / max(seen, 1):.4f}"
        if eval_set is not None:
            acc = accuracy(*collect_logits(model, make_loader(eval_set, 256)))
            history["test_acc"].append(acc)
            line += f", test acc {acc:.4f}"
        if progress:
            tqdm.write(line + f" ({time.perf_counter() - start:.0f} s)")
    history["wall_time_s"] = [time.perf_counter() - start]
    model.eval()
    return history


def library_versions() -> dict[str, str]:
    """Versions recorded in checkpoint metadata and run directories."""
    import numpy
    import scipy
    import sklearn
    import torchvision

    from hiercluster import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
        "hiercluster": __version__,
    }


def checkpoint_metadata(
    dataset_name: str,
    arch: str,
    width: int,
    train_set: Dataset,
    cfg: TrainConfig,
    history: dict[str, Any],
    test_accuracy: float,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """The JSON written beside a trained checkpoint: enough to rebuild and to reproduce it.

    ``device``: where it was trained (with the threads, part of "the same machine" that
    reproduces it exactly).
    """
    info = dataset_info(train_set)
    return {
        "dataset": dataset_name,
        "arch": arch,
        "width": width,
        "num_classes": len(info["classes"]),
        "in_channels": info["in_channels"],
        "image_size": info["image_size"],
        # The normalization the model was trained with: an image folder evaluated with this
        # checkpoint uses it unless the config says otherwise (data.resolve_folder_options).
        **{key: info[key] for key in ("mean", "std") if key in info},
        "classes": info["classes"],
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "train": {k: v for k, v in vars(cfg).items()},
        "test_accuracy": test_accuracy,
        "wall_time_s": round(history["wall_time_s"][0], 1),
        "history": {k: v for k, v in history.items() if k != "wall_time_s"},
        "threads": torch.get_num_threads(),
        "device": str(device),
        "versions": library_versions(),
    }
