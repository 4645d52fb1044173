"""QuantPlan: validation, precedence of the per-layer rules, residual layer choice."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quant import QuantError, QuantPlan, QuantSpec


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
        ({"first_layer_bits": 0}, "first_layer_bits"),
        ({"last_layer_bits": 20}, "last_layer_bits"),
        ({"skip": "fc"}, "skip"),
        ({"skip": [3]}, "skip"),
        ({"layer_bits": {"fc": 0}}, "layer_bits"),
        ({"layer_bits": 5}, "layer_bits"),
        ({"residual_fraction": 1.5}, "residual_fraction"),
        ({"residual_sqnr_db": math.nan}, "residual_sqnr_db"),
        ({"name": ""}, "name"),
    ],
)
def test_invalid_plans_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantPlan(**kwargs)


def test_check_against_a_spec_names_the_plan_the_fields_and_the_allowed_range():
    plan = QuantPlan(name="p", first_layer_bits=12, last_layer_bits=8, layer_bits={"conv*": 10, "fc": 3})
    plan.check(QuantSpec(scheme="asymmetric"))  # 2..16: fine
    plan.check(QuantSpec(scheme="symmetric", bits=2))
    with pytest.raises(QuantError) as info:
        plan.check(QuantSpec(scheme="pow2"))
    assert str(info.value) == "plan 'p': first_layer_bits=12, layer_bits['conv*']=10, but scheme 'pow2' allows 2..8 bits"
    assert isinstance(info.value, ValueError)  # callers that catch ValueError still do


def test_check_passes_for_every_width_the_scheme_allows_and_a_default_plan():
    QuantPlan().check(QuantSpec(scheme="pow2", bits=2))
    for bits in range(2, 9):
        QuantPlan(first_layer_bits=bits, last_layer_bits=bits, layer_bits={"x": bits}).check(QuantSpec(scheme="pow2"))
    with pytest.raises(QuantError, match=r"last_layer_bits=9, but scheme 'pow2' allows 2\.\.8 bits"):
        QuantPlan(last_layer_bits=9).check(QuantSpec(scheme="pow2"))
    with pytest.raises(TypeError, match="QuantSpec"):
        QuantPlan().check("pow2")


def test_rule_for_names_the_deciding_field():
    plan = QuantPlan(first_layer_bits=8, last_layer_bits=6, skip=("fc",), layer_bits={"layer1.*": 3})
    assert plan.rule_for("fc", 4, first=False, last=True) == (None, "skip")
    assert plan.rule_for("layer1.conv", 4, first=True, last=False) == (3, "layer_bits['layer1.*']")
    assert plan.rule_for("conv1", 4, first=True, last=False) == (8, "first_layer_bits")
    assert plan.rule_for("head", 4, first=False, last=True) == (6, "last_layer_bits")
    assert plan.rule_for("conv2", 4, first=False, last=False) == (4, "default")


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
