"""The report's section on a run's several class trees: the choice per k, and every tree's figures.

The choice (run.json ``tree_selection``) was made on held-out training images; the test
columns here show each tree's own answer on the evaluation split, for the reader to
compare, and played no part in it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from hiercluster.evaluation.metrics import headline
from hiercluster.report.rows import fewest_bits_cell, fmt_number


def _held_cell(candidate: Mapping[str, Any] | None) -> str:
    """``"2 / +0.41"``: a tree's held-out fewest bits within tolerance and its drop there (``none`` when out of it)."""
    if not candidate:
        return "-"
    bits = "none" if candidate["bits"] is None else str(candidate["bits"])
    drop = float(candidate["drop"])
    return f"{bits} / {'-' if math.isnan(drop) else fmt_number(drop, signed=True)}"


def _test_cell(entry: Mapping[str, Any] | None) -> str:
    """``"2 (confident), +0.52 [+0.30, +0.74]"``: a tree level's headline answer on the evaluation split."""
    if entry is None:
        return "-"
    w = entry["winner"]
    if w is None:
        return "none in grid"
    fewest = fewest_bits_cell(entry["min_bits"], entry.get("lowest_bits"))
    fewest += f" ({entry['confidence']})" if entry.get("confidence") else ""
    drop = fmt_number(w["drop"], signed=True)
    if w.get("drop_lo") is not None and w.get("drop_hi") is not None:
        drop += f" [{fmt_number(w['drop_lo'], signed=True)}, {fmt_number(w['drop_hi'], signed=True)}]"
    return f"{fewest}, {drop}"


def trees_section(info: Mapping[str, Any], rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines of "Class trees": one row per k with the chosen tree, its held-out answers and test figures.

    Empty for a run of one tree. ``rows``: every level's rows (not only the chosen ones).
    """
    selection = info.get("tree_selection")
    trees = list(info["hierarchy"]["embedding"]) if isinstance(info["hierarchy"]["embedding"], list) else []
    if not selection or len(trees) < 2:
        return []
    tolerance = float(info["tolerance"])
    auto = "holdout" in selection  # a fixed select (a tree's name) held nothing out
    level_of = {(lv["k"], lv.get("tree")): name for name, lv in info["levels"].items() if lv.get("tree")}
    test = {t["level"]: t for t in headline([r for r in rows if r["level"] in level_of.values()], tolerance)}
    lines = ["## Class trees: which one answers each level", ""]
    if auto:
        lines += [
            f"Trees built: {', '.join(f'`{t}`' for t in trees)}. Each k is answered by the tree chosen on "
            f"{selection['holdout']:,} images of the `{selection['split']}` split held out from fitting the trees "
            f"(never the evaluation split). Rule: {selection['rule']}. The test columns are each tree's answer on the "
            "evaluation split, shown for comparison only; they played no part in the choice.",
            "",
        ]
    else:
        lines += [f"Trees built: {', '.join(f'`{t}`' for t in trees)}; {selection['rule']} answers every k.", ""]
    held_head = "".join(f" {t}: held-out bits / drop pp |" for t in trees) if auto else ""
    test_head = "".join(f" {t}: test fewest bits, drop pp [95% CI] |" for t in trees)
    lines += [
        f"| k | chosen |{held_head}{test_head}",
        "|---|---|" + "---|" * (len(trees) * (2 if auto else 1)),
    ]
    for k_text, choice in selection["by_k"].items():
        k = int(k_text)
        held = "".join(f" {_held_cell(choice['candidates'].get(t))} |" for t in trees) if auto else ""
        tests = "".join(f" {_test_cell(test.get(level_of.get((k, t), '')))} |" for t in trees)
        lines.append(f"| {k} | `{choice['tree']}` |{held}{tests}")
    lines.append("")
    by_tree = info.get("reference_comparison_by_tree") or {}
    if by_tree:
        cells = "; ".join(f"`{t}` ARI {c['ari']:.3f}, NMI {c['nmi']:.3f}" for t, c in by_tree.items())
        lines += [f"Each tree against the reference grouping (cut at its k): {cells}.", ""]
    return lines


__all__ = ["trees_section"]
