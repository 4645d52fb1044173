"""``hiercluster export``: one level of a run as an ONNX model with its merged head, checked in ONNX Runtime.

The exported graph is the level's quantized model followed by its merged head
(:class:`~hiercluster.evaluation.heads.GroupedHead` with the run's reduction): its output
``scores`` holds one score per superclass, in the order of the ``superclasses`` metadata
entry (optionally also the fine ``logits``). Weights are integers in QDQ form
(:func:`onnx_export.export_onnx`).

Which model: the level's headline winner (the fewest average bits within the run's
tolerance, :func:`~hiercluster.evaluation.metrics.headline` on that level's rows), or the
spec named with ``--spec``. Its weights come from the run's bit-packed file when there is
one (``models/`` for the exported winners, ``packed/`` for the calibrated specs the sweep
kept), else the spec is quantized again from the float checkpoint (round to nearest is
deterministic; a calibrated method is fitted again on the run's calibration images).

The file is written only after ONNX Runtime has run it on the run's evaluation set (its
``data.limit`` subset when the run had one) and its superclass argmax agreed with the
PyTorch merged-head model on at least :data:`MIN_AGREEMENT` of the samples.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import quant
from hiercluster.errors import HierclusterError, short_repr
from hiercluster.evaluation.heads import GroupedHead
from hiercluster.evaluation.metrics import headline
from hiercluster.run.config import RunConfig, load_config, resolve_path
from hiercluster.run.rundir import (
    CONFIG_FILE,
    DB_FILE,
    MANIFEST_FILE,
    MODELS_DIR,
    check_is_run,
    packed_model_path,
    read_manifest,
    read_run_info,
)
from hiercluster.run.store import ResultsStore, file_digest
from quant import onnx_export

#: The smallest share of evaluation samples on which ONNX Runtime and PyTorch must predict the same superclass.
MIN_AGREEMENT = 0.999
# Names listed in a one-line refusal before "and N more".
_LISTED = 40
_K_LEVEL = re.compile(r"k=(\d+)")


@dataclass
class LevelExport:
    """What ``hiercluster export`` did: the level, the spec, the file and its check in ONNX Runtime."""

    level: str
    k: int
    superclasses: list[str]
    reduction: str
    row: dict[str, Any]  # the results row of the spec at the level (accuracies, sizes, avg_bits)
    source: str  # the .hcq file the weights came from, or "quantized again"
    info: dict[str, Any]  # onnx_export.export_onnx's answer
    n_checked: int = 0
    agreement: float = 0.0
    max_abs_diff: float = 0.0
    onnx_accuracy: float = 0.0  # superclass accuracy of the ONNX model on the checked samples
    data_limit: dict[str, int] | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def sizes(self) -> dict[str, int | None]:
        """fp32, packed, gzip and xz bytes from the run's results, and the ONNX file's."""
        return {
            "fp32_bytes": self.row["fp32_bytes"],
            "packed_bytes": self.row["packed_bytes"],
            "gzip_bytes": self.row["gzip_bytes"],
            "xz_bytes": self.row["xz_bytes"],
            "onnx_bytes": self.info["file_bytes"],
        }


# --- what the run has ----------------------------------------------------------------------


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f", and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def resolve_level(info: dict[str, Any], rows: Sequence[dict[str, Any]], level: str) -> str:
    """The run's level named ``level``: exactly, or ``k=K`` for the one learned headline level of K superclasses.

    A run with several trees names its levels ``k=5 confusion``; ``k=5`` then means the
    tree chosen for k=5 (the one in the headline).

    Raises
    ------
    HierclusterError
        One line listing the run's levels, when none (or several) match.
    """
    from hiercluster.evaluation.selection import headline_rows

    names = list(info["levels"])
    if level in names:
        return level
    match = _K_LEVEL.fullmatch(level.strip())
    if match:
        shown = dict.fromkeys(r["level"] for r in headline_rows(info, rows))
        found = [
            name for name in shown
            if info["levels"][name]["kind"] == "learned" and int(info["levels"][name]["k"]) == int(match.group(1))
        ]
        if len(found) == 1:
            return found[0]
    raise HierclusterError(f"--level {short_repr(level)} is not a level of this run; levels: {_listed(names)}")


def choose_row(info: dict[str, Any], rows: Sequence[dict[str, Any]], level: str, spec: str | None) -> dict[str, Any]:
    """The results row to export at ``level``: of spec tag ``spec``, else of the level's headline winner."""
    tags = [g["tag"] for g in info["grid"]]
    at_level = [r for r in rows if r["level"] == level]
    if spec is not None:
        if spec not in tags:
            raise HierclusterError(f"--spec {short_repr(spec)} is not a spec of this run; specs: {_listed(tags)}")
        found = [r for r in at_level if r["tag"] == spec]
        if not found:
            raise HierclusterError(f"spec {spec} has no results at level {level}; run `hiercluster run` again to finish it")
        return found[0]
    table = headline(at_level, info["tolerance"]) if at_level else []
    winner = table[0]["winner"] if table else None
    if winner is None:
        raise HierclusterError(
            f"no spec is within the run's tolerance ({info['tolerance']:g} pp) at level {level}; "
            f"choose one with --spec TAG (specs: {_listed(tags)})"
        )
    return winner


