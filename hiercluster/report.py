"""The run report: ``report.md`` plus PNG plots, built only from what the run directory holds.

:func:`write_report` reads ``run.json``, ``results.sqlite`` and ``hierarchy.json``, so
``hiercluster report DIR`` rebuilds the same report without touching a model.
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


def row_method(row: dict[str, Any]) -> str:
    """The method label of a result row (``"gptq+bn"``, ``"rtn"``)."""
    return method_label(row.get("method"), row.get("bn_reestimate"))


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

    ``run.json`` is validated (:func:`hiercluster.rundir.read_run_info`) and the rows are
    read through the store's checks, so a damaged run directory is one clear error.
    """
    from hiercluster.rundir import DB_FILE, check_is_run, read_run_info

    run_dir = Path(run_dir)
    check_is_run(run_dir)
    info = read_run_info(run_dir)
    store = ResultsStore(run_dir / DB_FILE)
    try:
        rows = store.results([g["key"] for g in info["grid"]], complete=True)
    except BaseException:
        store.close()
        raise
    return info, rows, store


def headline(rows: Sequence[dict[str, Any]], tolerance: float) -> list[dict[str, Any]]:
    """For every level, the fewest bits whose drop is within ``tolerance`` pp, and who got there.

    Among the specs at that bit width, the one with the smallest drop is reported.
    """
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
                "winner": best,
            }
        )
    return table


def format_headline(table: Sequence[dict[str, Any]], names: dict[str, list[str]], tolerance: float) -> str:
    """The headline table as Markdown (also printed by ``hiercluster run``)."""
    lines = [
        f"| level | k | fewest bits (drop <= {tolerance:g} pp) | avg bits | scheme / clipping / method / plan | float acc % | "
        "quant acc % | drop pp | advantage pp | superclasses |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in table:
        w = t["winner"]
        groups = ", ".join(names.get(t["level"], []))
        if len(groups) > 90:
            groups = groups[:87] + "..."
        if w is None:
            lines.append(
                f"| {t['level']} | {t['k']} | none in grid | - | - | {100 * t['acc_float']:.2f} | - | - | - | {groups} |"
            )
            continue
        lines.append(
            f"| {t['level']} | {t['k']} | {w['bits']} | {w['avg_bits']:.3f} | "
            f"{w['scheme']} / {w['clipping']} / {row_method(w)} / {w['plan']} | "
            f"{100 * w['acc_float']:.2f} | {100 * w['acc_quant']:.2f} | {w['drop']:+.2f} | {w['advantage']:+.2f} | {groups} |"
        )
    return "\n".join(lines)


def _kb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1024:.1f}"


