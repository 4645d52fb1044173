"""Mixed precision under a bit budget in a run: the grid's budget points, their plans, and what they read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import quant
from hiercluster.cli import main
from hiercluster.data.datasets import ImageTensorDataset
from hiercluster.errors import HierclusterError
from hiercluster.evaluation.metrics import headline
from hiercluster.run import prepare as prepare_module
from hiercluster.run.config import load_config
from hiercluster.run.grid import expand_grid
from hiercluster.run.prepare import load_calibration
from hiercluster.run.store import ResultsStore

BUDGETS = [3, 2, 1.5]


@pytest.fixture(scope="module")
def checkpoint(trained_digits):
    return trained_digits


def _config(folder: Path, checkpoint: Path) -> Path:
    cfg = {
        "data": {"dataset": "digits", "batch_size": 128},
        "model": {"checkpoint": str(checkpoint)},
        "hierarchy": {"embedding": "fc_weights", "levels": [10, 5, 2]},
        "quant": {"schemes": ["asymmetric"], "bits": [4, 2], "clipping": ["minmax"], "budgets": BUDGETS},
        "calibration": {"samples": 256},
        "eval": {"random_seeds": 5, "bootstrap": 0},
    }
    path = folder / "mixed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def mixed_run(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    out = folder / "run"
    assert main(["run", str(_config(folder, checkpoint)), "--out", str(out), "--quiet"]) == 0
    info = json.loads((out / "run.json").read_text())
    with ResultsStore(out / "results.sqlite") as store:
        rows = store.results([g["key"] for g in info["grid"]])
        details = {g["key"]: store.spec_details(g["key"]) for g in info["grid"]}
    return out, info, rows, details


def test_each_budget_gives_one_spec_whose_average_bits_meet_it(mixed_run):
    _, info, rows, details = mixed_run
    mixed = {r["spec_key"]: r for r in rows if r["plan"].startswith("mp")}
    assert sorted(r["plan"] for r in mixed.values()) == sorted(f"mp{b:g}" for b in BUDGETS)
    for key, r in mixed.items():
        budget = float(r["plan"][2:])
        assert r["avg_bits"] <= budget + 1e-9
        # The stored plan is the allocation: it rebuilds as a QuantPlan whose widths give that average.
        plan = quant.QuantPlan.from_dict(details[key]["plan"])
        assert plan.name == r["plan"] and plan.layer_bits
        widths = [bits for _, bits in plan.layer_bits]
        assert set(widths) <= {1, 2, 3, 4, 8} and max(widths) == r["bits"]  # bits: the widest layer's
        assert "mixed" in r["tag"] and f"+mp{budget:g}" in r["tag"]


def test_the_report_draws_each_levels_frontier(mixed_run):
    out, info, rows, _ = mixed_run
    text = (out / "report.md").read_text()
    assert (out / "frontier.png").stat().st_size > 1000 and "](frontier.png)" in text
    assert "fewest avg bits (drop ≤ 1 pp)" in text


def test_the_headline_ranks_by_average_bits(mixed_run):
    _, info, rows, _ = mixed_run
    for t in headline(rows, info["tolerance"]):
        passing = [r["avg_bits"] for r in rows if r["level"] == t["level"] and r["drop"] <= info["tolerance"]]
        assert t["min_bits"] == (min(passing) if passing else None)


def test_the_exported_winner_carries_its_plan(mixed_run):
    out, _, rows, _ = mixed_run
    manifest = json.loads((out / "models" / "manifest.json").read_text())
    for entry in manifest["levels"].values():
        header = quant.read_packed_header(out / "models" / entry["model"])
        row = next(r for r in rows if r["spec_key"] == entry["spec_key"])
        assert header["plan"]["name"] == row["plan"]


def test_the_allocation_reads_only_the_calibration_images(checkpoint, tmp_path, monkeypatch):
    """The proxy gets exactly the calibration batches (training split); swapping the test labels changes no plan."""
    import quant.proxy

    seen = []
    real = quant.proxy.layer_costs
    monkeypatch.setattr(quant.proxy, "layer_costs", lambda model, spec, widths, batches, **kw: seen.append(list(batches))
                        or real(model, spec, widths, batches, **kw))
    config = _config(tmp_path, checkpoint)
    assert main(["run", str(config), "--out", str(tmp_path / "a"), "--quiet", "--set", "quant.budgets=[2]",
                 "--set", "quant.bits=[4]"]) == 0
    expected = load_calibration(load_config(str(config), []), "test")
    assert seen and all(len(b) == len(expected) and all(torch.equal(x, y) for x, y in zip(b, expected)) for b in seen)

    real_load = prepare_module.load_dataset

    def shuffled(name, root=None, split="test", *args, **kwargs):
        ds = real_load(name, root, split, *args, **kwargs)
        if split != "test":
            return ds
        order = torch.from_numpy(np.random.default_rng(2).permutation(len(ds.targets)))
        return ImageTensorDataset(ds.images, ds.targets[order], ds.classes, ds.mean, ds.std, ds.name, ds.extras)

    monkeypatch.setattr(prepare_module, "load_dataset", shuffled)
    assert main(["run", str(config), "--out", str(tmp_path / "b"), "--quiet", "--set", "quant.budgets=[2]",
                 "--set", "quant.bits=[4]"]) == 0

    def plans(out):
        info = json.loads((out / "run.json").read_text())
        with ResultsStore(out / "results.sqlite") as store:
            return {g["tag"]: store.spec_details(g["key"])["plan"] for g in info["grid"]}

    assert plans(tmp_path / "a") == plans(tmp_path / "b")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["quant.budgets=[1.5]", "quant.candidate_bits=[2, 4]"],
         "quant.budgets: budget 1.5 is below the smallest candidate width 2"),
        (["quant.budgets=[9]"], "quant.budgets[0]: must be >= 1.0 and <= 8.0, got 9.0"),
        (["quant.budgets=[2]", "quant.candidate_bits=[1, 2, 16]"], "quant.candidate_bits[2]: must be >= 1 and <= 8"),
        (["quant.budgets=[2]", "quant.schemes=[binary]", "quant.bits=[1]"], "scheme binary has only 1 bit"),
        (["quant.methods=[{name: gptq, budgets: [0.5]}]"], "quant.methods[0].budgets[0]: must be >= 1.0"),
    ],
)
def test_bad_budgets_are_one_clear_error(overrides, message):
    with pytest.raises(HierclusterError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        expand_grid(load_config(None, ["data.dataset=digits", "hierarchy.embedding=fc_weights", *overrides]))


def test_budget_points_need_calibration_and_name_their_budget():
    cfg = load_config(None, ["quant.budgets=[2.5]", "quant.schemes=[asymmetric]", "quant.bits=[4]",
                             "hierarchy.embedding=fc_weights"])
    points = [p for p in expand_grid(cfg) if p.budget is not None]
    assert [p.tag for p in points] == ["asymmetric-mixed-mse-per_channel+mp2.5"]
    assert points[0].needs_calibration and points[0].calibration_user == "mixed precision (quant.budgets)"
    assert points[0].candidate_bits == (1, 2, 3, 4, 8)
