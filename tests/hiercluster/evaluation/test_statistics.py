"""Statistics of DESIGN.md: paired bootstrap intervals, the rank p, the absorbed share, confident/borderline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hiercluster.errors import HierclusterError
from hiercluster.evaluation.metrics import (
    absorbed_share,
    bootstrap_resamples,
    evaluate_levels,
    fine_bootstrap,
    float_level_stats,
    group_sizes,
    grouped_correct_sums,
    headline,
    min_bits,
    random_groupings,
    rank_p,
)


def _data(n=80, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    zf = torch.randn(n, c, generator=g) + 2.0 * torch.nn.functional.one_hot(y, c)
    zq = zf + 1.5 * torch.randn(n, c, generator=g)
    return zf, zq, y


def _correct(z: torch.Tensor, y: torch.Tensor, a: np.ndarray, reduction: str) -> np.ndarray:
    """Per-sample correctness of one grouping, by the definition (a plain loop over groups)."""
    z = z.double()
    k = int(a.max()) + 1
    if reduction == "argmax_then_map":
        return a[z.argmax(1).numpy()] == a[y.numpy()]
    p = torch.softmax(z, 1) if reduction == "prob_sum" else z
    scores = torch.full((len(z), k), float("-inf"), dtype=torch.float64)
    for g in range(k):
        members = torch.as_tensor(np.flatnonzero(a == g))
        if len(members):
            part = p[:, members]
            scores[:, g] = part.sum(1) if reduction == "prob_sum" else part.mean(1)
    return scores.argmax(1).numpy() == a[y.numpy()]


@pytest.mark.parametrize("reduction", ["prob_sum", "mean_logit", "argmax_then_map"])
@pytest.mark.parametrize("c", [6, 40])  # 40 classes: k >= 8 goes through the segment sum
def test_grouped_correct_sums_adds_each_groupings_per_sample_correctness(reduction, c):
    zf, _, y = _data(n=300, c=c, seed=1)
    rng = np.random.default_rng(0)
    stack = np.stack([rng.integers(0, k, c) for k in (2, 3, 12, 12)] + [np.arange(c), np.arange(c)])
    stack = np.stack([np.unique(row, return_inverse=True)[1] for row in stack])  # no empty groups
    slots = np.array([0, 1, 1, -1, 2, 2])  # slot 2: one distinct grouping standing for two rows
    acc, sums = grouped_correct_sums(zf, y, stack, slots, 3, reduction)
    per = np.stack([_correct(zf, y, a, reduction) for a in stack]).astype(np.float64)
    np.testing.assert_allclose(acc, per.mean(1))
    np.testing.assert_array_equal(sums, np.stack([per[0], per[1] + per[2], 2 * per[4]]))
    with pytest.raises(HierclusterError, match="slots must be"):
        grouped_correct_sums(zf, y, stack, slots[:-1], 3, reduction)


def _reference_intervals(zf, zq, y, levels, n_random, seed, n_resamples):
    """Plain loops: every resample's drop and advantage recomputed from per-sample correctness."""
    idx = np.concatenate(list(bootstrap_resamples(len(y), n_resamples, seed)))
    out = {}
    for k, a in levels.items():
        groupings = [a] + list(random_groupings(a, n_random, seed))
        cf = [_correct(zf, y, g, "prob_sum") for g in groupings]
        cq = [_correct(zq, y, g, "prob_sum") for g in groupings]
        drops, advantages = [], []
        for rows in idx:
            d = [100 * (f[rows].mean() - q[rows].mean()) for f, q in zip(cf, cq)]
            drops.append(d[0])
            advantages.append(np.mean(d[1:]) - d[0])
        out[k] = (*np.percentile(drops, [2.5, 97.5]), *np.percentile(advantages, [2.5, 97.5]))
    return out


def test_bootstrap_intervals_match_a_plain_loop_reference():
    zf, zq, y = _data()
    levels = {3: np.array([0, 0, 1, 1, 2, 2]), 2: np.array([0, 1, 0, 1, 0, 1]), 6: np.arange(6)}
    rows = evaluate_levels(zf, zq, y, levels, n_random=7, seed=3, bootstrap=200)
    expected = _reference_intervals(zf, zq, y, levels, 7, 3, 200)
    for row in rows:
        got = (row["drop_lo"], row["drop_hi"], row["advantage_lo"], row["advantage_hi"])
        np.testing.assert_allclose(got, expected[row["k"]], atol=1e-4)
        assert row["drop_lo"] <= row["drop"] <= row["drop_hi"] or row["drop_lo"] == row["drop_hi"]
    assert rows[2]["advantage_lo"] == rows[2]["advantage_hi"] == 0.0  # k = C: random = learned
    # the same seed gives the same resamples, another seed other ones
    again = evaluate_levels(zf, zq, y, levels, n_random=7, seed=3, bootstrap=200)
    assert again == rows
    other = evaluate_levels(zf, zq, y, levels, n_random=7, seed=4, bootstrap=200)
    assert [r["drop_lo"] for r in other] != [r["drop_lo"] for r in rows]


