"""Layer sensitivity from kept logits: paired differences, their standard errors, the verdicts.

Pure functions of logits and labels (the module-walking part that quantizes one layer at a
time is :mod:`hiercluster.run.sensitivity`). Every figure is a *paired* difference on the
same evaluation samples: for two models A and B with per-sample correctness ``a_i`` and
``b_i`` (0 or 1), the difference is ``mean(a - b)`` and its standard error
``std(a - b, ddof=1) / sqrt(N)``, both in percentage points. Pairing removes the
between-sample variance the two models share, so the error is far smaller than that of
two independent accuracies.

This is a measurement, not a fit: nothing is chosen from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hiercluster.errors import HierclusterError
from hiercluster.evaluation.heads import group_argmax, onehot_matrix

# The seed's claim "the initial layers matter most" is checked on the first quarter of the
# quantizable layers (in the model's order) against the rest.
EARLY_FRACTION = 0.25
# A mean difference counts as shown when it exceeds this many standard errors (~95%, two-sided).
Z_SHOWN = 2.0


def correct(
    logits: torch.Tensor, labels: torch.Tensor, assignment: np.ndarray | None = None, reduction: str = "prob_sum"
) -> np.ndarray:
    """Per-sample correctness (bool ``(N,)``): fine top-1, or grouped under ``assignment``.

    The grouped prediction is :func:`hiercluster.evaluation.heads.group_argmax`, the
    ranking :func:`hiercluster.evaluation.metrics.grouped_accuracies` counts, so
    ``correct(...).mean()`` equals that accuracy.

    Examples
    --------
    >>> z = torch.tensor([[3.0, 2.0, 0.0], [0.0, 1.0, 2.0]])
    >>> correct(z, torch.tensor([1, 2])).tolist(), correct(z, torch.tensor([1, 2]), np.array([0, 0, 1])).tolist()
    ([False, True], [True, True])
    """
    z, y = torch.as_tensor(logits).float(), torch.as_tensor(labels).long().to(torch.as_tensor(logits).device)
    if z.ndim != 2 or y.shape != (len(z),) or (len(y) and not 0 <= int(y.min()) <= int(y.max()) < z.shape[1]):
        raise HierclusterError(f"need logits (N, C) and labels (N,) in 0..C-1, got {tuple(z.shape)} and {tuple(y.shape)}")
    if assignment is None:
        return (z.argmax(1) == y).cpu().numpy()
    a = torch.as_tensor(np.asarray(assignment, dtype=np.int64), device=z.device)
    if a.shape != (z.shape[1],):
        raise HierclusterError(f"assignment must have one group id per class ({z.shape[1]}), got shape {tuple(a.shape)}")
    return (group_argmax(z, onehot_matrix(a).to(z), reduction) == a[y]).cpu().numpy()


def paired_difference(first: np.ndarray, second: np.ndarray) -> tuple[float, float]:
    """``(mean(first - second), std(first - second, ddof=1) / sqrt(N))`` in percentage points.

    ``first`` and ``second`` are per-sample correctness of two models on the same samples.
    The standard error is NaN for fewer than two samples.

    Examples
    --------
    >>> diff, se = paired_difference(np.array([1, 1, 1, 0]), np.array([1, 0, 1, 1]))
    >>> diff, round(se, 4)  # differences [0, 1, 0, -1]: std sqrt(2/3), over sqrt(4)
    (0.0, 40.8248)
    """
    a = np.asarray(first, dtype=np.float64)
    b = np.asarray(second, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise HierclusterError(f"need two per-sample correctness vectors of one length, got {a.shape} and {b.shape}")
    d = a - b
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
    return 100.0 * float(d.mean()), 100.0 * se


@dataclass(frozen=True)
class LayerSensitivity:
    """One weight slot's effects, in percentage points (see the module doc for the standard errors).

    ``drop_*``: float accuracy minus the accuracy with only this layer quantized.
    ``gain_*``: the accuracy with only this layer kept float minus the whole-model quantized accuracy.
    ``*_fine``: top-1; ``*_k``: grouped accuracy at the chosen level.
    """

    layer: str
    params: int
    drop_fine: float
    se_drop_fine: float
    drop_k: float
    se_drop_k: float
    gain_fine: float
    se_gain_fine: float
    gain_k: float
    se_gain_k: float

    #: CSV column names, in the order of :meth:`row`.
    COLUMNS = (
        "layer", "params", "drop_fine", "se_drop_fine", "drop_k", "se_drop_k",
        "gain_fine", "se_gain_fine", "gain_k", "se_gain_k",
    )

    def row(self) -> list[object]:
        return [getattr(self, name) for name in self.COLUMNS]


@dataclass(frozen=True)
class Correctness:
    """A model's per-sample correctness at the fine level and at the chosen level."""

    fine: np.ndarray
    grouped: np.ndarray

    @classmethod
    def of(cls, logits: torch.Tensor, labels: torch.Tensor, assignment: np.ndarray, reduction: str) -> Correctness:
        return cls(correct(logits, labels), correct(logits, labels, assignment, reduction))


