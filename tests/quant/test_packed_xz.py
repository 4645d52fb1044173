"""packed_xz_bytes: model_size's xz size, from a packed file alone (for sweeps that skip xz per spec)."""

import lzma
import struct

import pytest
import torch
import torch.nn as nn

import quant
from quant import QuantPlan, QuantSpec, quantize_model
from quant.packing import XZ_PRESET, packed_xz_bytes


def _payload_by_hand(data: bytes) -> bytes:
    """The payload as the file format describes it: after the 28-byte prefix and the header, before the digest."""
    magic, _, head_len, body_len = struct.unpack("<8sIQQ", data[:28])
    assert magic == b"QUANTPAK"
    return data[28 + head_len : 28 + head_len + body_len]


@pytest.mark.parametrize("spec, plan", [
    (QuantSpec(bits=4), QuantPlan()),
    (QuantSpec(scheme="symmetric", bits=3, clipping="mse"), QuantPlan(residual_fraction=0.5, skip=("4",))),
])
def test_equals_model_size_and_the_payload_by_hand(tmp_path, spec, plan):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    qmodel, report = quantize_model(model, spec, plan)
    path = quant.save_packed(tmp_path / "m.hcq", qmodel, report)
    expected = len(lzma.compress(_payload_by_hand(path.read_bytes()), format=lzma.FORMAT_XZ, preset=XZ_PRESET))
    assert packed_xz_bytes(path) == expected == quant.model_size(qmodel, report)["xz_bytes"]


def test_a_damaged_file_is_refused(tmp_path):
    qmodel, report = quantize_model(nn.Linear(32, 8), QuantSpec(bits=4))
    path = quant.save_packed(tmp_path / "m.hcq", qmodel, report)
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF  # a payload byte: only the checksum can tell
    path.write_bytes(bytes(data))
    with pytest.raises(quant.QuantError, match="SHA-256 checksum does not match"):
        packed_xz_bytes(path)
    with pytest.raises(quant.QuantError, match="no such file"):
        packed_xz_bytes(tmp_path / "missing.hcq")
