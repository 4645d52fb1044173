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
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import quant
from quant._files import save_torch_atomic
from hiercluster import interrupt
from hiercluster.config import RunConfig, data_root, read_yaml, resolve_path, save_config
from hiercluster.data import (
    FolderOptions,
    cifar100_coarse_groups,
    dataset_info,
    limit_dataset,
    load_dataset,
    make_loader,
    resolve_folder_options,
)
from hiercluster.errors import HierclusterError, short_repr
from hiercluster.evaluate import accuracy, collect_logits, evaluate_levels, prediction_share
from hiercluster.heads import as_assignment, group_names
from hiercluster.hierarchy import ClassHierarchy, build_hierarchy
from hiercluster.models import build_model, check_fits_data, classifier_layer, load_checkpoint, metadata_path, read_metadata
from hiercluster.rundir import (  # noqa: F401  (file names and checks importable from here as before)
    CONFIG_FILE,
    CSV_FILE,
    DB_FILE,
    HIERARCHY_FILE,
    LOGITS_FILE,
    PACKED_CACHE_DIR,
    RUN_FILE,
    RunLock,
    check_run_dir,
    check_same_grid,
    check_same_hierarchy,
    check_same_levels,
    write_json,
)
from hiercluster.store import ResultsStore, check_database, file_digest, method_label, spec_key

PLAN_NAME = re.compile(r"[A-Za-z0-9_+\-][A-Za-z0-9_.+\-]{0,63}")
# Bumped whenever a stored result's meaning changes, so that results of older code are never reused.
SCHEMA_VERSION = 2


@dataclass(frozen=True)
class GridPoint:
    """One weight-quantization setting of the sweep.

    Examples
    --------
    >>> spec, plan = quant.QuantSpec(scheme="asymmetric", bits=2, clipping="mse"), quant.QuantPlan(name="full")
    >>> GridPoint(spec, plan, method="gptq", bn_reestimate=True).tag
    'asymmetric-2b-mse-per_channel+full+gptq+bn'
    >>> GridPoint(spec, plan).tag  # round to nearest without BN re-estimation: no suffix
    'asymmetric-2b-mse-per_channel+full'
    """

    spec: quant.QuantSpec
    plan: quant.QuantPlan
    activation: quant.QuantSpec | None = None
    method: str = "rtn"
    bn_reestimate: bool = False

    def __post_init__(self) -> None:
        if self.method not in quant.METHODS:
            raise ValueError(f"GridPoint method {short_repr(self.method)} is not one of {', '.join(quant.METHODS)}")

    @property
    def method_label(self) -> str:
        """``"gptq+bn"``, ``"rtn"``, ...: the method and whether BN statistics were re-estimated."""
        return method_label(self.method, self.bn_reestimate)

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing this point fits anything on calibration data."""
        return self.activation is not None or quant.needs_calibration(self.method, self.bn_reestimate)

    @property
    def calibration_user(self) -> str:
        """What in this point needs calibration data, for error messages."""
        if self.method != "rtn":
            return f"method {short_repr(self.method)}"
        if self.bn_reestimate:
            return "BN re-estimation (quant.bn_reestimate)"
        return "activation quantization (quant.activation_bits)"

    @property
    def calibration_use(self) -> str:
        """What is fitted on calibration data, as a short label (``"gptq+bn"``, ``"a8"``, ``"gptq+a8"``)."""
        parts = [self.method_label] if self.method_label != "rtn" else []
        return "+".join(parts + ([f"a{self.activation.bits}"] if self.activation else []))

    @property
    def tag(self) -> str:
        tag = f"{self.spec.tag}+{self.plan.name}"
        if self.method_label != "rtn":
            tag += f"+{self.method_label}"
        return tag + (f"+a{self.activation.bits}" if self.activation else "")


def grid_spec(cfg: RunConfig, scheme: str, bits: int, clipping: str, granularity: str) -> quant.QuantSpec:
    """A weight spec with the grid's scheme-specific options (``quant.narrow_range``, ...)."""
    q = cfg.quant
    return quant.QuantSpec(
        scheme=scheme,
        bits=bits,
        granularity=granularity,
        clipping=clipping,
        narrow_range=q.narrow_range,
        pow2_scale=q.pow2_scale,
        percentile=q.percentile,
    )


