"""quant.export_onnx: integer weights in QDQ form, decoded bit for bit; ONNX Runtime agrees with torch."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

import quant
from hiercluster.evaluation.heads import REDUCTIONS, GroupedHead
from hiercluster.models.zoo import build_model, load_checkpoint
from quant.layerops import weight_slots
from quant.onnx_export import (
    export_onnx,
    load_packed_with_codes,
    max_abs_diff,
    supported_types,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "data" / "checkpoints" / "fashion_mnist_resnet20.pt"
# Whether the installed onnx and ONNX Runtime read 2-bit integers (DequantizeLinear-25).
INT2 = "uint2" in supported_types("DequantizeLinear", 25)
TWO_BIT_OPSET = 25 if INT2 else 21


@pytest.fixture(scope="module")
def digits_net() -> nn.Module:
    """A digits-size ResNet-8 (1 channel, 8x8 inputs, 10 classes), untrained but with BN statistics to fold."""
    torch.manual_seed(0)
    net = build_model("resnet8", 10, 1, width=8)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _session(path: Path | str | bytes) -> ort.InferenceSession:
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), providers=["CPUExecutionProvider"])


# --- DequantizeLinear semantics, written out in numpy (the ONNX operator's definition) ----------------


def _dequantize_linear(node: onnx.NodeProto, inits: dict[str, np.ndarray]) -> np.ndarray:
    """``(x - zero_point) * scale``: the difference in integers, then one float32 product, per ``axis``."""
    x = inits[node.input[0]].astype(np.int64)
    scale = inits[node.input[1]].astype(np.float32)
    zero = inits[node.input[2]].astype(np.int64) if len(node.input) > 2 else np.zeros_like(scale, dtype=np.int64)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    shape = [1] * x.ndim
    if scale.ndim:
        shape[axis] = -1
    return (x - zero.reshape(shape)).astype(np.float32) * scale.reshape(shape)


def _decoded(model: onnx.ModelProto, tensor: str) -> np.ndarray:
    """The value of ``tensor`` computed from the initializers through DequantizeLinear and Add nodes."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}

    def value(name: str) -> np.ndarray:
        if name in inits:
            return inits[name]
        node = producers[name]
        if node.op_type == "DequantizeLinear":
            return _dequantize_linear(node, inits)
        assert node.op_type == "Add", node.op_type
        return (value(node.input[0]) + value(node.input[1])).astype(np.float32)

    return value(tensor)


def _weights(qmodel: nn.Module) -> dict[str, tuple[str, np.ndarray]]:
    """Layer name -> (graph tensor name, the PyTorch weight)."""
    return {s.name: (f"model.{s.state_key}", s.weight.detach().numpy()) for s in weight_slots(qmodel)}


CASES = {
    # name: (spec, plan, the ONNX type of every quantized weight, form, opset)
    "asymmetric-4": (quant.QuantSpec(bits=4), None, "uint4", "codes", 21),
    "asymmetric-2": (quant.QuantSpec(bits=2), None, "uint2" if INT2 else "uint4", "codes", TWO_BIT_OPSET),
    "symmetric-3": (quant.QuantSpec(scheme="symmetric", bits=3), None, "int4", "codes", 21),
    "symmetric-2-per-tensor": (
        quant.QuantSpec(scheme="symmetric", bits=2, granularity="per_tensor"), None, "int2" if INT2 else "int4", "codes",
        TWO_BIT_OPSET,
    ),
    "binary": (
        quant.QuantSpec(bits=4), quant.QuantPlan(layer_bits=(("*", 1),)), "int2" if INT2 else "int4", "binary_pm1",
        TWO_BIT_OPSET,
    ),
    "pow2-3": (quant.QuantSpec(scheme="pow2", bits=3), None, "int4", "pow2_multiples", 21),
    "pow2-4": (quant.QuantSpec(scheme="pow2", bits=4), None, "int8", "pow2_multiples", 21),
    "pow2-6": (quant.QuantSpec(scheme="pow2", bits=6), None, "float", "float", 21),
    "asymmetric-16": (quant.QuantSpec(bits=16), None, "uint16", "codes", 21),
}


