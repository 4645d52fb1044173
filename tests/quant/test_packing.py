"""Packed files and true sizes: exact round trip for every bit width, clear errors for bad files."""

import gzip
import hashlib
import json
import lzma
import os
import random
import struct
from pathlib import Path

import pytest
import torch

from quant import QuantError, QuantPlan, QuantSpec, load_packed, model_size, quantize_model, save_packed
from quant.packing import read_packed_header
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
    models = pytest.importorskip("hiercluster.models.zoo")
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


# ---------------------------------------------------------------- crafted files (issue 9)
# A crafted file is re-signed: its checksum is valid, so only the header checks stand
# between it and the decoder.


def rewrite(path, header=None, payload=None, head_bytes=None):
    """Write ``path`` again with another header and/or payload, under a valid checksum."""
    old_header, old_payload = payload_of(path)
    head = head_bytes if head_bytes is not None else json.dumps(old_header if header is None else header).encode()
    body = old_payload if payload is None else payload
    front = PREFIX.pack(b"QUANTPAK", 1, len(head), len(body)) + head
    path.write_bytes(front + body + hashlib.sha256(front + body).digest())


@pytest.fixture
def rich(tmp_path, small_net):
    """A file with every kind of block: residual terms, zero points, raw biases, activations."""
    plan = QuantPlan(residual_fraction=0.5)
    qnet, report = quantize_model(small_net, QuantSpec(bits=4), plan, act_spec=QuantSpec(bits=8, granularity="per_tensor"),
                                  calibration=[torch.randn(2, 1, 8, 8)])
    return save_packed(tmp_path / "rich.qpk", qnet, report)


def edit(path, change):
    header, _ = payload_of(path)
    change(header)
    rewrite(path, header)


def refused(path, pattern, model=None):
    with pytest.raises(QuantError, match=pattern) as info:
        load_packed(path, model or SmallNet())
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message and len(message) < 400, message
    return message


def term0(header):
    return header["entries"][0]["terms"][0]


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda h: h.pop("arch"), r"damaged: header: the key 'arch' is missing"),
        (lambda h: h["arch"].update(tensors=5), r"header\.arch\.tensors: expected a list"),
        (lambda h: h["arch"]["tensors"][0].pop(), r"header\.arch\.tensors\[0\]: expected \[name, shape, dtype\]"),
        (lambda h: h["arch"]["tensors"][0].__setitem__(2, "torch.complex64"), r"tensors\[0\]\[2\]: dtype 'torch.complex64' is not one of"),
        (lambda h: h["arch"]["tensors"][0].__setitem__(1, [8, 1, 3, "3"]), r"tensors\[0\]\[1\]\[3\]: expected an integer"),
        (lambda h: h["arch"]["tensors"][0].__setitem__(1, [1] * 100), r"tensors\[0\]\[1\]: a shape of 100 dimensions"),
        (lambda h: h["arch"]["tensors"][0].__setitem__(1, [8, -1]), r"tensors\[0\]\[1\]: dimension -1 is outside \[0, "),
        (lambda h: h["entries"][0].update(shape=[8, 9]), r"entries\[0\]: 'conv1.weight' does not match header\.arch\.tensors\[0\]"),
        (lambda h: h["entries"][0].update(name="other"), r"entries\[0\]: 'other' does not match header\.arch\.tensors\[0\]"),
        (lambda h: h["entries"].pop(), r"header\.entries: 5 entries for the 6 tensors"),
        (lambda h: h["entries"][1].update(kind="zipped"), r"entries\[1\]\.kind: expected 'quantized' or 'raw', got 'zipped'"),
        (lambda h: h["entries"][1].pop("data"), r"entries\[1\]: the key 'data' is missing"),
        (lambda h: h["entries"][0].update(terms=[]), r"entries\[0\]\.terms: 0 terms; allowed: 1 to 8"),
        (lambda h: h["entries"][0].update(terms=[term0(h)] * 9), r"entries\[0\]\.terms: 9 terms"),
        (lambda h: term0(h).update(bits=True), r"terms\[0\]\.bits: expected an integer, got True"),
        (lambda h: term0(h).update(bits=40), r"terms\[0\]\.bits: expected an integer in \[2, 16\]"),
        (lambda h: term0(h).update(scheme="ternary"), r"terms\[0\]\.scheme: expected one of asymmetric"),
        (lambda h: term0(h).update(qmin=5, qmax=2), r"terms\[0\]: qmin, qmax = 5, 2 is not a 4-bit asymmetric code range"),
        (lambda h: term0(h).update(axis=1), r"terms\[0\]\.axis: expected null or 0"),
        (lambda h: term0(h).update(channels=9), r"terms\[0\]\.channels: expected 8, got 9"),
        (lambda h: term0(h).update(codes=[0, 10**12]), r"terms\[0\]\.codes: block \[0, 1000000000000\] lies outside the \d+-byte payload"),
        (lambda h: term0(h).update(codes=[-4, 36]), r"terms\[0\]\.codes: block \[-4, 36\] lies outside"),
        (lambda h: term0(h).update(codes=[0, 35]), r"terms\[0\]\.codes: block of 35 bytes, expected 36"),
        (lambda h: term0(h).update(codes=[1, 2, 3]), r"terms\[0\]\.codes: expected \[offset, length\]"),
        (lambda h: term0(h).update(zero_point=None), r"terms\[0\]\.zero_point: an asymmetric term needs its zero point"),
        (lambda h: h["entries"][1].update(data=[0, 32]), r"entries\[1\]\.data: block starts at byte 0 of the payload, expected"),
        (lambda h: h["activations"].update(x={"scheme": "pow2"}), r"activations\['x'\]: the key 'bits' is missing"),
        (lambda h: h["activations"]["conv2"].update(scale=float("nan")), r"activations\['conv2'\]\.scale: expected a positive finite number"),
        (lambda h: h["activations"]["conv2"].update(scale=10**400), r"activations\['conv2'\]\.scale: expected a positive finite"),
        (lambda h: h["activations"]["conv2"].update(zero_point=300), r"activations\['conv2'\]\.zero_point: expected an integer in \[0, 255\]"),
        (lambda h: h["activations"]["conv2"].update(scheme="pow2"), r"activations\['conv2'\]\.scheme: expected one of asymmetric, symmetric"),
        (lambda h: h.update(version="1"), r"header\.version: expected an integer, got '1'"),
        (lambda h: h.update(byteorder="big"), r"header\.byteorder: expected 'little', got 'big'"),
    ],
)
def test_crafted_header_with_valid_checksum_is_refused_by_name(rich, change, pattern):
    edit(rich, change)
    refused(rich, pattern)


