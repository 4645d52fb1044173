"""Grouped metrics from kept logits: hand-computed tiny cases and a per-grouping loop as reference."""

import doctest
import math

import numpy as np
import pytest
import torch

import hiercluster.evaluation.metrics as evaluate
from hiercluster.errors import HierclusterError
from hiercluster.evaluation.metrics import (
    advantage,
    bias_report,
    drop,
    evaluate_levels,
    grouped_accuracies,
    grouped_metrics,
    min_bits,
    prediction_share,
    random_baseline,
    random_groupings,
)
from hiercluster.hierarchy.groupings import canonical_assignment


def test_docstring_examples():
    assert doctest.testmod(evaluate).failed == 0


# Four samples, three classes. Softmax probabilities written out so group sums are easy:
#   sample 0 (true 0): [0.55, 0.35, 0.1] -> fine correct
#   sample 1 (true 1): [0.45, 0.35, 0.2] -> fine wrong (predicts 0)
#   sample 2 (true 2): [0.3, 0.3, 0.4] -> fine correct
#   sample 3 (true 2): [0.1, 0.6, 0.3] -> fine wrong (predicts 1)
PROBS = torch.tensor([[0.55, 0.35, 0.1], [0.45, 0.35, 0.2], [0.3, 0.3, 0.4], [0.1, 0.6, 0.3]], dtype=torch.float64)
LOGITS = PROBS.log()
LABELS = torch.tensor([0, 1, 2, 2])


def test_grouped_metrics_by_hand():
    out = grouped_metrics(
        LOGITS,
        LABELS,
        {
            # {0,1} {2}: sums [0.9,0.1] [0.8,0.2] [0.6,0.4] [0.7,0.3] -> predictions 0,0,0,0; truth 0,0,1,1 -> 2/4
            "01|2": [[0, 1], [2]],
            # {0} {1,2}: [0.55,0.45] [0.45,0.55] [0.3,0.7] [0.1,0.9] -> 0,1,1,1; truth 0,1,1,1 -> 4/4
            "0|12": [[0], [1, 2]],
            # {0,2} {1}: [0.65,0.35] [0.65,0.35] [0.7,0.3] [0.4,0.6] -> 0,0,0,1; truth 0,1,0,0 -> 2/4
            "02|1": np.array([0, 1, 0]),
            "fine": [0, 1, 2],
            "one": [[0, 1, 2]],
        },
    )
    assert out["fine_acc"] == 0.5
    assert out["grouped_acc"] == {"01|2": 0.5, "0|12": 1.0, "02|1": 0.5, "fine": 0.5, "one": 1.0}


def test_other_reductions_by_hand():
    groupings = {"01|2": [[0, 1], [2]]}
    # mean_logit on these log-probabilities, group {0,1} vs {2}:
    #   s0: mean(log .55, log .35) = -0.82 > log .1 = -2.30 -> 0 (truth 0)
    #   s1: mean(log .45, log .35) = -0.92 > log .2 = -1.61 -> 0 (truth 0)
    #   s2: mean(log .3, log .3) = -1.20 < log .4 = -0.92 -> 1 (truth 1)
    #   s3: mean(log .1, log .6) = -1.41 < log .3 = -1.20 -> 1 (truth 1)  => 4/4
    assert grouped_metrics(LOGITS, LABELS, groupings, "mean_logit")["grouped_acc"]["01|2"] == 1.0
    # argmax_then_map: fine predictions 0, 0, 2, 1 -> groups 0, 0, 1, 0; truth 0, 0, 1, 1 -> 3/4
    assert grouped_metrics(LOGITS, LABELS, groupings, "argmax_then_map")["grouped_acc"]["01|2"] == 0.75


