"""A run's class trees: one per ``hierarchy.embedding``, the held-out images that choose between them, their levels.

The data-based trees (``centroids``, ``confusion``) are fitted on ``hierarchy.split``
(the training split; the config refuses the evaluation split). When the run chooses a
tree per k (``hierarchy.select: auto`` with several trees), a fixed, stratified subset of
``hierarchy.holdout`` images of that split is held out first: the trees never see it,
and the choice is scored on it (:func:`hiercluster.evaluation.selection.choose_trees`).
A data-based tree's class embedding is cached in the run directory (``trees/NAME.pt``),
like the float logits, under an id of everything it depends on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from hiercluster.data.datasets import FolderOptions, has_split, load_dataset, stratified_indices, subset
from hiercluster.errors import HierclusterError, short_repr
from hiercluster.hierarchy.clustering import ClassHierarchy, hierarchy_from_embedding
from hiercluster.hierarchy.embeddings import class_embeddings
from hiercluster.hierarchy.groupings import as_assignment, group_names
from hiercluster.run.config import DATA_EMBEDDINGS, RunConfig
from hiercluster.run.records import Level, level_name
from hiercluster.run.rundir import read_cache, tree_cache_path
from quant._files import save_torch_atomic

# hierarchy.holdout: null holds out this many images, or a fifth of the split when that is fewer.
DEFAULT_HOLDOUT = 5000

# Which images of hierarchy.split are held out: stratified_indices' permutation seed. Fixed, so
# that every run of a config holds out the same images (a run's trees and choice are reproducible).
HOLDOUT_SEED = 0x401D


@dataclass(frozen=True)
class TreeSplit:
    """``hierarchy.split`` divided: the images the data-based trees are fitted on, and those held out."""

    fit: Any
    holdout: Any | None
    n_split: int


def split_for_trees(cfg: RunConfig, root: Path | None, options: FolderOptions | None) -> TreeSplit | None:
    """The fitting and held-out parts of ``hierarchy.split``; None when no tree and no choice needs images."""
    h = cfg.hierarchy
    if not h.selects_on_holdout and not any(e in DATA_EMBEDDINGS for e in h.embedding):
        return None
    if not has_split(cfg.data.dataset, root, h.split):
        needs = next((e for e in h.embedding if e in DATA_EMBEDDINGS), "select: auto")
        raise HierclusterError(
            f"config key hierarchy.embedding lists {needs}, which is fitted on the {short_repr(h.split)} split "
            f"(hierarchy.split), but the image folder {root} has no {'train/' if h.split == 'train' else 'val/ or test/'} "
            "folder; add one, or set hierarchy.embedding: fc_weights (no data needed)"
        )
    split_set = load_dataset(cfg.data.dataset, root, h.split, cfg.data.download, options=options)
    n = len(split_set)
    if not h.selects_on_holdout:
        return TreeSplit(split_set, None, n)
    n_held = holdout_size(h.holdout, n)
    if n_held >= n or n_held < 1:
        raise HierclusterError(
            f"config key hierarchy.holdout is {n_held:,}, but the {h.split} split of {cfg.data.dataset} has "
            f"{n:,} images and the trees need some of them; use at most {max(n // 5, 1):,} (a fifth of the split)"
        )
    held = stratified_indices(split_set.targets, n_held, seed=HOLDOUT_SEED)
    rest = np.setdiff1d(np.arange(n), held)
    return TreeSplit(subset(split_set, rest), subset(split_set, held), n)


def holdout_size(holdout: int | None, n_split: int) -> int:
    """How many of ``n_split`` images ``hierarchy.holdout`` holds out (null: 5,000 or a fifth, whichever is fewer).

    Examples
    --------
    >>> holdout_size(None, 60_000), holdout_size(None, 1_347), holdout_size(300, 1_347)
    (5000, 269, 300)
    """
    return holdout if holdout is not None else min(DEFAULT_HOLDOUT, n_split // 5)


def _cache_id(cfg: RunConfig, embedding: str, split: TreeSplit, digest: str, options: Any, device: torch.device) -> str:
    """What a data-based embedding depends on: the cache is used only when this matches."""
    from hiercluster.run.versions import code_version

    h = cfg.hierarchy
    ident = {
        "embedding": embedding, "dataset": cfg.data.dataset, "root": str(cfg.data.root), "split": h.split,
        "n_split": split.n_split, "n_fit": len(split.fit), "holdout": len(split.holdout) if split.holdout is not None else 0,
        "holdout_seed": HOLDOUT_SEED, "images": options.to_dict() if options is not None else None,
        "checkpoint": digest, "device": device.type, "code": code_version(),
    }
    return json.dumps(ident, sort_keys=True)


def _read_embedding(path: Path, cache_id: str, n_classes: int) -> np.ndarray | None:
    """A cached embedding when its id matches and its shape fits; else None (recomputed, never trusted)."""
    saved = read_cache(path, cache_id)
    emb = saved.get("embedding") if saved is not None else None
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] != n_classes or not emb.is_floating_point():
        return None
    return emb.double().numpy()


def data_embedding(
    embedding: str, model: nn.Module, loader: Any, n_classes: int,
    cache: tuple[Path, str] | None = None, write_cache: bool = False,
) -> np.ndarray:
    """A data-based class embedding of ``loader``'s images: from ``cache`` (path, id) when it matches, else computed."""
    if cache is not None:
        found = _read_embedding(cache[0], cache[1], n_classes)
        if found is not None:
            return found
    emb = class_embeddings(model, embedding, loader)
    if cache is not None and write_cache:
        cache[0].parent.mkdir(parents=True, exist_ok=True)
        save_torch_atomic(cache[0], {"id": cache[1], "embedding": torch.from_numpy(np.ascontiguousarray(emb))})
    return emb


