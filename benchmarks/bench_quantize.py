"""Speed of quant on torchvision resnet18 (11.7 M parameters, weights=None): figures, not a test.

Times the quantization of every Conv/Linear weight (per channel, 4 bits by default):
choosing parameters (with the clipping search), integer codes, and the fake-quantized
values, i.e. what :func:`quant.quantize_model` does per layer. BatchNorm folding, the
deep copy, the report statistics and the whole ``quantize_model`` call are timed
separately, as are ``model_size`` and the packed file's save and load. Each figure is the median of ``--repeat`` runs.

Targets (issue 3, on 2 CPU cores): minmax < 0.2 s, mse < 3 s.

    python benchmarks/bench_quantize.py [--bits 4] [--repeat 5] [--threads N]

The load average is printed too: on a shared machine, torch's OpenMP threads wait for
each other when another process holds a core, and ``--threads 1`` may then be faster.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quant  # noqa: E402
from quant.fold import find_conv_bn_pairs, fold_pairs  # noqa: E402
from quant.model import quantizable_layers  # noqa: E402

TARGETS = {"minmax": 0.2, "mse": 3.0}


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    n_params = sum(p.numel() for p in model.parameters())
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"machine: os.cpu_count()={os.cpu_count()}, torch.get_num_threads()={torch.get_num_threads()}, "
          f"load average {load}, torch {torch.__version__}, python {sys.version.split()[0]}")
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print("note: the load average exceeds the core count, other processes compete for the cores; "
              "torch's threads then wait on each other (compare with --threads 1)")
    print(f"model: torchvision resnet18, {n_params / 1e6:.2f} M parameters; per_channel, {args.bits} bits; "
          f"median of {args.repeat} runs")

    t_copy = median_time(lambda: copy.deepcopy(model), args.repeat)
    t_fold = median_time(lambda: quant.fold_batchnorm(model), args.repeat)
    folded = fold_pairs(copy.deepcopy(model), find_conv_bn_pairs(model))
    weights = [m.weight.detach() for _, m in quantizable_layers(folded)]
    print(f"deepcopy {t_copy:.3f} s | fold_batchnorm (trace + copy + fold) {t_fold:.3f} s | "
          f"{len(weights)} Conv/Linear weights, {sum(w.numel() for w in weights) / 1e6:.2f} M elements")
    print()
    print(f"{'clipping':<11}{'scheme':<12}{'weights (s)':>12}{'target':>9}  status")
    for clipping in ("minmax", "mse", "percentile"):
        for scheme in ("asymmetric", "symmetric", "pow2"):
            spec = quant.QuantSpec(scheme=scheme, bits=args.bits, clipping=clipping)

            def run() -> None:
                for w in weights:
                    codes, params = quant.quantize(w, spec)
                    quant.dequantize(codes, params)

            run()  # warm-up
            seconds = median_time(run, args.repeat)
            target = TARGETS.get(clipping)
            status = "" if target is None else ("ok" if seconds < target else "OVER TARGET")
            shown = "-" if target is None else f"< {target:g}"
            print(f"{clipping:<11}{scheme:<12}{seconds:>12.3f}{shown:>9}  {status}")
    print()
    for clipping in ("minmax", "mse"):
        spec = quant.QuantSpec(bits=args.bits, clipping=clipping)
        seconds = median_time(lambda: quant.quantize_model(model, spec), max(1, args.repeat // 2))
        print(f"whole quantize_model (asymmetric, {clipping}; copy + fold + weights + report): {seconds:.3f} s")

    qmodel, report = quant.quantize_model(model, quant.QuantSpec(bits=args.bits))
    start = time.perf_counter()
    sizes = quant.model_size(qmodel, report)
    t_size = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet18.qpk"
        start = time.perf_counter()
        quant.save_packed(path, qmodel, report)
        t_save = time.perf_counter() - start
        start = time.perf_counter()
        quant.load_packed(path, model)
        t_load = time.perf_counter() - start
    print(f"model_size {t_size:.3f} s (gzip -9 and xz -6 of the payload included) | save_packed {t_save:.3f} s | "
          f"load_packed {t_load:.3f} s")
    mib = {k: v / 2**20 for k, v in sizes.items()}
    print(f"sizes (MiB): fp32 {mib['fp32_bytes']:.2f} | packed {mib['packed_bytes']:.2f} "
          f"(codes {mib['codes_bytes']:.2f}, scales/zero points {mib['qparams_bytes']:.3f}, float {mib['float_bytes']:.3f}) | "
          f"gzip {mib['gzip_bytes']:.2f} | xz {mib['xz_bytes']:.2f}")


if __name__ == "__main__":
    main()
