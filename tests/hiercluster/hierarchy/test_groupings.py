"""Groupings of classes: every accepted form, its canonical assignment, names and errors."""

import doctest
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import hiercluster.hierarchy.groupings as groupings
from hiercluster.data.datasets import FASHION_MNIST_CLASSES
from hiercluster.errors import HierclusterError
from hiercluster.hierarchy.groupings import (
    as_assignment,
    canonical_assignment,
    group_names,
    remap_labels,
)

REPO = Path(__file__).resolve().parents[3]
FASHION = list(FASHION_MNIST_CLASSES)
# The shipped reference grouping (tops, bottoms, dresses, footwear, bags), as its YAML file says.
REFERENCE = yaml.safe_load((REPO / "configs" / "hierarchies" / "fashion_mnist.yaml").read_text())


def test_docstring_examples():
    assert doctest.testmod(groupings).failed == 0


# --- canonical form ------------------------------------------------------------------


def test_canonical_assignment_orders_groups_by_smallest_member():
    assert canonical_assignment(np.array([2, 2, 0, 1, 0])).tolist() == [0, 0, 1, 2, 1]
    assert canonical_assignment(np.array([9, 4, 4])).tolist() == [0, 1, 1]
    assert canonical_assignment(np.array([0, 1, 2])).tolist() == [0, 1, 2]


def test_every_form_gives_the_same_canonical_assignment():
    # Written out by hand: tops 0, bottoms 1, dresses 2, footwear 3, bags 4.
    expected = [0, 1, 0, 2, 0, 3, 0, 3, 4, 3]
    assert as_assignment(REFERENCE, FASHION).tolist() == expected
    shuffled = {"bags": ["Bag"], "footwear": ["Ankle boot", "Sneaker", "Sandal"], "tops": ["Shirt", "Coat", "Pullover", "T-shirt/top"],
                "dresses": ["Dress"], "bottoms": ["Trouser"]}
    assert as_assignment(shuffled, FASHION).tolist() == expected
    assert as_assignment([[8], [5, 7, 9], [0, 2, 4, 6], [1], [3]], FASHION).tolist() == expected
    assert as_assignment([[8], ["Sandal", 7, "Ankle boot"], [0, 2, 4, 6], [1], [3]], FASHION).tolist() == expected
    assert as_assignment([7, 1, 7, 3, 7, 5, 7, 5, 0, 5]).tolist() == expected
    assert as_assignment(torch.tensor([7, 1, 7, 3, 7, 5, 7, 5, 0, 5])).tolist() == expected
    out = as_assignment(np.array(expected), 10)
    assert out.dtype == np.int64


@pytest.mark.parametrize(
    "groups, needle",
    [
        ({"tops": ["T-shirt/top", "Pullover", "Coat", "Shirt"], "rest": ["Trouser", "Dress", "Sandal", "Sneaker", "Ankle boot"]}, "'Bag'"),
        ({**REFERENCE, "shoes": ["Sneaker"]}, "'Sneaker'"),
        ({**REFERENCE, "bags": ["Bag", "Bags"]}, "'Bags'"),
        ({**REFERENCE, "bags": ["Bag", "Bag"]}, "'Bag'"),
        ({**REFERENCE, "empty": []}, "'empty'"),
        ({**REFERENCE, "bags": "Bag"}, "'bags'"),
    ],
    ids=["missing", "repeated", "unknown", "twice-in-one", "empty-group", "not-a-list"],
)
def test_grouping_errors_name_the_problem(groups, needle):
    with pytest.raises(HierclusterError, match=needle):
        as_assignment(groups, FASHION)


def test_grouping_error_messages_say_what_is_wrong():
    with pytest.raises(HierclusterError, match="misses class 'Bag'"):
        as_assignment({k: v for k, v in REFERENCE.items() if k != "bags"}, FASHION)
    with pytest.raises(HierclusterError, match="'Sneaker' .* appears in 'footwear' and 'shoes'"):
        as_assignment({**REFERENCE, "shoes": ["Sneaker"]}, FASHION)
    with pytest.raises(HierclusterError, match="unknown class 'Sandals' \\(did you mean 'Sandal'\\?\\)"):
        as_assignment({**REFERENCE, "footwear": ["Sandals", "Sneaker", "Ankle boot"]}, FASHION)
    with pytest.raises(HierclusterError, match="length 9 but there are 10 classes"):
        as_assignment(np.zeros(9, dtype=int), FASHION)
    with pytest.raises(HierclusterError, match="unknown class id 10"):
        as_assignment([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10]], FASHION)
    with pytest.raises(HierclusterError, match="misses class id 1"):
        as_assignment([[0], [2]])
    with pytest.raises(HierclusterError, match="no class names"):
        as_assignment([["a"], ["b"]])
    with pytest.raises(HierclusterError, match="negative"):
        as_assignment(np.array([0, -1, 1]))
    with pytest.raises(HierclusterError, match="integer"):
        as_assignment(np.array([0.0, 1.0]))


def test_group_names_join_members_or_use_given_names():
    a = as_assignment(REFERENCE, FASHION)
    assert group_names(a, FASHION) == ["T-shirt/top+Pullover+Coat+Shirt", "Trouser", "Dress", "Sandal+Sneaker+Ankle boot", "Bag"]
    assert group_names(REFERENCE, FASHION) == ["tops", "bottoms", "dresses", "footwear", "bags"]
    named = group_names(a, FASHION, names={"Footwear": ["Ankle boot", "Sandal", "Sneaker"], "Unused": ["Bag", "Dress"]})
    assert named[3] == "Footwear" and named[4] == "Bag"
    with pytest.raises(HierclusterError, match="'Sandals'"):
        group_names(a, FASHION, names={"Footwear": ["Sandals"]})


def test_remap_labels_keeps_the_type():
    groups = [[0, 2], [1]]
    assert remap_labels(torch.tensor([0, 1, 2, 2]), groups).tolist() == [0, 1, 0, 0]
    out = remap_labels(np.array([2, 1]), groups)
    assert isinstance(out, np.ndarray) and out.tolist() == [0, 1]
    with pytest.raises(HierclusterError, match="label 3"):
        remap_labels(torch.tensor([3]), groups)


# --- properties -----------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=15))
def test_canonical_form_properties(labels):
    a = as_assignment(labels)
    x = np.array(labels)
    # same partition: two classes share a group before iff they share one after
    assert np.array_equal(a[:, None] == a[None, :], x[:, None] == x[None, :])
    # ids 0..k-1, all used, numbered by first appearance; idempotent
    k = len(set(labels))
    assert sorted(set(a.tolist())) == list(range(k))
    first = [int(np.flatnonzero(a == g)[0]) for g in range(k)]
    assert first == sorted(first) and a[0] == 0
    assert np.array_equal(as_assignment(a), a)
    # the list-of-groups form of the same partition gives the same array
    assert np.array_equal(as_assignment([np.flatnonzero(x == v).tolist() for v in sorted(set(labels))[::-1]]), a)
