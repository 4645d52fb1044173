"""Calibrated quantization in the run layer: config, grid, calibration data, resume keys, store, report, CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

import quant
from hiercluster.cli import main
from hiercluster.run.config import load_config
from hiercluster.data.datasets import load_dataset
from hiercluster.errors import HierclusterError
from hiercluster.models.zoo import build_model, load_checkpoint, save_checkpoint
from hiercluster.run import executors, export, grid, prepare, sweep, versions

SAMPLES, CAL_BATCH = 96, 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained narrow resnet8 for digits: these tests check data flow and bookkeeping, not accuracy."""
    out = tmp_path_factory.mktemp("ckpt") / "r8.pt"
    torch.manual_seed(0)
    model = build_model("resnet8", 10, 1, width=4)
    meta = {"arch": "resnet8", "num_classes": 10, "in_channels": 1, "width": 4, "dataset": "digits",
            "classes": [str(i) for i in range(10)]}
    save_checkpoint(model, out, meta)
    return out


@pytest.fixture
def no_plot_files(monkeypatch):
    """Skip drawing the report's PNGs (most of a tiny run's time); the report text is unchanged."""
    from hiercluster.report import figures as report_plots, plots

    def skip(fig, path, dpi=110):
        return Path(path)

    monkeypatch.setattr(plots, "save_figure", skip)
    monkeypatch.setattr(report_plots, "save_figure", skip)


def _config(folder, checkpoint, **quant_cfg):
    cfg = {
        "data": {"dataset": "digits", "batch_size": 128},
        "model": {"checkpoint": str(checkpoint)},
        "hierarchy": {"levels": [10, 3]},
        "quant": {"schemes": ["asymmetric"], "bits": [4, 2], "clipping": ["minmax"], **quant_cfg},
        "calibration": {"samples": SAMPLES, "batch_size": CAL_BATCH, "seed": 3},
        "eval": {"random_seeds": 3},
        "output": {"export_models": False},
    }
    path = folder / "cal.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def config_file(checkpoint, tmp_path_factory):
    methods = ["rtn", {"name": "gptq", "bn_reestimate": [True], "bits": [2]}]
    return _config(tmp_path_factory.mktemp("cfg"), checkpoint, methods=methods)


def _image_rows(images: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in images.reshape(len(images), -1)}


def _expected_calibration(split="train", samples=SAMPLES, seed=3, batch_size=CAL_BATCH):
    """The calibration set by its definition: a seeded random subset of the split, in batches."""
    ds = load_dataset("digits", split=split)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:samples]
    return list(ds.batch(idx)[0].split(batch_size))


# --- config and grid ----------------------------------------------------------------


def test_methods_items_expand_override_and_deduplicate():
    cfg = load_config(None, [
        "quant.schemes=[asymmetric, pow2]", "quant.bits=[4, 2]", "quant.clipping=[mse]",
        "quant.plans=[{name: full}, {name: first8, first_layer_bits: 8, bits: [2]}]",
        # the third item repeats points of the second: they run once
        "quant.methods=[rtn, {name: gptq, bn_reestimate: [true, false], bits: [2], schemes: [asymmetric], "
        "clipping: [minmax], plans: [full]}, {name: gptq, bn_reestimate: [true], bits: [2], schemes: [asymmetric], "
        "clipping: [minmax]}]",
    ])
    tags = [p.tag for p in grid.expand_grid(cfg)]
    assert tags == [
        "asymmetric-4b-mse-per_channel+full", "asymmetric-2b-mse-per_channel+full",
        "pow2-4b-mse-per_channel+full", "pow2-2b-mse-per_channel+full",
        "asymmetric-2b-mse-per_channel+first8", "pow2-2b-mse-per_channel+first8",
        # gptq's own lists replace the grid's (minmax is not in quant.clipping) and plans: [full] restricts
        "asymmetric-2b-minmax-per_channel+full+gptq+bn", "asymmetric-2b-minmax-per_channel+full+gptq",
        # the third item adds only what the second did not have: plan first8
        "asymmetric-2b-minmax-per_channel+first8+gptq+bn",
    ]
    assert len(set(tags)) == len(tags)