def check_methods(cfg: RunConfig) -> None:
    """Every ``quant.methods`` item names a known method and existing plans."""
    plan_names = [p.name for p in cfg.quant.plans]
    for i, m in enumerate(cfg.quant.methods):
        if m.name not in quant.METHODS:
            raise HierclusterError(
                f"config key quant.methods[{i}]: unknown method {short_repr(m.name)}; allowed: {', '.join(quant.METHODS)}"
            )
        missing = [p for p in m.plans if p not in plan_names]
        if missing:
            raise HierclusterError(
                f"config key quant.methods[{i}].plans: no plan named {', '.join(map(repr, missing))} in quant.plans "
                f"(names: {', '.join(plan_names)})"
            )


def expand_grid(cfg: RunConfig) -> list[GridPoint]:
    """Every grid point of ``cfg.quant``, without duplicates, in a fixed order.

    The order is method item, BN re-estimation, plan, scheme, clipping, granularity,
    bits: round to nearest (listed first by default) finishes before the slower
    calibrated methods start. A method item's non-empty lists replace the grid's.
    """
    q = cfg.quant
    points: list[GridPoint] = []
    seen: set[tuple[str, str, str, bool]] = set()
    activation = None
    names = [p.name for p in q.plans]
    for i, name in enumerate(names):
        # Plan names become file names (exported models): no path separators, no leading dot.
        if not PLAN_NAME.fullmatch(name):
            raise HierclusterError(
                f"config key quant.plans[{i}].name: {short_repr(name, 40)} is not allowed; use letters, digits and _ - + . "
                "(not starting with a dot), at most 64 characters"
            )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise HierclusterError(f"config key quant.plans: plan names must be unique; repeated: {', '.join(repeated)}")
    check_methods(cfg)
    try:
        if q.activation_bits is not None:
            activation = quant.QuantSpec(
                scheme="asymmetric", bits=q.activation_bits, granularity="per_tensor", clipping="minmax"
            )
        plans = {p.name: quant.QuantPlan.from_dict(p.quant_plan_dict()) for p in q.plans}
        for m in q.methods:
            for bn in dict.fromkeys(m.bn_reestimate or q.bn_reestimate):
                for plan_cfg in q.plans:
                    if m.plans and plan_cfg.name not in m.plans:
                        continue
                    plan = plans[plan_cfg.name]
                    for scheme in m.schemes or q.schemes:
                        if plan_cfg.schemes and scheme not in plan_cfg.schemes:
                            continue
                        for clipping in m.clipping or q.clipping:
                            for granularity in q.granularity:
                                for bits in m.bits or q.bits:
                                    if plan_cfg.bits and bits not in plan_cfg.bits:
                                        continue
                                    spec = grid_spec(cfg, scheme, bits, clipping, granularity)
                                    plan.check(spec)
                                    ident = (json.dumps(spec.to_dict(), sort_keys=True), plan_cfg.name, m.name, bn)
                                    if ident not in seen:
                                        seen.add(ident)
                                        points.append(GridPoint(spec, plan, activation, m.name, bn))
    except ValueError as exc:
        if isinstance(exc, HierclusterError):
            raise
        raise HierclusterError(f"config section quant: {exc}") from None
    if not points:
        raise HierclusterError(
            "config section quant: the grid is empty (check quant.bits, quant.schemes, plan and method filters)"
        )
    return points


def calibration_settings(cfg: RunConfig) -> dict[str, Any]:
    """The settings of section ``calibration`` that change which images are used."""
    c = cfg.calibration
    return {"split": c.split, "samples": c.samples, "batch_size": c.batch_size, "seed": c.seed}


def _has_split(dataset: str, root: Path | None, split: str) -> bool:
    """Whether ``split`` exists as its own data (an image folder without ``train/`` has no training split)."""
    if dataset != "imagefolder" or root is None:
        return True  # the other datasets always come in both splits (a missing file is load_dataset's error)
    subdirs = ["train"] if split == "train" else ["val", "test"]
    return any((Path(root) / s).is_dir() for s in subdirs)


