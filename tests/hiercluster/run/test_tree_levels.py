"""hiercluster.run.trees: how many images choose the tree, and the levels a run of one or several trees reports.

The trees are fitted on hand-made 2-d embeddings of four classes whose cuts are known:
tree ``near`` pairs classes a+b (closest, merged first) and c+d; tree ``far`` pairs a+c
(closest) and b+d. ``build_trees`` and ``split_for_trees`` read data and are tested with
the pipeline.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster
from scipy.cluster.hierarchy import linkage as scipy_linkage

from hiercluster.hierarchy.clustering import hierarchy_from_embedding
from hiercluster.run.records import Level, level_name
from hiercluster.run.trees import DEFAULT_HOLDOUT, holdout_size, tree_levels

CLASSES = ["a", "b", "c", "d"]
EMBEDDINGS = {
    # angles: a-b 2.9 deg, c-d 16.7 deg, the two pairs about 70 deg apart
    "near": np.array([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.3, 1.0]]),
    # the same points with b and c swapped: a-c first, then b-d
    "far": np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.05], [0.3, 1.0]]),
}
# The cuts, by hand (group ids ordered by smallest member).
CUTS = {
    "near": {3: [0, 0, 1, 2], 2: [0, 0, 1, 1]},
    "far": {3: [0, 1, 0, 2], 2: [0, 1, 0, 1]},
}
REFERENCE = {"left": ["a", "d"], "right": ["b", "c"]}


def _trees(*names: str) -> dict:
    return {name: hierarchy_from_embedding(EMBEDDINGS[name], "fc_weights", CLASSES) for name in names}


def _fcluster_cut(emb: np.ndarray, k: int) -> list[int]:
    """scipy's own cut of ward on the L2-normalized rows (what fc_weights clusters), renumbered canonically."""
    z = scipy_linkage(emb / np.linalg.norm(emb, axis=1, keepdims=True), method="ward", metric="euclidean")
    labels = fcluster(z, k, criterion="maxclust")
    first_seen: dict[int, int] = {}
    return [first_seen.setdefault(int(label), len(first_seen)) for label in labels]


# --- holdout_size ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_split", "expected"),
    [(60_000, 5000), (25_004, 5000), (25_000, 5000), (24_999, 4999), (1_347, 269), (9, 1), (4, 0)],
)
def test_the_default_holdout_is_5000_or_a_fifth_whichever_is_fewer(n_split: int, expected: int) -> None:
    assert DEFAULT_HOLDOUT == 5000
    assert holdout_size(None, n_split) == expected


@pytest.mark.parametrize(("holdout", "n_split"), [(300, 1_347), (7_000, 60_000), (0, 100), (500, 100)])
def test_an_explicit_holdout_passes_through(holdout: int, n_split: int) -> None:
    # Too many (or none) is split_for_trees' error, with the split's size in the message; not this function's.
    assert holdout_size(holdout, n_split) == holdout


# --- tree_levels ----------------------------------------------------------------------------


def test_the_hand_made_cuts_are_scipys() -> None:
    for name, emb in EMBEDDINGS.items():
        for k, cut in CUTS[name].items():
            assert _fcluster_cut(emb, k) == cut


def test_two_trees_share_the_all_and_one_cuts_and_name_the_others() -> None:
    levels = tree_levels([2, 4, 1, 3, 2], _trees("near", "far"), CLASSES, REFERENCE)
    assert list(levels) == ["k=4", "k=3 near", "k=3 far", "k=2 near", "k=2 far", "k=1", "reference"]
    assert [lv.tree for lv in levels.values()] == ["", "near", "far", "near", "far", "", ""]
    assert [lv.k for lv in levels.values()] == [4, 3, 3, 2, 2, 1, 2]
    assert {lv.kind for name, lv in levels.items() if name != "reference"} == {"learned"}
    assert levels["reference"].kind == "reference"
    assert levels["k=4"].assignment == (0, 1, 2, 3) and levels["k=4"].names == tuple(CLASSES)
    assert levels["k=1"].assignment == (0, 0, 0, 0) and levels["k=1"].names == ("a+b+c+d",)


def test_each_trees_levels_are_its_cuts() -> None:
    levels = tree_levels([3, 2], _trees("near", "far"), CLASSES, None)
    for tree in ("near", "far"):
        for k in (3, 2):
            level = levels[level_name(k, tree)]
            assert list(level.assignment) == CUTS[tree][k] == _fcluster_cut(EMBEDDINGS[tree], k)
    assert levels["k=2 near"].names == ("a+b", "c+d")
    assert levels["k=2 far"].names == ("a+c", "b+d")
    assert levels["k=3 far"].names == ("a+c", "b", "d")
    assert "reference" not in levels


def test_one_tree_names_its_levels_by_k_alone() -> None:
    levels = tree_levels([4, 3, 2, 1], _trees("far"), CLASSES, REFERENCE)
    assert list(levels) == ["k=4", "k=3", "k=2", "k=1", "reference"]
    assert all(lv.tree == "" for lv in levels.values())
    assert list(levels["k=2"].assignment) == CUTS["far"][2]


def test_the_reference_comes_last_with_its_own_names() -> None:
    levels = tree_levels([3], _trees("near", "far"), CLASSES, REFERENCE)
    assert list(levels)[-1] == "reference"
    ref = levels["reference"]
    # a and d in "left" (group 0, smallest member a), b and c in "right".
    assert ref.assignment == (0, 1, 1, 0) and ref.names == ("left", "right") and ref.k == 2


def test_a_tree_levels_json_and_group_carry_its_tree() -> None:
    levels = tree_levels([4, 2], _trees("near", "far"), CLASSES, None)
    assert levels["k=2 far"].to_json()["tree"] == "far"
    assert "tree" not in levels["k=4"].to_json()
    # Levels scored in one pass share kind and tree: the two trees' cuts are separate groups.
    assert levels["k=2 near"].group == "learned:near" != levels["k=2 far"].group
    assert levels["k=4"].group == "learned:"
    assert Level.of("reference", [0, 1, 1, 0], ["x", "y"], "reference").group == "reference:"
