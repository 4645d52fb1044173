"""The run report: ``report.md`` plus PNG plots, built only from what the run directory holds.

:func:`write_report` reads ``run.json``, ``results.sqlite`` and ``hierarchy.json``, so
``hiercluster report DIR`` rebuilds the same report without touching a model.

Every table names the grid dimensions (:data:`DIMS`) that vary in the run, and each spec
by its full tag; a table that shows a subset of the specs says which.

The report stays small at any number of classes and levels (measured at 1,000 classes
and 999 levels: 10.5 MB before the caps): per-level tables and lists show at most
:data:`~hiercluster.report.plots.MAX_LEVELS_SHOWN` levels spread over k, a level lists
its first :data:`MAX_GROUPS_LISTED` groups, and the bias table the
:data:`MAX_BIAS_CLASSES` classes whose share changed most, the others in one line.
results.csv, run.json and hierarchy.json keep everything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hiercluster.errors import HierclusterError, short_repr
from hiercluster.evaluation.metrics import headline
from hiercluster.evaluation.selection import headline_info, headline_rows
from hiercluster.report.claims import (
    SensitivityRun,
    bits_label,
    claims_section,
    identical_note,
    identical_to_lower,
    latest_sensitivity,
    layer_section,
)
from hiercluster.report.plots import MAX_LEVELS_SHOWN, spread_by_k
from hiercluster.report.rows import (
    CHANCE_MARGIN_PP,
    DATA_LIMIT_SPEC,
    DIMS,
    MAX_GROUPS_CHARS,
    bias_choice,
    dim_value,
    dim_values,
    dims_label,
    fewest_bits_cell,
    fmt_number,
    interval_cell,
    p_cell,
    rtn_rows,
    subset_note,
    uniform_rows,
    varying_dims,
)
from hiercluster.report.frontier import has_mixed_precision, plot_frontier
from hiercluster.report.trees import trees_section
from hiercluster.run.records import XZ_MAX_BYTES
from hiercluster.run.store import ResultsStore
from quant._files import write_text_atomic
from quant._validate import check_json

# Classes of the bias table, by the size of their change in share; the others are one summary line.
MAX_BIAS_CLASSES = 20
# Groups listed per level under "Hierarchy levels", and the characters of one group's name.
MAX_GROUPS_LISTED = 8
MAX_GROUP_NAME_CHARS = 60


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]], ResultsStore]:
    """``(run.json, result rows of the run's current grid, open store)`` of a run directory.

    ``run.json`` is validated (:func:`hiercluster.run.rundir.read_run_info`, and here what
    only the report reads) and the rows are read through the store's checks, so a
    damaged run directory is one clear error.
    """
    from hiercluster.run.rundir import DB_FILE, RUN_FILE, check_is_run, read_run_info

    run_dir = Path(run_dir)
    check_is_run(run_dir)
    info = read_run_info(run_dir)
    _check_report_info(info, run_dir / RUN_FILE)
    store = ResultsStore(run_dir / DB_FILE)
    try:
        rows = store.results([g["key"] for g in info["grid"]], complete=True)
    except BaseException:
        store.close()
        raise
    return info, rows, store


def _check_report_info(info: dict[str, Any], path: Path) -> None:
    """The optional run.json entries only the report reads have their shape (absent in older runs)."""
    if info.get("data_limit") is None:
        return
    try:
        check_json(info["data_limit"], DATA_LIMIT_SPEC, "data_limit", error=HierclusterError)
    except HierclusterError as exc:
        raise HierclusterError(f"{path} is damaged: {exc}; run `hiercluster run` again on this folder") from None
    limit = info["data_limit"]
    if not 0 < limit["limit"] <= limit["of"]:
        raise HierclusterError(
            f"{path} is damaged: data_limit: {limit['limit']} of {limit['of']} images is not a subset; "
            "run `hiercluster run` again on this folder"
        )


def share_cell(share: float | None) -> str:
    """An absorbed share in %, ``-`` when it is undefined (no fine drop)."""
    return "-" if share is None else fmt_number(100 * share, 1)


def random_drop_cell(row: dict[str, Any]) -> str:
    """``"+0.82 ± 0.11"``: the drop of random groupings of the same sizes, mean ± std (pp)."""
    return f"{fmt_number(row['random_drop_mean'], signed=True)} ± {fmt_number(row['random_drop_std'])}"


def format_headline(
    table: Sequence[dict[str, Any]], names: dict[str, list[str]], tolerance: float, n_classes: int | None = None
) -> str:
    """The headline table as Markdown (also printed by ``hiercluster run`` and ``report``).

    The winner is named by its full tag; its fewest bits read "3 (borderline)" when the
    drop's 95% interval ends above ``tolerance`` and "3 (confident)" when it does not. The
    drop and the advantage carry their intervals (``[lo, hi]``) and ``rank p`` is the
    chance test (:func:`~hiercluster.evaluation.metrics.rank_p`). ``n_classes``: the level
    with one class per group has no random baseline (every random grouping is the same),
    shown as ``-``.
    """
    lines = [
        f"| level | k | fewest avg bits (drop ≤ {tolerance:g} pp) | winning spec | avg bits | float acc % | "
        "quant acc % | drop pp [95% CI] | random drop pp (mean ± std) | advantage pp [95% CI] | rank p | "
        "superclasses |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in table:
        w = t["winner"]
        groups = ", ".join(names.get(t["level"], []))
        if len(groups) > MAX_GROUPS_CHARS:
            groups = groups[: MAX_GROUPS_CHARS - 3] + "..."
        if w is None:
            lines.append(
                f"| {t['level']} | {t['k']} | none in grid | - | - | {100 * t['acc_float']:.2f} | - | - | - | - | - "
                f"| {groups} |"
            )
            continue
        one_per_class = n_classes is not None and t["k"] == n_classes
        random_drop = "-" if one_per_class else random_drop_cell(w)
        advantage = "-" if one_per_class else interval_cell(w["advantage"], w.get("advantage_lo"), w.get("advantage_hi"))
        fewest = fewest_bits_cell(t["min_bits"], t.get("lowest_bits"))
        if t.get("confidence"):
            fewest += f" ({t['confidence']})"
        lines.append(
            f"| {t['level']} | {t['k']} | {fewest} | `{w['tag']}` | "
            f"{w['avg_bits']:.3f} | {100 * w['acc_float']:.2f} | {100 * w['acc_quant']:.2f} | "
            f"{interval_cell(w['drop'], w.get('drop_lo'), w.get('drop_hi'))} | {random_drop} | {advantage} | "
            f"{'-' if one_per_class else p_cell(w.get('rank_p'))} | {groups} |"
        )
    return "\n".join(lines)


def chance_warning(float_accuracy: float, n_classes: int) -> str | None:
    """A one-line warning when the float model is within :data:`CHANCE_MARGIN_PP` of chance or below, else None.

    Examples
    --------
    >>> chance_warning(0.1, 10).split(":")[0]
    'the float model is at chance level (10.00% on 10 classes; chance is 10.00%)'
    >>> chance_warning(0.5, 10) is None
    True
    """
    acc, chance = 100 * float_accuracy, 100 / n_classes
    if acc > chance + CHANCE_MARGIN_PP:
        return None
    where = "at" if acc >= chance - CHANCE_MARGIN_PP else "below"
    return (
        f"the float model is {where} chance level ({acc:.2f}% on {n_classes} classes; chance is {chance:.2f}%): "
        "its drops and fewest bits say nothing about quantization"
    )


def _kb(n: float | None, missing: str = "-") -> str:
    return missing if n is None else f"{n / 1024:.1f}"


def xz_note(rows: Sequence[dict[str, Any]]) -> str:
    """What the xz column is: the preset, and why some cells say "not computed".

    Examples
    --------
    >>> xz_note([{"xz_bytes": 10}])
    'xz: LZMA2 preset 6 of the bit-packed payload.'
    """
    from quant.packing import XZ_PRESET

    text = f"xz: LZMA2 preset {XZ_PRESET} of the bit-packed payload."
    if any(r["xz_bytes"] is None for r in rows):
        text += (
            f" xz (LZMA2 preset {XZ_PRESET}) is computed for every spec whose payload is at most "
            f"{XZ_MAX_BYTES / 2**20:g} MiB and, above that, for the exported winners only (xz costs about "
            "0.5 CPU-s per MiB, 24 CPU-s per spec on a ViT-B/16); the gzip column is computed for every spec."
        )
    return text


def _fine_level(info: dict[str, Any]) -> str:
    c = len(info["class_names"])
    return f"k={c}" if f"k={c}" in info["levels"] else next(iter(info["levels"]))


def _one_per_class(info: dict[str, Any], level: str) -> bool:
    """Whether ``level`` puts every class in its own group (its random baseline is the model itself)."""
    lv = info["levels"].get(level)
    return isinstance(lv, dict) and lv.get("k") == len(info["class_names"])


def shown_levels(info: dict[str, Any]) -> list[str]:
    """The levels the per-level tables and lists show: every level, or a spread over k of at most
    :data:`~hiercluster.report.plots.MAX_LEVELS_SHOWN` (reference groupings always among them)."""
    levels = info["levels"]
    reference = [name for name, lv in levels.items() if lv.get("kind") == "reference"]
    return spread_by_k({name: lv["k"] for name, lv in levels.items()}, MAX_LEVELS_SHOWN, keep=reference)


def _levels_note(info: dict[str, Any], shown: Sequence[str]) -> str:
    """``"Showing 12 of 999 levels, ..."`` when a per-level table leaves levels out, else ``""``."""
    total = len(info["levels"])
    if len(shown) == total:
        return ""
    return f"Showing {len(shown)} of {total} levels, spread over k; results.csv has every level."


def _short_group(name: str, size: int) -> str:
    """A group's name cut to :data:`MAX_GROUP_NAME_CHARS`, then its size: ``"a+b+c+… (497 classes)"``.

    Examples
    --------
    >>> _short_group("Footwear", 3)
    'Footwear'
    >>> _short_group("+".join(f"class_{i:03d}" for i in range(100)), 100)
    'class_000+class_001+class_002+class_003+class_004+class_005+… (100 classes)'
    """
    if len(name) <= MAX_GROUP_NAME_CHARS:
        return name
    head = name[:MAX_GROUP_NAME_CHARS]
    if "+" in head:  # cut between class names, not inside one
        head = head[: head.rindex("+") + 1]
    return head + f"… ({size} classes)"


def level_line(name: str, level: Mapping[str, Any]) -> str:
    """One bullet of "Hierarchy levels": the first :data:`MAX_GROUPS_LISTED` groups, each name cut short."""
    names = list(level["names"])
    sizes = np.bincount(np.asarray(level.get("assignment") or [], dtype=np.int64), minlength=len(names))
    groups = [_short_group(g, int(size)) for g, size in zip(names[:MAX_GROUPS_LISTED], sizes)]
    if len(names) > MAX_GROUPS_LISTED:
        groups.append(f"… and {len(names) - MAX_GROUPS_LISTED} more groups (run.json has them all)")
    return f"- **{name}** ({level['kind']}): " + "; ".join(groups)


def _blocks(rows: Sequence[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """``rows`` split by every varying dimension but bits: ``[(label, rows)]``, label "" for one block."""
    dims = varying_dims(rows, skip=("bits",))
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(dim_value(r, c) for c, _ in dims), []).append(r)
    return [(dims_label(group[0], dims), group) for group in groups.values()]


def _specs_by_bits(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first row of each spec in ``rows``, widest first (grid order among equal widths)."""
    first: dict[str, dict[str, Any]] = {}
    for r in rows:
        first.setdefault(r["spec_key"], r)
    return sorted(first.values(), key=lambda r: -r["bits"])


def seed_table(info: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """The seed paper's table: fine accuracy and size of every uniform-precision spec, by full tag.

    One block per combination of the dimensions that vary (bits aside); a sentence names
    the specs left out (mixed-precision plans). A width whose logits are bit-identical to
    a narrower one's reads ``8 (= 4 bits)``, explained in a note under the table
    (:func:`~hiercluster.report.claims.identical_to_lower`).
    """
    fine = [r for r in rows if r["level"] == _fine_level(info)]
    if not fine:
        return "_No results at the fine level._"
    shown = uniform_rows(fine)
    shown_keys = {r["spec_key"] for r in shown}
    note = subset_note(shown, [r for r in fine if r["spec_key"] not in shown_keys], "mixed precision")
    fp32 = fine[0]["fp32_bytes"]
    acc0 = info["float_accuracy"]
    identical = identical_to_lower(rows)
    out = ["Fine labels; specs with every weight at the nominal width." + (f" {note}" if note else "")
           + f" {xz_note(fine)}", ""]
    for label, block in _blocks(shown):
        if label:
            out += [f"**{label}**", ""]
        out += [
            "| spec | bits | acc % | drop pp | packed KB | size saved % | gzip KB | xz KB | avg bits |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| FP32 (float model) | 32 | {100 * acc0:.2f} | {fmt_number(0)} | {_kb(fp32)} | {fmt_number(0, 1)} "
            "| - | - | 32 |",
        ]
        for r in _specs_by_bits(block):
            out.append(
                f"| `{r['tag']}` | {bits_label(r['bits'], identical.get(r['spec_key']))} | {100 * r['fine_acc']:.2f} | "
                f"{fmt_number(100 * (acc0 - r['fine_acc']), signed=True)} | "
                f"{_kb(r['packed_bytes'])} | {fmt_number(100 * (1 - r['packed_bytes'] / fp32), 1)} | "
                f"{_kb(r['gzip_bytes'])} | {_kb(r['xz_bytes'], missing='not computed')} | {r['avg_bits']:.2f} |"
            )
        out.append("")
    if identical:
        winners = [t["winner"] for t in headline(rows, info["tolerance"])] if "tolerance" in info else []
        out += [identical_note(rows, identical, winners), ""]
    return "\n".join(out)


def _level_cell(r: dict[str, Any] | None, one_per_class: bool) -> str:
    """``acc (drop) | random mean±std | advantage``; the random part is ``-`` where every class is a group."""
    if r is None:
        return "-"
    head = f"{100 * r['acc_quant']:.1f} ({fmt_number(r['drop'], 1, signed=True)})"
    if one_per_class:
        return f"{head} \\| - \\| -"
    return (
        f"{head} \\| {100 * r['random_acc_quant_mean']:.1f}±{fmt_number(100 * r['random_acc_quant_std'], 1)} "
        f"\\| {fmt_number(r['advantage'], 1, signed=True)}"
    )


def _spec_heading(spec: dict[str, Any], lower_bits: int | None) -> str:
    """A spec's column heading: its tag, then ``(= 4 bits)`` when its logits equal the 4-bit spec's."""
    return f"`{spec['tag']}`" + ("" if lower_bits is None else f" (= {lower_bits} bits)")


def level_tables(info: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """Grouped accuracy per level and spec with the random baseline and the advantage.

    Every spec of the run appears, as a column headed by its full tag; one table per
    combination of the dimensions that vary (bits aside). A spec whose logits are
    bit-identical to a narrower one's is headed ``tag (= 4 bits)``.
    """
    if not rows:
        return "_No results._"
    identical = identical_to_lower(rows)
    shown = shown_levels(info)
    fine = [level for level in shown if _one_per_class(info, level)]
    note = _levels_note(info, shown)
    out = [
        "Each cell: grouped accuracy % (drop pp) \\| random grouping of the same sizes: accuracy % mean ± std "
        "\\| advantage pp. Columns: every spec, by its full tag."
        + (f" The {fine[0]} row has no random baseline (every class is its own group)." if fine else "")
        + (f" {note}" if note else ""),
        "",
    ]
    for label, block in _blocks(rows):
        specs = _specs_by_bits(block)
        if label:
            out += [f"**{label}**", ""]
        out += [
            "| level | float acc % | "
            + " | ".join(_spec_heading(s, identical.get(s["spec_key"])) for s in specs) + " |",
            "|---|---|" + "---|" * len(specs),
        ]
        cells = {(r["level"], r["spec_key"]): r for r in block}
        for level in shown:
            level_rows = [cells.get((level, s["spec_key"])) for s in specs]
            present = [r for r in level_rows if r is not None]
            if not present:
                continue
            one = _one_per_class(info, level)
            out.append(
                f"| {level} | {100 * present[0]['acc_float']:.2f} | "
                + " | ".join(_level_cell(r, one) for r in level_rows) + " |"
            )
        out.append("")
    if identical:
        out += ["\"(= N bits)\": the spec's logits are bit-identical to those of the same spec at N bits (see the note "
                "under the precision table).", ""]
    return "\n".join(out)


def comparison_choice(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The spec of the comparison table: the lowest bit width among uniform-precision specs,
    the one with the largest fine drop there (where merging has most to absorb)."""
    candidates = uniform_rows(rows)
    if not candidates:
        return None
    low = min(r["bits"] for r in candidates)
    return min((r for r in candidates if r["bits"] == low), key=lambda r: r["fine_acc"])


def comparison_table(info: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """DESIGN.md's honest comparison per level, for the :func:`comparison_choice` spec.

    Per level: the group sizes; the float grouped accuracy of the learned grouping and the
    random groupings' mean (a merged head is easier when its groups are natural, so the
    learned one starts higher); the drop with its 95% interval and the rank p; the
    advantage with its interval; the absorbed share ``1 - drop_k / drop_fine`` of the
    learned grouping and of the random ones (comparable across groupings, unlike the
    advantage in pp, which scales with the fine drop).
    """
    chosen = comparison_choice(rows)
    if chosen is None:
        return "_No results._"
    spec_rows = {r["level"]: r for r in rows if r["spec_key"] == chosen["spec_key"]}
    shown = [level for level in shown_levels(info) if level in spec_rows]
    note = _levels_note(info, shown_levels(info))
    fine_drop = interval_cell(100 * (info["float_accuracy"] - chosen["fine_acc"]), chosen.get("fine_drop_lo"),
                              chosen.get("fine_drop_hi"))
    out = [
        f"Spec `{chosen['tag']}` (the lowest width; fine drop {fine_drop} pp). Intervals: 95% paired bootstrap over "
        "the evaluation images; rank p = (1 + random groupings whose drop ≤ the learned one's) / (random groupings "
        "+ 1), small when the learned grouping beats chance; absorbed = 1 - drop / fine drop."
        + (f" {note}" if note else ""),
        "",
        "| level | group sizes | float acc % learned | float acc % random mean | drop pp [95% CI] | rank p | "
        "advantage pp [95% CI] | absorbed % learned | absorbed % random |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for level in shown:
        r = spec_rows[level]
        one = _one_per_class(info, level)
        sizes = str(r.get("group_sizes") or "-")
        if len(sizes) > MAX_GROUPS_CHARS:
            sizes = sizes[: MAX_GROUPS_CHARS - 3] + "..."
        random_float = "-" if one else f"{100 * r['random_acc_float_mean']:.2f}"
        out.append(
            f"| {level} | {sizes} | {100 * r['acc_float']:.2f} | {random_float} | "
            f"{interval_cell(r['drop'], r.get('drop_lo'), r.get('drop_hi'))} | "
            f"{'-' if one else p_cell(r.get('rank_p'))} | "
            f"{'-' if one else interval_cell(r['advantage'], r.get('advantage_lo'), r.get('advantage_hi'))} | "
            f"{share_cell(r.get('absorbed_share'))} | {'-' if one else share_cell(r.get('random_absorbed_share_mean'))} |"
        )
    return "\n".join(out)


def _details(store: ResultsStore, key: str, info: dict[str, Any]) -> dict[str, Any]:
    """The checked details of a spec that has result rows (missing details are damage)."""
    details = store.spec_details(key, n_classes=len(info["class_names"]))
    if details is None:
        raise store.damaged(f"spec {short_repr(key, 30)} has results but no details")
    return details


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and its plots into ``run_dir``; returns the report path.

    Everything is read and checked before the first file is written, so a damaged run
    directory is refused with its files as they were.
    """
    from hiercluster.hierarchy.clustering import ClassHierarchy
    from hiercluster.report import figures as report_plots
    from hiercluster.report import plots
    from hiercluster.run.rundir import FIGURE_FILES, HIERARCHY_FILE, REPORT_FILE

    run_dir = Path(run_dir)
    info, rows, store = load_run(run_dir)
    try:
        details = {key: _details(store, key, info) for key in dict.fromkeys(r["spec_key"] for r in rows)}
    finally:
        store.close()
    tree_lines = trees_section(info, rows) + _other_tree_levels(info)
    # Below, the tables, plots and claims read the levels the headline reports: each k's chosen tree's.
    rows, info = headline_rows(info, rows), headline_info(info)
    tree = ClassHierarchy.from_json(run_dir / HIERARCHY_FILE) if (run_dir / HIERARCHY_FILE).is_file() else None
    table = headline(rows, info["tolerance"])
    names = {name: lv["names"] for name, lv in info["levels"].items()}
    chosen = bias_choice(rows)
    fig = {}
    figure = {name: run_dir / file for name, file in FIGURE_FILES.items()}
    if tree is not None:
        fig["dendrogram"] = plots.plot_dendrogram(tree, figure["dendrogram"])
    if rows:
        fig["drop_vs_bits"] = report_plots.plot_drop_vs_bits(rows, figure["drop_vs_bits"], info["tolerance"])
        fig["pareto"] = report_plots.plot_pareto(
            rows, info["float_accuracy"], figure["pareto"], level=_fine_level(info), tolerance=info["tolerance"]
        )
        if has_mixed_precision(rows):
            fig["frontier"] = plot_frontier(rows, figure["frontier"], info["tolerance"])
        uniform_keys = {r["spec_key"] for r in uniform_rows(rtn_rows(rows))}
        fig["quartiles"] = report_plots.plot_quartiles(
            {k: d for k, d in details.items() if k in uniform_keys}, figure["quartiles"]
        )
    if chosen is not None:
        fig["prediction_share"] = plots.plot_prediction_share(
            info["float_prediction_share"], details[chosen["spec_key"]]["prediction_share"], info["class_names"],
            figure["prediction_share"], title=f"Prediction share: float vs {chosen['tag']}",
        )
    md = _markdown(info, rows, table, names, fig, details, latest_sensitivity(run_dir), tree_lines)
    path = run_dir / REPORT_FILE
    write_text_atomic(path, md)
    return path


def _evaluated_on(info: dict[str, Any]) -> str:
    """``"on 500 of 10,000 test images (a fixed stratified subset) on `cuda`"``, or the whole split's count.

    The device the models ran on closes it; runs recorded before run.json named it leave it out.
    """
    limit = info.get("data_limit")
    if limit is None:
        where = f"on {info['n_eval']:,} images ({info['eval_split']} split)"
    else:
        where = (
            f"on {limit['limit']:,} of {limit['of']:,} {info['eval_split']} images "
            "(a fixed stratified subset, `data.limit`)"
        )
    return where + (f" on `{info['device']}`" if info.get("device") else "")


def _activations_line(rows: Sequence[dict[str, Any]]) -> str:
    """Whether the specs quantize activations (layer inputs) too, and to how many bits."""
    widths = dim_values(rows, "activation_bits")
    quantized = [w for w in widths if w != "float"]
    if not quantized:
        return "- activations: float in every spec (only weights are quantized)"
    where = "every spec" if len(quantized) == len(widths) else "the specs tagged " + ", ".join(f"+{w}" for w in quantized)
    bits = ", ".join(w[1:] for w in quantized)
    return f"- activations: **quantized** to {bits} bits in {where} (layer inputs, ranges calibrated; tag suffix +a<bits>)"


def _grid_lines(info: dict[str, Any], rows: Sequence[dict[str, Any]]) -> list[str]:
    """The header's grid: spec count, bit widths and lowest tested, what varies and what is fixed."""
    if not rows:
        return [f"- grid: {len(info['grid'])} quantization specs; no results yet"]
    bits = sorted({r["bits"] for r in rows}, reverse=True)
    varying = varying_dims(rows, skip=("bits",))
    # Activations get a line of their own: whether they were quantized at all is easy to miss.
    fixed = [(c, label) for c, label in DIMS if c not in ("bits", "activation_bits") and (c, label) not in varying]
    lines = [
        f"- grid: {len(info['grid'])} quantization specs; weight bits {', '.join(map(str, bits))} "
        f"(lowest tested: **{bits[-1]}**; a fewest-bits answer of {bits[-1]} means \"{bits[-1]} or fewer\")",
    ]
    if varying:
        lines.append("- varying: " + "; ".join(f"{label} ({', '.join(dim_values(rows, c))})" for c, label in varying))
    lines.append("- the same in every spec: " + ", ".join(f"{label} {dim_values(rows, c)[0]}" for c, label in fixed)
                 + "; biases stay float32")
    lines.append(_activations_line(rows))
    return lines


def _timings_line(timings: dict[str, Any]) -> str:
    """Where the time went; logits read from the run's cache are said to be, not timed as an evaluation."""
    cached = timings.get("float_logits_cached")
    float_part = (
        "float logits reused from the cache" if cached else f"float evaluation {timings.get('float_eval_s', 0):.1f} s"
    )
    return (
        f"- timings: {float_part}, sweep {timings.get('sweep_s', 0):.1f} s "
        f"({timings.get('specs_run', 0)} of {timings.get('specs_total', 0)} specs run this time)"
    )


def _header(info: dict[str, Any], rows: Sequence[dict[str, Any]]) -> list[str]:
    """The report's title and header bullets, warnings first."""
    h = info["hierarchy"]
    lines = [f"# hiercluster report: {info['dataset']}", ""]
    chance = chance_warning(info["float_accuracy"], len(info["class_names"]))
    if chance:
        lines += [f"> **Warning: {chance}.** Check the checkpoint and the data before reading the tables.", ""]
    cal = info.get("calibration") or {}
    if cal.get("used_by") and cal.get("from_eval_split"):
        lines += [
            "> **Warning: calibration data came from the evaluation split** (`calibration.allow_eval_split: true`): "
            "the calibrated results were fitted on the images they are scored on, so they are optimistic.",
            "",
        ]
    lines += [
        f"- model: `{info['checkpoint']}` (sha256 {info['checkpoint_sha256'][:12]}), float accuracy "
        f"**{100 * info['float_accuracy']:.2f}%** {_evaluated_on(info)}",
        f"- hierarchy: {_trees_text(h)}",
        f"- merged-head reduction: `{info['reduction']}`; random baseline: {info['random_seeds']} random groupings "
        f"of the same sizes per level; tolerance {info['tolerance']:g} pp",
        *_grid_lines(info, rows),
        "- **drop pp** = float accuracy - quantized accuracy, in percentage points (positive: the quantized model "
        "is worse); **random drop** = the drop of the random groupings, mean ± std; **advantage pp** = mean random "
        "drop - drop; **size saved %** = 1 - packed size / FP32 size (positive: smaller than FP32)",
    ]
    if cal.get("used_by"):
        lines.append(
            f"- calibration: {cal['images']} unlabeled images of the `{cal['split']}` split (seed {cal['seed']}, "
            f"batches of {cal['batch_size']}), for {', '.join(cal['used_by'])}; rtn = round to nearest, no data; "
            "+bn = BN statistics re-estimated"
        )
    if info.get("timings"):
        lines.append(_timings_line(info["timings"]))
    return lines


def _trees_text(h: Mapping[str, Any]) -> str:
    """The header's hierarchy bullet: one tree's embedding, linkage and metric, or the trees and how one is chosen."""
    trees = h["embedding"] if isinstance(h["embedding"], list) else [h["embedding"]]
    if len(trees) == 1:
        return f"`{trees[0]}` embeddings, `{h['linkage']}` linkage, `{h['metric']}` metric"
    select = h.get("select", "auto")
    how = "chosen per k on held-out training images" if select == "auto" else f"`{select}` answers every k"
    return f"{len(trees)} trees ({', '.join(f'`{t}`' for t in trees)}); {how} (see \"Class trees\")"


def _other_tree_levels(info: dict[str, Any]) -> list[str]:
    """Markdown bullets of the tree levels no k chose (the chosen ones are under "Hierarchy levels")."""
    shown = set(headline_info(info)["levels"])
    others = [name for name, lv in info["levels"].items() if lv.get("tree") and name not in shown]
    if not others:
        return []
    return ["### Levels of the trees not chosen", ""] + [level_line(n, info["levels"][n]) for n in others] + [""]


def _bias_section(info: dict[str, Any], rows: Sequence[dict[str, Any]], details: dict[str, dict[str, Any]]) -> list[str]:
    """Prediction shares of the float model and of the :func:`bias_choice` spec, biggest change first."""
    chosen = bias_choice(rows)
    if chosen is None:
        return []
    share = details[chosen["spec_key"]]["prediction_share"]
    pairs = sorted(zip(info["class_names"], info["float_prediction_share"], share), key=lambda t: -abs(t[2] - t[1]))
    shown, rest = pairs[:MAX_BIAS_CLASSES], pairs[MAX_BIAS_CLASSES:]
    which = f"the {len(shown)} of {len(pairs)} classes whose share changed most" if rest else "every class"
    lines = [
        f"## Biased inference at {chosen['bits']} bits (`{chosen['tag']}`)",
        "",
        f"Share of the evaluation images predicted as each class, for {which}; sorted by the size of the change "
        "|quantized - float|, largest first.",
        "",
        "| class | float share % | quantized share % |",
        "|---|---|---|",
        *(f"| {c} | {100 * a:.1f} | {100 * b:.1f} |" for c, a, b in shown),
    ]
    if rest:
        lines.append(bias_summary_row(rest))
    return lines + [""]


def bias_summary_row(rest: Sequence[tuple[str, float, float]]) -> str:
    """The bias table's last line: the classes left out, their total shares and their largest change.

    Examples
    --------
    >>> bias_summary_row([("a", 0.02, 0.015), ("b", 0.01, 0.012)])
    '| *2 other classes* (each changed by at most 0.5 pp) | 3.0 in all | 2.7 in all |'
    """
    total_float = sum(a for _, a, _ in rest)
    total_quant = sum(b for _, _, b in rest)
    largest_pp = max(abs(b - a) for _, a, b in rest) * 100
    return (
        f"| *{len(rest)} other classes* (each changed by at most {largest_pp:.1f} pp) | "
        f"{100 * total_float:.1f} in all | {100 * total_quant:.1f} in all |"
    )


def _markdown(
    info: dict[str, Any], rows: Sequence[dict[str, Any]], table: list[dict[str, Any]], names: dict[str, list[str]],
    fig: dict[str, Path], details: dict[str, dict[str, Any]], sensitivity: SensitivityRun | None = None,
    tree_lines: Sequence[str] = (),
) -> str:
    lines = _header(info, rows)
    n_classes = len(info["class_names"])
    shown = shown_levels(info)
    drawn = set(shown)
    headline_md = format_headline([t for t in table if t["level"] in drawn], names, info["tolerance"], n_classes)
    note = _levels_note(info, shown)
    lines += ["", "## Fewest bits per hierarchy level", ""] + ([note, ""] if note else []) + [headline_md, ""]
    lines += claims_section(info, rows, details, table, sensitivity)
    if "reference_comparison" in info:
        cmp_ = info["reference_comparison"]
        lines += [
            "## Learned hierarchy vs reference grouping",
            "",
            f"Reference `{info['reference_file']}`: adjusted Rand index **{cmp_['ari']:.3f}**, "
            f"NMI **{cmp_['nmi']:.3f}** (cut of the learned tree at the reference's k).",
            "",
        ]
    lines += ["## Accuracy and size per precision (fine labels)", "", seed_table(info, rows), ""]
    lines += ["## Grouped accuracy per level and spec", "", level_tables(info, rows), ""]
    lines += ["## Learned vs random groupings, with uncertainty", "", comparison_table(info, rows), ""]
    lines += list(tree_lines)
    lines += ["## Hierarchy levels", ""] + ([note, ""] if note else [])
    lines += [level_line(name, info["levels"][name]) for name in shown]
    lines.append("")
    lines += _bias_section(info, rows, details)
    lines += layer_section(rows, details)
    if fig:
        lines += ["## Plots", ""]
        captions = {
            "dendrogram": "Class hierarchy (dendrogram)",
            "drop_vs_bits": "Drop vs bits, one panel per plan, one line per level (each point: the lowest-drop spec); "
            "band: random grouping mean ± std; off-scale drops as triangles with their values",
            "quartiles": "Weight quartiles before and after quantization, per scheme",
            "prediction_share": "Prediction share, float vs lowest bits",
            "pareto": "Fine accuracy vs packed size; labelled: the frontier",
            "frontier": "Accuracy vs average bits per level (mixed precision): each level's frontier, random band",
        }
        for key, path in fig.items():
            lines += [f"### {captions[key]}", "", f"![{captions[key]}]({Path(path).name})", ""]
    return "\n".join(lines)
