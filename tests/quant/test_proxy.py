"""The sensitivity proxy: closed forms by hand, its data (calibration only), names and errors."""

import inspect
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from quant import QuantError, QuantSpec, fake_quantize, quantize_model
from quant.allocation import allocate_bits, allocation_plan, average_bits
from quant.fold import fold_batchnorm
from quant.proxy import layer_costs
from quant.spec import spec_for_width

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = QuantSpec(bits=4)  # asymmetric, min-max, per channel

# Two output rows whose round-to-nearest errors are easy by hand (see test_linear_closed_form_by_hand).
W = torch.tensor([[0.4, 1.4, 3.0], [-1.0, 0.6, 2.0]])
X = torch.tensor([[1.0, 1.0, 0.0], [2.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 2.0, 0.0]])


def linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.fill_(0.3)  # a bias moves the output, not the error
    return layer


def conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, 3, stride=2, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 5),
    ).eval()


def randomize_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return model


def batches(seed: int, count: int = 2, size: int = 8, shape=(2, 8, 8)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, *shape, generator=gen) for _ in range(count)]


def output_error(layer: nn.Module, weight: torch.Tensor, inputs: list[torch.Tensor], spec: QuantSpec) -> float:
    """||f(x, Q(W) - W)||^2 / rows from the layer's own functional call (rows = samples x output positions)."""
    delta = fake_quantize(weight, spec) - weight
    total, rows = 0.0, 0
    for x in inputs:
        if isinstance(layer, nn.Linear):
            y = F.linear(x.double(), delta.double())
            rows += y.numel() // y.shape[-1]
        else:
            y = F.conv2d(x.double(), delta.double(), None, layer.stride, layer.padding, layer.dilation, layer.groups)
            rows += y.numel() // y.shape[1]
        total += float(y.pow(2).sum())
    return total / rows


# ---------------------------------------------------------------- closed forms


def test_linear_closed_form_by_hand():
    # A = X^T X / 4 = [[1.5, .75, .5], [.75, 1.5, .25], [.5, .25, .5]].
    # 2 bits, min-max per row: row 0 has levels {0, 1, 2, 3}, so dW_0 = [-.4, -.4, 0]; row 1
    # has {-1, 0, 1, 2}, so dW_1 = [0, .4, 0]. Cost = .16 * (1.5 + 1.5 + 1.5) + .16 * 1.5 = .96.
    # 1 bit (binary, a = mean|w|): a = 1.6 and 1.2, dW_0 = [1.2, .2, -1.4], dW_1 = [-.2, .6, -.8]:
    # dW_0 A dW_0^T = 1.74 and dW_1 A dW_1^T = .66, total 2.40.
    sizes, costs = layer_costs(nn.Sequential(linear(W)), SPEC, [1, 2], [X])
    assert sizes == {"0": 6}
    assert costs["0"][2] == pytest.approx(0.96, rel=1e-6)
    assert costs["0"][1] == pytest.approx(2.40, rel=1e-6)


def test_linear_cost_is_the_output_error_summed_over_batches():
    torch.manual_seed(1)
    layer = nn.Linear(7, 5)
    inputs = [torch.randn(6, 3, 7), torch.randn(4, 3, 7)]  # (batch, tokens, features): every token is a row
    _, costs = layer_costs(nn.Sequential(layer), SPEC, [2, 3, 8], inputs)
    for b in (2, 3, 8):
        assert costs["0"][b] == pytest.approx(output_error(layer, layer.weight.detach(), inputs, SPEC.replace(bits=b)), rel=1e-6)


def test_grouped_strided_conv_cost_is_the_output_error_per_position():
    net = conv_net()
    inputs = batches(2)
    sizes, costs = layer_costs(net, SPEC, [1, 2, 4], inputs)
    conv = net[3]
    with torch.no_grad():
        hidden = [net[:3](x) for x in inputs]  # what the second conv receives
    for b in (1, 2, 4):
        expected = output_error(conv, conv.weight.detach(), hidden, spec_for_width(SPEC, b))
        assert costs["3"][b] == pytest.approx(expected, rel=1e-6)
    assert sizes == {"0": 6 * 2 * 9, "3": 4 * 3 * 9, "6": 5 * 36}


