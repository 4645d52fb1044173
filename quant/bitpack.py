"""Bit packing of unsigned integer codes: ``n`` codes of ``b`` bits take ``ceil(n*b/8)`` bytes.

Codes are written most significant bit first, one after the other with no padding
between them (numpy's ``packbits``/``unpackbits``, vectorized, in bounded chunks).
"""

from __future__ import annotations

import numpy as np

_CHUNK = 1 << 20  # codes per chunk; a multiple of 8, so every chunk ends on a byte boundary


def _word(bits: int) -> np.dtype:
    return np.dtype(">u2") if bits > 8 else np.dtype(np.uint8)


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers ``< 2**bits`` (1 <= bits <= 16) into bytes.

    Examples
    --------
    >>> pack_bits(np.array([1, 2, 3, 0]), 2).hex()
    '6c'
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bits={bits} is invalid; allowed: 1..16")
    values = np.asarray(values).reshape(-1)
    if values.size and (values.min() < 0 or values.max() >= 1 << bits):
        raise ValueError(f"values must lie in [0, {(1 << bits) - 1}] to be packed in {bits} bits")
    word = _word(bits)
    width = word.itemsize * 8
    out = []
    for start in range(0, values.size, _CHUNK):
        chunk = values[start : start + _CHUNK].astype(word)
        planes = np.unpackbits(chunk.view(np.uint8).reshape(-1, word.itemsize), axis=1)
        out.append(np.packbits(planes[:, width - bits :]).tobytes())
    return b"".join(out)


def unpack_bits(data: bytes | memoryview, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` integers (int64) of ``bits`` bits each.

    Examples
    --------
    >>> unpack_bits(bytes.fromhex('6c'), 2, 4)
    array([1, 2, 3, 0])
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bits={bits} is invalid; allowed: 1..16")
    if len(data) != packed_size(count, bits):
        raise ValueError(f"{count} codes of {bits} bits need {packed_size(count, bits)} bytes, got {len(data)}")
    raw = np.frombuffer(data, dtype=np.uint8)
    word = _word(bits)
    width = word.itemsize * 8
    out = np.empty(count, dtype=np.int64)
    chunk_bytes = _CHUNK * bits // 8
    for i, start in enumerate(range(0, count, _CHUNK)):
        n = min(_CHUNK, count - start)
        planes = np.unpackbits(raw[i * chunk_bytes :], count=n * bits).reshape(n, bits)
        full = np.zeros((n, width), dtype=np.uint8)
        full[:, width - bits :] = planes
        out[start : start + n] = np.packbits(full, axis=1).view(word).reshape(n)
    return out


def packed_size(count: int, bits: int) -> int:
    """Bytes taken by ``count`` codes of ``bits`` bits."""
    return (count * bits + 7) // 8
