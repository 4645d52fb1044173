"""The binary scheme: levels {-a, +a}, a = mean|w|; width 1 in plans; GPTQ, AdaRound, BN re-estimation, packing."""

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from quant import (
    QParams,
    QuantError,
    QuantPlan,
    QuantSpec,
    choose_qparams,
    dequantize,
    dequantize_sum,
    fake_quantize,
    load_packed,
    model_size,
    quantize,
    quantize_model,
    quantize_residual,
    save_packed,
)
from quant.adaround import AdaRoundOptions, adaround
from quant.fold import fold_batchnorm
from quant.gptq import GPTQOptions, HessianAccumulator, gptq_codes
from quant.spec import bits_range, spec_for_width
from quant_testing import TINY, rows_of, tensors

BINARY = QuantSpec(scheme="binary", bits=1)
PURE = {"rtn_fallback": False}

pytestmark = pytest.mark.usefixtures("one_thread")


def squared_error(w: torch.Tensor, values: torch.Tensor) -> float:
    return float(((w.double() - values.double()) ** 2).sum())


# ---------------------------------------------------------------- the closed form


def test_scale_is_mean_abs_per_channel_and_codes_are_the_sign():
    w = torch.tensor([[-1.0, 2.0, 0.5, -0.5], [3.0, -3.0, 0.0, 6.0]])
    codes, params = quantize(w, BINARY)
    # By hand: (1 + 2 + 0.5 + 0.5) / 4 = 1 and (3 + 3 + 0 + 6) / 4 = 3.
    assert torch.equal(params.scale, torch.tensor([1.0, 3.0]))
    assert torch.equal(params.zero_point, torch.zeros(2, dtype=torch.int32))
    assert (params.qmin, params.qmax, params.axis, params.bits) == (0, 1, 0, 1)
    # Code 1 is +a, code 0 is -a; 0 goes to +a (sign(0) := +1).
    assert torch.equal(codes, torch.tensor([[0, 1, 1, 0], [1, 0, 1, 1]], dtype=torch.uint8))
    assert torch.equal(dequantize(codes, params), torch.tensor([[-1.0, 1.0, 1.0, -1.0], [3.0, -3.0, 3.0, 3.0]]))
    assert torch.equal(params.levels(), torch.tensor([[-1.0, 1.0], [-3.0, 3.0]]))


def test_per_tensor_scale_is_the_mean_over_the_whole_tensor():
    w = torch.tensor([[-1.0, 2.0, 0.5, -0.5], [3.0, -3.0, 0.0, 6.0]])
    codes, params = quantize(w, BINARY.replace(granularity="per_tensor"))
    assert params.axis is None and torch.equal(params.scale, torch.tensor(2.0))  # (4 + 12) / 8
    assert torch.equal(dequantize(codes, params), torch.tensor([[-2.0, 2.0, 2.0, -2.0], [2.0, -2.0, 2.0, 2.0]]))


def test_negative_zero_maps_to_plus_a_and_a_zero_channel_gets_the_smallest_scale():
    w = torch.tensor([[-0.0, 0.0, -2.0], [0.0, 0.0, 0.0]])
    codes, params = quantize(w, BINARY)
    assert codes[0].tolist() == [1, 1, 0]
    assert params.scale[1] == TINY  # a scale is always positive (the packed file checks it)
    assert torch.equal(dequantize(codes, params)[1], torch.full((3,), TINY))


@pytest.mark.parametrize("seed", range(3))
def test_closed_form_minimizes_the_squared_error_over_a_brute_force_scan_of_a(seed):
    w = torch.randn(40, generator=torch.Generator().manual_seed(seed)) * (seed + 1)
    a = float(choose_qparams(w[None], BINARY).scale[0])
    assert a == pytest.approx(float(w.abs().double().mean()), rel=1e-7)

    def error(level: float) -> float:
        # Brute force: each value goes to the nearer of the two levels, no sign rule assumed.
        levels = torch.tensor([-level, level], dtype=torch.float64)
        nearest = levels[(w.double()[:, None] - levels).abs().argmin(dim=1)]
        return squared_error(w, nearest)

    scan = torch.linspace(0.2 * a, 2.0 * a, 1801).tolist()
    errors = [error(c) for c in scan]
    best = min(range(len(scan)), key=errors.__getitem__)
    assert error(a) <= min(errors) * (1 + 1e-12)
    assert abs(scan[best] - a) <= (scan[1] - scan[0])
    # And quantize gives exactly that error (the sign is the nearest level).
    assert squared_error(w, fake_quantize(w[None], BINARY)[0]) == pytest.approx(error(a), rel=1e-6)


