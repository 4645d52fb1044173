"""Grouped metrics from kept logits: 10 levels x 20 random groupings x 10,000 samples.

Target (issue 4): well under a second. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/bench_metrics.py
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from hiercluster.evaluation.metrics import evaluate_levels


def main() -> None:
    torch.manual_seed(0)
    n, c = 10_000, 10
    labels = torch.randint(0, c, (n,))
    float_logits = torch.randn(n, c) + 3 * torch.nn.functional.one_hot(labels, c)
    quant_logits = float_logits + torch.randn(n, c)
    rng = np.random.default_rng(0)
    # Level k: classes 0..k-1 in their own groups, the rest spread at random (every id used).
    levels = {k: np.concatenate([np.arange(k), rng.integers(0, k, c - k)]) for k in range(c, 0, -1)}
    evaluate_levels(float_logits, quant_logits, labels, levels)  # warm-up
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        evaluate_levels(float_logits, quant_logits, labels, levels, n_random=20, seed=0)
        times.append(time.perf_counter() - t0)
    print(f"machine: {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")
    print(
        f"evaluate_levels, {len(levels)} levels x 20 random groupings x {n} samples (float and quantized logits): "
        f"median {1000 * np.median(times):.0f} ms, min {1000 * min(times):.0f} ms (target: well under 1 s)"
    )


if __name__ == "__main__":
    main()
