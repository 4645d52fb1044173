"""QuantSpec: defaults, validation messages, dict round trip, tags."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quant import QuantSpec
from quant_testing import specs


def test_defaults():
    spec = QuantSpec()
    assert (spec.scheme, spec.bits, spec.granularity, spec.clipping) == ("asymmetric", 8, "per_channel", "minmax")
    assert spec.narrow_range is True and spec.pow2_scale is False and spec.percentile == 99.99
    assert spec.tag == "asymmetric-8b-minmax-per_channel"


def test_tag_examples():
    assert QuantSpec(bits=4, clipping="mse").tag == "asymmetric-4b-mse-per_channel"
    assert QuantSpec(scheme="symmetric", bits=3, narrow_range=False, granularity="per_tensor").tag == (
        "symmetric-3b-minmax-per_tensor-fullrange"
    )
    assert QuantSpec(scheme="pow2", bits=5, pow2_scale=True, clipping="percentile", percentile=99.9).tag == (
        "pow2-5b-percentile-per_channel-pow2scale-p99.9"
    )


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("scheme", "log2", "'asymmetric', 'symmetric', 'pow2'"),
        ("bits", 1, "[2, 16]"),
        ("bits", 17, "[2, 16]"),
        ("bits", 4.0, "[2, 16]"),
        ("bits", True, "[2, 16]"),
        ("granularity", "per_row", "'per_tensor', 'per_channel'"),
        ("clipping", "kl", "'minmax', 'mse', 'percentile'"),
        ("narrow_range", "yes", "True or False"),
        ("pow2_scale", 1, "True or False"),
        ("percentile", 0, "(0, 100]"),
        ("percentile", 100.5, "(0, 100]"),
        ("percentile", "99", "(0, 100]"),
    ],
)
def test_invalid_field_names_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ValueError) as info:
        QuantSpec(**{field: value})
    message = str(info.value)
    assert f"QuantSpec.{field}={value!r}" in message
    assert allowed in message


def test_options_that_do_not_apply_are_stored_at_their_defaults():
    # A config may set narrow_range / pow2_scale / percentile once for a whole grid of schemes.
    assert QuantSpec(scheme="asymmetric", narrow_range=False, pow2_scale=True, percentile=90) == QuantSpec()
    assert QuantSpec(scheme="symmetric", pow2_scale=True).pow2_scale is False
    assert QuantSpec(scheme="symmetric", narrow_range=False).narrow_range is False
    assert QuantSpec(scheme="pow2", pow2_scale=True, narrow_range=False).narrow_range is True
    assert QuantSpec(clipping="percentile", percentile=90).percentile == 90.0
    with pytest.raises(ValueError, match="narrow_range"):  # still validated
        QuantSpec(scheme="asymmetric", narrow_range="no")


def test_pow2_is_limited_to_8_bits():
    with pytest.raises(ValueError, match=r"bits=9 is invalid for scheme='pow2'.*\[2, 8\]"):
        QuantSpec(scheme="pow2", bits=9)


def test_percentile_100_is_allowed_and_normalized_to_float():
    assert QuantSpec(clipping="percentile", percentile=100).percentile == 100.0
    assert QuantSpec(percentile=99) == QuantSpec(percentile=99.0)


def test_from_dict_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ValueError) as info:
        QuantSpec.from_dict({"bits": 4, "sheme": "pow2"})
    message = str(info.value)
    assert "'sheme'" in message
    for key in ("scheme", "bits", "granularity", "clipping", "narrow_range", "pow2_scale", "percentile"):
        assert key in message


def test_from_dict_missing_keys_take_defaults_and_values_are_validated():
    assert QuantSpec.from_dict({"bits": 3}) == QuantSpec(bits=3)
    with pytest.raises(ValueError, match="bits"):
        QuantSpec.from_dict({"bits": 0})
    with pytest.raises(ValueError, match="mapping"):
        QuantSpec.from_dict([("bits", 3)])


def test_frozen():
    with pytest.raises(AttributeError):
        QuantSpec().bits = 4


def test_replace_validates():
    assert QuantSpec(bits=4).replace(bits=6) == QuantSpec(bits=6)
    with pytest.raises(ValueError, match="bits"):
        QuantSpec().replace(bits=40)


@settings(max_examples=60, deadline=None)
@given(specs(max_bits=16))
def test_dict_round_trip(spec):
    data = spec.to_dict()
    assert all(isinstance(v, (str, int, float, bool)) for v in data.values())
    assert QuantSpec.from_dict(data) == spec


@settings(max_examples=60, deadline=None)
@given(specs(max_bits=16), specs(max_bits=16))
def test_tag_identifies_the_spec(a, b):
    # Specs that quantize differently must carry different labels.
    if a != b:
        assert a.tag != b.tag
    else:
        assert a.tag == b.tag


@given(st.sampled_from(["asymmetric", "symmetric", "pow2"]))
def test_tag_is_stable(scheme):
    assert QuantSpec(scheme=scheme, bits=4).tag == QuantSpec(scheme=scheme, bits=4).tag == f"{scheme}-4b-minmax-per_channel"
