"""quantize_model: the input is untouched, weights quantized once, plans, residual, activations."""

import copy
import math

import pytest
import torch
import torch.nn as nn
from torch.ao.quantization import observer

from quant import QuantError, QuantPlan, QuantSpec, fake_quantize, fold_batchnorm, quantize_model
from quant.functional import dequantize_sum
from quant_testing import TINY, SmallNet, randomize_batchnorm

LAYERS = ["conv1", "conv2", "fc"]


def batches(n=4, seed=0, size=6):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 1, 8, 8, generator=gen) for _ in range(n)]


def test_input_model_is_untouched(small_net):
    state = copy.deepcopy(small_net.state_dict())
    quantize_model(small_net, QuantSpec(bits=3, clipping="mse"), QuantPlan(residual_fraction=0.5),
                   act_spec=QuantSpec(bits=8, granularity="per_tensor"), calibration=batches())
    assert all(torch.equal(state[k], v) for k, v in small_net.state_dict().items())
    assert all(not m._forward_pre_hooks for m in small_net.modules())
    assert isinstance(small_net.bn1, nn.BatchNorm2d)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4), QuantSpec(scheme="pow2", bits=3, clipping="mse"),
                                  QuantSpec(scheme="symmetric", bits=5, granularity="per_tensor")])
def test_weights_are_the_fake_quantized_folded_weights(small_net, spec):
    qnet, report = quantize_model(small_net, spec)
    folded = fold_batchnorm(small_net)
    for name in LAYERS:
        w = folded.get_submodule(name).weight
        assert torch.equal(qnet.get_submodule(name).weight, fake_quantize(w, spec))
        assert torch.equal(qnet.get_submodule(name).bias, folded.get_submodule(name).bias)  # biases stay float
        assert torch.equal(dequantize_sum(report.codes[name]), qnet.get_submodule(name).weight)
    assert report.biases == "float32"
    assert report.folded == (("conv1", "bn1"), ("conv2", "bn2"))
    assert isinstance(qnet.bn1, nn.Identity)


def test_quantized_once_not_on_every_forward(small_net):
    qnet, _ = quantize_model(small_net, QuantSpec(bits=4))
    before = copy.deepcopy(qnet.state_dict())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in qnet.modules())
    x = torch.randn(2, 1, 8, 8)
    out = qnet(x)
    assert all(torch.equal(before[k], v) for k, v in qnet.state_dict().items())
    # Same computation as the float architecture with these weights loaded.
    plain = SmallNet()
    plain.bn1, plain.bn2 = nn.Identity(), nn.Identity()
    plain.conv1.bias = nn.Parameter(torch.zeros(8))
    plain.load_state_dict(qnet.state_dict())
    assert torch.equal(plain.eval()(x), out)


def test_training_mode_is_kept(small_net):
    assert not quantize_model(small_net.eval(), QuantSpec())[0].training
    assert quantize_model(small_net.train(), QuantSpec())[0].training


def test_plan_first_layer_skip_and_layer_bits(small_net):
    plan = QuantPlan(first_layer_bits=8, skip=("fc",), layer_bits={"conv2": 3})
    qnet, report = quantize_model(small_net, QuantSpec(bits=4), plan)
    rows = {r.name: r for r in report.layers}
    assert (rows["conv1"].bits, rows["conv2"].bits, rows["fc"].bits) == (8, 3, 32)
    assert rows["fc"].scheme == "float" and "fc" not in report.codes
    folded = fold_batchnorm(small_net)
    assert torch.equal(qnet.fc.weight, folded.fc.weight)
    assert max(rows["conv2"].distinct_per_channel) <= 8
    assert torch.equal(qnet.conv1.weight, fake_quantize(folded.conv1.weight, QuantSpec(bits=8)))
    assert torch.equal(qnet.conv2.weight, fake_quantize(folded.conv2.weight, QuantSpec(bits=3)))
    numel = {r.name: r.numel for r in report.layers}
    expected = (8 * numel["conv1"] + 3 * numel["conv2"] + 32 * numel["fc"]) / sum(numel.values())
    assert report.avg_bits == pytest.approx(expected)


def test_last_layer_bits(small_net):
    _, report = quantize_model(small_net, QuantSpec(bits=2), QuantPlan(last_layer_bits=6))
    assert [r.bits for r in report.layers] == [2, 2, 6]


def test_unmatched_pattern_warns(small_net):
    with pytest.warns(UserWarning, match="conv9"):
        quantize_model(small_net, QuantSpec(), QuantPlan(skip=("conv9",)))


