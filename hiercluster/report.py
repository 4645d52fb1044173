"""The run report: ``report.md`` plus PNG plots, built only from what the run directory holds.

:func:`write_report` reads ``run.json``, ``results.sqlite`` and ``hierarchy.json``, so
``hiercluster report DIR`` rebuilds the same report without touching a model.

Every table names the grid dimensions (:data:`DIMS`) that vary in the run, and each spec
by its full tag; a table that shows a subset of the specs says which.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hiercluster.errors import HierclusterError, short_repr
from hiercluster.evaluate import min_bits
from hiercluster.store import ResultsStore, method_label
from quant._files import write_text_atomic
from quant._validate import check_json

# The grid dimensions of a result row as (row column, label), in the order of a spec's tag.
# Headings and tables are built from this list: a dimension is named wherever the run's rows
# hold more than one value of it, so a new grid option needs only a line here.
DIMS: tuple[tuple[str, str], ...] = (
    ("scheme", "scheme"),
    ("bits", "bits"),
    ("clipping", "clipping"),
    ("granularity", "granularity"),
    ("plan", "plan"),
    ("method", "method"),
    ("activation_bits", "activations"),
)
# A float model this close to chance (pp) or below has nothing for quantization to lose:
# its drops and fewest bits are noise, so the report and the terminal warn.
CHANCE_MARGIN_PP = 2.0
# Superclass names are cut here in the headline, so that a row stays one readable line.
MAX_GROUPS_CHARS = 90
# Tags listed by name when a table leaves specs out; more are counted (the CSV has them all).
MAX_LISTED_TAGS = 3
# The shape of run.json's optional evaluation subset (``data.limit``); older runs lack it.
DATA_LIMIT_SPEC = {"limit": int, "of": int}


def fmt_number(value: float, digits: int = 2, signed: bool = False) -> str:
    """``value`` with ``digits`` decimals; what rounds to zero prints as zero without a sign.

    The one number format of the report, so that no table shows ``-0.00``.

    Examples
    --------
    >>> fmt_number(-0.001), fmt_number(-0.001, signed=True), fmt_number(0.37, signed=True), fmt_number(-1.25, 1)
    ('0.00', '0.00', '+0.37', '-1.2')
    """
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return f"{0:.{digits}f}" if float(text) == 0 else text  # "-0.00", "+0.00": zero after rounding


def fewest_bits_cell(bits: int, lowest: int | None) -> str:
    """The headline's answer: ``"4"``, or ``"≤ 3 (lowest tested)"`` when no narrower width was tried.

    Examples
    --------
    >>> fewest_bits_cell(4, 3), fewest_bits_cell(3, 3)
    ('4', '≤ 3 (lowest tested)')
    """
    return f"≤ {bits} (lowest tested)" if bits == lowest else str(bits)


def row_method(row: dict[str, Any]) -> str:
    """The method label of a result row (``"gptq+bn"``, ``"rtn"``)."""
    return method_label(row.get("method"), row.get("bn_reestimate"))


def dim_value(row: dict[str, Any], column: str) -> str:
    """The value of the grid dimension ``column`` in a result row, as tables show it.

    ``method`` includes BN re-estimation (``"gptq+bn"``); ``activation_bits`` reads
    ``"a4"``, or ``"float"`` when the activations were not quantized.
    """
    if column == "method":
        return row_method(row)
    value = row.get(column)
    if column == "activation_bits":
        return "float" if value is None else f"a{value}"
    return "-" if value is None else str(value)


def dim_values(rows: Sequence[dict[str, Any]], column: str) -> list[str]:
    """The distinct values of dimension ``column`` in ``rows``, in order of first appearance."""
    return list(dict.fromkeys(dim_value(r, column) for r in rows))


def varying_dims(rows: Sequence[dict[str, Any]], skip: Sequence[str] = ()) -> list[tuple[str, str]]:
    """The dimensions of :data:`DIMS` (except ``skip``) that take more than one value in ``rows``."""
    return [(c, label) for c, label in DIMS if c not in skip and len(dim_values(rows, c)) > 1]


def dims_label(row: dict[str, Any], dims: Sequence[tuple[str, str]]) -> str:
    """``"granularity per_tensor, clipping mse"``: the row's values of ``dims``."""
    return ", ".join(f"{label} {dim_value(row, c)}" for c, label in dims)


