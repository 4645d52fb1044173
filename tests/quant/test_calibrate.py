"""Calibrated quantization through quantize_model (quant/calibrate.py, quant/model.py).

The per-layer mathematics (GPTQ, AdaRound) has its own tests; these check the walk over
the model: what each layer is fitted to, statistics matching, the promises every
quantized model keeps, and bad input.
"""

import copy

import pytest
import torch
import torch.nn as nn

import quant
from quant import QuantError, QuantPlan, QuantSpec, fold_batchnorm, load_packed, quantize_model, save_packed
from quant import calibrate
from quant.functional import dequantize_sum
from quant.model import quantizable_layers
from quant_testing import small_net


def _batches(seed: int = 0, n: int = 4, size: int = 8) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 1, 10, 10, generator=gen) for _ in range(n)]


def _outputs(model: nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every named layer's outputs on all batches, as (channels, values) float64."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, a, y, n=n: seen[n].append(y.detach()))
        for n in names
    ]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    out = {}
    for n, ys in seen.items():
        y = torch.cat(ys).to(torch.float64)
        out[n] = y.movedim(1, 0).reshape(y.shape[1], -1) if y.dim() > 2 else y.T
    return out


@pytest.mark.parametrize(
    "one_pass, scheme, method, plan",
    [
        (True, "asymmetric", "rtn", QuantPlan()),
        (False, "asymmetric", "rtn", QuantPlan()),
        (True, "symmetric", "rtn", QuantPlan()),
        (True, "pow2", "rtn", QuantPlan()),
        (False, "pow2", "rtn", QuantPlan()),
        # Interleaved with rounding (each layer matched right after it is rounded), and a residual layer.
        (True, "asymmetric", "gptq", QuantPlan()),
        (False, "symmetric", "gptq", QuantPlan(residual_fraction=0.34)),
        (True, "asymmetric", "gptq", QuantPlan(residual_fraction=0.34)),
    ],
)
def test_bn_reestimation_matches_float_channel_statistics(monkeypatch, one_pass, scheme, method, plan):
    """After BN re-estimation, each layer's per-channel output mean and variance on the
    calibration data equal the float (folded) model's, to float rounding."""
    if not one_pass:
        monkeypatch.setattr(calibrate, "ONE_PASS_BYTES", 0)
    else:  # the one-pass walk never runs a separate pass per layer
        monkeypatch.setattr(calibrate, "layer_inputs", lambda *a, **k: pytest.fail("per-layer pass in one-pass mode"))
    net, batches = small_net(), _batches()
    spec = QuantSpec(scheme=scheme, bits=2)
    qnet, report = quantize_model(net, spec, plan, method=method, calibration=batches, bn_reestimate=True)
    assert any(row.residual for row in report.layers) == (plan.residual_fraction is not None)
    names = [n for n, _ in quantizable_layers(qnet)]
    got = _outputs(qnet, names, batches)
    want = _outputs(fold_batchnorm(net), names, batches)
    plain, _ = quantize_model(net, spec)
    before = _outputs(plain, names, batches)
    for n in names:
        # Means: relative to the channel's spread; variances: relative. 1e-4 covers float32 convolutions.
        spread = want[n].std(1) + 1e-6
        assert torch.all((got[n].mean(1) - want[n].mean(1)).abs() / spread < 1e-4), n
        assert torch.allclose(got[n].var(1), want[n].var(1), rtol=1e-4, atol=1e-9), n
    # It did something: round to nearest at 2 bits leaves a visible mismatch somewhere.
    assert any(not torch.allclose(before[n].var(1), want[n].var(1), rtol=1e-2) for n in names)
    assert report.bn_reestimated and not report.bias_corrected


