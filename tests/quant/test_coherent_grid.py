"""Range setting "coherent": valid integer-zero-point grids, never worse than min-max under its own
objective, sign invariance, determinism, degenerate rows, hand-computed cases."""

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import quant.coherent_grid as cg
from quant import QuantSpec, choose_qparams, fake_quantize
from quant.clipping import is_sign_symmetric, minmax_range
from quant.ranges import clip_range
from quant.coherent_grid import _SortedMoments, affine_thresholds, candidate_ranges, coherent_error, grid_error, coherent_range
from quant.schemes import Grid
from quant_testing import make_tensor, rows_of, specs, tensors


def reference_j(x: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The documented objective per row, in numpy float64, from the quantized values alone.

    The error is rounded to float32 first, as the quantizer's own check does, so a grid
    kept for a margin of 1e-12 is not undone by a different rounding here.
    """
    e = (values.astype(np.float32) - x.astype(np.float32)).astype(np.float64)
    x = x.astype(np.float64)
    n = x.shape[-1]
    sumsq = (x * x).sum(-1)
    gain = np.where(sumsq > 0, (e * x).sum(-1) ** 2 / np.where(sumsq > 0, sumsq, 1.0), 0.0)
    return (e * e).sum(-1) + cg.GAIN_WEIGHT * n * gain + cg.MEAN_WEIGHT * e.sum(-1) ** 2


def lp_setup(x: torch.Tensor, spec: QuantSpec):
    grid = Grid.make(spec.scheme, spec.bits, spec.narrow_range)
    rows = rows_of(x, spec.granularity == "per_channel")
    return grid, rows, *minmax_range(rows, symmetric=spec.scheme != "asymmetric")


# ------------------------------------------------------------------ objective, evaluators


def test_grid_error_matches_the_documented_objective_with_torch_fake_quant():
    x = make_tensor(3, (6, 50), "heavy")
    grid = Grid.make("asymmetric", 3)
    lo, hi = minmax_range(x, symmetric=False)
    scale, zp = grid.params(lo * 0.8, hi * 0.8)
    values = torch.fake_quantize_per_channel_affine(x, scale, zp, 0, 0, 7)  # torch's kernel
    ours = grid_error(x, lo * 0.8, hi * 0.8, grid)
    assert np.allclose(ours.numpy(), reference_j(x.numpy(), values.numpy()), rtol=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["asymmetric", "symmetric", "pow2"]), st.integers(2, 6), st.integers(0, 10_000))
# Element (0, 55) of this one: x * fl32(1/s) rounds to exactly -25.5 (x / s = -25.499999):
# the quantizer's tie goes to the even step -26, the old midpoint rule put it on -25,
# and the sum e, sum e*x of the row moved J by a relative 0.47.
@example("asymmetric", 6, 2451)
@example("symmetric", 6, 84)  # the same on a symmetric grid (relative 0.49)
def test_sorted_moments_match_the_real_quantizer(scheme, bits, seed):
    # Continuous random data still puts a value within a float32 step of a decision
    # threshold now and then: the evaluator must follow the quantizer's float32 decisions.
    x = make_tensor(seed, (4, 70), "normal") * 3
    grid = Grid.make(scheme, bits)
    lo, hi = minmax_range(x, symmetric=scheme != "asymmetric")
    gen = torch.Generator().manual_seed(seed)
    ratios = torch.rand(6, 4, generator=gen) + 0.5
    shifts = torch.randint(-1, 2, (6, 4), generator=gen)
    cand_lo, cand_hi = candidate_ranges(lo, hi, grid, ratios, shifts)
    signed = is_sign_symmetric(grid)
    fast = _SortedMoments(x, x.double().pow(2).sum(1), grid, signed=signed)(cand_lo, cand_hi, False)
    slow = grid_error(x, cand_lo, cand_hi, grid)
    # The real quantizer rounds each error to float32 before summing: agreement to ~1e-7.
    assert torch.allclose(fast, slow, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("bits", [2, 3, 6])
def test_sorted_moments_match_the_real_quantizer_on_exact_ties(scheme, bits):
    # Multiples of 0.5 on grids of scale 2^-k: many values are exactly halfway between
    # two levels, where the quantizer rounds half to even (a midpoint rule rounds all up).
    x = make_tensor(bits, (6, 64), "small_ints")
    grid = Grid.make(scheme, bits)
    scale = torch.tensor([0.25, 0.5, 1.0, 2.0])[:, None].expand(-1, 6)
    if scheme == "asymmetric":
        z = torch.randint(grid.qmin, grid.qmax + 1, (4, 6), generator=torch.Generator().manual_seed(bits)).float()
        cand_lo, cand_hi = (grid.qmin - z) * scale, (grid.qmax - z) * scale
    else:
        cand_lo, cand_hi = -scale * grid.qmax, scale * grid.qmax
    params = grid.params(cand_lo, cand_hi)
    assert torch.equal(params[0], scale)
    fast = _SortedMoments(x, x.double().pow(2).sum(1), grid, signed=is_sign_symmetric(grid))(cand_lo, cand_hi, False)
    assert torch.allclose(fast, grid_error(x, cand_lo, cand_hi, grid), rtol=1e-9, atol=1e-12)


def test_sorted_moments_hand_case_with_ties():
    # Levels -1, 0, 1, 2 (s = 1, z = 1); x = (-0.5, 0.5, 1.5) are all ties, rounded half to
    # even to 0, 0, 2: e = (0.5, -0.5, 0.5), sum e = 0.5, sum e*x = 0.25, sum x^2 = 2.75.
    # J = 0.75 + 0.5 * 3 * 0.25^2 / 2.75 + 0.25. (All rounded up, e = (0.5, 0.5, 0.5):
    # J = 0.75 + 1.5 * 0.75^2 / 2.75 + 1.5^2 = 3.31, which the midpoint rule gave.)
    assert (cg.GAIN_WEIGHT, cg.MEAN_WEIGHT) == (0.5, 1.0), "the hand computation below uses these weights"
    x = torch.tensor([[-0.5, 0.5, 1.5]])
    grid = Grid.make("asymmetric", 2)
    lo, hi = torch.tensor([[-1.0]]), torch.tensor([[2.0]])
    expected = 0.75 + 0.5 * 3 * 0.25**2 / 2.75 + 0.25
    fast = _SortedMoments(x, x.double().pow(2).sum(1), grid, signed=False)(lo, hi, False)
    assert float(fast) == pytest.approx(expected, rel=1e-15)
    assert float(grid_error(x, lo, hi, grid)) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_affine_thresholds_are_the_quantizers(scheme, bits):
    # The threshold gets the upper code, the float32 just below it the lower one: with codes
    # non-decreasing in x, that is exactly the quantizer's decision, ties included (scales
    # 2^k (1 + i 2^-23) make x * fl32(1/s) land on .5 exactly).
    gen = torch.Generator().manual_seed(bits)
    n = 600 if bits <= 8 else 12
    for narrow in (True, False):
        grid = Grid.make(scheme, bits, narrow)
        power = torch.randint(-126, 100, (n,), generator=gen)
        tweak = 1 + torch.randint(-3, 4, (n,), generator=gen) * 2.0**-23
        scale = torch.cat([torch.ldexp(tweak, power), torch.exp(torch.empty(n).uniform_(-80, 80, generator=gen))]).float()
        scale = scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
        z = torch.randint(grid.qmin, grid.qmax + 1, scale.shape, generator=gen) if scheme == "asymmetric" else torch.zeros_like(scale, dtype=torch.int64)
        upper = torch.arange(grid.qmin + 1, grid.qmax + 1)
        cut = affine_thresholds(scale, upper - z)
        assert cut.dtype == torch.float32
        at = grid.quantize(cut, scale, z).to(torch.int64)
        below = grid.quantize(torch.nextafter(cut, torch.tensor(-torch.inf)), scale, z).to(torch.int64)
        assert bool((at >= upper).all() and (below < upper).all())


def test_coherent_error_weights_the_mean_and_gain_components():
    # e = (1, -1): no mean, no gain component for x = (1, 1); all mean for e = (1, 1).
    sq, n = torch.tensor([2.0], dtype=torch.float64), 2
    sumsq = torch.tensor([2.0], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    assert float(coherent_error(sq, zero, zero, sumsq, n)) == 2.0
    two = torch.tensor([2.0], dtype=torch.float64)
    expected = 2.0 + cg.GAIN_WEIGHT * 2 * 4 / 2 + cg.MEAN_WEIGHT * 4
    assert float(coherent_error(sq, two, two, sumsq, n)) == pytest.approx(expected, rel=1e-15)
    # A row of zeros has no gain term (no NaN from 0/0).
    assert float(coherent_error(zero, zero, zero, zero, n)) == 0.0


# ------------------------------------------------------------------ valid grids


@settings(max_examples=80, deadline=None)
@given(tensors(max_len=60), specs(clippings=("coherent",), max_bits=16))
def test_coherent_ranges_are_valid_grids(x, spec):
    grid, rows, lo, hi = lp_setup(x, spec)
    new_lo, new_hi = clip_range(rows, spec, grid)
    assert new_lo.dtype == new_hi.dtype == torch.float32 and new_lo.shape == (rows.shape[0],)
    assert bool((new_lo <= 0).all() and (new_hi >= 0).all())
    assert bool(torch.isfinite(new_lo).all() and torch.isfinite(new_hi).all())
    if spec.scheme != "asymmetric":
        assert torch.equal(new_lo, -new_hi)
    params = choose_qparams(x, spec)
    assert params.zero_point.dtype == torch.int32
    assert bool((params.zero_point >= grid.qmin).all() and (params.zero_point <= grid.qmax).all())
    assert bool(torch.isfinite(params.scale).all() and (params.scale > 0).all())
    values = fake_quantize(x, spec)
    assert bool(torch.isfinite(values).all())
    # At most 2^b values per channel, each a level of the chosen grid.
    assert all(row.unique().numel() <= 2**spec.bits for row in rows_of(values, spec.granularity == "per_channel"))


def test_asymmetric_ranges_map_back_to_the_searched_scale_and_zero_point():
    # Every candidate is the range of an integer zero point z and a scale s; Grid.params
    # must give back that very z (and s to float32 rounding), so what is ranked is stored.
    x = make_tensor(5, (32, 40), "heavy")
    for bits in (2, 3, 4, 8):
        grid = Grid.make("asymmetric", bits)
        lo, hi = minmax_range(x, symmetric=False)
        scale0, zp0 = grid.params(lo, hi)
        ratios = torch.linspace(0.5, 1.5, 11)[:, None].expand(-1, 32)
        for shift in (-1, 0, 1):
            cand_lo, cand_hi = candidate_ranges(lo, hi, grid, ratios, torch.full_like(ratios, shift, dtype=torch.int64))
            scale, zp = grid.params(cand_lo, cand_hi)
            assert torch.equal(zp, (zp0 + shift).clamp(grid.qmin, grid.qmax).expand_as(zp))
            assert torch.allclose(scale, scale0 * ratios, rtol=4e-7)


# ------------------------------------------------------------------ never worse than min-max


@settings(max_examples=80, deadline=None)
@given(tensors(max_len=60), specs(clippings=("coherent",), max_bits=8))
def test_lp_objective_never_exceeds_minmax(x, spec):
    grid, rows, lo, hi = lp_setup(x, spec)
    new_lo, new_hi = clip_range(rows, spec, grid)
    chosen = reference_j(rows.numpy(), rows_of(fake_quantize(x, spec), spec.granularity == "per_channel").numpy())
    minmax = reference_j(rows.numpy(), rows_of(fake_quantize(x, spec.replace(clipping="minmax")), spec.granularity == "per_channel").numpy())
    assert bool((chosen <= minmax * (1 + 1e-9) + 1e-300).all())


def test_the_real_quantizer_overrules_a_misranking_search(monkeypatch):
    # The fast evaluator only ranks; if it ranked at random, the final check with the
    # real quantizer must still never hand back a grid worse than min-max.
    gen = torch.Generator().manual_seed(0)
    monkeypatch.setattr(_SortedMoments, "__call__", lambda self, lo, hi, p2: torch.rand(lo.shape, generator=gen, dtype=torch.float64))
    x = make_tensor(9, (32, 64), "heavy")
    for scheme in ("asymmetric", "symmetric", "pow2"):
        spec = QuantSpec(scheme=scheme, bits=3, clipping="coherent")
        chosen = reference_j(x.numpy(), fake_quantize(x, spec).numpy())
        minmax = reference_j(x.numpy(), fake_quantize(x, spec.replace(clipping="minmax")).numpy())
        assert bool((chosen <= minmax).all())


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric", "pow2"])
def test_lp_is_at_least_as_good_as_every_coarse_candidate(scheme):
    # Independent re-evaluation (numpy objective, torch's own quantization) of every coarse
    # candidate of the documented search space.
    x = make_tensor(11, (8, 90), "heavy")
    grid = Grid.make(scheme, 3)
    lo, hi = minmax_range(x, symmetric=scheme != "asymmetric")
    best = reference_j(x.numpy(), fake_quantize(x, QuantSpec(scheme=scheme, bits=3, clipping="coherent")).numpy())
    shifts = cg.ZERO_SHIFTS if scheme == "asymmetric" else (0,)
    for ratio in cg.COARSE_RATIOS.tolist():
        for shift in shifts:
            r = torch.full((1, 8), ratio)
            cand_lo, cand_hi = candidate_ranges(lo, hi, grid, r, torch.full((1, 8), shift))
            scale, zp = grid.params(cand_lo[0], cand_hi[0])
            values = grid.dequantize(grid.quantize(x, scale[:, None], zp[:, None]), scale[:, None], zp[:, None])
            assert bool((best <= reference_j(x.numpy(), values.numpy()) * (1 + 1e-9)).all())


def test_lp_removes_most_of_the_mean_error_at_two_bits():
    # The point of the objective: per channel, the rounding error's mean and gain
    # components shrink against min-max (and against MSE clipping's shrunken gain).
    x = make_tensor(2, (64, 144), "normal") * 0.1
    spec = QuantSpec(bits=2, clipping="coherent")
    errors = {c: fake_quantize(x, spec.replace(clipping=c)) - x for c in ("minmax", "mse", "coherent")}
    mean_err = {c: float(e.mean(1).abs().mean()) for c, e in errors.items()}
    gain = {c: float(((e + x) * x).sum(1).div((x * x).sum(1)).sub(1).abs().mean()) for c, e in errors.items()}
    assert mean_err["coherent"] < 0.5 * mean_err["minmax"]
    assert gain["coherent"] < 0.5 * gain["mse"]


# ------------------------------------------------------------------ invariances, determinism


@settings(max_examples=40, deadline=None)
@given(tensors(max_len=60), specs(schemes=("symmetric", "pow2"), clippings=("coherent",)))
def test_sign_symmetric_grids_are_sign_invariant(x, spec):
    if spec.scheme == "symmetric" and not spec.narrow_range:
        spec = spec.replace(narrow_range=True)
    grid, rows, _, _ = lp_setup(x, spec)
    lo_a, hi_a = clip_range(rows, spec, grid)
    lo_b, hi_b = clip_range(-rows, spec, grid)
    assert torch.equal(lo_a, lo_b) and torch.equal(hi_a, hi_b)
    assert torch.equal(fake_quantize(-x, spec), -fake_quantize(x, spec))


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric", "pow2"])
def test_deterministic(scheme):
    x = make_tensor(4, (16, 3, 3, 3), "small_ints")  # exact ties and duplicates
    spec = QuantSpec(scheme=scheme, bits=3, clipping="coherent")
    first = choose_qparams(x, spec)
    torch.manual_seed(123)
    second = choose_qparams(x.clone(), spec)
    assert torch.equal(first.scale, second.scale) and torch.equal(first.zero_point, second.zero_point)


# ------------------------------------------------------------------ granularity, degenerate rows


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric", "pow2"])
def test_per_tensor(scheme):
    x = make_tensor(8, (5, 7, 3), "heavy")
    spec = QuantSpec(scheme=scheme, bits=3, clipping="coherent", granularity="per_tensor")
    params = choose_qparams(x, spec)
    assert params.scale.shape == () and params.axis is None
    chosen = reference_j(x.reshape(1, -1).numpy(), fake_quantize(x, spec).reshape(1, -1).numpy())
    minmax = reference_j(x.reshape(1, -1).numpy(), fake_quantize(x, spec.replace(clipping="minmax")).reshape(1, -1).numpy())
    assert chosen[0] <= minmax[0]


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric", "pow2"])
@pytest.mark.parametrize("bits", [2, 4, 16])
def test_constant_and_zero_rows(scheme, bits):
    if scheme == "pow2" and bits > 8:
        bits = 8
    x = torch.tensor([[0.0] * 6, [0.75] * 6, [-2.5] * 6, [1e-40] * 6])  # zeros, constants, a subnormal
    spec = QuantSpec(scheme=scheme, bits=bits, clipping="coherent")
    params = choose_qparams(x, spec)
    values = fake_quantize(x, spec)
    assert bool(torch.isfinite(params.scale).all() and torch.isfinite(values).all())
    assert torch.equal(values[0], x[0])  # zeros stay zeros
    # A constant row is (nearly) its own level; coherent keeps an error no larger than min-max's.
    minmax = fake_quantize(x, spec.replace(clipping="minmax"))
    assert bool(((values - x).abs().amax(1) <= (minmax - x).abs().amax(1) + 1e-6 * x.abs().amax(1)).all())


# ------------------------------------------------------------------ hand-computed cases


def test_values_already_on_a_grid_keep_that_grid():
    # Levels -0.5, 0, 0.5, 1 (s = 0.5, z = 1) hold every value: J = 0, nothing beats it.
    x = torch.tensor([[-0.5, 0.0, 0.5, 1.0, 1.0, 0.5, 0.0, 0.5]])
    spec = QuantSpec(bits=2, clipping="coherent")
    params = choose_qparams(x, spec)
    assert params.scale.tolist() == [0.5] and params.zero_point.tolist() == [1]
    assert torch.equal(fake_quantize(x, spec), x)


def test_ternary_hand_case_trades_the_outlier_for_the_bulk():
    # Symmetric 2 bits: levels {-a, 0, a}. x = (1, 1, 1, 1, 3): N = 5, sum x^2 = 13.
    assert (cg.GAIN_WEIGHT, cg.MEAN_WEIGHT) == (0.5, 1.0), "the hand computation below uses these weights"
    # min-max, a = 3: the 1s round to 0, e = (-1, -1, -1, -1, 0), sum e = sum e*x = -4:
    #   J = 4 + 0.5 * 5 * 16 / 13 + 16.
    # 1 < a < 2: all round to a, e = (a-1, a-1, a-1, a-1, a-3), sum e = 5a - 7, sum e*x = 7a - 13:
    #   J(a) = 4(a-1)^2 + (a-3)^2 + 2.5 (7a-13)^2 / 13 + (5a-7)^2,
    #   J'(a) = 0 at 1025 a = 1547: a* = 1.5093, J(a*) = 4.698.
    # 2 < a <= 4.5 (the widest searched): the 1s round to 0, sum e = a - 7, J >= 4 + 2.5^2 = 10.25.
    # So the search must land in 1 < a < 2 within half a fine step (3 * 0.0025) of a*.
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0, 3.0]])
    grid = Grid.make("symmetric", 2)
    lo, hi = coherent_range(x, torch.tensor([-3.0]), torch.tensor([3.0]), grid)
    a_star = 1547 / 1025

    def j(a):
        return 4 * (a - 1) ** 2 + (a - 3) ** 2 + 2.5 * (7 * a - 13) ** 2 / 13 + (5 * a - 7) ** 2

    assert torch.equal(lo, -hi) and abs(float(hi) - a_star) <= 0.0075 + 1e-6
    assert float(grid_error(x, lo, hi, grid)) == pytest.approx(j(float(hi)), rel=1e-6)
    assert j(float(hi)) <= j(a_star) + 0.01
    assert float(grid_error(x, torch.tensor([-3.0]), torch.tensor([3.0]), grid)) == pytest.approx(4 + 40 / 13 + 16, rel=1e-12)


def test_spec_accepts_lp():
    spec = QuantSpec(bits=3, clipping="coherent")
    assert spec.tag == "asymmetric-3b-coherent-per_channel"
    assert QuantSpec.from_dict(spec.to_dict()) == spec
