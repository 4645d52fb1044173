"""Packed files and true sizes: exact round trip for every bit width, clear errors for bad files."""

import gzip
import json
import lzma
import struct

import pytest
import torch

from quant import QuantError, QuantPlan, QuantSpec, load_packed, model_size, quantize_model, save_packed
from quant_testing import SmallNet, randomize_batchnorm

PREFIX = struct.Struct("<8sIQQ")


def assert_round_trip(tmp_path, model, spec, plan=None, **kwargs):
    qnet, report = quantize_model(model, spec, plan, **kwargs)
    path = save_packed(tmp_path / f"{spec.tag}.qpk", qnet, report)
    restored = load_packed(path, model)
    mine, theirs = qnet.state_dict(), restored.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:  # bit for bit, not just close
        assert mine[key].dtype == theirs[key].dtype
        assert torch.equal(mine[key].view(torch.uint8) if mine[key].is_floating_point() else mine[key],
                           theirs[key].view(torch.uint8) if theirs[key].is_floating_point() else theirs[key]), key
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(restored(x), qnet(x))
    return qnet, report, path


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric", "pow2"])
def test_round_trip_every_bit_width(tmp_path, small_net, bits, scheme):
    assert_round_trip(tmp_path, small_net, QuantSpec(scheme=scheme, bits=bits, clipping="mse"))


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(bits=12), QuantSpec(bits=16), QuantSpec(scheme="symmetric", bits=16, narrow_range=False),
     QuantSpec(bits=3, granularity="per_tensor"), QuantSpec(scheme="pow2", bits=4, pow2_scale=True, granularity="per_tensor")],
    ids=lambda s: s.tag,
)
def test_round_trip_wide_and_per_tensor(tmp_path, small_net, spec):
    assert_round_trip(tmp_path, small_net, spec)


def test_round_trip_with_plan_residual_and_activations(tmp_path, small_net):
    plan = QuantPlan(first_layer_bits=8, skip=("fc",), residual_fraction=0.5)
    calibration = [torch.randn(4, 1, 8, 8) for _ in range(3)]
    qnet, report, path = assert_round_trip(
        tmp_path, small_net, QuantSpec(bits=3), plan, act_spec=QuantSpec(bits=5, granularity="per_tensor"), calibration=calibration
    )
    restored = load_packed(path, small_net)
    hooks = {name for name, m in restored.named_modules() if m._forward_pre_hooks}
    assert hooks == set(report.activations) == {"conv2"}  # fc is float, conv1 reads the image


def test_project_resnet_round_trip(tmp_path):
    models = pytest.importorskip("hiercluster.models")
    model = randomize_batchnorm(models.CifarResNet(8, num_classes=10, in_channels=1, width=8)).eval()
    qnet, report = quantize_model(model, QuantSpec(bits=4))
    restored = load_packed(save_packed(tmp_path / "r.qpk", qnet, report), model)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(restored(x), qnet(x))


