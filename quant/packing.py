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
store. A ``binary`` term takes 1 bit per weight (code 0 is ``-a``, code 1 is ``+a``)
plus its ``a`` per channel as the scale. Every other entry (biases, leftover buffers) is stored raw in its own dtype.
Activation quantizers (one scale and zero point per layer) live in the header.

Reading is bounded and refuses any damage with one :class:`QuantError` line naming the
place ("header.entries[3].terms[0].bits: ..."): only a regular file is opened; the
declared lengths must add up to the file's size, and the header to at most
``MAX_HEADER_BYTES``, before anything else is read; the header must have the exact
shape and code ranges that :func:`save_packed` writes, its blocks must tile the payload
in order, and its tensors must be the model's, before the payload is read (once, in
chunks, while its SHA-256 is checked); the codes, scales and zero points in the payload
must lie on their grids.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import math
import os
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from quant import activations
from quant._files import NotRegularFileError, open_regular, write_atomic
from quant._validate import check_json, short_repr
from quant.bitpack import pack_bits, packed_size, unpack_bits
from quant.errors import QuantError
from quant.fold import fold_batchnorm
from quant.functional import QParams, dequantize_sum
from quant.layerops import weight_slots
from quant.report import QuantReport
from quant.schemes import Grid
from quant.spec import SCHEMES, bits_range

MAGIC = b"QUANTPAK"
VERSION = 1
_PREFIX = struct.Struct("<8sIQQ")
_DIGEST_BYTES = 32
# About 300 bytes of JSON per tensor: 16 MiB holds ~50,000 tensors, far beyond any model,
# and even a crafted header of that size parses and validates in a few seconds (measured).
MAX_HEADER_BYTES = 16 * 2**20
# quantize_model writes one term per weight, two for a residual layer; a few more leave
# room while a header still cannot claim a payload beyond a small multiple of the model.
MAX_TERMS = 8
# Real weights have at most 5 dimensions (Conv3d); the cap bounds the arithmetic on a crafted shape.
MAX_DIMS = 64
_MAX_SIZE = 2**63 - 1  # torch sizes are int64
_READ_CHUNK = 1 << 20  # bytes per read while hashing: the file is never held twice
# A header that fails validation is blamed on the checksum when the file is at most this
# large: hashing it takes well under a second; a larger (e.g. sparse) file is not read.
_HASH_ON_ERROR_BYTES = 256 * 2**20
_BAD_CHECKSUM = "its SHA-256 checksum does not match its contents"
#: LZMA2 preset of ``xz_bytes``: xz's default, close to the 7-zip figures of the seed paper.
#: Measured (benchmarks/bench_xz.py, 2 CPU cores): on the shipped ResNet-20 (4 bits, 0.14 MiB
#: payload) preset 6 is 3% smaller than preset 0, 1 or gzip -9 and costs 0.06 CPU-s; on a
#: random ViT-B/16 (42.6 MiB) presets 0 / 1 / 6 cost 11 / 19 / 24 CPU-s against 1.2 for
#: gzip -9, for sizes within 0.1% of gzip's. A faster preset saves little and gains nothing
#: over gzip; callers with big models skip xz instead (``xz_max_bytes``) and compute it later
#: for the few models they keep, from the file (:func:`packed_xz_bytes`).
XZ_PRESET = 6
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


def _check_report(qmodel: nn.Module, state: dict[str, Tensor], report: QuantReport) -> dict[str, tuple]:
    if not isinstance(report, QuantReport):
        raise TypeError(f"report must be a QuantReport, got {type(report).__name__}")
    # Report names are layer names for Conv/Linear and parameter names for attention projections.
    keys = {slot.name: slot.state_key for slot in weight_slots(qmodel)}
    quantized = {}
    for layer, parts in report.codes.items():
        key = keys.get(layer)
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
    quantized = _check_report(qmodel, state, report)
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


