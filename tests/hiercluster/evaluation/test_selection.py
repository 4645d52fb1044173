"""hiercluster.evaluation.selection: the tree chosen per k on held-out drops, and the levels the headline keeps.

Every drop is a multiple of 1/8 pp and the tolerance 1 pp, so each comparison with the
tolerance is exact in floating point. The expected choices are worked out by hand from
the rule: fewer bits win, then the lower held-out drop, then the tree listed first; a
tree within tolerance at no width ranks last, by its lowest drop.
"""

from __future__ import annotations

import doctest
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import hiercluster.evaluation.selection as selection
from hiercluster.errors import HierclusterError
from hiercluster.evaluation.selection import choose_trees, headline_info, headline_rows, selected_level_names

TOL = 1.0
NAN = float("nan")


def _row(tree: str, bits: int, drop: float, k: int = 5, tag: str | None = None) -> dict:
    """One held-out row: a spec of ``bits`` bits whose drop at tree ``tree``'s cut at k is ``drop`` pp."""
    return {"k": k, "tree": tree, "bits": bits, "drop": drop, "tag": tag or f"{tree}-{bits}b-{drop}"}


def _choice(rows: list[dict], trees: list[str], k: int = 5) -> str:
    return choose_trees(rows, trees, TOL)[k]["tree"]


def test_the_docstring_examples_hold() -> None:
    assert doctest.testmod(selection).failed == 0


# --- choose_trees: the rule, one clause at a time --------------------------------------------


def test_fewer_bits_win_over_a_lower_drop() -> None:
    # a: 2 bits fail (1.5 > 1), so 3 bits at 0.25; b: 2 bits at 0.875. b has the fewer bits.
    rows = [_row("a", 2, 1.5), _row("a", 3, 0.25), _row("b", 2, 0.875)]
    chosen = choose_trees(rows, ["a", "b"], TOL)[5]
    assert chosen["tree"] == "b"
    assert chosen["candidates"] == {
        "a": {"bits": 3, "drop": 0.25, "tag": "a-3b-0.25"},
        "b": {"bits": 2, "drop": 0.875, "tag": "b-2b-0.875"},
    }


def test_equal_bits_go_to_the_lower_drop_at_that_width() -> None:
    # a has two specs at 2 bits: its candidate is the lower of them (0.5), still above b's 0.25.
    rows = [_row("a", 2, 0.75, tag="a1"), _row("a", 2, 0.5, tag="a2"), _row("b", 2, 0.25, tag="b1"),
            _row("b", 4, 0.0, tag="b2")]
    chosen = choose_trees(rows, ["a", "b"], TOL)[5]
    assert chosen["tree"] == "b"
    assert chosen["candidates"]["a"] == {"bits": 2, "drop": 0.5, "tag": "a2"}
    # b's 4-bit spec has the lowest drop of all, but the width is fixed first: 2 bits, 0.25.
    assert chosen["candidates"]["b"] == {"bits": 2, "drop": 0.25, "tag": "b1"}


@pytest.mark.parametrize("order", [["a", "b"], ["b", "a"]])
def test_a_full_tie_goes_to_the_tree_listed_first(order: list[str]) -> None:
    rows = [_row("a", 3, 0.5), _row("b", 3, 0.5), _row("a", 2, 1.25), _row("b", 2, 1.25)]
    assert _choice(rows, order) == order[0]


def test_a_tree_never_within_tolerance_ranks_after_one_that_is() -> None:
    # b is listed first and has rows at fewer bits, but none within tolerance; a passes at 8 bits.
    rows = [_row("b", 2, 1.5), _row("b", 8, 1.125), _row("a", 2, 4.0), _row("a", 8, 1.0)]
    chosen = choose_trees(rows, ["b", "a"], TOL)[5]
    assert chosen["tree"] == "a"
    assert chosen["candidates"]["a"]["bits"] == 8 and chosen["candidates"]["a"]["drop"] == 1.0  # 1.0 <= 1.0 passes
    assert chosen["candidates"]["b"] == {"bits": None, "drop": 1.125, "tag": "b-8b-1.125"}


def test_among_trees_never_within_tolerance_the_lower_minimum_drop_wins() -> None:
    # a's lowest drop 1.5 (4 bits), b's 1.25 (8 bits): b, though a is listed first and a's 2-bit drop is lower.
    rows = [_row("a", 2, 1.75), _row("a", 4, 1.5), _row("b", 2, 3.0), _row("b", 8, 1.25)]
    chosen = choose_trees(rows, ["a", "b"], TOL)[5]
    assert chosen["tree"] == "b"
    assert chosen["candidates"] == {
        "a": {"bits": None, "drop": 1.5, "tag": "a-4b-1.5"},
        "b": {"bits": None, "drop": 1.25, "tag": "b-8b-1.25"},
    }