def test_payload_must_be_fully_described(rich):
    header, payload = payload_of(rich)
    rewrite(rich, header, payload + b"\0" * 10)
    refused(rich, r"header\.entries: describe \d+ bytes of payload, the file holds \d+")


def test_activation_on_a_missing_layer_is_refused(rich):
    edit(rich, lambda h: h["activations"].update(nowhere=h["activations"]["conv2"]))
    refused(rich, r"damaged: header\.activations: 'nowhere' is not a layer of this SmallNet")


@pytest.mark.parametrize("depth", [100_000, 900])
def test_deeply_nested_header_is_refused(rich, depth):
    header, _ = payload_of(rich)
    header["arch"] = "DEEP"
    rewrite(rich, head_bytes=json.dumps(header).replace('"DEEP"', "[" * depth + "]" * depth).encode())
    refused(rich, r"damaged: header(: nested too deeply to be a packed header|\.arch: expected an object, got \[\[\[)")


def test_header_that_is_not_json_is_refused(rich):
    rewrite(rich, head_bytes=b"\xff\xfe not json")
    refused(rich, "damaged: header: not valid UTF-8 JSON")


def payload_block(path, span):
    header, payload = payload_of(path)
    return header, bytearray(payload), slice(span[0], span[0] + span[1])


def test_codes_above_qmax_are_refused(tmp_path, small_net):
    qnet, report = quantize_model(small_net, QuantSpec(scheme="symmetric", bits=4))
    path = save_packed(tmp_path / "s.qpk", qnet, report)
    header, payload, block = payload_block(path, term0(payload_of(path)[0])["codes"])
    payload[block] = b"\xff" * (block.stop - block.start)  # unsigned 15 -> code 8 > qmax 7
    rewrite(path, header, bytes(payload))
    refused(path, r"entries\[0\]\.terms\[0\]\.codes: code 8 is above qmax 7")


@pytest.mark.parametrize("value, shown", [(float("nan"), "nan"), (-1.0, "-1.0"), (0.0, "0.0")])
def test_bad_scale_in_payload_is_refused(saved, value, shown):
    path, _, _ = saved
    header, payload, block = payload_block(path, term0(payload_of(path)[0])["scale"])
    payload[block.start : block.start + 4] = struct.pack("<f", value)
    rewrite(path, header, bytes(payload))
    refused(path, rf"terms\[0\]\.scale: every scale must be positive, the payload holds {shown}")


def test_zero_point_off_the_grid_is_refused(tmp_path, small_net):
    qnet, report = quantize_model(small_net, QuantSpec(bits=12))  # zero points stored as uint16
    path = save_packed(tmp_path / "w.qpk", qnet, report)
    header, payload, block = payload_block(path, term0(payload_of(path)[0])["zero_point"])
    payload[block.start : block.start + 2] = struct.pack("<H", 5000)
    rewrite(path, header, bytes(payload))
    refused(path, r"terms\[0\]\.zero_point: 5000 is outside \[0, 4095\]")


def test_declared_lengths_are_checked_before_reading(saved):
    path, _, _ = saved
    data = path.read_bytes()
    _, _, head, body = PREFIX.unpack_from(data)
    path.write_bytes(PREFIX.pack(b"QUANTPAK", 1, head, body + 10**12) + data[PREFIX.size :])
    refused(path, r"truncated or damaged: its header announces \d+ bytes, the file has \d+")
    path.write_bytes(PREFIX.pack(b"QUANTPAK", 1, 2**40, body) + data[PREFIX.size :])
    refused(path, r"damaged: its prefix announces a header of 1099511627776 bytes; packed headers have at most 16777216")