def test_global_bn_reestimate_and_default_grid():
    cfg = load_config(None, ["quant.schemes=[symmetric]", "quant.bits=[3]", "quant.bn_reestimate=[false, true]"])
    points = grid.expand_grid(cfg)
    assert [(p.method, p.bn_reestimate, p.needs_calibration) for p in points] == [
        ("rtn", False, False), ("rtn", True, True)
    ]
    assert points[1].tag == "symmetric-3b-mse-per_channel+full+rtn+bn"
    assert load_config(None).quant.methods[0].name == "rtn"  # default: round to nearest only


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["quant.methods=[gtpq]"], "config key quant.methods[0]: unknown method 'gtpq'; allowed: rtn, gptq, adaround"),
        (["quant.methods=[{name: gptq, plans: [nope]}]"], "quant.methods[0].plans: no plan named 'nope'"),
        (["quant.methods=[{name: gptq, bitz: [2]}]"], "unknown config key 'quant.methods[0].bitz'"),
        (["quant.bn_reestimate=[maybe]"], "quant.bn_reestimate[0]: expected bool"),
        (["calibration.split=test"], "config key calibration.split is 'test', the same as data.eval_split"),
        (["calibration.split=val"], "calibration.split: 'val' is not one of train, test"),
        (["calibration.samples=0"], "calibration.samples: must be > 0"),
        (["calibration.batch_size=-1"], "calibration.batch_size: must be > 0"),
        (["calibration.samples=5000", "quant.methods=[gptq]"],
         "config key calibration.samples is 5000, more than the 1347 images of the 'train' split of digits"),
        (["calibration.samples=5000", "quant.activation_bits=8"], "config key calibration.samples is 5000"),
    ],
)
def test_bad_calibration_config_exits_2_with_one_line(config_file, tmp_path, overrides, message, capsys):
    args = ["run", str(config_file), "--out", str(tmp_path / "x"), "--quiet"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_samples_larger_than_the_split_is_no_error_when_nothing_calibrates(
    config_file, tmp_path, monkeypatch, no_plot_files
):
    loads = []
    real = prepare.load_calibration
    monkeypatch.setattr(prepare, "load_calibration", lambda *a: loads.append(a) or real(*a))
    args = ["run", str(config_file), "--out", str(tmp_path / "r"), "--quiet", "--set", "quant.methods=[rtn]",
            "--set", "calibration.samples=5000", "--set", "quant.bits=[4]"]
    assert main(args) == 0
    assert loads == []  # the calibration set is loaded only when some grid point needs it
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["calibration"]["used_by"] == [] and info["calibration"]["samples"] == 5000


def test_a_method_needing_data_on_a_dataset_without_that_split(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "folder"
    for cls in ("cat", "dog"):  # only val/: no training split
        (root / "val" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8), (10, 200, 30)).save(root / "val" / cls / "a.png")
    weights = tmp_path / "m.pt"
    torch.save(build_model("resnet8", 2, 3, width=4).state_dict(), weights)
    cfg = {"data": {"dataset": "imagefolder", "root": str(root)},
           "model": {"arch": "resnet8", "width": 4, "checkpoint": str(weights)},
           "quant": {"bits": [2], "schemes": ["asymmetric"], "methods": ["gptq"]}}
    path = tmp_path / "f.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "method 'gptq' needs calibration data" in err and "calibration.split is 'train'" in err
    args = ["quantize", str(path), "--bits", "2", "--method", "gptq", "--out", str(tmp_path / "m.hcq")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "method 'gptq' needs calibration data" in err and len(err.splitlines()) == 1
    assert main(args[:-4] + ["--method", "rtn", "--out", str(tmp_path / "m.hcq")]) == 0  # rtn needs no data


# --- calibration data ---------------------------------------------------------------


def test_calibration_batches_are_the_seeded_train_subset_and_never_eval_images(
    config_file, tmp_path, monkeypatch, no_plot_files
):
    seen = []
    real = quant.quantize_model

    def spy(model, spec, plan=None, **kw):
        seen.append(kw)
        return real(model, spec, plan, **kw)

    monkeypatch.setattr(quant, "quantize_model", spy)
    args = ["run", str(config_file), "--out", str(tmp_path / "r"), "--quiet", "--set", "quant.bits=[2]",
            "--set", "quant.activation_bits=8", "--set", "quant.activation_calibration_batches=2"]
    assert main(args) == 0
    assert [kw["method"] for kw in seen] == ["rtn", "gptq"] and [kw["bn_reestimate"] for kw in seen] == [False, True]
    expected = _expected_calibration()
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    train_rows, test_rows = _image_rows(train.batch(slice(None))[0]), _image_rows(test.batch(slice(None))[0])
    for kw in seen:
        batches = kw["calibration"]
        assert [len(b) for b in batches] == [32, 32, 32] and kw["calibration_batches"] == 2
        assert all(torch.equal(a, b) for a, b in zip(batches, expected))
        images = _image_rows(torch.cat(batches))
        assert images <= train_rows and not images & test_rows
    assert seen[0]["calibration"] is seen[1]["calibration"]  # loaded once per run


def test_activation_calibration_does_not_read_the_evaluation_set(config_file, tmp_path):
    cfg = load_config(config_file, ["quant.activation_bits=8", "quant.activation_calibration_batches=2"])
    point = grid.expand_grid(cfg)[0]
    assert point.method == "rtn" and point.activation is not None and point.needs_calibration
    prep = prepare.prepare(cfg, tmp_path / "p", progress=False, calibration_for=point.calibration_user)

    def no_eval_data():
        raise AssertionError("quantize_point read the evaluation loader")

    ctx = dataclasses.replace(sweep.sweep_context(prep, [point]), eval_set=None)  # no evaluation images to read
    prep.loader = no_eval_data
    _, report = sweep.quantize_point(ctx.model, point, ctx)
    # Reference: the same activation ranges from the first two calibration batches, by hand.
    _, ref = quant.quantize_model(
        prep.model, point.spec, point.plan, act_spec=point.activation, calibration=_expected_calibration()[:2]
    )
    assert report.activations and report.activations.keys() == ref.activations.keys()
    for name, params in ref.activations.items():
        assert torch.equal(report.activations[name].scale, params.scale)
        assert torch.equal(report.activations[name].zero_point, params.zero_point)


def test_allowed_eval_split_is_said_in_the_report_header(config_file, tmp_path):
    args = ["run", str(config_file), "--out", str(tmp_path / "r"), "--quiet", "--set", "quant.bits=[2]",
            "--set", "calibration.split=test", "--set", "calibration.allow_eval_split=true"]
    assert main(args) == 0
    head = (tmp_path / "r" / "report.md").read_text().split("## Fewest bits")[0]
    assert "calibration data came from the evaluation split" in head
    cal = json.loads((tmp_path / "r" / "run.json").read_text())["calibration"]
    assert cal["split"] == "test" and cal["allow_eval_split"] and cal["from_eval_split"] and cal["images"] == SAMPLES
    assert cal["used_by"] == ["gptq+bn"]
    assert (tmp_path / "r" / "drop_vs_bits.png").stat().st_size > 1000  # a panel per scheme and method


# --- resume keys and store ----------------------------------------------------------


def test_interrupted_calibrated_sweep_resumes_without_redoing_specs(config_file, tmp_path, monkeypatch, no_plot_files):
    real = executors.evaluate_point
    done = []

    def stop_after_one(point, prep, key):
        if done:
            raise KeyboardInterrupt
        done.append(point.tag)
        return real(point, prep, key)

    out = tmp_path / "r"
    monkeypatch.setattr(executors, "evaluate_point", stop_after_one)
    assert main(["run", str(config_file), "--out", str(out), "--quiet"]) == 130
    rerun = []
    monkeypatch.setattr(executors, "evaluate_point", lambda p, prep, k: rerun.append(p.tag) or real(p, prep, k))
    assert main(["run", str(config_file), "--out", str(out), "--quiet"]) == 0
    assert done == ["asymmetric-4b-minmax-per_channel+full"]
    assert rerun == ["asymmetric-2b-minmax-per_channel+full", "asymmetric-2b-minmax-per_channel+full+gptq+bn"]
    rerun.clear()
    assert main(["run", str(config_file), "--out", str(out), "--quiet"]) == 0
    assert rerun == []
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["method"], r["bn_reestimate"]) for r in rows} == {("rtn", "0"), ("gptq", "1")}