@pytest.mark.parametrize("case", list(CASES))
def test_integer_initializers_decode_to_exactly_the_torch_weights(case, digits_net, inputs, tmp_path):
    spec, plan, onnx_type, form, opset = CASES[case]
    qmodel, report = quant.quantize_model(digits_net, spec, plan)
    info = export_onnx(qmodel, report, tmp_path / "m.onnx", inputs[:2])
    assert info["opset"] == opset
    assert {(layer["onnx_type"], layer["form"]) for layer in info["layers"]} == {(onnx_type, form)}
    model = onnx.load(tmp_path / "m.onnx")
    inits = {t.name: t for t in model.graph.initializer}
    for layer, (tensor, weight) in _weights(qmodel).items():
        if onnx_type == "float":
            assert inits[tensor].data_type == onnx.TensorProto.FLOAT
            continue
        assert tensor not in inits  # the float weight is gone; DequantizeLinear computes it
        stored = inits[f"{tensor}_quantized"]
        assert stored.data_type == getattr(onnx.TensorProto, onnx_type.upper())
        decoded = _decoded(model, tensor)
        assert decoded.dtype == np.float32 and decoded.shape == weight.shape
        assert np.array_equal(decoded.view(np.uint32), weight.view(np.uint32)), layer  # bit for bit
    if onnx_type == "float":
        assert all("int16" in layer["reason"] for layer in info["layers"])


def test_binary_weights_are_stored_as_minus_and_plus_one(digits_net, inputs, tmp_path):
    qmodel, report = quant.quantize_model(digits_net, quant.QuantSpec(bits=4), quant.QuantPlan(layer_bits=(("*", 1),)))
    export_onnx(qmodel, report, tmp_path / "m.onnx", inputs[:2])
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "m.onnx").graph.initializer}
    for layer, (tensor, weight) in _weights(qmodel).items():
        codes, params = report.codes[layer][0]
        stored = inits[f"{tensor}_quantized"].astype(np.int64)
        assert np.array_equal(stored, 2 * codes.numpy().astype(np.int64) - 1)  # code 0 -> -1 (-a), code 1 -> +1 (+a)
        assert np.array_equal(inits[f"{tensor}_scale"], params.scale.numpy())
        assert not inits[f"{tensor}_zero_point"].astype(np.int64).any()


def test_pow2_levels_are_multiples_of_the_smallest(tmp_path):
    # 3-bit pow2: L = 3, levels {0, +-a/4, +-a/2, +-a}; stored as {0, +-1, +-2, +-4} times a/4.
    net = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, -0.5, 0.26, 0.0]]))
    qnet, report = quant.quantize_model(net, quant.QuantSpec(scheme="pow2", bits=3))
    export_onnx(qnet, report, tmp_path / "m.onnx", torch.randn(1, 4))
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "m.onnx").graph.initializer}
    assert inits["model.weight_quantized"].astype(np.int64).tolist() == [[4, -2, 1, 0]]
    assert inits["model.weight_scale"].tolist() == [0.25]


def test_dequantized_weights_in_onnx_runtime_are_bit_identical(digits_net, inputs, tmp_path):
    """ONNX Runtime's own DequantizeLinear, read back as graph outputs, on a mixed model (1, 2, 4, 8 bits, residual)."""
    plan = quant.QuantPlan(first_layer_bits=8, layer_bits=(("layer1*", 1), ("layer2*", 2)), residual_fraction=0.3)
    qmodel, report = quant.quantize_model(digits_net, quant.QuantSpec(bits=4), plan)
    info = export_onnx(qmodel, report, tmp_path / "m.onnx", inputs[:2])
    assert any(layer["terms"] == 2 for layer in info["layers"])
    assert {layer["form"] for layer in info["layers"]} == {"codes", "binary_pm1"}
    model = onnx.load(tmp_path / "m.onnx")
    weights = _weights(qmodel)
    for tensor, _ in weights.values():
        model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    got = _session(model.SerializeToString()).run([t for t, _ in weights.values()], {"input": inputs[:2].numpy()})
    for (layer, (_, weight)), value in zip(weights.items(), got):
        assert np.array_equal(value.view(np.uint32), weight.view(np.uint32)), layer


