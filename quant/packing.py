"""True sizes and the packed file: integer codes at ``b`` bits each, never pickle.

File layout (all integers little-endian)::

    magic  b"QUANTPAK"                      8 bytes
    version                                  uint32 (1)
    header length H, payload length P        uint64, uint64
    header                                   H bytes of UTF-8 JSON
    payload                                  P bytes
    SHA-256 of everything above              32 bytes

The header lists the folded model's ``state_dict`` entries (name, shape, dtype: the
architecture fingerprint) and, for each, where its bytes lie in the payload. A
quantized weight is stored as one or two terms (two for a residual layer), each with
its codes bit-packed at ``bits`` bits (offset by ``qmin`` so they are unsigned), its
per-channel (or per-tensor) scale as float32 and, for ``asymmetric`` only, its zero
point as uint8 (bits <= 8) or uint16; the symmetric schemes have no zero point to
store. Every other entry (biases, leftover buffers) is stored raw in its own dtype.
Activation quantizers (one scale and zero point per layer) live in the header.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import struct
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from quant import activations
from quant.bitpack import pack_bits, unpack_bits
from quant.errors import QuantError
from quant.fold import fold_batchnorm
from quant.functional import QParams, dequantize_sum
from quant.report import QuantReport

MAGIC = b"QUANTPAK"
VERSION = 1
_PREFIX = struct.Struct("<8sIQQ")
_DIGEST_BYTES = 32
_DTYPES = {str(d): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


def _raw_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _from_raw(data: bytes, dtype: torch.dtype, shape: list[int]) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape).clone() if data else torch.empty(shape, dtype=dtype)


def _zero_point_dtype(bits: int) -> np.dtype:
    return np.dtype("<u1") if bits <= 8 else np.dtype("<u2")


class _Payload:
    """Appends byte blocks and remembers where each went; tallies bytes by kind."""

    def __init__(self) -> None:
        self.blocks: list[bytes] = []
        self.size = 0
        self.tally = {"codes_bytes": 0, "qparams_bytes": 0, "float_bytes": 0}

    def add(self, data: bytes, kind: str) -> list[int]:
        span = [self.size, len(data)]
        self.blocks.append(data)
        self.size += len(data)
        self.tally[kind] += len(data)
        return span


def _fingerprint(state: dict[str, Tensor]) -> list[list[Any]]:
    return [[name, list(t.shape), str(t.dtype)] for name, t in state.items()]


def _check_report(state: dict[str, Tensor], report: QuantReport) -> dict[str, tuple]:
    if not isinstance(report, QuantReport):
        raise TypeError(f"report must be a QuantReport, got {type(report).__name__}")
    quantized = {}
    for layer, parts in report.codes.items():
        key = f"{layer}.weight" if layer else "weight"
        if key not in state:
            raise QuantError(f"the report's layer {layer!r} is not in this model; pass the model returned with the report")
        if not torch.equal(dequantize_sum(parts).cpu().to(state[key].dtype), state[key]):
            raise QuantError(
                f"layer {layer!r}: the model's weight is not the one the report's codes encode "
                "(was the model changed after quantize_model?)"
            )
        quantized[key] = parts
    return quantized


def _encode(qmodel: nn.Module, report: QuantReport) -> tuple[dict[str, Any], _Payload]:
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be an nn.Module, got {type(qmodel).__name__}")
    state = {k: v.detach().cpu() for k, v in qmodel.state_dict().items()}
    quantized = _check_report(state, report)
    payload = _Payload()
    entries = []
    for name, tensor in state.items():
        entry: dict[str, Any] = {"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype)}
        if name in quantized:
            entry["kind"] = "quantized"
            entry["terms"] = [_encode_term(codes, params, payload) for codes, params in quantized[name]]
        else:
            entry["kind"] = "raw"
            entry["data"] = payload.add(_raw_bytes(tensor), "float_bytes")
        entries.append(entry)
    header = {
        "format": "quant-packed",
        "version": VERSION,
        "byteorder": "little",
        "arch": {"class": type(qmodel).__name__, "tensors": _fingerprint(state)},
        "entries": entries,
        "activations": {
            name: {"scheme": p.scheme, "bits": p.bits, "qmin": p.qmin, "qmax": p.qmax, "scale": float(p.scale), "zero_point": int(p.zero_point)}
            for name, p in report.activations.items()
        },
        "spec": report.spec.to_dict(),
        "plan": report.plan.to_dict(),
        "method": report.method,
        "bn_reestimated": report.bn_reestimated,
        "biases": report.biases,
    }
    return header, payload


def _encode_term(codes: Tensor, params: QParams, payload: _Payload) -> dict[str, Any]:
    unsigned = codes.detach().cpu().to(torch.int64).numpy() - params.qmin
    term: dict[str, Any] = {
        "scheme": params.scheme,
        "bits": params.bits,
        "qmin": params.qmin,
        "qmax": params.qmax,
        "axis": params.axis,
        "channels": params.scale.numel(),
        "codes": payload.add(pack_bits(unsigned, params.bits), "codes_bytes"),
        "scale": payload.add(params.scale.detach().cpu().numpy().astype("<f4").tobytes(), "qparams_bytes"),
        "zero_point": None,
    }
    if params.scheme == "asymmetric":
        zp = params.zero_point.detach().cpu().numpy().astype(_zero_point_dtype(params.bits))
        term["zero_point"] = payload.add(zp.tobytes(), "qparams_bytes")
    return term


def _serialize(header: dict[str, Any], payload: _Payload) -> tuple[bytes, bytes]:
    head = json.dumps(header, separators=(",", ":")).encode()
    body = b"".join(payload.blocks)
    front = _PREFIX.pack(MAGIC, VERSION, len(head), len(body)) + head
    digest = hashlib.sha256(front)
    digest.update(body)
    return front, body + digest.digest()


def model_size(qmodel: nn.Module, report: QuantReport) -> dict[str, int]:
    """Sizes in bytes of the quantized model, as stored by :func:`save_packed`.

    Parameters
    ----------
    qmodel, report
        As returned together by :func:`quant.quantize_model`.

    Returns
    -------
    dict
        ``fp32_bytes``: 4 bytes per floating-point element of the original (unfolded)
        model's ``state_dict``. ``packed_bytes``: the payload: codes bit-packed at their
        width (``codes_bytes``), scales and zero points (``qparams_bytes``), and every
        other tensor in its own dtype, float32 for biases (``float_bytes``).
        ``header_bytes`` and ``file_bytes`` (what :func:`save_packed` writes).
        ``gzip_bytes`` (level 9) and ``xz_bytes`` (LZMA2, preset 6; 7-zip's algorithm)
        of the payload.

    Examples
    --------
    >>> from quant import QuantSpec, quantize_model
    >>> qnet, report = quantize_model(nn.Linear(64, 8, bias=False), QuantSpec(bits=4))
    >>> sizes = model_size(qnet, report)
    >>> sizes["fp32_bytes"], sizes["codes_bytes"], sizes["qparams_bytes"]
    (2048, 256, 40)
    """
    header, payload = _encode(qmodel, report)
    front, rest = _serialize(header, payload)
    body = b"".join(payload.blocks)
    return {
        "fp32_bytes": report.fp32_bytes,
        "packed_bytes": payload.size,
        **payload.tally,
        "header_bytes": len(front) - _PREFIX.size,
        "file_bytes": len(front) + len(rest),
        "gzip_bytes": len(gzip.compress(body, compresslevel=9, mtime=0)),
        "xz_bytes": len(lzma.compress(body, format=lzma.FORMAT_XZ, preset=6)),
    }


def save_packed(path: str | Path, qmodel: nn.Module, report: QuantReport, *, overwrite: bool = False) -> Path:
    """Write ``qmodel``'s quantized weights bit-packed to ``path`` (see the module docstring).

    Parameters
    ----------
    path : str or Path
    qmodel, report
        As returned together by :func:`quant.quantize_model`; the report's codes must
        still encode the model's weights.
    overwrite : bool, default False
        Replace an existing file; otherwise an existing ``path`` raises QuantError.

    Returns
    -------
    Path
        The path written (atomically: a partial file never appears under ``path``).

    Examples
    --------
    >>> import tempfile, os
    >>> from quant import QuantSpec, quantize_model
    >>> net = nn.Linear(16, 4)
    >>> qnet, report = quantize_model(net, QuantSpec(bits=3))
    >>> path = save_packed(os.path.join(tempfile.mkdtemp(), "net.qpk"), qnet, report)
    >>> torch.equal(load_packed(path, net).weight, qnet.weight)
    True
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise QuantError(f"{path} already exists; pass overwrite=True to replace it")
    header, payload = _encode(qmodel, report)
    front, rest = _serialize(header, payload)
    # A fresh name beside the target (not mkstemp, whose 0600 mode would ignore the umask),
    # then an atomic rename: a crash never leaves a partial file under ``path``.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as handle:
            handle.write(front)
            handle.write(rest)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _read(path: Path) -> tuple[dict[str, Any], memoryview]:
    data = path.read_bytes()
    if len(data) < _PREFIX.size or data[:8] != MAGIC:
        raise QuantError(f"{path} is not a quant packed file (it does not start with {MAGIC!r})")
    _, version, head_len, body_len = _PREFIX.unpack_from(data)
    if version != VERSION:
        raise QuantError(f"{path} has packed format version {version}; this quant reads version {VERSION}")
    expected = _PREFIX.size + head_len + body_len + _DIGEST_BYTES
    if len(data) != expected:
        raise QuantError(f"{path} is truncated or damaged: its header announces {expected} bytes, the file has {len(data)}")
    if hashlib.sha256(data[: expected - _DIGEST_BYTES]).digest() != data[expected - _DIGEST_BYTES :]:
        raise QuantError(f"{path} is damaged: its SHA-256 checksum does not match its contents")
    try:
        header = json.loads(data[_PREFIX.size : _PREFIX.size + head_len])
    except ValueError:
        raise QuantError(f"{path} is damaged: its header is not valid JSON") from None
    start = _PREFIX.size + head_len
    return header, memoryview(data)[start : start + body_len]


def _decode_term(term: dict[str, Any], body: memoryview, shape: list[int]) -> tuple[Tensor, QParams]:
    count = int(np.prod(shape)) if shape else 1
    off, length = term["codes"]
    codes = unpack_bits(body[off : off + length], term["bits"], count) + term["qmin"]
    off, length = term["scale"]
    scale = torch.from_numpy(np.frombuffer(body[off : off + length], dtype="<f4").astype(np.float32))
    if term["zero_point"] is None:
        zero_point = torch.zeros(scale.shape, dtype=torch.int32)
    else:
        off, length = term["zero_point"]
        zp = np.frombuffer(body[off : off + length], dtype=_zero_point_dtype(term["bits"]))
        zero_point = torch.from_numpy(zp.astype(np.int32))
    if term["axis"] is None:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    params = QParams(term["scheme"], term["bits"], scale, zero_point, term["qmin"], term["qmax"], term["axis"])
    return torch.from_numpy(codes).to(params.grid.code_dtype).reshape(shape), params


def _mismatch(file_arch: dict[str, Any], model_arch: list[list[Any]]) -> str:
    file_tensors = [list(e) for e in file_arch["tensors"]]
    for mine, theirs in zip(model_arch, file_tensors):
        if mine != theirs:
            return f"first difference: file has {theirs}, model has {mine}"
    return f"file has {len(file_tensors)} tensors, model has {len(model_arch)}"


def load_packed(path: str | Path, model: nn.Module) -> nn.Module:
    """Rebuild the quantized model from a packed file and the float architecture.

    Parameters
    ----------
    path : str or Path
        A file written by :func:`save_packed`.
    model : nn.Module
        The float, unfolded architecture (weights are ignored); it is not modified.

    Returns
    -------
    nn.Module
        A folded copy of ``model`` whose weights are exactly (bit for bit) the
        fake-quantized weights that were saved, with activation quantizers re-attached.

    Raises
    ------
    QuantError
        Not a packed file, a truncated or damaged file (checksum), or a file written
        for another architecture.

    Examples
    --------
    See :func:`save_packed`.
    """
    path = Path(path)
    if sys.byteorder != "little":
        raise QuantError("packed files are little-endian; this machine is big-endian")
    header, body = _read(path)
    folded = fold_batchnorm(model)
    state = folded.state_dict()
    arch = _fingerprint(state)
    if [list(e) for e in header["arch"]["tensors"]] != arch:
        raise QuantError(
            f"{path} was written for another architecture ({header['arch']['class']}) than "
            f"this {type(model).__name__}: {_mismatch(header['arch'], arch)}"
        )
    try:
        restored = {}
        for entry in header["entries"]:
            dtype = _DTYPES[entry["dtype"]]
            if entry["kind"] == "quantized":
                parts = tuple(_decode_term(term, body, entry["shape"]) for term in entry["terms"])
                restored[entry["name"]] = dequantize_sum(parts).to(dtype)
            else:
                off, length = entry["data"]
                restored[entry["name"]] = _from_raw(bytes(body[off : off + length]), dtype, entry["shape"])
        act = {
            name: QParams(a["scheme"], a["bits"], torch.tensor(a["scale"], dtype=torch.float32),
                          torch.tensor(a["zero_point"], dtype=torch.int32), a["qmin"], a["qmax"], None)
            for name, a in header["activations"].items()
        }
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise QuantError(f"{path} is damaged: its header does not describe its payload ({err})") from None
    device = {name: t.device for name, t in state.items()}
    folded.load_state_dict({name: t.to(device[name]) for name, t in restored.items()}, strict=True)
    activations.attach(folded, act)
    return folded
