"""End-to-end `hiercluster run` on digits: database, CSV and report checked against direct recomputation."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.cluster.hierarchy import fcluster, linkage
from sklearn.metrics import adjusted_rand_score

import quant
from hiercluster.run import executors, prepare
from hiercluster.cli import main
from hiercluster.data.datasets import load_dataset
from hiercluster.models.zoo import load_checkpoint

TIMING_COLUMNS = {"quantize_s", "eval_s", "metrics_s", "size_s"}
LEVELS = [10, 5, 3, 2]


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "r8.pt"
    assert main(["train", "configs/digits.yaml", "--out", str(out), "--set", "train.epochs=4"]) == 0
    return out


@pytest.fixture(scope="module")
def config_file(digits_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cfg")
    reference = folder / "ref.yaml"
    reference.write_text(yaml.safe_dump({"round": ["0", "6", "8", "9"], "straight": ["1", "4", "7"], "curly": ["2", "3", "5"]}))
    cfg = {
        "data": {"dataset": "digits", "batch_size": 128},
        "model": {"checkpoint": str(digits_checkpoint)},
        "hierarchy": {"embedding": "fc_weights", "levels": LEVELS, "reference": str(reference)},
        "quant": {
            "schemes": ["asymmetric", "pow2"],
            "bits": [8, 4, 2],
            "clipping": ["minmax"],
            "plans": [{"name": "full"}, {"name": "first8", "first_layer_bits": 8, "bits": [2]}],
        },
        "eval": {"random_seeds": 5, "seed": 0, "tolerance": 1.0},
    }
    path = folder / "digits_run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


N_SPECS = 2 * 3 + 2  # full plan: 2 schemes x 3 bit widths; first8 plan: 2 schemes at 2 bits
N_LEVELS = len(LEVELS) + 1  # plus the reference grouping


@pytest.fixture(scope="module")
def run_dir(config_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "digits"
    assert main(["run", str(config_file), "--out", str(out), "--quiet"]) == 0
    return out


def _csv_rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_run_writes_database_csv_report_and_plots(run_dir):
    with sqlite3.connect(run_dir / "results.sqlite") as con:
        n_rows = con.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        n_specs = con.execute("SELECT COUNT(DISTINCT spec_key) FROM results").fetchone()[0]
    assert n_specs == N_SPECS and n_rows == N_SPECS * N_LEVELS
    assert len(_csv_rows(run_dir / "results.csv")) == N_SPECS * N_LEVELS
    report = (run_dir / "report.md").read_text()
    for heading in ("Fewest bits per hierarchy level", "Accuracy and size per precision", "Grouped accuracy per level",
                    "Learned hierarchy vs reference grouping", "Biased inference"):
        assert heading in report
    for png in ("dendrogram", "drop_vs_bits", "quartiles", "prediction_share", "pareto"):
        assert (run_dir / f"{png}.png").stat().st_size > 1000
        assert f"({png}.png)" in report
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["quant"]["bits"] == [8, 4, 2]
    manifest = json.loads((run_dir / "models" / "manifest.json").read_text())
    for level in manifest["levels"].values():
        assert (run_dir / "models" / level["model"]).is_file() and (run_dir / "models" / level["groups"]).is_file()


def test_hierarchy_matches_scipy(run_dir, digits_checkpoint):
    model, _ = load_checkpoint(digits_checkpoint)
    w = model.fc.weight.detach().numpy().astype(np.float64)
    z = linkage(w / np.linalg.norm(w, axis=1, keepdims=True), method="ward")
    info = json.loads((run_dir / "run.json").read_text())
    for k in LEVELS:
        ours = info["levels"][f"k={k}"]["assignment"]
        assert adjusted_rand_score(fcluster(z, k, criterion="maxclust"), ours) == pytest.approx(1.0)


def test_results_match_direct_recomputation(run_dir, digits_checkpoint):
    """Quantize one spec by hand and recompute fine and grouped accuracy without the pipeline."""
    info = json.loads((run_dir / "run.json").read_text())
    rows = [r for r in _csv_rows(run_dir / "results.csv") if r["scheme"] == "asymmetric" and r["bits"] == "4"]
    assert len(rows) == N_LEVELS
    model, _ = load_checkpoint(digits_checkpoint)
    test = load_dataset("digits", split="test")
    spec = quant.QuantSpec(scheme="asymmetric", bits=4, granularity="per_channel", clipping="minmax")
    qmodel, _ = quant.quantize_model(model, spec)
    with torch.no_grad():
        x, y = test.batch(slice(None))
        p_float = torch.softmax(model(x), 1).numpy()
        p_quant = torch.softmax(qmodel(x), 1).numpy()
    y = y.numpy()
    fine = float((p_quant.argmax(1) == y).mean())
    for r in rows:
        assert float(r["fine_acc"]) == pytest.approx(fine, abs=1e-6)
        a = np.asarray(info["levels"][r["level"]]["assignment"])
        onehot = np.eye(a.max() + 1)[a]  # C x k
        acc_q = float(((p_quant @ onehot).argmax(1) == a[y]).mean())
        acc_f = float(((p_float @ onehot).argmax(1) == a[y]).mean())
        assert float(r["acc_quant"]) == pytest.approx(acc_q, abs=1e-6)
        assert float(r["acc_float"]) == pytest.approx(acc_f, abs=1e-6)
        assert float(r["drop"]) == pytest.approx(100 * (acc_f - acc_q), abs=1e-6)
        assert float(r["advantage"]) == pytest.approx(float(r["random_drop_mean"]) - float(r["drop"]), abs=1e-6)


def test_headline_is_the_fewest_bits_within_tolerance(run_dir):
    from hiercluster.report.rows import fewest_bits_cell

    rows = _csv_rows(run_dir / "results.csv")
    report = (run_dir / "report.md").read_text()
    lowest = min(int(r["bits"]) for r in rows)
    for level in {r["level"] for r in rows}:
        ok = [r for r in rows if r["level"] == level and float(r["drop"]) <= 1.0]
        expected = "none in grid"
        if ok:
            winner = min(ok, key=lambda r: (int(r["bits"]), float(r["drop"])))
            sure = "confident" if float(winner["drop_hi"]) <= 1.0 else "borderline"  # the interval's upper end
            expected = f"{fewest_bits_cell(int(winner['bits']), lowest)} ({sure})"
        line = next(l for l in report.splitlines() if l.startswith(f"| {level} |"))
        assert line.split("|")[3].strip() == expected


def test_report_command_reproduces_the_report(run_dir):
    before = (run_dir / "report.md").read_text()
    (run_dir / "report.md").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.md").read_text() == before


def test_resume_after_interruption_is_identical_and_skips_done_specs(config_file, run_dir, tmp_path, monkeypatch):
    calls = []
    real = executors.evaluate_point

    def interrupt_after_three(point, prep, key):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(point.tag)
        return real(point, prep, key)

    out = tmp_path / "resumed"
    monkeypatch.setattr(executors, "evaluate_point", interrupt_after_three)
    assert main(["run", str(config_file), "--out", str(out), "--quiet"]) == 130
    with sqlite3.connect(out / "results.sqlite") as con:
        assert con.execute("SELECT COUNT(*) FROM specs").fetchone()[0] == 3

    resumed = []

    def counting(point, prep, key):
        resumed.append(point.tag)
        return real(point, prep, key)

    monkeypatch.setattr(executors, "evaluate_point", counting)
    assert main(["run", str(config_file), "--out", str(out), "--quiet"]) == 0
    assert len(resumed) == N_SPECS - 3 and not set(resumed) & set(calls)

    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]  # noqa: E731
    key = lambda r: (r["spec_key"], r["level"])  # noqa: E731
    assert sorted(strip(_csv_rows(out / "results.csv")), key=key) == sorted(strip(_csv_rows(run_dir / "results.csv")), key=key)

    resumed.clear()
    assert main(["run", str(config_file), "--out", str(out), "--quiet"]) == 0
    assert resumed == []  # nothing left to do


@pytest.mark.parametrize(
    "override,message",
    [
        ("quant.bitz=[4]", "unknown config key 'quant.bitz'; did you mean 'quant.bits'"),
        ("eval.random_seeds=many", "eval.random_seeds: expected int"),
        ("model.checkpoint=/nonexistent/model.pt", "model.checkpoint: file not found: /nonexistent/model.pt"),
        ("hierarchy.reference=/nonexistent/ref.yaml", "hierarchy.reference: file not found"),
        ("quant.schemes=[asymetric]", "asymetric"),
        ("quant.plans=[{name: wide, first_layer_bits: 12}]", "plan 'wide': first_layer_bits=12, but scheme 'pow2' allows 2..8"),
        ("hierarchy.levels=[11]", "hierarchy.levels: k=11 is outside 1..10"),
        ("eval.tolerance=-1", "eval.tolerance: must be >= 0.0"),
        ("quant.plans=[{name: a}, {name: a, first_layer_bits: 8}]", "plan names must be unique; repeated: a"),
        ("data.dataset=fashion_mnist", "was trained on 'digits', the data is 'fashion_mnist'"),
        ("hierarchy.metric=precomputed", "config section hierarchy:"),
    ],
)
def test_config_errors_exit_2_with_one_line(config_file, tmp_path, override, message, capsys):
    assert main(["run", str(config_file), "--out", str(tmp_path / "x"), "--quiet", "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_refuses_a_folder_that_is_not_a_run(config_file, tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("precious")
    assert main(["run", str(config_file), "--out", str(tmp_path), "--quiet"]) == 2
    assert "not a hiercluster run directory" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_quantize_evaluate_and_hierarchy_commands(config_file, run_dir, tmp_path, capsys):
    packed = tmp_path / "m4.hcq"
    args = ["quantize", str(config_file), "--bits", "4", "--scheme", "asymmetric", "--clipping", "minmax", "--out", str(packed)]
    assert main(args) == 0
    sizes = json.loads((tmp_path / "m4.hcq.json").read_text())["sizes"]
    assert packed.is_file() and sizes["packed_bytes"] < sizes["fp32_bytes"] / 6  # 4-bit codes vs 32-bit floats
    before = packed.read_bytes()
    assert main(args) == 2 and packed.read_bytes() == before  # no silent overwrite
    capsys.readouterr()

    assert main(["evaluate", str(config_file), "--packed", str(packed), "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    # The same spec in the sweep (asymmetric, 4 bits, minmax, full plan) gave these grouped accuracies.
    rows = [r for r in _csv_rows(run_dir / "results.csv")
            if (r["scheme"], r["bits"], r["plan"]) == ("asymmetric", "4", "full")]
    for r in rows:
        line = next(l for l in printed.splitlines() if l.split() and l.split()[0] == r["level"])
        assert f"{100 * float(r['acc_quant']):.2f}" in line

    assert main(["hierarchy", str(config_file), "--out", str(tmp_path / "h"), "--quiet"]) == 0
    assert "k=2:" in capsys.readouterr().out
    assert (tmp_path / "h" / "hierarchy.json").is_file() and (tmp_path / "h" / "levels" / "k3.yaml").is_file()
    assert (tmp_path / "h" / "dendrogram.png").stat().st_size > 1000  # the one command besides the report that draws it
    # The folder `hierarchy` wrote is a run directory that `run` continues in.
    assert main(["run", str(config_file), "--out", str(tmp_path / "h"), "--quiet", "--set", "quant.bits=[8]"]) == 0


def test_run_pipeline_leaves_the_report_to_then_called_inside_the_lock(config_file, tmp_path, monkeypatch):
    from hiercluster.report import plots
    from hiercluster.run.config import load_config
    from hiercluster.run.pipeline import run_pipeline

    drawn = []
    monkeypatch.setattr(plots, "plot_dendrogram", lambda *a, **k: drawn.append(a))
    cfg = load_config(config_file, ["quant.bits=[8]", "quant.schemes=[asymmetric]", "quant.plans=[{name: full}]",
                                    "output.export_models=false"])
    out = tmp_path / "run"
    summary = run_pipeline(cfg, out, progress=False)
    # The run layer writes results, not the report: no report.md, no plot, no "then" in the summary.
    assert (out / "results.csv").is_file() and not list(out.glob("*.png")) and not (out / "report.md").exists()
    assert "then" not in summary and "report" not in summary and drawn == []
    seen = []

    def then(run_dir):
        seen.append((run_dir, (run_dir / ".lock").is_file(), (run_dir / "results.csv").is_file()))
        return "the report"

    summary = run_pipeline(cfg, out, progress=False, then=then)
    assert seen == [(out, True, True)]  # after the results, before the lock is released
    assert summary["then"] == "the report" and not (out / ".lock").exists()
    assert drawn == [] and summary["timings"]["specs_run"] == 0  # resumed: nothing to redo


def test_dataset_coarse_reference_reads_cifar100_superclasses(tmp_path):
    import pickle

    from hiercluster.run.config import load_config

    base = tmp_path / "cifar-100-python"
    base.mkdir()
    for split in ("train", "test"):
        with open(base / split, "wb") as fh:
            pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"fine_labels": [0, 1, 2, 3],
                         b"coarse_labels": [1, 0, 1, 0]}, fh)
    with open(base / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [b"apple", b"bus", b"pear", b"train"],
                     b"coarse_label_names": [b"vehicles", b"fruit"]}, fh)
    cfg = load_config(None, ["data.dataset=cifar100", f"data.root={tmp_path}"])
    groups = prepare._read_grouping("dataset:coarse", cfg, "hierarchy.reference")
    assert groups == {"vehicles": ["bus", "train"], "fruit": ["apple", "pear"]}


def test_hierarchy_refuses_to_rewrite_another_runs_tree(config_file, run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    before = (copy / "hierarchy.json").read_text()
    args = ["hierarchy", str(config_file), "--out", str(copy), "--quiet", "--set", "hierarchy.linkage=average"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "hierarchy differs from this one (linkage ward -> average; linkage matrix" in err and len(err.splitlines()) == 1
    assert (copy / "hierarchy.json").read_text() == before
    # The same tree with another superclass name would make the report's names wrong too.
    members = json.loads((copy / "run.json").read_text())["levels"]["k=2"]["names"][0].split("+")
    names = ["--set", f"hierarchy.names={{Named: {members}}}"]
    assert main(["hierarchy", str(config_file), "--out", str(copy), "--quiet", *names]) == 2
    assert "(superclasses or their names at level k=2)" in capsys.readouterr().err
    # The same hierarchy is written again (a damaged hierarchy.json is repaired this way).
    (copy / "hierarchy.json").write_text("{")
    assert main(["hierarchy", str(config_file), "--out", str(copy), "--quiet"]) == 0
    assert (copy / "hierarchy.json").read_text() == before


def test_another_grid_needs_force_and_the_report_then_shows_only_it(config_file, run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    report = (copy / "report.md").read_text()
    args = ["run", str(config_file), "--out", str(copy), "--quiet", "--set", "quant.bits=[8]", "--set", "quant.plans=[{name: full}]"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds a run of another grid (quant.bits: [8, 4, 2] -> [8]; quant.plans:" in err and "grid: 6 removed" in err
    assert (copy / "report.md").read_text() == report
    old_exports = _listed_exports(copy)
    (copy / "models" / "mine.hcq").write_text("not written by the tool")
    assert main([*args, "--force"]) == 0
    # The previous grid's exports are gone; what the tool did not write stays.
    new_exports = _listed_exports(copy)
    assert {p.name for p in (copy / "models").iterdir()} == new_exports | {"manifest.json", "mine.hcq"}
    assert old_exports - new_exports and all(b.startswith("asymmetric-8b") or b.startswith("pow2-8b")
                                             for b in new_exports if b.endswith(".hcq"))
    rows = _csv_rows(copy / "results.csv")
    assert {(r["bits"], r["plan"]) for r in rows} == {("8", "full")} and len(rows) == 2 * N_LEVELS
    text = (copy / "report.md").read_text()
    assert "- grid: 2 quantization specs" in text and "4-bit" not in text and "2-bit" not in text
    assert json.loads((copy / "run.json").read_text())["grid"][0]["tag"].startswith("asymmetric-8b")
    with sqlite3.connect(copy / "results.sqlite") as con:  # the earlier results stay in the database
        assert con.execute("SELECT COUNT(DISTINCT spec_key) FROM specs").fetchone()[0] == N_SPECS


def test_a_database_deleted_mid_run_stops_the_run(config_file, tmp_path, monkeypatch, capsys):
    real = executors.evaluate_point
    out = tmp_path / "run"

    def delete_after_first(point, prep, key):
        if (out / "results.sqlite").is_file() and (out / "run.json").is_file():
            with sqlite3.connect(out / "results.sqlite") as con:
                if con.execute("SELECT COUNT(*) FROM specs").fetchone()[0] == 1:
                    (out / "results.sqlite").unlink()
            con.close()
        return real(point, prep, key)

    monkeypatch.setattr(executors, "evaluate_point", delete_after_first)
    assert main(["run", str(config_file), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"results database {out / 'results.sqlite'} was deleted or replaced while this command ran" in err
    assert len(err.splitlines()) == 1 and not (out / ".lock").exists()


def test_a_plan_that_skips_every_layer_is_refused_before_the_float_evaluation(config_file, tmp_path, monkeypatch, capsys):
    def no_evaluation(*args, **kwargs):
        raise AssertionError("the float model was evaluated")

    monkeypatch.setattr(prepare, "collect_logits", no_evaluation)
    plans = "quant.plans=[{name: full}, {name: nothing, skip: ['conv1', 'layer*', 'fc']}]"
    assert main(["run", str(config_file), "--out", str(tmp_path / "run"), "--quiet", "--set", plans]) == 2
    assert "plan 'nothing' leaves every layer of model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_damaged_run_directory_is_one_clear_error(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "results.sqlite").write_bytes(b"not a database at all" * 100)
    assert main(["report", str(copy)]) == 2
    assert "results.sqlite is damaged" in capsys.readouterr().err
    (copy / "run.json").write_text("{")
    assert main(["report", str(copy)]) == 2
    assert "run.json is damaged" in capsys.readouterr().err


def test_quantize_never_writes_over_a_checkpoints_metadata(config_file, digits_checkpoint, capsys):
    meta = digits_checkpoint.with_suffix(".json")
    before = meta.read_text()
    out = digits_checkpoint.with_suffix("")  # "r8": its report would be r8.json, the checkpoint's metadata
    assert main(["quantize", str(config_file), "--bits", "4", "--out", str(out), "--overwrite"]) == 2
    assert meta.read_text() == before and "belongs to the checkpoint" in capsys.readouterr().err
    assert main(["quantize", str(config_file), "--bits", "4", "--out", str(meta), "--overwrite"]) == 2
    assert meta.read_text() == before and ".hcq" in capsys.readouterr().err
    hcq = digits_checkpoint.with_suffix(".hcq")  # beside the checkpoint, with its report as r8.hcq.json
    assert main(["quantize", str(config_file), "--bits", "4", "--out", str(hcq)]) == 0
    assert meta.read_text() == before and hcq.with_name("r8.hcq.json").is_file()


def _listed_exports(run: Path) -> set[str]:
    """The model and grouping files ``run/models/manifest.json`` lists."""
    manifest = json.loads((run / "models" / "manifest.json").read_text())
    return {name for entry in manifest["levels"].values() for name in (entry["model"], entry["groups"])}


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run_dir, tmp_path / "copy"))


@pytest.mark.parametrize("text", ['{"levels": []}', "[" * 100_000, '{"reduction": "prob_sum", "levels": {"k=2": 3}}'])
def test_a_damaged_manifest_is_rewritten_and_the_run_finishes(config_file, run_dir, tmp_path, text):
    copy = _copy(run_dir, tmp_path)
    manifest = copy / "models" / "manifest.json"
    expected = json.loads(manifest.read_text())
    manifest.write_text(text)
    (copy / "report.md").unlink()
    assert main(["run", str(config_file), "--out", str(copy), "--quiet"]) == 0
    assert json.loads(manifest.read_text()) == expected and (copy / "report.md").is_file()


def test_a_manifest_naming_files_elsewhere_removes_nothing_there(config_file, run_dir, tmp_path):
    copy = _copy(run_dir, tmp_path)
    manifest = copy / "models" / "manifest.json"
    data = json.loads(manifest.read_text())
    entry = next(iter(data["levels"].values()))
    (tmp_path / "outside.hcq").write_text("the user's")
    entry["model"] = "../../outside.hcq"
    manifest.write_text(json.dumps(data))
    assert main(["run", str(config_file), "--out", str(copy), "--quiet"]) == 0
    assert (tmp_path / "outside.hcq").read_text() == "the user's"
    assert "../../outside.hcq" not in manifest.read_text()


def _other_checkpoint(checkpoint: Path, folder: Path) -> Path:
    """The checkpoint with other classifier weights (another model, another tree), metadata beside it."""
    state = torch.load(checkpoint, weights_only=True)
    state["fc.weight"] = torch.randn(state["fc.weight"].shape, generator=torch.Generator().manual_seed(7))
    torch.save(state, folder / "other.pt")
    (folder / "other.json").write_text(checkpoint.with_suffix(".json").read_text())
    return folder / "other.pt"


def test_evaluate_reads_a_runs_logits_cache_but_never_writes_it(config_file, run_dir, digits_checkpoint, tmp_path,
                                                                 monkeypatch, capsys):
    copy = _copy(run_dir, tmp_path)
    cache = copy / "float_logits.pt"
    before = cache.read_bytes()
    packed = tmp_path / "m8.hcq"
    assert main(["quantize", str(config_file), "--bits", "8", "--out", str(packed)]) == 0
    calls = []
    real = prepare.collect_logits
    monkeypatch.setattr(prepare, "collect_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(["evaluate", str(config_file), "--packed", str(packed), "--out", str(copy), "--quiet"]) == 0
    assert calls == []  # the matching cache gave the float logits (the quantized model runs in cli)
    other = ["--set", f"model.checkpoint={_other_checkpoint(digits_checkpoint, tmp_path)}"]
    assert main(["evaluate", str(config_file), "--packed", str(packed), "--out", str(copy), "--quiet", *other]) == 0
    assert calls == [1] and cache.read_bytes() == before  # another model's logits: computed, not written over the run's
    assert main(["evaluate", str(config_file), "--packed", str(packed), "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == ["evaluations"]  # its table only: no logits cache
    capsys.readouterr()


def test_the_hierarchy_alone_needs_no_float_logits(config_file, tmp_path, monkeypatch):
    from hiercluster.run.config import load_config

    def no_evaluation(*args, **kwargs):
        raise AssertionError("the float model was evaluated")

    monkeypatch.setattr(prepare, "collect_logits", no_evaluation)
    prep = prepare.prepare(load_config(config_file), tmp_path / "h", progress=False, float_logits=False)
    assert prep.float_logits is None and prep.labels is None and set(prep.levels) == {"k=10", "k=5", "k=3", "k=2", "reference"}
    k3, ref = prep.levels["k=3"], prep.levels["reference"]
    assert (k3.name, k3.k, k3.kind) == ("k=3", 3, "learned") and np.array_equal(k3.array, prep.hierarchy.cut(k=3))
    assert k3.names == tuple(prep.hierarchy.superclass_names(3))
    # By hand from ref.yaml: groups numbered by their smallest class ('0' round, '1' straight, '2' curly).
    assert (ref.k, ref.kind, ref.names) == (3, "reference", ("round", "straight", "curly"))
    assert ref.assignment == (0, 1, 2, 2, 1, 2, 0, 1, 0, 0)
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("hierarchy.levels=[10, 50]", "config key hierarchy.levels: k=50 is outside 1..10"),
        ("hierarchy.reference=missing.yaml", "config key hierarchy.reference: file not found"),
        ("hierarchy.reference=null", None),  # the control: this config gets as far as the float evaluation
        ("hierarchy.names={Odd: ['1', 'eleven']}", "eleven"),
    ],
)
def test_every_config_refusal_comes_before_the_float_evaluation(config_file, tmp_path, monkeypatch, capsys, override, message):
    def no_evaluation(*args, **kwargs):
        raise RuntimeError("the float model was evaluated")

    monkeypatch.setattr(prepare, "collect_logits", no_evaluation)
    args = ["run", str(config_file), "--out", str(tmp_path / "run"), "--quiet", "--set", override]
    if message is None:
        with pytest.raises(RuntimeError, match="the float model was evaluated"):
            main(args)
        return
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_logits_cache_is_used_only_when_it_matches(tmp_path):
    from hiercluster.run.prepare import read_logits_cache

    path = tmp_path / "float_logits.pt"
    logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    assert read_logits_cache(path, "id", 4, 3) is None  # no file
    torch.save({"id": "id", "logits": logits, "labels": labels}, path)
    found = read_logits_cache(path, "id", 4, 3)
    assert torch.equal(found[0], logits) and torch.equal(found[1], labels)
    assert read_logits_cache(path, "another id", 4, 3) is None
    for saved in (
        {"id": "id", "logits": logits[:3], "labels": labels},  # another number of images
        {"id": "id", "logits": logits, "labels": torch.tensor([0, 2, 1, 3])},  # a label outside the classes
        {"id": "id", "logits": logits.long(), "labels": labels},
        {"id": "id", "logits": [1.0], "labels": labels},
        [logits, labels],
    ):
        torch.save(saved, path)
        assert read_logits_cache(path, "id", 4, 3) is None, saved
    path.write_bytes(b"PK\x03\x04 damaged")
    assert read_logits_cache(path, "id", 4, 3) is None


def test_hierarchy_command_with_fc_weights_evaluates_nothing_and_writes_no_logits(config_file, tmp_path, monkeypatch, capsys):
    def no_forward_pass(*args, **kwargs):
        raise AssertionError("a forward pass over data")

    monkeypatch.setattr(prepare, "collect_logits", no_forward_pass)
    assert main(["hierarchy", str(config_file), "--out", str(tmp_path / "h"), "--quiet"]) == 0
    assert (tmp_path / "h" / "hierarchy.json").is_file() and not (tmp_path / "h" / "float_logits.pt").exists()
    capsys.readouterr()
