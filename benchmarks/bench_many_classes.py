"""Grouped metrics at ImageNet scale: 1,000 classes x 50,000 samples, 10 levels, 100 random groupings.

Target (issue 11, item 7): <= 30 CPU-s per spec and < 4 GB peak memory. Prints figures;
asserts nothing. Each path runs in a child process of its own, so that the peak resident
memory it reports (``getrusage`` maxrss) is its own, and CPU time is ``time.process_time``
(all threads of the child).

    .venv/bin/python benchmarks/bench_many_classes.py [--specs 2] [--old-random 5] [--kernels]

* new: :func:`evaluate_levels` with the float side computed once per run
  (:func:`float_level_stats`); per spec only the quantized side is scored (segment sums for
  many groups, one-hot products for few, every distinct grouping once).
* old: the grouped-accuracy kernel and ``evaluate_levels`` as they were before issue 11
  (batched one-hot products of every grouping, float side per spec), copied below. With
  100 random groupings it would take many minutes per spec, so it runs with
  ``--old-random`` of them per level; its per-spec figure is extrapolated from the
  measured cost of each level, linearly in the number of groupings (said so in the output).
  The rows of both paths with ``--old-random`` random groupings are compared.
* ``--kernels``: CPU ms per grouping of the two kernels of the new path at several k
  (where the segment sum starts to win: ``_SEGMENT_MIN_K``).

Synthetic data: class embeddings in 64 dimensions, logits ``10 * cos(feature, class)``
of noisy features; the quantized logits add Gaussian noise. The levels are cuts of a
Ward tree of the class embeddings at :func:`hiercluster.run.prepare.default_level_ks`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

N_SAMPLES, N_CLASSES, N_RANDOM, SEED = 50_000, 1_000, 100, 0


def synthetic(n_specs: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, dict[int, np.ndarray]]:
    """Float logits, ``n_specs`` quantized logit sets, labels and the levels, all seeded."""
    from scipy.cluster.hierarchy import cut_tree, linkage

    from hiercluster.hierarchy.groupings import canonical_assignment
    from hiercluster.run.prepare import default_level_ks

    g = torch.Generator().manual_seed(SEED)
    classes = F.normalize(torch.randn(N_CLASSES, 64, generator=g), dim=1)
    labels = torch.randint(0, N_CLASSES, (N_SAMPLES,), generator=g)
    features = F.normalize(classes[labels] + 0.12 * torch.randn(N_SAMPLES, 64, generator=g), dim=1)
    float_logits = 10 * features @ classes.T
    quant = [float_logits + (1.0 + 0.5 * i) * torch.randn(N_SAMPLES, N_CLASSES, generator=g) for i in range(n_specs)]
    ks = default_level_ks(N_CLASSES)
    cuts = cut_tree(linkage(classes.numpy().astype(np.float64), "ward"), n_clusters=ks)
    levels = {k: canonical_assignment(cuts[:, i]) for i, k in enumerate(ks)}
    return float_logits, quant, labels, levels


# --- the path before issue 11, verbatim but for names ------------------------------------


def old_grouped_accuracies(logits: torch.Tensor, labels: torch.Tensor, assignments: np.ndarray, reduction: str) -> np.ndarray:
    from hiercluster.evaluation.heads import group_argmax

    z, y = logits, labels
    a = torch.as_tensor(np.asarray(assignments)).long()
    n = len(y)
    sizes = a.max(1).values + 1
    order = torch.argsort(sizes, stable=True)
    out = np.empty(len(a))
    lo = 0
    while lo < len(a):
        hi = lo + 1
        while hi < len(a) and (hi + 1 - lo) * n * int(sizes[order[hi]]) <= 1 << 21:
            hi += 1
        rows = order[lo:hi]
        block = a[rows]
        predicted = group_argmax(z, F.one_hot(block, int(sizes[rows].max())), reduction)
        out[rows.numpy()] = (predicted == block[:, y]).sum(1).numpy() / n
        lo = hi
    return out


def old_evaluate_levels(zf, zq, y, levels, n_random, seed, reduction="prob_sum") -> tuple[list[dict[str, Any]], dict[int, float]]:
    """The old evaluate_levels, one level at a time, with its CPU-s per level.

    The old code stacked all levels in one call; at 50,000 samples a block of its products
    holds at most 40 groups, so scoring level by level costs about the same.
    """
    from hiercluster.evaluation.inference import accuracy
    from hiercluster.evaluation.metrics import advantage, drop, random_groupings

    rows, cpu = [], {}
    for k, a in levels.items():
        t0 = time.process_time()
        stack = np.concatenate([a[None], random_groupings(a, n_random, seed)])
        acc_f = old_grouped_accuracies(zf, y, stack, reduction)
        acc_q = old_grouped_accuracies(zq, y, stack, reduction)
        cpu[k] = time.process_time() - t0
        rand_f, rand_q = acc_f[1:], acc_q[1:]
        rand_drop = drop(rand_f, rand_q)
        level_drop = drop(acc_f[0], acc_q[0])
        rows.append(
            {
                "k": int(k), "reduction": reduction, "n_random": n_random,
                "fine_acc_float": accuracy(zf, y), "fine_acc_quant": accuracy(zq, y),
                "acc_float": float(acc_f[0]), "acc_quant": float(acc_q[0]), "drop": level_drop,
                "random_acc_float_mean": float(rand_f.mean()), "random_acc_float_std": float(rand_f.std()),
                "random_acc_quant_mean": float(rand_q.mean()), "random_acc_quant_std": float(rand_q.std()),
                "random_drop_mean": float(rand_drop.mean()), "random_drop_std": float(rand_drop.std()),
                "advantage": advantage(level_drop, float(rand_drop.mean())),
            }
        )
    return rows, cpu


# --- the children ----------------------------------------------------------------------------


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def child_new(specs: int, old_random: int) -> dict[str, Any]:
    from hiercluster.evaluation.metrics import evaluate_levels, float_level_stats

    zf, quant, y, levels = synthetic(specs)
    t0, w0 = time.process_time(), time.perf_counter()
    stats = float_level_stats(zf, y, levels, N_RANDOM, SEED)
    float_cpu, float_wall = time.process_time() - t0, time.perf_counter() - w0
    per_spec = []
    for zq in quant:
        t0, w0 = time.process_time(), time.perf_counter()
        evaluate_levels(zf, zq, y, levels, N_RANDOM, SEED, float_stats=stats)
        per_spec.append((time.process_time() - t0, time.perf_counter() - w0))
    peak = peak_gb()
    rows = evaluate_levels(zf, quant[0], y, levels, old_random, SEED)  # for the comparison, after the peak
    return {"float_cpu": float_cpu, "float_wall": float_wall, "per_spec": per_spec, "peak_gb": peak, "rows": rows,
            "levels": list(levels)}


def child_old(old_random: int) -> dict[str, Any]:
    zf, quant, y, levels = synthetic(1)
    t0, w0 = time.process_time(), time.perf_counter()
    rows, cpu = old_evaluate_levels(zf, quant[0], y, levels, old_random, SEED)
    total_cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    # Every level's cost is linear in its number of groupings (1 learned + n_random), both logit sets scored.
    extrapolated = sum(c * (1 + N_RANDOM) / (1 + old_random) for c in cpu.values())
    return {"cpu": total_cpu, "wall": wall, "per_level_cpu": cpu, "extrapolated_cpu": extrapolated,
            "peak_gb": peak_gb(), "rows": rows}


def child_kernels() -> dict[str, Any]:
    import hiercluster.evaluation.metrics as metrics

    zf, _, y, _ = synthetic(0)
    source = torch.exp(zf - zf.amax(1, keepdim=True))
    rng = np.random.default_rng(SEED)
    out = {}
    for k in (4, 8, 12, 16, 24, 32, 64):
        a = np.stack([rng.permutation(np.arange(N_CLASSES) % k) for _ in range(30)])  # 30 groupings, sizes ~C/k
        times = {}
        for name, kernel in (("one-hot", metrics._dense_counts), ("segment", metrics._segment_counts)):
            t0 = time.process_time()
            kernel(source, y, a, "prob_sum")
            times[name] = 1000 * (time.process_time() - t0) / len(a)
        out[k] = times
    return out


def run_child(*args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(new_rows: list[dict[str, Any]], old_rows: list[dict[str, Any]]) -> tuple[float, int]:
    """Largest absolute difference of any number in the rows, and how many values differ."""
    worst, differ = 0.0, 0
    for a, b in zip(new_rows, old_rows, strict=True):
        assert a.keys() == b.keys(), (a.keys(), b.keys())
        for key, value in a.items():
            if isinstance(value, float):
                worst = max(worst, abs(value - b[key]))
                differ += value != b[key]
            else:
                differ += value != b[key]
    return worst, differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", type=int, default=2, help="quantized logit sets the new path scores (default 2)")
    parser.add_argument("--old-random", type=int, default=5, help="random groupings per level of the old path (default 5)")
    parser.add_argument("--kernels", action="store_true", help="also time the two kernels per grouping at several k")
    parser.add_argument("--child", choices=["new", "old", "kernels"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = {"new": lambda: child_new(args.specs, args.old_random), "old": lambda: child_old(args.old_random),
                  "kernels": child_kernels}[args.child]()
        print(json.dumps(result, default=float))
        return

    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"data: {N_CLASSES} classes x {N_SAMPLES} samples, {N_RANDOM} random groupings per level")
    new = run_child("--child", "new", "--specs", str(args.specs), "--old-random", str(args.old_random))
    cpu = [c for c, _ in new["per_spec"]]
    wall = [w for _, w in new["per_spec"]]
    print(f"levels: {new['levels']}")
    print(f"new: float side once per run {new['float_cpu']:.1f} CPU-s ({new['float_wall']:.1f} s wall); "
          f"per spec {np.mean(cpu):.1f} CPU-s (max {max(cpu):.1f}; {np.mean(wall):.1f} s wall) over {len(cpu)} specs; "
          f"peak {new['peak_gb']:.2f} GB  (target <= 30 CPU-s per spec, < 4 GB)")
    old = run_child("--child", "old", "--old-random", str(args.old_random))
    per_level = ", ".join(f"k={k}: {c:.1f}" for k, c in old["per_level_cpu"].items())
    print(f"old: with {args.old_random} random groupings per level {old['cpu']:.1f} CPU-s ({old['wall']:.1f} s wall) "
          f"per spec [{per_level}]; peak {old['peak_gb']:.2f} GB")
    print(f"old: extrapolated to {N_RANDOM} random groupings per level: {old['extrapolated_cpu']:.0f} CPU-s per spec "
          f"(x{old['extrapolated_cpu'] / np.mean(cpu):.0f} the new path's)")
    worst, differ = compare(new["rows"], old["rows"])
    print(f"rows of both paths with {args.old_random} random groupings: {differ} values differ, "
          f"largest difference {worst:.3g} (the new path reports the identity levels' spread as exactly 0)")
    if args.kernels:
        kernels = run_child("--child", "kernels")
        print("CPU ms per grouping (30 groupings of each k):")
        for k, times in kernels.items():
            print(f"  k={k:>3}: one-hot {times['one-hot']:7.1f}  segment {times['segment']:7.1f}")


if __name__ == "__main__":
    main()
