"""hiercluster.report.trees: the "Class trees" section, from a hand-made run.json and result rows.

Two trees, ``fc_weights`` and ``confusion``, cut at k = 3 and 2 (k = 4 and 1 are shared).
Drops are multiples of 1/8 pp and the tolerance 1 pp. The test cells follow the
headline's rule (the fewest bits within tolerance, the lowest drop at that width,
"confident" when the interval's upper end is within tolerance); every expected cell is
written out by hand.
"""

from __future__ import annotations

import json

from hiercluster.evaluation.selection import SELECTION_RULE, choose_trees
from hiercluster.report.trees import trees_section

TOL = 1.0
TREES = ["fc_weights", "confusion"]
LEVELS = {
    "k=4": {"k": 4, "kind": "learned"},
    "k=3 fc_weights": {"k": 3, "kind": "learned", "tree": "fc_weights"},
    "k=3 confusion": {"k": 3, "kind": "learned", "tree": "confusion"},
    "k=2 fc_weights": {"k": 2, "kind": "learned", "tree": "fc_weights"},
    "k=2 confusion": {"k": 2, "kind": "learned", "tree": "confusion"},
    "k=1": {"k": 1, "kind": "learned"},
    "reference": {"k": 2, "kind": "reference"},
}
# Held-out answers (what choose_trees gives): k=3 confusion on fewer bits; k=2 neither in
# tolerance, fc_weights on the lower drop.
BY_K = {
    "3": {"tree": "confusion", "candidates": {
        "fc_weights": {"bits": 3, "drop": 0.5, "tag": "s3"}, "confusion": {"bits": 2, "drop": 0.75, "tag": "s2"}}},
    "2": {"tree": "fc_weights", "candidates": {
        "fc_weights": {"bits": None, "drop": 1.25, "tag": "s4"}, "confusion": {"bits": None, "drop": 1.5, "tag": "s4"}}},
}
HEAD = ("| k | chosen | fc_weights: held-out bits / drop pp | confusion: held-out bits / drop pp |"
        " fc_weights: test fewest bits, drop pp [95% CI] | confusion: test fewest bits, drop pp [95% CI] |")
FIXED_HEAD = "| k | chosen | fc_weights: test fewest bits, drop pp [95% CI] | confusion: test fewest bits, drop pp [95% CI] |"
TEST_K3 = " 3 (confident), +0.50 [+0.25, +0.75] | ≤ 2 (lowest tested) (borderline), +0.75 [+0.50, +1.25] |"
TEST_K2 = " none in grid | 4, +0.25 |"


def _info(selection: dict | None = None, embedding=TREES, **extra) -> dict:
    info = {"tolerance": TOL, "hierarchy": {"embedding": embedding, "linkage": "ward", "metric": "cosine"},
            "levels": LEVELS, **extra}
    if selection is not None:
        info["tree_selection"] = selection
    return info


def _auto(by_k: dict = BY_K) -> dict:
    return {"rule": SELECTION_RULE, "split": "train", "holdout": 5000, "tolerance": TOL, "by_k": by_k}


def _row(level: str, bits: int, drop: float, lo: float | None = None, hi: float | None = None) -> dict:
    row = {"level": level, "k": LEVELS[level]["k"], "grouping": "learned", "acc_float": 0.9, "bits": bits,
           "drop": drop, "tag": f"{level}-{bits}b"}
    if hi is not None:
        row |= {"drop_lo": lo, "drop_hi": hi}
    return row


def _rows() -> list[dict]:
    return [
        # fc_weights k=3: 2 bits fail; 3 bits pass with an interval inside tolerance; 4 bits lower but wider.
        _row("k=3 fc_weights", 2, 1.5, 1.0, 2.0), _row("k=3 fc_weights", 3, 0.5, 0.25, 0.75),
        _row("k=3 fc_weights", 4, 0.25, 0.0, 0.5),
        # confusion k=3: two specs at 2 bits, the lower drop reported; its interval ends past 1 pp.
        _row("k=3 confusion", 2, 0.875, 0.5, 1.25), _row("k=3 confusion", 2, 0.75, 0.5, 1.25),
        # fc_weights k=2: never within tolerance on the test split.
        _row("k=2 fc_weights", 2, 3.0), _row("k=2 fc_weights", 4, 2.0),
        # confusion k=2: 4 bits, no interval (no bootstrap).
        _row("k=2 confusion", 2, 1.5), _row("k=2 confusion", 4, 0.25),
        # Levels of no tree: not in this section (a 1-bit pass here must not show up anywhere).
        _row("k=4", 1, 0.0), _row("k=1", 1, 0.0), _row("reference", 1, 0.0),
    ]


