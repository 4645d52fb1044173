"""Groupings of classes into superclasses, in one canonical form.

A *grouping* of C classes into k superclasses has one canonical form used everywhere
in the package: an int64 numpy array ``assignment`` of length C with values 0..k-1,
every id used, ids numbered in the order of each group's smallest class id (so class 0
is always in group 0). :func:`as_assignment` turns any accepted form into it:

* an assignment-like sequence of C integers (any labels; they are renumbered),
* a list of groups, each a list of class ids or class names,
* a dict ``{superclass name: [class names or ids]}`` (the YAML form).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch

from hiercluster.errors import HierclusterError

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


__all__ = ["Groups", "as_assignment", "canonical_assignment", "group_names", "remap_labels"]