def subset_note(shown: Sequence[dict[str, Any]], hidden: Sequence[dict[str, Any]], why: str) -> str:
    """One sentence saying which specs a table leaves out and where they are; ``""`` when none.

    The left-out specs are described by the dimension values the shown ones lack (``"plan
    first8"``), else listed by tag.

    Examples
    --------
    >>> shown = [{"spec_key": "a", "tag": "t4", "plan": "full", "bits": 4}]
    >>> hidden = [{"spec_key": "b", "tag": "t2f", "plan": "first8", "bits": 2}]
    >>> subset_note(shown, hidden, "mixed precision")
    'Not shown: 1 spec with mixed precision (plan first8); results.csv has every spec.'
    """
    keys = list(dict.fromkeys(r["spec_key"] for r in hidden))
    if not keys:
        return ""
    parts = []
    for column, label in DIMS:
        present = set(dim_values(shown, column))
        extra = [v for v in dim_values(hidden, column) if v not in present]
        if extra and column != "bits":
            parts.append(f"{label} {', '.join(extra)}")
    if not parts:
        tags = list(dict.fromkeys(r["tag"] for r in hidden))
        parts = [", ".join(f"`{t}`" for t in tags[:MAX_LISTED_TAGS]) + (f" and {len(tags) - MAX_LISTED_TAGS} more"
                                                                          if len(tags) > MAX_LISTED_TAGS else "")]
    n = len(keys)
    return f"Not shown: {n} spec{'s' if n > 1 else ''} with {why} ({'; '.join(parts)}); results.csv has every spec."


def uniform_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of specs with every weight at the nominal bit width (no partial plan), else all rows.

    Uniform means the average bits per weight equal the spec's bits: a plan that keeps
    layers float or at other widths, or adds residual terms, changes the average. The
    rows keep every method; a table or plot of them groups by :func:`row_method`.
    """
    uniform = [r for r in rows if abs(r["avg_bits"] - r["bits"]) < 1e-9]
    return uniform or list(rows)


def rtn_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of plain round-to-nearest specs (no calibration), else all rows.

    The analyses that show one spec per scheme (bias, weight quartiles) describe the
    data-free quantizer when the run has it, rather than mixing in calibrated methods.
    """
    plain = [r for r in rows if row_method(r) == "rtn"]
    return plain or list(rows)


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]], ResultsStore]:
    """``(run.json, result rows of the run's current grid, open store)`` of a run directory.

    ``run.json`` is validated (:func:`hiercluster.rundir.read_run_info`, and here what
    only the report reads) and the rows are read through the store's checks, so a
    damaged run directory is one clear error.
    """
    from hiercluster.rundir import DB_FILE, RUN_FILE, check_is_run, read_run_info

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


def headline(rows: Sequence[dict[str, Any]], tolerance: float) -> list[dict[str, Any]]:
    """For every level, the fewest bits whose drop is within ``tolerance`` pp, and who got there.

    Among the specs at that bit width, the one with the smallest drop is reported. Each
    entry also carries ``lowest_bits``, the narrowest width the grid tried: an answer
    equal to it is only an upper bound.
    """
    lowest = min((r["bits"] for r in rows), default=None)
    by_level: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_level[r["level"]].append(r)
    table = []
    for level, level_rows in by_level.items():
        best = min_bits(level_rows, tolerance).get(level_rows[0]["k"])
        table.append(
            {
                "level": level,
                "k": level_rows[0]["k"],
                "grouping": level_rows[0]["grouping"],
                "acc_float": level_rows[0]["acc_float"],
                "min_bits": best["bits"] if best else None,
                "lowest_bits": lowest,
                "winner": best,
            }
        )
    return table


def random_drop_cell(row: dict[str, Any]) -> str:
    """``"+0.82 ± 0.11"``: the drop of random groupings of the same sizes, mean ± std (pp)."""
    return f"{fmt_number(row['random_drop_mean'], signed=True)} ± {fmt_number(row['random_drop_std'])}"