def model_size(qmodel: nn.Module, report: QuantReport, *, xz_max_bytes: int | None = None) -> dict[str, int | None]:
    """Sizes in bytes of the quantized model, as stored by :func:`save_packed`.

    Parameters
    ----------
    qmodel, report
        As returned together by :func:`quant.quantize_model`.
    xz_max_bytes : int, optional
        Compute ``xz_bytes`` only for a payload of at most this many bytes (None: always).
        xz costs about 0.5 CPU-s per MiB of payload, 20 times gzip; above the limit
        ``xz_bytes`` is None.

    Returns
    -------
    dict
        ``fp32_bytes``: 4 bytes per floating-point element of the original (unfolded)
        model's ``state_dict``. ``packed_bytes``: the payload: codes bit-packed at their
        width (``codes_bytes``), scales and zero points (``qparams_bytes``), and every
        other tensor in its own dtype, float32 for biases (``float_bytes``).
        ``header_bytes`` and ``file_bytes`` (what :func:`save_packed` writes).
        ``gzip_bytes`` (level 9) and ``xz_bytes`` (LZMA2, preset :data:`XZ_PRESET`;
        7-zip's algorithm) of the payload; ``xz_bytes`` is None above ``xz_max_bytes``.

    Examples
    --------
    >>> from quant import QuantSpec, quantize_model
    >>> qnet, report = quantize_model(nn.Linear(64, 8, bias=False), QuantSpec(bits=4))
    >>> sizes = model_size(qnet, report)
    >>> sizes["fp32_bytes"], sizes["codes_bytes"], sizes["qparams_bytes"]
    (2048, 256, 40)
    """
    bad_limit = isinstance(xz_max_bytes, bool) or not isinstance(xz_max_bytes, int) or xz_max_bytes < 0
    if xz_max_bytes is not None and bad_limit:
        raise ValueError(f"xz_max_bytes={xz_max_bytes!r} is invalid; allowed: None or an integer >= 0")
    header, payload = _encode(qmodel, report)
    front, rest = _serialize(header, payload)
    body = b"".join(payload.blocks)
    skip_xz = xz_max_bytes is not None and len(body) > xz_max_bytes
    return {
        "fp32_bytes": report.fp32_bytes,
        "packed_bytes": payload.size,
        **payload.tally,
        "header_bytes": len(front) - _PREFIX.size,
        "file_bytes": len(front) + len(rest),
        "gzip_bytes": len(gzip.compress(body, compresslevel=9, mtime=0)),
        "xz_bytes": None if skip_xz else _xz_size(body),
    }


def _xz_size(payload: bytes | memoryview) -> int:
    return len(lzma.compress(payload, format=lzma.FORMAT_XZ, preset=XZ_PRESET))


def packed_xz_bytes(path: str | Path) -> int:
    """``xz_bytes`` of :func:`model_size` for the model in a packed file, from the file alone.

    The payload in the file is the one :func:`model_size` compresses, so this equals the
    ``xz_bytes`` it would give for the model and report that were saved, without the
    model: a sweep that skipped xz for big payloads (``xz_max_bytes``) computes it later
    for the models it keeps. The file is checked as :func:`load_packed` checks it (prefix,
    header, payload length and SHA-256) before its payload is compressed.

    Raises
    ------
    QuantError
        Not a regular file, not a packed file, or a truncated or damaged one.

    Examples
    --------
    >>> import tempfile, os
    >>> from quant import QuantSpec, quantize_model
    >>> qnet, report = quantize_model(nn.Linear(64, 8), QuantSpec(bits=4))
    >>> path = save_packed(os.path.join(tempfile.mkdtemp(), "net.hcq"), qnet, report)
    >>> packed_xz_bytes(path) == model_size(qnet, report)["xz_bytes"]
    True
    """
    path = Path(path)
    with _open_regular(path) as handle:
        front = _read_front(path, handle)
        return _xz_size(_read_body(path, handle, front))


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
    data = packed_file_bytes(qmodel, report)
    return write_atomic(path, lambda handle: handle.write(data))


def packed_file_bytes(qmodel: nn.Module, report: QuantReport) -> bytes:
    """The bytes :func:`save_packed` writes, in memory (for a worker whose result a driver saves)."""
    header, payload = _encode(qmodel, report)
    front, rest = _serialize(header, payload)
    return front + rest


