"""One spec of the sweep: quantize, run once, every metric from kept logits; and its resume key."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import torch
import torch.nn as nn

import quant
from hiercluster.errors import HierclusterError
from hiercluster.evaluation.inference import accuracy, collect_logits
from hiercluster.evaluation.metrics import (
    FloatLevelStats,
    evaluate_levels,
    float_level_stats,
    prediction_share,
)
from hiercluster.run.grid import GridPoint, calibration_settings
from hiercluster.run.prepare import Prepared, data_identity
from hiercluster.run.records import (
    LEVEL_KINDS,
    RUN_WIDE_METRIC_KEYS,
    XZ_MAX_BYTES,
    LevelResult,
    SpecResult,
    build_record,
)
from hiercluster.run.store import spec_key
from hiercluster.run.versions import code_version


def resume_key(point: GridPoint, prep: Prepared) -> str:
    """The key a spec's results are stored under: a hash of everything that changes them.

    The spec, plan and method; the calibration images' settings (calibrated specs) and the
    activation settings (when activations are quantized); the checkpoint's bytes; the
    evaluation data (dataset, root, split, limit, image options, and a digest of its
    labels); the levels' groupings; the evaluation settings; the device type (results on
    one device type are never mixed with another's); and the code (:func:`code_version`).
    Settings that only change speed or the report (batch sizes, workers, threads,
    tolerance, output) are left out: ``tests/hiercluster/run/test_resume_key.py`` lists each.
    """
    cfg = prep.cfg
    return spec_key(
        {
            "spec": point.spec.to_dict(),
            "plan": point.plan.to_dict(),
            "method": point.method,
            "bn_reestimate": point.bn_reestimate,
            "calibration": calibration_settings(cfg) if point.needs_calibration else None,
            "activation": point.activation.to_dict() if point.activation else None,
            "activation_batches": cfg.quant.activation_calibration_batches if point.activation else None,
            "checkpoint": prep.checkpoint_digest,
            "data": _data_key(prep),
            "eval": [cfg.eval.reduction, cfg.eval.random_seeds, cfg.eval.seed],
            "levels": {name: list(level.assignment) for name, level in prep.levels.items()},
            "device": prep.device.type,
            "version": code_version(),
        }
    )


def _data_key(prep: Prepared) -> dict[str, Any]:
    """The evaluation data in a result's key: what selects it, and a digest of its labels."""
    labels = prep.labels.numpy().astype("<i8").tobytes()
    ident = data_identity(prep.cfg, len(prep.labels), prep.data_options)
    return {**ident, "labels": hashlib.sha256(labels).hexdigest()[:16]}


def quantize_point(model: nn.Module, point: GridPoint, prep: Prepared) -> tuple[nn.Module, Any]:
    """Quantize the float model for one grid point (weights once; activations if asked).

    Everything fitted (calibrated rounding, BN statistics, activation ranges) is fitted
    on the calibration batches, never on the evaluation set.
    """
    calibration = prep.calibration_batches(point.calibration_user) if point.needs_calibration else None
    try:
        return quant.quantize_model(
            model,
            point.spec,
            point.plan,
            method=point.method,
            bn_reestimate=point.bn_reestimate,
            act_spec=point.activation,
            calibration=calibration,
            calibration_batches=prep.cfg.quant.activation_calibration_batches,
            seed=prep.cfg.calibration.seed,
        )
    except quant.QuantError as exc:
        raise HierclusterError(f"quantizing with {point.tag}: {exc}") from None


def _float_stats(prep: Prepared, kind: str, levels: dict[int, Any]) -> FloatLevelStats:
    """The float side of the ``kind`` levels' metrics: computed for the first spec, then kept on ``prep``."""
    if kind not in prep.float_stats:
        cfg = prep.cfg
        prep.float_stats[kind] = float_level_stats(
            prep.float_logits,
            prep.labels,
            levels,
            n_random=cfg.eval.random_seeds,
            seed=cfg.eval.seed,
            reduction=cfg.eval.reduction,
        )
    return prep.float_stats[kind]


