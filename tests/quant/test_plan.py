"""QuantPlan: validation, precedence of the per-layer rules, residual layer choice."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quant import QuantPlan


def test_defaults_change_nothing():
    plan = QuantPlan()
    assert plan.bits_for("conv1", 4, first=True, last=False) == 4
    assert plan.bits_for("fc", 4, first=False, last=True) == 4
    assert plan.residual_layers({"a": 1.0, "b": 2.0}) == set()


def test_precedence_skip_then_layer_bits_then_first_last():
    plan = QuantPlan(first_layer_bits=8, last_layer_bits=6, skip=("fc",), layer_bits={"layer1.*": 3, "conv1": 5})
    assert plan.bits_for("fc", 4, first=False, last=True) is None  # skip beats last_layer_bits
    assert plan.bits_for("conv1", 4, first=True, last=False) == 5  # explicit pattern beats first_layer_bits
    assert plan.bits_for("layer1.0.conv2", 4, first=False, last=False) == 3
    assert plan.bits_for("layer2.0.conv2", 4, first=False, last=False) == 4
    assert plan.bits_for("head", 4, first=False, last=True) == 6


def test_layer_bits_first_matching_pattern_wins():
    plan = QuantPlan(layer_bits={"layer1.0.*": 2, "layer1.*": 7})
    assert plan.bits_for("layer1.0.conv1", 4, first=False, last=False) == 2
    assert plan.bits_for("layer1.1.conv1", 4, first=False, last=False) == 7


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"first_layer_bits": 1}, "first_layer_bits"),
        ({"last_layer_bits": 20}, "last_layer_bits"),
        ({"skip": "fc"}, "skip"),
        ({"skip": [3]}, "skip"),
        ({"layer_bits": {"fc": 1}}, "layer_bits"),
        ({"layer_bits": 5}, "layer_bits"),
        ({"residual_fraction": 1.5}, "residual_fraction"),
        ({"residual_sqnr_db": math.nan}, "residual_sqnr_db"),
        ({"name": ""}, "name"),
    ],
)
def test_invalid_plans_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantPlan(**kwargs)


def test_dict_round_trip_and_unknown_key():
    plan = QuantPlan(name="p", first_layer_bits=8, skip=["fc"], layer_bits={"a*": 3}, residual_sqnr_db=10, residual_fraction=0.25)
    data = plan.to_dict()
    assert data["layer_bits"] == {"a*": 3} and data["skip"] == ["fc"]
    assert QuantPlan.from_dict(data) == plan
    with pytest.raises(ValueError, match="'skp'.*valid keys"):
        QuantPlan.from_dict({"skp": ["fc"]})


def test_unmatched_patterns():
    plan = QuantPlan(skip=("fc", "nope*"), layer_bits={"conv?": 3, "zzz": 2})
    assert plan.unmatched_patterns(["conv1", "fc"]) == ["nope*", "zzz"]


def test_residual_by_threshold_and_fraction():
    sqnr = {"a": 5.0, "b": 20.0, "c": 1.0, "d": 12.0}
    assert QuantPlan(residual_sqnr_db=10).residual_layers(sqnr) == {"a", "c"}
    assert QuantPlan(residual_fraction=0.5).residual_layers(sqnr) == {"a", "c"}
    assert QuantPlan(residual_fraction=0.1).residual_layers(sqnr) == {"c"}  # ceil: at least one
    assert QuantPlan(residual_fraction=0.0).residual_layers(sqnr) == set()
    assert QuantPlan(residual_sqnr_db=3, residual_fraction=0.5).residual_layers(sqnr) == {"a", "c"}  # union


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.text("abcdef", min_size=1, max_size=3), st.floats(-50, 80), min_size=1, max_size=12), st.floats(0, 1))
def test_residual_fraction_takes_the_worst(sqnr, fraction):
    chosen = QuantPlan(residual_fraction=fraction).residual_layers(sqnr)
    assert len(chosen) == math.ceil(fraction * len(sqnr) - 1e-9)
    if chosen and len(chosen) < len(sqnr):
        assert max(sqnr[n] for n in chosen) <= min(sqnr[n] for n in sqnr if n not in chosen)