def _open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading (:func:`quant._files.open_regular`), refused unless it is a regular file."""
    try:
        return open_regular(path)
    except NotRegularFileError as err:
        raise QuantError(f"{path} is {err.kind}, not a quant packed file") from None
    except FileNotFoundError:
        raise QuantError(f"{path}: no such file") from None
    except OSError as err:
        raise QuantError(f"{path} cannot be read: {err.strerror}") from None


class _Front(NamedTuple):
    header: dict[str, Any]
    data: bytes  # the prefix and header bytes, which the checksum covers
    body_len: int


@contextmanager
def _damaged(path: Path) -> Iterator[None]:
    """Prefix a QuantError naming a place in the file ("header.entries[3].bits: ...") with the file."""
    try:
        yield
    except QuantError as err:
        raise QuantError(f"{path} is damaged: {err}") from None


def _read_front(path: Path, handle: BinaryIO) -> _Front:
    """Prefix and header of an open packed file, checked.

    Every declared length is checked against the file's size and the caps before
    anything is read; the header is validated against the payload length, so that
    :func:`_read_body` reads only a payload the header fully describes.
    """
    prefix = handle.read(_PREFIX.size)
    if len(prefix) < _PREFIX.size or prefix[:8] != MAGIC:
        raise QuantError(f"{path} is not a quant packed file (it does not start with {MAGIC!r})")
    _, version, head_len, body_len = _PREFIX.unpack(prefix)
    if version != VERSION:
        raise QuantError(f"{path} has packed format version {version}; this quant reads version {VERSION}")
    if head_len > MAX_HEADER_BYTES:
        raise QuantError(f"{path} is damaged: its prefix announces a header of {head_len} bytes; packed headers have at most {MAX_HEADER_BYTES}")
    expected = _PREFIX.size + head_len + body_len + _DIGEST_BYTES
    size = os.fstat(handle.fileno()).st_size
    if size != expected:
        raise QuantError(f"{path} is truncated or damaged: its header announces {expected} bytes, the file has {size}")
    head = _read_exact(path, handle, head_len)
    try:
        with _damaged(path):
            header = _decode_header(head, body_len)
    except QuantError:
        # Damage is far more often a flipped or lost byte than a crafted header: say so
        # when the file is small enough to hash at once.
        if size <= _HASH_ON_ERROR_BYTES and not _checksum_matches(path, handle, prefix + head, body_len):
            raise QuantError(f"{path} is damaged: {_BAD_CHECKSUM}") from None
        raise
    return _Front(header, prefix + head, body_len)


def _read_exact(path: Path, handle: BinaryIO, count: int) -> bytes:
    data = handle.read(count)
    if len(data) != count:
        raise QuantError(f"{path} is truncated: it became shorter while being read")
    return data


def _read_body(path: Path, handle: BinaryIO, front: _Front) -> memoryview:
    """The payload, read once in chunks while the SHA-256 of the whole file is checked."""
    body = memoryview(bytearray(front.body_len))
    if not _checksum_matches(path, handle, front.data, front.body_len, body):
        raise QuantError(f"{path} is damaged: {_BAD_CHECKSUM}")
    return body


def _checksum_matches(path: Path, handle: BinaryIO, front: bytes, body_len: int, into: memoryview | None = None) -> bool:
    """Read the payload after ``front`` in chunks (into ``into`` when given) and compare the SHA-256 stored after it."""
    digest = hashlib.sha256(front)
    scratch = into if into is not None else memoryview(bytearray(min(_READ_CHUNK, body_len)))
    for start in range(0, body_len, _READ_CHUNK):
        count = min(_READ_CHUNK, body_len - start)
        chunk = into[start : start + count] if into is not None else scratch[:count]
        if handle.readinto(chunk) != count:
            raise QuantError(f"{path} is truncated: it became shorter while being read")
        digest.update(chunk)
    return digest.digest() == _read_exact(path, handle, _DIGEST_BYTES)


# ---------------------------------------------------------------- header validation
# Shapes, offsets and payload spans are plain ``list`` here: their items are checked by
# _shape and _span, which bound their length before looking at each item.

_TERM = {"scheme": str, "bits": int, "qmin": int, "qmax": int, "axis": (int, None), "channels": int,
         "codes": list, "scale": list, "zero_point": (list, None)}
_ENTRY = {"name": str, "shape": list, "dtype": str, "kind": str}
_ACTIVATION = {"scheme": str, "bits": int, "qmin": int, "qmax": int, "scale": float, "zero_point": int}
_HEADER = {"format": str, "version": int, "byteorder": str, "arch": {"class": str, "tensors": [list]},
           "entries": [_ENTRY], "activations": dict}
_ACT_SCHEMES = ("asymmetric", "symmetric")  # activations.check_act_spec allows only these


def _decode_header(head: bytes, body_len: int) -> dict[str, Any]:
    """The header JSON, checked against the shape :func:`_encode` writes and the payload length."""
    try:
        header = json.loads(head.decode("utf-8"))
    except RecursionError:
        raise QuantError("header: nested too deeply to be a packed header") from None
    except ValueError:
        raise QuantError("header: not valid UTF-8 JSON") from None
    try:
        _check_header(header, body_len)
    except RecursionError:  # quoting a deeply nested value in the message
        raise QuantError("header: nested too deeply to be a packed header") from None
    return header


def _check_header(header: Any, body_len: int) -> None:
    check_json(header, _HEADER, "header", error=QuantError)
    for key, value in (("format", "quant-packed"), ("version", VERSION), ("byteorder", "little")):
        if header[key] != value:
            raise QuantError(f"header.{key}: expected {value!r}, got {short_repr(header[key])}")
    entries, tensors = header["entries"], header["arch"]["tensors"]
    # Counted before the items are checked: a crafted header cannot fill its size with tensors alone.
    if len(entries) != len(tensors):
        raise QuantError(f"header.entries: {len(entries)} entries for the {len(tensors)} tensors of header.arch")
    for i, item in enumerate(tensors):
        _arch_tensor(item, f"header.arch.tensors[{i}]")
    _check_entries(entries, tensors, body_len)
    for name, act in header["activations"].items():
        _check_activation(act, f"header.activations[{short_repr(name)}]")


def _arch_tensor(item: list, where: str) -> None:
    """Check one ``[name, shape, dtype]`` of ``arch.tensors``."""
    if len(item) != 3:
        raise QuantError(f"{where}: expected [name, shape, dtype], got {short_repr(item)}")
    check_json(item[0], str, f"{where}[0]", error=QuantError)
    _shape(item[1], f"{where}[1]")
    _dtype(item[2], f"{where}[2]")


def _shape(value: list, where: str) -> int:
    """Check a tensor shape; returns its number of elements."""
    check_json(value, list, where, error=QuantError)
    if len(value) > MAX_DIMS:
        raise QuantError(f"{where}: a shape of {len(value)} dimensions; at most {MAX_DIMS} are allowed")
    check_json(value, [int], where, error=QuantError)
    for size in value:
        if not 0 <= size <= _MAX_SIZE:
            raise QuantError(f"{where}: dimension {short_repr(size)} is outside [0, {_MAX_SIZE}]")
    return math.prod(value)


def _dtype(value: str, where: str) -> torch.dtype:
    check_json(value, str, where, error=QuantError)
    if value not in _DTYPES:
        raise QuantError(f"{where}: dtype {short_repr(value)} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[value]


def _check_entries(entries: list[dict[str, Any]], tensors: list[list[Any]], body_len: int) -> None:
    """Each entry matches its tensor in ``arch``, and their blocks tile the payload in order."""
    cursor = 0
    for i, (entry, tensor) in enumerate(zip(entries, tensors)):
        where = f"header.entries[{i}]"
        if [entry["name"], entry["shape"], entry["dtype"]] != tensor:
            raise QuantError(f"{where}: {short_repr(entry['name'])} does not match header.arch.tensors[{i}] {short_repr(tensor)}")
        numel = math.prod(entry["shape"])
        if entry["kind"] == "quantized":
            cursor = _check_terms(entry, numel, where, cursor, body_len)
        elif entry["kind"] == "raw":
            check_json(entry, {"data": list}, where, error=QuantError)
            size = numel * _DTYPES[entry["dtype"]].itemsize
            cursor = _span(entry["data"], f"{where}.data", size, cursor, body_len)
        else:
            raise QuantError(f"{where}.kind: expected 'quantized' or 'raw', got {short_repr(entry['kind'])}")
    if cursor != body_len:
        raise QuantError(f"header.entries: describe {cursor} bytes of payload, the file holds {body_len}")


def _check_terms(entry: dict[str, Any], numel: int, where: str, cursor: int, body_len: int) -> int:
    check_json(entry, {"terms": list}, where, error=QuantError)
    terms, shape = entry["terms"], entry["shape"]
    if not 1 <= len(terms) <= MAX_TERMS:
        raise QuantError(f"{where}.terms: {len(terms)} terms; allowed: 1 to {MAX_TERMS}")
    check_json(terms, [_TERM], f"{where}.terms", error=QuantError)
    if numel == 0:
        raise QuantError(f"{where}: a quantized weight cannot be empty (shape {short_repr(shape)})")
    for j, term in enumerate(terms):
        at = f"{where}.terms[{j}]"
        _check_grid(term, at, SCHEMES)
        if term["axis"] not in (None, 0) or (term["axis"] == 0 and not shape):
            raise QuantError(f"{at}.axis: expected null or 0 for shape {short_repr(shape)}, got {short_repr(term['axis'])}")
        channels = shape[0] if term["axis"] == 0 else 1
        if term["channels"] != channels:
            raise QuantError(f"{at}.channels: expected {channels}, got {short_repr(term['channels'])}")
        cursor = _span(term["codes"], f"{at}.codes", packed_size(numel, term["bits"]), cursor, body_len)
        cursor = _span(term["scale"], f"{at}.scale", 4 * channels, cursor, body_len)
        if term["scheme"] == "asymmetric":
            if term["zero_point"] is None:
                raise QuantError(f"{at}.zero_point: an asymmetric term needs its zero point block, got null")
            size = _zero_point_dtype(term["bits"]).itemsize * channels
            cursor = _span(term["zero_point"], f"{at}.zero_point", size, cursor, body_len)
        elif term["zero_point"] is not None:
            raise QuantError(f"{at}.zero_point: a {term['scheme']} term stores no zero point, expected null")
    return cursor


def _check_grid(params: dict[str, Any], where: str, schemes: tuple[str, ...]) -> None:
    """Scheme, bits and code range as :class:`quant.schemes.Grid` makes them."""
    scheme, bits = params["scheme"], params["bits"]
    if scheme not in schemes:
        raise QuantError(f"{where}.scheme: expected one of {', '.join(schemes)}, got {short_repr(scheme)}")
    lowest, highest = bits_range(scheme)
    if not lowest <= bits <= highest:
        raise QuantError(f"{where}.bits: expected an integer in [{lowest}, {highest}] for {scheme}, got {short_repr(bits)}")
    ranges = {(g.qmin, g.qmax) for g in (Grid.make(scheme, bits, True), Grid.make(scheme, bits, False))}
    if (params["qmin"], params["qmax"]) not in ranges:
        raise QuantError(
            f"{where}: qmin, qmax = {short_repr(params['qmin'])}, {short_repr(params['qmax'])} is not a {bits}-bit {scheme} "
            f"code range; expected one of {', '.join(map(str, sorted(ranges)))}"
        )


def _span(value: list, where: str, size: int, cursor: int, body_len: int) -> int:
    """Check one ``[offset, length]`` block: ``size`` bytes right after the previous block; returns its end."""
    check_json(value, list, where, error=QuantError)
    if len(value) != 2:
        raise QuantError(f"{where}: expected [offset, length], got {short_repr(value)}")
    check_json(value, [int], where, error=QuantError)
    offset, length = value
    if offset < 0 or length < 0 or offset + length > body_len:
        raise QuantError(f"{where}: block {short_repr(value)} lies outside the {body_len}-byte payload")
    if length != size:
        raise QuantError(f"{where}: block of {length} bytes, expected {short_repr(size)}")
    if offset != cursor:
        raise QuantError(f"{where}: block starts at byte {offset} of the payload, expected {cursor} (right after the previous one)")
    return offset + length


def _check_activation(act: Any, where: str) -> None:
    check_json(act, _ACTIVATION, where, error=QuantError)
    _check_grid(act, where, _ACT_SCHEMES)
    if not _positive(act["scale"]):
        raise QuantError(f"{where}.scale: expected a positive finite number, got {short_repr(act['scale'])}")
    if not act["qmin"] <= act["zero_point"] <= act["qmax"]:
        raise QuantError(f"{where}.zero_point: expected an integer in [{act['qmin']}, {act['qmax']}], got {short_repr(act['zero_point'])}")


def _positive(value: float) -> bool:
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        return False
    return math.isfinite(number) and number > 0


# ---------------------------------------------------------------- payload decoding


def _decode_term(term: dict[str, Any], body: memoryview, shape: list[int], where: str) -> tuple[Tensor, QParams]:
    """One validated term's codes and parameters; refuses codes or parameters off its grid."""
    count = math.prod(shape)
    off, length = term["codes"]
    codes = unpack_bits(body[off : off + length], term["bits"], count) + term["qmin"]
    if codes.size and int(codes.max()) > term["qmax"]:
        raise QuantError(f"{where}.codes: code {int(codes.max())} is above qmax {term['qmax']}")
    off, length = term["scale"]
    scale = torch.from_numpy(np.frombuffer(body[off : off + length], dtype="<f4").astype(np.float32))
    # > 0 is False for NaN; +inf is what pow2_scale makes of a float32-max weight, so it stays.
    if not bool((scale > 0).all()):
        raise QuantError(f"{where}.scale: every scale must be positive, the payload holds {_first_bad(scale, scale > 0)}")
    if term["zero_point"] is None:
        zero_point = torch.zeros(scale.shape, dtype=torch.int32)
    else:
        off, length = term["zero_point"]
        zero_point = torch.from_numpy(np.frombuffer(body[off : off + length], dtype=_zero_point_dtype(term["bits"])).astype(np.int32))
        inside = (zero_point >= term["qmin"]) & (zero_point <= term["qmax"])
        if not bool(inside.all()):
            raise QuantError(f"{where}.zero_point: {_first_bad(zero_point, inside)} is outside [{term['qmin']}, {term['qmax']}]")
    if term["axis"] is None:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    params = QParams(term["scheme"], term["bits"], scale, zero_point, term["qmin"], term["qmax"], term["axis"])
    return torch.from_numpy(codes).to(params.grid.code_dtype).reshape(shape), params


