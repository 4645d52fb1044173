"""hiercluster.report.rows: number formatting and the helpers that pick and label a report's rows."""

import doctest

import pytest

import hiercluster.report.rows as rows
from hiercluster.report.rows import fewest_bits_cell, fmt_number, subset_note


def test_docstring_examples():
    assert doctest.testmod(rows).failed == 0


@pytest.mark.parametrize("value, digits, signed, text", [
    (-0.001, 2, False, "0.00"), (-0.004, 2, True, "0.00"), (0.0, 1, True, "0.0"), (-0.04, 1, True, "0.0"),
    (-0.05001, 1, True, "-0.1"), (0.37, 2, True, "+0.37"), (-1.25, 2, False, "-1.25"), (12.0, 1, False, "12.0"),
])
def test_fmt_number_never_prints_a_negative_zero(value, digits, signed, text):
    assert fmt_number(value, digits, signed) == text


def test_fewest_bits_says_lowest_tested_only_at_the_grids_lowest_width():
    assert fewest_bits_cell(3, 3) == "≤ 3 (lowest tested)"
    assert fewest_bits_cell(4, 3) == "4"
    assert fewest_bits_cell(2, None) == "2"


def test_subset_note_names_what_is_left_out():
    shown = [{"spec_key": "a", "tag": "x-4b+full", "plan": "full", "bits": 4}]
    hidden = [{"spec_key": k, "tag": f"x-{b}b+first8", "plan": "first8", "bits": b} for k, b in (("b", 4), ("c", 2))]
    assert subset_note(shown, hidden, "mixed precision") == (
        "Not shown: 2 specs with mixed precision (plan first8); results.csv has every spec."
    )
    assert subset_note(shown, [], "mixed precision") == ""
    # Nothing but the tag tells them apart: the tags are listed.
    same = [{"spec_key": "d", "tag": "x-2b+full", "plan": "full", "bits": 2}]
    assert "(`x-2b+full`)" in subset_note(shown, same, "mixed precision")
