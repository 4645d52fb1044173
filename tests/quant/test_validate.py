"""quant._validate: messages quote user values short, whatever they are."""

from __future__ import annotations

import pytest

from quant._validate import int_in, known_keys, number_in, one_of, short_repr


def test_short_repr_describes_a_huge_integer_by_its_size():
    assert short_repr(16**4000) == "<an integer of about 4,817 digits>"  # repr() would raise (over 4,300 digits)
    assert short_repr(-(10**5000)) == "<an integer of about 5,001 digits>"
    assert short_repr(2**63 - 1) == "9223372036854775807"


def test_short_repr_survives_a_value_whose_repr_fails():
    assert short_repr([1, 16**4000]) == "<a list>"

    class Broken:
        def __repr__(self):
            raise RecursionError

    assert short_repr(Broken()) == "<a Broken>"


def test_short_repr_cuts_strings_and_containers():
    assert short_repr("a" * 1_000_000) == "'" + "a" * 56 + "..."
    assert short_repr(list(range(10**6)), 20) == "[0, 1, 2, 3, 4, 5..."
    assert short_repr("short") == "'short'"


@pytest.mark.parametrize(
    "check, args",
    [
        (one_of, ("QuantSpec", "scheme", "s" * 100_000, ("asymmetric",))),
        (int_in, ("QuantPlan", "layer_bits['conv1']", [4] * 100_000, 2, 16)),
        (int_in, ("QuantSpec", "bits", 16**4000, 2, 16)),
        (number_in, ("QuantSpec", "percentile", "9" * 100_000, 0, 100)),
    ],
)
def test_the_checks_quote_the_value_short(check, args):
    kwargs = {"lo_open": False, "hi_open": False} if check is number_in else {}
    with pytest.raises(ValueError) as err:
        check(*args, **kwargs)
    assert len(str(err.value)) < 200 and "\n" not in str(err.value)


def test_an_unknown_key_of_megabytes_is_quoted_short():
    with pytest.raises(ValueError) as err:
        known_keys("QuantPlan", {"k" * 1_000_000: 1}, ("name",))
    assert str(err.value).startswith("QuantPlan: unknown key 'kkk") and len(str(err.value)) < 200