def _first_bad(values: Tensor, good: Tensor) -> str:
    return repr(values[~good][0].item())


def _decode_state(header: dict[str, Any], body: memoryview) -> dict[str, Tensor]:
    restored = {}
    for i, entry in enumerate(header["entries"]):
        dtype = _DTYPES[entry["dtype"]]
        if entry["kind"] == "quantized":
            where = f"header.entries[{i}].terms"
            parts = tuple(_decode_term(term, body, entry["shape"], f"{where}[{j}]") for j, term in enumerate(entry["terms"]))
            restored[entry["name"]] = dequantize_sum(parts).to(dtype)
        else:
            off, length = entry["data"]
            restored[entry["name"]] = _from_raw(bytes(body[off : off + length]), dtype, entry["shape"])
    return restored


def _activation_params(header: dict[str, Any], model: nn.Module, original: nn.Module) -> dict[str, QParams]:
    layers = dict(model.named_modules())
    params = {}
    for name, a in header["activations"].items():
        if name not in layers:
            raise QuantError(f"header.activations: {short_repr(name)} is not a layer of this {type(original).__name__}")
        params[name] = QParams(a["scheme"], a["bits"], torch.tensor(float(a["scale"]), dtype=torch.float32),
                               torch.tensor(a["zero_point"], dtype=torch.int32), a["qmin"], a["qmax"], None)
    return params