def _checkpoint_candidates(recorded: str, cfg_path: Path, resolved: str | None = None) -> list[Path]:
    """Where the run's recorded checkpoint may be from here, in order.

    First the path the run resolved (run.json ``checkpoint_path``, absent in older runs);
    then ``model.checkpoint`` as written in the config, relative to the config file's
    folder, which the run directory does not name: beside the saved config, from the
    current folder, and from ``configs/`` below it (the shipped configs' folder, for a run
    started from the repository). Each candidate is accepted only with the run's sha256.
    """
    paths = [Path(resolved)] if resolved else []
    paths += [resolve_path(recorded, str(cfg_path)), Path(recorded).expanduser(), Path("configs") / recorded]
    return list(dict.fromkeys(p for p in paths if p.is_file()))


def _run_config(run_dir: Path, checkpoint: str | Path | None, info: dict[str, Any]) -> RunConfig:
    """The run's saved config, with its checkpoint found (or ``checkpoint``) and checked against the run's."""
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise HierclusterError(f"{run_dir} has no {CONFIG_FILE}; run `hiercluster run` again on this folder")
    cfg = load_config(cfg_path)
    digest = info["checkpoint_sha256"]
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise HierclusterError(f"--checkpoint {path}: file not found")
        if file_digest(path) != digest:
            raise HierclusterError(
                f"--checkpoint {path} is not the run's model (its sha256 differs from {digest[:12]}...); "
                "pass the file the run quantized"
            )
    else:
        recorded = cfg.model.checkpoint or ""
        candidates = _checkpoint_candidates(recorded, cfg_path, info.get("checkpoint_path")) if recorded else []
        found = [p for p in candidates if file_digest(p) == digest]
        if not found:
            raise HierclusterError(
                f"the run's checkpoint {short_repr(recorded)} (sha256 {digest[:12]}...) is not found from here; "
                "pass --checkpoint PATH"
            )
        path = found[0]
    model = dataclasses.replace(cfg.model, checkpoint=str(path.absolute()))
    return dataclasses.replace(cfg, model=model)


def _eval_set(cfg: RunConfig, info: dict[str, Any]) -> tuple[Any, dict[str, int] | None]:
    """The run's evaluation set (its ``data.limit`` subset when it had one), checked to have its classes."""
    from hiercluster.data.datasets import limit_dataset, load_dataset
    from hiercluster.run.config import data_root
    from hiercluster.run.prepare import data_options

    full = load_dataset(cfg.data.dataset, data_root(cfg), cfg.data.eval_split, cfg.data.download, options=data_options(cfg))
    if list(full.classes) != list(info["class_names"]):
        raise HierclusterError(f"the {cfg.data.dataset} data found here has other classes than the run's")
    if cfg.data.limit is None:
        return full, None
    subset = limit_dataset(full, cfg.data.limit, f"the {cfg.data.eval_split} split of {cfg.data.dataset}")
    return subset, {"limit": len(subset), "of": len(full)}


def _packed_file(run_dir: Path, key: str) -> Path | None:
    """The run's bit-packed model of spec ``key``: an exported winner, or the sweep's calibrated cache."""
    manifest_path = run_dir / MODELS_DIR / MANIFEST_FILE
    if manifest_path.is_file():
        manifest = read_manifest(manifest_path)
        for entry in manifest["levels"].values():
            if entry["spec_key"] == key and (run_dir / MODELS_DIR / entry["model"]).is_file():
                return run_dir / MODELS_DIR / entry["model"]
    cached = packed_model_path(run_dir, key)
    return cached if cached.is_file() else None


