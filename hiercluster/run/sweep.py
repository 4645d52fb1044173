"""One spec of the sweep: quantize, run once, every metric from kept logits; and its resume key."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import quant
from hiercluster.data.datasets import FolderOptions
from hiercluster.errors import HierclusterError
from hiercluster.evaluation.inference import accuracy, collect_logits
from hiercluster.evaluation.metrics import (
    FloatLevelStats,
    evaluate_levels,
    fine_bootstrap,
    float_level_stats,
    grouped_accuracies,
    prediction_share,
)
from hiercluster.run.config import RunConfig
from hiercluster.run.grid import GridPoint, calibration_settings
from hiercluster.run.prepare import Prepared, data_identity, run_loader
from hiercluster.run.records import (
    RUN_WIDE_METRIC_KEYS,
    XZ_MAX_BYTES,
    Level,
    LevelResult,
    SpecResult,
    build_record,
)
from hiercluster.run.store import spec_key
from hiercluster.run.trees import HOLDOUT_SEED
from hiercluster.run.versions import code_version


@dataclass(frozen=True)
class SweepContext:
    """What every spec of a sweep reads: fixed before the first spec runs, never written by one.

    Built once per run by :func:`sweep_context` from the prepared state: the float model,
    the evaluation set with its float logits and labels, the levels, the calibration images
    (loaded when a spec of the grid needs them) and the float side of every level's metrics
    (computed once, not once per spec). The Ray executor puts it into the object store once;
    it pickles with the model, tensors and dataset it holds (plain dicts, not read-only
    mapping proxies, for that reason: no spec writes to them).
    """

    cfg: RunConfig
    model: nn.Module
    class_names: tuple[str, ...]
    eval_set: Any
    labels: torch.Tensor
    float_logits: torch.Tensor
    levels: Mapping[str, Level]
    float_stats: Mapping[str, FloatLevelStats]
    calibration: tuple[torch.Tensor, ...] | None
    checkpoint_digest: str
    data_options: FolderOptions | None
    device: torch.device
    keep_packed: bool = False  # return calibrated models bit-packed, for the run's export
    # hierarchy.select: auto's held-out training images, their labels and the float model's logits
    # on them; None when the run does not choose between trees.
    holdout_set: Any = None
    holdout_labels: torch.Tensor | None = None
    holdout_logits: torch.Tensor | None = None

    def loader(self) -> Any:
        """Batches of the evaluation set (scoring only: nothing is ever fitted on it)."""
        return run_loader(self.cfg, self.eval_set)

    @property
    def tree_levels(self) -> dict[str, Level]:
        """The levels that belong to one of several trees: those the held-out images score."""
        return {name: level for name, level in self.levels.items() if level.tree}


def sweep_context(prep: Prepared, grid: Sequence[GridPoint] = (), keep_packed: bool = False) -> SweepContext:
    """The frozen context of a sweep over ``grid`` from ``prep`` (whose float logits are computed).

    Calibration images are loaded here when a point of ``grid`` needs them, and the float
    side of every level kind's metrics is computed here, so that no spec (and no Ray task)
    does either again.
    """
    if prep.float_logits is None or prep.labels is None:
        raise HierclusterError("sweep_context needs the float logits: call prep.evaluate_float() first")
    calibrated = next((p for p in grid if p.needs_calibration), None)
    calibration = prep.calibration_batches(calibrated.calibration_user) if calibrated is not None else prep.calibration
    cfg = prep.cfg
    float_stats = {
        group: float_level_stats(
            prep.float_logits, prep.labels, levels,
            n_random=cfg.eval.random_seeds, seed=cfg.eval.seed, reduction=cfg.eval.reduction,
            bootstrap=cfg.eval.bootstrap,
        )
        for group, (_, levels) in _level_groups(prep.levels).items()
    }
    if cfg.hierarchy.selects_on_holdout and prep.holdout_logits is None:
        raise HierclusterError("sweep_context needs the held-out float logits of select: auto: call prep.evaluate_float()")
    return SweepContext(
        cfg=cfg,
        model=prep.model,
        class_names=tuple(prep.class_names),
        eval_set=prep.eval_set,
        labels=prep.labels,
        float_logits=prep.float_logits,
        levels=dict(prep.levels),
        float_stats=float_stats,
        calibration=tuple(calibration) if calibration is not None else None,
        checkpoint_digest=prep.checkpoint_digest,
        data_options=prep.data_options,
        device=prep.device,
        keep_packed=keep_packed,
        holdout_set=prep.holdout_set if cfg.hierarchy.selects_on_holdout else None,
        holdout_labels=prep.holdout_labels if cfg.hierarchy.selects_on_holdout else None,
        holdout_logits=prep.holdout_logits if cfg.hierarchy.selects_on_holdout else None,
    )


def resume_key(point: GridPoint, ctx: SweepContext) -> str:
    """The key a spec's results are stored under: a hash of everything that changes them.

    The spec, plan and method; the calibration images' settings (calibrated specs) and the
    activation settings (when activations are quantized); the checkpoint's bytes; the
    evaluation data (dataset, root, split, limit, image options, and a digest of its
    labels); the levels' groupings; the evaluation settings; the device type (results on
    one device type are never mixed with another's); and the code (:func:`code_version`).
    Settings that only change speed or the report (batch sizes, workers, threads,
    tolerance, output) are left out: ``tests/hiercluster/run/test_resume_key.py`` lists each.
    """
    cfg = ctx.cfg
    h = cfg.hierarchy
    return spec_key(
        {
            "spec": point.spec.to_dict(),
            "plan": point.plan.to_dict(),
            "method": point.method,
            "bn_reestimate": point.bn_reestimate,
            "calibration": calibration_settings(cfg) if point.needs_calibration else None,
            "activation": point.activation.to_dict() if point.activation else None,
            "activation_batches": cfg.quant.activation_calibration_batches if point.activation else None,
            # A budget point's widths are chosen from its candidates on the calibration images (in "calibration").
            "budget": [point.budget, list(point.candidate_bits)] if point.budget is not None else None,
            "checkpoint": ctx.checkpoint_digest,
            "data": _data_key(ctx),
            "eval": [cfg.eval.reduction, cfg.eval.random_seeds, cfg.eval.seed, cfg.eval.bootstrap],
            "levels": {name: list(level.assignment) for name, level in ctx.levels.items()},
            # The held-out drops a spec stores (select: auto) depend on which images are held out.
            "holdout": [h.split, len(ctx.holdout_set), HOLDOUT_SEED] if ctx.holdout_set is not None else None,
            "device": ctx.device.type,
            "version": code_version(),
        }
    )


def _data_key(ctx: SweepContext) -> dict[str, Any]:
    """The evaluation data in a result's key: what selects it, and a digest of its labels."""
    labels = ctx.labels.numpy().astype("<i8").tobytes()
    ident = data_identity(ctx.cfg, len(ctx.labels), ctx.data_options)
    return {**ident, "labels": hashlib.sha256(labels).hexdigest()[:16]}


