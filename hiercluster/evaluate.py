"""Evaluation from kept logits: one forward pass per model, every metric afterwards.

:func:`collect_logits` runs a model once over a loader; everything else in this module
works on the logits it returns, never re-running the model (DESIGN.md, "Evaluation cost").

* :func:`grouped_metrics` / :func:`grouped_accuracies`: grouped accuracy of many
  groupings at once, one batched product with stacked one-hot class -> group matrices;
* :func:`random_groupings` / :func:`random_baseline`: same group sizes, random classes;
* :func:`drop`, :func:`advantage`, :func:`min_bits`: DESIGN.md's definitions
  (accuracies are fractions, drops and advantages percentage points);
* :func:`evaluate_levels`: all of it for one quantized model at every level;
* :func:`prediction_share`, :func:`bias_report`: where quantization moves predictions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hiercluster.errors import HierclusterError
from hiercluster.heads import Groups, as_assignment, canonical_assignment, group_argmax


def collect_logits(
    model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], progress: bool = False, desc: str = "eval"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over ``loader`` in inference mode; returns ``(logits, labels)``.

    The model is put in eval mode. Logits are float32 ``(N, C)``, labels int64 ``(N,)``.
    """
    model.eval()
    logits, labels = [], []
    batches = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc=desc, leave=False, unit="batch")
    with torch.inference_mode():
        for x, y in batches:
            logits.append(model(x).float())
            labels.append(torch.as_tensor(y).long())
    return torch.cat(logits), torch.cat(labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy as a fraction in [0, 1]."""
    return float((logits.argmax(1) == labels).double().mean()) if len(labels) else float("nan")


# --- grouped accuracy, many groupings at once ------------------------------------------

# Upper bound on the elements of one (groupings, samples, groups) score block; larger
# stacks of groupings are scored in chunks of groupings (never a loop over samples).
_MAX_BLOCK = 1 << 21


def _logits_labels(logits: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
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
    return z, y


def grouped_accuracies(
    logits: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    assignments: np.ndarray,
    reduction: str = "prob_sum",
) -> np.ndarray:
    """Grouped accuracy of every row of a ``(G, C)`` stack of assignments, vectorized.

    All groupings are scored by one batched product of the ``(N, C)`` logits with the
    stacked ``(G, C, k_max)`` one-hot matrices (:func:`hiercluster.heads.group_argmax`;
    columns beyond a grouping's k are padding), in chunks of groupings when the block
    would be large. A sample counts as correct when the argmax superclass is the one
    holding its true class.

    Examples
    --------
    >>> z = torch.tensor([[3.0, 2.0, 0.0], [0.0, 1.0, 2.0]])
    >>> grouped_accuracies(z, torch.tensor([1, 2]), np.array([[0, 1, 2], [0, 0, 1], [0, 1, 1]]))
    array([0.5, 1. , 0.5])
    """
    z, y = _logits_labels(logits, labels)
    a = torch.as_tensor(np.asarray(assignments)).long()
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] != z.shape[1] or (a.numel() and int(a.min()) < 0):
        raise HierclusterError(
            f"assignments must be (G, C={z.shape[1]}) non-negative group ids, got shape {tuple(a.shape)}"
        )
    n = len(y)
    sizes = a.max(1).values + 1
    order = torch.argsort(sizes, stable=True)  # similar k share a block: less padding
    out = np.empty(len(a))
    lo = 0
    while lo < len(a):
        hi = lo + 1
        while hi < len(a) and (hi + 1 - lo) * n * int(sizes[order[hi]]) <= _MAX_BLOCK:
            hi += 1
        rows = order[lo:hi]
        block = a[rows]
        predicted = group_argmax(z, F.one_hot(block, int(sizes[rows].max())), reduction)  # (g, N)
        out[rows.numpy()] = (predicted == block[:, y]).sum(1).numpy() / n
        lo = hi
    return out


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
        ``{name: grouping}`` (any form :func:`~hiercluster.heads.as_assignment` takes),
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


def min_bits(results: Iterable[Mapping[str, Any]], tolerance: float = 1.0) -> dict[Any, dict[str, Any] | None]:
    """The fewest bits that keep the drop within ``tolerance`` pp, for every level.

    Parameters
    ----------
    results : iterable of dict
        One row per evaluated (level, model) with at least ``"k"`` (level), ``"bits"``
        and ``"drop"`` (pp); any other keys (``scheme``, ``acc_quant``, ...) are carried
        along. Rows of the rows :func:`evaluate_levels` returns, with ``bits`` added, fit.
    tolerance : float, default 1.0
        In percentage points.

    Returns
    -------
    dict
        ``{k: row or None}`` for every k seen, descending: the winning row without its
        ``"k"`` (so ``{"bits": b, "drop": d, ...}``), or ``None`` when no row of that
        level has ``drop <= tolerance``. The winner has the smallest ``bits`` among the
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
        missing = [key for key in ("k", "bits", "drop") if key not in row]
        if missing:
            raise HierclusterError(
                f"min_bits: result row {i} lacks {', '.join(map(repr, missing))}; each row needs k, bits and drop"
            )
        k = row["k"]
        current = best.setdefault(k, None)
        if not float(row["drop"]) <= tolerance:  # also rejects NaN
            continue
        if current is None or (row["bits"], row["drop"]) < (current["bits"], current["drop"]):
            best[k] = row
    return {
        k: None if row is None else {"bits": row["bits"], **{f: v for f, v in row.items() if f not in ("k", "bits")}}
        for k, row in sorted(best.items(), key=lambda item: item[0], reverse=True)
    }


# --- one call per model ------------------------------------------------------------------


def evaluate_levels(
    float_logits: torch.Tensor | np.ndarray,
    quant_logits: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    levels: Mapping[int, Groups],
    n_random: int = 20,
    seed: int = 0,
    reduction: str = "prob_sum",
) -> list[dict[str, Any]]:
    """Every grouped metric of one quantized model at every level, from kept logits.

    For each level, the learned grouping and ``n_random`` random groupings of the same
    sizes (:func:`random_groupings` with ``seed``; the same groupings for the float and
    the quantized model) are scored on both logit sets in two vectorized passes.

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

    Returns
    -------
    list of dict
        One row per level, in the order of ``levels``, with keys ``k``, ``reduction``,
        ``n_random``, ``fine_acc_float``, ``fine_acc_quant``, ``acc_float``, ``acc_quant``,
        ``drop``, ``random_acc_float_mean``/``_std``, ``random_acc_quant_mean``/``_std``,
        ``random_drop_mean``/``_std`` and ``advantage``. Accuracies are fractions, drops
        and advantage percentage points; stds are numpy's (ddof=0) over the random seeds.
    """
    zf, y = _logits_labels(float_logits, labels)
    zq, _ = _logits_labels(quant_logits, labels)
    if zf.shape != zq.shape:
        raise HierclusterError(f"float logits {tuple(zf.shape)} and quantized logits {tuple(zq.shape)} differ in shape")
    if n_random < 1:
        raise HierclusterError(
            f"n_random must be >= 1 (the random baseline is what advantage compares to), got {n_random}"
        )
    if not levels:
        raise HierclusterError("no levels given")
    n_classes = zf.shape[1]
    blocks = []
    for k, grouping in levels.items():
        a = as_assignment(grouping, n_classes)
        if int(a.max()) + 1 != k:
            raise HierclusterError(
                f"level {k} has a grouping with {int(a.max()) + 1} superclasses; the key must be its k"
            )
        blocks += [a[None], random_groupings(a, n_random, seed)]
    stack = np.concatenate(blocks)
    acc_f = grouped_accuracies(zf, y, stack, reduction)
    acc_q = grouped_accuracies(zq, y, stack, reduction)
    fine_f, fine_q = accuracy(zf, y), accuracy(zq, y)
    rows = []
    for i, k in enumerate(levels):
        lo = i * (1 + n_random)
        rand_f, rand_q = acc_f[lo + 1 : lo + 1 + n_random], acc_q[lo + 1 : lo + 1 + n_random]
        rand_drop = drop(rand_f, rand_q)
        level_drop = drop(acc_f[lo], acc_q[lo])
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
                "random_acc_float_mean": float(rand_f.mean()),
                "random_acc_float_std": float(rand_f.std()),
                "random_acc_quant_mean": float(rand_q.mean()),
                "random_acc_quant_std": float(rand_q.std()),
                "random_drop_mean": float(rand_drop.mean()),
                "random_drop_std": float(rand_drop.std()),
                "advantage": advantage(level_drop, float(rand_drop.mean())),
            }
        )
    return rows


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