def _kind_levels(prep: Prepared, kind: str) -> tuple[list[str], dict[int, Any]]:
    """The names of the ``kind`` levels and their ``{k: assignment}``, in the run's level order."""
    names = [name for name, level in prep.levels.items() if level.kind == kind]
    return names, {prep.levels[name].k: prep.levels[name].array for name in names}


def fill_float_stats(prep: Prepared) -> None:
    """Compute the float side of every level kind's metrics now, not for the first spec.

    For an executor that ships ``prep`` to workers: filled before, it travels with
    ``prep`` and no task computes it again.
    """
    for kind in LEVEL_KINDS:
        names, levels = _kind_levels(prep, kind)
        if names:
            _float_stats(prep, kind, levels)


def level_metrics(prep: Prepared, quant_logits: torch.Tensor) -> list[LevelResult]:
    """Every level's metrics for one quantized model, from kept logits.

    The learned levels (distinct k) go through one vectorized :func:`evaluate_levels`
    call; the reference grouping, whose k may equal a learned level's, through another.
    The float side of both is computed once per run (:func:`_float_stats`).
    """
    cfg = prep.cfg
    rows: dict[str, LevelResult] = {}
    for kind in LEVEL_KINDS:
        names, levels = _kind_levels(prep, kind)
        if not names:
            continue
        results = evaluate_levels(
            prep.float_logits,
            quant_logits,
            prep.labels,
            levels,
            n_random=cfg.eval.random_seeds,
            seed=cfg.eval.seed,
            reduction=cfg.eval.reduction,
            float_stats=_float_stats(prep, kind, levels),
        )
        for name, row in zip(names, results):
            rows[name] = build_record(
                LevelResult, {**row, "level": name, "grouping": kind}, f"level {name}", ignore=RUN_WIDE_METRIC_KEYS
            )
    return [rows[name] for name in prep.levels]


def evaluate_point(point: GridPoint, prep: Prepared, key: str) -> SpecResult:
    """Quantize, run once, compute every level's metrics and the sizes; returns what the store keeps.

    With ``prep.packed_cache`` set, a calibrated model comes back bit-packed in
    ``packed_model`` too, for the driver to keep (``packed/KEY.hcq``), so that exporting it
    later does not fit it again. Nothing here writes a file: on a Ray cluster this runs on
    a machine that may not see the run directory.
    """
    t0 = time.perf_counter()
    qmodel, qreport = quantize_point(prep.model, point, prep)
    packed = None
    if prep.packed_cache is not None and point.needs_calibration:
        packed = quant.packed_file_bytes(qmodel, qreport)
    t1 = time.perf_counter()
    qlogits, _ = collect_logits(qmodel, prep.loader())
    t2 = time.perf_counter()
    level_rows = level_metrics(prep, qlogits)
    share = prediction_share(qlogits, len(prep.class_names))
    t3 = time.perf_counter()
    sizes = quant.model_size(qmodel, qreport, xz_max_bytes=XZ_MAX_BYTES)
    t4 = time.perf_counter()
    return build_record(
        SpecResult,
        {
            "spec_key": key,
            "tag": point.tag,
            "scheme": point.spec.scheme,
            "bits": point.spec.bits,
            "clipping": point.spec.clipping,
            "granularity": point.spec.granularity,
            "plan": point.plan.name,
            "method": point.method,
            "bn_reestimate": bool(point.bn_reestimate),
            "activation_bits": point.activation.bits if point.activation else None,
            "avg_bits": qreport.avg_bits,
            "fine_acc": accuracy(qlogits, prep.labels),
            **{k: sizes[k] for k in ("fp32_bytes", "packed_bytes", "gzip_bytes", "xz_bytes")},
            "quantize_s": t1 - t0,
            "eval_s": t2 - t1,
            "metrics_s": t3 - t2,
            "size_s": t4 - t3,
            "levels": tuple(level_rows),
            "spec_json": point.spec.to_dict(),
            "plan_json": point.plan.to_dict(),
            "prediction_share": tuple(share.tolist()),
            "layers": tuple(qreport.rows()),
            "packed_model": packed,
        },
        f"spec {point.tag}",
    )
