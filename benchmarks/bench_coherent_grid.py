"""Data-free "coherent" grid vs min-max, MSE clipping and HQQ: accuracy and speed (figures, not a test).

Accuracy: the shipped ResNet-20 on the Fashion-MNIST test split, weights only, per
channel, every Conv/Linear at the same width (2, 3, 4 bits), BatchNorm folded first
(``quant.quantize_model``), for clipping ``minmax``, ``mse`` and ``coherent``, asymmetric and
symmetric. Speed: every Conv/Linear weight of torchvision's resnet18 (weights=None,
BatchNorm folded), per channel, 4 bits: parameters + codes + values, median of
``--repeat`` runs, each also as a multiple of torch's per-channel kernel
(``torch.fake_quantize_per_channel_affine`` with min-max parameters computed by torch)
measured in the same process.

HQQ (issue 8's reference, data-free, float zero point) is a peer, not a dependency: it
runs in a subprocess with the interpreter ``$HQQ_PYTHON`` (default
``/tmp/peers/bin/python``), a separate venv that sees this project's packages, made with

    python3 -m venv /tmp/peers
    echo $PWD/.venv/lib/python3.11/site-packages > /tmp/peers/lib/python3.11/site-packages/project.pth
    /tmp/peers/bin/pip install --no-deps hqq termcolor

It quantizes the same folded weights with ``hqq.core.quantize.Quantizer.quantize``
(nbits b, axis=1, group_size=None: one group per output channel, its default proximal
optimizer: l_p 0.7, beta 10, kappa 1.01, 20 iterations) and is evaluated the same way.
Without it the table says "hqq: not installed".

    python benchmarks/bench_coherent_grid.py [--quick] [--threads N] [--repeat 3]

``--quick``: 2 bits only, asymmetric only, the first 2,000 test images, one timing run.
Needs data/checkpoints/fashion_mnist_resnet20.pt and the Fashion-MNIST files
(``/usr/share/datasets/fashion-mnist``, Debian package ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import quant  # noqa: E402
from quant.fold import find_conv_bn_pairs, fold_pairs  # noqa: E402
from quant.model import quantizable_layers  # noqa: E402
from bench_quantize import median_time  # noqa: E402  (this script's folder is on sys.path)

CHECKPOINT = ROOT / "data" / "checkpoints" / "fashion_mnist_resnet20.pt"
DEFAULT_HQQ_PYTHON = "/tmp/peers/bin/python"
CLIPPINGS = ("minmax", "mse", "coherent")
TIMING_BITS = 4


def test_batches(limit: int | None):
    from hiercluster.data.datasets import load_dataset, make_loader

    batches, seen = [], 0
    for x, y in make_loader(load_dataset("fashion_mnist", split="test"), 500):
        batches.append((x, y))
        seen += len(y)
        if limit is not None and seen >= limit:
            break
    return batches


def accuracy(model: torch.nn.Module, batches) -> float:
    from hiercluster.evaluation.inference import accuracy as top1
    from hiercluster.evaluation.inference import collect_logits

    return 100.0 * top1(*collect_logits(model, batches))


def resnet18_weights() -> list[torch.Tensor]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    folded = fold_pairs(copy.deepcopy(model), find_conv_bn_pairs(model))
    return [m.weight.detach() for _, m in quantizable_layers(folded)]


def torch_unit(weights: list[torch.Tensor], bits: int) -> None:
    """torch alone: per-channel min-max parameters, then torch's fake-quant kernel."""
    qmax = 2**bits - 1
    for w in weights:
        rows = w.reshape(w.shape[0], -1)
        lo, hi = rows.amin(1).clamp(max=0), rows.amax(1).clamp(min=0)
        scale = ((hi - lo) / qmax).clamp(min=torch.finfo(torch.float32).tiny)
        zero_point = (-torch.round(lo / scale)).to(torch.int32).clamp(0, qmax)
        torch.fake_quantize_per_channel_affine(w, scale, zero_point, 0, 0, qmax)


# ---------------------------------------------------------------- HQQ, in its own interpreter


def hqq_fake_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    from hqq.core.quantize import Quantizer

    rows = w.reshape(w.shape[0], -1).float()
    codes, meta = Quantizer.quantize(
        rows, nbits=bits, channel_wise=True, group_size=None, optimize=True, axis=1, bitpack=False, device="cpu"
    )
    return ((codes - meta["zero"]) * meta["scale"]).reshape(w.shape).to(w.dtype)