def test_resume_key_covers_method_calibration_and_code_version(config_file, tmp_path, monkeypatch):
    cfg = load_config(config_file)
    prep = prepare.prepare(cfg, tmp_path / "p", progress=False)
    rtn, gptq = grid.expand_grid(cfg)[1:]
    keys = {sweep.resume_key(p, prep) for p in (rtn, gptq)}
    assert len(keys) == 2
    same_spec_bn = grid.GridPoint(rtn.spec, rtn.plan, method="rtn", bn_reestimate=True)
    assert sweep.resume_key(same_spec_bn, prep) not in keys
    for field in ("samples", "batch_size", "split", "seed"):
        value = {"samples": 64, "batch_size": 16, "split": "test", "seed": 9}[field]
        other = load_config(config_file, [f"calibration.{field}={value}", "calibration.allow_eval_split=true"])
        prep.cfg = other
        assert sweep.resume_key(rtn, prep) in keys  # rtn uses no calibration data
        assert sweep.resume_key(gptq, prep) not in keys
    prep.cfg = cfg
    before = sweep.resume_key(rtn, prep)
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert sweep.resume_key(rtn, prep) != before
    monkeypatch.undo()
    monkeypatch.setattr(versions, "SCHEMA_VERSION", 1)
    assert sweep.resume_key(rtn, prep) != before


# --- CLI (the report's tables are tested in report/test_markdown.py) --------------


