"""Several trees in one run: held-out images from the training split choose between them, never the test labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hiercluster.cli import main
from hiercluster.data.datasets import ImageTensorDataset, load_dataset, stratified_indices
from hiercluster.errors import HierclusterError
from hiercluster.run import prepare as prepare_module
from hiercluster.run import trees as trees_module
from hiercluster.run.config import load_config
from hiercluster.run.prepare import prepare
from hiercluster.run.store import ResultsStore
from hiercluster.run.trees import HOLDOUT_SEED, split_for_trees

TREES = ["fc_weights", "confusion", "centroids"]
HOLDOUT = 300


@pytest.fixture(scope="module")
def checkpoint(trained_digits):
    return trained_digits


def _config_file(folder: Path, checkpoint: Path) -> Path:
    cfg = {
        "data": {"dataset": "digits", "batch_size": 128},
        "model": {"checkpoint": str(checkpoint)},
        "hierarchy": {"embedding": TREES, "levels": [10, 5, 3, 2], "holdout": HOLDOUT},
        "quant": {"schemes": ["asymmetric", "pow2"], "bits": [4, 3, 2], "clipping": ["minmax"]},
        "eval": {"random_seeds": 5, "bootstrap": 0},
        "output": {"export_models": False},
    }
    path = folder / "trees.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(config: Path, out: Path) -> dict:
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    return json.loads((out / "run.json").read_text())


def _by_tag(out: Path, info: dict, what: str) -> dict[str, object]:
    with ResultsStore(out / "results.sqlite") as store:
        rows = store.results([g["key"] for g in info["grid"]])
        if what == "holdout":
            return {g["tag"]: store.spec_details(g["key"])["holdout"] for g in info["grid"]}
    return {(r["tag"], r["level"]): r["acc_quant"] for r in rows}


def _shuffled_labels(real):
    """load_dataset whose evaluation split has its labels permuted across samples (images unchanged)."""

    def load(name, root=None, split="test", *args, **kwargs):
        ds = real(name, root, split, *args, **kwargs)
        if split != "test":
            return ds
        order = torch.from_numpy(np.random.default_rng(1).permutation(len(ds.targets)))
        return ImageTensorDataset(ds.images, ds.targets[order], ds.classes, ds.mean, ds.std, ds.name, ds.extras)

    return load


def test_swapping_the_evaluation_labels_changes_no_tree_choice(checkpoint, tmp_path, monkeypatch):
    config = _config_file(tmp_path, checkpoint)
    real = _run(config, tmp_path / "real")
    monkeypatch.setattr(prepare_module, "load_dataset", _shuffled_labels(prepare_module.load_dataset))
    swapped = _run(config, tmp_path / "swapped")

    # The swap reached the evaluation: its accuracies changed ...
    assert _by_tag(tmp_path / "real", real, "acc") != _by_tag(tmp_path / "swapped", swapped, "acc")
    assert abs(real["float_accuracy"] - swapped["float_accuracy"]) > 0.5
    # ... and nothing the choice reads did: the held-out drops of every spec, hence the choice, are the same.
    assert _by_tag(tmp_path / "real", real, "holdout") == _by_tag(tmp_path / "swapped", swapped, "holdout")
    assert real["tree_selection"] == swapped["tree_selection"]
    assert set(real["tree_selection"]["by_k"]) == {"5", "3", "2"}  # k=10 is every tree's, not a choice
    assert real["tree_selection"]["holdout"] == HOLDOUT


def test_the_choice_follows_the_stored_held_out_drops(checkpoint, tmp_path):
    """Recomputed by hand from the stored drops: fewest bits within tolerance, then the lowest drop, then list order."""
    out = tmp_path / "run"
    info = _run(_config_file(tmp_path, checkpoint), out)
    holdout = _by_tag(out, info, "holdout")
    bits = {g["tag"]: int(g["tag"].split("-")[1].rstrip("b")) for g in info["grid"]}
    for k_text, choice in info["tree_selection"]["by_k"].items():
        ranks = {}
        for tree in TREES:
            drops = {tag: holdout[tag][f"k={k_text} {tree}"] for tag in holdout}
            passing = [(bits[t], d) for t, d in drops.items() if d <= info["tolerance"]]
            ranks[tree] = min(passing) if passing else (np.inf, min(drops.values()))
        expected = min(TREES, key=lambda t: (*ranks[t], TREES.index(t)))
        assert choice["tree"] == expected, k_text


def test_the_report_shows_every_tree_and_the_choice(checkpoint, tmp_path):
    out = tmp_path / "run"
    info = _run(_config_file(tmp_path, checkpoint), out)
    text = (out / "report.md").read_text()
    assert "## Class trees: which one answers each level" in text
    for tree in TREES:
        assert f"{tree}: held-out bits / drop pp" in text
    for k, choice in info["tree_selection"]["by_k"].items():
        assert f"| {k} | `{choice['tree']}` |" in text
        assert f"**k={k} {choice['tree']}** (learned)" in text  # the chosen cut's superclasses
    # Every tree's levels are in the report: the chosen ones under "Hierarchy levels", the others listed apart.
    for name in info["levels"]:
        assert f"**{name}**" in text
    for tree in TREES[1:]:
        assert (out / "trees" / f"{tree}.json").is_file()


def test_data_based_trees_never_see_the_held_out_images(tmp_path, monkeypatch):
    cfg = load_config(None, ["data.dataset=digits", f"hierarchy.embedding={TREES}", f"hierarchy.holdout={HOLDOUT}"])
    full = load_dataset("digits", split="train")
    split = split_for_trees(cfg, None, None)
    held = stratified_indices(full.targets, HOLDOUT, seed=HOLDOUT_SEED)
    assert torch.equal(split.holdout.images, full.images[torch.from_numpy(held)])
    rest = np.setdiff1d(np.arange(len(full)), held)
    assert torch.equal(split.fit.images, full.images[torch.from_numpy(rest)])
    assert len(split.fit) + len(split.holdout) == len(full) == split.n_split


def test_a_data_based_tree_is_read_from_the_run_directory_cache(checkpoint, tmp_path, monkeypatch):
    cfg = load_config(None, ["data.dataset=digits", f"model.checkpoint={checkpoint}", f"hierarchy.embedding={TREES}",
                             f"hierarchy.holdout={HOLDOUT}"])
    first = prepare(cfg, tmp_path, progress=False, float_logits=False, write_cache=True)
    assert (tmp_path / "trees" / "confusion.pt").is_file() and (tmp_path / "trees" / "centroids.pt").is_file()
    calls = []
    real = trees_module.class_embeddings
    monkeypatch.setattr(trees_module, "class_embeddings", lambda model, method, loader=None: calls.append(method)
                        or real(model, method, loader))
    again = prepare(cfg, tmp_path, progress=False, float_logits=False)
    assert calls == ["fc_weights"]  # the data-based ones came from the cache
    for name in TREES:
        assert np.array_equal(again.trees[name].linkage_matrix_, first.trees[name].linkage_matrix_)
    # Another held-out count is another fitting set: the cache is not used.
    other = load_config(None, ["data.dataset=digits", f"model.checkpoint={checkpoint}", f"hierarchy.embedding={TREES}",
                               "hierarchy.holdout=200"])
    calls.clear()
    prepare(other, tmp_path, progress=False, float_logits=False)
    assert sorted(calls) == sorted(TREES)


def test_tree_choice_settings_are_checked():
    with pytest.raises(HierclusterError, match="hierarchy.select is 'centroids', not one of the trees"):
        load_config(None, ["hierarchy.select=centroids"])
    with pytest.raises(HierclusterError, match="hierarchy.embedding is empty"):
        load_config(None, ["hierarchy.embedding=[]"])
    with pytest.raises(HierclusterError, match="hierarchy.split is 'test'.*the centroids hierarchy is fitted on"):
        load_config(None, ["hierarchy.split=test", "hierarchy.embedding=[fc_weights, centroids]"])
    assert load_config(None, ["hierarchy.split=test", "hierarchy.embedding=fc_weights"]).hierarchy.split == "test"
    cfg = load_config(None, ["data.dataset=digits", "hierarchy.holdout=5000"])
    with pytest.raises(HierclusterError, match="hierarchy.holdout is 5,000, but the train split of digits has 1,347"):
        split_for_trees(cfg, None, None)