def format_headline(
    table: Sequence[dict[str, Any]], names: dict[str, list[str]], tolerance: float, n_classes: int | None = None
) -> str:
    """The headline table as Markdown (also printed by ``hiercluster run`` and ``report``).

    The winner is named by its full tag. ``n_classes``: the level with one class per
    group has no random baseline (every random grouping is the same), shown as ``-``.
    """
    lines = [
        f"| level | k | fewest bits (drop ≤ {tolerance:g} pp) | winning spec | avg bits | float acc % | "
        "quant acc % | drop pp | random drop pp (mean ± std) | advantage pp | superclasses |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in table:
        w = t["winner"]
        groups = ", ".join(names.get(t["level"], []))
        if len(groups) > MAX_GROUPS_CHARS:
            groups = groups[: MAX_GROUPS_CHARS - 3] + "..."
        if w is None:
            lines.append(
                f"| {t['level']} | {t['k']} | none in grid | - | - | {100 * t['acc_float']:.2f} | - | - | - | - | {groups} |"
            )
            continue
        one_per_class = n_classes is not None and t["k"] == n_classes
        random_drop = "-" if one_per_class else random_drop_cell(w)
        advantage = "-" if one_per_class else fmt_number(w["advantage"], signed=True)
        lines.append(
            f"| {t['level']} | {t['k']} | {fewest_bits_cell(w['bits'], t.get('lowest_bits'))} | `{w['tag']}` | "
            f"{w['avg_bits']:.3f} | {100 * w['acc_float']:.2f} | {100 * w['acc_quant']:.2f} | "
            f"{fmt_number(w['drop'], signed=True)} | {random_drop} | {advantage} | {groups} |"
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


def _kb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1024:.1f}"


def _fine_level(info: dict[str, Any]) -> str:
    c = len(info["class_names"])
    return f"k={c}" if f"k={c}" in info["levels"] else next(iter(info["levels"]))


def _one_per_class(info: dict[str, Any], level: str) -> bool:
    """Whether ``level`` puts every class in its own group (its random baseline is the model itself)."""
    lv = info["levels"].get(level)
    return isinstance(lv, dict) and lv.get("k") == len(info["class_names"])


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
    the specs left out (mixed-precision plans).
    """
    fine = [r for r in rows if r["level"] == _fine_level(info)]
    if not fine:
        return "_No results at the fine level._"
    shown = uniform_rows(fine)
    shown_keys = {r["spec_key"] for r in shown}
    note = subset_note(shown, [r for r in fine if r["spec_key"] not in shown_keys], "mixed precision")
    fp32 = fine[0]["fp32_bytes"]
    acc0 = info["float_accuracy"]
    out = ["Fine labels; specs with every weight at the nominal width." + (f" {note}" if note else ""), ""]
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
                f"| `{r['tag']}` | {r['bits']} | {100 * r['fine_acc']:.2f} | "
                f"{fmt_number(100 * (acc0 - r['fine_acc']), signed=True)} | "
                f"{_kb(r['packed_bytes'])} | {fmt_number(100 * (1 - r['packed_bytes'] / fp32), 1)} | "
                f"{_kb(r['gzip_bytes'])} | {_kb(r['xz_bytes'])} | {r['avg_bits']:.2f} |"
            )
        out.append("")
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


def level_tables(info: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """Grouped accuracy per level and spec with the random baseline and the advantage.

    Every spec of the run appears, as a column headed by its full tag; one table per
    combination of the dimensions that vary (bits aside).
    """
    if not rows:
        return "_No results._"
    fine = [level for level in info["levels"] if _one_per_class(info, level)]
    out = [
        "Each cell: grouped accuracy % (drop pp) \\| random grouping of the same sizes: accuracy % mean ± std "
        "\\| advantage pp. Columns: every spec, by its full tag."
        + (f" The {fine[0]} row has no random baseline (every class is its own group)." if fine else ""),
        "",
    ]
    for label, block in _blocks(rows):
        specs = _specs_by_bits(block)
        if label:
            out += [f"**{label}**", ""]
        out += [
            "| level | float acc % | " + " | ".join(f"`{s['tag']}`" for s in specs) + " |",
            "|---|---|" + "---|" * len(specs),
        ]
        cells = {(r["level"], r["spec_key"]): r for r in block}
        for level in info["levels"]:
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
    return "\n".join(out)


def bias_choice(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The spec shown in the bias analysis: the lowest bit width, first scheme, uniform precision.

    Round-to-nearest specs are preferred when the run has them (the bias of the
    data-free quantizer is what the analysis is about); else any method.
    """
    candidates = uniform_rows(rtn_rows(rows))
    if not candidates:
        return None
    low = min(r["bits"] for r in candidates)
    return next(r for r in candidates if r["bits"] == low)


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
    from hiercluster import plots, report_plots
    from hiercluster.hierarchy import ClassHierarchy
    from hiercluster.rundir import HIERARCHY_FILE

    run_dir = Path(run_dir)
    info, rows, store = load_run(run_dir)
    try:
        details = {key: _details(store, key, info) for key in dict.fromkeys(r["spec_key"] for r in rows)}
    finally:
        store.close()
    tree = ClassHierarchy.from_json(run_dir / HIERARCHY_FILE) if (run_dir / HIERARCHY_FILE).is_file() else None
    table = headline(rows, info["tolerance"])
    names = {name: lv["names"] for name, lv in info["levels"].items()}
    chosen = bias_choice(rows)
    fig = {}
    if tree is not None:
        fig["dendrogram"] = plots.plot_dendrogram(tree, run_dir / "dendrogram.png")
    if rows:
        fig["drop_vs_bits"] = report_plots.plot_drop_vs_bits(rows, run_dir / "drop_vs_bits.png", info["tolerance"])
        fig["pareto"] = report_plots.plot_pareto(
            rows, info["float_accuracy"], run_dir / "pareto.png", level=_fine_level(info), tolerance=info["tolerance"]
        )
        uniform_keys = {r["spec_key"] for r in uniform_rows(rtn_rows(rows))}
        fig["quartiles"] = report_plots.plot_quartiles(
            {k: d for k, d in details.items() if k in uniform_keys}, run_dir / "quartiles.png"
        )
    if chosen is not None:
        fig["prediction_share"] = plots.plot_prediction_share(
            info["float_prediction_share"], details[chosen["spec_key"]]["prediction_share"], info["class_names"],
            run_dir / "prediction_share.png", title=f"Prediction share: float vs {chosen['tag']}",
        )
    md = _markdown(info, rows, table, names, fig, details)
    path = run_dir / "report.md"
    write_text_atomic(path, md)
    return path


def _evaluated_on(info: dict[str, Any]) -> str:
    """``"on 500 of 10,000 test images (a fixed stratified subset)"``, or the whole split's count."""
    limit = info.get("data_limit")
    if limit is None:
        return f"on {info['n_eval']:,} images ({info['eval_split']} split)"
    return (
        f"on {limit['limit']:,} of {limit['of']:,} {info['eval_split']} images "
        "(a fixed stratified subset, `data.limit`)"
    )


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
        f"- hierarchy: `{h['embedding']}` embeddings, `{h['linkage']}` linkage, `{h['metric']}` metric",
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


def _bias_section(info: dict[str, Any], rows: Sequence[dict[str, Any]], details: dict[str, dict[str, Any]]) -> list[str]:
    """Prediction shares of the float model and of the :func:`bias_choice` spec, biggest change first."""
    chosen = bias_choice(rows)
    if chosen is None:
        return []
    share = details[chosen["spec_key"]]["prediction_share"]
    pairs = sorted(zip(info["class_names"], info["float_prediction_share"], share), key=lambda t: -abs(t[2] - t[1]))
    return [
        f"## Biased inference at {chosen['bits']} bits (`{chosen['tag']}`)",
        "",
        "Share of the evaluation images predicted as each class; sorted by the size of the change "
        "|quantized - float|, largest first.",
        "",
        "| class | float share % | quantized share % |",
        "|---|---|---|",
        *(f"| {c} | {100 * a:.1f} | {100 * b:.1f} |" for c, a, b in pairs),
        "",
    ]


def _markdown(
    info: dict[str, Any], rows: Sequence[dict[str, Any]], table: list[dict[str, Any]], names: dict[str, list[str]],
    fig: dict[str, Path], details: dict[str, dict[str, Any]],
) -> str:
    lines = _header(info, rows)
    n_classes = len(info["class_names"])
    headline_md = format_headline(table, names, info["tolerance"], n_classes)
    lines += ["", "## Fewest bits per hierarchy level", "", headline_md, ""]
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
    lines += ["## Hierarchy levels", ""]
    for name, lv in info["levels"].items():
        lines.append(f"- **{name}** ({lv['kind']}): " + "; ".join(lv["names"]))
    lines.append("")
    lines += _bias_section(info, rows, details)
    if fig:
        lines += ["## Plots", ""]
        captions = {
            "dendrogram": "Class hierarchy (dendrogram)",
            "drop_vs_bits": "Drop vs bits, one panel per plan, one line per level (each point: the lowest-drop spec); "
            "band: random grouping mean ± std; off-scale drops as triangles with their values",
            "quartiles": "Weight quartiles before and after quantization, per scheme",
            "prediction_share": "Prediction share, float vs lowest bits",
            "pareto": "Fine accuracy vs packed size; labelled: the frontier",
        }
        for key, path in fig.items():
            lines += [f"### {captions[key]}", "", f"![{captions[key]}]({Path(path).name})", ""]
    return "\n".join(lines)


def export_models(prep: Any, grid: Sequence[Any], keys: Sequence[str], rows: Sequence[dict[str, Any]], out_dir: Path) -> Path:
    """Write each headline winner as a bit-packed model with its level's grouping under ``models/``.

    ``models/manifest.json`` maps every level to its model file, grouping file and reduction.
    A calibrated winner is copied from the sweep's packed cache when it is there (GPTQ or
    AdaRound are not fitted twice); the others are quantized again, which is cheap. The
    manifest is derived from the results, so a damaged one is simply rewritten; the files
    the previous manifest listed and this one does not (another grid's winners) are removed.
    """
    from hiercluster.rundir import MANIFEST_FILE, MODELS_DIR

    model_dir = out_dir / MODELS_DIR
    model_dir.mkdir(exist_ok=True)
    manifest_path = model_dir / MANIFEST_FILE
    old = _previous_manifest(manifest_path)
    written = {  # spec key -> file name; a resumed run reuses what is still there
        entry["spec_key"]: entry["model"]
        for entry in (old["levels"].values() if old else ())
        if (model_dir / entry["model"]).is_file()
    }
    by_key = dict(zip(keys, grid))
    manifest: dict[str, Any] = {"reduction": prep.cfg.eval.reduction, "levels": {}}
    for t in headline(rows, prep.cfg.eval.tolerance):
        w = t["winner"]
        if w is None:
            continue
        if w["spec_key"] not in written:
            written[w["spec_key"]] = _export_model(prep, by_key[w["spec_key"]], w["spec_key"], out_dir, model_dir).name
        group_file = _write_level_groups(prep, t["level"], model_dir)
        manifest["levels"][t["level"]] = {
            "model": written[w["spec_key"]],
            "spec_key": w["spec_key"],
            "groups": group_file.name,
            "bits": w["bits"],
            "method": row_method(w),
            "tag": w["tag"],
            "drop_pp": w["drop"],
        }
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
    # After the new manifest is in place: a kill before this leaves extra files, never a manifest naming missing ones.
    for name in sorted(_listed_files(old) - _listed_files(manifest)):
        if (model_dir / name).is_file():
            (model_dir / name).unlink()
    return manifest_path


def _previous_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest a previous export wrote, or None when there is none or it is damaged (it is rewritten)."""
    from hiercluster.rundir import read_manifest

    if not path.is_file():
        return None
    try:
        return read_manifest(path)
    except HierclusterError:
        return None


def _listed_files(manifest: dict[str, Any] | None) -> set[str]:
    """The file names a manifest lists (models and grouping files): the only files an export ever removes."""
    if manifest is None:
        return set()
    return {name for entry in manifest["levels"].values() for name in (entry["model"], entry["groups"])}


def _export_model(prep: Any, point: Any, key: str, out_dir: Path, model_dir: Path) -> Path:
    """Write one winner's bit-packed model as ``models/TAG.hcq``, whole or not at all."""
    import shutil

    import quant
    from quant._files import write_atomic

    from hiercluster.pipeline import PACKED_CACHE_DIR, quantize_point

    path = model_dir / f"{point.tag}.hcq"
    cached = out_dir / PACKED_CACHE_DIR / f"{key}.hcq"
    if cached.is_file():  # a calibrated model the sweep saved: the same bytes, without fitting it again
        with open(cached, "rb") as src:
            write_atomic(path, lambda dst: shutil.copyfileobj(src, dst))
    else:
        qmodel, qreport = quantize_point(prep.model, point, prep)
        quant.save_packed(path, qmodel, qreport, overwrite=True)
    return path


def _write_level_groups(prep: Any, level: str, model_dir: Path) -> Path:
    """``models/kK_groups.yaml``: the level's superclasses and their classes."""
    import yaml

    from hiercluster.pipeline import level_names

    _, assignment, _ = prep.levels[level]
    names = level_names(prep, level)
    groups: dict[str, list[str]] = defaultdict(list)
    for cls, g in zip(prep.class_names, assignment.tolist()):
        groups[names[g]].append(cls)
    path = model_dir / f"{level.replace('=', '')}_groups.yaml"
    write_text_atomic(path, yaml.safe_dump(dict(groups), sort_keys=False))
    return path