def payload_of(path):
    data = path.read_bytes()
    magic, version, head, body = PREFIX.unpack_from(data)
    assert magic == b"QUANTPAK" and version == 1
    header = json.loads(data[PREFIX.size : PREFIX.size + head])
    return header, data[PREFIX.size + head : PREFIX.size + head + body]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_sizes_are_true_sizes(tmp_path, small_net, bits):
    qnet, report = quantize_model(small_net, QuantSpec(bits=bits), QuantPlan(residual_fraction=0.34))
    sizes = model_size(qnet, report)
    path = save_packed(tmp_path / "m.qpk", qnet, report)
    header, payload = payload_of(path)
    assert sizes["file_bytes"] == path.stat().st_size
    assert sizes["packed_bytes"] == len(payload) == sizes["codes_bytes"] + sizes["qparams_bytes"] + sizes["float_bytes"]
    assert sizes["gzip_bytes"] == len(gzip.compress(payload, compresslevel=9, mtime=0))
    assert sizes["xz_bytes"] == len(lzma.compress(payload, format=lzma.FORMAT_XZ, preset=6))
    floats = sum(t.numel() for t in small_net.state_dict().values() if t.is_floating_point())
    assert sizes["fp32_bytes"] == 4 * floats
    # Codes take b bits each (residual layers twice), scale float32 + uint8 zero point per channel.
    codes = sum(len(report.codes[r.name]) * ((r.numel * bits + 7) // 8) for r in report.layers)
    qparams = sum(len(report.codes[r.name]) * r.shape[0] * 5 for r in report.layers)
    biases = 4 * sum(qnet.get_submodule(r.name).bias.numel() for r in report.layers)
    assert (sizes["codes_bytes"], sizes["qparams_bytes"], sizes["float_bytes"]) == (codes, qparams, biases)
    assert header["biases"] == "float32"


def test_symmetric_schemes_store_no_zero_point(small_net):
    qnet, report = quantize_model(small_net, QuantSpec(scheme="symmetric", bits=4))
    channels = sum(r.shape[0] for r in report.layers)
    assert model_size(qnet, report)["qparams_bytes"] == 4 * channels


def test_packed_is_much_smaller_than_fp32():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    qnet, report = quantize_model(model, QuantSpec(bits=4))
    sizes = model_size(qnet, report)
    assert sizes["packed_bytes"] < sizes["fp32_bytes"] / 6  # 32 -> 4 bits, plus scales and biases
    assert 0 < sizes["gzip_bytes"] < sizes["packed_bytes"] * 1.1 and 0 < sizes["xz_bytes"] < sizes["packed_bytes"] * 1.1


def test_model_size_is_deterministic(small_net):
    qnet, report = quantize_model(small_net, QuantSpec(bits=4))
    assert model_size(qnet, report) == model_size(qnet, report)


# ---------------------------------------------------------------- bad files and misuse


@pytest.fixture
def saved(tmp_path, small_net):
    qnet, report = quantize_model(small_net, QuantSpec(bits=4))
    return save_packed(tmp_path / "net.qpk", qnet, report), qnet, report


def test_other_architecture_is_refused(saved):
    path, _, _ = saved
    with pytest.raises(QuantError, match="another architecture.*first difference"):
        load_packed(path, SmallNet(classes=6))
    with pytest.raises(QuantError, match="another architecture"):
        load_packed(path, torch.nn.Sequential(torch.nn.Linear(3, 3)))


def test_truncated_file_is_refused(saved):
    path, _, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(QuantError, match="truncated"):
        load_packed(path, SmallNet())
    path.write_bytes(data[:10])
    with pytest.raises(QuantError, match="truncated|not a quant"):
        load_packed(path, SmallNet())


def test_damaged_file_is_refused(saved):
    path, _, _ = saved
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(QuantError, match="damaged.*checksum"):
        load_packed(path, SmallNet())


def test_foreign_files_are_refused(tmp_path):
    pt = tmp_path / "weights.pt"
    torch.save(SmallNet().state_dict(), pt)
    with pytest.raises(QuantError, match="not a quant packed file"):
        load_packed(pt, SmallNet())
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(QuantError, match="not a quant packed file"):
        load_packed(empty, SmallNet())


def test_future_version_is_refused(saved):
    path, _, _ = saved
    data = bytearray(path.read_bytes())
    data[8:12] = struct.pack("<I", 2)
    path.write_bytes(bytes(data))
    with pytest.raises(QuantError, match="version 2"):
        load_packed(path, SmallNet())


def test_no_silent_overwrite(saved):
    path, qnet, report = saved
    before = path.read_bytes()
    with pytest.raises(QuantError, match="already exists.*overwrite=True"):
        save_packed(path, qnet, report)
    assert path.read_bytes() == before
    save_packed(path, qnet, report, overwrite=True)
    assert path.read_bytes() == before  # deterministic content


def test_report_must_match_the_model(tmp_path, saved):
    _, qnet, report = saved
    with torch.no_grad():
        qnet.conv2.weight.add_(1e-3)
    with pytest.raises(QuantError, match="'conv2'.*changed after quantize_model"):
        save_packed(tmp_path / "x.qpk", qnet, report)
    with pytest.raises(QuantError, match="not in this model"):
        model_size(torch.nn.Sequential(torch.nn.Linear(2, 2)), report)


def test_load_leaves_the_model_alone(saved, small_net):
    path, _, _ = saved
    state = {k: v.clone() for k, v in small_net.state_dict().items()}
    load_packed(path, small_net)
    assert all(torch.equal(state[k], v) for k, v in small_net.state_dict().items())