def test_bias_correction_matches_means_and_keeps_scales():
    net, batches = small_net(), _batches()
    spec = QuantSpec(bits=2)
    plain, plain_report = quantize_model(net, spec)
    qnet, report = quantize_model(net, spec, calibration=batches, bias_correction=True)
    names = [n for n, _ in quantizable_layers(qnet)]
    got, want = _outputs(qnet, names, batches), _outputs(fold_batchnorm(net), names, batches)
    for n in names:
        assert torch.allclose(got[n].mean(1), want[n].mean(1), atol=1e-4 * float(want[n].std()) + 1e-6), n
        # Only the mean moves: the weights (codes and scales) are round-to-nearest's.
        assert torch.equal(qnet.get_submodule(n).weight, plain.get_submodule(n).weight)
    assert report.bias_corrected


def test_bn_reestimation_keeps_codes_and_rescales_per_channel():
    """The weight stays on a per-channel grid: same codes and zero points, scales times a per-channel ratio."""
    net, batches = small_net(), _batches()
    spec = QuantSpec(bits=3)
    _, plain = quantize_model(net, spec)
    _, fixed = quantize_model(net, spec, calibration=batches, bn_reestimate=True)
    ratios = []
    for name, ((codes, params),) in fixed.codes.items():
        ((codes0, params0),) = plain.codes[name]
        assert torch.equal(codes, codes0) and torch.equal(params.zero_point, params0.zero_point)
        assert params.scale.shape == params0.scale.shape and torch.all(params.scale > 0)
        ratios.append(params.scale / params0.scale)
    # The scales did move, by a ratio of its own for each channel.
    assert any(not torch.allclose(r, torch.ones_like(r)) for r in ratios)
    assert any(r.unique().numel() > 1 for r in ratios)


def test_per_tensor_grid_gets_no_per_channel_scale():
    net, batches = small_net(), _batches()
    spec = QuantSpec(bits=3, granularity="per_tensor")
    _, plain = quantize_model(net, spec)
    _, fixed = quantize_model(net, spec, calibration=batches, bn_reestimate=True)
    for name, ((_, params),) in fixed.codes.items():
        assert torch.equal(params.scale, plain.codes[name][0][1].scale)


@pytest.mark.parametrize("method", ["gptq", "adaround"])
def test_calibrated_methods_keep_quantize_model_promises(tmp_path, method):
    """At most 2^b values per channel, codes that decode to the weights, an exact packed round trip."""
    net, batches = small_net(), _batches()
    spec = QuantSpec(bits=2, clipping="mse")
    options = quant.adaround.AdaRoundOptions(iters=60, batch_size=8) if method == "adaround" else None
    qnet, report = quantize_model(net, spec, QuantPlan(last_layer_bits=4), method=method, calibration=batches,
                                  bn_reestimate=True, options=options)
    assert report.method == method
    for name, layer in quantizable_layers(qnet):
        w = layer.weight.detach()
        assert torch.equal(dequantize_sum(report.codes[name]).to(w.dtype), w)
        bits = 4 if name == "fc" else 2
        per_channel = [row.unique().numel() for row in w.reshape(w.shape[0], -1)]
        assert max(per_channel) <= 2**bits
        row = report.layer(name)
        assert row.method == method and row.output_mse is not None and row.output_mse_rtn is not None
    path = save_packed(tmp_path / "m.hcq", qnet, report)
    restored = load_packed(path, small_net())
    for key, value in qnet.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_gptq_lowers_the_total_output_error_of_round_to_nearest():
    net, batches = small_net(), _batches()
    _, report = quantize_model(net, QuantSpec(bits=2), method="gptq", calibration=batches)
    rows = [r for r in report.layers if r.output_mse is not None]
    assert sum(r.output_mse for r in rows) < sum(r.output_mse_rtn for r in rows)


