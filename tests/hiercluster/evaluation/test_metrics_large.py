"""Many classes: the segment-sum kernel, distinct groupings scored once, float stats reused, devices, default levels.

References are independent of the code under test: numpy loops over groups (exact on the
tie-making data below, whose group scores are exact in floating point) and
:func:`hiercluster.evaluation.heads.group_argmax` one grouping at a time, which defines
the ranking (ties go to the lower group id).
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import hiercluster.evaluation.metrics as metrics
import hiercluster.run.sweep as sweep
from hiercluster.errors import HierclusterError
from hiercluster.evaluation.heads import group_argmax, onehot_matrix
from hiercluster.evaluation.metrics import evaluate_levels, float_level_stats, grouped_accuracies, random_groupings
from hiercluster.hierarchy.groupings import canonical_assignment
from hiercluster.run.prepare import _levels, default_level_ks
from hiercluster.run.records import Level

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _reference(logits, labels, assignment, reduction):
    """Grouped accuracy by a loop over groups in float64; numpy's argmax takes the first maximum, as torch's does."""
    z = np.asarray(logits, dtype=np.float64)
    y, a = np.asarray(labels), np.asarray(assignment)
    k = a.max() + 1
    if reduction == "prob_sum":
        p = np.exp(z - z.max(1, keepdims=True))
        scores = np.stack([p[:, a == g].sum(1) for g in range(k)], 1)
    else:
        scores = np.stack([z[:, a == g].mean(1) for g in range(k)], 1)
    return float(np.mean(scores.argmax(1) == a[y]))


def _by_definition(logits, labels, assignment, reduction):
    """Grouped accuracy through heads.group_argmax, one grouping at a time (the ranking's definition)."""
    predicted = group_argmax(torch.as_tensor(logits), onehot_matrix(assignment), reduction)
    return float((predicted == torch.as_tensor(assignment)[torch.as_tensor(labels)]).double().mean())


def _tie_data(reduction, n=300, c=40, seed=0):
    """Logits whose group scores are exact in float, so groups tie exactly and often.

    ``prob_sum``: logits 0 or -1000, so exp(z - max z) is exactly 1 or 0 and a group's
    score is its count of top classes. ``mean_logit``: small integer logits.
    """
    rng = np.random.default_rng(seed)
    if reduction == "prob_sum":
        z = np.where(rng.random((n, c)) < 0.15, 0.0, -1000.0)
        z[np.arange(n), rng.integers(0, c, n)] = 0.0  # every row has a top class
    else:
        z = rng.integers(-2, 3, (n, c)).astype(np.float64)
    return torch.from_numpy(z).float(), torch.from_numpy(rng.integers(0, c, n))


def _stack(rng, c, ks, per_k=3):
    return np.stack([canonical_assignment(rng.permutation(np.arange(c) % k)) for k in ks for _ in range(per_k)])


# --- the two kernels ------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["prob_sum", "mean_logit"])
def test_segment_sum_equals_one_hot_product_with_ties(reduction, monkeypatch):
    z, y = _tie_data(reduction)
    rng = np.random.default_rng(1)
    stack = _stack(rng, z.shape[1], [2, 3, 7, 8, 13, 20, 39, 40])
    source = torch.exp(z - z.amax(1, keepdim=True)) if reduction == "prob_sum" else z
    expected = np.array([_reference(z, y, a, reduction) for a in stack])
    assert not np.allclose(expected, expected[0])  # the data discriminate between groupings
    dense = metrics._dense_counts(source, y, stack, reduction) / len(y)
    segment = metrics._segment_counts(source, y, stack, reduction) / len(y)
    np.testing.assert_array_equal(dense, expected)
    np.testing.assert_array_equal(segment, expected)
    np.testing.assert_array_equal(grouped_accuracies(z, y, stack, reduction), expected)
    # tiny chunks of samples and groupings change nothing
    monkeypatch.setattr(metrics, "_SEGMENT_CHUNK", 7 * z.shape[1])
    monkeypatch.setattr(metrics, "_SEGMENT_MIN_SAMPLES", 1)
    monkeypatch.setattr(metrics, "_MAX_BLOCK", 50)
    monkeypatch.setattr(metrics, "_BLOCK_WIDTH", 5)
    np.testing.assert_array_equal(metrics._segment_counts(source, y, stack, reduction) / len(y), expected)
    np.testing.assert_array_equal(metrics._dense_counts(source, y, stack, reduction) / len(y), expected)


@pytest.mark.parametrize("reduction", ["prob_sum", "mean_logit", "argmax_then_map"])
def test_grouped_accuracies_equal_group_argmax_on_random_data(reduction):
    rng = np.random.default_rng(2)
    n, c = 400, 60
    z = torch.from_numpy(rng.normal(0, 3, (n, c))).float()
    y = torch.from_numpy(rng.integers(0, c, n))
    stack = _stack(rng, c, [1, 2, 5, 8, 9, 30, 59, 60], per_k=2)
    expected = [_by_definition(z, y, a, reduction) for a in stack]
    np.testing.assert_array_equal(grouped_accuracies(z, y, stack, reduction), expected)
    np.testing.assert_array_equal(grouped_accuracies(z.double(), y, stack, reduction), expected)


def test_empty_groups_and_relabelled_groupings_follow_the_definition():
    """Ids need not be canonical: a skipped id is an empty group, and ties go to the lower id as given."""
    z, y = _tie_data("mean_logit", n=200, c=20)
    rng = np.random.default_rng(3)
    base = rng.permutation(np.arange(20) % 10)
    stack = np.stack([base, 9 - base, np.where(base == 3, 11, base)])  # relabelled; id 3 skipped (k = 12)
    for reduction in ("prob_sum", "mean_logit"):
        expected = [_by_definition(z, y, a, reduction) for a in stack]
        np.testing.assert_array_equal(grouped_accuracies(z, y, stack, reduction), expected)


def test_first_argmax_hits_by_hand():
    scores = np.array([[1.0, 2.0, 5.0, 0.0], [3.0, 2.0, 5.0, 0.0], [3.0, 1.0, 4.0, 0.0]])
    # column maxima first at rows 1, 0, 0, 0
    assert metrics._first_argmax_hits(scores.copy(), np.array([1, 0, 0, 0])) == 4
    assert metrics._first_argmax_hits(scores.copy(), np.array([2, 1, 1, 2])) == 0
    assert metrics._first_argmax_hits(scores.copy(), np.array([0, 0, 2, 0])) == 2


def test_non_finite_logits_are_ranked_as_torch_ranks_them():
    z, y = _tie_data("mean_logit", n=100, c=24)
    z[3, 5] = float("inf")
    z[7, 1] = float("nan")
    stack = _stack(np.random.default_rng(4), 24, [4, 12, 24], per_k=2)
    for reduction in ("prob_sum", "mean_logit"):
        expected = [_by_definition(z, y, a, reduction) for a in stack]
        np.testing.assert_array_equal(grouped_accuracies(z, y, stack, reduction), expected)


# --- distinct groupings once: k = C and k = 1 ----------------------------------------------


def _toy(seed=0, n=500, c=30):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    zf = rng.normal(size=(n, c)) + 2.5 * np.eye(c)[labels]
    zq = zf + rng.normal(0, 1.5, size=(n, c))
    return torch.from_numpy(zf).float(), torch.from_numpy(zq).float(), torch.from_numpy(labels)


def _levels_for(c, ks, seed=5):
    rng = np.random.default_rng(seed)
    return {k: canonical_assignment(np.r_[np.arange(k), rng.integers(0, k, c - k)]) for k in ks}


def test_identity_levels_are_scored_once_and_rows_equal_the_slow_path(monkeypatch):
    zf, zq, y = _toy()
    levels = _levels_for(30, [30, 12, 1])
    scored = []
    real = metrics._correct_counts
    monkeypatch.setattr(metrics, "_correct_counts", lambda z, yy, a, r: scored.append(len(a)) or real(z, yy, a, r))
    fast = evaluate_levels(zf, zq, y, levels, n_random=20, seed=3)
    # float and quantized side: k=30 and k=1 once each, k=12 with its 20 random groupings (distinct here)
    n_distinct = len({tuple(row) for row in random_groupings(levels[12], 20, 3)} | {tuple(levels[12])})
    assert scored == [2 + n_distinct] * 2
    monkeypatch.setattr(metrics, "_distinct_rows", lambda a: (a, np.arange(len(a))))  # the slow path: every row
    scored.clear()
    slow = evaluate_levels(zf, zq, y, levels, n_random=20, seed=3)
    assert scored == [3 * 21] * 2
    assert fast == slow
    for row in (fast[0], fast[2]):  # k = C and k = 1: the random baseline is the learned grouping itself
        assert row["random_acc_float_std"] == row["random_acc_quant_std"] == row["random_drop_std"] == 0.0
        assert row["random_acc_float_mean"] == row["acc_float"] and row["random_acc_quant_mean"] == row["acc_quant"]
        assert row["random_drop_mean"] == row["drop"] and row["advantage"] == 0.0
    assert fast[1]["random_acc_quant_std"] > 0
    assert fast[0]["acc_float"] == pytest.approx(float((zf.argmax(1) == y).double().mean()))
    assert fast[2]["acc_float"] == fast[2]["acc_quant"] == 1.0


# --- float side once per run -----------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["prob_sum", "mean_logit", "argmax_then_map"])
def test_float_stats_reuse_equals_recomputation(reduction):
    zf, zq, y = _toy(1)
    levels = _levels_for(30, [30, 17, 9, 4, 1])
    stats = float_level_stats(zf, y, levels, n_random=6, seed=2, reduction=reduction)
    assert stats.groupings.shape == (5 * 7, 30)
    for quant in (zq, zq + 0.3 * torch.randn(zq.shape, generator=torch.Generator().manual_seed(0))):
        expected = evaluate_levels(zf, quant, y, levels, n_random=6, seed=2, reduction=reduction)
        assert evaluate_levels(zf, quant, y, levels, n_random=6, seed=2, reduction=reduction, float_stats=stats) == expected
    # the float side by hand: learned grouping then its random ones, scored on the float logits
    row = evaluate_levels(zf, zq, y, levels, n_random=6, seed=2, reduction=reduction, float_stats=stats)[2]
    rand = random_groupings(levels[9], 6, 2)
    assert row["acc_float"] == pytest.approx(_by_definition(zf, y, levels[9], reduction))
    assert row["random_acc_float_mean"] == pytest.approx(np.mean([_by_definition(zf, y, a, reduction) for a in rand]))


def test_float_stats_of_other_settings_are_refused():
    zf, zq, y = _toy(2)
    levels = _levels_for(30, [10, 3])
    stats = float_level_stats(zf, y, levels, n_random=4, seed=1)
    cases = [
        ({"n_random": 5}, "n_random=4"),
        ({"seed": 2}, "seed=1"),
        ({"reduction": "mean_logit"}, "reduction='prob_sum'"),
        ({"levels": _levels_for(30, [10, 4])}, r"levels \[10, 3\]"),
        ({"levels": _levels_for(30, [10, 3], seed=9)}, "groupings differ"),
        ({"labels": (y + 1) % 30}, "other labels"),
        ({"float_stats": {"acc": []}}, "must come from float_level_stats"),
    ]
    for change, message in cases:
        kwargs = {"levels": levels, "n_random": 4, "seed": 1, "labels": y, "float_stats": stats, **change}
        labels = kwargs.pop("labels")
        with pytest.raises(HierclusterError, match=message):
            evaluate_levels(zf, zq, labels, **kwargs)
    with pytest.raises(HierclusterError, match="level 4 has a grouping with 3 superclasses"):
        float_level_stats(zf, y, {4: np.array([0, 1, 2] * 10)})
    with pytest.raises(HierclusterError, match="n_random must be >= 1"):
        float_level_stats(zf, y, levels, n_random=0)


def test_the_sweep_context_computes_the_float_side_once_per_run(monkeypatch):
    zf, zq, y = _toy(3)
    names = [f"g{i}" for i in range(5)]
    levels = {
        f"k={k}": Level.of(f"k={k}", a, names[:k] if k <= 5 else [str(i) for i in range(k)], "learned")
        for k, a in _levels_for(30, [30, 5, 2]).items()
    }
    levels["reference"] = Level.of("reference", np.arange(30) % 5, names, "reference")
    cfg = SimpleNamespace(eval=SimpleNamespace(random_seeds=5, seed=4, reduction="prob_sum", bootstrap=50),
                          hierarchy=SimpleNamespace(selects_on_holdout=False))
    prep = SimpleNamespace(
        cfg=cfg, levels=levels, float_logits=zf, labels=y, calibration=None, model=None, class_names=names,
        eval_set=None, checkpoint_digest="d", data_options=None, device=torch.device("cpu"),
    )
    calls = []
    real = sweep.float_level_stats
    monkeypatch.setattr(sweep, "float_level_stats", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ctx = sweep.sweep_context(prep)
    assert len(calls) == 2 and set(ctx.float_stats) == {"learned:", "reference:"}  # one per level kind (one tree)
    first = sweep.level_metrics(ctx, zq)
    second = sweep.level_metrics(ctx, zq)
    assert len(calls) == 2  # no spec computes the float side again
    assert first == second and [r.level for r in first] == list(levels)
    learned = evaluate_levels(zf, zq, y, {lv.k: lv.array for lv in list(levels.values())[:3]}, 5, 4, bootstrap=50)
    assert [r.drop_hi for r in first[:3]] == [row["drop_hi"] for row in learned]
    assert [r.acc_quant for r in first[:3]] == [row["acc_quant"] for row in learned]
    assert [r.random_drop_mean for r in first[:3]] == [row["random_drop_mean"] for row in learned]


# --- devices ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_metrics_run_where_the_logits_are(device):
    device = torch.device(device)
    zf, zq, y = _toy(4)
    levels = _levels_for(30, [30, 10, 2])
    expected = evaluate_levels(zf, zq, y, levels, n_random=4)
    stack = np.stack(list(levels.values()))
    on_cpu = grouped_accuracies(zf, y, stack)
    for reduction in ("prob_sum", "mean_logit", "argmax_then_map"):
        # labels may stay on the CPU while the logits are elsewhere
        got = grouped_accuracies(zf.to(device), y, stack, reduction)
        np.testing.assert_array_equal(got, [_by_definition(zf, y, a, reduction) for a in stack])
    np.testing.assert_array_equal(grouped_accuracies(zf.to(device), y.to(device), stack), on_cpu)
    rows = evaluate_levels(zf.to(device), zq.to(device), y.to(device), levels, n_random=4)
    assert rows == expected
    # float logits on the CPU (the run's cached ones), quantized logits on the device
    stats = float_level_stats(zf, y, levels, n_random=4)
    assert evaluate_levels(zf, zq.to(device), y, levels, n_random=4, float_stats=stats) == expected
    assert isinstance(rows[0]["acc_quant"], float)


def test_the_one_hot_product_serves_other_devices_and_dtypes(monkeypatch):
    """Off the CPU or in half precision the product scores every k; it must then agree with the segment sum."""
    z, y = _tie_data("prob_sum", c=32)
    stack = _stack(np.random.default_rng(6), 32, [2, 9, 32])
    used = []
    real_dense, real_segment = metrics._dense_counts, metrics._segment_counts
    monkeypatch.setattr(metrics, "_dense_counts", lambda *a: used.append("dense") or real_dense(*a))
    monkeypatch.setattr(metrics, "_segment_counts", lambda *a: used.append("segment") or real_segment(*a))
    expected = [_reference(z, y, a, "prob_sum") for a in stack]
    np.testing.assert_array_equal(grouped_accuracies(z, y, stack), expected)
    assert used == ["dense", "segment"]
    used.clear()
    np.testing.assert_array_equal(grouped_accuracies(z.half(), y, stack), expected)  # exact 0/1 scores survive fp16
    assert used == ["dense"]


# --- default levels ---------------------------------------------------------------------------


def test_default_levels_are_bounded_for_many_classes():
    assert default_level_ks(10) == list(range(10, 1, -1))
    assert default_level_ks(20) == list(range(20, 1, -1))
    assert default_level_ks(2) == [2]
    big = default_level_ks(1000)
    assert big == [1000, 501, 251, 126, 63, 32, 16, 8, 4, 2]
    for c in (21, 100, 1000, 21841):
        ks = default_level_ks(c)
        assert ks[0] == c and ks[-1] == 2 and 5 <= len(ks) <= 10
        assert ks == sorted(set(ks), reverse=True)
        ratios = np.array(ks[:-1]) / np.array(ks[1:])
        assert ratios.max() < 4 * ratios.min()  # log-spaced: about the same factor between neighbours


def test_empty_levels_config_uses_the_default():
    def hierarchy_of(c):
        return SimpleNamespace(cut=lambda k: np.arange(c) % k, superclass_names=lambda k: [f"s{i}" for i in range(k)])

    for c, expected in ((1000, default_level_ks(1000)), (10, list(range(10, 1, -1)))):
        cfg = SimpleNamespace(hierarchy=SimpleNamespace(levels=()))
        levels = _levels(cfg, {"fc_weights": hierarchy_of(c)}, [str(i) for i in range(c)], None)
        assert [lv.k for lv in levels.values()] == expected
    cfg = SimpleNamespace(hierarchy=SimpleNamespace(levels=(3, 7)))
    assert list(_levels(cfg, {"fc_weights": hierarchy_of(1000)}, [str(i) for i in range(1000)], None)) == ["k=7", "k=3"]