def _quantized_model(cfg: RunConfig, run_dir: Path, model: nn.Module, row: dict[str, Any]) -> tuple[nn.Module, Any, str]:
    """``(qmodel, report with codes, source)`` of the row's spec: from its packed file, else quantized again."""
    packed = _packed_file(run_dir, row["spec_key"])
    if packed is not None:
        try:
            qmodel, report = onnx_export.load_packed_with_codes(packed, model)
        except quant.QuantError as exc:
            raise HierclusterError(str(exc)) from None
        return qmodel, report, str(packed)
    from hiercluster.run.grid import expand_grid
    from hiercluster.run.prepare import load_calibration
    from hiercluster.run.sweep import quantize_point

    points = {p.tag: p for p in expand_grid(cfg)}
    if row["tag"] not in points:
        raise HierclusterError(f"spec {row['tag']} is not in the run's saved config any more; it cannot be quantized again")
    point = points[row["tag"]]
    calibration = load_calibration(cfg, point.calibration_user) if point.needs_calibration else None
    # quantize_point reads the config and the calibration batches only.
    qmodel, report = quantize_point(model, point, types.SimpleNamespace(cfg=cfg, calibration=calibration))
    return qmodel, report, "quantized again"


def level_head(info: dict[str, Any], level: str) -> tuple[GroupedHead, list[str]]:
    """The level's merged head (the run's reduction) and its superclass names in the head's output order.

    The head numbers groups canonically (by smallest member class), which may differ from
    run.json's order; the names follow the head.
    """
    entry = info["levels"][level]
    head = GroupedHead(np.asarray(entry["assignment"], dtype=np.int64), info["reduction"]).eval()
    names = [""] * head.num_groups
    for run_group, head_group in zip(entry["assignment"], head.assignment.tolist()):
        names[head_group] = entry["names"][run_group]
    return head, names


def level_metadata(
    info: dict[str, Any], level: str, superclasses: list[str], row: dict[str, Any], dataset: Any
) -> dict[str, Any]:
    """``metadata_props`` of the exported level: names, grouping, spec, average bits and the run's accuracies."""
    from hiercluster.data.datasets import dataset_info

    classes = list(info["class_names"])
    head, _ = level_head(info, level)
    grouping = {name: [c for c, g in zip(classes, head.assignment.tolist()) if g == i] for i, name in enumerate(superclasses)}
    described = dataset_info(dataset)
    return {
        "level": level,
        "k": len(superclasses),
        "superclasses": superclasses,
        "grouping": grouping,
        "class_names": classes,
        "reduction": info["reduction"],
        "spec": row["tag"],
        "spec_key": row["spec_key"],
        "avg_bits": row["avg_bits"],
        "accuracy": {
            "dataset": info["dataset"],
            "split": info["eval_split"],
            "n_eval": info["n_eval"],
            "float_fine": row["fine_acc_float"],
            "quantized_fine": row["fine_acc_quant"],
            "float_level": row["acc_float"],
            "quantized_level": row["acc_quant"],
            "drop_pp": row["drop"],
        },
        "input": {key: described[key] for key in ("in_channels", "image_size", "mean", "std") if key in described},
    }


# --- the check in ONNX Runtime -----------------------------------------------------------------