def test_batchnorm_is_folded_first_and_the_model_is_left_alone():
    net = randomize_bn(conv_net(3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    inputs = batches(4)
    _, costs = layer_costs(net, SPEC, [2, 3], inputs)
    folded = fold_batchnorm(net)
    for b in (2, 3):
        assert costs["0"][b] == pytest.approx(output_error(folded[0], folded[0].weight.detach(), inputs, SPEC.replace(bits=b)), rel=1e-6)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_large_inputs_use_the_first_samples_of_every_batch():
    # 62 x 62 positions a sample: the documented floor of 128 samples (32 a batch over 4
    # batches) already gives more than 16384 rows, so A comes from x[:32] of each batch.
    conv = nn.Conv2d(1, 3, 3)
    inputs = batches(5, count=4, size=64, shape=(1, 64, 64))
    _, costs = layer_costs(nn.Sequential(conv), SPEC, [2], inputs)
    used = output_error(conv, conv.weight.detach(), [x[:32] for x in inputs], SPEC.replace(bits=2))
    assert costs["0"][2] == pytest.approx(used, rel=2e-5)  # A sums float32 products of 123,008 rows
    everything = output_error(conv, conv.weight.detach(), inputs, SPEC.replace(bits=2))
    assert costs["0"][2] != pytest.approx(everything, rel=1e-9)  # it really is a subset ...
    assert costs["0"][2] == pytest.approx(everything, rel=0.05)  # ... and a faithful one


def test_attention_projections_are_costed_on_their_own_inputs():
    torch.manual_seed(1)
    attn = nn.MultiheadAttention(8, 2, kdim=5, vdim=7, batch_first=True)

    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = attn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, key=x[..., :5], value=x[..., 1:], need_weights=False)[0]

    x = torch.randn(3, 4, 8)
    sizes, costs = layer_costs(Cross(), SPEC, [2], [x])
    assert list(sizes) == ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.out_proj"]
    spec = SPEC.replace(bits=2)
    rows = x.shape[0] * x.shape[1]

    def err(weight, inp):
        return float(F.linear(inp.double(), (fake_quantize(weight, spec) - weight).double()).pow(2).sum()) / rows

    assert costs["attn.q_proj_weight"][2] == pytest.approx(err(attn.q_proj_weight.detach(), x), rel=1e-6)
    assert costs["attn.k_proj_weight"][2] == pytest.approx(err(attn.k_proj_weight.detach(), x[..., :5]), rel=1e-6)
    assert costs["attn.v_proj_weight"][2] == pytest.approx(err(attn.v_proj_weight.detach(), x[..., 1:]), rel=1e-6)
    # out_proj's input (the heads' output) is internal: recover it from the module's output.
    w_o, b_o = attn.out_proj.weight.detach().double(), attn.out_proj.bias.detach().double()
    with torch.no_grad():
        y = Cross()(x).double()
    heads = torch.linalg.solve(w_o, (y - b_o).reshape(-1, 8).T).T
    assert costs["attn.out_proj"][2] == pytest.approx(err(attn.out_proj.weight.detach(), heads.float()), rel=1e-4)


def test_transformer_layers_all_get_costs():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(6, 16), nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.0, batch_first=True), nn.Linear(16, 3)
    ).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer is left unobserved
        sizes, costs = layer_costs(net, SPEC, [2, 8], [torch.randn(4, 5, 6)])
    assert list(sizes) == ["0", "1.self_attn.in_proj_weight", "1.self_attn.out_proj", "1.linear1", "1.linear2", "2"]
    assert all(table[2] > table[8] > 0 for table in costs.values())


def test_packed_in_projection_adds_query_key_and_value_parts():
    torch.manual_seed(2)
    attn = nn.MultiheadAttention(6, 2, batch_first=True)

    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = attn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, 2 * x, -x, need_weights=False)[0]

    x = torch.randn(2, 5, 6)
    _, costs = layer_costs(Cross(), SPEC, [3], [x])
    delta = (fake_quantize(attn.in_proj_weight.detach(), SPEC.replace(bits=3)) - attn.in_proj_weight.detach()).double()
    expected = sum(float(F.linear(inp.double(), d).pow(2).sum()) for inp, d in zip((x, 2 * x, -x), delta.chunk(3))) / 10
    assert costs["attn.in_proj_weight"][3] == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- behaviour


def test_cost_falls_as_width_grows():
    _, costs = layer_costs(randomize_bn(conv_net(5)), QuantSpec(bits=4, clipping="mse"), [1, 2, 3, 4, 8], batches(6))
    for name, table in costs.items():
        values = [table[b] for b in (1, 2, 3, 4, 8)]
        assert values == sorted(values, reverse=True), name
        assert values[-1] > 0