def quantize_point(model: nn.Module, point: GridPoint, ctx: SweepContext) -> tuple[nn.Module, Any]:
    """Quantize the float model for one grid point (weights once; activations if asked).

    Everything fitted (calibrated rounding, BN statistics, activation ranges) is fitted
    on the calibration batches, never on the evaluation set.
    """
    calibration = ctx.calibration if point.needs_calibration else None
    if point.needs_calibration and ctx.calibration is None:
        raise HierclusterError(f"{point.tag} needs calibration images; build the context with sweep_context(prep, grid)")
    try:
        plan = point.plan if point.budget is None else allocate_plan(model, point, calibration or ())
        return quant.quantize_model(
            model,
            point.spec,
            plan,
            method=point.method,
            bn_reestimate=point.bn_reestimate,
            act_spec=point.activation,
            calibration=calibration,
            calibration_batches=ctx.cfg.quant.activation_calibration_batches,
            seed=ctx.cfg.calibration.seed,
        )
    except quant.QuantError as exc:
        raise HierclusterError(f"quantizing with {point.tag}: {exc}") from None


def allocate_plan(model: nn.Module, point: GridPoint, calibration: Sequence[torch.Tensor]) -> quant.QuantPlan:
    """The mixed-precision plan of a budget point: each layer's width from the proxy on the calibration images.

    :func:`quant.proxy.layer_costs` measures, per layer and candidate width, the output
    error of quantizing that layer alone (its input Hessian from the calibration batches:
    never the evaluation set); :func:`quant.allocation.allocate_bits` picks the widths of
    least total cost whose average is within the budget.
    """
    from quant.allocation import allocate_bits, allocation_plan
    from quant.proxy import layer_costs

    sizes, costs = layer_costs(model, point.spec, point.candidate_bits, calibration)
    widths = allocate_bits(sizes, costs, float(point.budget))
    return allocation_plan(widths, name=point.plan.name)


def widest_bits(report: Any) -> int:
    """The widest code width of a quantized model's layers (float layers aside)."""
    return max((row.bits for row in report.layers if row.bits < 32), default=0)


def _level_groups(levels: Mapping[str, Level]) -> dict[str, tuple[list[str], dict[int, Any]]]:
    """The levels by :attr:`Level.group` (kind and tree, whose k differ): their names and ``{k: assignment}``."""
    groups: dict[str, tuple[list[str], dict[int, Any]]] = {}
    for name, level in levels.items():
        names, by_k = groups.setdefault(level.group, ([], {}))
        names.append(name)
        by_k[level.k] = level.array
    return groups


