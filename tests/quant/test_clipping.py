"""Range setting: MSE search (never worse than min-max), percentile, evaluators."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant import QuantSpec, choose_qparams, fake_quantize
from quant.clipping import COARSE_RATIOS, _SortedErrors, clip_range, direct_errors, minmax_range, percentile_range
from quant.schemes import Grid
from quant_testing import make_tensor, rows_of, specs, tensors


def channel_errors(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-channel (or whole-tensor) squared error, in float64, from the public API."""
    per_channel = spec.granularity == "per_channel"
    diff = rows_of(x, per_channel).double() - rows_of(fake_quantize(x, spec), per_channel).double()
    return (diff * diff).sum(dim=1)


@settings(max_examples=150, deadline=None)
@given(tensors(max_len=60), specs(clippings=("mse",), max_bits=16))
def test_mse_error_never_exceeds_minmax(x, spec):
    mse = channel_errors(x, spec)
    minmax = channel_errors(x, spec.replace(clipping="minmax"))
    assert bool((mse <= minmax * (1 + 1e-12)).all())


@settings(max_examples=60, deadline=None)
@given(tensors(max_len=60), specs(clippings=("mse",), max_bits=6))
def test_mse_is_at_least_as_good_as_every_coarse_ratio(x, spec):
    # Independent check of the search: re-evaluate each coarse candidate range directly.
    grid = Grid.make(spec.scheme, spec.bits, spec.narrow_range)
    per_channel = spec.granularity == "per_channel"
    rows = rows_of(x, per_channel)
    lo, hi = minmax_range(rows, symmetric=spec.scheme != "asymmetric")
    best = channel_errors(x, spec)
    for ratio in COARSE_RATIOS.tolist():
        scale, zp = grid.params(lo * ratio, hi * ratio, spec.pow2_scale)
        values = grid.dequantize(grid.quantize(rows, scale[:, None], zp[:, None]), scale[:, None], zp[:, None])
        err = ((values.double() - rows.double()) ** 2).sum(dim=1)
        assert bool((best <= err * (1 + 1e-9) + 1e-300).all())


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric", "pow2"])
def test_mse_clipping_helps_on_heavy_tails(scheme):
    x = make_tensor(7, (16, 256), "heavy")
    spec = QuantSpec(scheme=scheme, bits=3, clipping="mse")
    mse, minmax = channel_errors(x, spec).sum(), channel_errors(x, spec.replace(clipping="minmax")).sum()
    assert float(mse) < 0.9 * float(minmax)


@settings(max_examples=80, deadline=None)
@given(tensors(max_len=60), specs(clippings=("mse",)))
def test_mse_range_is_a_shrink_of_the_minmax_range(x, spec):
    grid = Grid.make(spec.scheme, spec.bits, spec.narrow_range)
    rows = rows_of(x, spec.granularity == "per_channel")
    lo, hi = minmax_range(rows, symmetric=spec.scheme != "asymmetric")
    clo, chi = clip_range(rows, spec, grid)
    assert bool((chi <= hi).all() and (clo >= lo).all())
    assert bool((chi >= 0.2 * hi * (1 - 1e-6)).all() and (clo <= 0.2 * lo * (1 - 1e-6)).all())
    # The same ratio shrinks both ends.
    ratio_hi = torch.where(hi > 0, chi / hi, torch.nan)
    ratio_lo = torch.where(lo < 0, clo / lo, torch.nan)
    both = (hi > 0) & (lo < 0)
    assert torch.allclose(ratio_hi[both], ratio_lo[both], rtol=1e-6)


@settings(max_examples=80, deadline=None)
@given(tensors(max_len=80), st.sampled_from(["asymmetric", "symmetric", "pow2"]), st.integers(2, 8), st.integers(0, 1000))
def test_sorted_evaluator_matches_the_real_quantizer(x, scheme, bits, seed):
    grid = Grid.make(scheme, bits)
    rows = rows_of(x, True)
    lo, hi = minmax_range(rows, symmetric=scheme != "asymmetric")
    ratios = torch.rand(5, 1, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.2
    fast = _SortedErrors(rows, grid)(lo * ratios, hi * ratios, False)
    slow = direct_errors(rows, lo * ratios, hi * ratios, grid, False)
    scale = float((rows.double() ** 2).sum(dim=1).max())
    assert torch.allclose(fast, slow, rtol=1e-6, atol=1e-9 * scale + 1e-300)


def test_percentile_matches_numpy():
    x = make_tensor(1, (5, 301), "heavy")
    for p in (50.0, 90.0, 99.0):
        lo, hi = percentile_range(x, p, symmetric=False)
        xn = x.numpy().astype(np.float64)
        assert np.allclose(hi.numpy(), np.maximum(np.percentile(xn, p, axis=1), 0), rtol=1e-6)
        assert np.allclose(lo.numpy(), np.minimum(np.percentile(xn, 100 - p, axis=1), 0), rtol=1e-6)
        slo, shi = percentile_range(x, p, symmetric=True)
        assert np.allclose(shi.numpy(), np.percentile(np.abs(xn), p, axis=1), rtol=1e-6)
        assert torch.equal(slo, -shi)


@settings(max_examples=50, deadline=None)
@given(tensors(), specs(clippings=("minmax",)))
def test_percentile_100_is_minmax(x, spec):
    q = spec.replace(clipping="percentile", percentile=100.0)
    a, b = choose_qparams(x, q), choose_qparams(x, spec)
    assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)


def test_percentile_has_no_size_limit():
    # torch.quantile refuses more than 2^24 elements; the sort-based percentile does not.
    x = torch.linspace(-1.0, 1.0, 2**24 + 3)
    p = choose_qparams(x, QuantSpec(clipping="percentile", percentile=50.0, granularity="per_tensor"))
    assert torch.isfinite(p.scale)


def test_minmax_symmetric_range_is_max_abs():
    lo, hi = minmax_range(torch.tensor([[-3.0, 1.0], [0.5, 2.0]]), symmetric=True)
    assert lo.tolist() == [-3.0, -2.0] and hi.tolist() == [3.0, 2.0]
    lo, hi = minmax_range(torch.tensor([[-3.0, 1.0], [0.5, 2.0]]), symmetric=False)
    assert lo.tolist() == [-3.0, 0.0] and hi.tolist() == [1.0, 2.0]