def test_runtime_matches_torch_on_another_batch_size(digits_net, inputs, tmp_path):
    qmodel, report = quant.quantize_model(digits_net, quant.QuantSpec(bits=4))
    info = export_onnx(qmodel, report, tmp_path / "m.onnx", inputs[:2])
    assert info["max_abs_diff"] < 1e-4 and info["argmax_agreement"] == 1.0  # on the example
    got = _session(tmp_path / "m.onnx").run(["logits"], {"input": inputs.numpy()})[0]
    with torch.no_grad():
        ref = qmodel(inputs).numpy()
    assert got.shape == ref.shape == (48, 10)
    assert np.abs(got - ref).max() < 1e-4
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_activation_quantizers_become_quantize_dequantize_pairs(digits_net, inputs, tmp_path):
    calibration = [torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(2))]
    qmodel, report = quant.quantize_model(
        digits_net, quant.QuantSpec(bits=4), act_spec=quant.QuantSpec(bits=4, granularity="per_tensor"),
        calibration=calibration,
    )
    info = export_onnx(qmodel, report, tmp_path / "m.onnx", inputs[:2])
    model = onnx.load(tmp_path / "m.onnx")
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize) == len(report.activations) == len(info["activations"]) > 0
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    consumers = {i: n for n in model.graph.node for i in n.input}
    weights = _weights(qmodel)
    for node in quantize:
        layer = node.name.removesuffix("_input0_QuantizeLinear")
        params = report.activations[layer]
        assert inits[node.input[1]] == np.float32(float(params.scale)) and inits[node.input[2]] == int(params.zero_point)
        assert inits[node.input[2]].dtype == np.uint8
        dq = consumers[node.output[0]]
        clip = consumers[dq.output[0]]  # a 4-bit grid inside uint8: clipped to its ends after decoding
        assert (dq.op_type, clip.op_type) == ("DequantizeLinear", "Clip")
        assert inits[clip.input[2]] == np.float32((params.qmax - int(params.zero_point)) * float(params.scale))
        layer_node = consumers[clip.output[0]]  # the layer itself reads the quantized input
        assert layer_node.op_type in ("Conv", "Gemm") and layer_node.input[1] == weights[layer][0]
    got = _session(tmp_path / "m.onnx").run(["logits"], {"input": inputs.numpy()})[0]
    with torch.no_grad():
        ref = qmodel(inputs).numpy()
    assert np.abs(got - ref).max() < 1e-4 and (got.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_merged_head_outputs_superclass_scores_and_fine_logits(reduction, digits_net, inputs, tmp_path):
    qmodel, report = quant.quantize_model(digits_net, quant.QuantSpec(bits=4))
    head = GroupedHead([[0, 6, 8, 9], [1, 4, 7], [2, 3, 5]], reduction)
    info = export_onnx(qmodel, report, tmp_path / "m.onnx", inputs[:2], head=head, fine_logits=True)
    assert info["outputs"] == ["scores", "logits"]
    scores, logits = _session(tmp_path / "m.onnx").run(["scores", "logits"], {"input": inputs.numpy()})
    with torch.no_grad():
        fine = qmodel(inputs)
        merged = head(fine).numpy()
    assert scores.shape == (48, 3) and logits.shape == (48, 10)
    assert max_abs_diff(scores, merged) < 1e-4 and np.abs(logits - fine.numpy()).max() < 1e-4
    assert (scores.argmax(1) == merged.argmax(1)).all()


def test_prob_sum_minus_inf_scores_line_up(tmp_path):
    """A group whose probability underflows scores -inf in torch; ONNX Runtime gives -inf at the same place."""
    net = nn.Sequential(nn.Linear(2, 3))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[100.0, 0.0], [0.0, 0.0], [-100.0, 0.0]]))
        net[0].bias.zero_()
    qnet, report = quant.quantize_model(net, quant.QuantSpec(bits=8))
    head = GroupedHead([[0, 1], [2]], "prob_sum")
    x = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0]])
    export_onnx(qnet, report, tmp_path / "m.onnx", x, head=head)
    got = _session(tmp_path / "m.onnx").run(["scores"], {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = head(qnet(x)).numpy()
    assert np.isneginf(ref[0, 1]) and np.array_equal(np.isneginf(got), np.isneginf(ref))
    assert max_abs_diff(got, ref) < 1e-5


def test_metadata_round_trip(digits_net, inputs, tmp_path):
    qmodel, report = quant.quantize_model(digits_net, quant.QuantSpec(bits=3))
    metadata = {"superclasses": ["round", "straight", "curly"], "avg_bits": 3.0, "note": "plain text", "accuracy": {"fine": 0.5}}
    info = export_onnx(qmodel, report, tmp_path / "m.onnx", inputs[:2], metadata=metadata)
    props = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    assert props == _session(tmp_path / "m.onnx").get_modelmeta().custom_metadata_map
    assert props["note"] == "plain text"
    assert json.loads(props["superclasses"]) == ["round", "straight", "curly"]
    assert json.loads(props["avg_bits"]) == 3.0 and json.loads(props["accuracy"]) == {"fine": 0.5}
    assert quant.QuantSpec.from_dict(json.loads(props["quant.spec"])) == report.spec
    assert float(props["quant.avg_bits"]) == report.avg_bits
    assert json.loads(props["quant.weights"]) == {layer["name"]: layer["onnx_type"] for layer in info["layers"]}


def test_codes_read_from_a_packed_file_export_the_same_weights(digits_net, inputs, tmp_path):
    calibration = [torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))]
    qmodel, report = quant.quantize_model(
        digits_net, quant.QuantSpec(bits=2), act_spec=quant.QuantSpec(bits=8, granularity="per_tensor"),
        calibration=calibration,
    )
    path = quant.save_packed(tmp_path / "m.hcq", qmodel, report)
    loaded, packed_report = load_packed_with_codes(path, digits_net)
    assert set(packed_report.codes) == set(report.codes)
    for layer, parts in report.codes.items():
        ((codes, params),), ((got_codes, got_params),) = parts, packed_report.codes[layer]
        assert torch.equal(got_codes, codes) and torch.equal(got_params.scale, params.scale)
        assert torch.equal(got_params.zero_point, params.zero_point)
    assert {name: float(p.scale) for name, p in packed_report.activations.items()} == {
        name: float(p.scale) for name, p in report.activations.items()
    }
    export_onnx(loaded, packed_report, tmp_path / "m.onnx", inputs[:2])
    model = onnx.load(tmp_path / "m.onnx")
    for layer, (tensor, weight) in _weights(qmodel).items():
        assert np.array_equal(_decoded(model, tensor).view(np.uint32), weight.view(np.uint32)), layer