def test_residual_lowers_the_error_and_counts_twice_the_bits(small_net):
    spec = QuantSpec(bits=2)
    _, single = quantize_model(small_net, spec)
    qnet, double = quantize_model(small_net, spec, QuantPlan(residual_fraction=1.0))
    for one, two in zip(single.layers, double.layers):
        assert two.residual and two.bits == 4 and two.tag.endswith("-residual")
        assert two.mse < one.mse
        assert len(double.codes[two.name]) == 2
    assert double.avg_bits == 4.0
    folded = fold_batchnorm(small_net)
    w = folded.conv2.weight
    first = fake_quantize(w, spec)
    assert torch.equal(qnet.conv2.weight, first + fake_quantize(w - first, spec))


def test_residual_by_sqnr_threshold(small_net):
    _, plain = quantize_model(small_net, QuantSpec(bits=3))
    sqnr = {r.name: r.sqnr_db for r in plain.layers}
    threshold = sorted(sqnr.values())[1] + 1e-9  # the two worst layers
    _, report = quantize_model(small_net, QuantSpec(bits=3), QuantPlan(residual_sqnr_db=threshold))
    assert {r.name for r in report.layers if r.residual} == {n for n, v in sqnr.items() if v < threshold}
    assert sum(r.residual for r in report.layers) == 2


def test_nan_weight_names_the_layer(small_net):
    with torch.no_grad():
        small_net.conv2.weight[0, 0, 0, 0] = math.nan
    with pytest.raises(QuantError, match="layer 'conv2'.*NaN"):
        quantize_model(small_net, QuantSpec())


def test_inf_from_batchnorm_folding_names_the_layer(small_net):
    with torch.no_grad():
        small_net.fc.weight[1, 1] = math.inf
    with pytest.raises(QuantError, match="layer 'fc'.*Inf"):
        quantize_model(small_net, QuantSpec(clipping="mse"))


def test_model_errors():
    with pytest.raises(QuantError, match="no Conv"):
        quantize_model(nn.Sequential(nn.ReLU()), QuantSpec())
    with pytest.raises(QuantError, match="float16"):
        quantize_model(nn.Linear(3, 2).half(), QuantSpec())
    with pytest.raises(TypeError, match="QuantSpec"):
        quantize_model(nn.Linear(3, 2), 4)
    with pytest.raises(TypeError, match="QuantPlan"):
        quantize_model(nn.Linear(3, 2), QuantSpec(), {"skip": ["x"]})


@pytest.mark.parametrize(
    "plan, message",
    [
        (
            QuantPlan(name="p", first_layer_bits=12),
            "plan 'p': layer 'conv1' would get 12 bits (first_layer_bits), but scheme 'pow2' allows 2..8 bits",
        ),
        (
            QuantPlan(name="q", last_layer_bits=9, layer_bits={"conv2": 16}),
            "plan 'q': layer 'conv2' would get 16 bits (layer_bits['conv2']); "
            "layer 'fc' would get 9 bits (last_layer_bits), but scheme 'pow2' allows 2..8 bits",
        ),
    ],
)
def test_plan_width_the_scheme_does_not_allow_is_a_quant_error(small_net, plan, message):
    with pytest.raises(QuantError) as info:
        quantize_model(small_net, QuantSpec(scheme="pow2"), plan)
    assert str(info.value) == message
    with pytest.raises(QuantError, match="plan"):
        plan.check(QuantSpec(scheme="pow2"))  # the same plan is refused up front too


def test_plan_widths_only_checked_where_they_apply(small_net):
    # A skipped layer or a width the spec's scheme allows is no error.
    _, report = quantize_model(small_net, QuantSpec(scheme="pow2"), QuantPlan(skip=("fc",), layer_bits={"fc": 12}))
    assert [r.bits for r in report.layers] == [8, 8, 32]
    _, report = quantize_model(small_net, QuantSpec(scheme="asymmetric", bits=4), QuantPlan(first_layer_bits=12))
    assert [r.bits for r in report.layers] == [12, 4, 4]


def test_deterministic(small_net):
    a, ra = quantize_model(small_net, QuantSpec(bits=3, clipping="mse"))
    b, rb = quantize_model(small_net, QuantSpec(bits=3, clipping="mse"))
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert ra.to_dict() == rb.to_dict()


def test_float64_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4)).double()
    qnet, _ = quantize_model(model, QuantSpec(bits=4))
    assert qnet[0].weight.dtype == torch.float64
    assert torch.equal(qnet[0].weight, fake_quantize(model[0].weight.float(), QuantSpec(bits=4)).double())


# ---------------------------------------------------------------- activations


def layer_inputs(model, names, data):
    seen = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().clone()))
             for n in names]
    with torch.no_grad():
        for x in data:
            model(x)
    for h in hooks:
        h.remove()
    return {n: torch.cat([t.reshape(-1) for t in v]) for n, v in seen.items()}