@settings(max_examples=150, deadline=None)
@given(x=tensors(), per_channel=st.booleans())
def test_every_value_is_plus_or_minus_a_of_its_channel(x, per_channel):
    spec = BINARY.replace(granularity="per_channel" if per_channel else "per_tensor")
    codes, params = quantize(x, spec)
    rows = rows_of(x, params.axis == 0)
    a = params.scale.reshape(-1, 1)
    values = rows_of(dequantize(codes, params), params.axis == 0)
    assert torch.equal(values, torch.where(rows >= 0, a, -a))
    assert torch.equal(rows_of(codes, params.axis == 0), (rows >= 0).to(torch.uint8))
    mean_abs = rows.double().abs().mean(dim=1).float().clamp(min=TINY)
    assert torch.equal(params.scale.reshape(-1), mean_abs)
    # Re-choosing a from Q(x) gives Q(x) back exactly: the mean of n copies of a is a.
    assert torch.equal(fake_quantize(values.reshape(x.shape), spec), values.reshape(x.shape))


def test_nan_is_refused():
    with pytest.raises(QuantError, match="1 NaN"):
        quantize(torch.tensor([[1.0, math.nan]]), BINARY)


def test_residual_binary_lowers_the_error():
    w = torch.randn(6, 30, generator=torch.Generator().manual_seed(3))
    one = squared_error(w, fake_quantize(w, BINARY))
    two = squared_error(w, dequantize_sum(quantize_residual(w, BINARY)))
    assert two < one


# ---------------------------------------------------------------- the spec and the plan


def test_spec_validation_names_the_field():
    assert bits_range("binary") == (1, 1)
    assert BINARY.tag == "binary-1b-minmax-per_channel"
    with pytest.raises(ValueError, match=r"QuantSpec\.bits=1 needs scheme 'binary'"):
        QuantSpec(scheme="asymmetric", bits=1)
    with pytest.raises(ValueError, match=r"QuantSpec\.bits=1 needs scheme 'binary'.*\[2, 8\]"):
        QuantSpec(scheme="pow2", bits=1)
    with pytest.raises(ValueError, match=r"QuantSpec\.bits=2 is invalid for scheme='binary'; allowed: 1"):
        QuantSpec(scheme="binary", bits=2)
    with pytest.raises(ValueError, match=r"QuantSpec\.bits=True is invalid for scheme='binary'"):
        QuantSpec(scheme="binary", bits=True)
    for clipping in ("percentile", "coherent"):
        with pytest.raises(ValueError, match=rf"QuantSpec\.clipping='{clipping}' is invalid for scheme='binary'"):
            QuantSpec(scheme="binary", bits=1, clipping=clipping)
    # The MSE search over a ends at the closed form: the same grid, so the same spec.
    assert QuantSpec(scheme="binary", bits=1, clipping="mse") == BINARY
    assert QuantSpec.from_dict(BINARY.to_dict()) == BINARY


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric", "pow2"])
def test_width_one_suits_every_scheme_and_means_binary(scheme):
    spec = QuantSpec(scheme=scheme, bits=4, clipping="percentile", granularity="per_tensor")
    QuantPlan(first_layer_bits=1, last_layer_bits=1, layer_bits={"x": 1}).check(spec)
    assert spec_for_width(spec, 1) == QuantSpec(scheme="binary", bits=1, granularity="per_tensor")
    assert spec_for_width(spec, 4) is spec


def test_a_binary_spec_takes_no_wider_layer():
    QuantPlan(first_layer_bits=1).check(BINARY)
    with pytest.raises(QuantError, match=r"plan 'p': first_layer_bits=8, but scheme 'binary' allows 1 bit only"):
        QuantPlan(name="p", first_layer_bits=8).check(BINARY)
    with pytest.raises(ValueError, match="first_layer_bits"):
        QuantPlan(first_layer_bits=0)


