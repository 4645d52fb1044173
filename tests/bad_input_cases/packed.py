"""Bad ``.hcq`` packed models given to ``hiercluster evaluate --packed``: bombs, crafted headers, wrong files.

The crafted files are re-signed (their SHA-256 is valid), so only the header checks of
``quant.packing`` stand between them and the decoder.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bad_input_cases import Case, copy_checkpoint, digits_config

PREFIX = struct.Struct("<8sIQQ")  # magic, version, header length, payload length


def _digits_packed(tmp: Path, scheme: str = "asymmetric") -> tuple[Path, Path]:
    """A digits config and a valid 4-bit ``.hcq`` of its checkpoint; returns ``(config, packed)``."""
    import quant
    from hiercluster.models.zoo import load_checkpoint

    ckpt = copy_checkpoint(tmp)
    config = digits_config(tmp, model={"checkpoint": ckpt.name})
    model, _ = load_checkpoint(ckpt)
    qmodel, report = quant.quantize_model(model, quant.QuantSpec(scheme=scheme, bits=4))
    return config, quant.save_packed(tmp / "model.hcq", qmodel, report)


def _argv(tmp: Path, config: Path, packed: Path) -> list[str]:
    return ["evaluate", str(config), "--packed", str(packed), "--out", str(tmp / "run"), "--quiet"]


def _split(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    _, _, head, body = PREFIX.unpack_from(data)
    return json.loads(data[PREFIX.size : PREFIX.size + head]), data[PREFIX.size + head : PREFIX.size + head + body]


def _resign(path: Path, header: dict[str, Any] | None = None, payload: bytes | None = None, head: bytes | None = None) -> None:
    """Write ``path`` again with another header or payload, under a valid checksum."""
    old_header, old_payload = _split(path)
    head = head if head is not None else json.dumps(old_header if header is None else header).encode()
    body = old_payload if payload is None else payload
    front = PREFIX.pack(b"QUANTPAK", 1, len(head), len(body)) + head
    path.write_bytes(front + body + hashlib.sha256(front + body).digest())


def _crafted(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], list[str]]:
    """A case whose file's header is changed by ``change`` and re-signed."""

    def make(tmp: Path) -> list[str]:
        config, packed = _digits_packed(tmp)
        header, _ = _split(packed)
        change(header)
        _resign(packed, header)
        return _argv(tmp, config, packed)

    return make


def _sparse_40_gib(tmp: Path) -> list[str]:
    config, packed = _digits_packed(tmp)
    data = packed.read_bytes()
    _, _, head, _ = PREFIX.unpack_from(data)
    size = 40 * 2**30
    # Beside the case's folder, not in it: the harness reads every file in the folder
    # whole to hash it. pytest removes the sibling with the folder's parent.
    sparse = tmp.parent / f"{tmp.name}-sparse" / "model.hcq"
    sparse.parent.mkdir()
    with open(sparse, "wb") as f:  # a valid prefix and header claiming a 40 GiB payload
        f.write(PREFIX.pack(b"QUANTPAK", 1, head, size - PREFIX.size - head - 32) + data[PREFIX.size : PREFIX.size + head])
        f.truncate(size)  # sparse: costs no disk
    return _argv(tmp, config, sparse)


def _lengths_beyond_the_file(tmp: Path) -> list[str]:
    config, packed = _digits_packed(tmp)
    data = packed.read_bytes()
    _, _, head, body = PREFIX.unpack_from(data)
    packed.write_bytes(PREFIX.pack(b"QUANTPAK", 1, head, body + 10**12) + data[PREFIX.size :])
    return _argv(tmp, config, packed)


def _huge_header_length(tmp: Path) -> list[str]:
    config, packed = _digits_packed(tmp)
    data = packed.read_bytes()
    _, _, _, body = PREFIX.unpack_from(data)
    packed.write_bytes(PREFIX.pack(b"QUANTPAK", 1, 2**40, body) + data[PREFIX.size :])
    return _argv(tmp, config, packed)


def _deep_nesting(tmp: Path) -> list[str]:
    config, packed = _digits_packed(tmp)
    _resign(packed, head=b"[" * 100_000 + b"]" * 100_000)
    return _argv(tmp, config, packed)


def _not_json(tmp: Path) -> list[str]:
    config, packed = _digits_packed(tmp)
    _resign(packed, head=b"\xe9t\xe9 {")
    return _argv(tmp, config, packed)


