"""Choosing one class tree per level k among several, on held-out images, never on the evaluation split.

``hierarchy.select: auto`` builds every tree of ``hierarchy.embedding`` and evaluates
each tree's cuts for every spec. On held-out images of the training split (the trees never
saw them), each tree's cut at k gets the sweep's answer for it: the fewest bits whose
held-out drop is within tolerance, and the lowest drop among the specs at that width
(:func:`~hiercluster.evaluation.metrics.min_bits`). The tree with the fewer bits wins k;
equal bits go to the lower held-out drop, then to the tree listed first. A tree that
stays outside tolerance at every width ranks after any that reaches it, by its lowest
held-out drop. The test-split figures of every tree are reported beside the choice; they
play no part in it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hiercluster.errors import HierclusterError
from hiercluster.evaluation.metrics import min_bits

SELECTION_RULE = (
    "per k, each tree's fewest bits whose drop on the held-out training images is within tolerance "
    "(then the lowest held-out drop at that width); fewer bits win, then the lower drop, then the tree listed first; "
    "a tree within tolerance at no width ranks last, by its lowest held-out drop"
)


def _candidate(rows: Sequence[Mapping[str, Any]], k: int, tolerance: float) -> dict[str, Any]:
    """One tree's held-out answer at k: ``bits`` (None when no spec is within tolerance), ``drop``, ``tag``."""
    win = min_bits(rows, tolerance).get(k)
    if win is not None:
        return {"bits": win["bits"], "drop": float(win["drop"]), "tag": win.get("tag")}
    best = min(rows, key=lambda r: float(r["drop"]) if not math.isnan(float(r["drop"])) else math.inf)
    return {"bits": None, "drop": float(best["drop"]), "tag": best.get("tag")}


def _rank(candidate: Mapping[str, Any]) -> tuple[float, float]:
    bits = math.inf if candidate["bits"] is None else float(candidate["bits"])
    drop = float(candidate["drop"])
    return bits, drop if not math.isnan(drop) else math.inf


def choose_trees(
    holdout_rows: Iterable[Mapping[str, Any]], trees: Sequence[str], tolerance: float
) -> dict[int, dict[str, Any]]:
    """The tree chosen for every k, from held-out drops (see the module docstring for the rule).

    Parameters
    ----------
    holdout_rows : iterable of dict
        One per (spec, tree, k): ``k``, ``tree``, ``bits``, ``drop`` (pp, on the held-out
        images) and optionally ``tag``.
    trees : sequence of str
        Every tree, in the order listed (ties go to the earlier one).
    tolerance : float
        In pp, as for the headline.

    Returns
    -------
    dict
        ``{k: {"tree": chosen, "candidates": {tree: {"bits", "drop", "tag"}}}}``, k descending.

    Examples
    --------
    >>> rows = [{"k": 3, "tree": "a", "bits": 2, "drop": 0.9}, {"k": 3, "tree": "b", "bits": 2, "drop": 0.4},
    ...         {"k": 2, "tree": "a", "bits": 2, "drop": 3.0}, {"k": 2, "tree": "a", "bits": 4, "drop": 0.1},
    ...         {"k": 2, "tree": "b", "bits": 2, "drop": 0.8}]
    >>> {k: c["tree"] for k, c in choose_trees(rows, ["a", "b"], 1.0).items()}
    {3: 'b', 2: 'b'}
    """
    by_k: dict[int, dict[str, list[Mapping[str, Any]]]] = {}
    for i, row in enumerate(holdout_rows):
        if row.get("tree") not in trees:
            raise HierclusterError(f"choose_trees: held-out row {i} names tree {row.get('tree')!r}, not one of {list(trees)}")
        by_k.setdefault(int(row["k"]), {}).setdefault(row["tree"], []).append(row)
    chosen = {}
    for k in sorted(by_k, reverse=True):
        candidates = {tree: _candidate(by_k[k][tree], k, tolerance) for tree in trees if tree in by_k[k]}
        best = min(candidates, key=lambda tree: (*_rank(candidates[tree]), trees.index(tree)))
        chosen[k] = {"tree": best, "candidates": candidates}
    return chosen


def selected_level_names(levels: Mapping[str, Mapping[str, Any]], chosen: Mapping[int, str]) -> list[str]:
    """The levels the headline reports: those of no particular tree, and each k's chosen tree's cut.

    ``levels``: ``{name: {"k": k, "tree": tree (absent or "" for none), ...}}`` (run.json's
    form); ``chosen``: ``{k: tree}``. A tree level whose k has no choice is left out.

    Examples
    --------
    >>> levels = {"k=3": {"k": 3}, "k=2 a": {"k": 2, "tree": "a"}, "k=2 b": {"k": 2, "tree": "b"}}
    >>> selected_level_names(levels, {2: "b"})
    ['k=3', 'k=2 b']
    """
    return [
        name for name, level in levels.items()
        if not level.get("tree") or chosen.get(int(level["k"])) == level["tree"]
    ]


def _chosen(run_info: Mapping[str, Any]) -> dict[int, str] | None:
    selection = run_info.get("tree_selection")
    if not selection:
        return None
    return {int(k): choice["tree"] for k, choice in selection["by_k"].items()}


def headline_rows(run_info: Mapping[str, Any], rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The result rows of the levels the headline reports: all of a one-tree run's; else each k's chosen tree's.

    ``run_info``: run.json (its ``levels`` and ``tree_selection``, :func:`choose_trees`'
    answer by k).
    """
    chosen = _chosen(run_info)
    if chosen is None:
        return list(rows)
    names = set(selected_level_names(run_info["levels"], chosen))
    return [r for r in rows if r["level"] in names]


def headline_info(run_info: Mapping[str, Any]) -> dict[str, Any]:
    """run.json with only the levels the headline reports (what the report's level tables walk)."""
    chosen = _chosen(run_info)
    if chosen is None:
        return dict(run_info)
    names = selected_level_names(run_info["levels"], chosen)
    return {**run_info, "levels": {name: run_info["levels"][name] for name in names}}


__all__ = ["SELECTION_RULE", "choose_trees", "headline_info", "headline_rows", "selected_level_names"]