def test_layer_bits_one_on_an_asymmetric_spec_gives_that_layer_two_levels_per_channel(small_net):
    spec = QuantSpec(bits=4, clipping="mse")
    qnet, report = quantize_model(small_net, spec, QuantPlan(name="mixed", layer_bits={"conv2": 1}))
    assert [(r.name, r.bits, r.scheme) for r in report.layers] == [
        ("conv1", 4, "asymmetric"), ("conv2", 1, "binary"), ("fc", 4, "asymmetric"),
    ]
    assert report.layer("conv2").tag == "binary-1b-minmax-per_channel"
    # conv1 8x1x3x3 = 72 and fc 5x8 = 40 weights at 4 bits, conv2 8x8x3x3 = 576 at 1 bit.
    assert report.avg_bits == pytest.approx((72 * 4 + 576 * 1 + 40 * 4) / (72 + 576 + 40))
    folded = fold_batchnorm(small_net).conv2.weight.detach()
    rows = folded.reshape(8, -1)
    a = rows.double().abs().mean(dim=1).float()[:, None]
    assert torch.equal(qnet.conv2.weight.detach().reshape(8, -1), torch.where(rows >= 0, a, -a))
    assert set(report.layer("conv2").distinct_per_channel) <= {1, 2}
    assert max(report.layer("conv1").distinct_per_channel) > 2  # the other layers keep their 4-bit grid


# ---------------------------------------------------------------- packing


def test_pack_round_trip_takes_one_bit_per_weight(tmp_path, small_net):
    qnet, report = quantize_model(nn.Linear(64, 8, bias=False), BINARY)
    sizes = model_size(qnet, report)
    assert (sizes["codes_bytes"], sizes["qparams_bytes"], sizes["packed_bytes"]) == (64 * 8 // 8, 8 * 4, 64 + 32)
    assert report.avg_bits == 1.0
    # An odd count rounds up to whole bytes: 5 x 3 = 15 bits, 2 bytes, and one scale per channel.
    qnet, report = quantize_model(nn.Linear(5, 3, bias=False), BINARY)
    assert (model_size(qnet, report)["codes_bytes"], model_size(qnet, report)["qparams_bytes"]) == (2, 12)
    # A mixed model: the binary layer comes back bit for bit.
    qnet, report = quantize_model(small_net, QuantSpec(bits=3), QuantPlan(layer_bits={"conv*": 1}))
    path = save_packed(tmp_path / "mixed.hcq", qnet, report)
    restored = load_packed(path, small_net)
    for name in ("conv1", "conv2", "fc"):
        assert torch.equal(getattr(restored, name).weight, getattr(qnet, name).weight)
    sizes = model_size(qnet, report)
    # conv1 72 + conv2 576 weights at 1 bit, fc 40 at 3 bits: 9 + 72 + 15 bytes of codes.
    assert sizes["codes_bytes"] == 9 + 72 + 15


# ---------------------------------------------------------------- calibrated methods


def correlated_problem(seed: int, out: int = 8, cols: int = 16, n: int = 64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=gen) @ (torch.eye(cols) + 0.5 * torch.randn(cols, cols, generator=gen))
    w = torch.randn(out, cols, generator=gen)
    acc = HessianAccumulator(nn.Linear(cols, out))
    acc.add(x)
    return w, x, acc.hessian[0]


def output_error(w: torch.Tensor, codes: torch.Tensor, params: QParams, x: torch.Tensor) -> torch.Tensor:
    diff = w.double() - dequantize(codes, params).double()
    return ((diff @ x.double().T) ** 2).sum(dim=1)


def test_gptq_binary_reconstruction_error_is_at_most_round_to_nearest():
    gptq_total = rtn_total = 0.0
    for seed in range(8):
        w, x, hessian = correlated_problem(seed)
        params = choose_qparams(w, BINARY)
        rtn = output_error(w, quantize(w, params)[0], params, x)
        # With the fallback every output channel keeps the better of the two (slack: H is float32 products).
        kept = gptq_codes(w, hessian, params, GPTQOptions(rtn_fallback=True))
        assert (output_error(w, kept, params, x) <= rtn * (1 + 1e-6)).all(), seed
        pure = gptq_codes(w, hessian, params, GPTQOptions(**PURE))
        assert set(pure.unique().tolist()) <= {0, 1}
        gptq_total += float(output_error(w, pure, params, x).sum())
        rtn_total += float(rtn.sum())
    # Error feedback alone (it decides signs only) removes a good share of the output error.
    assert gptq_total < 0.9 * rtn_total


def test_gptq_binary_column_rounding_equals_the_grid():
    from quant.gptq import _column_rounder

    params = choose_qparams(torch.randn(5, 9, generator=torch.Generator().manual_seed(0)), BINARY)
    column = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3e38, -3e38, 0.3, -0.3, 2.0, -2.0])[:, None].repeat(5, 1)
    scale, zero_point = params.scale.repeat_interleave(10)[:, None], params.zero_point.repeat_interleave(10)[:, None]
    value, steps = _column_rounder(params.grid, scale, zero_point)(column)
    codes = params.grid.quantize(column, scale, zero_point)
    assert torch.equal(steps, codes.to(torch.float32))
    assert torch.equal(value, params.grid.dequantize(codes, scale, zero_point))


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    params = choose_qparams(w, BINARY)
    hessian = torch.diag(torch.arange(1.0, 11.0))  # diagonal: no later column can take an error
    assert torch.equal(gptq_codes(w, hessian, params, GPTQOptions(damp=0.0, **PURE)), quantize(w, params)[0])


