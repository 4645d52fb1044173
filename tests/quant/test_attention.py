"""Attention projections: every weight a matmul uses is quantized, counted and packed."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import quant
from quant import QuantPlan, QuantSpec, fake_quantize, quantize_model
from quant.functional import dequantize_sum
from quant.layerops import weight_slots

SPEC = QuantSpec(bits=4)


def encoder(seed: int = 0) -> nn.Module:
    """A Linear stem, one Transformer encoder layer (packed in_proj_weight) and a Linear head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16),
        nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.0, batch_first=True),
        nn.Linear(16, 3),
    ).eval()


class CrossAttention(nn.Module):
    """Key and value of other sizes than the query: separate q/k/v_proj_weight parameters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.attn = nn.MultiheadAttention(8, 2, kdim=5, vdim=7, batch_first=True)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        kv = q[..., :5]
        return self.attn(q, kv, torch.cat([kv, q[..., :2]], dim=-1), need_weights=False)[0]


def matmul_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter with two or more dimensions (in these models, exactly the matmul weights)."""
    return {name: p for name, p in model.named_parameters() if p.dim() >= 2}


def fake_quant_reference(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """The float architecture with each matmul weight replaced by its fake-quantized value."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in matmul_weights(ref).values():
            p.copy_(fake_quantize(p, spec))
    return ref


@pytest.mark.parametrize("make, names", [
    (encoder, {"0.weight", "1.self_attn.in_proj_weight", "1.self_attn.out_proj.weight", "1.linear1.weight",
               "1.linear2.weight", "2.weight"}),
    (CrossAttention, {"attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.out_proj.weight"}),
])
def test_every_matmul_weight_is_on_its_grid(make, names):
    model = make()
    assert set(matmul_weights(model)) == names  # the models hold what the test means them to
    qmodel, report = quantize_model(model, SPEC)
    float_w, quant_w = matmul_weights(model), matmul_weights(qmodel)
    for name in names:
        assert torch.equal(quant_w[name], fake_quantize(float_w[name], SPEC)), name
        assert not torch.equal(quant_w[name], float_w[name]), name
    assert {slot.state_key for slot in weight_slots(qmodel)} == names
    # The codes the report keeps are the weights the model computes with.
    for slot in weight_slots(qmodel):
        assert torch.equal(dequantize_sum(report.codes[slot.name]), slot.weight)


def test_avg_bits_counts_every_matmul_weight():
    model = encoder()
    _, report = quantize_model(model, SPEC)
    total = sum(p.numel() for p in matmul_weights(model).values())
    assert sum(row.numel for row in report.layers) == total
    assert report.avg_bits == 4.0
    # Leaving the attention projection float costs 32 bits per element of it.
    _, partial = quantize_model(model, SPEC, QuantPlan(skip=("*.in_proj_weight",)))
    in_proj = model[1].self_attn.in_proj_weight.numel()
    assert in_proj == 3 * 16 * 16
    assert partial.avg_bits == pytest.approx((32 * in_proj + 4 * (total - in_proj)) / total)
    assert partial.layer("1.self_attn.in_proj_weight").scheme == "float"
    assert "1.self_attn.in_proj_weight" not in partial.codes


def test_plan_widths_apply_to_attention_weights():
    _, report = quantize_model(encoder(), SPEC, QuantPlan(layer_bits={"*.in_proj_weight": 6}, last_layer_bits=8))
    bits = {row.name: row.bits for row in report.layers}
    assert bits == {"0": 4, "1.self_attn.in_proj_weight": 6, "1.self_attn.out_proj": 4, "1.linear1": 4,
                    "1.linear2": 4, "2": 8}


@pytest.mark.parametrize("make, shape", [(encoder, (3, 5, 6)), (CrossAttention, (3, 4, 8))])
def test_outputs_match_the_fake_quantized_reference(make, shape):
    model = make()
    qmodel, _ = quantize_model(model, SPEC)
    reference = fake_quant_reference(model, SPEC)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, expected, float_out = qmodel(x), reference(x), model(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, float_out, atol=1e-4)  # quantization changed something


def test_packed_round_trip_and_sizes(tmp_path):
    model = encoder()
    qmodel, report = quantize_model(model, SPEC)
    path = quant.save_packed(tmp_path / "encoder.hcq", qmodel, report)
    header = quant.read_packed_header(path)
    kinds = {entry["name"]: entry["kind"] for entry in header["entries"]}
    assert kinds["1.self_attn.in_proj_weight"] == "quantized"
    loaded = quant.load_packed(path, model)
    state = qmodel.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(t, state[k]) for k, t in loaded.state_dict().items())
    sizes = quant.model_size(qmodel, report)
    assert sizes["codes_bytes"] == sum((p.numel() * 4 + 7) // 8 for p in matmul_weights(model).values())
    # Every other float tensor (biases, LayerNorms) is stored raw as float32.
    others = sum(t.numel() for k, t in state.items() if k not in {s.state_key for s in weight_slots(qmodel)})
    assert sizes["float_bytes"] == 4 * others


def test_report_must_still_encode_the_attention_weight(tmp_path):
    qmodel, report = quantize_model(encoder(), SPEC)
    with torch.no_grad():
        qmodel[1].self_attn.in_proj_weight[0, 0] += 1.0
    with pytest.raises(quant.QuantError, match=r"layer '1\.self_attn\.in_proj_weight'.* not the one"):
        quant.save_packed(tmp_path / "x.hcq", qmodel, report)


def test_calibrated_methods_round_attention_to_nearest_and_say_so():
    model = encoder()
    calibration = [torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel, report = quantize_model(model, SPEC, method="gptq", calibration=calibration)
    messages = [str(w.message) for w in caught]
    assert any("1.self_attn.in_proj_weight" in m and "rounded to nearest" in m for m in messages)
    methods = {row.name: row.method for row in report.layers}
    assert methods["1.self_attn.in_proj_weight"] == "rtn" and methods["1.linear1"] == "gptq"
    weight = qmodel[1].self_attn.in_proj_weight
    assert torch.equal(weight, fake_quantize(model[1].self_attn.in_proj_weight, SPEC))
