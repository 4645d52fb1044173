"""Export of the run's winning models: bit-packed ``.hcq`` files, their level groups and a manifest."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hiercluster.errors import HierclusterError
from hiercluster.evaluation.metrics import headline
from hiercluster.run.store import row_method
from quant._files import write_text_atomic

if TYPE_CHECKING:  # the sweep (torch, quant) loads only when a model is exported
    from hiercluster.run.sweep import SweepContext


def export_models(ctx: SweepContext, grid: Sequence[Any], keys: Sequence[str], rows: Sequence[dict[str, Any]], out_dir: Path) -> Path:
    """Write each headline winner as a bit-packed model with its level's grouping under ``models/``.

    ``models/manifest.json`` maps every level to its model file, grouping file and reduction.
    A calibrated winner is copied from the sweep's packed cache when it is there (GPTQ or
    AdaRound are not fitted twice); the others are quantized again, which is cheap. The
    manifest is derived from the results, so a damaged one is simply rewritten; the files
    the previous manifest listed and this one does not (another grid's winners) are removed.

    A winner whose xz size the sweep skipped (a payload over ``records.XZ_MAX_BYTES``) gets it
    now, from its ``.hcq`` file (:func:`_fill_winner_xz`): the database, ``results.csv`` and
    the winner's ``rows`` (updated in place) then hold it; other specs keep None.
    """
    from hiercluster.run.rundir import MANIFEST_FILE, MODELS_DIR

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
    manifest: dict[str, Any] = {"reduction": ctx.cfg.eval.reduction, "levels": {}}
    for t in headline(rows, ctx.cfg.eval.tolerance):
        w = t["winner"]
        if w is None:
            continue
        if w["spec_key"] not in written:
            written[w["spec_key"]] = _export_model(ctx, by_key[w["spec_key"]], w["spec_key"], out_dir, model_dir).name
        group_file = _write_level_groups(ctx, t["level"], out_dir)
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
    _fill_winner_xz(out_dir, keys, rows, manifest)
    return manifest_path


def _fill_winner_xz(out_dir: Path, keys: Sequence[str], rows: Sequence[dict[str, Any]], manifest: dict[str, Any]) -> None:
    """Store the xz size of each exported winner that has none, computed from its ``.hcq`` file.

    xz is slow (about 0.5 CPU-s per MiB of payload), so the sweep skips it for big payloads;
    a run keeps a handful of winners, and their files hold exactly the payload the sweep would
    have compressed (:func:`quant.packing.packed_xz_bytes`).
    """
    import quant
    from hiercluster.run.rundir import CSV_FILE, DB_FILE, MODELS_DIR
    from hiercluster.run.store import ResultsStore
    from quant.packing import packed_xz_bytes

    missing = {r["spec_key"] for r in rows if r["xz_bytes"] is None}
    files = {e["spec_key"]: out_dir / MODELS_DIR / e["model"] for e in manifest["levels"].values() if e["spec_key"] in missing}
    if not files:
        return
    sizes = {}
    for key, path in files.items():
        try:
            sizes[key] = packed_xz_bytes(path)
        except quant.QuantError as exc:
            raise HierclusterError(f"exported model: {exc}; remove {path} and run again to export it anew") from None
    with ResultsStore(out_dir / DB_FILE) as store:
        for key, xz in sizes.items():
            store.set_xz_bytes(key, xz)
        store.export_csv(out_dir / CSV_FILE, keys)  # written before the export: it must agree with the database
    for r in rows:
        if r["spec_key"] in sizes:
            r["xz_bytes"] = sizes[r["spec_key"]]


def _previous_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest a previous export wrote, or None when there is none or it is damaged (it is rewritten)."""
    from hiercluster.run.rundir import read_manifest

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


def _export_model(ctx: SweepContext, point: Any, key: str, out_dir: Path, model_dir: Path) -> Path:
    """Write one winner's bit-packed model as ``models/TAG.hcq``, whole or not at all."""
    import shutil

    import quant
    from hiercluster.run.rundir import exported_model_path, packed_model_path
    from hiercluster.run.sweep import quantize_point
    from quant._files import write_atomic

    path = exported_model_path(out_dir, point.tag)
    cached = packed_model_path(out_dir, key)
    if cached.is_file():  # a calibrated model the sweep saved: the same bytes, without fitting it again
        with open(cached, "rb") as src:
            write_atomic(path, lambda dst: shutil.copyfileobj(src, dst))
    else:
        qmodel, qreport = quantize_point(ctx.model, point, ctx)
        quant.save_packed(path, qmodel, qreport, overwrite=True)
    return path


def _write_level_groups(ctx: SweepContext, level: str, out_dir: Path) -> Path:
    """``models/kK_groups.yaml``: the level's superclasses and their classes."""
    import yaml

    from hiercluster.run.rundir import level_groups_path

    groups: dict[str, list[str]] = defaultdict(list)
    for cls, g in zip(ctx.class_names, ctx.levels[level].assignment):
        groups[ctx.levels[level].names[g]].append(cls)
    path = level_groups_path(out_dir, level)
    write_text_atomic(path, yaml.safe_dump(dict(groups), sort_keys=False))
    return path