def test_adaround_learns_signs_inside_the_two_levels_only():
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(6, 12, generator=gen), torch.randn(96, 12, generator=gen) @ torch.randn(12, 12, generator=gen)
    params = choose_qparams(w, BINARY)
    linear = lambda inputs, weight: inputs @ weight.T  # noqa: E731
    result = adaround(w, params, x, linear(x, w), linear, AdaRoundOptions(iters=300), gen)
    assert set(result.codes.unique().tolist()) <= {0, 1}
    a = params.scale[:, None]
    # Beyond +-a there is one level on the weight's side: the sign is kept.
    assert (result.codes[w >= a] == 1).all() and (result.codes[w < -a] == 0).all()
    assert result.loss_after < result.loss_before


def test_bn_reestimation_rescales_a_and_keeps_the_signs(tmp_path, small_net):
    gen = torch.Generator().manual_seed(0)
    calibration = [torch.randn(16, 1, 8, 8, generator=gen) for _ in range(2)]
    plan = QuantPlan(layer_bits={"conv2": 1})
    qnet, report = quantize_model(small_net, QuantSpec(bits=4), plan, calibration=calibration, bn_reestimate=True)
    rtn_net, rtn_report = quantize_model(small_net, QuantSpec(bits=4), plan)
    (codes, params), = report.codes["conv2"]
    (rtn, rtn_params), = rtn_report.codes["conv2"]
    assert torch.equal(codes, rtn) and not torch.equal(params.scale, rtn_params.scale)
    rows = qnet.conv2.weight.detach().reshape(8, -1)
    a = params.scale[:, None]
    assert torch.equal(rows, torch.where(codes.reshape(8, -1) == 1, a, -a))
    restored = load_packed(save_packed(tmp_path / "bn.hcq", qnet, report), small_net)
    assert torch.equal(restored.conv2.weight, qnet.conv2.weight)


@pytest.mark.parametrize("method", ["gptq", "adaround"])
def test_calibrated_methods_run_on_a_binary_layer(small_net, method):
    gen = torch.Generator().manual_seed(0)
    calibration = [torch.randn(16, 1, 8, 8, generator=gen)]
    options = AdaRoundOptions(iters=50) if method == "adaround" else None
    qnet, report = quantize_model(
        small_net, QuantSpec(bits=4), QuantPlan(layer_bits={"conv2": 1}), method=method, calibration=calibration, options=options
    )
    row = report.layer("conv2")
    assert (row.bits, row.method) == (1, method) and set(row.distinct_per_channel) <= {1, 2}
    (codes, params), = report.codes["conv2"]
    assert torch.equal(qnet.conv2.weight.detach(), dequantize(codes, params))