def test_sparse_40_gib_file_is_refused_without_reading_it(saved, monkeypatch):
    path, _, _ = saved
    data = path.read_bytes()
    _, _, head, body = PREFIX.unpack_from(data)
    size = 40 * 2**30
    big = size - PREFIX.size - head - 32
    with open(path, "wb") as f:
        f.write(PREFIX.pack(b"QUANTPAK", 1, head, big) + data[PREFIX.size : PREFIX.size + head])
        f.truncate(size)  # sparse: no disk used
    reads = []
    monkeypatch.setattr(hashlib, "sha256", lambda *a: reads.append(a) or pytest.fail("the payload was hashed"))
    refused(path, rf"header\.entries: describe {body} bytes of payload, the file holds {big}")
    assert not reads


def test_random_damage_in_the_header_names_the_checksum(saved):
    path, _, _ = saved
    data = bytearray(path.read_bytes())
    data[PREFIX.size + 40] ^= 0x04  # inside the header JSON
    path.write_bytes(bytes(data))
    refused(path, "damaged: its SHA-256 checksum does not match")


@pytest.mark.parametrize("kind", ["folder", "fifo", "device", "missing"])
def test_only_regular_files_are_read(tmp_path, kind):
    path = {"folder": tmp_path, "fifo": tmp_path / "pipe", "device": Path("/dev/zero"), "missing": tmp_path / "none.hcq"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    expected = {"folder": "is a folder", "fifo": "is a named pipe", "device": "is a device", "missing": "no such file"}[kind]
    with pytest.raises(QuantError, match=f"{expected}"):
        load_packed(path, SmallNet())  # a FIFO without a writer must not block
    with pytest.raises(QuantError, match=f"{expected}"):
        read_packed_header(path)


def test_read_packed_header_checks_without_the_payload(saved):
    path, _, report = saved
    header = read_packed_header(path)
    assert header["spec"] == report.spec.to_dict() and header["arch"]["class"] == "SmallNet"
    data = bytearray(path.read_bytes())
    data[-40] ^= 0x01  # payload damage: only load_packed, which hashes it, sees it
    path.write_bytes(bytes(data))
    assert read_packed_header(path) == header
    refused(path, "checksum")
    edit(path, lambda h: h.pop("entries"))
    with pytest.raises(QuantError, match="damaged: header: the key 'entries' is missing"):
        read_packed_header(path)


# ---------------------------------------------------------------- fuzz: only QuantError escapes

_ODD_VALUES = [None, True, -1, 0, 2**70, 1.5, float("nan"), float("inf"), "x", "", [], [0], [[0]] * 3, {}, {"a": 1}, [1] * 70]


def _locations(node, out, depth=0):
    """Every (container, key) in a decoded JSON tree, down to depth 8 (below a nest planted by an earlier mutation)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        out.append((node, key))
        if depth < 8:
            _locations(child, out, depth + 1)
    return out


def _mutate(header, rng):
    container, key = rng.choice(_locations(header, []))
    action = rng.randrange(5)
    if action == 0 and isinstance(container, dict):
        del container[key]
    elif action == 1 and isinstance(container[key], int) and not isinstance(container[key], bool):
        container[key] += rng.choice([-1, 1, -(2**40), 2**64, 7])
    elif action == 2:
        nested = 0
        for _ in range(rng.choice([3, 50, 500])):
            nested = [nested]
        container[key] = nested
    elif action == 3 and isinstance(container, list):
        container.append(container[key]) if rng.random() < 0.5 else container.pop(key)
    else:
        container[key] = rng.choice(_ODD_VALUES)


def test_fuzzed_headers_raise_only_quant_error(tmp_path, small_net, one_thread):
    rng = random.Random(9)
    files = []
    for i, (spec, plan) in enumerate([(QuantSpec(bits=4), QuantPlan(residual_fraction=0.5)),
                                      (QuantSpec(scheme="pow2", bits=3, granularity="per_tensor"), None),
                                      (QuantSpec(scheme="symmetric", bits=12), None)]):
        qnet, report = quantize_model(small_net, spec, plan, act_spec=QuantSpec(bits=6, granularity="per_tensor"),
                                      calibration=[torch.randn(2, 1, 8, 8)])
        files.append(save_packed(tmp_path / f"{i}.qpk", qnet, report).read_bytes())
    path = tmp_path / "fuzzed.qpk"
    outcomes = {"refused": 0, "loaded": 0}
    for trial in range(300):
        path.write_bytes(files[trial % len(files)])
        header, payload = payload_of(path)
        for _ in range(rng.choice([1, 1, 2, 3])):
            _mutate(header, rng)
        if trial % 5 == 0:  # damage the payload too
            payload = bytearray(payload)
            payload[rng.randrange(len(payload))] = rng.randrange(256)
        rewrite(path, header, bytes(payload))
        try:
            load_packed(path, small_net)
            outcomes["loaded"] += 1
        except QuantError as err:
            assert "\n" not in str(err) and len(str(err)) < 500, str(err)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 200, outcomes  # most break the file; those of unused fields (spec, plan) load