def _flipped_byte(tmp: Path) -> list[str]:
    config, packed = _digits_packed(tmp)
    data = bytearray(packed.read_bytes())
    data[len(data) // 2] ^= 0x10
    packed.write_bytes(bytes(data))
    return _argv(tmp, config, packed)


def _codes_above_qmax(tmp: Path) -> list[str]:
    config, packed = _digits_packed(tmp, scheme="symmetric")
    header, payload = _split(packed)
    offset, length = header["entries"][0]["terms"][0]["codes"]
    body = bytearray(payload)
    body[offset : offset + length] = b"\xff" * length  # unsigned 15 is code 8, above qmax 7
    _resign(packed, header, bytes(body))
    return _argv(tmp, config, packed)


def _other_architecture(tmp: Path) -> list[str]:
    import torch.nn as nn

    import quant

    config, _ = _digits_packed(tmp)
    qmodel, report = quant.quantize_model(nn.Sequential(nn.Linear(64, 10)), quant.QuantSpec(bits=4))
    return _argv(tmp, config, quant.save_packed(tmp / "mlp.hcq", qmodel, report))


def _text_file(tmp: Path) -> list[str]:
    config, _ = _digits_packed(tmp)
    notes = tmp / "notes.hcq"
    notes.write_text("a packed model, honest\n")
    return _argv(tmp, config, notes)


def _empty_file(tmp: Path) -> list[str]:
    config, _ = _digits_packed(tmp)
    (tmp / "empty.hcq").write_bytes(b"")
    return _argv(tmp, config, tmp / "empty.hcq")


def _folder(tmp: Path) -> list[str]:
    config, _ = _digits_packed(tmp)
    (tmp / "model.hcq.d").mkdir()
    return _argv(tmp, config, tmp / "model.hcq.d")


def _device(tmp: Path) -> list[str]:
    config, _ = _digits_packed(tmp)
    return _argv(tmp, config, Path("/dev/zero"))


def _fifo(tmp: Path) -> list[str]:
    config, _ = _digits_packed(tmp)
    os.mkfifo(tmp / "pipe.hcq")
    return _argv(tmp, config, tmp / "pipe.hcq")


def _term(header: dict[str, Any]) -> dict[str, Any]:
    return header["entries"][0]["terms"][0]


# "packed" in the expectations of the folder, device and FIFO cases: cmd_evaluate's own
# is_file check answers them today ("packed model not found"); quant's answer ("is a
# folder, not a quant packed file") takes over once cmd_evaluate calls read_packed_header.
CASES: dict[str, Case] = {
    "a sparse 40 GiB .hcq": Case(_sparse_40_gib, "is damaged: header.entries: describe", bomb=True),
    "declared lengths beyond the file": Case(_lengths_beyond_the_file, "truncated or damaged: its header announces"),
    "a 1 TiB header length": Case(_huge_header_length, "packed headers have at most"),
    "a deeply nested header, valid checksum": Case(_deep_nesting, "header: nested too deeply"),
    "a header that is not JSON, valid checksum": Case(_not_json, "header: not valid UTF-8 JSON"),
    "a header without arch": Case(_crafted(lambda h: h.pop("arch")), "header: the key 'arch' is missing"),
    "a bit width that is a string": Case(_crafted(lambda h: _term(h).update(bits="4")), "terms[0].bits: expected an integer, got '4'"),
    "a bit width out of range": Case(_crafted(lambda h: _term(h).update(bits=64)), "terms[0].bits: expected an integer in [2, 16]"),
    "qmin above qmax": Case(_crafted(lambda h: _term(h).update(qmin=9, qmax=3)), "is not a 4-bit asymmetric code range"),
    "codes block outside the payload": Case(_crafted(lambda h: _term(h).update(codes=[10**9, 5])), "lies outside the"),
    "entries not matching arch": Case(_crafted(lambda h: h["entries"].pop()), "entries for the"),
    "an activation on a missing layer": Case(
        _crafted(lambda h: h["activations"].update(ghost={"scheme": "asymmetric", "bits": 8, "qmin": 0, "qmax": 255,
                                                          "scale": 0.1, "zero_point": 0})),
        "header.activations: 'ghost' is not a layer",
    ),
    "codes above qmax in the payload": Case(_codes_above_qmax, "codes: code 8 is above qmax 7"),
    "a flipped byte": Case(_flipped_byte, "SHA-256 checksum does not match"),
    "a file for another architecture": Case(_other_architecture, "was written for another architecture"),
    "a text file": Case(_text_file, "is not a quant packed file"),
    "an empty file": Case(_empty_file, "is not a quant packed file"),
    "a folder": Case(_folder, "is a folder"),
    "/dev/zero": Case(_device, "is a device, not a quant packed file"),
    "a FIFO": Case(_fifo, "is a named pipe (FIFO), not a quant packed file"),
}