def level_metrics(ctx: SweepContext, quant_logits: torch.Tensor) -> list[LevelResult]:
    """Every level's metrics for one quantized model, from kept logits.

    Each tree's learned levels (distinct k) go through one vectorized
    :func:`evaluate_levels` call; the reference grouping, whose k may equal a learned
    level's, through another. The float side of each was computed once, in :func:`sweep_context`.
    """
    cfg = ctx.cfg
    rows: dict[str, LevelResult] = {}
    for group, (names, levels) in _level_groups(ctx.levels).items():
        kind = ctx.levels[names[0]].kind
        results = evaluate_levels(
            ctx.float_logits,
            quant_logits,
            ctx.labels,
            levels,
            n_random=cfg.eval.random_seeds,
            seed=cfg.eval.seed,
            reduction=cfg.eval.reduction,
            float_stats=ctx.float_stats[group],
            bootstrap=cfg.eval.bootstrap,
        )
        for name, row in zip(names, results):
            rows[name] = build_record(
                LevelResult, {**row, "level": name, "grouping": kind}, f"level {name}", ignore=RUN_WIDE_METRIC_KEYS
            )
    return [rows[name] for name in ctx.levels]


def holdout_drops(ctx: SweepContext, model: nn.Module) -> dict[str, float]:
    """Each tree level's drop (pp) on the held-out training images, and the fine drop (``"fine"``).

    What ``hierarchy.select: auto`` chooses with; empty when the run does not choose. One
    forward pass of the quantized model over the held-out images (the float side is cached).
    """
    if ctx.holdout_set is None or ctx.holdout_logits is None or ctx.holdout_labels is None:
        return {}
    qlogits, _ = collect_logits(model, run_loader(ctx.cfg, ctx.holdout_set))
    levels = ctx.tree_levels
    c = len(ctx.class_names)
    stack = np.stack([np.arange(c)] + [level.array for level in levels.values()])
    reduction = ctx.cfg.eval.reduction
    acc_float = grouped_accuracies(ctx.holdout_logits, ctx.holdout_labels, stack, reduction)
    acc_quant = grouped_accuracies(qlogits, ctx.holdout_labels, stack, reduction)
    drops = 100.0 * (acc_float - acc_quant)
    return {name: float(d) for name, d in zip(["fine", *levels], drops)}


def logits_digest(logits: torch.Tensor) -> str:
    """A short digest of a model's logits (float32, little-endian): equal digests, bit-identical outputs."""
    data = logits.detach().to(torch.float32).cpu().contiguous().numpy().astype("<f4").tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def evaluate_point(point: GridPoint, ctx: SweepContext, key: str) -> SpecResult:
    """Quantize, run once, compute every level's metrics and the sizes; returns what the store keeps.

    With ``ctx.keep_packed``, a calibrated model comes back bit-packed in
    ``packed_model`` too, for the driver to keep (``packed/KEY.hcq``), so that exporting it
    later does not fit it again. Nothing here writes a file: on a Ray cluster this runs on
    a machine that may not see the run directory.
    """
    t0 = time.perf_counter()
    qmodel, qreport = quantize_point(ctx.model, point, ctx)
    packed = None
    if ctx.keep_packed and point.needs_calibration:
        packed = quant.packed_file_bytes(qmodel, qreport)
    t1 = time.perf_counter()
    qlogits, _ = collect_logits(qmodel, ctx.loader())
    holdout = holdout_drops(ctx, qmodel)
    t2 = time.perf_counter()
    level_rows = level_metrics(ctx, qlogits)
    fine = fine_bootstrap(ctx.float_logits, qlogits, ctx.labels, ctx.cfg.eval.bootstrap, ctx.cfg.eval.seed)
    share = prediction_share(qlogits, len(ctx.class_names))
    t3 = time.perf_counter()
    sizes = quant.model_size(qmodel, qreport, xz_max_bytes=XZ_MAX_BYTES)
    t4 = time.perf_counter()
    return build_record(
        SpecResult,
        {
            "spec_key": key,
            "tag": point.tag,
            "scheme": point.spec.scheme,
            # A mixed-precision model's code width is its widest layer's (its average is avg_bits).
            "bits": point.spec.bits if point.budget is None else widest_bits(qreport),
            "clipping": point.spec.clipping,
            "granularity": point.spec.granularity,
            "plan": point.plan.name,
            "method": point.method,
            "bn_reestimate": bool(point.bn_reestimate),
            "activation_bits": point.activation.bits if point.activation else None,
            "avg_bits": qreport.avg_bits,
            "fine_acc": accuracy(qlogits, ctx.labels),
            **fine,
            "logits_digest": logits_digest(qlogits),
            **{k: sizes[k] for k in ("fp32_bytes", "packed_bytes", "gzip_bytes", "xz_bytes")},
            "quantize_s": t1 - t0,
            "eval_s": t2 - t1,
            "metrics_s": t3 - t2,
            "size_s": t4 - t3,
            "levels": tuple(level_rows),
            "spec_json": point.spec.to_dict(),
            "plan_json": qreport.plan.to_dict() if qreport.plan is not None else point.plan.to_dict(),
            "prediction_share": tuple(share.tolist()),
            "layers": tuple(qreport.rows()),
            "holdout": holdout,
            "packed_model": packed,
        },
        f"spec {point.tag}",
    )
