"""Mixed precision on the shipped checkpoint: the proxy's and the allocator's time, and their choices.

Target (issue 13), on 2 idle CPU cores with 1,024 calibration images from the training
split: the allocator plus quantization for one budget costs at most 2 x one GPTQ run.

    .venv/bin/python benchmarks/bench_allocation.py [--accuracy] [--budgets 3,2.5,2,1.5]

Times :func:`quant.proxy.layer_costs` (once: its costs serve every budget) and
:func:`quant.allocation.allocate_bits` (exact and greedy) per budget, prints the width
each layer gets and the average bits, and compares with one GPTQ run at uniform 2 bits
(``quant.quantize_model(method="gptq")`` on the same images). Spec: asymmetric, MSE
clipping, per channel (the config's GPTQ grid). ``--accuracy`` also quantizes with
each allocation (GPTQ, then BN re-estimation) and reports test accuracy and the whole
cost of one budget against the same method at uniform 2 bits. Times are wall clock and
this process's CPU time (steadier on a shared machine). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import quant
from hiercluster.data.datasets import load_dataset, make_loader
from hiercluster.evaluation.inference import accuracy, collect_logits
from hiercluster.models.zoo import load_checkpoint
from hiercluster.run.prepare import calibration_batches
from quant.allocation import allocate_bits, allocation_plan, average_bits
from quant.proxy import DEFAULT_WIDTHS, layer_costs

CHECKPOINT = "data/checkpoints/fashion_mnist_resnet20.pt"


def _numbers(text: str, kind: type) -> list:
    return [kind(part) for part in text.split(",") if part.strip()]


class Timed:
    """Wall-clock and CPU seconds of this process (threads included) for one call.

    On a shared machine the wall time grows with everyone's load; CPU time much less,
    so ratios are given in both.
    """

    def __init__(self, fn, *args, **kwargs) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.result = fn(*args, **kwargs)
        self.wall, self.cpu = time.perf_counter() - wall, time.process_time() - cpu

    def __str__(self) -> str:
        return f"{self.wall:.2f} s ({self.cpu:.2f} s CPU)"


def _ratio(parts: list[Timed], reference: Timed) -> str:
    return f"{sum(p.wall for p in parts) / reference.wall:.2f} ({sum(p.cpu for p in parts) / reference.cpu:.2f} CPU)"


def _total(costs: dict, widths: dict) -> float:
    return sum(costs[name][bits] for name, bits in widths.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="3,2.5,2,1.5", help="average bits per weight, comma separated")
    parser.add_argument("--widths", default=",".join(map(str, DEFAULT_WIDTHS)), help="candidate widths")
    parser.add_argument("--samples", type=int, default=1024, help="calibration images from the training split")
    parser.add_argument("--accuracy", action="store_true", help="quantize with each allocation and evaluate on the test split")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets, widths = _numbers(args.budgets, float), _numbers(args.widths, int)

    model, _ = load_checkpoint(CHECKPOINT)
    model.eval()
    train = load_dataset("fashion_mnist", split="train")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.samples]
    calibration = calibration_batches(train, order, 128)
    spec = quant.QuantSpec(scheme="asymmetric", bits=2, clipping="mse")

    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.2f}")
    if load > (os.cpu_count() or 1):
        print("warning: other processes keep the machine busy; times are inflated")
    print(f"{CHECKPOINT}; {args.samples} calibration images of the training split; spec {spec.tag}; widths {widths}\n")

    proxy = Timed(layer_costs, model, spec, widths, calibration)
    sizes, costs = proxy.result
    gptq = Timed(quant.quantize_model, model, spec, method="gptq", calibration=calibration)
    print(f"layer_costs (one forward pass, {len(sizes)} layers x {len(widths)} widths): {proxy}")
    print(f"one GPTQ run, uniform {spec.bits} bits: {gptq}\n")

    chosen, rows = {}, []
    for budget in budgets:
        try:
            exact = Timed(allocate_bits, sizes, costs, budget)
            greedy = Timed(allocate_bits, sizes, costs, budget, method="greedy")
        except ValueError as err:
            print(f"budget {budget:g}: {err}")
            continue
        chosen[budget] = exact.result
        rows.append(
            f"| {budget:g} | {average_bits(sizes, exact.result):.3f} | {1000 * exact.wall:.1f} | "
            f"{average_bits(sizes, greedy.result):.3f} | {1000 * greedy.wall:.1f} | "
            f"{_total(costs, greedy.result) / _total(costs, exact.result):.4f} | {_ratio([proxy, exact, gptq], gptq)} |"
        )
    print("| budget | exact avg bits | exact ms | greedy avg bits | greedy ms | greedy / exact cost | "
          "(proxy + exact + one GPTQ run) / GPTQ |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))

    print("\nwidths chosen by the exact allocator:\n")
    print("| layer | weights | " + " | ".join(f"{b:g}" for b in chosen) + " |")
    print("|---|---|" + "---|" * len(chosen))
    for name, n in sizes.items():
        print(f"| {name} | {n} | " + " | ".join(str(chosen[b][name]) for b in chosen) + " |")
    print("| average | " + str(sum(sizes.values())) + " | " + " | ".join(f"{average_bits(sizes, w):.3f}" for w in chosen.values()) + " |")

    if args.accuracy:
        _accuracy(model, spec, calibration, chosen, proxy)


def _accuracy(model, spec, calibration, chosen: dict, proxy: Timed) -> None:
    """Quantize with each allocation (GPTQ + BN re-estimation), time it and evaluate it on the test split.

    The reference is the same method at uniform ``spec.bits``, so the ratio compares like with like.
    """
    test = load_dataset("fashion_mnist", split="test")
    loader = make_loader(test, 500)
    logits, labels = collect_logits(model, loader)
    reference = Timed(quant.quantize_model, model, spec, method="gptq", calibration=calibration, bn_reestimate=True)
    uniform, _ = collect_logits(reference.result[0], loader)
    print(f"\nfloat test accuracy: {100 * accuracy(logits, labels):.2f}%; GPTQ + BN re-estimation at uniform "
          f"{spec.bits} bits: {100 * accuracy(uniform, labels):.2f}% in {reference}\n")
    print("| budget | report avg bits | GPTQ + BN | (proxy + allocation + quantization) / uniform GPTQ + BN | test acc % |")
    print("|---|---|---|---|---|")
    for budget, widths in chosen.items():
        plan = allocation_plan(widths, name=f"mixed-{budget:g}b")
        allocation = Timed(allocate_bits, *proxy.result, budget)
        run = Timed(quant.quantize_model, model, spec, plan, method="gptq", calibration=calibration, bn_reestimate=True)
        qmodel, report = run.result
        logits, _ = collect_logits(qmodel, loader)
        print(f"| {budget:g} | {report.avg_bits:.3f} | {run} | {_ratio([proxy, allocation, run], reference)} | "
              f"{100 * accuracy(logits, labels):.2f} |", flush=True)


if __name__ == "__main__":
    main()
