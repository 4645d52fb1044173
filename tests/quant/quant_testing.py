"""Helpers for the quant tests (imported as `quant_testing`): seeded random tensors, small models."""

from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import strategies as st

from quant import QuantSpec

TINY = torch.finfo(torch.float32).tiny
KINDS = ("normal", "heavy", "zeros_mixed", "constant_rows", "wide_range", "small_ints")


def make_tensor(seed: int, shape: tuple[int, ...], kind: str = "normal") -> torch.Tensor:
    """A float32 tensor of ``shape``, reproducible from ``seed``, of a given character."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    if kind == "heavy":  # Laplace-like with a few large outliers: clipping matters
        x = torch.sign(x) * torch.log1p(torch.rand(shape, generator=gen).reciprocal()) ** 2
    elif kind == "zeros_mixed":
        x = x * (torch.rand(shape, generator=gen) < 0.5)
    elif kind == "constant_rows" and x.dim() > 0:
        x = x.reshape(x.shape[0], -1)[:, :1].expand(x.shape[0], max(1, x[0].numel())).reshape(shape).clone()
    elif kind == "wide_range":
        x = x * torch.exp(torch.empty(shape).uniform_(-20, 20, generator=gen))
    elif kind == "small_ints":  # many exact ties at .5 steps and exact duplicates
        x = torch.randint(-6, 7, shape, generator=gen).float() * 0.5
    return x.to(torch.float32)


@st.composite
def tensors(draw, max_channels: int = 6, max_len: int = 40, kinds=KINDS):
    """(tensor, description) with 1..4 dims; axis 0 is the channel axis."""
    ndim = draw(st.integers(1, 4))
    shape = [draw(st.integers(1, max_channels))]
    budget = max_len
    for _ in range(ndim - 1):
        size = draw(st.integers(1, max(1, min(5, budget))))
        shape.append(size)
        budget = max(1, budget // size)
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(kinds))
    return make_tensor(seed, tuple(shape), kind)


@st.composite
def specs(draw, schemes=("asymmetric", "symmetric", "pow2"), clippings=("minmax", "mse", "percentile"), max_bits=8):
    scheme = draw(st.sampled_from(schemes))
    top = min(max_bits, 8) if scheme == "pow2" else max_bits
    kwargs = {
        "scheme": scheme,
        "bits": draw(st.integers(2, top)),
        "granularity": draw(st.sampled_from(["per_tensor", "per_channel"])),
        "clipping": draw(st.sampled_from(clippings)),
    }
    # Options that do not apply are drawn too: the spec must store them at their defaults.
    kwargs["narrow_range"] = draw(st.booleans())
    kwargs["pow2_scale"] = draw(st.booleans())
    kwargs["percentile"] = draw(st.sampled_from([90.0, 99.0, 99.99, 100.0]))
    return QuantSpec(**kwargs)


def rows_of(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    return x.reshape(x.shape[0], -1) if per_channel and x.dim() > 0 else x.reshape(1, -1)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, so folding matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                    m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.2)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(n, generator=gen) * 0.5 + 1)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.3)
    return model


class SmallNet(nn.Module):
    """Conv-BN-ReLU x2, a residual add, and a Linear head; small enough for fast tests."""

    def __init__(self, in_channels: int = 1, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(SmallNet()).eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
