"""What every spec of a run shares: the float model, evaluation data and logits, calibration images, levels."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from hiercluster.data.datasets import (
    FolderOptions,
    cifar100_coarse_groups,
    dataset_info,
    has_split,
    limit_dataset,
    load_dataset,
    make_loader,
    resolve_folder_options,
)
from hiercluster.errors import HierclusterError, short_repr
from hiercluster.evaluation.inference import collect_logits
from hiercluster.hierarchy.clustering import ClassHierarchy
from hiercluster.hierarchy.groupings import as_assignment
from hiercluster.models.device import resolve_device
from hiercluster.models.zoo import (
    build_model,
    check_fits_data,
    classifier_layer,
    load_checkpoint,
    metadata_path,
    read_metadata,
)
from hiercluster.run.config import RunConfig, data_root, resolve_path
from hiercluster.run.grid import GridPoint, check_plans_fit
from hiercluster.run.records import Level
from hiercluster.run.rundir import HOLDOUT_LOGITS_FILE, LOGITS_FILE, read_cache
from hiercluster.run.store import file_digest
from hiercluster.run.trees import HOLDOUT_SEED, build_trees, split_for_trees, tree_levels
from hiercluster.yamlio import read_yaml
from quant._files import save_torch_atomic


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
    if not has_split(cfg.data.dataset, root, c.split):
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


def run_loader(cfg: RunConfig, dataset: Any) -> Any:
    """Batches of ``dataset`` as a run reads them: ``data.batch_size``, ``runtime.workers``, in order."""
    return make_loader(dataset, cfg.data.batch_size, num_workers=cfg.runtime.workers)


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
    hierarchy: ClassHierarchy  # the first tree of hierarchy.embedding (hierarchy.json, the dendrogram)
    levels: dict[str, Level] = field(default_factory=dict)
    reference_groups: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    calibration: list[torch.Tensor] | None = None
    data_options: FolderOptions | None = None  # an image folder's size, channels, normalization, resizing
    data_limit: dict[str, int] | None = None  # {"limit": n, "of": N} when data.limit evaluates a subset
    # Where ``model`` (and every quantized copy of it) runs: runtime.device resolved. Batches stay
    # on the CPU until quant.device.to_device moves them; logits come back to the CPU.
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    trees: dict[str, ClassHierarchy] = field(default_factory=dict)  # every tree of hierarchy.embedding, in order
    # select: auto's held-out images of hierarchy.split (never of the evaluation split), their labels and the
    # float model's logits on them (set by evaluate_float); None when the run does not choose a tree.
    holdout_set: Any = None
    holdout_labels: torch.Tensor | None = None
    holdout_logits: torch.Tensor | None = None

    def loader(self) -> Any:
        """Batches of the evaluation set (scoring only: nothing is ever fitted on it)."""
        return run_loader(self.cfg, self.eval_set)

    def evaluate_float(self, progress: bool = True, write_cache: bool = False) -> None:
        """Set ``float_logits`` and ``labels``: from the run directory's cache when it matches, else computed.

        ``write_cache``: save computed logits there (``run`` only; see :func:`prepare`).
        """
        t0 = time.perf_counter()
        cfg = self.cfg
        cache = self.out_dir / LOGITS_FILE
        cache_id = _cache_id(cfg, len(self.eval_set), self.checkpoint_digest, self.data_options, self.device)
        found = read_logits_cache(cache, cache_id, len(self.eval_set), len(self.class_names))
        self.timings["float_logits_cached"] = found is not None
        if found is None:
            loader = self.loader()
            found = collect_logits(self.model, loader, progress=progress, desc="float model")
            if write_cache:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                save_torch_atomic(cache, {"id": cache_id, "logits": found[0], "labels": found[1]})
        self.float_logits, self.labels = found
        if self.holdout_set is not None:
            self.holdout_logits, self.holdout_labels = self._float_logits_of(
                self.holdout_set, HOLDOUT_LOGITS_FILE, "held-out", progress, write_cache
            )
        self.timings["float_eval_s"] = time.perf_counter() - t0

    def _float_logits_of(
        self, dataset: Any, file: str, what: str, progress: bool, write_cache: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The float model's logits and labels on the held-out images: cached like the evaluation set's."""
        cfg = self.cfg
        h = cfg.hierarchy
        ident = {"split": h.split, "seed": HOLDOUT_SEED, "of": what}  # the count is in _cache_id's n
        cache_id = _cache_id(cfg, len(dataset), self.checkpoint_digest, self.data_options, self.device, ident)
        found = read_logits_cache(self.out_dir / file, cache_id, len(dataset), len(self.class_names))
        if found is None:
            found = collect_logits(self.model, run_loader(cfg, dataset), progress=progress, desc=f"float model ({what})")
            if write_cache:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                save_torch_atomic(self.out_dir / file, {"id": cache_id, "logits": found[0], "labels": found[1]})
        return found

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


