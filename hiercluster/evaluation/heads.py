"""Merged heads: fine logits -> superclass scores.

:func:`group_scores` turns fine logits into superclass scores for :class:`GroupedHead`
(a module) and :func:`group_argmax`. The grouped evaluation in
:mod:`hiercluster.evaluation.metrics` scores thousands of groupings at once with its own
kernels (one-hot products, segment sums), tested to give :func:`group_argmax`'s answers. Groupings
themselves (:func:`~hiercluster.hierarchy.groupings.as_assignment`) live in
:mod:`hiercluster.hierarchy.groupings`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hiercluster.errors import HierclusterError
from hiercluster.hierarchy.groupings import Groups, as_assignment, canonical_assignment

REDUCTIONS = ("prob_sum", "mean_logit", "argmax_then_map")

def onehot_matrix(assignment: np.ndarray | torch.Tensor, num_groups: int | None = None) -> torch.Tensor:
    """The C x k class -> group one-hot matrix (float32) of an assignment.

    Works on a batch too: ``(G, C)`` assignments give ``(G, C, num_groups)``, with
    ``num_groups`` defaulting to the largest k; the columns beyond a grouping's own k are
    all zero (padding), and :func:`group_scores` scores them ``-inf``.
    """
    a = assignment.long() if isinstance(assignment, torch.Tensor) else torch.as_tensor(np.asarray(assignment)).long()
    k = int(a.max()) + 1 if num_groups is None else num_groups
    return F.one_hot(a, k).float()


def _check_scoring(logits: torch.Tensor, onehot: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise HierclusterError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    if logits.ndim != 2 or onehot.shape[-2] != logits.shape[1]:
        raise HierclusterError(
            f"logits {tuple(logits.shape)} do not fit a class->group matrix {tuple(onehot.shape)} (C must match)"
        )
    return onehot.to(device=logits.device, dtype=logits.dtype)


def _ranking_scores(logits: torch.Tensor, m: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scores with the argmax of :func:`group_scores`, before its monotone last steps.

    ``prob_sum``: ``exp(z - max z) @ onehot``, the group's probability mass times a
    per-sample constant; the group of the top class has at least 1, so an all-zero
    padding column never wins. ``mean_logit``: padding is masked here, since a mean
    logit can be negative. Returns ``(scores, shifted exponentials or None)``.
    """
    if reduction == "prob_sum":
        shifted = torch.exp(logits - logits.amax(1, keepdim=True))
        return shifted @ m, shifted
    if reduction == "mean_logit":
        counts = m.sum(-2, keepdim=True)
        return ((logits @ m) / counts.clamp_min(1)).masked_fill(counts == 0, float("-inf")), None
    return m[..., logits.argmax(1), :], None


def group_scores(logits: torch.Tensor, onehot: torch.Tensor, reduction: str = "prob_sum") -> torch.Tensor:
    """Superclass scores from fine logits: ``(N, C)`` and ``(..., C, k)`` -> ``(..., N, k)``.

    Parameters
    ----------
    logits : torch.Tensor
        Fine logits ``(N, C)``.
    onehot : torch.Tensor
        Class -> group one-hot matrix ``(C, k)``, or a stack ``(G, C, k)`` of them to score
        many groupings in one batched matrix product. All-zero columns are padding.
    reduction : {"prob_sum", "mean_logit", "argmax_then_map"}
        * ``prob_sum`` (default): log of the group's summed softmax probability,
          ``log sum_{c in g} softmax(z)_c``, i.e. logsumexp of the members' log-probabilities.
          Computed as ``log(exp(z - max z) @ onehot) - log(sum exp(z - max z))``, so the
          group holding the top class is always finite; a group whose probability mass
          is below float range (log-probability below about -87 in float32) scores
          ``-inf``, which never changes the argmax.
        * ``mean_logit``: mean logit of the members (the NBDT-style inner node score).
        * ``argmax_then_map``: 1 for the group of the fine argmax, 0 for the other groups
          (a hard vote: the fine prediction mapped to its superclass).
        Padding columns score ``-inf`` under every reduction.

    Returns
    -------
    torch.Tensor
        ``(N, k)`` or ``(G, N, k)`` in the dtype of ``logits``.

    See Also
    --------
    group_argmax : the predicted superclass alone, cheaper.

    Examples
    --------
    >>> z = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    >>> onehot = onehot_matrix(np.array([0, 1, 1]))
    >>> group_scores(z, onehot).exp()
    tensor([[0.5000, 0.5000]])
    """
    m = _check_scoring(logits, onehot, reduction)
    scores, shifted = _ranking_scores(logits, m, reduction)
    if shifted is not None:
        scores = torch.log(scores) - torch.log(shifted.sum(1, keepdim=True))
    return scores.masked_fill(m.sum(-2, keepdim=True) == 0, float("-inf"))


