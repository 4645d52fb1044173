"""weight_forward: the layer's own computation with a replacement weight and no bias."""

import random

import pytest
import torch
import torch.nn as nn

from quant.errors import QuantError
from quant.layerops import weight_forward

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def random_conv(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """A Conv1d/2d/3d with random stride, padding (numbers, 'same', 'valid'), dilation, groups, padding mode."""
    rng = random.Random(seed)
    dims = 1 + seed % 3
    groups = rng.choice([1, 1, 2, 3])
    cin, cout = groups * rng.randint(1, 3), groups * rng.randint(1, 3)
    kernel = tuple(rng.randint(1, 3) for _ in range(dims))
    dilation = tuple(rng.randint(1, 2) for _ in range(dims))
    padding_mode = PADDING_MODES[seed % 4]
    choice = (seed // 12) % 3  # seeds 0..35 cover every (dims, padding mode, padding kind)
    if choice == 0:
        # "same" only with stride 1; an even kernel with dilation 1 pads asymmetrically.
        padding, stride = "same", 1
    elif choice == 1:
        padding, stride = "valid", tuple(rng.randint(1, 3) for _ in range(dims))
    else:
        padding, stride = tuple(rng.randint(0, 2) for _ in range(dims)), tuple(rng.randint(1, 3) for _ in range(dims))
    torch.manual_seed(seed)
    layer = CONVS[dims](
        cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode
    )
    size = (9, 8, 7)[:dims] if dims < 3 else (6, 7, 5)
    x = torch.randn(2, cin, *size, generator=torch.Generator().manual_seed(seed + 1000))
    return layer, x


def bias_view(layer: nn.Module, out: torch.Tensor) -> torch.Tensor:
    shape = [1] * out.dim()
    shape[1 if isinstance(layer, tuple(CONVS.values())) else -1] = -1
    return layer.bias.reshape(shape)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("seed", range(36))
def test_conv_forward_plus_bias_equals_the_layer(seed):
    layer, x = random_conv(seed)
    f = weight_forward(layer)
    with torch.no_grad():
        expected = layer(x)
        got = f(x, layer.weight) + bias_view(layer, expected)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(12))
def test_conv_forward_uses_the_given_weight(seed):
    # The layer with its weight replaced is the reference: f must not read layer.weight.
    layer, x = random_conv(seed)
    f = weight_forward(layer)
    other = torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(seed + 7))
    with torch.no_grad():
        got = f(x, other)
        layer.weight.copy_(other)
        layer.bias.zero_()
        expected = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_same_padding_with_even_kernel_and_reflect_mode_keeps_the_size():
    # The asymmetric case: total padding 3 for kernel 4 (1 left, 2 right, as nn.Conv does).
    layer = nn.Conv2d(2, 3, (4, 2), padding="same", padding_mode="reflect")
    x = torch.randn(1, 2, 6, 5)
    with torch.no_grad():
        out = weight_forward(layer)(x, layer.weight)
        torch.testing.assert_close(out + layer.bias[:, None, None], layer(x), rtol=1e-5, atol=1e-5)
    assert out.shape[-2:] == x.shape[-2:]


@pytest.mark.parametrize("leading", [(5,), (2, 3), (2, 3, 4)])
def test_linear_forward_plus_bias_equals_the_layer(leading):
    torch.manual_seed(len(leading))
    layer = nn.Linear(7, 4)
    x = torch.randn(*leading, 7)
    f = weight_forward(layer)
    with torch.no_grad():
        torch.testing.assert_close(f(x, layer.weight) + layer.bias, layer(x), rtol=1e-6, atol=1e-6)
        other = torch.randn(4, 7)
        torch.testing.assert_close(f(x, other), x @ other.T, rtol=1e-5, atol=1e-5)


def test_settings_are_read_when_the_function_is_built():
    layer = nn.Conv1d(1, 1, 3, padding=1, bias=False)
    f = weight_forward(layer)
    layer.padding = (0,)
    assert f(torch.randn(1, 1, 8), layer.weight).shape[-1] == 8


@pytest.mark.parametrize("layer", [nn.ConvTranspose2d(2, 2, 3), nn.BatchNorm2d(3), nn.Sequential(nn.Linear(2, 2))])
def test_other_modules_are_refused_by_name(layer):
    with pytest.raises(QuantError, match=type(layer).__name__):
        weight_forward(layer)
