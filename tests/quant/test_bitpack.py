"""Bit packing: exact sizes, MSB-first layout, round trip."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quant.bitpack import pack_bits, packed_size, unpack_bits


def test_layout_by_hand():
    assert pack_bits(np.array([1, 2, 3, 0]), 2) == bytes([0b01_10_11_00])
    assert pack_bits(np.array([5, 3]), 3) == bytes([0b101_011_00])
    assert pack_bits(np.array([0xABC]), 12) == bytes([0xAB, 0xC0])
    assert pack_bits(np.array([0xFFFF, 1]), 16) == bytes([0xFF, 0xFF, 0x00, 0x01])


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 16), st.integers(0, 3000), st.integers(0, 2**31 - 1))
def test_round_trip_and_size(bits, count, seed):
    values = np.random.default_rng(seed).integers(0, 1 << bits, count)
    data = pack_bits(values, bits)
    assert len(data) == packed_size(count, bits) == (count * bits + 7) // 8
    assert np.array_equal(unpack_bits(data, bits, count), values)


def test_round_trip_across_chunks():
    values = np.random.default_rng(0).integers(0, 8, (1 << 20) + 13)
    assert np.array_equal(unpack_bits(pack_bits(values, 3), 3, values.size), values)


def test_errors():
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_bits(np.array([4]), 2)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_bits(np.array([-1]), 2)
    with pytest.raises(ValueError, match="bits"):
        pack_bits(np.array([0]), 17)
    with pytest.raises(ValueError, match="need 1 bytes"):
        unpack_bits(b"\x00\x00", 2, 4)
