"""Evaluation from kept logits: one forward pass per model, every metric afterwards.

:func:`~hiercluster.evaluation.inference.collect_logits` runs a model once over a loader; this module
works on the logits it returns, never re-running the model (DESIGN.md, "Evaluation cost").

* :func:`grouped_metrics` / :func:`grouped_accuracies`: grouped accuracy of many
  groupings at once (one-hot products for few groups, segment sums for many);
* :func:`random_groupings` / :func:`random_baseline`: same group sizes, random classes;
* :func:`drop`, :func:`advantage`, :func:`min_bits`: DESIGN.md's definitions
  (accuracies are fractions, drops and advantages percentage points);
* :func:`bootstrap_resamples`, :func:`rank_p`, :func:`absorbed_share`, :func:`fine_bootstrap`:
  DESIGN.md's "Statistics" (paired bootstrap intervals, the chance test, the absorbed share);
* :func:`evaluate_levels`: all of it for one quantized model at every level, with the
  float model's side computed once per run by :func:`float_level_stats`;
* :func:`prediction_share`, :func:`bias_report`: where quantization moves predictions.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse

from hiercluster.errors import HierclusterError
from hiercluster.evaluation.heads import REDUCTIONS
from hiercluster.evaluation.inference import accuracy
from hiercluster.hierarchy.groupings import Groups, as_assignment, canonical_assignment

# --- grouped accuracy, many groupings at once ------------------------------------------

# Upper bound on the elements of one (samples, groupings, groups) score block: larger work
# is split into chunks of groupings and of samples, so memory stays bounded whatever N, G and k.
_MAX_BLOCK = 1 << 21
# Widest side-by-side one-hot block (groupings x groups) of one matrix product: wide enough
# for BLAS to run at full speed, narrow enough to leave long sample chunks under _MAX_BLOCK.
_BLOCK_WIDTH = 1024
# From this many groups on, a grouping is scored on the CPU by a segment sum over each
# group's members (C adds per sample, whatever k) instead of the one-hot product (C * k
# multiply-adds per sample, at BLAS speed). On 1,000 classes the segment sum wins from about
# k = 8 on (benchmarks/bench_many_classes.py --kernels).
_SEGMENT_MIN_K = 8
# Elements (classes x samples) of one transposed sample chunk of the segment sum: a few MB,
# so that the chunk stays in cache while every grouping is summed over it; but at least
# _SEGMENT_MIN_SAMPLES samples, lest per-call overhead dominate with tens of thousands of classes.
_SEGMENT_CHUNK = 1 << 20
_SEGMENT_MIN_SAMPLES = 256


def _logits_labels(logits: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked ``(N, C)`` float logits and ``(N,)`` int64 labels, the labels on the logits' device."""
    z = torch.as_tensor(logits)
    y = torch.as_tensor(labels).long()
    if not z.is_floating_point():
        z = z.float()
    if z.ndim != 2 or y.ndim != 1 or len(z) != len(y):
        raise HierclusterError(f"need logits (N, C) and labels (N,), got {tuple(z.shape)} and {tuple(y.shape)}")
    if len(y) == 0:
        raise HierclusterError("no samples: the logits are empty")
    if y.min() < 0 or y.max() >= z.shape[1]:
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        raise HierclusterError(f"label {bad} is outside the {z.shape[1]} classes of the logits")
    return z, y.to(z.device)


def _check_assignments(assignments: Any, n_classes: int) -> np.ndarray:
    """A ``(G, C)`` int64 stack of group ids (one row allowed), refused unless it fits ``n_classes``."""
    if isinstance(assignments, torch.Tensor):
        assignments = assignments.cpu()
    a = np.ascontiguousarray(np.asarray(assignments), dtype=np.int64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] != n_classes or (a.size and int(a.min()) < 0):
        raise HierclusterError(
            f"assignments must be (G, C={n_classes}) non-negative group ids, got shape {tuple(a.shape)}"
        )
    return a


def grouped_accuracies(
    logits: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    assignments: np.ndarray,
    reduction: str = "prob_sum",
) -> np.ndarray:
    """Grouped accuracy of every row of a ``(G, C)`` stack of assignments, vectorized.

    A sample counts as correct when the argmax superclass is the one holding its true
    class. Superclasses are ranked as :func:`hiercluster.evaluation.heads.group_argmax`
    ranks them (ties go to the lower group id); how depends on the number of groups k:

    * few groups: one matrix product of the ``(N, C)`` scores with the one-hot class ->
      group matrices of many groupings side by side (BLAS, C * k multiply-adds per sample);
    * many groups (k >= 8, CPU): a segment sum of each group's members (C adds per
      sample, whatever k), over chunks of samples that stay in cache.

    The softmax is computed once per call, and each distinct grouping is scored once
    (the random groupings of k = C or k = 1 all equal the learned one). Memory is bounded
    by chunks of groupings and of samples. The logits may live on any device: the work
    stays there, and only the counts come back to the CPU.

    Examples
    --------
    >>> z = torch.tensor([[3.0, 2.0, 0.0], [0.0, 1.0, 2.0]])
    >>> grouped_accuracies(z, torch.tensor([1, 2]), np.array([[0, 1, 2], [0, 0, 1], [0, 1, 1]]))
    array([0.5, 1. , 0.5])
    """
    z, y = _logits_labels(logits, labels)
    if reduction not in REDUCTIONS:
        raise HierclusterError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    a = _check_assignments(assignments, z.shape[1])
    if len(a) == 0:
        return np.empty(0)
    distinct, inverse = _distinct_rows(a)
    return _correct_counts(z, y, distinct, reduction)[inverse] / len(y)