def layer_sensitivity(
    layer: str, params: int, reference: Correctness, whole: Correctness, only_quant: Correctness, only_float: Correctness
) -> LayerSensitivity:
    """One slot's :class:`LayerSensitivity` from four models' correctness on the same samples.

    ``reference``: the float model; ``whole``: every slot quantized; ``only_quant``: only
    this slot quantized; ``only_float``: every slot but this one quantized.
    """
    drop_fine = paired_difference(reference.fine, only_quant.fine)
    drop_k = paired_difference(reference.grouped, only_quant.grouped)
    gain_fine = paired_difference(only_float.fine, whole.fine)
    gain_k = paired_difference(only_float.grouped, whole.grouped)
    return LayerSensitivity(layer, int(params), *drop_fine, *drop_k, *gain_fine, *gain_k)


# --- verdicts ---------------------------------------------------------------------------


def early_count(n_layers: int) -> int:
    """How many of ``n_layers`` form the "initial layers": the first quarter, at least one.

    Examples
    --------
    >>> [early_count(n) for n in (1, 2, 4, 5, 22)]
    [1, 1, 1, 2, 6]
    """
    return max(1, math.ceil(EARLY_FRACTION * n_layers - 1e-9))


EARLY_RULE = (
    "rule: mean single-layer fine drop of the first quarter of the quantizable layers (model order) vs the rest; "
    f"'holds' if it exceeds the rest's by more than {Z_SHOWN:g} SE, 'holds partly' if it exceeds it by less, "
    "or if the single most sensitive layer is in the first quarter, else 'does not hold'"
)


def early_layers_verdict(rows: Sequence[LayerSensitivity]) -> dict[str, object]:
    """The verdict on "the initial layers matter most", decided by :data:`EARLY_RULE`.

    The standard error of each group's mean treats the layers' errors as independent
    (they share the samples, so this is an approximation); the difference's error is the
    root sum of squares of the two.

    Returns
    -------
    dict
        ``verdict`` ("holds", "holds partly", "does not hold", or "not decided" for fewer
        than two layers), ``early`` (the layer names), ``mean_early``, ``mean_rest``,
        ``se`` (of their difference), ``most_sensitive`` and ``rule``.
    """
    if len(rows) < 2:
        return {"verdict": "not decided", "early": [r.layer for r in rows], "mean_early": math.nan,
                "mean_rest": math.nan, "se": math.nan, "most_sensitive": rows[0].layer if rows else None,
                "rule": EARLY_RULE}
    n = early_count(len(rows))
    early, rest = rows[:n], rows[n:]
    mean_early, se_early = _mean_se([r.drop_fine for r in early], [r.se_drop_fine for r in early])
    mean_rest, se_rest = _mean_se([r.drop_fine for r in rest], [r.se_drop_fine for r in rest])
    se = math.hypot(se_early, se_rest)
    # The first layer wins ties, like argmax.
    top = max(range(len(rows)), key=lambda i: (rows[i].drop_fine, -i))
    gap = mean_early - mean_rest
    if gap > Z_SHOWN * se:
        verdict = "holds"
    elif gap > 0 or top < n:
        verdict = "holds partly"
    else:
        verdict = "does not hold"
    return {"verdict": verdict, "early": [r.layer for r in early], "mean_early": mean_early, "mean_rest": mean_rest,
            "se": se, "most_sensitive": rows[top].layer, "rule": EARLY_RULE}


def _mean_se(values: Sequence[float], errors: Sequence[float]) -> tuple[float, float]:
    """Mean of ``values`` and its standard error for independent errors ``errors``."""
    n = len(values)
    return float(np.mean(values)), float(math.sqrt(np.nansum(np.square(errors))) / n)


def additivity(rows: Sequence[LayerSensitivity], whole_drop: Mapping[str, float]) -> dict[str, float]:
    """The sum of the single-layer drops against the whole model's measured drop (pp), fine and at k.

    ``whole_drop``: ``{"fine": ..., "k": ...}``, float accuracy minus the whole-model
    quantized accuracy. Effects of quantizing several layers are not additive: the sum
    usually falls far short of the whole model's drop.
    """
    return {
        "sum_fine": float(sum(r.drop_fine for r in rows)),
        "whole_fine": float(whole_drop["fine"]),
        "sum_k": float(sum(r.drop_k for r in rows)),
        "whole_k": float(whole_drop["k"]),
    }
