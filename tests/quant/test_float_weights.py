"""Weights no quantizer handles (ConvTranspose, Bilinear, embeddings) stay float, are counted and named."""

import warnings

import pytest
import torch
import torch.nn as nn

import quant
from quant import QuantPlan, QuantSpec, quantize_model
from quant.layerops import unquantized_weights

SPEC = QuantSpec(bits=4)


class Decoder(nn.Module):
    """A Linear, a ConvTranspose2d, a Bilinear and a Conv2d: two of the four weights have no quantizer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 2 * 3 * 3)  # 108 weights
        self.up = nn.ConvTranspose2d(2, 3, 2, stride=2)  # 2*3*2*2 = 24 weights
        self.conv = nn.Conv2d(3, 4, 3)  # 4*3*3*3 = 108 weights
        self.bil = nn.Bilinear(16, 5, 2)  # 2*16*5 = 160 weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.up(self.fc(x).reshape(-1, 2, 3, 3)))  # (B, 4, 4, 4)
        return self.bil(y.mean(1).flatten(1), x[:, :5])


def quantize_recording(model: nn.Module, plan: QuantPlan | None = None) -> tuple[nn.Module, quant.QuantReport, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel, report = quantize_model(model, SPEC, plan)
    return qmodel, report, [str(w.message) for w in caught]


def test_avg_bits_counts_the_float_weights_at_32_bits():
    model = Decoder().eval()
    _, report, _ = quantize_recording(model)
    # Hand count: fc 108 and conv 108 at 4 bits; up 24 and bil 160 at 32 bits.
    assert report.avg_bits == pytest.approx((4 * (108 + 108) + 32 * (24 + 160)) / (108 + 108 + 24 + 160))
    assert report.unquantized == ("up.weight", "bil.weight")
    rows = {row.name: row for row in report.layers}
    assert [name for name in rows] == ["fc", "conv", "up.weight", "bil.weight"]
    for name in report.unquantized:
        assert rows[name].bits == 32 and rows[name].scheme == "float" and rows[name].mse == 0
    assert report.to_dict()["unquantized"] == ["up.weight", "bil.weight"]
    # Every parameter of two or more dimensions has a row: none is left out of the average.
    matrices = {name: p.numel() for name, p in model.named_parameters() if p.dim() >= 2}
    assert sum(row.numel for row in report.layers) == sum(matrices.values())


def test_float_weights_are_untouched_and_stored_raw(tmp_path):
    model = Decoder().eval()
    qmodel, report, _ = quantize_recording(model)
    assert torch.equal(qmodel.up.weight, model.up.weight) and torch.equal(qmodel.bil.weight, model.bil.weight)
    assert not torch.equal(qmodel.fc.weight, model.fc.weight)
    header = quant.read_packed_header(quant.save_packed(tmp_path / "d.hcq", qmodel, report))
    kinds = {entry["name"]: entry["kind"] for entry in header["entries"]}
    assert kinds["up.weight"] == kinds["bil.weight"] == "raw" and kinds["fc.weight"] == "quantized"
    sizes = quant.model_size(qmodel, report)
    assert sizes["codes_bytes"] == (108 * 4 + 7) // 8 * 2  # only fc and conv are bit-packed


def test_one_warning_names_them_with_their_count():
    _, _, messages = quantize_recording(Decoder().eval())
    named = [m for m in messages if "stay float32" in m]
    assert len(named) == 1
    assert "2 weight(s) of 184 elements" in named[0]
    assert "'up.weight' (ConvTranspose2d)" in named[0] and "'bil.weight' (Bilinear)" in named[0]


def test_a_long_list_is_cut_short():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), *[nn.ConvTranspose1d(4, 4, 1) for _ in range(7)])
    _, report, messages = quantize_recording(model)
    (message,) = [m for m in messages if "stay float32" in m]
    assert message.startswith("7 weight(s) of 112 elements")
    assert "'5.weight' (ConvTranspose1d)" in message and "'6.weight'" not in message
    assert message.endswith("and 2 more")
    assert len(report.unquantized) == 7
    assert report.avg_bits == pytest.approx((4 * 16 + 32 * 112) / 128)


def test_models_without_such_weights_do_not_warn():
    torch.manual_seed(0)
    _, report, messages = quantize_recording(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3)))
    assert report.unquantized == () and not any("stay float32" in m for m in messages)
    assert report.avg_bits == 4.0


def test_tied_weight_is_quantized_once_and_not_listed():
    torch.manual_seed(0)
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # a language model's tied input and output embedding
    model = nn.Sequential(emb, nn.Linear(4, 4), head)
    assert unquantized_weights(model) == []  # named_parameters lists it once, as 0.weight; the head's slot holds it
    _, report, messages = quantize_recording(model)
    assert report.unquantized == () and report.avg_bits == 4.0
    assert not any("stay float32" in m for m in messages)


def test_embedding_and_tokens_are_listed():
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.pos = nn.Parameter(torch.zeros(1, 3, 4))
            self.scale = nn.Parameter(torch.ones(4))  # one dimension: a per-channel factor, not a weight matrix
            self.emb = nn.Embedding(5, 4)
            self.fc = nn.Linear(4, 2)

    found = [(name, kind) for name, _, kind in unquantized_weights(Tokens())]
    assert found == [("cls_token", "Tokens"), ("pos", "Tokens"), ("emb.weight", "Embedding")]