def test_activation_quantization_is_calibrated_with_minmax(small_net):
    data = batches(n=10)
    act = QuantSpec(bits=4, granularity="per_tensor")
    weights_only, _ = quantize_model(small_net, QuantSpec(bits=6))
    qnet, report = quantize_model(small_net, QuantSpec(bits=6), act_spec=act, calibration=data, calibration_batches=8)
    rows = {r.name: r for r in report.layers}
    assert rows["conv1"].act_bits is None  # the image itself is not quantized
    inputs = layer_inputs(weights_only, ["conv2", "fc"], data[:8])  # only the first 8 batches count
    for name in ("conv2", "fc"):
        obs = observer.MinMaxObserver(dtype=torch.quint8, quant_min=0, quant_max=15, eps=TINY)
        obs(inputs[name])
        scale, zp = obs.calculate_qparams()
        assert rows[name].act_bits == 4
        assert rows[name].act_scale == float(scale) and rows[name].act_zero_point == int(zp)
    # Outputs: the weight-quantized model with each input fake-quantized by torch's op.
    x = torch.randn(3, 1, 8, 8) * 3
    hooks = [weights_only.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: (torch.fake_quantize_per_tensor_affine(a[0], rows[n].act_scale, rows[n].act_zero_point, 0, 15),))
        for n in ("conv2", "fc")]
    with torch.no_grad():
        expected = weights_only(x)
        for h in hooks:
            h.remove()
        plain = weights_only(x)
        got = qnet(x)
    assert torch.equal(got, expected)
    assert not torch.equal(got, plain)


def test_activation_mse_calibration_clips_more_than_minmax(small_net):
    data = [x * torch.where(torch.rand_like(x) < 0.01, 20.0, 1.0) for x in batches(n=4)]  # rare outliers
    _, mm = quantize_model(small_net, QuantSpec(bits=6), act_spec=QuantSpec(bits=3, granularity="per_tensor"), calibration=data)
    _, ms = quantize_model(small_net, QuantSpec(bits=6), act_spec=QuantSpec(bits=3, granularity="per_tensor", clipping="mse"),
                           calibration=data)
    assert ms.layer("conv2").act_scale < mm.layer("conv2").act_scale


def test_activation_quantizers_follow_deepcopy(small_net):
    qnet, _ = quantize_model(small_net, QuantSpec(), act_spec=QuantSpec(bits=3, granularity="per_tensor"), calibration=batches())
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(copy.deepcopy(qnet)(x), qnet(x))


def test_calibration_accepts_x_y_tuples(small_net):
    data = [(x, torch.zeros(len(x))) for x in batches()]
    _, a = quantize_model(small_net, QuantSpec(), act_spec=QuantSpec(granularity="per_tensor"), calibration=data)
    _, b = quantize_model(small_net, QuantSpec(), act_spec=QuantSpec(granularity="per_tensor"), calibration=batches())
    assert a.layer("fc").act_scale == b.layer("fc").act_scale


@pytest.mark.parametrize(
    "act_spec, calibration, error, match",
    [
        (QuantSpec(granularity="per_tensor"), None, ValueError, "calibration"),
        (QuantSpec(), [torch.zeros(1, 1, 8, 8)], ValueError, "act_spec.granularity='per_channel'"),
        (QuantSpec(scheme="pow2", granularity="per_tensor"), [torch.zeros(1, 1, 8, 8)], ValueError, "act_spec.scheme='pow2'"),
        (QuantSpec(granularity="per_tensor"), [], QuantError, "at least one batch"),
        (QuantSpec(granularity="per_tensor"), [{"x": 1}], QuantError, "tensors or"),
    ],
)
def test_activation_argument_errors(small_net, act_spec, calibration, error, match):
    with pytest.raises(error, match=match):
        quantize_model(small_net, QuantSpec(), act_spec=act_spec, calibration=calibration)


def test_project_resnet_end_to_end():
    models = pytest.importorskip("hiercluster.models.zoo")
    model = randomize_batchnorm(models.CifarResNet(8, num_classes=10, in_channels=1, width=8)).eval()
    plan = QuantPlan(first_layer_bits=8, last_layer_bits=8)
    qnet, report = quantize_model(model, QuantSpec(bits=4, clipping="mse"), plan)
    assert report.layers[0].name == "conv1" and report.layers[0].bits == 8
    assert report.layers[-1].name == "fc" and report.layers[-1].bits == 8
    assert all(r.bits == 4 for r in report.layers[1:-1])
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        rel = float((qnet(x) - model(x)).norm() / model(x).norm())
    assert 0 < rel < 0.5