def calibration_batches(dataset: Any, indices: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The images of ``dataset`` at ``indices``, in that order, as batches of ``batch_size`` (labels dropped).

    Examples
    --------
    >>> ds = load_dataset("digits", split="train")
    >>> [tuple(b.shape) for b in calibration_batches(ds, torch.arange(5), 2)]
    [(2, 1, 8, 8), (2, 1, 8, 8), (1, 1, 8, 8)]
    """
    out = []
    for chunk in indices.split(batch_size):
        if hasattr(dataset, "batch"):  # in-memory sets slice many images at once
            out.append(dataset.batch(chunk)[0])
        else:
            out.append(torch.stack([dataset[int(i)][0] for i in chunk]))
    return out


def load_calibration(cfg: RunConfig, needed_by: str) -> list[torch.Tensor]:
    """The calibration set of ``cfg.calibration``: ``samples`` images of ``split``, fixed by ``seed``.

    No augmentation (``load_dataset``'s evaluation transform); ``needed_by`` names what
    needs the data, for the error when the dataset has no such split.
    """
    c = cfg.calibration
    root = data_root(cfg)
    where = f"config key calibration.split is {short_repr(c.split)}"
    if not _has_split(cfg.data.dataset, root, c.split):
        raise HierclusterError(
            f"{needed_by} needs calibration data, but dataset {cfg.data.dataset} at {root} has no {short_repr(c.split)} split "
            f"({where}; an image folder needs {'train/' if c.split == 'train' else 'val/ or test/'})"
        )
    try:
        dataset = load_dataset(cfg.data.dataset, root, c.split, cfg.data.download, options=data_options(cfg))
    except HierclusterError as exc:
        first = str(exc).strip().splitlines()[0]
        raise HierclusterError(f"{needed_by} needs calibration data ({where}): {first}") from None
    n = len(dataset)
    if c.samples > n:
        raise HierclusterError(
            f"config key calibration.samples is {c.samples}, more than the {n} images of the {short_repr(c.split)} split "
            f"of {cfg.data.dataset}; use at most {n}"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(c.seed))[: c.samples]
    return calibration_batches(dataset, order, c.batch_size)


@dataclass
class Prepared:
    """What every spec of a run shares: the float model, data, float logits and levels."""

    cfg: RunConfig
    out_dir: Path
    model: nn.Module
    checkpoint_digest: str
    class_names: list[str]
    eval_set: Any
    labels: torch.Tensor | None  # None until evaluate_float (``hiercluster hierarchy`` never needs them)
    float_logits: torch.Tensor | None
    hierarchy: ClassHierarchy
    levels: dict[str, tuple[int, np.ndarray, str]] = field(default_factory=dict)
    reference_groups: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    calibration: list[torch.Tensor] | None = None
    packed_cache: Path | None = None
    data_options: FolderOptions | None = None  # an image folder's size, channels, normalization, resizing
    data_limit: dict[str, int] | None = None  # {"limit": n, "of": N} when data.limit evaluates a subset

    def loader(self) -> Any:
        """Batches of the evaluation set (scoring only: nothing is ever fitted on it)."""
        return make_loader(self.eval_set, self.cfg.data.batch_size, num_workers=self.cfg.data.workers)

    def evaluate_float(self, progress: bool = True, write_cache: bool = False) -> None:
        """Set ``float_logits`` and ``labels``: from the run directory's cache when it matches, else computed.

        ``write_cache``: save computed logits there (``run`` only; see :func:`prepare`).
        """
        t0 = time.perf_counter()
        cfg = self.cfg
        cache = self.out_dir / LOGITS_FILE
        cache_id = _cache_id(cfg, len(self.eval_set), self.checkpoint_digest, self.data_options)
        found = read_logits_cache(cache, cache_id, len(self.eval_set), len(self.class_names))
        self.timings["float_logits_cached"] = found is not None
        if found is None:
            loader = make_loader(self.eval_set, cfg.data.batch_size, num_workers=cfg.data.workers)
            found = collect_logits(self.model, loader, progress=progress, desc="float model")
            if write_cache:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                save_torch_atomic(cache, {"id": cache_id, "logits": found[0], "labels": found[1]})
        self.float_logits, self.labels = found
        self.timings["float_eval_s"] = time.perf_counter() - t0

    def calibration_batches(self, needed_by: str) -> list[torch.Tensor]:
        """The run's calibration batches, loaded on first use and kept."""
        if self.calibration is None:
            t0 = time.perf_counter()
            self.calibration = load_calibration(self.cfg, needed_by)
            self.timings["calibration_load_s"] = time.perf_counter() - t0
        return self.calibration


def load_float_model(cfg: RunConfig, class_names: list[str], in_channels: int) -> tuple[nn.Module, Path]:
    """The float model of ``cfg.model``: rebuilt from the checkpoint's metadata, or ``arch`` + weights."""
    if not cfg.model.checkpoint:
        raise HierclusterError("config key model.checkpoint is required: the trained float model to quantize")
    path = resolve_path(cfg.model.checkpoint, cfg.source)
    if not path.is_file():
        raise HierclusterError(f"config key model.checkpoint: file not found: {path}")
    if metadata_path(path).is_file():
        meta = read_metadata(path)
        if cfg.model.arch and meta["arch"] != cfg.model.arch:
            raise HierclusterError(
                f"config key model.arch is {short_repr(cfg.model.arch)} but {path} holds a {short_repr(meta['arch'])}; "
                "fix or remove model.arch"
            )
        check_fits_data(meta, path, cfg.data.dataset, class_names, in_channels)
        model, _ = load_checkpoint(path)
    elif cfg.model.arch:
        model = build_model(cfg.model.arch, len(class_names), in_channels, weights=path, width=cfg.model.width)
    else:
        raise HierclusterError(
            f"config key model.arch is required: {path} has no metadata file {metadata_path(path).name} beside it"
        )
    n_out = classifier_layer(model)[1].out_features
    if n_out != len(class_names):
        raise HierclusterError(
            f"model {path} has {n_out} outputs but config key data.dataset has {len(class_names)} classes"
        )
    return model.eval(), path


def _levels(
    cfg: RunConfig, hierarchy: ClassHierarchy, class_names: list[str], reference: dict[str, Any] | None
) -> dict[str, tuple[int, np.ndarray, str]]:
    c = len(class_names)
    ks = list(cfg.hierarchy.levels) or list(range(c, 1, -1))  # checked against c by _check_level_ks
    levels = {f"k={k}": (k, hierarchy.cut(k=k), "learned") for k in sorted(set(ks), reverse=True)}
    if reference is not None:
        ref = as_assignment(reference, class_names)
        levels["reference"] = (int(ref.max()) + 1, ref, "reference")
    return levels


DATASET_COARSE = "dataset:coarse"


def _read_grouping(value: str, cfg: RunConfig, key: str, dataset: Any = None) -> dict[str, Any]:
    """A ``{superclass: [class names]}`` grouping from a YAML file, or the dataset's coarse labels.

    ``dataset``: the evaluation set when the caller already holds it (``dataset:coarse``).
    """
    if value == DATASET_COARSE:
        if dataset is None:
            dataset = load_dataset(cfg.data.dataset, data_root(cfg), cfg.data.eval_split, cfg.data.download)
        if "coarse_targets" not in getattr(dataset, "extras", {}):
            raise HierclusterError(f"config key {key}: {DATASET_COARSE} needs a dataset with coarse labels (cifar100)")
        return cifar100_coarse_groups(dataset)
    path = resolve_path(value, cfg.source)
    if not path.is_file():
        raise HierclusterError(f"config key {key}: file not found: {path}")
    groups = read_yaml(path)
    if not isinstance(groups, dict):
        raise HierclusterError(f"config key {key}: {path} must map superclass names to lists of class names")
    return groups


def prepare(
    cfg: RunConfig,
    out_dir: Path,
    progress: bool = True,
    calibration_for: str | None = None,
    grid: Sequence[GridPoint] = (),
    float_logits: bool = True,
    write_cache: bool = False,
) -> Prepared:
    """Load the model and data, build the hierarchy and its levels, then get the float logits.

    Everything that can refuse the config comes before the float evaluation: the
    ``grid``'s plans against the model's layers (:func:`check_plans_fit`), the levels
    against the class count, the reference grouping, ``hierarchy.names``, and, with
    ``calibration_for`` (what needs it, e.g. ``"method 'gptq'"``), the calibration set.

    Parameters
    ----------
    float_logits : bool
        Evaluate the float model (or read its cached logits). ``hiercluster hierarchy``
        needs no logits: then ``labels`` and ``float_logits`` stay None.
    write_cache : bool
        Save freshly computed float logits as the run directory's cache. Only ``run``
        does: ``evaluate`` reads a cache that matches its model and data but never
        writes one, so that no other command (refused or not) changes a run's files.
    """
    t0 = time.perf_counter()
    root = data_root(cfg)
    options = data_options(cfg)
    full_set = load_dataset(cfg.data.dataset, root, cfg.data.eval_split, cfg.data.download, options=options)
    eval_set, data_limit = full_set, None
    if cfg.data.limit is not None:
        where = f"the {cfg.data.eval_split} split of {cfg.data.dataset}"
        eval_set = limit_dataset(full_set, cfg.data.limit, where)
        data_limit = {"limit": cfg.data.limit, "of": len(full_set)}
    class_names = list(eval_set.classes)
    model, ckpt = load_float_model(cfg, class_names, int(dataset_info(eval_set)["in_channels"]))
    check_plans_fit(model, grid, cfg.model.checkpoint)
    _check_level_ks(cfg, len(class_names))
    reference = (
        _read_grouping(cfg.hierarchy.reference, cfg, "hierarchy.reference", full_set) if cfg.hierarchy.reference else None
    )
    if reference is not None:
        as_assignment(reference, class_names)  # an unknown or missing class is refused now, not after the hierarchy
    digest = file_digest(ckpt)
    timings = {"load_s": time.perf_counter() - t0}
    calibration = None
    if calibration_for is not None:
        t0 = time.perf_counter()
        calibration = load_calibration(cfg, calibration_for)
        timings["calibration_load_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    hierarchy = _build_hierarchy(cfg, model, class_names, root)
    levels = _levels(cfg, hierarchy, class_names, reference)
    timings["hierarchy_s"] = time.perf_counter() - t0
    prep = Prepared(
        cfg, out_dir, model, digest, class_names, eval_set, None, None, hierarchy, levels, reference, timings, calibration,
        data_options=options, data_limit=data_limit,
    )
    if float_logits:
        prep.evaluate_float(progress=progress, write_cache=write_cache)
    return prep


def _check_level_ks(cfg: RunConfig, n_classes: int) -> None:
    """Every ``hierarchy.levels`` k is a possible number of groups of ``n_classes`` classes."""
    for k in cfg.hierarchy.levels:
        if not 1 <= k <= n_classes:
            raise HierclusterError(
                f"config key hierarchy.levels: k={k} is outside 1..{n_classes} (the number of classes)"
            )


def _cache_id(cfg: RunConfig, n: int, digest: str, options: FolderOptions | None = None) -> str:
    """What the float logits depend on: the cache is used only when this matches."""
    data_id = {"dataset": cfg.data.dataset, "root": cfg.data.root, "split": cfg.data.eval_split, "n": n, "checkpoint": digest}
    return json.dumps({**data_id, **data_variant(cfg, options)}, sort_keys=True)


def data_variant(cfg: RunConfig, options: FolderOptions | None) -> dict[str, Any]:
    """What selects the evaluation images and their pixels besides dataset, root and split.

    Part of the logits cache's id and of every result's key, so that a limited run never
    reuses a full run's results (nor one of other image options); empty for a full run
    of a fixed dataset, whose ids stay what they were.
    """
    variant: dict[str, Any] = {}
    if cfg.data.limit is not None:
        variant["limit"] = cfg.data.limit
    if options is not None:
        variant["images"] = options.to_dict()
    return variant


def data_options(cfg: RunConfig, from_checkpoint: bool = True) -> FolderOptions | None:
    """How the config's image folder becomes model inputs (None for the other datasets, which refuse the keys).

    Config keys first, then the metadata of ``model.checkpoint`` (when ``from_checkpoint``
    and a metadata file is beside it), then ImageNet's defaults
    (:func:`hiercluster.data.resolve_folder_options`). ``train`` passes
    ``from_checkpoint=False``: the checkpoint it writes is not the data's description.
    """
    meta, meta_file = None, None
    if cfg.data.dataset == "imagefolder" and from_checkpoint and cfg.model.checkpoint:
        path = resolve_path(cfg.model.checkpoint, cfg.source)
        if path.is_file() and metadata_path(path).is_file():
            meta, meta_file = read_metadata(path), metadata_path(path)
    return resolve_folder_options(cfg.data.dataset, cfg.data, meta, meta_file)


def read_logits_cache(path: Path, cache_id: str, n: int, n_classes: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(logits, labels)`` from a run directory's cache when it matches ``cache_id`` and its shapes; else None.

    A stale, damaged or hand-made cache is recomputed, never trusted.
    """
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # any unreadable file: torch raises many kinds
        return None
    if not isinstance(saved, dict) or saved.get("id") != cache_id:
        return None
    logits, labels = saved.get("logits"), saved.get("labels")
    if not (isinstance(logits, torch.Tensor) and isinstance(labels, torch.Tensor)):
        return None
    if logits.shape != (n, n_classes) or labels.shape != (n,) or not logits.is_floating_point():
        return None
    if labels.dtype != torch.int64 or (n and not 0 <= int(labels.min()) <= int(labels.max()) < n_classes):
        return None
    return logits, labels


def check_plans_fit(model: nn.Module, grid: Sequence[GridPoint], model_name: str | None = None) -> None:
    """Refuse a plan of the grid that leaves every layer of ``model`` float, before any work on it.

    Such a plan quantizes nothing (``quant.quantize_model`` refuses it), and finding that
    out after the float evaluation, halfway through a sweep, wastes the run. A plan's
    ``skip`` patterns decide alone which layers stay float (:meth:`quant.QuantPlan.rule_for`).
    """
    from quant.model import quantizable_layers

    names = [name for name, _ in quantizable_layers(model)]
    what = f"model {model_name}" if model_name else f"the {type(model).__name__} model"
    if grid and not names:
        raise HierclusterError(f"{what} has no Conv or Linear layer to quantize")
    for plan in dict.fromkeys(p.plan for p in grid):
        if all(plan.is_skipped(name) for name in names):
            raise HierclusterError(
                f"config key quant.plans: plan {short_repr(plan.name)} leaves every layer of {what} float (skip patterns "
                f"{short_repr(list(plan.skip))} match all {len(names)} of its layers): nothing to quantize; "
                "narrow its skip patterns or remove the plan"
            )


def _build_hierarchy(cfg: RunConfig, model: nn.Module, class_names: list[str], root: Path | None) -> ClassHierarchy:
    h = cfg.hierarchy
    loader = None
    if h.embedding != "fc_weights":
        split_set = load_dataset(cfg.data.dataset, root, h.split, cfg.data.download, options=data_options(cfg))
        loader = make_loader(split_set, cfg.data.batch_size, num_workers=cfg.data.workers)
    try:
        return build_hierarchy(model, h.embedding, loader, class_names, linkage=h.linkage, metric=h.metric, names=h.names)
    except HierclusterError as exc:
        raise HierclusterError(f"config section hierarchy: {exc}") from None


def code_version() -> dict[str, Any]:
    """The versions of the code that computes a result: part of every resume key."""
    import hiercluster

    return {
        "schema": SCHEMA_VERSION,
        "hiercluster": hiercluster.__version__,
        # quant ships in the hiercluster distribution; it has a version of its own only if it declares one
        "quant": getattr(quant, "__version__", hiercluster.__version__),
        "torch": torch.__version__,
    }


def _grid_key(point: GridPoint, prep: Prepared) -> str:
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
            "levels": {name: a.tolist() for name, (_, a, _) in prep.levels.items()},
            "version": code_version(),
        }
    )


def _data_key(prep: Prepared) -> list[Any]:
    """The evaluation data in a result's key; a limited or image-folder run adds its :func:`data_variant`."""
    cfg = prep.cfg
    key: list[Any] = [cfg.data.dataset, cfg.data.root, cfg.data.eval_split, len(prep.labels)]
    variant = data_variant(cfg, prep.data_options)
    return key + [variant] if variant else key


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


def level_metrics(prep: Prepared, quant_logits: torch.Tensor) -> list[dict[str, Any]]:
    """Every level's metrics for one quantized model, from kept logits.

    The learned levels (distinct k) go through one vectorized :func:`evaluate_levels`
    call; the reference grouping, whose k may equal a learned level's, through another.
    """
    cfg = prep.cfg
    rows: dict[str, dict[str, Any]] = {}
    for kind in ("learned", "reference"):
        names = [name for name, (_, _, level_kind) in prep.levels.items() if level_kind == kind]
        if not names:
            continue
        results = evaluate_levels(
            prep.float_logits,
            quant_logits,
            prep.labels,
            {prep.levels[name][0]: prep.levels[name][1] for name in names},
            n_random=cfg.eval.random_seeds,
            seed=cfg.eval.seed,
            reduction=cfg.eval.reduction,
        )
        for name, row in zip(names, results):
            rows[name] = {**row, "level": name, "grouping": kind}
    return [rows[name] for name in prep.levels]


def evaluate_point(point: GridPoint, prep: Prepared, key: str) -> dict[str, Any]:
    """Quantize, run once, compute every level's metrics and the sizes; returns what the store needs.

    With ``prep.packed_cache`` set, a calibrated model is also saved there bit-packed
    (``KEY.hcq``), so that exporting it later does not fit it again.
    """
    t0 = time.perf_counter()
    qmodel, qreport = quantize_point(prep.model, point, prep)
    if prep.packed_cache is not None and point.needs_calibration:
        prep.packed_cache.mkdir(parents=True, exist_ok=True)
        quant.save_packed(prep.packed_cache / f"{key}.hcq", qmodel, qreport, overwrite=True)
    t1 = time.perf_counter()
    qlogits, _ = collect_logits(qmodel, prep.loader())
    t2 = time.perf_counter()
    level_rows = level_metrics(prep, qlogits)
    share = prediction_share(qlogits, len(prep.class_names))
    t3 = time.perf_counter()
    sizes = quant.model_size(qmodel, qreport)
    t4 = time.perf_counter()
    spec_row = {
        "spec_key": key,
        "tag": point.tag,
        "scheme": point.spec.scheme,
        "bits": point.spec.bits,
        "clipping": point.spec.clipping,
        "granularity": point.spec.granularity,
        "plan": point.plan.name,
        "method": point.method,
        "bn_reestimate": int(point.bn_reestimate),
        "activation_bits": point.activation.bits if point.activation else None,
        "avg_bits": qreport.avg_bits,
        "fine_acc": accuracy(qlogits, prep.labels),
        **{k: sizes[k] for k in ("fp32_bytes", "packed_bytes", "gzip_bytes", "xz_bytes")},
        "quantize_s": t1 - t0,
        "eval_s": t2 - t1,
        "metrics_s": t3 - t2,
        "size_s": t4 - t3,
    }
    return {
        "spec_row": spec_row,
        "level_rows": level_rows,
        "spec_json": point.spec.to_dict(),
        "plan_json": point.plan.to_dict(),
        "prediction_share": share.tolist(),
        "layers": qreport.rows(),
    }


def run_pipeline(
    cfg: RunConfig, out_dir: str | Path, progress: bool = True, force: bool = False, command: str | None = None
) -> dict[str, Any]:
    """``hiercluster run``: the whole sweep into ``out_dir``; returns the run summary.

    Re-running on the same ``out_dir`` skips the specs already in its results store. A
    directory that holds a run of another grid is refused unless ``force``. The
    directory is locked for the whole run (``command`` is what a second command is told
    holds it); paths and the config are checked before anything is written.
    """
    out_dir = Path(out_dir)
    check_run_dir(out_dir)
    grid = expand_grid(cfg)
    with RunLock(out_dir, command or " ".join(["hiercluster run", cfg.source or ""]).strip()):
        check_same_grid(cfg, [p.tag for p in grid], out_dir, _recorded_checkpoint_digest(cfg, out_dir), force)
        check_database(out_dir / DB_FILE)  # a damaged database is refused before the run rewrites its records
        return _sweep(cfg, grid, out_dir, progress)


def _recorded_checkpoint_digest(cfg: RunConfig, out_dir: Path) -> str | None:
    """The digest of the config's checkpoint, only when ``out_dir`` holds a run to compare it with."""
    if not (out_dir / RUN_FILE).is_file() or not cfg.model.checkpoint:
        return None
    path = resolve_path(cfg.model.checkpoint, cfg.source)
    return file_digest(path) if path.is_file() else None  # a missing file is prepare's error


def _sweep(cfg: RunConfig, grid: list[GridPoint], out_dir: Path, progress: bool) -> dict[str, Any]:
    """The run itself, in a locked and checked run directory."""
    from hiercluster.report import export_models, headline, write_report

    start = time.perf_counter()
    user = next((p.calibration_user for p in grid if p.needs_calibration), None)
    prep = prepare(cfg, out_dir, progress=progress, calibration_for=user, grid=grid, write_cache=True)
    if cfg.output.export_models:
        prep.packed_cache = out_dir / PACKED_CACHE_DIR
    save_config(cfg, out_dir / CONFIG_FILE)
    write_hierarchy_files(prep, out_dir)
    keys = [_grid_key(p, prep) for p in grid]
    run_info = _run_info(prep, grid, keys)
    write_json(out_dir / RUN_FILE, run_info)

    with ResultsStore(out_dir / DB_FILE) as store:
        done = store.done_keys()
        todo = [(p, k) for p, k in zip(grid, keys) if k not in done]
        from tqdm.auto import tqdm

        bar = tqdm(total=len(grid), initial=len(grid) - len(todo), desc="quant specs", unit="spec", disable=not progress)
        for point, key in todo:
            interrupt.check()  # Ctrl-C between specs: the finished ones are all in the store
            bar.set_postfix_str(point.tag)
            result = evaluate_point(point, prep, key)
            store.add_spec(**result)
            bar.update(1)
        bar.close()
        sweep_s = time.perf_counter() - start
        rows = store.results(keys, complete=True)
        store.export_csv(out_dir / CSV_FILE, keys)
    run_info["timings"] = {**prep.timings, "sweep_s": sweep_s, "specs_run": len(todo), "specs_total": len(grid)}
    write_json(out_dir / RUN_FILE, run_info)
    if cfg.output.export_models:
        export_models(prep, grid, keys, rows, out_dir)
    report = write_report(out_dir)
    run_info["timings"]["total_s"] = time.perf_counter() - start
    write_json(out_dir / RUN_FILE, run_info)
    return {"run_dir": str(out_dir), "report": str(report), "headline": headline(rows, cfg.eval.tolerance), **run_info}


def write_hierarchy_files(prep: Prepared, out_dir: Path) -> None:
    """hierarchy.json, one YAML per reported level, and the dendrogram."""
    from hiercluster.plots import plot_dendrogram

    out_dir.mkdir(parents=True, exist_ok=True)
    prep.hierarchy.to_json(out_dir / HIERARCHY_FILE)
    level_dir = out_dir / "levels"
    level_dir.mkdir(exist_ok=True)
    for name, (k, _, kind) in prep.levels.items():
        if kind == "learned":
            prep.hierarchy.to_yaml(level_dir / f"k{k}.yaml", k)
    plot_dendrogram(prep.hierarchy, out_dir / "dendrogram.png")


def _run_info(prep: Prepared, grid: list[GridPoint], keys: list[str]) -> dict[str, Any]:
    cfg = prep.cfg
    info: dict[str, Any] = {
        "dataset": cfg.data.dataset,
        "eval_split": cfg.data.eval_split,
        "n_eval": len(prep.labels),
        "checkpoint": cfg.model.checkpoint,
        "checkpoint_sha256": prep.checkpoint_digest,
        "class_names": prep.class_names,
        "float_accuracy": accuracy(prep.float_logits, prep.labels),
        "float_prediction_share": prediction_share(prep.float_logits, len(prep.class_names)).tolist(),
        "reduction": cfg.eval.reduction,
        "random_seeds": cfg.eval.random_seeds,
        "tolerance": cfg.eval.tolerance,
        "hierarchy": {
            "embedding": cfg.hierarchy.embedding,
            "linkage": prep.hierarchy.linkage,
            "metric": prep.hierarchy.metric,
        },
        "levels": {
            name: {"k": k, "kind": kind, "assignment": a.tolist(), "names": level_names(prep, name)}
            for name, (k, a, kind) in prep.levels.items()
        },
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
        info["reference_file"] = cfg.hierarchy.reference
    return info


def level_names(prep: Prepared, name: str) -> list[str]:
    """Superclass names of a reported level, in group-id order."""
    k, _, kind = prep.levels[name]
    if kind == "learned":
        return list(prep.hierarchy.superclass_names(k))
    return list(group_names(prep.reference_groups, prep.class_names))