def test_each_layer_is_fitted_on_inputs_from_the_quantized_layers_before_it(monkeypatch):
    """GPTQ's Hessian for conv2 comes from conv2's input in the model whose conv1 is
    already quantized (the float model's layer output from the quantized model's inputs)."""
    from quant import gptq

    seen: list[tuple[object, torch.Tensor]] = []  # keeps each accumulator alive, so identities stay distinct
    original = gptq.HessianAccumulator.add

    def spy(self, x):
        seen.append((self, x.clone()))
        return original(self, x)

    monkeypatch.setattr(gptq.HessianAccumulator, "add", spy)
    net, batches = small_net(), _batches()
    spec = QuantSpec(bits=2)
    qnet, report = quantize_model(net, spec, method="gptq", calibration=batches)
    accumulators = list(dict.fromkeys(acc for acc, _ in seen))
    conv2_inputs = torch.cat([x for acc, x in seen if acc is accumulators[1]])  # second layer in call order
    # Rebuild conv2's input: folded float model with conv1 set to its final quantized weight.
    ref = fold_batchnorm(net)
    with torch.no_grad():
        ref.conv1.weight.copy_(qnet.conv1.weight)
        ref.conv1.bias.copy_(qnet.conv1.bias)
    captured = []
    handle = ref.conv2.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    with torch.no_grad():
        for x in batches:
            ref(x)
    handle.remove()
    assert torch.allclose(conv2_inputs, torch.cat(captured), atol=1e-6)
    # ... and not the float model's own input to conv2, which 2-bit conv1 visibly changes.
    assert not torch.allclose(conv2_inputs, _float_conv2_input(net, batches), atol=1e-3)


def _float_conv2_input(net: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    ref, captured = fold_batchnorm(net), []
    handle = ref.conv2.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    with torch.no_grad():
        for x in batches:
            ref(x)
    handle.remove()
    return torch.cat(captured)


@pytest.mark.parametrize("method", ["gptq", "adaround"])
def test_deterministic_for_a_seed(method):
    net, batches = small_net(), _batches()
    options = quant.adaround.AdaRoundOptions(iters=40, batch_size=8) if method == "adaround" else None
    runs = [
        quantize_model(net, QuantSpec(bits=2), method=method, calibration=batches, seed=3, options=options)[0]
        for _ in range(2)
    ]
    for key, value in runs[0].state_dict().items():
        assert torch.equal(runs[1].state_dict()[key], value), key


def test_one_pass_and_per_layer_walks_agree(monkeypatch):
    net, batches = small_net(), _batches()
    a, _ = quantize_model(net, QuantSpec(bits=3), method="gptq", calibration=batches, bn_reestimate=True)
    monkeypatch.setattr(calibrate, "ONE_PASS_BYTES", 0)
    b, _ = quantize_model(net, QuantSpec(bits=3), method="gptq", calibration=batches, bn_reestimate=True)
    for key, value in a.state_dict().items():
        assert torch.allclose(b.state_dict()[key], value, rtol=1e-4, atol=1e-6), key


def test_a_layer_the_data_never_reaches_is_rounded_to_nearest():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(6, 4)
            self.spare = nn.Linear(6, 4)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    net = Unused().eval()
    with pytest.warns(UserWarning, match="'spare' is not called"):
        qnet, report = quantize_model(net, QuantSpec(bits=2), method="gptq", calibration=[torch.randn(16, 6)])
    rtn, _ = quantize_model(net, QuantSpec(bits=2))
    assert torch.equal(qnet.spare.weight, rtn.spare.weight)
    assert report.layer("spare").method == "rtn" and report.layer("used").method == "gptq"


def test_calibration_does_not_change_the_float_model():
    net, batches = small_net(), _batches()
    before = copy.deepcopy(net.state_dict())
    quantize_model(net, QuantSpec(bits=2), method="gptq", calibration=batches, bn_reestimate=True)
    for key, value in net.state_dict().items():
        assert torch.equal(before[key], value), key


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "gptq"}, "method 'gptq' needs calibration data"),
        ({"method": "adaround"}, "method 'adaround' needs calibration data"),
        ({"bn_reestimate": True}, "bn_reestimate needs calibration data"),
        ({"bias_correction": True}, "bias_correction needs calibration data"),
    ],
)
def test_methods_that_need_data_say_so(kwargs, match):
    with pytest.raises(QuantError, match=match):
        quantize_model(small_net(), QuantSpec(bits=4), **kwargs)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"method='hqq' is invalid; allowed: 'rtn', 'gptq', 'adaround'"):
        quantize_model(small_net(), QuantSpec(bits=4), method="hqq")
    with pytest.raises(ValueError, match="exclusive"):
        quantize_model(small_net(), QuantSpec(bits=4), calibration=_batches(), bn_reestimate=True, bias_correction=True)
    with pytest.raises(QuantError, match="calibration is empty"):
        quantize_model(small_net(), QuantSpec(bits=4), method="gptq", calibration=[])
    with pytest.raises(QuantError, match="tensors or \\(x, y\\) tuples"):
        quantize_model(small_net(), QuantSpec(bits=4), method="gptq", calibration=["not a tensor"])
    with pytest.raises(QuantError, match="no Conv1d/2d/3d or Linear layer"):
        quantize_model(nn.Sequential(nn.ReLU()), QuantSpec(bits=4), method="gptq", calibration=_batches())


