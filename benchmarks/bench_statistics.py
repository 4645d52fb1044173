"""The statistics of issue 12 from kept logits: 10,000 samples, 10 levels, 100 random groupings, 1,000 resamples.

Times :func:`evaluate_levels` with the paired bootstrap (float side computed once, as a run
does, then the per-spec quantized side with intervals, rank p and absorbed shares) plus
:func:`fine_bootstrap`, against one float evaluation of the shipped Fashion-MNIST
resnet20 on 10,000 images (forward passes in batches of 128, as ``data.batch_size``).
Target (issue 12): the per-spec statistics at most 0.2x that evaluation. Prints figures;
asserts nothing.

    .venv/bin/python benchmarks/bench_statistics.py
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from hiercluster.evaluation.metrics import evaluate_levels, fine_bootstrap, float_level_stats
from hiercluster.models.zoo import load_checkpoint

CHECKPOINT = Path(__file__).resolve().parents[1] / "data" / "checkpoints" / "fashion_mnist_resnet20.pt"
N, C, N_RANDOM, BOOTSTRAP, BATCH = 10_000, 10, 100, 1_000, 128


def float_eval_seconds() -> float:
    """One forward pass of the shipped model over 10,000 28x28 images (the best of three)."""
    model, meta = load_checkpoint(CHECKPOINT)
    model.eval()
    x = torch.randn(N, int(meta["in_channels"]), 28, 28)
    times = []
    with torch.inference_mode():
        for _ in range(3):
            t0 = time.perf_counter()
            for lo in range(0, N, BATCH):
                model(x[lo : lo + BATCH])
            times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, C, (N,))
    float_logits = torch.randn(N, C) + 3 * torch.nn.functional.one_hot(labels, C)
    quant_logits = float_logits + torch.randn(N, C)
    rng = np.random.default_rng(0)
    levels = {k: np.concatenate([np.arange(k), rng.integers(0, k, C - k)]) for k in range(C, 0, -1)}
    t0 = time.perf_counter()
    stats = float_level_stats(float_logits, labels, levels, N_RANDOM, 0, bootstrap=BOOTSTRAP)
    float_side = time.perf_counter() - t0
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        evaluate_levels(float_logits, quant_logits, labels, levels, N_RANDOM, 0, float_stats=stats, bootstrap=BOOTSTRAP)
        fine_bootstrap(float_logits, quant_logits, labels, BOOTSTRAP, 0)
        times.append(time.perf_counter() - t0)
    plain = []
    plain_stats = float_level_stats(float_logits, labels, levels, N_RANDOM, 0)
    for _ in range(5):
        t0 = time.perf_counter()
        evaluate_levels(float_logits, quant_logits, labels, levels, N_RANDOM, 0, float_stats=plain_stats)
        plain.append(time.perf_counter() - t0)
    forward = float_eval_seconds()
    per_spec = float(np.median(times))
    print(f"machine: {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")
    print(f"float side once per run (with per-sample correctness): {1000 * float_side:.0f} ms")
    print(
        f"per spec, {len(levels)} levels x {N_RANDOM} random groupings x {N} samples x {BOOTSTRAP} resamples: "
        f"median {1000 * per_spec:.0f} ms (without the bootstrap: {1000 * np.median(plain):.0f} ms; the first call "
        f"{1000 * times[0]:.0f} ms draws the resamples)"
    )
    print(f"one float evaluation of the shipped resnet20 on {N} images: {forward:.2f} s")
    print(f"ratio: {per_spec / forward:.3f}x (target <= 0.2x)")


if __name__ == "__main__":
    main()