def seed_table(info: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """The seed paper's table: accuracy and size per precision and scheme (uniform precision, fine labels).

    One row block per method (with or without BN re-estimation), scheme and clipping.
    """
    fine = [r for r in uniform_rows(rows) if r["level"] == _fine_level(info)]
    if not fine:
        return "_No results at the fine level._"
    fp32 = fine[0]["fp32_bytes"]
    acc0 = info["float_accuracy"]
    out = []
    for method, scheme, clipping in dict.fromkeys((row_method(r), r["scheme"], r["clipping"]) for r in fine):
        out += [
            f"**{scheme}, {clipping} clipping, {method}**",
            "",
            "| precision | acc % | -Δ acc pp | packed KB | Δ size % | gzip KB | xz KB | avg bits |",
            "|---|---|---|---|---|---|---|---|",
            f"| FP32 | {100 * acc0:.2f} | 0.00 | {_kb(fp32)} | 0.0 | - | - | 32 |",
        ]
        sel = [r for r in fine if (row_method(r), r["scheme"], r["clipping"]) == (method, scheme, clipping)]
        for r in sorted(sel, key=lambda r: -r["bits"]):
            out.append(
                f"| {r['bits']}-bit | {100 * r['fine_acc']:.2f} | {100 * (acc0 - r['fine_acc']):.2f} | "
                f"{_kb(r['packed_bytes'])} | {100 * (1 - r['packed_bytes'] / fp32):.1f} | {_kb(r['gzip_bytes'])} | "
                f"{_kb(r['xz_bytes'])} | {r['avg_bits']:.2f} |"
            )
        out.append("")
    return "\n".join(out)


def _fine_level(info: dict[str, Any]) -> str:
    c = len(info["class_names"])
    return f"k={c}" if f"k={c}" in info["levels"] else next(iter(info["levels"]))


def level_tables(info: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """Grouped accuracy per level x bits with the random baseline and the advantage, per scheme, method and plan."""
    out = []
    combo = lambda r: (r["scheme"], r["clipping"], row_method(r), r["plan"])  # noqa: E731
    for scheme, clipping, method, plan in dict.fromkeys(combo(r) for r in rows):
        sel = [r for r in rows if combo(r) == (scheme, clipping, method, plan)]
        bits = sorted({r["bits"] for r in sel}, reverse=True)
        out += [
            f"**{scheme}, {clipping} clipping, {method}, plan {plan}**: grouped accuracy % (drop pp) "
            "| random grouping of the same sizes: accuracy mean ± std | advantage pp",
            "",
            "| level | float acc % | " + " | ".join(f"{b}-bit" for b in bits) + " |",
            "|---|---|" + "---|" * len(bits),
        ]
        for level in info["levels"]:
            cells = []
            lrows = {r["bits"]: r for r in sel if r["level"] == level}
            if not lrows:
                continue
            first = next(iter(lrows.values()))
            for b in bits:
                r = lrows.get(b)
                cells.append(
                    "-" if r is None else
                    f"{100 * r['acc_quant']:.1f} ({r['drop']:+.1f}) \\| {100 * r['random_acc_quant_mean']:.1f}±"
                    f"{100 * r['random_acc_quant_std']:.1f} \\| {r['advantage']:+.1f}"
                )
            out.append(f"| {level} | {100 * first['acc_float']:.2f} | " + " | ".join(cells) + " |")
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
        fig["accuracy_vs_bits"] = report_plots.plot_accuracy_vs_bits(rows, run_dir / "accuracy_vs_bits.png")
        fig["pareto"] = report_plots.plot_pareto(rows, info["float_accuracy"], run_dir / "pareto.png", level=_fine_level(info))
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


def _markdown(
    info: dict[str, Any], rows: Sequence[dict[str, Any]], table: list[dict[str, Any]], names: dict[str, list[str]],
    fig: dict[str, Path], details: dict[str, dict[str, Any]],
) -> str:
    h = info["hierarchy"]
    timings = info.get("timings", {})
    lines = [
        f"# hiercluster report: {info['dataset']}",
        "",
        f"- model: `{info['checkpoint']}` (sha256 {info['checkpoint_sha256'][:12]}), float accuracy "
        f"**{100 * info['float_accuracy']:.2f}%** on {info['n_eval']} images ({info['eval_split']} split)",
        f"- hierarchy: `{h['embedding']}` embeddings, `{h['linkage']}` linkage, `{h['metric']}` metric",
        f"- merged-head reduction: `{info['reduction']}`; random baseline: {info['random_seeds']} random groupings "
        f"of the same sizes per level; tolerance {info['tolerance']:g} pp",
        f"- grid: {len(info['grid'])} quantization specs; biases stay float32; "
        "drop = float acc - quantized acc (pp); advantage = mean random drop - drop (pp)",
    ]
    cal = info.get("calibration") or {}
    if cal.get("used_by"):
        lines.append(
            f"- calibration: {cal['images']} unlabeled images of the `{cal['split']}` split (seed {cal['seed']}, "
            f"batches of {cal['batch_size']}), for {', '.join(cal['used_by'])}; rtn = round to nearest, no data; "
            "+bn = BN statistics re-estimated"
        )
        if cal.get("from_eval_split"):
            lines[2:2] = [
                "> **Warning: calibration data came from the evaluation split** (`calibration.allow_eval_split: true`): "
                "the calibrated results were fitted on the images they are scored on, so they are optimistic.",
                "",
            ]
    if timings:
        lines.append(
            f"- timings: float evaluation {timings.get('float_eval_s', 0):.1f} s, sweep {timings.get('sweep_s', 0):.1f} s "
            f"({timings.get('specs_run', 0)} of {timings.get('specs_total', 0)} specs run this time)"
        )
    lines += ["", "## Fewest bits per hierarchy level", "", format_headline(table, names, info["tolerance"]), ""]
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
    lines += ["## Grouped accuracy per level and bit width", "", level_tables(info, rows), ""]
    lines += ["## Hierarchy levels", ""]
    for name, lv in info["levels"].items():
        lines.append(f"- **{name}** ({lv['kind']}): " + "; ".join(lv["names"]))
    lines.append("")
    chosen = bias_choice(rows)
    if chosen is not None:
        share = details[chosen["spec_key"]]["prediction_share"]
        pairs = sorted(
            zip(info["class_names"], info["float_prediction_share"], share), key=lambda t: -abs(t[2] - t[1])
        )
        lines += [
            f"## Biased inference at {chosen['bits']} bits ({chosen['tag']})",
            "",
            "| class | float share % | quantized share % |",
            "|---|---|---|",
        ] + [f"| {c} | {100 * a:.1f} | {100 * b:.1f} |" for c, a, b in pairs] + [""]
    if fig:
        lines += ["## Plots", ""]
        captions = {
            "dendrogram": "Class hierarchy (dendrogram)",
            "accuracy_vs_bits": "Grouped accuracy vs bits, one line per level; band: random grouping mean ± std",
            "quartiles": "Weight quartiles before and after quantization, per scheme",
            "prediction_share": "Prediction share, float vs lowest bits",
            "pareto": "Fine accuracy vs packed size",
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