def test_fine_bootstrap_matches_a_plain_loop_reference():
    zf, zq, y = _data(seed=2)
    got = fine_bootstrap(zf, zq, y, 150, seed=5)
    cf, cq = (zf.argmax(1) == y).numpy(), (zq.argmax(1) == y).numpy()
    idx = np.concatenate(list(bootstrap_resamples(len(y), 150, 5)))
    acc = [cq[rows].mean() for rows in idx]
    drops = [100 * (cf[rows].mean() - cq[rows].mean()) for rows in idx]
    expected = (*np.percentile(acc, [2.5, 97.5]), *np.percentile(drops, [2.5, 97.5]))
    keys = ("fine_acc_lo", "fine_acc_hi", "fine_drop_lo", "fine_drop_hi")
    np.testing.assert_allclose([got[k] for k in keys], expected, atol=1e-5)
    assert fine_bootstrap(zf, zq, y, 0) == dict.fromkeys(keys)


def test_no_bootstrap_gives_no_intervals_and_mismatched_float_stats_are_refused():
    zf, zq, y = _data()
    levels = {3: np.array([0, 0, 1, 1, 2, 2])}
    row = evaluate_levels(zf, zq, y, levels, n_random=4)[0]
    assert row["drop_lo"] is row["drop_hi"] is row["advantage_lo"] is row["advantage_hi"] is None
    stats = float_level_stats(zf, y, levels, n_random=4)
    with pytest.raises(HierclusterError, match="bootstrap=0"):
        evaluate_levels(zf, zq, y, levels, n_random=4, float_stats=stats, bootstrap=10)
    with pytest.raises(HierclusterError, match="bootstrap must be >= 0"):
        evaluate_levels(zf, zq, y, levels, n_random=4, bootstrap=-1)


def test_rank_p_by_hand():
    # 2 of 4 random drops are <= 1.0 (0.5 and the tie 1.0): (1 + 2) / (4 + 1)
    assert rank_p(1.0, [2.0, 3.0, 0.5, 1.0]) == pytest.approx(0.6)
    assert rank_p(0.0, [1.0] * 20) == pytest.approx(1 / 21)  # the floor with 20 random groupings
    assert rank_p(5.0, [1.0, 2.0]) == 1.0


def test_rank_p_in_the_rows_counts_the_random_groupings_drops():
    """A constructed case: the quantized model confuses 0<->1 only, which the learned grouping merges."""
    n_per, c = 10, 6
    y = torch.arange(c).repeat_interleave(n_per)
    zf = 5.0 * torch.nn.functional.one_hot(y, c).float()
    swap = y.clone()
    swap[(y == 0)] = 1
    swap[(y == 1)] = 0
    zq = 5.0 * torch.nn.functional.one_hot(swap, c).float()
    learned = np.array([0, 0, 1, 1, 2, 2])  # 0 and 1 together: no drop at all
    row = evaluate_levels(zf, zq, y, {3: learned}, n_random=9, seed=0)[0]
    assert row["drop"] == 0.0
    randoms = random_groupings(learned, 9, 0)
    together = sum(int(r[0] == r[1]) for r in randoms)  # those random groupings also lose nothing
    assert row["rank_p"] == pytest.approx((1 + together) / 10)
    assert row["fine_acc_quant"] == pytest.approx(4 / 6)
    # absorbed share by hand: the fine drop is 100 * 2/6 pp, the learned grouping's 0 -> all absorbed
    assert row["absorbed_share"] == pytest.approx(1.0)
    random_drop = 100 * (2 / 6) * (9 - together) / 9
    assert row["random_drop_mean"] == pytest.approx(random_drop)
    assert row["random_absorbed_share_mean"] == pytest.approx(1 - random_drop / (100 * 2 / 6))
    assert row["group_sizes"] == "2+2+2"


def test_absorbed_share_by_hand_and_undefined_without_a_fine_drop():
    assert absorbed_share(0.5, 2.0) == pytest.approx(0.75)
    assert absorbed_share(3.0, 2.0) == pytest.approx(-0.5)
    assert absorbed_share(0.5, 0.0) is None
    zf, _, y = _data()
    row = evaluate_levels(zf, zf.clone(), y, {3: np.array([0, 0, 1, 1, 2, 2])}, n_random=3)[0]
    assert row["absorbed_share"] is None and row["random_absorbed_share_mean"] is None


def test_group_sizes_largest_first():
    assert group_sizes([0, 0, 0, 0, 1, 1, 1, 2, 3, 4]) == "4+3+1+1+1"
    assert group_sizes([2, 1, 1, 0]) == "2+1+1"


def _result(k, bits, drop, drop_hi):
    return {"level": f"k={k}", "k": k, "grouping": "learned", "acc_float": 0.9, "bits": bits, "drop": drop,
            "drop_hi": drop_hi, "tag": f"t{bits}"}


def test_confident_or_borderline_by_the_intervals_upper_end():
    rows = [
        _result(10, 4, 0.2, 0.5), _result(10, 3, 0.88, 1.20),  # 3 bits pass, interval straddles 1 pp
        _result(3, 4, 0.1, 0.3), _result(3, 3, 0.6, 0.95),  # 3 bits pass, interval within 1 pp
        _result(2, 3, 0.7, None),  # no interval
        _result(5, 3, 4.0, 5.0),  # nothing passes
    ]
    table = {t["level"]: t for t in headline(rows, 1.0)}
    assert table["k=10"]["min_bits"] == 3 and table["k=10"]["confidence"] == "borderline"
    assert table["k=3"]["min_bits"] == 3 and table["k=3"]["confidence"] == "confident"
    assert table["k=2"]["confidence"] is None
    assert table["k=5"]["min_bits"] is None and table["k=5"]["confidence"] is None
    assert min_bits(rows, 1.0)[10]["confidence"] == "borderline"
    assert min_bits(rows, 1.2)[10]["confidence"] == "confident"  # the upper end equal to tolerance is within it
