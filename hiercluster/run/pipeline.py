"""The sweep: float logits once -> hierarchy -> every quant spec once -> results -> report.

Cost model (DESIGN.md, "Evaluation cost"): the float model runs once over the
evaluation set (its logits are cached in the run directory), each quantized variant
runs once, and every level, random baseline and metric is computed from kept logits.
Each finished spec is written to the results store at once; a re-run skips the specs
whose key (a hash of everything that affects them) is already there.

Calibrated quantization (GPTQ, AdaRound, BN re-estimation, activation quantizers) fits
on the section ``calibration``'s images: a fixed subset of a split that is never the
evaluation split (unless the config says so explicitly), loaded once per run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hiercluster.evaluation.inference import accuracy
from hiercluster.evaluation.metrics import headline, prediction_share
from hiercluster.evaluation.selection import SELECTION_RULE, choose_trees, headline_rows
from hiercluster.run.config import SELECT_AUTO, RunConfig, resolve_path, save_config
from hiercluster.run.executors import Executor, SerialExecutor
from hiercluster.run.grid import GridPoint, expand_grid
from hiercluster.run.prepare import Prepared, prepare
from hiercluster.errors import HierclusterError
from hiercluster.run.records import Level, SpecResult
from hiercluster.run.rundir import (
    CONFIG_FILE,
    CSV_FILE,
    DB_FILE,
    HIERARCHY_FILE,
    LEVELS_DIR,
    RUN_FILE,
    RunLock,
    check_run_dir,
    check_same_grid,
    level_yaml_path,
    packed_model_path,
    tree_json_path,
    write_json,
)
from hiercluster.run.store import ResultsStore, check_database, file_digest
from hiercluster.run.sweep import code_version, resume_key, sweep_context
from quant._files import write_atomic


def run_pipeline(
    cfg: RunConfig,
    out_dir: str | Path,
    progress: bool = True,
    force: bool = False,
    command: str | None = None,
    then: Callable[[Path], Any] | None = None,
    executor: Executor | None = None,
) -> dict[str, Any]:
    """``hiercluster run``: the whole sweep into ``out_dir``; returns the run summary.

    Re-running on the same ``out_dir`` skips the specs already in its results store. A
    directory that holds a run of another grid is refused unless ``force``. The
    directory is locked for the whole run (``command`` is what a second command is told
    holds it); paths and the config are checked before anything is written. ``then``
    (``hiercluster run`` passes the report writer, which this layer does not import) is
    called with ``out_dir`` before the lock is released; what it returns is the
    summary's ``"then"``. ``executor`` runs the pending specs (default
    :class:`~hiercluster.run.executors.SerialExecutor`; a
    :class:`~hiercluster.run.executors.RayExecutor` runs them as Ray tasks); it is entered
    after the directory checks and before anything is prepared. This process alone writes
    the run directory, so a run resumes the same whichever ran it.
    """
    out_dir = Path(out_dir)
    check_run_dir(out_dir)
    grid = expand_grid(cfg)
    with RunLock(out_dir, command or " ".join(["hiercluster run", cfg.source or ""]).strip()):
        check_same_grid(cfg, [p.tag for p in grid], out_dir, _recorded_checkpoint_digest(cfg, out_dir), force)
        check_database(out_dir / DB_FILE)  # a damaged database is refused before the run rewrites its records
        # Entered before prepare: a missing Ray or a wrong --address fails before the float model runs
        # or anything of the run is written; leaving it shuts down a Ray instance it started.
        with executor or SerialExecutor() as entered:
            summary = _sweep(cfg, grid, out_dir, progress, entered)
        if then is not None:
            summary["then"] = then(out_dir)
        return summary


def _recorded_checkpoint_digest(cfg: RunConfig, out_dir: Path) -> str | None:
    """The digest of the config's checkpoint, only when ``out_dir`` holds a run to compare it with."""
    if not (out_dir / RUN_FILE).is_file() or not cfg.model.checkpoint:
        return None
    path = resolve_path(cfg.model.checkpoint, cfg.source)
    return file_digest(path) if path.is_file() else None  # a missing file is prepare's error


