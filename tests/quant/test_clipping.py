"""Range setting: MSE search (never worse than min-max), percentile, evaluators."""

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from quant import QuantSpec, choose_qparams, fake_quantize
from quant.clipping import (
    COARSE_RATIOS,
    NEAR_TIE_RTOL,
    _SortedErrors,
    direct_errors,
    minmax_range,
    percentile_range,
    pick_ratio,
)
from quant.ranges import clip_range
from quant.schemes import Grid
from quant_testing import make_tensor, rows_of, specs, tensors


def channel_errors(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-channel (or whole-tensor) squared error, in float64, from the public API."""
    per_channel = spec.granularity == "per_channel"
    diff = rows_of(x, per_channel).double() - rows_of(fake_quantize(x, spec), per_channel).double()
    return (diff * diff).sum(dim=1)


# pow2_scale: ratios 1.0 and 0.95 give a = 2^28 and 2^27, errors equal to float64 rounding.
TIED_POW2 = (
    make_tensor(0, (3, 2, 4, 5), "wide_range"),
    QuantSpec(scheme="pow2", bits=6, granularity="per_tensor", clipping="mse", pow2_scale=True),
)


@settings(max_examples=150, deadline=None)
@given(tensors(max_len=60), specs(clippings=("mse",), max_bits=16))
@example(*TIED_POW2)
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


# ---------------------------------------------------------------- MSE: sign invariance, ties


def test_mse_pow2_scale_tie_is_sign_invariant_and_keeps_the_wider_range():
    x, spec = TIED_POW2
    a, b = choose_qparams(x, spec).scale, choose_qparams(-x, spec).scale
    assert float(a) == float(b) == 2.0**28  # the wider of the two equally good grids
    assert torch.equal(fake_quantize(-x, spec), -fake_quantize(x, spec))


@pytest.mark.parametrize("kind", ["normal", "heavy", "wide_range", "small_ints", "zeros_mixed"])
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(scheme="symmetric", bits=4, clipping="mse"),
        QuantSpec(scheme="symmetric", bits=8, clipping="mse", granularity="per_tensor"),
        QuantSpec(scheme="pow2", bits=4, clipping="mse"),
        QuantSpec(scheme="pow2", bits=6, clipping="mse", pow2_scale=True),
        QuantSpec(scheme="pow2", bits=8, clipping="mse", pow2_scale=True, granularity="per_tensor"),
    ],
    ids=lambda s: s.tag,
)
def test_mse_parameters_of_minus_x_are_bit_identical(kind, spec):
    # Rows long enough for the sorted (prefix-sum) evaluator as well as short ones.
    for seed, shape in enumerate([(8, 3, 3, 3), (4, 500), (2, 7)]):
        x = make_tensor(seed, shape, kind)
        p, q = choose_qparams(x, spec), choose_qparams(-x, spec)
        assert torch.equal(p.scale, q.scale)
        assert torch.equal(fake_quantize(-x, spec), -fake_quantize(x, spec))


@settings(max_examples=60, deadline=None)
@given(tensors(max_len=80), st.sampled_from([("symmetric", True), ("pow2", False), ("pow2", True)]), st.integers(2, 8))
def test_sorted_evaluator_on_abs_matches_the_real_quantizer_on_x(x, case, bits):
    # For a sign-symmetric grid the error of x is the error of |x| on the levels >= 0.
    scheme, pow2_scale = case
    grid = Grid.make(scheme, bits)
    rows = rows_of(x, True)
    lo, hi = minmax_range(rows, symmetric=True)
    ratios = torch.tensor([[1.0], [0.8], [0.5], [0.2]])
    fast = _SortedErrors(rows.abs(), grid, nonnegative=True)(lo * ratios, hi * ratios, pow2_scale)
    slow = direct_errors(rows, lo * ratios, hi * ratios, grid, pow2_scale)
    assert torch.equal(direct_errors(rows.abs(), lo * ratios, hi * ratios, grid, pow2_scale), slow)
    scale = float((rows.double() ** 2).sum(dim=1).max())
    assert torch.allclose(fast, slow, rtol=1e-6, atol=1e-9 * scale + 1e-300)


def test_sorted_evaluator_nonnegative_needs_a_sign_symmetric_grid():
    with pytest.raises(ValueError, match="sign-symmetric"):
        _SortedErrors(torch.ones(1, 4), Grid.make("asymmetric", 4), nonnegative=True)
    with pytest.raises(ValueError, match="sign-symmetric"):
        _SortedErrors(torch.ones(1, 4), Grid.make("symmetric", 4, narrow_range=False), nonnegative=True)


def test_pick_ratio_near_ties_go_to_the_widest_range():
    grid = Grid.make("symmetric", 4)
    lo, hi = torch.tensor([-1.0, -1.0, -1.0]), torch.tensor([1.0, 1.0, 1.0])
    ratios = torch.tensor([[0.5, 0.5, 0.5], [0.9, 0.9, 0.9], [0.7, 0.7, 0.7]])  # any order
    base = 1000.0
    errors = torch.tensor(
        [
            [base, base, base],  # 0.5
            [base * (1 + NEAR_TIE_RTOL / 4), base * (1 + 100 * NEAR_TIE_RTOL), base],  # 0.9
            [base * (1 + NEAR_TIE_RTOL / 2), base * (1 - NEAR_TIE_RTOL / 8), base - 1.0],  # 0.7
        ],
        dtype=torch.float64,
    )
    # Row 0: all within the tolerance -> widest. Row 1: 0.9 is clearly worse, 0.7 and 0.5
    # tie -> 0.7. Row 2: 0.7 is clearly best.
    assert pick_ratio(ratios, errors, lo, hi, grid, False).tolist() == pytest.approx([0.9, 0.7, 0.7])
    # A permutation of the candidates changes nothing.
    perm = torch.tensor([2, 0, 1])
    assert pick_ratio(ratios[perm], errors[perm], lo, hi, grid, False).tolist() == pytest.approx([0.9, 0.7, 0.7])


def test_pick_ratio_counts_ratios_with_the_same_grid_once():
    # pow2_scale: ratios 1.0, 0.8 and 0.7 of amax = 3 all round up to a = 4; 0.4 gives a = 2.
    grid = Grid.make("pow2", 4)
    lo, hi = torch.tensor([-3.0]), torch.tensor([3.0])
    ratios = torch.tensor([[0.7], [1.0], [0.4], [0.8]])
    # The same grid evaluated with rounding noise: the smallest copy must not win for its noise,
    # and the grid is reported by its widest ratio.
    errors = torch.tensor([[5.0 - 1e-9], [5.0], [7.0], [5.0 + 1e-9]], dtype=torch.float64)
    assert pick_ratio(ratios, errors, lo, hi, grid, True).tolist() == [1.0]
    errors = torch.tensor([[5.0], [5.0], [4.0], [5.0]], dtype=torch.float64)
    assert pick_ratio(ratios, errors, lo, hi, grid, True).tolist() == [pytest.approx(0.4)]