def group_argmax(logits: torch.Tensor, onehot: torch.Tensor, reduction: str = "prob_sum") -> torch.Tensor:
    """``group_scores(logits, onehot, reduction).argmax(-1)``, without the monotone final
    steps (log, normalization, padding mask) that cannot change it: ``(..., N)``.

    Examples
    --------
    >>> group_argmax(torch.tensor([[2.0, 1.5, 1.5]]), onehot_matrix(np.array([0, 1, 1])))
    tensor([1])
    """
    m = _check_scoring(logits, onehot, reduction)
    return _ranking_scores(logits, m, reduction)[0].argmax(-1)


# --- modules ------------------------------------------------------------------------


class GroupedHead(nn.Module):
    """Turns fine logits ``(N, C)`` into superclass scores ``(N, k)``.

    Parameters
    ----------
    groups : grouping
        Anything :func:`as_assignment` accepts.
    reduction : {"prob_sum", "mean_logit", "argmax_then_map"}, default "prob_sum"
        How member logits become a superclass score; see :func:`group_scores`. With
        ``prob_sum`` the outputs are log-probabilities of the superclasses.
    class_names : list of str, optional
        Needed when ``groups`` names classes.

    Notes
    -----
    The canonical assignment is a buffer (``assignment``), so it is saved in and
    restored from ``state_dict``; the one-hot matrix is rebuilt from it after loading.

    Examples
    --------
    >>> head = GroupedHead([[0, 2], [1]])
    >>> head(torch.tensor([[2.0, 0.0, 2.0]])).argmax(1)
    tensor([0])
    """

    assignment: torch.Tensor
    onehot: torch.Tensor

    def __init__(self, groups: Groups, reduction: str = "prob_sum", class_names: Sequence[str] | None = None) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise HierclusterError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
        self.reduction = reduction
        self.register_buffer("assignment", torch.from_numpy(as_assignment(groups, class_names)))
        self.register_buffer("onehot", onehot_matrix(self.assignment), persistent=False)
        self.register_load_state_dict_post_hook(GroupedHead._rebuild_onehot)

    @staticmethod
    def _rebuild_onehot(module: nn.Module, _incompatible: Any) -> None:
        # The derived matrix must follow a loaded assignment, which may have another k.
        assert isinstance(module, GroupedHead)
        loaded = module.assignment
        if not torch.equal(torch.from_numpy(canonical_assignment(loaded.cpu().numpy())), loaded.cpu()):
            raise HierclusterError("the loaded GroupedHead assignment is not canonical (ids 0..k-1 by smallest member)")
        module.onehot = onehot_matrix(loaded).to(module.onehot.device)

    @property
    def num_classes(self) -> int:
        return int(self.onehot.shape[0])

    @property
    def num_groups(self) -> int:
        return int(self.onehot.shape[1])

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return group_scores(logits, self.onehot, self.reduction)

    def extra_repr(self) -> str:
        return f"classes={self.num_classes}, groups={self.num_groups}, reduction={self.reduction!r}"


def merge_head(
    model: nn.Module, groups: Groups, reduction: str = "prob_sum", class_names: Sequence[str] | None = None
) -> nn.Sequential:
    """A model whose outputs are superclass scores: ``nn.Sequential(model=model, head=GroupedHead)``.

    The model is wrapped, not copied. The result saves and loads with ``state_dict``
    like any model (keys ``model.*`` and ``head.assignment``); to load, rebuild it with
    :func:`merge_head` on a fresh model of the same architecture, then
    ``load_state_dict``.

    Examples
    --------
    >>> fine = nn.Linear(4, 3)
    >>> merged = merge_head(fine, [[0, 1], [2]])
    >>> merged(torch.zeros(5, 4)).shape
    torch.Size([5, 2])
    """
    head = GroupedHead(groups, reduction, class_names)
    return nn.Sequential(OrderedDict(model=model, head=head))


__all__ = ["REDUCTIONS", "GroupedHead", "group_argmax", "group_scores", "merge_head", "onehot_matrix"]