def test_labels_in_calibration_batches_are_ignored():
    net, batches = small_net(), _batches()
    a, _ = quantize_model(net, QuantSpec(bits=3), method="gptq", calibration=batches)
    b, _ = quantize_model(net, QuantSpec(bits=3), method="gptq", calibration=[(x, torch.zeros(len(x))) for x in batches])
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value), key


def test_needs_calibration():
    assert not quant.needs_calibration("rtn")
    assert all(quant.needs_calibration(m) for m in ("gptq", "adaround"))
    assert quant.needs_calibration("rtn", bn_reestimate=True) and quant.needs_calibration("rtn", bias_correction=True)
    with pytest.raises(ValueError, match="allowed"):
        quant.needs_calibration("magic")


class _Tokens(nn.Module):
    """Linear layers on (batch, tokens, features) inputs: channels are the last axis."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("method", ["rtn", "gptq", "adaround"])
def test_linear_layers_on_3d_inputs_match_statistics_per_output_feature(method):
    torch.manual_seed(0)
    net = _Tokens().eval()
    batches = [torch.randn(4, 7, 6) for _ in range(3)]  # 7 tokens: not the width of any layer
    options = quant.adaround.AdaRoundOptions(iters=30, batch_size=2) if method == "adaround" else None
    qnet, _ = quantize_model(net, QuantSpec(bits=2), method=method, calibration=batches, bn_reestimate=True, options=options)
    for n in ("a", "b"):
        got, want = _per_feature(qnet, n, batches), _per_feature(net, n, batches)
        assert torch.allclose(got.mean(0), want.mean(0), atol=1e-4), n
        assert torch.allclose(got.var(0), want.var(0), rtol=1e-4), n


def _per_feature(model: nn.Module, name: str, batches: list[torch.Tensor]) -> torch.Tensor:
    """Layer ``name``'s outputs as (values, features) float64."""
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, y: seen.append(y.detach()))
    with torch.no_grad():
        for x in batches:
            model(x)
    handle.remove()
    y = torch.cat(seen).to(torch.float64)
    return y.reshape(-1, y.shape[-1])


@pytest.mark.parametrize("method", ["gptq", "adaround"])
def test_float64_models(method):
    net = small_net().double()
    batches = [x.double() for x in _batches()]
    options = quant.adaround.AdaRoundOptions(iters=20, batch_size=8) if method == "adaround" else None
    qnet, report = quantize_model(net, QuantSpec(bits=3), method=method, calibration=batches, bn_reestimate=True, options=options)
    assert qnet.conv1.weight.dtype == torch.float64
    for name, parts in report.codes.items():
        assert torch.equal(dequantize_sum(parts).to(torch.float64), qnet.get_submodule(name).weight), name


def test_pow2_scale_grids_keep_power_of_two_scales_under_bn_reestimation():
    net, batches = small_net(), _batches()
    spec = QuantSpec(scheme="pow2", bits=3, pow2_scale=True)
    _, report = quantize_model(net, spec, calibration=batches, bn_reestimate=True)
    for name, ((_, params),) in report.codes.items():
        mantissa, _ = torch.frexp(params.scale)
        assert torch.all(mantissa == 0.5), name