def test_nan_drops_never_win() -> None:
    # a's only drop is NaN: it ranks after b, which never reaches tolerance either.
    chosen = choose_trees([_row("a", 2, NAN), _row("b", 2, 7.0)], ["a", "b"], TOL)[5]
    assert chosen["tree"] == "b"
    assert chosen["candidates"]["a"]["bits"] is None and math.isnan(chosen["candidates"]["a"]["drop"])
    # A NaN row beside a passing one is skipped, not allowed to spoil the tree: a wins on its 4-bit 0.5.
    rows = [_row("a", 2, NAN), _row("a", 4, 0.5), _row("b", 2, NAN), _row("b", 4, 0.75)]
    chosen = choose_trees(rows, ["a", "b"], TOL)[5]
    assert chosen["tree"] == "a"
    assert chosen["candidates"]["a"] == {"bits": 4, "drop": 0.5, "tag": "a-4b-0.5"}
    # NaN beside a failing finite drop: the finite one is the tree's lowest drop.
    chosen = choose_trees([_row("a", 2, NAN), _row("a", 4, 2.0), _row("b", 2, 3.0)], ["b", "a"], TOL)[5]
    assert chosen["tree"] == "a" and chosen["candidates"]["a"]["drop"] == 2.0


def test_all_nan_trees_tie_and_go_to_the_first_listed() -> None:
    rows = [_row("a", 2, NAN), _row("b", 2, NAN)]
    assert _choice(rows, ["b", "a"]) == "b"
    assert _choice(rows, ["a", "b"]) == "a"


@pytest.mark.parametrize("bad", [{"tree": "c"}, {"tree": None}, {}])
def test_a_row_of_an_unknown_tree_is_refused(bad: dict) -> None:
    row = {"k": 5, "bits": 2, "drop": 0.5, **bad}
    with pytest.raises(HierclusterError, match=r"held-out row 1 names tree"):
        choose_trees([_row("a", 2, 0.5), row], ["a", "b"], TOL)


def test_k_comes_out_descending_and_each_k_is_chosen_on_its_own_rows() -> None:
    rows = [_row("a", 2, 0.5, k=2), _row("b", 2, 0.25, k=2),
            _row("a", 2, 0.25, k=7), _row("b", 2, 0.5, k=7),
            _row("b", 3, 0.5, k=4)]  # at k=4 only b has rows: a is no candidate there
    chosen = choose_trees(rows, ["a", "b"], TOL)
    assert list(chosen) == [7, 4, 2]
    assert {k: c["tree"] for k, c in chosen.items()} == {7: "a", 4: "b", 2: "b"}
    assert list(chosen[4]["candidates"]) == ["b"]


def test_candidates_are_listed_in_tree_order_and_the_tolerance_is_used() -> None:
    rows = [_row("b", 2, 0.75), _row("a", 2, 1.5), _row("a", 4, 0.25)]
    chosen = choose_trees(rows, ["a", "b"], TOL)[5]
    assert list(chosen["candidates"]) == ["a", "b"]
    assert chosen["tree"] == "b"
    # At a 2 pp tolerance a also passes at 2 bits, with the higher drop: b still wins on drop.
    wide = choose_trees(rows, ["a", "b"], 2.0)[5]
    assert wide["candidates"]["a"] == {"bits": 2, "drop": 1.5, "tag": "a-2b-1.5"}
    # At 0.5 pp only a (4 bits, 0.25) passes.
    assert choose_trees(rows, ["a", "b"], 0.5)[5]["tree"] == "a"


def test_no_rows_choose_nothing() -> None:
    assert choose_trees([], ["a", "b"], TOL) == {}


# --- choose_trees: a property against a plain reference ----------------------------------------

TREES = ["t0", "t1", "t2"]
DROPS = [i / 4 for i in range(13)] + [NAN]  # 0 .. 3 pp in quarter steps, and NaN


def _reference_candidate(rows: list[dict], tolerance: float) -> tuple[float, float]:
    """(bits, drop) of one tree at one k, straight from the rule; inf stands for "none" and for NaN."""
    passing = [r for r in rows if r["drop"] <= tolerance]  # NaN compares False
    if passing:
        bits = min(r["bits"] for r in passing)
        return bits, min(r["drop"] for r in passing if r["bits"] == bits)
    finite = [r["drop"] for r in rows if not math.isnan(r["drop"])]
    return math.inf, min(finite, default=math.inf)


row_strategy = st.fixed_dictionaries(
    {"k": st.sampled_from([2, 3]), "tree": st.sampled_from(TREES),
     "bits": st.sampled_from([2, 3, 4, 8]), "drop": st.sampled_from(DROPS)}
)