def _reference_accuracy(logits, labels, assignment, reduction):
    """Independent reference: a Python loop over groups, numpy only."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    k = assignment.max() + 1
    if reduction == "argmax_then_map":
        return float(np.mean(assignment[z.argmax(1)] == assignment[y]))
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    if reduction == "prob_sum":
        scores = np.stack([p[:, assignment == g].sum(1) for g in range(k)], 1)
    else:
        scores = np.stack([z[:, assignment == g].mean(1) for g in range(k)], 1)
    return float(np.mean(scores.argmax(1) == assignment[y]))


@pytest.mark.parametrize("reduction", ["prob_sum", "mean_logit", "argmax_then_map"])
def test_vectorized_accuracies_match_a_loop_over_groupings(reduction, monkeypatch):
    rng = np.random.default_rng(0)
    n, c = 500, 9
    logits = torch.from_numpy(rng.normal(0, 2, (n, c)))
    labels = torch.from_numpy(rng.integers(0, c, n))
    stack = np.stack([canonical_assignment(rng.integers(0, k, c)) for k in rng.integers(1, c + 1, 40)])
    expected = [_reference_accuracy(logits, labels, a, reduction) for a in stack]
    np.testing.assert_allclose(grouped_accuracies(logits, labels, stack, reduction), expected)
    monkeypatch.setattr(evaluate, "_MAX_BLOCK", 3 * n * c)  # force many small blocks
    np.testing.assert_allclose(grouped_accuracies(logits, labels, stack, reduction), expected)
    # float32 logits give the same numbers
    np.testing.assert_allclose(grouped_accuracies(logits.float(), labels, stack, reduction), expected)


def test_input_errors():
    with pytest.raises(HierclusterError, match="label 3 is outside"):
        grouped_metrics(LOGITS, torch.tensor([0, 1, 2, 3]), {"a": [0, 1, 2]})
    with pytest.raises(HierclusterError, match="need logits"):
        grouped_metrics(LOGITS, LABELS[:3], {"a": [0, 1, 2]})
    with pytest.raises(HierclusterError, match=r"misses class '2' \(id 2\)"):
        grouped_metrics(LOGITS, LABELS, {"a": [[0, 1]]})
    with pytest.raises(HierclusterError, match="choose one of prob_sum"):
        grouped_metrics(LOGITS, LABELS, {"a": [0, 1, 2]}, reduction="vote")


# --- random baseline ------------------------------------------------------------------


def test_random_groupings_keep_sizes_and_are_deterministic():
    a = np.array([0, 0, 0, 0, 1, 1, 2, 3, 3, 3])  # sizes 4, 2, 1, 3
    r = random_groupings(a, n_seeds=50, seed=3)
    assert r.shape == (50, 10) and r.dtype == np.int64
    for row in r:
        assert sorted(np.bincount(row)) == [1, 2, 3, 4]
        assert np.array_equal(row, canonical_assignment(row))
    assert np.array_equal(r, random_groupings(a, n_seeds=50, seed=3))
    assert not np.array_equal(r, random_groupings(a, n_seeds=50, seed=4))
    assert len({tuple(row) for row in r}) > 40  # 12600 partitions of these sizes: repeats are rare
    # every class lands with class 0 sometimes: the assignment is not fixed
    together = (r == r[:, [0]]).mean(0)
    assert np.all(together[1:] > 0)
    with pytest.raises(HierclusterError, match="n_seeds"):
        random_groupings(a, n_seeds=0)


def test_random_baseline_scores_the_random_groupings():
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(size=(200, 6)))
    labels = torch.from_numpy(rng.integers(0, 6, 200))
    a = [[0, 1, 2], [3, 4], [5]]
    accs = random_baseline(logits, labels, a, n_seeds=7, seed=2)
    expected = [_reference_accuracy(logits, labels, g, "prob_sum") for g in random_groupings(a, 7, 2)]
    np.testing.assert_allclose(accs, expected)


# --- drop, advantage, min bits ------------------------------------------------------------


def test_drop_and_advantage_by_hand():
    assert drop(0.92, 0.89) == pytest.approx(3.0)
    assert drop(0.5, 0.75) == pytest.approx(-25.0)
    np.testing.assert_allclose(drop(np.array([1.0, 0.9]), np.array([0.5, 0.9])), [50.0, 0.0])
    assert isinstance(drop(1, 1), float)
    assert advantage(1.5, 4.0) == pytest.approx(2.5)
    assert advantage(3.0, 1.0) == pytest.approx(-2.0)


def test_min_bits_by_hand():
    rows = [
        {"k": 10, "bits": 8, "drop": 0.1, "scheme": "asym"},
        {"k": 10, "bits": 4, "drop": 1.5, "scheme": "asym"},
        {"k": 10, "bits": 4, "drop": 0.8, "scheme": "pow2"},
        {"k": 10, "bits": 5, "drop": 0.2, "scheme": "asym"},
        {"k": 5, "bits": 3, "drop": 1.0, "scheme": "asym"},  # exactly at the tolerance: passes
        {"k": 5, "bits": 2, "drop": float("nan"), "scheme": "asym"},
        {"k": 2, "bits": 2, "drop": 9.0, "scheme": "asym"},
    ]
    assert min_bits(rows) == {
        10: {"bits": 4, "drop": 0.8, "scheme": "pow2"},
        5: {"bits": 3, "drop": 1.0, "scheme": "asym"},
        2: None,
    }
    assert min_bits(rows, tolerance=0.15)[10] == {"bits": 8, "drop": 0.1, "scheme": "asym"}
    assert min_bits(rows, tolerance=10.0)[2]["bits"] == 2
    assert min_bits([]) == {}
    with pytest.raises(HierclusterError, match="row 0 lacks 'drop'"):
        min_bits([{"k": 3, "bits": 4}])


# --- evaluate_levels ------------------------------------------------------------------


def _toy(seed=0, n=400, c=6):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    zf = rng.normal(size=(n, c)) + 2.5 * np.eye(c)[labels]
    zq = zf + rng.normal(0, 1.5, size=(n, c))
    return torch.from_numpy(zf).float(), torch.from_numpy(zq).float(), torch.from_numpy(labels)


def test_evaluate_levels_matches_separate_computations():
    zf, zq, y = _toy()
    levels = {6: np.arange(6), 3: np.array([0, 0, 1, 1, 2, 2]), 2: np.array([0, 1, 1, 1, 0, 0]), 1: np.zeros(6, int)}
    rows = evaluate_levels(zf, zq, y, levels, n_random=5, seed=11)
    assert [r["k"] for r in rows] == [6, 3, 2, 1]
    fine_f = float((zf.argmax(1) == y).double().mean())
    fine_q = float((zq.argmax(1) == y).double().mean())
    for row, (k, a) in zip(rows, levels.items()):
        assert row["fine_acc_float"] == pytest.approx(fine_f) and row["fine_acc_quant"] == pytest.approx(fine_q)
        acc_f = _reference_accuracy(zf, y, a, "prob_sum")
        acc_q = _reference_accuracy(zq, y, a, "prob_sum")
        assert row["acc_float"] == pytest.approx(acc_f) and row["acc_quant"] == pytest.approx(acc_q)
        assert row["drop"] == pytest.approx(100 * (acc_f - acc_q))
        rand = random_groupings(a, 5, 11)  # the same groupings for both models
        rf = np.array([_reference_accuracy(zf, y, g, "prob_sum") for g in rand])
        rq = np.array([_reference_accuracy(zq, y, g, "prob_sum") for g in rand])
        assert row["random_acc_float_mean"] == pytest.approx(rf.mean())
        assert row["random_acc_float_std"] == pytest.approx(rf.std())
        assert row["random_acc_quant_mean"] == pytest.approx(rq.mean())
        assert row["random_drop_mean"] == pytest.approx(100 * (rf - rq).mean())
        assert row["random_drop_std"] == pytest.approx(100 * (rf - rq).std())
        assert row["advantage"] == pytest.approx(100 * (rf - rq).mean() - row["drop"])
        assert row["reduction"] == "prob_sum" and row["n_random"] == 5
    assert rows[0]["acc_float"] == pytest.approx(fine_f) and rows[0]["random_acc_float_std"] == 0.0
    assert rows[-1]["acc_quant"] == 1.0 and rows[-1]["drop"] == 0.0


def test_evaluate_levels_identical_models_lose_nothing():
    zf, _, y = _toy(1)
    rows = evaluate_levels(zf, zf.clone(), y, {3: [[0, 1], [2, 3], [4, 5]]}, n_random=4)
    assert rows[0]["drop"] == 0.0 and rows[0]["random_drop_mean"] == 0.0 and rows[0]["advantage"] == 0.0


def test_evaluate_levels_errors():
    zf, zq, y = _toy()
    with pytest.raises(HierclusterError, match="level 4 has a grouping with 3 superclasses"):
        evaluate_levels(zf, zq, y, {4: np.array([0, 0, 1, 1, 2, 2])})
    with pytest.raises(HierclusterError, match="differ in shape"):
        evaluate_levels(zf, torch.cat([zq, zq[:, :1]], 1), y, {1: np.zeros(6, int)})
    with pytest.raises(HierclusterError, match="n_random must be >= 1"):
        evaluate_levels(zf, zq, y, {1: np.zeros(6, int)}, n_random=0)


# --- bias analysis --------------------------------------------------------------------


def test_prediction_share_by_hand():
    z = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [5.0, 0.0, 0.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    np.testing.assert_allclose(prediction_share(z), [0.6, 0.2, 0.2])
    np.testing.assert_allclose(prediction_share(z.numpy(), 3), [0.6, 0.2, 0.2])
    with pytest.raises(HierclusterError, match="num_classes 4"):
        prediction_share(z, 4)


def test_bias_report_by_hand():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    pred_f = torch.tensor([0, 0, 1, 1, 2, 0])  # float: one 2 -> 0 mistake
    pred_q = torch.tensor([0, 0, 0, 2, 0, 0])  # quantized: collapses onto class 0
    r = bias_report(torch.eye(3)[pred_f], torch.eye(3)[pred_q], y, ["a", "b", "c"], top=5)
    np.testing.assert_allclose(r["share_true"], [1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(r["share_float"], [3 / 6, 2 / 6, 1 / 6])
    np.testing.assert_allclose(r["share_quant"], [5 / 6, 0, 1 / 6])
    np.testing.assert_allclose(r["acc_float"], [1.0, 1.0, 0.5])
    np.testing.assert_allclose(r["acc_quant"], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(r["drop"], [0.0, 100.0, 50.0])
    # counts float -> quant: b->a 0->1, b->c 0->1, c->a 1->2; c->a ties b->a at +1, row-major order first
    flows = [(f["true"], f["pred"], f["count_float"], f["count_quant"], f["increase"]) for f in r["flows"]]
    assert flows == [("b", "a", 0, 1, 1), ("b", "c", 0, 1, 1), ("c", "a", 1, 2, 1)]
    assert bias_report(torch.eye(3)[pred_f], torch.eye(3)[pred_q], y, top=1)["flows"][0]["true_id"] == 1


def test_bias_report_class_without_samples_has_nan_accuracy():
    y = torch.tensor([0, 0])
    r = bias_report(torch.eye(2)[[0, 1]], torch.eye(2)[[0, 0]], y)
    assert r["acc_float"][0] == 0.5 and math.isnan(r["acc_float"][1])
    assert r["class_names"] == ["0", "1"]
