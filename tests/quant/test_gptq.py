"""GPTQ primitives: im2col against real convolutions, GPTQ against round to nearest and brute force."""

import itertools
import random

import pytest
import torch
import torch.nn as nn

from quant import QParams, QuantError, QuantSpec, choose_qparams, dequantize, quantize
from quant.gptq import GPTQOptions, HessianAccumulator, gptq_codes, gptq_layer_codes, input_columns

PURE = {"rtn_fallback": False}  # GPTQ alone, without the per-channel round-to-nearest fallback
SCHEMES = ("asymmetric", "symmetric", "pow2")


# ---------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_thread")


def layer_output_from_columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output (no bias) rebuilt from input_columns: cols[g] @ W_g.T, rows back to positions."""
    cols = input_columns(layer, x)
    weight = layer.weight.detach()
    groups = cols.shape[0]
    out_g = weight.shape[0] // groups
    parts = [cols[g] @ weight[g * out_g : (g + 1) * out_g].reshape(out_g, -1).T for g in range(groups)]
    return torch.cat(parts, dim=1)  # (rows, out)


def random_conv(rng: random.Random) -> tuple[nn.Module, torch.Tensor]:
    """A Conv1d/2d/3d with random stride, padding, dilation, groups and padding_mode, and an input."""
    spatial = rng.choice([1, 2, 3])
    groups = rng.choice([1, 2, 3])
    in_ch, out_ch = groups * rng.randint(1, 2), groups * rng.randint(1, 2)
    kernel = tuple(rng.randint(1, 3) for _ in range(spatial))
    dilation = tuple(rng.randint(1, 2) for _ in range(spatial))
    padding = rng.choice(["same", "valid", "int", "tuple"])
    # torch allows padding="same" only with stride 1.
    stride = 1 if padding == "same" else tuple(rng.randint(1, 3) for _ in range(spatial))
    if padding == "int":
        padding = rng.randint(0, 2)
    elif padding == "tuple":
        padding = tuple(rng.randint(0, 2) for _ in range(spatial))
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial - 1](
        in_ch,
        out_ch,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=rng.choice(["zeros", "reflect", "replicate", "circular"]),
        bias=False,
    )
    size = [rng.randint(5, 8) for _ in range(spatial)]  # > padding, as reflect needs
    x = torch.randn(rng.randint(1, 2), in_ch, *size, generator=torch.Generator().manual_seed(rng.randint(0, 10**6)))
    return conv, x


def correlated_problem(seed: int, out: int, cols: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W, X, H): random weights and inputs with strongly correlated columns, H = (2/N) X^T X."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=gen) @ torch.randn(cols, cols, generator=gen)
    w = torch.randn(out, cols, generator=gen)
    acc = HessianAccumulator(nn.Linear(cols, out))
    acc.add(x)
    return w, x, acc.hessian[0]


def output_error(w: torch.Tensor, codes: torch.Tensor, params: QParams, x: torch.Tensor) -> torch.Tensor:
    """Per output channel ||(w - wq) X^T||^2, in float64 straight from the inputs."""
    diff = w.double() - dequantize(codes, params).double()
    return ((diff @ x.double().T) ** 2).sum(dim=1)


def rtn_codes(w: torch.Tensor, params: QParams) -> torch.Tensor:
    return quantize(w, params)[0]


# ---------------------------------------------------------------- 1. im2col


# torch warns that it copies the input for padding="same" with an even kernel.
@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("seed", range(40))
def test_input_columns_equal_the_convolution(seed):
    conv, x = random_conv(random.Random(seed))
    reference = conv(x)  # (B, out, *positions)
    rebuilt = layer_output_from_columns(conv, x)
    rebuilt = rebuilt.reshape(x.shape[0], *reference.shape[2:], -1).movedim(-1, 1)
    torch.testing.assert_close(rebuilt, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "conv",
    [
        # Even kernel with "same": torch pads one more after the input than before.
        nn.Conv2d(2, 4, (2, 4), padding="same", dilation=(1, 3), padding_mode="reflect", bias=False),
        nn.Conv3d(4, 2, 3, stride=(2, 1, 3), padding=(1, 0, 2), dilation=(2, 1, 1), groups=2, padding_mode="circular", bias=False),
        nn.Conv1d(3, 3, 4, stride=2, padding=3, dilation=2, groups=3, padding_mode="replicate", bias=False),
        nn.Conv2d(2, 2, 3, padding="valid", bias=False),
    ],
    ids=["2d-same-even", "3d-circular-groups", "1d-depthwise-replicate", "2d-valid"],
)
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_input_columns_pinned_cases(conv):
    torch.manual_seed(0)
    x = torch.randn(2, conv.in_channels, *([7] * len(conv.kernel_size)))
    reference = conv(x)
    rebuilt = layer_output_from_columns(conv, x).reshape(2, *reference.shape[2:], -1).movedim(-1, 1)
    torch.testing.assert_close(rebuilt, reference, atol=1e-5, rtol=1e-5)


def test_input_columns_unbatched_conv_and_linear_with_extra_dims():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, 3, padding=1, bias=False)
    x = torch.randn(3, 5, 6)  # unbatched
    rebuilt = layer_output_from_columns(conv, x).T.reshape(2, 5, 6)
    torch.testing.assert_close(rebuilt, conv(x), atol=1e-5, rtol=1e-5)

    linear = nn.Linear(4, 3, bias=False)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    cols = input_columns(linear, x)
    assert cols.shape == (1, 10, 4) and cols.dtype == torch.float32
    torch.testing.assert_close(cols[0] @ linear.weight.detach().T, linear(x.float()).reshape(10, 3))


def test_hessian_accumulates_batches_exactly_like_one_batch():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    batches = [torch.randn(3, 4, 5, 5) for _ in range(3)]
    acc = HessianAccumulator(conv)
    for b in batches:
        acc.add(b)
    cols = input_columns(conv, torch.cat(batches)).double()
    reference = 2 * cols.transpose(1, 2) @ cols / cols.shape[1]
    assert acc.rows == 3 * 3 * 25
    assert acc.hessian.shape == (2, 18, 18) and acc.hessian.dtype == torch.float64
    # Each batch's X^T X is a float32 product (then summed in float64): entries agree to
    # float32 rounding of the largest ones, about 1e-7 of max|H|.
    torch.testing.assert_close(acc.hessian, reference, rtol=0, atol=1e-6 * float(reference.abs().max()))


# ---------------------------------------------------------------- 2, 3. GPTQ reduces to round to nearest


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("fallback", [False, True])
def test_single_input_column_equals_round_to_nearest(scheme, bits, fallback):
    # With one column there is no later column to take the error: GPTQ is plain rounding.
    gen = torch.Generator().manual_seed(bits)
    layer = nn.Linear(1, 16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(16, 1, generator=gen) * 3)
    acc = HessianAccumulator(layer)
    acc.add(torch.randn(20, 1, generator=gen))
    params = choose_qparams(layer.weight, QuantSpec(scheme=scheme, bits=bits, clipping="mse"))
    codes = gptq_codes(layer.weight, acc.hessian[0], params, GPTQOptions(rtn_fallback=fallback))
    assert torch.equal(codes, rtn_codes(layer.weight, params))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("act_order", [False, True])
def test_orthogonal_inputs_give_round_to_nearest(scheme, act_order):
    # Every input row has a single non-zero entry, so X^T X is exactly diagonal: the error
    # of one column is uncorrelated with the others and GPTQ has nothing to compensate.
    gen = torch.Generator().manual_seed(1)
    cols = 10
    hot = torch.arange(60) % cols
    x = torch.zeros(60, cols)
    x[torch.arange(60), hot] = torch.rand(60, generator=gen) * 4 + 0.5
    layer = nn.Linear(cols, 8)
    acc = HessianAccumulator(layer)
    acc.add(x)
    hessian = acc.hessian[0]
    assert torch.count_nonzero(hessian - torch.diag(hessian.diagonal())) == 0
    for bits in (2, 3, 4):
        params = choose_qparams(layer.weight, QuantSpec(scheme=scheme, bits=bits, clipping="mse"))
        codes = gptq_codes(layer.weight, hessian, params, GPTQOptions(act_order=act_order, **PURE))
        assert torch.equal(codes, rtn_codes(layer.weight, params))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_column_rounding_equals_the_grid(scheme, bits):
    # GPTQ rounds one column at a time with hoisted constants; it must decide exactly as
    # Grid.quantize / Grid.dequantize do, on random values, on every level, on every
    # midpoint between levels (ties) and the floats next to it, and far outside the range.
    from quant.gptq import _column_rounder

    gen = torch.Generator().manual_seed(bits)
    spec = QuantSpec(scheme=scheme, bits=bits)
    for channels, magnitude in ((6, 1.0), (1, 1e-30), (5, 1e30)):
        params = choose_qparams(torch.randn(channels, 9, generator=gen) * magnitude, spec)
        grid, scale, zero_point = params.grid, params.scale[:, None], params.zero_point[:, None]
        levels = params.levels().double()
        midpoints = ((levels[:, 1:] + levels[:, :-1]) / 2).float()
        up, down = torch.full_like(midpoints, float("inf")), torch.full_like(midpoints, -float("inf"))
        columns = torch.cat(
            [
                torch.randn(channels, 50, generator=gen) * magnitude * 2,
                levels.float(),
                midpoints,
                torch.nextafter(midpoints, up),
                torch.nextafter(midpoints, down),
                torch.tensor([[3e38, -3e38, 1e-45, -0.0, 0.0]]).expand(channels, -1),
            ],
            dim=1,
        )
        # All columns at once, as one tall column: row j*channels + c is value j of channel c.
        count = columns.shape[1]
        column = columns.T.reshape(-1, 1).contiguous()
        scale, zero_point = scale.repeat(count, 1), zero_point.repeat(count, 1)
        value, steps = _column_rounder(grid, scale, zero_point)(column)
        codes = grid.quantize(column, scale, zero_point)
        assert torch.equal(steps + zero_point, codes.to(torch.float32))
        # Equal values (== also equates the -0.0 that round(-0.3) * s gives with 0.0).
        assert torch.equal(value, grid.dequantize(codes, scale, zero_point))


# ---------------------------------------------------------------- 4. never worse than round to nearest


def test_gptq_output_error_never_exceeds_round_to_nearest():
    # rtn_fallback=True keeps, per output channel, the codes with the smaller
    # error d^T H d. That choice uses H accumulated from float32 products, while the
    # reference error below is float64 straight from X; the two differ by rounding (about
    # 1e-7 relative), so a channel whose two errors are that close may go either way:
    # hence the 1e-6 relative slack.
    slack = 1e-6
    gptq_total = rtn_total = 0.0
    channels_where_pure_gptq_lost = 0
    for seed, scheme, bits in itertools.product(range(4), SCHEMES, (2, 3, 4)):
        w, x, hessian = correlated_problem(seed, out=6, cols=12, n=40)
        clipping = "mse" if seed % 2 else "minmax"
        params = choose_qparams(w, QuantSpec(scheme=scheme, bits=bits, clipping=clipping))
        rtn = output_error(w, rtn_codes(w, params), params, x)
        for act_order in (True, False):
            gptq = output_error(w, gptq_codes(w, hessian, params, GPTQOptions(act_order=act_order, rtn_fallback=True)), params, x)
            assert (gptq <= rtn * (1 + slack)).all(), (seed, scheme, bits, act_order)
            gptq_total += float(gptq.sum())
            rtn_total += float(rtn.sum())
            pure = output_error(w, gptq_codes(w, hessian, params, GPTQOptions(act_order=act_order, **PURE)), params, x)
            channels_where_pure_gptq_lost += int((pure > rtn * (1 + slack)).sum())
    # GPTQ is greedy, and its error feedback can push weights past the clipped range: on
    # its own it loses on some channels. The sweep must meet such channels, or it would not
    # exercise the fallback at all.
    assert channels_where_pure_gptq_lost > 0
    # And it is not just round to nearest: it removes a large share of the output error.
    assert gptq_total < 0.75 * rtn_total


def test_pure_gptq_beats_round_to_nearest_on_well_conditioned_problems():
    # Without clamping (a grid much wider than the weights) and with inputs that are not
    # nearly collinear, plain GPTQ wins on the whole matrix, and by a wide margin overall.
    ratios = []
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(64, 16, generator=gen) @ (torch.eye(16) + 0.4 * torch.randn(16, 16, generator=gen))
        w = torch.randn(8, 16, generator=gen)
        acc = HessianAccumulator(nn.Linear(16, 8))
        acc.add(x)
        scale = w.abs().amax(dim=1) / 2  # about 5 levels across each row, codes up to +-127
        params = QParams("symmetric", 8, scale, torch.zeros(8, dtype=torch.int32), -127, 127, 0)
        gptq = output_error(w, gptq_codes(w, acc.hessian[0], params, GPTQOptions(**PURE)), params, x).sum()
        rtn = output_error(w, rtn_codes(w, params), params, x).sum()
        assert gptq <= rtn, seed
        ratios.append(float(gptq / rtn))
    assert sum(ratios) / len(ratios) < 0.7


# ---------------------------------------------------------------- 5. brute force and a hand-derived case


def all_code_rows(params: QParams, cols: int) -> torch.Tensor:
    """Every row of codes in [qmin, qmax]^cols, (n, cols)."""
    levels = range(params.qmin, params.qmax + 1)
    return torch.tensor(list(itertools.product(levels, repeat=cols)), dtype=torch.int64)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("seed", range(8))
def test_brute_force_on_a_2_by_3_matrix(scheme, seed):
    w, x, hessian = correlated_problem(100 + seed, out=2, cols=3, n=12)
    params = choose_qparams(w, QuantSpec(scheme=scheme, bits=2))
    candidates = all_code_rows(params, 3)  # 4^3 (asymmetric) or 3^3 rows
    for row in range(2):
        row_params = QParams(scheme, 2, params.scale[row : row + 1], params.zero_point[row : row + 1], params.qmin, params.qmax, 0)
        values = row_params.levels()[0][candidates - params.qmin]  # code qmin + i is the i-th level
        errors = (((w[row].double() - values.double()) @ x.double().T) ** 2).sum(dim=1)
        optimum = float(errors.min())
        for options in (GPTQOptions(rtn_fallback=True), GPTQOptions(act_order=False, rtn_fallback=True), GPTQOptions(**PURE)):
            codes = gptq_codes(w[row : row + 1], hessian, row_params, options)
            gptq = float(output_error(w[row : row + 1], codes, row_params, x))
            assert optimum <= gptq * (1 + 1e-9)
            if options.rtn_fallback:
                rtn = float(output_error(w[row : row + 1], rtn_codes(w[row : row + 1], row_params), row_params, x))
                assert gptq <= rtn * (1 + 1e-6)


@pytest.mark.parametrize("options", [
    GPTQOptions(damp=0.0, act_order=False, rtn_fallback=False),
    GPTQOptions(damp=0.0, act_order=True, rtn_fallback=True),  # equal diag(H): the order stays
    GPTQOptions(damp=0.0, act_order=False, block_size=1),
])
def test_hand_derived_sequential_steps(options):
    # Levels -1, 0, 1, 2 (codes 0..3); H = tridiagonal(0.5, 1, 0.5).
    # Rounding column j with error e moves the later columns by -e * Hs[j, later] / Hs[j, j],
    # Hs the inverse of H restricted to the columns not yet rounded:
    #   H^-1 = [[1.5, -1, .5], [-1, 2, -1], [.5, -1, 1.5]]  -> after col 0: w1 += 2/3 e0, w2 -= 1/3 e0
    #   inverse of H[1:, 1:] = [[4/3, -2/3], [-2/3, 4/3]]      -> after col 1: w2 += 1/2 e1
    # Row 0, w = (.3, .4, .3): q0 = 0, e0 = .3 -> w1 = .6, w2 = .2; q1 = 1, e1 = -.4 -> w2 = 0; q2 = 0.
    # Row 1, w = (.8, -.45, .4): q0 = 1, e0 = -.2 -> w1 = -.5833, w2 = .4667;
    #        q1 = -1, e1 = .4167 -> w2 = .675; q2 = 1.
    # Errors d^T H d: row 0 .18 (round to nearest .58), row 1 .2625 (.3125): GPTQ wins both,
    # so the fallback keeps these codes.
    params = QParams("asymmetric", 2, torch.tensor([1.0, 1.0]), torch.tensor([1, 1], dtype=torch.int32), 0, 3, 0)
    hessian = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)
    w = torch.tensor([[0.3, 0.4, 0.3], [0.8, -0.45, 0.4]])
    expected = torch.tensor([[1, 2, 1], [2, 0, 2]], dtype=torch.uint8)  # levels (0, 1, 0), (1, -1, 1)
    assert torch.equal(rtn_codes(w, params), torch.tensor([[1, 1, 1], [2, 1, 1]], dtype=torch.uint8))
    assert torch.equal(gptq_codes(w, hessian, params, options), expected)


# ---------------------------------------------------------------- 6. codes, orders, groups, determinism


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_codes_are_valid_grid_codes(scheme, granularity):
    for bits, act_order in itertools.product((2, 3, 4, 8), (True, False)):
        w, _, hessian = correlated_problem(bits, out=5, cols=20, n=50)
        params = choose_qparams(w, QuantSpec(scheme=scheme, bits=bits, granularity=granularity))
        codes = gptq_codes(w, hessian, params, GPTQOptions(act_order=act_order, block_size=7))
        assert codes.shape == w.shape and codes.dtype == params.grid.code_dtype
        assert int(codes.min()) >= params.qmin and int(codes.max()) <= params.qmax
        assert max(len(torch.unique(row)) for row in codes) <= 2**bits
        # Determinism: the same input gives the same codes.
        assert torch.equal(codes, gptq_codes(w, hessian, params, GPTQOptions(act_order=act_order, block_size=7)))


def test_block_size_changes_nothing_but_speed():
    w, _, hessian = correlated_problem(7, out=6, cols=40, n=80)
    params = choose_qparams(w, QuantSpec(bits=3))
    reference = gptq_codes(w, hessian, params, GPTQOptions(block_size=40, **PURE))
    for block_size in (1, 3, 16, 128):
        assert torch.equal(gptq_codes(w, hessian, params, GPTQOptions(block_size=block_size, **PURE)), reference)


def test_act_order_rounds_high_energy_columns_first():
    # Column 1 carries 100x the energy of column 0 and the two are correlated: with
    # act_order column 1 is rounded first and column 0 absorbs its error, without it the
    # other way round. Same grid, different codes, and act_order's output error is lower.
    params = QParams("asymmetric", 2, torch.tensor([1.0]), torch.tensor([1], dtype=torch.int32), 0, 3, 0)
    hessian = torch.tensor([[1.0, 5.0], [5.0, 100.0]], dtype=torch.float64)
    w = torch.tensor([[0.3, 0.4]])
    plain = gptq_codes(w, hessian, params, GPTQOptions(damp=0.0, act_order=False, **PURE))
    ordered = gptq_codes(w, hessian, params, GPTQOptions(damp=0.0, act_order=True, **PURE))
    # Without: q0 = 0, e0 = .3 -> w1 = .4 + .05 * .3 = .415 -> 0.  With: q1 = 0, e1 = .4 -> w0 = .3 + 5 * .4 = 2.3 -> 2.
    assert torch.equal(plain, torch.tensor([[1, 1]], dtype=torch.uint8))
    assert torch.equal(ordered, torch.tensor([[3, 1]], dtype=torch.uint8))

    def err(codes):
        d = (w - dequantize(codes, params)).double()[0]
        return float(d @ hessian @ d)

    assert err(ordered) < err(plain)


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_grouped_conv_equals_separate_convs(granularity):
    torch.manual_seed(3)
    groups, in_g, out_g = 3, 2, 4
    conv = nn.Conv2d(groups * in_g, groups * out_g, 3, padding=1, groups=groups)
    x = torch.randn(4, groups * in_g, 6, 6)
    acc = HessianAccumulator(conv)
    acc.add(x)
    spec = QuantSpec(bits=2, clipping="mse", granularity=granularity)
    params = choose_qparams(conv.weight, spec)
    codes = gptq_layer_codes(conv.weight, acc.hessian, params, groups)
    assert codes.shape == conv.weight.shape and codes.dtype == torch.uint8
    for g in range(groups):
        # The same group as an ungrouped conv of its own, fed its own channels.
        part = nn.Conv2d(in_g, out_g, 3, padding=1)
        rows = slice(g * out_g, (g + 1) * out_g)
        part.weight.data = conv.weight.data[rows].clone()
        part_acc = HessianAccumulator(part)
        part_acc.add(x[:, g * in_g : (g + 1) * in_g])
        part_params = choose_qparams(part.weight, spec) if granularity == "per_channel" else params
        expected = gptq_codes(part.weight.reshape(out_g, -1), part_acc.hessian[0], part_params)
        assert torch.equal(codes[rows].reshape(out_g, -1), expected), g


def test_layer_codes_of_linear_and_conv3d_keep_the_weight_shape():
    torch.manual_seed(4)
    for layer, x in ((nn.Linear(6, 3), torch.randn(10, 6)), (nn.Conv3d(2, 4, 2, groups=2), torch.randn(2, 2, 4, 4, 4))):
        acc = HessianAccumulator(layer)
        acc.add(x)
        params = choose_qparams(layer.weight, QuantSpec(scheme="symmetric", bits=3))
        codes = gptq_layer_codes(layer.weight, acc.hessian, params, 1 if isinstance(layer, nn.Linear) else layer.groups)
        assert codes.shape == layer.weight.shape and codes.dtype == torch.int8


def test_dead_inputs_are_zeroed_and_need_no_damping():
    # Input 2 is always zero: H_22 = 0, and H is singular without the dead-input rule.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(30, 4, generator=gen)
    x[:, 2] = 0
    w = torch.randn(3, 4, generator=gen)
    acc = HessianAccumulator(nn.Linear(4, 3))
    acc.add(x)
    for scheme in SCHEMES:
        params = choose_qparams(w, QuantSpec(scheme=scheme, bits=3))
        codes = gptq_codes(w, acc.hessian[0], params, GPTQOptions(damp=0.0, **PURE))
        assert torch.equal(dequantize(codes, params)[:, 2], torch.zeros(3))


def test_singular_hessian_is_retried_with_more_damping():
    # Rank one, no dead input: the undamped Cholesky fails, a damped retry succeeds.
    params = choose_qparams(torch.tensor([[0.5, -0.3]]), QuantSpec(bits=2))
    hessian = torch.ones(2, 2, dtype=torch.float64)
    assert torch.linalg.cholesky_ex(hessian)[1] != 0
    codes = gptq_codes(torch.tensor([[0.5, -0.3]]), hessian, params, GPTQOptions(damp=0.0))
    assert codes.shape == (1, 2)


# ---------------------------------------------------------------- 7. bad input


@pytest.mark.parametrize(
    "field, value",
    [
        ("damp", -0.01),
        ("damp", 1.5),
        ("damp", float("nan")),
        ("damp", "0.01"),
        ("damp", True),
        ("block_size", 0),
        ("block_size", 2.5),
        ("block_size", True),
        ("act_order", 1),
        ("act_order", "yes"),
        ("rtn_fallback", None),
    ],
)
def test_bad_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^GPTQOptions\.{field}=.*allowed"):
        GPTQOptions(**{field: value})


def test_bad_inputs_raise_clear_errors():
    w = torch.randn(3, 4)
    h = torch.eye(4, dtype=torch.float64)
    params = choose_qparams(w, QuantSpec(bits=2))
    with pytest.raises(QuantError, match="nn.Linear, nn.Conv1d"):
        HessianAccumulator(nn.ConvTranspose2d(2, 2, 3))
    with pytest.raises(QuantError, match="input channels"):
        HessianAccumulator(nn.Conv2d(2, 2, 3)).add(torch.randn(1, 3, 5, 5))
    with pytest.raises(QuantError, match="last dimension must be 4"):
        input_columns(nn.Linear(4, 2), torch.randn(2, 5))
    with pytest.raises(QuantError, match="smaller than the dilated kernel"):
        input_columns(nn.Conv1d(1, 1, 3, dilation=3), torch.randn(1, 1, 6))
    with pytest.raises(QuantError, match="NaN or Inf"):
        HessianAccumulator(nn.Linear(2, 2)).add(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(QuantError, match="no input was added"):
        HessianAccumulator(nn.Linear(2, 2)).hessian
    with pytest.raises(QuantError, match=r"shape \(4, 4\)"):
        gptq_codes(w, torch.eye(3), params)
    with pytest.raises(QuantError, match="3 output channels"):
        gptq_codes(w, h, choose_qparams(torch.randn(2, 4), QuantSpec(bits=2)))
    with pytest.raises(QuantError, match="NaN or Inf"):
        gptq_codes(torch.full((3, 4), float("nan")), h, params)
    with pytest.raises(QuantError, match="Hessian holds NaN"):
        gptq_codes(w, torch.full((4, 4), float("nan")), params)
    with pytest.raises(QuantError, match="not positive definite even after damping"):
        gptq_codes(w, -h, params)
    with pytest.raises(QuantError, match="do not split into groups=2"):
        gptq_layer_codes(torch.randn(3, 2, 3, 3), torch.zeros(2, 18, 18), choose_qparams(torch.randn(3, 2), QuantSpec()), 2)
    with pytest.raises(QuantError, match=r"shape \(1, 4, 4\)"):
        gptq_layer_codes(w, h, params, 1)
    with pytest.raises(ValueError, match="groups=0"):
        gptq_layer_codes(w, h[None], params, 0)
    with pytest.raises(TypeError, match="GPTQOptions"):
        gptq_codes(w, h, params, {"damp": 0.1})