def _table(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("|")]


def test_a_run_of_one_tree_has_no_section() -> None:
    assert trees_section(_info(), _rows()) == []
    assert trees_section(_info(_auto(), embedding="fc_weights"), _rows()) == []  # older run.json: a string
    assert trees_section(_info(_auto(), embedding=["fc_weights"]), _rows()) == []


def test_auto_selection_shows_the_choice_held_out_and_test_cells_per_k() -> None:
    lines = trees_section(_info(_auto()), _rows())
    assert lines[0] == "## Class trees: which one answers each level"
    assert _table(lines) == [
        HEAD,
        "|---|---|---|---|---|---|",
        "| 3 | `confusion` | 3 / +0.50 | 2 / +0.75 |" + TEST_K3,
        "| 2 | `fc_weights` | none / +1.25 | none / +1.50 |" + TEST_K2,
    ]
    text = "\n".join(lines)
    assert "5,000 images of the `train` split" in text
    assert "never the evaluation split" in text and SELECTION_RULE in text
    assert lines[-1] == ""


def test_the_test_cells_come_from_the_rows_not_the_held_out_answers() -> None:
    # Better test figures for fc_weights at k=2 change its test cell and nothing else.
    rows = _rows() + [_row("k=2 fc_weights", 3, 0.25, 0.0, 0.5)]
    k2 = [line for line in trees_section(_info(_auto()), rows) if line.startswith("| 2 ")]
    assert k2 == ["| 2 | `fc_weights` | none / +1.25 | none / +1.50 | 3 (confident), +0.25 [0.00, +0.50] | 4, +0.25 |"]


def test_a_missing_candidate_or_level_shows_a_dash() -> None:
    by_k = {"3": {"tree": "confusion", "candidates": {"confusion": {"bits": 2, "drop": 0.75, "tag": "s2"}}}}
    rows = [r for r in _rows() if r["level"] != "k=3 fc_weights"]
    assert _table(trees_section(_info(_auto(by_k)), rows))[2] == (
        "| 3 | `confusion` | - | 2 / +0.75 | - | ≤ 2 (lowest tested) (borderline), +0.75 [+0.50, +1.25] |"
    )


def test_a_fixed_select_has_no_held_out_columns() -> None:
    fixed = {"rule": "hierarchy.select: confusion",
             "by_k": {"3": {"tree": "confusion", "candidates": {}}, "2": {"tree": "confusion", "candidates": {}}}}
    lines = trees_section(_info(fixed), _rows())
    assert _table(lines) == [
        FIXED_HEAD,
        "|---|---|---|---|",
        "| 3 | `confusion` |" + TEST_K3,
        "| 2 | `confusion` |" + TEST_K2,
    ]
    assert "Trees built: `fc_weights`, `confusion`; hierarchy.select: confusion answers every k." in lines
    assert "held-out" not in "\n".join(lines)


def test_each_trees_reference_comparison_is_listed() -> None:
    info = _info(_auto(), reference_comparison_by_tree={
        "fc_weights": {"k": 2, "ari": 0.5, "nmi": 0.25}, "confusion": {"k": 2, "ari": 1.0, "nmi": 1.0}})
    assert ("Each tree against the reference grouping (cut at its k): `fc_weights` ARI 0.500, NMI 0.250; "
            "`confusion` ARI 1.000, NMI 1.000.") in trees_section(info, _rows())


def test_choose_trees_answer_read_back_from_json_fills_the_table() -> None:
    # The held-out figures of BY_K, chosen by choose_trees and stored as run.json stores them.
    held = [{"k": 3, "tree": "fc_weights", "bits": 2, "drop": 1.5, "tag": "s2"},
            {"k": 3, "tree": "fc_weights", "bits": 3, "drop": 0.5, "tag": "s3"},
            {"k": 3, "tree": "confusion", "bits": 2, "drop": 0.75, "tag": "s2"},
            {"k": 2, "tree": "fc_weights", "bits": 4, "drop": 1.25, "tag": "s4"},
            {"k": 2, "tree": "confusion", "bits": 4, "drop": 1.5, "tag": "s4"}]
    chosen = choose_trees(held, TREES, TOL)
    by_k = json.loads(json.dumps({str(k): c for k, c in chosen.items()}))
    assert by_k == BY_K
    assert _table(trees_section(_info(_auto(by_k)), _rows()))[2:] == [
        "| 3 | `confusion` | 3 / +0.50 | 2 / +0.75 |" + TEST_K3,
        "| 2 | `fc_weights` | none / +1.25 | none / +1.50 |" + TEST_K2,
    ]