def build_trees(
    cfg: RunConfig, model: nn.Module, class_names: list[str], split: TreeSplit | None, make_loader: Any,
    out_dir: Path, digest: str, options: FolderOptions | None, device: torch.device, write_cache: bool = False,
    progress: bool = False,
) -> dict[str, ClassHierarchy]:
    """Every tree of ``hierarchy.embedding``, in that order (``make_loader(dataset)`` batches the fitting images).

    ``progress``: a bar over the fitting images of each data-based tree (a pass over most of
    the training split, minutes on a CPU).
    """
    h = cfg.hierarchy
    trees = {}
    for embedding in h.embedding:
        try:
            if embedding in DATA_EMBEDDINGS:
                assert split is not None  # split_for_trees loads it whenever a data-based tree is listed
                cache = (tree_cache_path(out_dir, embedding), _cache_id(cfg, embedding, split, digest, options, device))
                loader = make_loader(split.fit)
                if progress:
                    from tqdm.auto import tqdm

                    loader = tqdm(loader, desc=f"{embedding} tree ({len(split.fit):,} images)", unit="batch")
                emb = data_embedding(embedding, model, loader, len(class_names), cache, write_cache)
            else:
                emb = class_embeddings(model, embedding)
            trees[embedding] = hierarchy_from_embedding(emb, embedding, class_names, h.linkage, h.metric, h.names)
        except HierclusterError as exc:
            where = f"tree {embedding}: " if len(h.embedding) > 1 else ""
            raise HierclusterError(f"config section hierarchy: {where}{exc}") from None
    return trees


def tree_levels(
    ks: list[int], trees: Mapping[str, ClassHierarchy], class_names: list[str], reference: Mapping[str, Any] | None
) -> dict[str, Level]:
    """The reported levels: each tree's cut at each k (k descending, trees in order), then the reference.

    With several trees a cut is named after its tree (``"k=9 confusion"``), except the cuts
    every tree shares (one class per group, all in one), evaluated once as ``"k=C"``.
    """
    several = len(trees) > 1
    c = len(class_names)
    levels: dict[str, Level] = {}
    for k in sorted(set(ks), reverse=True):
        for tree_name, tree in trees.items():
            tree_label = tree_name if several and 1 < k < c else ""
            name = level_name(k, tree_label)
            if name not in levels:
                levels[name] = Level.of(name, tree.cut(k=k), tree.superclass_names(k), "learned", tree_label)
    if reference is not None:
        ref = as_assignment(reference, class_names)
        levels["reference"] = Level.of("reference", ref, group_names(reference, class_names), "reference")
    return levels


__all__ = ["DEFAULT_HOLDOUT", "HOLDOUT_SEED", "holdout_size", "TreeSplit", "build_trees", "data_embedding", "split_for_trees", "tree_levels"]