def test_a_model_changed_after_quantization_is_refused(digits_net, inputs, tmp_path):
    qmodel, report = quant.quantize_model(digits_net, quant.QuantSpec(bits=4))
    with torch.no_grad():
        qmodel.fc.weight.add_(1e-3)
    with pytest.raises(quant.QuantError, match="'fc'.*not the one the report's codes encode"):
        export_onnx(qmodel, report, tmp_path / "m.onnx", inputs[:2])
    assert not (tmp_path / "m.onnx").exists()


class _Spectrum(nn.Module):
    """An operator the ONNX exporter has no translation for (aten::fft_rfft)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(x, dim=-1).abs()


def test_an_untraceable_layer_is_named(tmp_path, capfd):
    net = nn.Sequential(
        OrderedDict(conv=nn.Conv2d(1, 2, 3), spectrum=_Spectrum(), flat=nn.Flatten(), fc=nn.Linear(2 * 6 * 4, 3))
    ).eval()
    qnet, report = quant.quantize_model(net, quant.QuantSpec(bits=4))
    with pytest.raises(quant.QuantError, match=r"cannot trace layer 'spectrum' \(_Spectrum\): .*fft_rfft"):
        export_onnx(qnet, report, tmp_path / "m.onnx", torch.randn(2, 1, 8, 8))
    assert capfd.readouterr().out == ""  # no dump of the TorchScript graph


def test_max_abs_diff_counts_mismatched_infinities():
    assert max_abs_diff(np.array([0.0, -np.inf]), np.array([0.25, -np.inf])) == 0.25
    assert max_abs_diff(np.array([0.0, -np.inf]), np.array([0.0, -1e30])) == np.inf


@pytest.fixture(scope="module")
def shipped():
    """The shipped Fashion-MNIST ResNet-20 and 300 test images spread over the split."""
    from hiercluster.data.datasets import load_dataset

    model, _ = load_checkpoint(SHIPPED)
    test_set = load_dataset("fashion_mnist", split="test")
    return model.eval(), torch.stack([test_set[i][0] for i in range(0, 9_000, 30)])


@pytest.mark.parametrize("bits", [4, 2])
def test_shipped_model_runs_in_onnx_runtime(bits, shipped, tmp_path):
    model, x = shipped
    qmodel, report = quant.quantize_model(model, quant.QuantSpec(scheme="asymmetric", bits=bits))
    info = export_onnx(qmodel, report, tmp_path / "m.onnx", x[:2])
    assert info["file_bytes"] < report.fp32_bytes / 4  # integers, not float weights
    got = _session(tmp_path / "m.onnx").run(["logits"], {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = qmodel(x).numpy()
    assert np.abs(got - ref).max() < 1e-4
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.999
