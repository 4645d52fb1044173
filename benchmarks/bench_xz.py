"""Cost of the compressed-size figures: gzip -9 and xz presets 0, 1, 6 on packed payloads.

Measures :func:`quant.model_size`'s compression step on the payload of the shipped
Fashion-MNIST ResNet-20 (4 and 2 bits) and of a random torchvision ViT-B/16
(``weights=None``, 4 bits, attention projections included), next to the time
``quantize_model`` takes. Figures, not a test; CPU seconds are process time.

    python benchmarks/bench_xz.py [--no-vit] [--threads N]

Measured on 2 shared CPU cores (issue 11): ResNet-20 4-bit payload 0.14 MiB: gzip 0.01,
xz-0 0.02, xz-1 0.03, xz-6 0.06 CPU-s, xz-6 3% smaller than the others. ViT-B/16 4-bit
payload 42.6 MiB, quantize_model 39 s: gzip 1.2, xz-0 11.1, xz-1 19.2, xz-6 23.8 CPU-s,
all four sizes within 0.1% of each other (random weights do not compress).
"""

from __future__ import annotations

import argparse
import gzip
import lzma
import sys
import time
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import quant  # noqa: E402
from hiercluster.models.zoo import load_checkpoint  # noqa: E402
from quant.packing import _encode  # noqa: E402

CHECKPOINT = ROOT / "data" / "checkpoints" / "fashion_mnist_resnet20.pt"


def payload(model: torch.nn.Module, bits: int) -> tuple[bytes, float]:
    """The packed payload of ``model`` quantized to ``bits`` (round to nearest), and the seconds that took."""
    start = time.perf_counter()
    qmodel, report = quant.quantize_model(model, quant.QuantSpec(bits=bits))
    seconds = time.perf_counter() - start
    _, blocks = _encode(qmodel, report)
    return b"".join(blocks.blocks), seconds


def cpu_seconds(compress) -> tuple[int, float]:
    start = time.process_time()
    size = len(compress())
    return size, time.process_time() - start


def measure(name: str, model: torch.nn.Module, bits: int) -> None:
    body, quantize_s = payload(model.eval(), bits)
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {params / 1e6:.2f} M parameters, {bits} bits, payload {len(body) / 2**20:.2f} MiB, "
          f"quantize_model {quantize_s:.1f} s")
    size, cpu = cpu_seconds(lambda: gzip.compress(body, compresslevel=9, mtime=0))
    print(f"  gzip -9  {size / 2**20:9.3f} MiB  {cpu:6.2f} CPU-s")
    for preset in (0, 1, 6):
        size, cpu = cpu_seconds(lambda: lzma.compress(body, format=lzma.FORMAT_XZ, preset=preset))
        print(f"  xz -{preset}    {size / 2**20:9.3f} MiB  {cpu:6.2f} CPU-s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-vit", action="store_true", help="skip the ViT-B/16 (about a minute)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_checkpoint(CHECKPOINT)
    for bits in (4, 2):
        measure("fashion_mnist_resnet20", model, bits)
    if not args.no_vit:
        torch.manual_seed(0)
        measure("vit_b_16(weights=None)", torchvision.models.vit_b_16(weights=None), 4)


if __name__ == "__main__":
    main()
