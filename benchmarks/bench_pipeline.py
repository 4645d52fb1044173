"""Cost of `hiercluster run` against single float evaluations of the eval set.

Targets (issue 5): a sweep of N specs costs at most 1.15 x (N + 1) single float
evaluations (all levels, random baselines, sizes and report included); the default demo
finishes within 3 minutes on 2 CPU cores after set-up; a resumed run with nothing left
to do finishes in under 10 s.

    .venv/bin/python benchmarks/bench_pipeline.py [CONFIG]     (default configs/fashion_mnist.yaml)

Prints figures; asserts nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hiercluster.run.config import load_config
from hiercluster.data.datasets import load_dataset, make_loader
from hiercluster.evaluation.inference import collect_logits
from hiercluster.run.grid import expand_grid
from hiercluster.run.prepare import load_float_model


def float_eval_seconds(cfg, repeats: int = 3) -> float:
    ds = load_dataset(cfg.data.dataset, cfg.data.root, cfg.data.eval_split)
    model, _ = load_float_model(cfg, list(ds.classes), int(ds[0][0].shape[0]))
    collect_logits(model, make_loader(ds, cfg.data.batch_size))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        collect_logits(model, make_loader(ds, cfg.data.batch_size))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_run(config: str, out: Path) -> float:
    exe = Path(sys.executable).with_name("hiercluster")
    t0 = time.perf_counter()
    subprocess.run([str(exe), "run", config, "--out", str(out), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    config = sys.argv[1] if len(sys.argv) > 1 else "configs/fashion_mnist.yaml"
    cfg = load_config(config)
    n_specs = len(expand_grid(cfg))
    print(f"machine: {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    t_float = float_eval_seconds(cfg)
    print(f"config {config}: {n_specs} specs; one float evaluation of the {cfg.data.eval_split} split: {t_float:.2f} s")

    out = Path(tempfile.mkdtemp(prefix="hiercluster-bench-")) / "run"
    try:
        wall = timed_run(config, out)
        info = json.loads((out / "run.json").read_text())
        total = info["timings"]["total_s"]
        budget = 1.15 * (n_specs + 1) * t_float
        print(f"fresh run: {wall:.1f} s wall (process start and imports included), {total:.1f} s inside the pipeline")
        print(
            f"  pipeline cost = {total / t_float:.1f} float evaluations for N + 1 = {n_specs + 1}: "
            f"ratio {total / ((n_specs + 1) * t_float):.3f} (target <= 1.15, i.e. <= {budget:.1f} s)"
        )
        print(f"  demo target: wall {wall:.1f} s <= 180 s")
        resumed = timed_run(config, out)
        print(f"resumed run with nothing to do: {resumed:.1f} s wall (target < 10 s)")
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