def _sweep(cfg: RunConfig, grid: list[GridPoint], out_dir: Path, progress: bool, executor: Executor) -> dict[str, Any]:
    """The run itself, in a locked and checked run directory."""
    from hiercluster.run.export import export_models

    start = time.perf_counter()
    user = next((p.calibration_user for p in grid if p.needs_calibration), None)
    prep = prepare(cfg, out_dir, progress=progress, calibration_for=user, grid=grid, write_cache=True)
    t0 = time.perf_counter()
    ctx = sweep_context(prep, grid, keep_packed=cfg.output.export_models)
    prep.timings["float_metrics_s"] = time.perf_counter() - t0
    save_config(cfg, out_dir / CONFIG_FILE)
    write_hierarchy_files(prep, out_dir)
    keys = [resume_key(p, ctx) for p in grid]
    run_info = _run_info(prep, grid, keys)
    write_json(out_dir / RUN_FILE, run_info)

    with ResultsStore(out_dir / DB_FILE) as store:
        done = store.done_keys()
        todo = [(p, k) for p, k in zip(grid, keys) if k not in done]
        from tqdm.auto import tqdm

        bar = tqdm(total=len(grid), initial=len(grid) - len(todo), desc="quant specs", unit="spec", disable=not progress)
        for result in executor.map(ctx, todo):
            if result.packed_model is not None:
                write_packed_cache(out_dir, result)
            store.add_spec(result)
            bar.set_postfix_str(result.tag)
            bar.update(1)
        bar.close()
        sweep_s = time.perf_counter() - start
        rows = store.results(keys, complete=True)
        store.export_csv(out_dir / CSV_FILE, keys)
        holdout = {key: (store.spec_details(key) or {}).get("holdout", {}) for key in dict.fromkeys(keys)}
    n_holdout = len(prep.holdout_set) if prep.holdout_set is not None else 0
    selection = tree_selection(cfg, prep.levels, rows, holdout, n_holdout)
    if selection is not None:
        run_info["tree_selection"] = selection
    run_info["timings"] = {**prep.timings, "sweep_s": sweep_s, "specs_run": len(todo), "specs_total": len(grid)}
    write_json(out_dir / RUN_FILE, run_info)
    shown = headline_rows(run_info, rows)
    if cfg.output.export_models:
        export_models(ctx, grid, keys, shown, out_dir)
    run_info["timings"]["total_s"] = time.perf_counter() - start
    write_json(out_dir / RUN_FILE, run_info)
    return {"run_dir": str(out_dir), "headline": headline(shown, cfg.eval.tolerance), **run_info}


def tree_selection(
    cfg: RunConfig, levels: dict[str, Level], rows: list[dict[str, Any]], holdout: dict[str, dict[str, float]],
    n_holdout: int,
) -> dict[str, Any] | None:
    """run.json's ``tree_selection``: the tree of each k, and why; None for a run of one tree.

    ``select: auto`` decides from the specs' held-out drops (``holdout``: spec key ->
    {level name: drop}) by :func:`~hiercluster.evaluation.selection.choose_trees`; a tree's
    name takes that tree at every k. The evaluation split's rows give only each spec's bits
    and tag, which are settings, not measurements.
    """
    tree_levels = {name: level for name, level in levels.items() if level.tree}
    if not tree_levels:
        return None
    h = cfg.hierarchy
    ks = sorted({level.k for level in tree_levels.values()}, reverse=True)
    if h.select != SELECT_AUTO:
        return {"rule": f"hierarchy.select: {h.select}", "by_k": {str(k): {"tree": h.select, "candidates": {}} for k in ks}}
    specs = {r["spec_key"]: r for r in rows}
    held = []
    for key, spec in specs.items():
        drops = holdout.get(key, {})
        missing = [name for name in tree_levels if not isinstance(drops.get(name), (int, float))]
        if missing:
            raise HierclusterError(
                f"spec {spec['tag']} has no held-out drop for level {missing[0]} in {DB_FILE}: the results predate "
                "hierarchy.select: auto; run `hiercluster run` again with --force to recompute them"
            )
        held += [
            {"k": level.k, "tree": level.tree, "bits": spec["bits"], "drop": drops[name], "tag": spec["tag"]}
            for name, level in tree_levels.items()
        ]
    chosen = choose_trees(held, list(h.embedding), cfg.eval.tolerance)
    return {
        "rule": SELECTION_RULE,
        "split": h.split,
        "holdout": n_holdout,
        "tolerance": cfg.eval.tolerance,
        "by_k": {str(k): choice for k, choice in chosen.items()},
    }