def check_in_runtime(
    path: Path, merged: nn.Module, batches: Any, assignment: np.ndarray
) -> tuple[int, float, float, float]:
    """Run the ONNX file and the PyTorch merged-head model on every batch.

    Returns ``(samples, argmax agreement, max abs score difference, ONNX superclass accuracy)``;
    scores that are ``-inf`` in both count as equal.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    groups = torch.as_tensor(assignment)
    n = agree = correct = 0
    diff = 0.0
    with torch.no_grad():
        for x, y in batches:
            x = x.to(torch.float32)
            ref = merged(x).numpy()
            got = session.run([onnx_export.SCORES_NAME], {onnx_export.INPUT_NAME: x.numpy()})[0]
            diff = max(diff, onnx_export.max_abs_diff(got, ref))
            agree += int((got.argmax(1) == ref.argmax(1)).sum())
            correct += int((torch.from_numpy(got.argmax(1)) == groups[y]).sum())
            n += len(y)
    if n == 0:
        raise HierclusterError("the evaluation set is empty: nothing to check the ONNX model on")
    return n, agree / n, diff, correct / n


def check_export_packages() -> None:
    """Refuse at once, in one line, when onnx or onnxruntime is not installed."""
    import importlib.util

    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise HierclusterError(
            f"hiercluster export needs {' and '.join(missing)}: pip install 'hiercluster[export]'"
        )


def _temporary(out: Path) -> Path:
    return out.with_name(f".{out.name}.{os.getpid()}.tmp")


def export_level(
    run_dir: str | Path,
    level: str,
    out: str | Path,
    *,
    spec: str | None = None,
    fine_logits: bool = False,
    checkpoint: str | Path | None = None,
    opset: int | None = None,
) -> LevelExport:
    """Export one level of a run directory as ONNX with its merged head; check it in ONNX Runtime.

    Parameters
    ----------
    run_dir : path
        A finished ``hiercluster run`` directory.
    level : str
        A level of the run (``"k=5"``, ``"k=5 confusion"``, ``"reference"``).
    out : path
        The ``.onnx`` file to write (replaced only after the check passed).
    spec : str, optional
        A spec tag of the run's grid; default the level's headline winner.
    fine_logits : bool
        Also output the fine logits.
    checkpoint : path, optional
        The float checkpoint when the run's recorded path does not lead to it from here.
    opset : int, optional
        See :func:`onnx_export.export_onnx`.

    Raises
    ------
    HierclusterError
        An unknown level or spec (listing what exists), a missing or different checkpoint,
        a model the exporter cannot trace (naming the layer), or an agreement below
        :data:`MIN_AGREEMENT` (nothing is written then).
    """
    from hiercluster.data.datasets import dataset_info
    from hiercluster.run.prepare import load_float_model, run_loader

    run_dir, out = Path(run_dir), Path(out)
    check_export_packages()
    check_is_run(run_dir)
    info = read_run_info(run_dir)
    with ResultsStore(run_dir / DB_FILE) as store:
        rows = store.results([g["key"] for g in info["grid"]], complete=True)
    name = resolve_level(info, rows, level)
    row = choose_row(info, rows, name, spec)
    cfg = _run_config(run_dir, checkpoint, info)
    eval_set, limited = _eval_set(cfg, info)
    model, _ = load_float_model(cfg, list(info["class_names"]), int(dataset_info(eval_set)["in_channels"]))
    qmodel, report, source = _quantized_model(cfg, run_dir, model.cpu(), row)
    head, superclasses = level_head(info, name)
    metadata = level_metadata(info, name, superclasses, row, eval_set)
    example = next(iter(run_loader(cfg, eval_set)))[0][:2].to(torch.float32)
    tmp = _temporary(out)
    try:
        result = onnx_export.export_onnx(
            qmodel, report, tmp, example, head=head, opset=opset, fine_logits=fine_logits, metadata=metadata
        )
        merged = nn.Sequential(qmodel.cpu().eval(), head)
        n, agreement, diff, accuracy = check_in_runtime(tmp, merged, run_loader(cfg, eval_set), head.assignment.numpy())
        if agreement < MIN_AGREEMENT:
            raise HierclusterError(
                f"ONNX Runtime and PyTorch predict the same superclass on only {100 * agreement:.2f}% of {n} samples "
                f"(at least {100 * MIN_AGREEMENT:g}% needed; max abs score difference {diff:.3g}); {out} was not written"
            )
        os.replace(tmp, out)
    except quant.QuantError as exc:
        raise HierclusterError(str(exc)) from None
    finally:
        tmp.unlink(missing_ok=True)
    result["path"] = str(out)
    return LevelExport(
        level=name, k=len(superclasses), superclasses=superclasses, reduction=info["reduction"], row=row, source=source,
        info=result, n_checked=n, agreement=agreement, max_abs_diff=diff, onnx_accuracy=accuracy, data_limit=limited,
        metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()},
    )


__all__ = [
    "MIN_AGREEMENT",
    "LevelExport",
    "check_export_packages",
    "check_in_runtime",
    "choose_row",
    "export_level",
    "level_head",
    "level_metadata",
    "resolve_level",
]