def hqq_worker(options: dict) -> None:
    """Runs under $HQQ_PYTHON: prints one JSON line with HQQ's accuracies and timing."""
    import warnings

    warnings.filterwarnings("ignore")
    try:
        import hqq.core.quantize  # noqa: F401
    except ImportError as err:
        print(json.dumps({"error": f"not installed ({err})"}))
        return
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    from hiercluster.models.zoo import load_checkpoint

    model, _ = load_checkpoint(CHECKPOINT)
    batches = test_batches(options["limit"])
    folded = quant.fold_batchnorm(model.eval())
    acc = {}
    for bits in options["bits"]:
        qmodel = copy.deepcopy(folded)
        with torch.no_grad():
            for _, layer in quantizable_layers(qmodel):
                layer.weight.copy_(hqq_fake_quantize(layer.weight.detach(), bits))
        acc[bits] = accuracy(qmodel, batches)
    weights = resnet18_weights()
    hqq_fake_quantize(weights[0], TIMING_BITS)  # warm-up
    unit = median_time(lambda: torch_unit(weights, TIMING_BITS), options["repeat"])
    seconds = median_time(lambda: [hqq_fake_quantize(w, TIMING_BITS) for w in weights], options["repeat"])
    import hqq

    print(json.dumps({"accuracy": acc, "seconds": seconds, "unit": unit, "version": getattr(hqq, "__version__", "?")}))


def run_hqq(options: dict) -> dict:
    python = os.environ.get("HQQ_PYTHON", DEFAULT_HQQ_PYTHON)
    python = shutil.which(python) or python
    if not Path(python).exists():
        return {"error": f"not installed (no interpreter {python}; set HQQ_PYTHON)"}
    done = subprocess.run(
        [python, __file__, "--hqq-worker", json.dumps(options)], capture_output=True, text=True, cwd=ROOT, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": f"failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"}
    result = json.loads(lines[-1])
    if "accuracy" in result:
        result["accuracy"] = {int(k): v for k, v in result["accuracy"].items()}
    return result


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 bits, asymmetric, 2,000 test images, one timing run")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads, also for HQQ (default: torch's choice)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--hqq-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hqq_worker is not None:
        hqq_worker(json.loads(args.hqq_worker))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    bits_list = (2,) if args.quick else (2, 3, 4)
    schemes = ("asymmetric",) if args.quick else ("asymmetric", "symmetric")
    limit = 2000 if args.quick else None
    repeat = 1 if args.quick else args.repeat

    from hiercluster.models.zoo import load_checkpoint

    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"machine: os.cpu_count()={os.cpu_count()}, torch.get_num_threads()={torch.get_num_threads()}, "
          f"load average {load}, torch {torch.__version__}")
    model, _ = load_checkpoint(CHECKPOINT)
    model.eval()
    batches = test_batches(limit)
    n_images = sum(len(y) for _, y in batches)
    print(f"accuracy (%): ResNet-20 on Fashion-MNIST test ({n_images} images), weights only, per channel, "
          f"every Conv/Linear at b bits; float {accuracy(model, batches):.2f}")
    options = {"bits": list(bits_list), "limit": limit, "threads": args.threads, "repeat": repeat}
    hqq = run_hqq(options)

    header = f"{'scheme':<12}{'clipping':<24}" + "".join(f"{f'{b} bits':>9}" for b in bits_list)
    print(header)
    for scheme in schemes:
        for clipping in CLIPPINGS:
            cells = []
            for bits in bits_list:
                qmodel, _ = quant.quantize_model(model, quant.QuantSpec(scheme=scheme, bits=bits, clipping=clipping))
                cells.append(accuracy(qmodel, batches))
            print(f"{scheme:<12}{clipping:<24}" + "".join(f"{a:>9.2f}" for a in cells), flush=True)
        if scheme == "asymmetric":
            if "accuracy" in hqq:
                label = f"hqq {hqq['version']} (float z)"
                print(f"{scheme:<12}{label:<24}" + "".join(f"{hqq['accuracy'][b]:>9.2f}" for b in bits_list))
            else:
                print(f"{scheme:<12}hqq: {hqq['error']}")

    print()
    weights = resnet18_weights()
    print(f"speed: torchvision resnet18 (weights=None, BatchNorm folded), {len(weights)} Conv/Linear weights, "
          f"{sum(w.numel() for w in weights) / 1e6:.2f} M elements, per channel, {TIMING_BITS} bits, median of {repeat}")
    torch_unit(weights, TIMING_BITS)  # warm-up
    unit = median_time(lambda: torch_unit(weights, TIMING_BITS), repeat)
    print(f"{'method':<48}{'seconds':>9}{'x torch kernel':>16}")
    print(f"{'torch fake_quantize_per_channel_affine':<48}{unit:>9.3f}{1.0:>16.1f}")
    for scheme in schemes:
        for clipping in CLIPPINGS:
            spec = quant.QuantSpec(scheme=scheme, bits=TIMING_BITS, clipping=clipping)

            def run(spec: quant.QuantSpec = spec) -> None:
                for w in weights:
                    quant.dequantize(*quant.quantize(w, spec))

            seconds = median_time(run, repeat)
            print(f"{f'{scheme} {clipping}':<48}{seconds:>9.3f}{seconds / unit:>16.1f}", flush=True)
    if "seconds" in hqq:
        print(f"{'hqq (own process, its torch kernel ' + format(hqq['unit'], '.3f') + ' s)':<48}"
              f"{hqq['seconds']:>9.3f}{hqq['seconds'] / hqq['unit']:>16.1f}")
    else:
        print(f"hqq: {hqq['error']}")


if __name__ == "__main__":
    main()