def test_quantize_command_uses_the_calibration_section(config_file, checkpoint, tmp_path):
    out = tmp_path / "g2.hcq"
    args = ["quantize", str(config_file), "--bits", "2", "--scheme", "asymmetric", "--clipping", "minmax",
            "--method", "gptq", "--bn-reestimate", "--out", str(out)]
    assert main(args) == 0
    meta = json.loads((tmp_path / "g2.hcq.json").read_text())
    assert meta["method"] == "gptq" and meta["bn_reestimate"] is True
    assert meta["calibration"] == {"split": "train", "samples": SAMPLES, "batch_size": CAL_BATCH, "seed": 3}
    assert meta["report"]["method"] == "gptq" and meta["report"]["bn_reestimated"] is True
    # The packed model is what quantize_model gives on the calibration subset built by hand.
    model, _ = load_checkpoint(checkpoint)
    spec = quant.QuantSpec(scheme="asymmetric", bits=2, clipping="minmax")
    ref, _ = quant.quantize_model(model, spec, method="gptq", bn_reestimate=True, calibration=_expected_calibration(),
                                  seed=3)
    x, _ = load_dataset("digits", split="test").batch(slice(0, 64))
    with torch.no_grad():
        torch.testing.assert_close(quant.load_packed(out, model)(x), ref(x))


def test_exported_calibrated_winner_is_the_swept_model_not_a_refit(config_file, tmp_path, monkeypatch, no_plot_files):
    calls = []
    real = sweep.quantize_point
    monkeypatch.setattr(sweep, "quantize_point", lambda *a: calls.append(a[1].tag) or real(*a))
    out = tmp_path / "r"
    args = ["run", str(config_file), "--out", str(out), "--quiet", "--set", "output.export_models=true",
            "--set", "eval.tolerance=100", "--set", "quant.methods=[{name: gptq, bn_reestimate: [true], bits: [2]}]"]
    assert main(args) == 0
    assert calls == ["asymmetric-2b-minmax-per_channel+full+gptq+bn"]  # fitted once, in the sweep
    manifest = json.loads((out / "models" / "manifest.json").read_text())
    assert {lv["method"] for lv in manifest["levels"].values()} == {"gptq+bn"}
    exported = out / "models" / next(iter(manifest["levels"].values()))["model"]
    # Reference: the same method fitted by hand on the calibration subset, compared on test images.
    model = prepare.load_float_model(load_config(config_file), [str(i) for i in range(10)], 1)[0]
    spec = quant.QuantSpec(scheme="asymmetric", bits=2, clipping="minmax")
    ref, _ = quant.quantize_model(model, spec, method="gptq", bn_reestimate=True, calibration=_expected_calibration(),
                                  seed=3)
    x, _ = load_dataset("digits", split="test").batch(slice(0, 64))
    with torch.no_grad():
        torch.testing.assert_close(quant.load_packed(exported, model)(x), ref(x))


def test_unknown_method_on_the_command_line(config_file, tmp_path, capsys):
    args = ["quantize", str(config_file), "--bits", "2", "--method", "gtpq", "--out", str(tmp_path / "x.hcq")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "--method 'gtpq' is not a method; allowed: rtn, gptq, adaround" in err and len(err.splitlines()) == 1


def test_run_config_validates_itself():
    with pytest.raises(HierclusterError, match="calibration.allow_eval_split: true"):
        load_config(None, ["data.eval_split=train"])
    cfg = load_config(None, ["data.eval_split=train", "calibration.split=test", "hierarchy.split=test"])
    assert cfg.calibration.split == "test"


@pytest.mark.parametrize(
    "module",
    ["hiercluster.run.config", "hiercluster.run.grid", "hiercluster.run.prepare", "hiercluster.run.records",
     "hiercluster.run.store", "hiercluster.run.executors"],
)
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0


def test_an_export_from_the_packed_cache_is_whole_or_absent(tmp_path, monkeypatch):
    import errno
    import shutil
    from types import SimpleNamespace


    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "key.hcq").write_bytes(b"x" * 10_000)
    (tmp_path / "models").mkdir()
    point = SimpleNamespace(tag="asymmetric-2b+full+gptq")
    path = export._export_model(None, point, "key", tmp_path, tmp_path / "models")
    assert path.read_bytes() == b"x" * 10_000

    def half_then_full_disk(src, dst, *args):
        dst.write(src.read(5_000))
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "packed" / "key.hcq").write_bytes(b"y" * 10_000)
    monkeypatch.setattr(shutil, "copyfileobj", half_then_full_disk)
    with pytest.raises(OSError, match="No space left"):
        export._export_model(None, point, "key", tmp_path, tmp_path / "models")
    assert path.read_bytes() == b"x" * 10_000 and [p.name for p in (tmp_path / "models").iterdir()] == [path.name]
