"""BatchNorm folding: which pairs are found, and outputs equal to the unfolded model in eval mode."""

import copy

import pytest
import torch
import torch.nn as nn
import torchvision

from quant import fold_batchnorm
from quant.fold import find_conv_bn_pairs
from quant_testing import randomize_batchnorm, relative_error


def assert_same_outputs(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model = randomize_batchnorm(model).eval()
    before = copy.deepcopy(model.state_dict())
    folded = fold_batchnorm(model)
    with torch.no_grad():
        expected, got = model(x), folded(x)
    assert relative_error(got, expected) < 1e-5
    # The input model is untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    return folded


def test_small_net(small_net):
    assert find_conv_bn_pairs(small_net) == [("conv1", "bn1"), ("conv2", "bn2")]
    folded = assert_same_outputs(small_net, torch.randn(3, 1, 9, 9))
    assert isinstance(folded.bn1, nn.Identity) and folded.conv1.bias is not None


def test_project_cifar_resnet():
    models = pytest.importorskip("hiercluster.models.zoo")
    model = models.CifarResNet(8, num_classes=10, in_channels=1, width=8)
    pairs = dict(find_conv_bn_pairs(model))
    assert pairs["conv1"] == "bn1"
    assert pairs["layer1.0.conv1"] == "layer1.0.bn1" and pairs["layer1.0.conv2"] == "layer1.0.bn2"
    assert pairs["layer2.0.shortcut.0"] == "layer2.0.shortcut.1"
    assert_same_outputs(model, torch.randn(2, 1, 16, 16))


def test_torchvision_resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    assert len(find_conv_bn_pairs(model)) == 20
    assert_same_outputs(model, torch.randn(2, 3, 48, 48))


def test_torchvision_mobilenet_v2():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=10)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(find_conv_bn_pairs(model)) == n_bn
    assert_same_outputs(model, torch.randn(2, 3, 40, 40))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, the fallback must fold it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 9, 6), nn.BatchNorm1d(6))

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            y = y * 2
        return self.head(y)


def test_untraceable_model_uses_registration_order():
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(Untraceable())
    model = Untraceable()
    assert find_conv_bn_pairs(model) == [("conv", "bn"), ("head.1", "head.2")]
    assert_same_outputs(model, torch.randn(4, 2, 5, 5))


class SharedOutput(nn.Module):
    """The conv output feeds the BatchNorm and something else: folding would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_conv_output_used_twice_is_not_folded():
    model = randomize_batchnorm(SharedOutput()).eval()
    assert find_conv_bn_pairs(model) == []
    folded = fold_batchnorm(model)
    assert isinstance(folded.bn, nn.BatchNorm2d)
    x = torch.randn(2, 1, 6, 6)
    assert torch.equal(folded(x), model(x))


def test_linear_batchnorm1d_and_non_affine_batchnorm():
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7, affine=False), nn.ReLU(), nn.Linear(7, 2))
    folded = assert_same_outputs(model, torch.randn(8, 5))
    assert isinstance(folded[1], nn.Identity)


def test_batchnorm_without_running_stats_is_left_alone():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False))
    assert find_conv_bn_pairs(model) == []
    assert isinstance(fold_batchnorm(model)[1], nn.BatchNorm2d)


def test_mismatched_channels_are_not_folded():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    assert find_conv_bn_pairs(model) == [("1", "2")]


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        fold_batchnorm({"weight": torch.zeros(2)})


def test_folded_values_by_hand():
    conv = nn.Conv2d(1, 1, 1, bias=True)
    bn = nn.BatchNorm2d(1, eps=0.0)
    with torch.no_grad():
        conv.weight.fill_(2.0), conv.bias.fill_(1.0)
        bn.running_mean.fill_(3.0), bn.running_var.fill_(4.0), bn.weight.fill_(5.0), bn.bias.fill_(0.5)
    folded = fold_batchnorm(nn.Sequential(conv, bn).eval())
    # w' = 2 * 5/2 = 5; b' = (1 - 3) * 5/2 + 0.5 = -4.5
    assert folded[0].weight.item() == 5.0 and folded[0].bias.item() == -4.5