def write_packed_cache(out_dir: Path, result: SpecResult) -> Path:
    """Keep a calibrated spec's bit-packed model as ``packed/KEY.hcq`` (export copies it instead of refitting)."""
    path = packed_model_path(out_dir, result.spec_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = result.packed_model
    return write_atomic(path, lambda handle: handle.write(data))


def write_hierarchy_files(prep: Prepared, out_dir: Path) -> None:
    """hierarchy.json (the first tree), ``trees/NAME.json`` when there are several, one YAML per learned level."""
    out_dir.mkdir(parents=True, exist_ok=True)
    prep.hierarchy.to_json(out_dir / HIERARCHY_FILE)
    if len(prep.trees) > 1:
        for name, tree in prep.trees.items():
            tree_json_path(out_dir, name).parent.mkdir(exist_ok=True)
            tree.to_json(tree_json_path(out_dir, name))
    level_dir = out_dir / LEVELS_DIR
    level_dir.mkdir(exist_ok=True)
    for level in prep.levels.values():
        if level.kind == "learned":
            tree = prep.trees.get(level.tree, prep.hierarchy)
            tree.to_yaml(level_yaml_path(out_dir, level.k, level.tree), level.k)


def _run_info(prep: Prepared, grid: list[GridPoint], keys: list[str]) -> dict[str, Any]:
    cfg = prep.cfg
    info: dict[str, Any] = {
        "dataset": cfg.data.dataset,
        "eval_split": cfg.data.eval_split,
        "n_eval": len(prep.labels),
        "checkpoint": cfg.model.checkpoint,
        # As resolved when the run read it: the saved config's relative path names the config's folder, not this one.
        "checkpoint_path": str(resolve_path(cfg.model.checkpoint, cfg.source).absolute()) if cfg.model.checkpoint else None,
        "checkpoint_sha256": prep.checkpoint_digest,
        "class_names": prep.class_names,
        "float_accuracy": accuracy(prep.float_logits, prep.labels),
        "float_prediction_share": prediction_share(prep.float_logits, len(prep.class_names)).tolist(),
        "device": prep.device.type,
        "reduction": cfg.eval.reduction,
        "random_seeds": cfg.eval.random_seeds,
        "bootstrap": cfg.eval.bootstrap,
        "tolerance": cfg.eval.tolerance,
        "hierarchy": {
            "embedding": list(cfg.hierarchy.embedding),
            "linkage": prep.hierarchy.linkage,
            "metric": prep.hierarchy.metric,
            "select": cfg.hierarchy.select,
        },
        "levels": {name: level.to_json() for name, level in prep.levels.items()},
        "grid": [{"key": key, "tag": p.tag} for p, key in zip(grid, keys)],
        "calibration": {
            **dataclasses.asdict(cfg.calibration),
            "from_eval_split": cfg.calibration.split == cfg.data.eval_split,
            "used_by": sorted({p.calibration_use for p in grid if p.needs_calibration}),
            "images": sum(len(b) for b in prep.calibration) if prep.calibration is not None else 0,
        },
        "code_version": code_version(),
    }
    if prep.data_limit is not None:
        info["data_limit"] = dict(prep.data_limit)
    if prep.reference_groups is not None:
        info["reference_comparison"] = prep.hierarchy.compare(prep.reference_groups)
        if len(prep.trees) > 1:
            info["reference_comparison_by_tree"] = {n: t.compare(prep.reference_groups) for n, t in prep.trees.items()}
        info["reference_file"] = cfg.hierarchy.reference
    return info
