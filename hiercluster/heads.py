"""Groupings of classes into superclasses, and merged heads that score superclasses.

A *grouping* of C classes into k superclasses has one canonical form used everywhere
in the package: an int64 numpy array ``assignment`` of length C with values 0..k-1,
every id used, ids numbered in the order of each group's smallest class id (so class 0
is always in group 0). :func:`as_assignment` turns any accepted form into it:

* an assignment-like sequence of C integers (any labels; they are renumbered),
* a list of groups, each a list of class ids or class names,
* a dict ``{superclass name: [class names or ids]}`` (the YAML form).

:func:`group_scores` is the one implementation of turning fine logits into superclass
scores; :class:`GroupedHead` (a module) and the grouped evaluation in
:mod:`hiercluster.evaluate` (many groupings at once) both call it.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hiercluster.errors import HierclusterError

REDUCTIONS = ("prob_sum", "mean_logit", "argmax_then_map")

Groups = Union[np.ndarray, torch.Tensor, Sequence[Any], Mapping[Any, Sequence[Any]]]


# --- canonical groupings --------------------------------------------------------------


def canonical_assignment(labels: np.ndarray) -> np.ndarray:
    """Renumber group labels 0..k-1 in the order of each group's smallest class id.

    Examples
    --------
    >>> canonical_assignment(np.array([7, 3, 7, 5]))
    array([0, 1, 0, 2])
    """
    labels = np.asarray(labels)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def _class_list(class_names: Sequence[str] | int | None) -> list[str] | None:
    if class_names is None:
        return None
    if isinstance(class_names, (int, np.integer)):
        return [str(i) for i in range(int(class_names))]
    names = [str(n) for n in class_names]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise HierclusterError(f"class names must be unique; {dup!r} appears more than once")
    return names


def _resolve_class(item: Any, names: list[str] | None, n_classes: int | None, where: str) -> int:
    """A class given by id (int) or by name (str) -> its id, with a clear error otherwise."""
    if isinstance(item, (bool, np.bool_)):
        raise HierclusterError(f"{where}: {item!r} is not a class id or class name")
    if isinstance(item, (int, np.integer)):
        idx = int(item)
        if idx < 0 or (n_classes is not None and idx >= n_classes):
            bound = f"0..{n_classes - 1}" if n_classes is not None else ">= 0"
            raise HierclusterError(f"{where}: unknown class id {idx}; class ids are {bound}")
        return idx
    if isinstance(item, str):
        if names is None:
            raise HierclusterError(f"{where}: class {item!r} is given by name, but no class names were given")
        if item in names:
            return names.index(item)
        close = difflib.get_close_matches(item, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise HierclusterError(f"{where}: unknown class {item!r}{hint}; known classes: {', '.join(names)}")
    raise HierclusterError(f"{where}: {item!r} is not a class id or class name")


def _describe(idx: int, names: list[str] | None) -> str:
    return f"{names[idx]!r} (id {idx})" if names is not None else f"id {idx}"


def _is_flat_labels(groups: Any) -> bool:
    if isinstance(groups, (np.ndarray, torch.Tensor)):
        return True
    return (
        isinstance(groups, Sequence)
        and not isinstance(groups, str)
        and len(groups) > 0
        and all(isinstance(g, (int, np.integer)) and not isinstance(g, bool) for g in groups)
    )


def as_assignment(groups: Groups, class_names: Sequence[str] | int | None = None) -> np.ndarray:
    """The canonical assignment array of a grouping given in any accepted form.

    Parameters
    ----------
    groups : array-like of int, list of lists, or dict
        * C integers: group label of each class (renumbered canonically);
        * a list of groups, each a list of class ids or names;
        * ``{superclass name: [class names or ids]}``.
        Every class must appear in exactly one group.
    class_names : list of str or int, optional
        The C class names (needed when classes are given by name), or just C. When
        omitted, C is the length of a flat assignment or the number of classes listed.

    Returns
    -------
    numpy.ndarray
        int64, length C, values 0..k-1 ordered by each group's smallest class id.

    Raises
    ------
    HierclusterError
        A class missing, repeated or unknown (named in the message), an empty group, or
        an assignment of the wrong length.

    Examples
    --------
    >>> names = ["cat", "car", "dog", "bus"]
    >>> as_assignment({"vehicles": ["car", "bus"], "pets": ["cat", "dog"]}, names)
    array([0, 1, 0, 1])
    >>> as_assignment([[3, 1], [2, 0]])
    array([0, 1, 0, 1])
    >>> as_assignment([5, 5, 2, 2])
    array([0, 0, 1, 1])
    """
    names = _class_list(class_names)
    n_classes = len(names) if names is not None else None
    if _is_flat_labels(groups):
        arr = groups.detach().cpu().numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise HierclusterError(
                f"an assignment must be a 1-D array of integer group ids, got shape {arr.shape} dtype {arr.dtype}"
            )
        if n_classes is not None and len(arr) != n_classes:
            raise HierclusterError(f"assignment has length {len(arr)} but there are {n_classes} classes")
        if len(arr) == 0:
            raise HierclusterError("an assignment needs at least one class")
        if arr.min() < 0:
            raise HierclusterError(f"assignment has a negative group id ({int(arr.min())}); ids must be >= 0")
        return canonical_assignment(arr)

    if isinstance(groups, Mapping):
        items = [(str(name), members) for name, members in groups.items()]
    elif isinstance(groups, Sequence) and not isinstance(groups, str):
        items = [(f"group {i}", members) for i, members in enumerate(groups)]
    else:
        raise HierclusterError(
            f"cannot read a grouping from {type(groups).__name__}; give an assignment array, "
            "a list of lists of classes, or a dict {superclass name: [class names]}"
        )
    if not items:
        raise HierclusterError("the grouping has no groups")
    owner: dict[int, str] = {}
    for name, members in items:
        if isinstance(members, (str, bytes)) or not isinstance(members, (Sequence, np.ndarray)):
            raise HierclusterError(f"superclass {name!r} must list its classes, got {members!r}")
        if len(members) == 0:
            raise HierclusterError(f"superclass {name!r} has no classes")
        for item in members:
            idx = _resolve_class(item, names, n_classes, f"superclass {name!r}")
            if idx in owner:
                where = "twice in " + repr(name) if owner[idx] == name else f"in {owner[idx]!r} and {name!r}"
                raise HierclusterError(
                    f"class {_describe(idx, names)} appears {where}; every class must be in exactly one superclass"
                )
            owner[idx] = name
    total = n_classes if n_classes is not None else max(owner) + 1
    missing = [i for i in range(total) if i not in owner]
    if missing:
        shown = ", ".join(_describe(i, names) for i in missing)
        raise HierclusterError(f"the grouping misses class {shown}; every class must be in exactly one superclass")
    order = {name: g for g, (name, _) in enumerate(items)}
    return canonical_assignment(np.array([order[owner[i]] for i in range(total)], dtype=np.int64))


def group_names(
    groups: Groups, class_names: Sequence[str], names: Mapping[str, Sequence[Any]] | None = None
) -> list[str]:
    """Names of the superclasses of a grouping, in canonical group-id order.

    A dict grouping names its own groups. Otherwise a group whose member set equals an
    entry of ``names`` (``{superclass name: [class names]}``) takes that name, and any
    other group is named by its members joined with ``+`` in class-id order.

    Examples
    --------
    >>> group_names([0, 1, 0], ["Sandal", "Bag", "Sneaker"])
    ['Sandal+Sneaker', 'Bag']
    >>> group_names([0, 1, 0], ["Sandal", "Bag", "Sneaker"], names={"Footwear": ["Sneaker", "Sandal"]})
    ['Footwear', 'Bag']
    """
    cls = _class_list(class_names)
    assert cls is not None
    assignment = as_assignment(groups, cls)
    by_members: dict[frozenset[int], str] = {}
    if isinstance(groups, Mapping):
        by_members.update(_named_sets(groups, cls))
    if names:
        for members, name in _named_sets(names, cls).items():
            by_members.setdefault(members, name)
    out = []
    for g in range(int(assignment.max()) + 1):
        members = np.flatnonzero(assignment == g)
        key = frozenset(int(m) for m in members)
        out.append(by_members.get(key, "+".join(cls[m] for m in members)))
    return out


def _named_sets(names: Mapping[Any, Sequence[Any]], class_names: list[str]) -> dict[frozenset[int], str]:
    """``{name: [classes]}`` -> ``{frozenset of class ids: name}``; classes are validated."""
    out: dict[frozenset[int], str] = {}
    for name, members in names.items():
        if isinstance(members, (str, bytes)) or not isinstance(members, (Sequence, np.ndarray)) or not len(members):
            raise HierclusterError(f"superclass name {name!r} must map to a non-empty list of class names")
        key = frozenset(_resolve_class(m, class_names, len(class_names), f"superclass {name!r}") for m in members)
        if key in out:
            raise HierclusterError(f"the classes of superclass {name!r} are already named {out[key]!r}")
        out[key] = str(name)
    return out


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


def remap_labels(y: torch.Tensor | np.ndarray, groups: Groups, class_names: Sequence[str] | None = None) -> Any:
    """Fine labels -> superclass labels (same type as ``y``).

    Examples
    --------
    >>> remap_labels(torch.tensor([0, 1, 2, 2]), [[0, 2], [1]])
    tensor([0, 1, 0, 0])
    """
    assignment = as_assignment(groups, class_names)
    arr = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if arr.size and (arr.min() < 0 or arr.max() >= len(assignment)):
        bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
        raise HierclusterError(f"label {bad} is outside the {len(assignment)} classes of the grouping")
    out = assignment[arr.astype(np.int64)]
    return torch.from_numpy(out).to(y.device) if isinstance(y, torch.Tensor) else out


__all__ = [
    "REDUCTIONS",
    "GroupedHead",
    "as_assignment",
    "canonical_assignment",
    "group_names",
    "group_argmax",
    "group_scores",
    "merge_head",
    "onehot_matrix",
    "remap_labels",
]