def _check_arch(path: Path, file_arch: dict[str, Any], model_arch: list[list[Any]], model: nn.Module) -> None:
    if file_arch["tensors"] != model_arch:
        raise QuantError(
            f"{path} was written for another architecture ({short_repr(file_arch['class'])}) than "
            f"this {type(model).__name__}: {_mismatch(file_arch['tensors'], model_arch)}"
        )


def _mismatch(file_tensors: list[list[Any]], model_arch: list[list[Any]]) -> str:
    for mine, theirs in zip(model_arch, file_tensors):
        if mine != theirs:
            return f"first difference: file has {short_repr(theirs)}, model has {mine}"
    return f"file has {len(file_tensors)} tensors, model has {len(model_arch)}"


def read_packed_header(path: str | Path) -> dict[str, Any]:
    """Check a packed file's prefix and header without reading its payload; returns the header.

    Cheap (it reads at most the header): a caller can refuse a bad file before doing
    the work that needs the model. :func:`load_packed` repeats these checks and then
    checks the payload and its checksum.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    dict
        The decoded header (``arch``, ``entries``, ``activations``, ``spec``, ...).

    Raises
    ------
    QuantError
        Not a regular file, not a packed file, another format version, or declared
        lengths or a header that do not fit the file.

    Examples
    --------
    See :func:`save_packed`.
    """
    path = Path(path)
    with _open_regular(path) as handle:
        return _read_front(path, handle).header


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
        Not a regular file, not a packed file, a truncated or damaged file (declared
        lengths, header, payload or checksum), or a file written for another
        architecture. No other exception escapes for any file content.

    Examples
    --------
    See :func:`save_packed`.
    """
    path = Path(path)
    if sys.byteorder != "little":
        raise QuantError("packed files are little-endian; this machine is big-endian")
    folded = fold_batchnorm(model)
    state = folded.state_dict()
    with _open_regular(path) as handle:
        front = _read_front(path, handle)
        # The architecture is checked before the payload is read: the header's blocks,
        # validated against it, then bound the payload by the model's own size.
        _check_arch(path, front.header["arch"], _fingerprint(state), model)
        with _damaged(path):
            act = _activation_params(front.header, folded, model)
        body = _read_body(path, handle, front)
    with _damaged(path):
        restored = _decode_state(front.header, body)
    device = {name: t.device for name, t in state.items()}
    folded.load_state_dict({name: t.to(device[name]) for name, t in restored.items()}, strict=True)
    activations.attach(folded, act)
    return folded
