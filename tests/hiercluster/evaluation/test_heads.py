"""Superclass scores and merged heads: hand-made cases and independent references."""

import doctest
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import hiercluster.evaluation.heads as heads
from hiercluster.data.datasets import FASHION_MNIST_CLASSES
from hiercluster.errors import HierclusterError
from hiercluster.evaluation.heads import (
    GroupedHead,
    group_argmax,
    group_scores,
    merge_head,
    onehot_matrix,
)
from hiercluster.hierarchy.groupings import canonical_assignment
from hiercluster.models.zoo import build_model

REPO = Path(__file__).resolve().parents[3]
FASHION = list(FASHION_MNIST_CLASSES)
# The shipped reference grouping (tops, bottoms, dresses, footwear, bags), as its YAML file says.
REFERENCE = yaml.safe_load((REPO / "configs" / "hierarchies" / "fashion_mnist.yaml").read_text())


def test_docstring_examples():
    assert doctest.testmod(heads).failed == 0


# --- scores --------------------------------------------------------------------------


def _reference_logsumexp(logits, assignment):
    """Independent reference: per group, torch.logsumexp of the members' log-probabilities."""
    logp = torch.log_softmax(logits, 1)
    return torch.stack([torch.logsumexp(logp[:, assignment == g], 1) for g in range(assignment.max() + 1)], 1)


@pytest.mark.parametrize("seed", range(5))
def test_prob_sum_equals_logsumexp_of_member_log_probabilities(seed):
    rng = np.random.default_rng(seed)
    c = 12
    assignment = canonical_assignment(rng.integers(0, 5, c))
    logits = torch.from_numpy(rng.normal(0, 4, (300, c)))  # float64: no near-ties from rounding
    scores = group_scores(logits, onehot_matrix(assignment))
    reference = _reference_logsumexp(logits, torch.from_numpy(assignment))
    torch.testing.assert_close(scores, reference.to(scores.dtype), rtol=1e-10, atol=1e-10)
    assert torch.equal(scores.argmax(1), reference.argmax(1))
    assert torch.equal(group_argmax(logits, onehot_matrix(assignment)), reference.argmax(1))
    # group probabilities sum to one
    torch.testing.assert_close(scores.exp().sum(1), torch.ones(300, dtype=torch.float64))


def test_prob_sum_agrees_with_logsumexp_in_float32_and_extreme_logits():
    torch.manual_seed(0)
    assignment = np.array([0, 0, 1, 1, 1, 2])
    logits = torch.randn(2000, 6) * 3
    ref = _reference_logsumexp(logits.double(), torch.from_numpy(assignment))
    assert torch.equal(group_scores(logits, onehot_matrix(assignment)).argmax(1), ref.argmax(1))
    huge = torch.tensor([[1000.0, -1000.0, 0.0, 0.0, 0.0, 0.0]])
    scores = group_scores(huge, onehot_matrix(assignment))
    assert torch.isfinite(scores[0, 0]) and scores[0, 0].item() == pytest.approx(0.0)
    assert not torch.isnan(scores).any()


def test_mean_logit_and_argmax_then_map_by_hand():
    logits = torch.tensor([[4.0, -2.0, 1.0, 0.5]])
    onehot = onehot_matrix(np.array([0, 0, 1, 1]))
    # group 0: (4 - 2) / 2 = 1.0; group 1: (1 + 0.5) / 2 = 0.75
    torch.testing.assert_close(group_scores(logits, onehot, "mean_logit"), torch.tensor([[1.0, 0.75]]))
    assert group_scores(logits, onehot, "argmax_then_map").tolist() == [[1.0, 0.0]]
    # prob_sum disagrees with mean_logit here: mass of group 0 is dominated by logit 4
    logits2 = torch.tensor([[3.0, -10.0, 1.0, 1.0]])
    assert group_scores(logits2, onehot, "mean_logit").argmax(1).item() == 1  # (-3.5 vs 1.0)
    assert group_scores(logits2, onehot, "prob_sum").argmax(1).item() == 0  # e^3 > 2e^1


def test_padding_columns_score_minus_infinity_and_never_win():
    logits = torch.tensor([[-5.0, -6.0, -7.0]])
    padded = torch.nn.functional.one_hot(torch.tensor([0, 1, 1]), 4).float()  # 2 groups, 2 padding columns
    for reduction in heads.REDUCTIONS:
        scores = group_scores(logits, padded, reduction)
        assert torch.isinf(scores[0, 2:]).all() and (scores[0, 2:] < 0).all()
        assert group_argmax(logits, padded, reduction).item() == 0


def test_unknown_reduction_lists_the_options():
    with pytest.raises(HierclusterError, match="prob_sum, mean_logit, argmax_then_map"):
        group_scores(torch.zeros(1, 2), onehot_matrix(np.array([0, 1])), "max")
    with pytest.raises(HierclusterError, match="prob_sum, mean_logit, argmax_then_map"):
        GroupedHead([[0], [1]], reduction="sum")


# --- modules -------------------------------------------------------------------------


def test_grouped_head_outputs_log_probabilities_of_superclasses():
    head = GroupedHead(REFERENCE, class_names=FASHION)
    assert (head.num_classes, head.num_groups) == (10, 5)
    probs = torch.softmax(torch.randn(7, 10), 1)
    out = head(probs.log())
    expected = torch.stack([probs[:, [0, 2, 4, 6]].sum(1), probs[:, 1], probs[:, 3], probs[:, [5, 7, 9]].sum(1), probs[:, 8]], 1)
    torch.testing.assert_close(out.exp(), expected)
    assert "groups=5" in repr(head)


def test_grouped_head_state_dict_carries_the_assignment():
    a = GroupedHead([[0, 1], [2, 3]])
    b = GroupedHead([[0, 2], [1, 3]])
    x = torch.tensor([[3.0, 2.9, 0.0, 0.0]])
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x))
    c = GroupedHead([[0], [1], [2, 3]])  # another k: the one-hot matrix is rebuilt from the loaded assignment
    c.load_state_dict(a.state_dict())
    assert c(x).shape == (1, 2) and c.num_groups == 2
    with pytest.raises(HierclusterError, match="canonical"):
        GroupedHead([[0, 1], [2, 3]]).load_state_dict({"assignment": torch.tensor([1, 1, 0, 0])})


def test_merge_head_round_trip_through_state_dict(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10, in_channels=1)
    merged = merge_head(model, REFERENCE, class_names=FASHION).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        out = merged(x)
        torch.testing.assert_close(out, GroupedHead(REFERENCE, class_names=FASHION)(model(x)))
    assert out.shape == (4, 5)
    assert "head.assignment" in merged.state_dict() and "model.fc.weight" in merged.state_dict()
    torch.save(merged.state_dict(), tmp_path / "merged.pt")

    fresh = merge_head(build_model("resnet8", num_classes=10, in_channels=1), REFERENCE, class_names=FASHION).eval()
    fresh.load_state_dict(torch.load(tmp_path / "merged.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), out)