def test_only_the_calibration_batches_are_seen():
    # The proxy's only data argument is the calibration; every input the model receives is
    # one of those batches, each exactly once (one forward pass), and labels are dropped.
    names = list(inspect.signature(layer_costs).parameters)
    assert names == ["model", "spec", "widths", "calibration", "layers"]
    seen = []

    class Recorder(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if isinstance(x, torch.Tensor):  # BatchNorm folding traces the model with torch.fx proxies first
                seen.append(x.clone())
            return x

    net = nn.Sequential(Recorder(), conv_net(7))
    inputs = batches(8, count=3)
    labelled = [(x, torch.zeros(len(x), dtype=torch.long)) for x in inputs]
    _, with_labels = layer_costs(net, SPEC, [2, 4], labelled)
    assert len(seen) == 3 and all(torch.equal(a, b) for a, b in zip(seen, inputs))
    _, plain = layer_costs(net, SPEC, [2, 4], inputs)
    assert plain == with_labels


def test_names_and_average_bits_match_quantize_model():
    net = randomize_bn(conv_net(9))
    inputs = batches(10)
    sizes, costs = layer_costs(net, SPEC, [1, 2, 4, 8], inputs)
    widths = allocate_bits(sizes, costs, 2.5)
    _, report = quantize_model(net, SPEC, allocation_plan(widths, name="mixed-2.5b"))
    assert [row.name for row in report.layers] == list(sizes)
    assert {row.name: row.bits for row in report.layers} == widths
    assert {row.name: row.numel for row in report.layers} == sizes
    assert report.avg_bits == pytest.approx(average_bits(sizes, widths), abs=1e-12)
    assert report.avg_bits <= 2.5


def test_layers_selects_weights_in_model_order():
    sizes, costs = layer_costs(conv_net(), SPEC, [2], batches(1), layers=["6", "0"])
    assert list(sizes) == ["0", "6"] and list(costs) == ["0", "6"]


def test_a_layer_the_data_never_reaches_costs_nothing_with_a_warning():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.spare = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    with pytest.warns(UserWarning, match=r"\['spare'\] are not called on the calibration data"):
        _, costs = layer_costs(Unused(), SPEC, [2, 4], [torch.randn(4, 3)])
    assert costs["spare"] == {2: 0.0, 4: 0.0}
    assert costs["used"][2] > 0


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("spec", "widths", "message"),
    [
        (SPEC, [], r"widths=\[\] is invalid"),
        (SPEC, "248", r"widths='248' is invalid"),
        (SPEC, [2, 17], r"widths: 17 is not a width scheme 'asymmetric' can represent; allowed: 1 \(binary\) or 2\.\.16"),
        (SPEC, [0], r"widths: 0 is not a width"),
        (SPEC, [True], r"widths: True is not a width"),
        (SPEC, [2.0], r"widths: 2.0 is not a width"),
        (QuantSpec(scheme="pow2", bits=4), [4, 9], r"widths: 9 is not a width scheme 'pow2' can represent; allowed: 1 \(binary\) or 2\.\.8"),
        (QuantSpec(scheme="binary", bits=1), [1, 2], r"widths: 2 is not a width scheme 'binary' can represent; allowed: 1 \(binary\) only"),
    ],
)
def test_bad_widths_are_named(spec, widths, message):
    with pytest.raises(ValueError, match=message):
        layer_costs(conv_net(), spec, widths, batches(0))


def test_bad_layers_and_data_are_named():
    with pytest.raises(ValueError, match=r"layers: 'conv9' is not a quantizable weight of Sequential; known: '0', '3', '6'"):
        layer_costs(conv_net(), SPEC, [2], batches(0), layers=["conv9"])
    with pytest.raises(QuantError, match=r"calibration is empty"):
        layer_costs(conv_net(), SPEC, [2], [])
    bad = batches(0)
    bad[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(QuantError, match=r"NaN or Inf"):
        layer_costs(conv_net(), SPEC, [2], bad)
    with pytest.raises(QuantError, match=r"no Conv1d/2d/3d or Linear layer"):
        layer_costs(nn.Sequential(nn.ReLU()), SPEC, [2], [torch.randn(2, 3)])
    with pytest.raises(TypeError, match=r"spec must be a QuantSpec"):
        layer_costs(conv_net(), {"bits": 4}, [2], batches(0))