# Up to this many classes, ``hierarchy.levels: []`` evaluates every k from C down to 2; above
# it, DEFAULT_LEVEL_COUNT log-spaced k (every k of 1,000 classes is 999 levels: hours of
# metrics per spec, and reports nobody can read).
ALL_LEVELS_MAX_CLASSES = 20
DEFAULT_LEVEL_COUNT = 10


def default_level_ks(n_classes: int) -> list[int]:
    """The k that ``hierarchy.levels: []`` evaluates, descending.

    Every k from ``n_classes`` down to 2 for up to 20 classes; above that, about 10
    log-spaced k from ``n_classes`` down to 2, both included.

    Examples
    --------
    >>> default_level_ks(5)
    [5, 4, 3, 2]
    >>> default_level_ks(1000)
    [1000, 501, 251, 126, 63, 32, 16, 8, 4, 2]
    """
    if n_classes <= ALL_LEVELS_MAX_CLASSES:
        return list(range(n_classes, 1, -1))
    ks = np.rint(np.geomspace(n_classes, 2, DEFAULT_LEVEL_COUNT)).astype(np.int64)
    return sorted({int(k) for k in ks} | {n_classes, 2}, reverse=True)


def _levels(
    cfg: RunConfig, trees: dict[str, ClassHierarchy], class_names: list[str], reference: dict[str, Any] | None
) -> dict[str, Level]:
    ks = list(cfg.hierarchy.levels) or default_level_ks(len(class_names))  # checked by _check_level_ks
    return tree_levels(ks, trees, class_names, reference)


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
    device = resolve_device(cfg.runtime.device)  # a device this machine lacks is refused before any data loads
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
    model = model.to(device)  # once: the hierarchy's, the float and every quantized model's passes run there
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
    split = split_for_trees(cfg, root, options)
    trees = build_trees(
        cfg, model, class_names, split, lambda dataset: run_loader(cfg, dataset), out_dir, digest, options, device,
        write_cache=write_cache, progress=progress,
    )
    levels = _levels(cfg, trees, class_names, reference)
    timings["hierarchy_s"] = time.perf_counter() - t0
    prep = Prepared(
        cfg, out_dir, model, digest, class_names, eval_set, None, None, next(iter(trees.values())), levels, reference,
        timings, calibration, data_options=options, data_limit=data_limit, device=device, trees=trees,
        holdout_set=split.holdout if split is not None else None,
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


def data_identity(cfg: RunConfig, n: int, options: FolderOptions | None) -> dict[str, Any]:
    """What selects the evaluation images: dataset, root (resolved), split, count and :func:`data_variant`.

    The root is resolved like every config path, so the same folder written as a relative
    or an absolute path is the same data.
    """
    root = str(resolve_path(cfg.data.root, cfg.source)) if cfg.data.root else None
    return {"dataset": cfg.data.dataset, "root": root, "split": cfg.data.eval_split, "n": n, **data_variant(cfg, options)}


def _cache_id(
    cfg: RunConfig, n: int, digest: str, options: FolderOptions | None, device: torch.device,
    subset_of: dict[str, Any] | None = None,
) -> str:
    """What the float logits depend on: the cache is used only when this matches.

    The device type and the code are part of it, as of every result's key: float logits of
    one device type or of other code are never compared with another's quantized logits.
    ``subset_of``: which images they are when not the evaluation set (the held-out ones).
    """
    from hiercluster.run.versions import code_version

    ident = {**data_identity(cfg, n, options), "checkpoint": digest, "device": device.type, "code": code_version()}
    if subset_of is not None:
        ident["subset_of"] = subset_of
    return json.dumps(ident, sort_keys=True)


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
    (:func:`hiercluster.data.datasets.resolve_folder_options`). ``train`` passes
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
    saved = read_cache(path, cache_id)
    if saved is None:
        return None
    logits, labels = saved.get("logits"), saved.get("labels")
    if not (isinstance(logits, torch.Tensor) and isinstance(labels, torch.Tensor)):
        return None
    if logits.shape != (n, n_classes) or labels.shape != (n,) or not logits.is_floating_point():
        return None
    if labels.dtype != torch.int64 or (n and not 0 <= int(labels.min()) <= int(labels.max()) < n_classes):
        return None
    return logits, labels