@given(rows=st.lists(row_strategy, min_size=1, max_size=12), tolerance=st.sampled_from([0.5, 1.0, 1.5]))
def test_the_chosen_tree_has_the_least_bits_then_drop_among_candidates(rows: list[dict], tolerance: float) -> None:
    chosen = choose_trees(rows, TREES, tolerance)
    assert list(chosen) == sorted({r["k"] for r in rows}, reverse=True)
    for k, choice in chosen.items():
        by_tree = {t: [r for r in rows if r["k"] == k and r["tree"] == t] for t in TREES}
        ref = {t: _reference_candidate(rs, tolerance) for t, rs in by_tree.items() if rs}
        assert list(choice["candidates"]) == list(ref)
        for t, (bits, drop) in ref.items():
            got = choice["candidates"][t]
            assert (math.inf if got["bits"] is None else got["bits"]) == bits
            assert (math.inf if math.isnan(got["drop"]) else got["drop"]) == drop
        # The first tree (in the listed order) whose (bits, drop) is lexicographically least.
        best = min(ref.values())
        assert choice["tree"] == next(t for t in TREES if t in ref and ref[t] == best)
    # The order of the rows plays no part in the choice.
    assert {k: c["tree"] for k, c in choose_trees(rows[::-1], TREES, tolerance).items()} == {
        k: c["tree"] for k, c in chosen.items()
    }


# --- the levels the headline reports ----------------------------------------------------------

LEVELS = {
    "k=4": {"k": 4, "kind": "learned"},
    "k=3 a": {"k": 3, "kind": "learned", "tree": "a"},
    "k=3 b": {"k": 3, "kind": "learned", "tree": "b"},
    "k=2 a": {"k": 2, "kind": "learned", "tree": "a"},
    "k=2 b": {"k": 2, "kind": "learned", "tree": "b"},
    "k=1": {"k": 1, "kind": "learned", "tree": ""},
    "reference": {"k": 2, "kind": "reference"},  # k=2 like the tree cuts: kept whatever k=2 chose
}


def _info(by_k: dict[int, str] | None) -> dict:
    info = {"tolerance": TOL, "levels": LEVELS, "float_accuracy": 0.5}
    if by_k is not None:  # run.json's form: string keys, as JSON writes them
        info["tree_selection"] = {"rule": "r", "by_k": {str(k): {"tree": t, "candidates": {}} for k, t in by_k.items()}}
    return info


def _rows() -> list[dict]:
    return [{"level": name, "k": lv["k"], "bits": b} for b in (2, 4) for name, lv in LEVELS.items()]


def test_selected_levels_keep_the_untreed_ones_and_each_ks_chosen_cut() -> None:
    assert selected_level_names(LEVELS, {3: "b", 2: "a"}) == ["k=4", "k=3 b", "k=2 a", "k=1", "reference"]
    assert selected_level_names(LEVELS, {3: "a", 2: "a"}) == ["k=4", "k=3 a", "k=2 a", "k=1", "reference"]


def test_a_tree_level_whose_k_has_no_choice_is_left_out() -> None:
    assert selected_level_names(LEVELS, {3: "b"}) == ["k=4", "k=3 b", "k=1", "reference"]
    assert selected_level_names(LEVELS, {}) == ["k=4", "k=1", "reference"]


def test_headline_rows_keep_the_selected_levels_in_order() -> None:
    rows = _rows()
    kept = headline_rows(_info({3: "b", 2: "a"}), rows)
    assert [(r["level"], r["bits"]) for r in kept] == [
        (name, b) for b in (2, 4) for name in ("k=4", "k=3 b", "k=2 a", "k=1", "reference")
    ]
    assert len(rows) == 14  # the input is not filtered in place


def test_headline_info_keeps_only_the_selected_levels_and_every_other_key() -> None:
    info = _info({3: "a", 2: "b"})
    shown = headline_info(info)
    assert list(shown["levels"]) == ["k=4", "k=3 a", "k=2 b", "k=1", "reference"]
    assert shown["levels"]["k=2 b"] == LEVELS["k=2 b"]
    assert {key: v for key, v in shown.items() if key != "levels"} == {key: v for key, v in info.items() if key != "levels"}
    assert list(info["levels"]) == list(LEVELS)  # run.json itself is untouched


@pytest.mark.parametrize("selection_value", ["absent", None, {}])
def test_a_run_without_a_tree_selection_reports_everything(selection_value) -> None:
    info = _info(None)
    if selection_value != "absent":
        info["tree_selection"] = selection_value
    rows = _rows()
    assert headline_rows(info, rows) == rows
    assert headline_info(info) == info