def grouped_correct_sums(
    logits: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    assignments: np.ndarray,
    slots: np.ndarray,
    n_slots: int,
    reduction: str = "prob_sum",
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`grouped_accuracies` plus per-sample correctness summed over groupings into slots.

    Parameters
    ----------
    logits, labels, assignments, reduction
        As for :func:`grouped_accuracies`.
    slots : ``(G,)`` int
        The slot each grouping's per-sample correctness is added to; ``-1``: not kept.
    n_slots : int

    Returns
    -------
    acc : ``(G,)``
        Grouped accuracy of every grouping (the same numbers as :func:`grouped_accuracies`).
    sums : ``(n_slots, N)`` float32
        ``sums[s, i]``: how many groupings of slot ``s`` put sample ``i`` in its true group.
        Dividing a slot of R random groupings by R gives their mean correctness per sample
        (the paired bootstrap's input), at the cost of one scatter-add per scored block.

    Examples
    --------
    >>> z = torch.tensor([[3.0, 2.0, 0.0], [0.0, 1.0, 2.0]])
    >>> acc, sums = grouped_correct_sums(z, torch.tensor([1, 2]), np.array([[0, 1, 2], [0, 0, 1], [0, 1, 1]]),
    ...                                  np.array([0, 1, 1]), 2)
    >>> acc.tolist(), sums.tolist()
    ([0.5, 1.0, 0.5], [[0.0, 1.0], [1.0, 2.0]])
    """
    z, y = _logits_labels(logits, labels)
    if reduction not in REDUCTIONS:
        raise HierclusterError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    a = _check_assignments(assignments, z.shape[1])
    slots = np.asarray(slots, dtype=np.int64)
    if slots.shape != (len(a),) or (slots.size and (slots.min() < -1 or slots.max() >= n_slots)):
        raise HierclusterError(f"slots must be ({len(a)},) ints in [-1, {n_slots}), got shape {slots.shape}")
    if len(a) == 0:
        return np.empty(0), np.zeros((n_slots, len(y)), dtype=np.float32)
    distinct, inverse = _distinct_rows(a)
    sums = _SlotSums(inverse, slots, n_slots, len(y), z.device)
    counts = _correct_counts(z, y, distinct, reduction, sums)
    return counts[inverse] / len(y), sums.result()


class _SlotSums:
    """Per-sample correctness of distinct groupings, scatter-added into slots ``(N, S)``.

    A distinct grouping may stand for several rows (the random groupings of k = C or
    k = 1 all equal the learned one): each (distinct row, slot) pair is added with the
    number of rows it stands for.
    """

    def __init__(self, inverse: np.ndarray, slots: np.ndarray, n_slots: int, n: int, device: torch.device) -> None:
        keep = slots >= 0
        pairs, weight = np.unique(np.stack([inverse[keep], slots[keep]], 1), axis=0, return_counts=True)
        pairs = pairs.reshape(-1, 2)
        self._row, self._slot, self._weight = pairs[:, 0], pairs[:, 1], weight.astype(np.float32)
        self._starts = np.searchsorted(self._row, np.arange(int(inverse.max()) + 2))
        self._device = device
        self._out = torch.zeros(n, n_slots, dtype=torch.float32, device=device)

    def add(self, rows: np.ndarray, lo: int, correct: torch.Tensor | np.ndarray) -> None:
        """Add ``correct`` ``(r, len(rows))`` (samples ``lo:lo+r`` of the distinct ``rows``) to their slots."""
        rows = np.asarray(rows, dtype=np.int64)
        per = self._starts[rows + 1] - self._starts[rows]
        if not per.any():
            return
        column = np.repeat(np.arange(len(rows)), per)
        first = np.repeat(self._starts[rows] - np.cumsum(per) + per, per)
        pair = first + np.arange(len(column))
        correct = torch.as_tensor(correct, device=self._device)
        dev = self._device
        src = correct[:, torch.as_tensor(column, device=dev)].to(torch.float32)
        src = src * torch.as_tensor(self._weight[pair], device=dev)
        self._out[lo : lo + len(correct)].index_add_(1, torch.as_tensor(self._slot[pair], device=dev), src)

    def result(self) -> np.ndarray:
        return self._out.T.contiguous().cpu().numpy()


def _distinct_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each distinct row of ``a`` once, in order of first appearance, and ``inverse`` with ``a == distinct[inverse]``."""
    seen: dict[bytes, int] = {}
    inverse = np.array([seen.setdefault(row.tobytes(), len(seen)) for row in a], dtype=np.int64)
    first = np.unique(inverse, return_index=True)[1]
    return a[first], inverse


def _correct_counts(
    z: torch.Tensor, y: torch.Tensor, a: np.ndarray, reduction: str, sums: _SlotSums | None = None
) -> np.ndarray:
    """Correctly grouped samples ``(G,)`` of every grouping of ``a``, each by the cheaper kernel for its k.

    With ``sums``, every kernel also adds each grouping's per-sample correctness to it.
    """
    if reduction == "argmax_then_map":
        return _vote_counts(z, y, a, sums)
    source = torch.exp(z - z.amax(1, keepdim=True)) if reduction == "prob_sum" else z  # what group sums add up
    segment = a.max(1) + 1 >= _SEGMENT_MIN_K
    # The segment sum runs in numpy; elsewhere (another device, a half dtype) and for
    # non-finite scores, whose NaN ranking only torch's argmax defines, the product does all.
    if not (source.device.type == "cpu" and source.dtype in (torch.float32, torch.float64)):
        segment[:] = False
    elif segment.any() and not bool(torch.isfinite(source).all()):
        segment[:] = False
    counts = np.zeros(len(a), dtype=np.int64)
    ids = np.arange(len(a))
    if not segment.all():
        counts[~segment] = _dense_counts(source, y, a[~segment], reduction, sums, ids[~segment])
    if segment.any():
        counts[segment] = _segment_counts(source, y, a[segment], reduction, sums, ids[segment])
    return counts


def _vote_counts(z: torch.Tensor, y: torch.Tensor, a: np.ndarray, sums: _SlotSums | None = None) -> np.ndarray:
    """``argmax_then_map``: the fine prediction's group against the true class's group."""
    fine = z.argmax(1)
    at = torch.as_tensor(a, device=z.device)
    step = max(1, _MAX_BLOCK // len(y))
    hits = []
    for lo in range(0, len(a), step):
        correct = at[lo : lo + step][:, fine] == at[lo : lo + step][:, y]  # (g, N)
        hits.append(correct.sum(1))
        if sums is not None:
            sums.add(np.arange(lo, min(lo + step, len(a))), 0, correct.T)
    return torch.cat(hits).cpu().numpy()


def _same_k_blocks(ks: np.ndarray, width: int) -> Iterable[tuple[np.ndarray, int]]:
    """Row indices of ``ks`` in blocks of one k each, at most ``width // k`` rows (at least one) a block."""
    order = np.argsort(ks, kind="stable")
    sorted_ks = ks[order]
    starts = np.flatnonzero(np.r_[True, sorted_ks[1:] != sorted_ks[:-1]])
    for start, stop in zip(starts, np.r_[starts[1:], len(ks)]):
        k = int(sorted_ks[start])
        step = max(1, width // k)
        for lo in range(start, stop, step):
            yield order[lo : min(lo + step, stop)], k


def _dense_counts(
    source: torch.Tensor,
    y: torch.Tensor,
    a: np.ndarray,
    reduction: str,
    sums: _SlotSums | None = None,
    ids: np.ndarray | None = None,
) -> np.ndarray:
    """The one-hot product: scores of g groupings with the same k side by side, ``(r, C) @ (C, g * k)``.

    ``source`` is ``exp(z - max z)`` for ``prob_sum`` and the logits for ``mean_logit``:
    the ranking scores of :func:`~hiercluster.evaluation.heads.group_argmax`, empty groups
    (an id skipped) included. Runs on ``source``'s device. ``sums`` receives every block's
    per-sample correctness, ``ids`` naming the rows of ``a`` there.
    """
    n = len(y)
    at = torch.as_tensor(a, device=source.device)
    counts = torch.zeros(len(a), dtype=torch.int64, device=source.device)
    for rows, k in _same_k_blocks(a.max(1) + 1, _BLOCK_WIDTH):
        block = at[torch.as_tensor(rows, device=source.device)]  # (g, C)
        g = len(rows)
        onehot = F.one_hot(block, k).to(source.dtype)  # (g, C, k)
        members = onehot.sum(1).reshape(-1)  # (g * k,): class count of every group
        onehot = onehot.permute(1, 0, 2).reshape(-1, g * k)  # (C, g * k): groupings side by side
        hits = torch.zeros(g, dtype=torch.int64, device=source.device)
        step = max(1, _MAX_BLOCK // (g * k))
        for lo in range(0, n, step):
            scores = source[lo : lo + step] @ onehot
            if reduction == "mean_logit":
                scores = (scores / members.clamp_min(1)).masked_fill(members == 0, float("-inf"))
            predicted = scores.view(-1, g, k).argmax(-1)  # (r, g)
            correct = predicted == block[:, y[lo : lo + step]].T
            hits += correct.sum(0)
            if sums is not None:
                sums.add(ids[rows], lo, correct)
        counts[torch.as_tensor(rows, device=source.device)] = hits
    return counts.cpu().numpy()


def _segment_counts(
    source: torch.Tensor,
    y: torch.Tensor,
    a: np.ndarray,
    reduction: str,
    sums: _SlotSums | None = None,
    ids: np.ndarray | None = None,
) -> np.ndarray:
    """The segment sum (CPU): a sparse ``(k, C)`` membership matrix times a transposed chunk of scores.

    Every sample's C scores are added once per grouping, in class order, instead of
    ``C * k`` multiply-adds; the chunk of ``C x r`` scores stays in cache while all the
    groupings are summed over it.
    """
    slot_sums = sums
    src = source.detach().numpy()
    n, c = src.shape
    truth_ids = y.numpy()
    classes, ones = np.arange(c), np.ones(c, dtype=src.dtype)
    members = [sparse.csr_matrix((ones, (row, classes)), shape=(int(row.max()) + 1, c)) for row in a]
    sizes = [np.bincount(row).astype(src.dtype)[:, None] for row in a] if reduction == "mean_logit" else None
    counts = np.zeros(len(a), dtype=np.int64)
    step = max(_SEGMENT_MIN_SAMPLES, _SEGMENT_CHUNK // c)
    for lo in range(0, n, step):
        chunk = np.ascontiguousarray(src[lo : lo + step].T)  # (C, r): one contiguous row per class
        truth = truth_ids[lo : lo + step]
        for i, (row, matrix) in enumerate(zip(a, members)):
            scores = matrix @ chunk  # (k, r)
            if sizes is not None:  # the mean logit; an empty group (an id skipped) never wins
                scores = np.divide(scores, np.maximum(sizes[i], 1), out=scores)
                scores[sizes[i][:, 0] == 0] = -np.inf
            correct = _first_argmax_mask(scores, row[truth])
            counts[i] += int(np.count_nonzero(correct))
            if slot_sums is not None:
                slot_sums.add(ids[i : i + 1], lo, correct[:, None])
    return counts


def _first_argmax_hits(scores: np.ndarray, truth: np.ndarray) -> int:
    """How many columns of ``scores`` ``(k, r)`` have their first maximum in row ``truth[j]``.

    Overwrites ``scores``; see :func:`_first_argmax_mask`.
    """
    return int(np.count_nonzero(_first_argmax_mask(scores, truth)))


def _first_argmax_mask(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Whether each column of ``scores`` ``(k, r)`` has its first maximum in row ``truth[j]``, ``(r,)`` bool.

    Each column's own score against the best of its other rows (a max down the rows is
    fast where numpy's argmax along the slow axis is not); the rare exact ties go to
    argmax, which takes the first. Overwrites ``scores``.
    """
    cols = np.arange(scores.shape[1])
    own = scores[truth, cols]
    scores[truth, cols] = -np.inf
    rival = scores.max(0)  # the best other group of every sample
    correct = own > rival
    tied = np.flatnonzero(own == rival)
    if len(tied):
        scores[truth[tied], tied] = own[tied]
        correct[tied] = scores[:, tied].argmax(0) == truth[tied]
    return correct


def grouped_metrics(
    logits: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    groupings: Mapping[Any, Groups] | Sequence[Groups],
    reduction: str = "prob_sum",
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Fine accuracy and the grouped accuracy of many groupings, from kept logits.

    Parameters
    ----------
    logits, labels : tensors or arrays
        ``(N, C)`` fine logits and ``(N,)`` true fine labels.
    groupings : dict or list
        ``{name: grouping}`` (any form :func:`~hiercluster.hierarchy.groupings.as_assignment` takes),
        or a list of groupings (named by position).
    reduction : {"prob_sum", "mean_logit", "argmax_then_map"}
    class_names : list of str, optional
        Needed when groupings name classes.

    Returns
    -------
    dict
        ``{"fine_acc": float, "grouped_acc": {name: float}}``; accuracies are fractions.

    Examples
    --------
    >>> z = torch.tensor([[3.0, 2.0, 0.0], [0.0, 1.0, 2.0]])
    >>> grouped_metrics(z, torch.tensor([1, 2]), {"01|2": [[0, 1], [2]], "all": [[0, 1, 2]]})
    {'fine_acc': 0.5, 'grouped_acc': {'01|2': 1.0, 'all': 1.0}}
    """
    z, y = _logits_labels(logits, labels)
    cls: Sequence[str] | int = class_names if class_names is not None else z.shape[1]
    items = list(groupings.items()) if isinstance(groupings, Mapping) else list(enumerate(groupings))
    if not items:
        raise HierclusterError("no groupings given")
    stack = np.stack([as_assignment(g, cls) for _, g in items])
    accs = grouped_accuracies(z, y, stack, reduction)
    return {"fine_acc": accuracy(z, y), "grouped_acc": {name: float(acc) for (name, _), acc in zip(items, accs)}}


# --- random baseline ---------------------------------------------------------------------


def random_groupings(assignment: Groups, n_seeds: int = 20, seed: int = 0) -> np.ndarray:
    """Random groupings with the same multiset of group sizes, ``(n_seeds, C)``.

    Each row assigns the classes to groups of the given sizes uniformly at random
    (a random permutation of the size pattern), canonicalized. Deterministic given
    ``seed`` (numpy ``default_rng(seed)``).

    Examples
    --------
    >>> r = random_groupings([0, 0, 0, 1, 2], n_seeds=3, seed=1)
    >>> r.shape, sorted(np.bincount(r[0]).tolist())
    ((3, 5), [1, 1, 3])
    """
    a = as_assignment(assignment)
    if n_seeds < 1:
        raise HierclusterError(f"n_seeds must be >= 1, got {n_seeds}")
    template = np.repeat(np.arange(int(a.max()) + 1), np.bincount(a))
    shuffled = np.random.default_rng(seed).permuted(np.tile(template, (n_seeds, 1)), axis=1)
    return np.stack([canonical_assignment(row) for row in shuffled])


def random_baseline(
    logits: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    assignment: Groups,
    n_seeds: int = 20,
    seed: int = 0,
    reduction: str = "prob_sum",
) -> np.ndarray:
    """Grouped accuracies ``(n_seeds,)`` of :func:`random_groupings` of ``assignment``."""
    return grouped_accuracies(logits, labels, random_groupings(assignment, n_seeds, seed), reduction)


# --- drop, advantage, min bits --------------------------------------------------------------


def drop(acc_float: Any, acc_quant: Any) -> Any:
    """Accuracy lost by quantization in percentage points: ``100 * (acc_float - acc_quant)``.

    Accuracies are fractions; works elementwise on arrays.

    Examples
    --------
    >>> round(drop(0.92, 0.89), 6)
    3.0
    """
    out = 100.0 * (np.asarray(acc_float, dtype=np.float64) - np.asarray(acc_quant, dtype=np.float64))
    return float(out) if out.ndim == 0 else out


def advantage(drop_learned: Any, drop_random_mean: Any) -> Any:
    """What a learned grouping buys over random ones of the same sizes, in pp:
    ``mean drop(random) - drop(learned)``; positive means the hierarchy helped.

    Examples
    --------
    >>> advantage(1.5, 4.0)
    2.5
    """
    out = np.asarray(drop_random_mean, dtype=np.float64) - np.asarray(drop_learned, dtype=np.float64)
    return float(out) if out.ndim == 0 else out


def min_bits(
    results: Iterable[Mapping[str, Any]], tolerance: float = 1.0, by: str = "bits"
) -> dict[Any, dict[str, Any] | None]:
    """The fewest bits that keep the drop within ``tolerance`` pp, for every level.

    Parameters
    ----------
    results : iterable of dict
        One row per evaluated (level, model) with at least ``"k"`` (level), ``"bits"``
        and ``"drop"`` (pp); any other keys (``scheme``, ``acc_quant``, ...) are carried
        along. Rows of the rows :func:`evaluate_levels` returns, with ``bits`` added, fit.
    tolerance : float, default 1.0
        In percentage points.
    by : str, default "bits"
        The column ranked: ``"avg_bits"`` ranks mixed-precision and partial plans by
        their average bits per weight (the headline does).

    Returns
    -------
    dict
        ``{k: row or None}`` for every k seen, descending: the winning row without its
        ``"k"`` (so ``{"bits": b, "drop": d, ...}``), or ``None`` when no row of that
        level has ``drop <= tolerance``. A winning row with a ``drop_hi`` (the upper end
        of its drop's 95% interval) also gets ``"confidence"`` (:func:`confidence`). The winner has the smallest ``bits`` among the
        passing rows (the literal definition: a passing b is reported even if a larger b
        fails); ties on bits go to the smaller drop, then to the earlier row.

    Examples
    --------
    >>> rows = [{"k": 10, "bits": 4, "drop": 0.4, "scheme": "asym"},
    ...         {"k": 10, "bits": 3, "drop": 6.0, "scheme": "asym"},
    ...         {"k": 2, "bits": 3, "drop": 0.9, "scheme": "asym"},
    ...         {"k": 2, "bits": 2, "drop": 30.0, "scheme": "asym"}]
    >>> min_bits(rows)
    {10: {'bits': 4, 'drop': 0.4, 'scheme': 'asym'}, 2: {'bits': 3, 'drop': 0.9, 'scheme': 'asym'}}
    """
    best: dict[Any, Mapping[str, Any] | None] = {}
    for i, row in enumerate(results):
        missing = [key for key in ("k", by, "drop") if key not in row]
        if missing:
            raise HierclusterError(
                f"min_bits: result row {i} lacks {', '.join(map(repr, missing))}; each row needs k, bits and drop"
            )
        k = row["k"]
        current = best.setdefault(k, None)
        if not float(row["drop"]) <= tolerance:  # also rejects NaN
            continue
        if current is None or (row[by], row["drop"]) < (current[by], current["drop"]):
            best[k] = row
    return {
        k: None if row is None else _winner(row, tolerance)
        for k, row in sorted(best.items(), key=lambda item: item[0], reverse=True)
    }


def _winner(row: Mapping[str, Any], tolerance: float) -> dict[str, Any]:
    """A winning row without ``k``, bits first; with its confidence when the row has an interval."""
    out = {"bits": row["bits"], **{f: v for f, v in row.items() if f not in ("k", "bits")}}
    if "drop_hi" in row:
        out["confidence"] = confidence(row, tolerance)
    return out


# --- statistics: paired bootstrap, chance test, absorbed share ----------------------------

# The bootstrap's random stream is numpy's default_rng([_BOOTSTRAP_STREAM, seed]): seeded by
# eval.seed like the random groupings, but a stream of its own, so that changing the number of
# resamples never changes the groupings (and the reverse).
_BOOTSTRAP_STREAM = 0xB0075
# Index resamples generated (and turned into counts) per chunk: bounded memory at any N.
_BOOTSTRAP_CHUNK = 1 << 22
# Resample-count matrices up to this many elements (float64: 128 MiB) are kept for the next call
# with the same (N, R, seed): every spec of a run resamples the same samples the same way.
_MAX_CACHED_WEIGHTS = 1 << 24
_weights_cache: dict[tuple[int, int, int], np.ndarray] = {}
CONFIDENCE_LEVEL = 0.95


def bootstrap_resamples(n: int, n_resamples: int, seed: int = 0) -> Iterable[np.ndarray]:
    """The paired bootstrap's resamples of ``n`` evaluation samples, in chunks of ``(r, n)`` indices.

    Row ``j`` of the concatenated chunks is resample ``j``: ``n`` sample indices drawn
    with replacement. Deterministic given ``seed``; the float and the quantized logits of
    every spec are resampled with these same indices (that is what makes it paired).

    Examples
    --------
    >>> idx = np.concatenate(list(bootstrap_resamples(5, 3, seed=1)))
    >>> idx.shape, bool(((0 <= idx) & (idx < 5)).all())
    ((3, 5), True)
    """
    if n < 1 or n_resamples < 0:
        raise HierclusterError(f"bootstrap needs n >= 1 samples and n_resamples >= 0, got {n} and {n_resamples}")
    rng = np.random.default_rng([_BOOTSTRAP_STREAM, int(seed)])
    step = max(1, _BOOTSTRAP_CHUNK // n)
    for lo in range(0, n_resamples, step):
        yield rng.integers(0, n, size=(min(step, n_resamples - lo), n))


def _resample_counts(idx: np.ndarray, n: int) -> np.ndarray:
    """``(r, n)`` float64: how often each sample occurs in each resample (the multinomial counts).

    float64, so that sums of whole-count values stay exact (below 2**53) in any summation order.
    """
    r = len(idx)
    flat = (idx + (np.arange(r) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=r * n).reshape(r, n).astype(np.float64)


def bootstrap_means(values: np.ndarray, n_resamples: int, seed: int = 0) -> np.ndarray:
    """Mean of every column of ``values`` ``(N, m)`` in every resample, ``(n_resamples, m)``.

    One matrix product per chunk of resamples, ``counts (r, N) @ values (N, m) / N``: no
    metric is recomputed per resample. The counts are cached for the next call with the
    same ``(N, n_resamples, seed)`` when they are small (:data:`_MAX_CACHED_WEIGHTS`).
    """
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    key = (n, n_resamples, int(seed))
    cached = _weights_cache.get(key)
    if cached is not None:
        return (cached @ v) / n
    chunks = [_resample_counts(idx, n) for idx in bootstrap_resamples(n, n_resamples, seed)]
    if not chunks:
        return np.empty((0, v.shape[1]))
    if n_resamples * n <= _MAX_CACHED_WEIGHTS:
        weights = np.concatenate(chunks)
        _weights_cache.clear()  # one run's resamples at a time
        _weights_cache[key] = weights
        return (weights @ v) / n
    return np.concatenate([w @ v for w in chunks]) / n


def percentile_interval(samples: np.ndarray, level: float = CONFIDENCE_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)``: the percentile method's interval of each column of ``samples`` ``(R, m)``.

    Examples
    --------
    >>> lo, hi = percentile_interval(np.arange(101.0)[:, None])
    >>> round(float(lo[0]), 6), round(float(hi[0]), 6)
    (2.5, 97.5)
    """
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail], axis=0)
    return lo, hi


def rank_p(learned_drop: float, random_drops: Any) -> float:
    """The chance test: how unusual the learned grouping's drop is among random groupings'.

    ``p = (1 + #{random drops <= learned drop}) / (R + 1)``. DESIGN.md words it as the
    share of random groupings whose drop is <= the learned one; the ``+1`` form counts
    the learned grouping among the candidates, so that p is a valid (never 0) p-value of
    the rank test: with R random groupings the smallest p is ``1 / (R + 1)`` (with 20,
    1/21 = 0.048, which is why the default is 100). Ties count against the learned grouping.

    Examples
    --------
    >>> rank_p(1.0, [2.0, 3.0, 0.5, 1.0])
    0.6
    >>> rank_p(0.1, [2.0, 3.0, 0.5, 1.0])
    0.2
    """
    r = np.asarray(random_drops, dtype=np.float64)
    return float((1 + np.count_nonzero(r <= learned_drop)) / (len(r) + 1))


def absorbed_share(drop_k: Any, drop_fine: float) -> Any:
    """``1 - drop_k / drop_fine``: the share of the fine-level drop that merging classes absorbs.

    Comparable across groupings, unlike the advantage in pp, which scales with the fine
    drop. ``None`` when ``drop_fine`` is 0 (nothing to absorb) or not finite.

    Examples
    --------
    >>> absorbed_share(0.5, 2.0), absorbed_share(0.5, 0.0)
    (0.75, None)
    """
    if drop_fine == 0 or not np.isfinite(drop_fine):
        return None
    return 1.0 - float(drop_k) / float(drop_fine)


def group_sizes(assignment: Groups) -> str:
    """Group sizes, largest first: ``"4+3+1+1+1"``.

    Examples
    --------
    >>> group_sizes([0, 0, 1, 2, 1, 0])
    '3+2+1'
    """
    sizes = np.bincount(as_assignment(assignment))
    return "+".join(str(int(s)) for s in sorted(sizes[sizes > 0], reverse=True))


def fine_bootstrap(
    float_logits: torch.Tensor | np.ndarray,
    quant_logits: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    n_resamples: int,
    seed: int = 0,
) -> dict[str, float | None]:
    """95% paired-bootstrap intervals of the quantized model's fine accuracy and its fine drop.

    The resamples are :func:`bootstrap_resamples` of ``(N, n_resamples, seed)``, the same
    :func:`evaluate_levels` uses. Returns ``fine_acc_lo``, ``fine_acc_hi`` (fractions),
    ``fine_drop_lo``, ``fine_drop_hi`` (pp); all ``None`` when ``n_resamples`` is 0.
    """
    zf, y = _logits_labels(float_logits, labels)
    zq, yq = _logits_labels(quant_logits, labels)
    if zf.shape != zq.shape:
        raise HierclusterError(f"float logits {tuple(zf.shape)} and quantized logits {tuple(zq.shape)} differ in shape")
    keys = ("fine_acc_lo", "fine_acc_hi", "fine_drop_lo", "fine_drop_hi")
    if n_resamples == 0:
        return dict.fromkeys(keys)
    cf = (zf.argmax(1) == y).cpu().numpy().astype(np.float32)
    cq = (zq.argmax(1) == yq).cpu().numpy().astype(np.float32)
    lo, hi = percentile_interval(bootstrap_means(np.stack([cq, cf - cq], 1), n_resamples, seed))
    return dict(zip(keys, (float(lo[0]), float(hi[0]), 100 * float(lo[1]), 100 * float(hi[1]))))


def confidence(winner: Mapping[str, Any] | None, tolerance: float) -> str | None:
    """``"confident"`` when the winner's drop interval ends within ``tolerance``, ``"borderline"``
    when it does not, ``None`` without a winner or an interval.

    Examples
    --------
    >>> confidence({"drop": 0.88, "drop_hi": 1.20}, 1.0), confidence({"drop": 0.4, "drop_hi": 0.7}, 1.0)
    ('borderline', 'confident')
    """
    if winner is None or winner.get("drop_hi") is None:
        return None
    return "confident" if float(winner["drop_hi"]) <= tolerance else "borderline"


# --- one call per model ------------------------------------------------------------------


def headline(rows: Sequence[dict[str, Any]], tolerance: float) -> list[dict[str, Any]]:
    """For every level, the fewest average bits whose drop is within ``tolerance`` pp, and who got there.

    Specs are ranked by their average bits per weight (``avg_bits``: a mixed-precision
    plan's weighted mean width, a partial plan's too; rows without it by ``bits``). Among
    the specs at that average, the one with the smallest drop is reported. Each entry also
    carries ``lowest_bits``, the narrowest average the grid tried: an answer equal to it is
    only an upper bound; and ``confidence``: ``"confident"`` when the winner's drop
    interval ends within ``tolerance``, ``"borderline"`` when it does not, ``None`` without
    an interval (or a winner).
    """
    by = "avg_bits" if rows and all("avg_bits" in r for r in rows) else "bits"
    lowest = min((r[by] for r in rows), default=None)
    by_level: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_level[r["level"]].append(r)
    table = []
    for level, level_rows in by_level.items():
        best = min_bits(level_rows, tolerance, by=by).get(level_rows[0]["k"])
        table.append(
            {
                "level": level,
                "k": level_rows[0]["k"],
                "grouping": level_rows[0]["grouping"],
                "acc_float": level_rows[0]["acc_float"],
                "min_bits": best[by] if best else None,
                "lowest_bits": lowest,
                "confidence": confidence(best, tolerance),
                "winner": best,
            }
        )
    return table


@dataclass(frozen=True, eq=False)
class FloatLevelStats:
    """The float model's side of :func:`evaluate_levels`, from :func:`float_level_stats`.

    Every quantized model of a run is compared with the same float logits, levels and
    random groupings, so this is computed once per run and only the quantized side is
    scored per spec. Plain numpy and Python values: it pickles (e.g. to sweep workers).

    Attributes
    ----------
    levels : tuple of (int, tuple of int)
        ``(k, canonical assignment)`` of every level, in order.
    n_random, seed, reduction
        The random baseline and the scoring it was computed with.
    n_samples : int
    labels_digest : str
        BLAKE2 digest of the labels: a stats object of other labels is refused.
    groupings : ndarray ``(L * (1 + n_random), C)``
        Each level's grouping followed by its ``n_random`` random groupings.
    acc : ndarray ``(L * (1 + n_random),)``
        The float logits' grouped accuracy of every row of ``groupings``.
    fine_acc : float
        The float logits' fine accuracy.
    bootstrap : int
        Resamples of the intervals (0: none).
    correct : ndarray ``(2 L, N)`` float32, or None
        Per sample, level by level: whether the learned grouping is right (row ``2 i``)
        and the mean over the random groupings (row ``2 i + 1``); kept only when
        ``bootstrap`` > 0, the paired bootstrap's float side.
    """

    levels: tuple[tuple[int, tuple[int, ...]], ...]
    n_random: int
    seed: int
    reduction: str
    n_samples: int
    labels_digest: str
    groupings: np.ndarray
    acc: np.ndarray
    fine_acc: float
    bootstrap: int = 0
    correct: np.ndarray | None = None


def _labels_digest(y: torch.Tensor) -> str:
    return hashlib.blake2b(y.cpu().numpy().astype(np.int64).tobytes(), digest_size=16).hexdigest()


def _level_keys(levels: Mapping[int, Groups], n_classes: int) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """``(k, canonical assignment)`` of every level, refusing a key that is not its grouping's k."""
    if not levels:
        raise HierclusterError("no levels given")
    keys = []
    for k, grouping in levels.items():
        a = as_assignment(grouping, n_classes)
        if int(a.max()) + 1 != k:
            raise HierclusterError(
                f"level {k} has a grouping with {int(a.max()) + 1} superclasses; the key must be its k"
            )
        keys.append((int(k), tuple(a.tolist())))
    return tuple(keys)


def _check_n_random(n_random: int, bootstrap: int = 0) -> None:
    if n_random < 1:
        raise HierclusterError(
            f"n_random must be >= 1 (the random baseline is what advantage compares to), got {n_random}"
        )
    if bootstrap < 0:
        raise HierclusterError(f"bootstrap must be >= 0 resamples (0: no intervals), got {bootstrap}")


def _level_slots(n_levels: int, n_random: int) -> np.ndarray:
    """Slot of every row of the stacked groupings: level i's learned -> 2 i, its random ones -> 2 i + 1."""
    per_level = np.r_[0, np.ones(n_random, dtype=np.int64)]
    return (2 * np.arange(n_levels)[:, None] + per_level[None]).ravel()


def _scored(
    z: torch.Tensor, y: torch.Tensor, groupings: np.ndarray, n_levels: int, n_random: int, reduction: str, bootstrap: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Grouped accuracies of the stacked groupings, and their per-sample correctness when bootstrapping."""
    if bootstrap == 0:
        return grouped_accuracies(z, y, groupings, reduction), None
    acc, sums = grouped_correct_sums(z, y, groupings, _level_slots(n_levels, n_random), 2 * n_levels, reduction)
    sums[1::2] /= n_random
    return acc, sums


def float_level_stats(
    float_logits: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    levels: Mapping[int, Groups],
    n_random: int = 20,
    seed: int = 0,
    reduction: str = "prob_sum",
    bootstrap: int = 0,
) -> FloatLevelStats:
    """The float side of :func:`evaluate_levels`, to compute once and pass as its ``float_stats``.

    Parameters are those of :func:`evaluate_levels`: the random groupings of every level
    are drawn here (:func:`random_groupings` with ``seed``) and scored on the float logits;
    with ``bootstrap`` > 0 their per-sample correctness is kept for the paired bootstrap.

    Examples
    --------
    >>> zf = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    >>> stats = float_level_stats(zf, torch.tensor([1, 2]), {2: [0, 0, 1]}, n_random=3)
    >>> stats.fine_acc, stats.groupings.shape, float(stats.acc[0])
    (0.5, (4, 3), 1.0)
    """
    zf, y = _logits_labels(float_logits, labels)
    _check_n_random(n_random, bootstrap)
    keys = _level_keys(levels, zf.shape[1])
    blocks = []
    for _, a in keys:
        a = np.asarray(a, dtype=np.int64)
        blocks += [a[None], random_groupings(a, n_random, seed)]
    groupings = np.concatenate(blocks)
    acc, correct = _scored(zf, y, groupings, len(keys), n_random, reduction, bootstrap)
    return FloatLevelStats(
        levels=keys,
        n_random=n_random,
        seed=seed,
        reduction=reduction,
        n_samples=len(y),
        labels_digest=_labels_digest(y),
        groupings=groupings,
        acc=acc,
        fine_acc=accuracy(zf, y),
        bootstrap=bootstrap,
        correct=correct,
    )


def _check_float_stats(
    stats: FloatLevelStats, keys: Any, n_random: int, seed: int, reduction: str, y: torch.Tensor, bootstrap: int = 0
) -> None:
    """Refuse float stats computed for other levels, baseline, scoring or labels than this call's."""
    if not isinstance(stats, FloatLevelStats):
        raise HierclusterError(f"float_stats must come from float_level_stats, got {type(stats).__name__}")
    wanted = {"n_random": n_random, "seed": seed, "reduction": reduction, "n_samples": len(y), "bootstrap": bootstrap}
    for name, value in wanted.items():
        if getattr(stats, name) != value:
            raise HierclusterError(
                f"float_stats were computed with {name}={getattr(stats, name)!r}, this call has {value!r}; "
                "compute them with float_level_stats for the same settings"
            )
    if stats.levels != keys:
        raise HierclusterError(
            f"float_stats were computed for levels {[k for k, _ in stats.levels]}, not for these levels "
            f"{[k for k, _ in keys]} (or their groupings differ); compute them with float_level_stats for these levels"
        )
    if stats.labels_digest != _labels_digest(y):
        raise HierclusterError("float_stats were computed on other labels; compute them with float_level_stats for these")


def evaluate_levels(
    float_logits: torch.Tensor | np.ndarray,
    quant_logits: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    levels: Mapping[int, Groups],
    n_random: int = 20,
    seed: int = 0,
    reduction: str = "prob_sum",
    float_stats: FloatLevelStats | None = None,
    bootstrap: int = 0,
) -> list[dict[str, Any]]:
    """Every grouped metric of one quantized model at every level, from kept logits.

    For each level, the learned grouping and ``n_random`` random groupings of the same
    sizes (:func:`random_groupings` with ``seed``; the same groupings for the float and
    the quantized model) are scored on both logit sets in two vectorized passes. The
    float pass depends on nothing quantized: a run computes it once with
    :func:`float_level_stats` and passes it as ``float_stats`` to every spec.

    Parameters
    ----------
    float_logits, quant_logits : ``(N, C)``
        Logits of the float model and of the quantized model on the same samples.
    labels : ``(N,)``
    levels : dict
        ``{k: grouping}``, e.g. :meth:`ClassHierarchy.levels`; each grouping must have k groups.
    n_random : int, default 20
    seed : int, default 0
    reduction : {"prob_sum", "mean_logit", "argmax_then_map"}
    float_stats : FloatLevelStats, optional
        :func:`float_level_stats` of ``float_logits`` with the same labels, levels,
        ``n_random``, ``seed`` and ``reduction`` (refused otherwise); computed here when
        not given. The rows are the same either way.
    bootstrap : int, default 0
        Resamples of the paired bootstrap (:func:`bootstrap_resamples` with ``seed``);
        0: no intervals (their keys hold None).

    Returns
    -------
    list of dict
        One row per level, in the order of ``levels``, with keys ``k``, ``reduction``,
        ``n_random``, ``fine_acc_float``, ``fine_acc_quant``, ``acc_float``, ``acc_quant``,
        ``drop``, ``random_acc_float_mean``/``_std``, ``random_acc_quant_mean``/``_std``,
        ``random_drop_mean``/``_std``, ``advantage``; the statistics (DESIGN.md,
        "Statistics"): ``drop_lo``/``drop_hi`` and ``advantage_lo``/``advantage_hi`` (95%
        paired-bootstrap intervals, percentile method; the same resamples for the float and
        the quantized logits), ``rank_p`` (:func:`rank_p`), ``group_sizes``
        (:func:`group_sizes`), ``absorbed_share`` and ``random_absorbed_share_mean``
        (:func:`absorbed_share` of the learned grouping's drop and of the random mean drop;
        None when the fine drop is 0). Accuracies are fractions, drops and advantage
        percentage points; stds are numpy's (ddof=0) over the random seeds.
        Where all random values are equal (k = C and k = 1, whose random groupings are
        the learned one, scored once), the mean is that value and the std exactly 0.
    """
    zf, y = _logits_labels(float_logits, labels)
    zq, yq = _logits_labels(quant_logits, labels)  # the labels on each logit set's device
    if zf.shape != zq.shape:
        raise HierclusterError(f"float logits {tuple(zf.shape)} and quantized logits {tuple(zq.shape)} differ in shape")
    _check_n_random(n_random, bootstrap)
    if float_stats is None:
        float_stats = float_level_stats(zf, y, levels, n_random, seed, reduction, bootstrap)
    else:
        _check_float_stats(float_stats, _level_keys(levels, zf.shape[1]), n_random, seed, reduction, y, bootstrap)
    n_levels, n = len(float_stats.levels), len(y)
    acc_f = float_stats.acc
    acc_q, correct_q = _scored(zq, yq, float_stats.groupings, n_levels, n_random, reduction, bootstrap)
    fine_f, fine_q = float_stats.fine_acc, accuracy(zq, yq)
    # Drops compared as whole sample counts, so that equal drops compare equal (no rounding noise).
    count_drop = np.rint(acc_f * n) - np.rint(acc_q * n)
    fine_drop = None if round((fine_f - fine_q) * n) == 0 else drop(fine_f, fine_q)
    intervals = _level_intervals(float_stats.correct, correct_q, n_levels, bootstrap, seed, n_random)
    rows = []
    for i, (k, assignment) in enumerate(float_stats.levels):
        lo = i * (1 + n_random)
        rand_f, rand_q = acc_f[lo + 1 : lo + 1 + n_random], acc_q[lo + 1 : lo + 1 + n_random]
        rand_drop = drop(rand_f, rand_q)
        level_drop = drop(acc_f[lo], acc_q[lo])
        (f_mean, f_std), (q_mean, q_std), (d_mean, d_std) = map(_mean_std, (rand_f, rand_q, rand_drop))
        rows.append(
            {
                "k": int(k),
                "reduction": reduction,
                "n_random": n_random,
                "fine_acc_float": fine_f,
                "fine_acc_quant": fine_q,
                "acc_float": float(acc_f[lo]),
                "acc_quant": float(acc_q[lo]),
                "drop": level_drop,
                "random_acc_float_mean": f_mean,
                "random_acc_float_std": f_std,
                "random_acc_quant_mean": q_mean,
                "random_acc_quant_std": q_std,
                "random_drop_mean": d_mean,
                "random_drop_std": d_std,
                "advantage": advantage(level_drop, d_mean),
                **intervals[i],
                "rank_p": rank_p(count_drop[lo], count_drop[lo + 1 : lo + 1 + n_random]),
                "group_sizes": group_sizes(assignment),
                "absorbed_share": None if fine_drop is None else absorbed_share(level_drop, fine_drop),
                "random_absorbed_share_mean": None if fine_drop is None else absorbed_share(d_mean, fine_drop),
            }
        )
    return rows


def _level_intervals(
    correct_f: np.ndarray | None,
    correct_q: np.ndarray | None,
    n_levels: int,
    bootstrap: int,
    seed: int,
    n_random: int,
) -> list[dict[str, float | None]]:
    """Every level's drop and advantage interval (pp) from per-sample correctness ``(2 L, N)``.

    Per sample, the learned grouping's drop is ``d = correct_float - correct_quant`` and the
    random groupings' mean drop ``e`` the same of their mean correctness; a resample's drop
    is its mean of ``d`` and its advantage its mean of ``e - d``: one product with the
    resample counts for all levels (:func:`bootstrap_means`). None without a bootstrap.
    """
    keys = ("drop_lo", "drop_hi", "advantage_lo", "advantage_hi")
    if bootstrap == 0 or correct_f is None or correct_q is None:
        return [dict.fromkeys(keys) for _ in range(n_levels)]
    diff = correct_f - correct_q  # (2 L, N)
    # In whole counts (the random groupings' correct ones summed, not averaged): the resample
    # sums are then exact in float32 whatever order the matrix product adds them in, so the
    # intervals are the same on any machine, thread count or executor.
    learned = np.rint(diff[0::2] * n_random)
    random_sum = np.rint(diff[1::2] * n_random)
    values = np.concatenate([learned, random_sum - learned]).T  # (N, 2 L)
    lo, hi = percentile_interval(100 * bootstrap_means(values, bootstrap, seed) / n_random)
    return [
        dict(zip(keys, (float(lo[i]), float(hi[i]), float(lo[n_levels + i]), float(hi[n_levels + i]))))
        for i in range(n_levels)
    ]


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and std (ddof=0) of the random baseline; equal values give themselves and exactly 0.

    All equal is what k = C and k = 1 give, where every random grouping is the learned
    one: the value itself, not a mean carrying a rounding error, and no spread.
    """
    if np.all(values == values[0]):
        return float(values[0]), 0.0
    return float(values.mean()), float(values.std())


# --- bias analysis ------------------------------------------------------------------------


def prediction_share(logits: torch.Tensor | np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Fraction of the samples predicted as each class, ``(C,)``.

    Examples
    --------
    >>> prediction_share(torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 3.0, 0.0]]))
    array([0.5 , 0.25, 0.25])
    """
    z = torch.as_tensor(logits)
    if z.ndim != 2 or len(z) == 0:
        raise HierclusterError(f"need non-empty logits (N, C), got shape {tuple(z.shape)}")
    c = z.shape[1] if num_classes is None else num_classes
    if c != z.shape[1]:
        raise HierclusterError(f"num_classes {c} does not match the logits' {z.shape[1]} columns")
    return np.bincount(z.argmax(1).cpu().numpy(), minlength=c) / len(z)


def _confusion_counts(pred: np.ndarray, y: np.ndarray, c: int) -> np.ndarray:
    """``counts[true, predicted]``."""
    return np.bincount(y * c + pred, minlength=c * c).reshape(c, c)


def bias_report(
    float_logits: torch.Tensor | np.ndarray,
    quant_logits: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    class_names: Sequence[str] | None = None,
    top: int = 10,
) -> dict[str, Any]:
    """How quantization shifts predictions between classes (the seed's "biased inference").

    Returns
    -------
    dict
        * ``class_names``: list of C names;
        * ``share_true``, ``share_float``, ``share_quant``: ``(C,)`` fraction of the
          samples labelled / predicted as each class;
        * ``acc_float``, ``acc_quant``: ``(C,)`` per-class accuracy (recall; NaN for a
          class without samples), and ``drop``: their change in pp, ``100 * (float - quant)``;
        * ``flows``: up to ``top`` dicts ``{"true", "pred", "true_id", "pred_id",
          "count_float", "count_quant", "increase"}``, the off-diagonal (true -> predicted)
          pairs whose count grew most under quantization, largest first (only growths).

    Examples
    --------
    >>> zf = torch.eye(3)[[0, 1, 2, 2]]
    >>> zq = torch.eye(3)[[0, 2, 2, 2]]
    >>> r = bias_report(zf, zq, torch.tensor([0, 1, 2, 2]), ["a", "b", "c"])
    >>> r["share_quant"].tolist(), r["drop"].tolist(), r["flows"][0]["true"], r["flows"][0]["pred"]
    ([0.25, 0.0, 0.75], [0.0, 100.0, 0.0], 'b', 'c')
    """
    zf, y = _logits_labels(float_logits, labels)
    zq, _ = _logits_labels(quant_logits, labels)
    if zf.shape != zq.shape:
        raise HierclusterError(f"float logits {tuple(zf.shape)} and quantized logits {tuple(zq.shape)} differ in shape")
    c = zf.shape[1]
    names = [str(i) for i in range(c)] if class_names is None else [str(n) for n in class_names]
    if len(names) != c:
        raise HierclusterError(f"{len(names)} class names given for logits with {c} classes")
    yn = y.cpu().numpy()
    counts_f = _confusion_counts(zf.argmax(1).cpu().numpy(), yn, c)
    counts_q = _confusion_counts(zq.argmax(1).cpu().numpy(), yn, c)
    support = counts_f.sum(1).astype(np.float64)
    has = support > 0
    acc_f = np.divide(np.diag(counts_f), support, out=np.full(c, np.nan), where=has)
    acc_q = np.divide(np.diag(counts_q), support, out=np.full(c, np.nan), where=has)
    growth = counts_q - counts_f
    np.fill_diagonal(growth, 0)
    order = np.argsort(-growth, axis=None, kind="stable")[:top]
    flows = [
        {
            "true": names[t],
            "pred": names[p],
            "true_id": int(t),
            "pred_id": int(p),
            "count_float": int(counts_f[t, p]),
            "count_quant": int(counts_q[t, p]),
            "increase": int(growth[t, p]),
        }
        for t, p in (divmod(int(i), c) for i in order)
        if growth[t, p] > 0
    ]
    return {
        "class_names": names,
        "share_true": support / len(yn),
        "share_float": counts_f.sum(0) / len(yn),
        "share_quant": counts_q.sum(0) / len(yn),
        "acc_float": acc_f,
        "acc_quant": acc_q,
        "drop": drop(acc_f, acc_q),
        "flows": flows,
    }
