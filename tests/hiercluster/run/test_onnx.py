"""`hiercluster export`: a level's quantized model with its merged head as ONNX, checked in ONNX Runtime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

import quant
from hiercluster.cli import main
from hiercluster.data.datasets import load_dataset
from hiercluster.errors import HierclusterError
from hiercluster.models.zoo import load_checkpoint
from hiercluster.run import onnx as run_onnx
from hiercluster.run.onnx import choose_row, level_head, resolve_level
from hiercluster.run.rundir import read_run_info
from hiercluster.run.store import ResultsStore
from quant.onnx_export import supported_types

TWO_BIT = "asymmetric-2b-minmax-per_channel+full"
EIGHT_BIT = "asymmetric-8b-minmax-per_channel+full"


@pytest.fixture(scope="module")
def run_dir(trained_digits, tmp_path_factory):
    """A digits run: levels k=5 and k=3, asymmetric 8 and 2 bits (2 bits is beyond the tolerance: 8 wins)."""
    folder = tmp_path_factory.mktemp("onnx-run")
    cfg = {
        "data": {"dataset": "digits", "batch_size": 256},
        "model": {"checkpoint": str(trained_digits)},
        "hierarchy": {"embedding": "fc_weights", "levels": [5, 3]},
        "quant": {"schemes": ["asymmetric"], "bits": [8, 2], "clipping": ["minmax"]},
        "eval": {"random_seeds": 2, "bootstrap": 0},
    }
    (folder / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(folder / "cfg.yaml"), "--out", str(folder / "run"), "--quiet"]) == 0
    return folder / "run"


def _rows(run: Path) -> tuple[dict, list[dict]]:
    info = read_run_info(run)
    with ResultsStore(run / "results.sqlite") as store:
        return info, store.results([g["key"] for g in info["grid"]], complete=True)


def _digits_test() -> tuple[np.ndarray, np.ndarray]:
    test = load_dataset("digits", split="test")
    return torch.stack([test[i][0] for i in range(len(test))]).numpy(), np.array([test[i][1] for i in range(len(test))])


def test_export_writes_the_level_winner_with_its_merged_head_and_metadata(run_dir, tmp_path, capsys):
    out = tmp_path / "k5.onnx"
    assert main(["export", str(run_dir), "--level", "k=5", "--out", str(out), "--fine-logits"]) == 0
    printed = capsys.readouterr().out
    assert f"spec {EIGHT_BIT}" in printed and "agrees with PyTorch on 100.00%" in printed and f"wrote {out}" in printed
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file is gone

    info, rows = _rows(run_dir)
    row = next(r for r in rows if r["level"] == "k=5" and r["tag"] == EIGHT_BIT)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    superclasses = json.loads(meta["superclasses"])
    level = info["levels"]["k=5"]
    assert sorted(superclasses) == sorted(level["names"]) and meta["spec"] == EIGHT_BIT and meta["level"] == "k=5"
    grouping = json.loads(meta["grouping"])
    assert list(grouping) == superclasses
    assert sorted(c for members in grouping.values() for c in members) == sorted(info["class_names"])
    for name, members in grouping.items():  # the metadata's grouping is the run's level
        assert {level["assignment"][info["class_names"].index(c)] for c in members} == {level["names"].index(name)}
    assert json.loads(meta["avg_bits"]) == row["avg_bits"] == 8.0
    assert json.loads(meta["accuracy"])["quantized_level"] == row["acc_quant"]
    assert json.loads(meta["quant.weights"])  # the quantizer's own keys are there too

    # Superclass accuracy of the ONNX model on the run's evaluation set is what the run measured.
    x, y = _digits_test()
    scores, logits = session.run(["scores", "logits"], {"input": x})
    assert scores.shape == (len(y), 5) and logits.shape == (len(y), 10)
    group_of = {info["class_names"].index(c): superclasses.index(name) for name, members in grouping.items() for c in members}
    truth = np.array([group_of[int(label)] for label in y])
    assert abs(float(np.mean(scores.argmax(1) == truth)) - row["acc_quant"]) < 1e-9


def test_a_spec_without_a_packed_file_is_quantized_again_and_the_checkpoint_is_checked(
    run_dir, trained_digits, tmp_path, capsys
):
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    cfg = yaml.safe_load((moved / "config.yaml").read_text())
    cfg["model"]["checkpoint"] = "elsewhere/r8.pt"  # as written relative to a config folder the run does not name
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "k3.onnx"
    args = ["export", str(moved), "--level", "k=3", "--spec", TWO_BIT, "--out", str(out)]
    # run.json's resolved path finds it ...
    assert main([*args[:-1], str(tmp_path / "found.onnx")]) == 0
    capsys.readouterr()
    # ... and a run without one (older runs) needs --checkpoint
    info = json.loads((moved / "run.json").read_text())
    assert info.pop("checkpoint_path") == str(trained_digits.absolute())
    (moved / "run.json").write_text(json.dumps(info))

    assert main(args) == 2
    err = capsys.readouterr().err
    assert "checkpoint 'elsewhere/r8.pt'" in err and "pass --checkpoint PATH" in err and len(err.strip().splitlines()) == 1
    other = tmp_path / "other.pt"
    other.write_bytes(trained_digits.read_bytes() + b"\0")
    assert main([*args, "--checkpoint", str(other)]) == 2
    assert "is not the run's model" in capsys.readouterr().err
    assert not out.exists()

    assert main([*args, "--checkpoint", str(trained_digits)]) == 0
    assert "weights from quantized again" in capsys.readouterr().out
    qmodel, _ = quant.quantize_model(load_checkpoint(trained_digits)[0].eval(), quant.QuantSpec(bits=2))
    x, _ = _digits_test()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    head, _ = level_head(read_run_info(moved), "k=3")
    with torch.no_grad():
        expected = head(qmodel(torch.from_numpy(x))).numpy()
    got = session.run(["scores"], {"input": x})[0]
    assert np.abs(got - expected).max() < 1e-4
    weights = json.loads(session.get_modelmeta().custom_metadata_map["quant.weights"])
    assert set(weights.values()) == {"uint2" if "uint2" in supported_types("DequantizeLinear", 25) else "uint4"}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--level", "k=4"], "--level 'k=4' is not a level of this run; levels: k=5, k=3"),
        (["--level", "k=5", "--spec", "nope"], f"--spec 'nope' is not a spec of this run; specs: {EIGHT_BIT}, {TWO_BIT}"),
    ],
)
def test_unknown_level_or_spec_is_one_line_listing_what_exists(run_dir, tmp_path, capsys, flags, message):
    assert main(["export", str(run_dir), *flags, "--out", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err.strip() == f"hiercluster export: error: {message}"
    assert not (tmp_path / "m.onnx").exists()


def test_out_must_be_an_onnx_file_name(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--level", "k=5", "--out", str(tmp_path / "m.hcq")]) == 2
    assert "use a name ending in .onnx" in capsys.readouterr().err


def test_disagreement_in_onnx_runtime_leaves_no_file(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_onnx, "check_in_runtime", lambda *args: (450, 0.99, 0.5, 0.9))
    out = tmp_path / "k5.onnx"
    assert main(["export", str(run_dir), "--level", "k=5", "--out", str(out)]) == 2
    assert "on only 99.00% of 450 samples" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# --- choosing the level, the spec and the head's names, on hand-made records ------------------------


def _info(**extra) -> dict:
    levels = {
        "k=5 a": {"k": 5, "kind": "learned", "assignment": [0, 1, 2, 3, 4, 4], "names": list("abcde"), "tree": "a"},
        "k=5 b": {"k": 5, "kind": "learned", "assignment": [0, 0, 1, 2, 3, 4], "names": list("vwxyz"), "tree": "b"},
        "reference": {"k": 5, "kind": "reference", "assignment": [0, 1, 1, 2, 3, 4], "names": list("pqrst")},
    }
    grid = [{"key": "k8", "tag": "s8"}, {"key": "k4", "tag": "s4"}, {"key": "k2", "tag": "s2"}]
    return {"levels": levels, "grid": grid, "tolerance": 1.0, "reduction": "prob_sum", **extra}


def _row(level: str, tag: str, bits: int, drop: float) -> dict:
    return {"level": level, "k": 5, "grouping": "learned", "acc_float": 0.9, "tag": tag, "spec_key": "k" + tag[1:],
            "bits": bits, "avg_bits": float(bits), "drop": drop, "drop_lo": None, "drop_hi": None}


ROWS = [_row(level, tag, bits, drop) for level in ("k=5 a", "k=5 b", "reference")
        for tag, bits, drop in (("s8", 8, 0.0), ("s4", 4, 0.5), ("s2", 2, 3.0))]


def test_k_means_the_tree_chosen_for_k():
    info = _info(tree_selection={"by_k": {"5": {"tree": "b"}}})
    assert resolve_level(info, ROWS, "k=5") == "k=5 b"
    assert resolve_level(info, ROWS, "k=5 a") == "k=5 a"  # any level of the run by its own name
    assert resolve_level(info, ROWS, "reference") == "reference"
    with pytest.raises(HierclusterError, match="levels: k=5 a, k=5 b, reference$"):
        resolve_level(_info(), ROWS, "k=5")  # no tree chosen: two learned levels of k=5


def test_the_default_spec_is_the_fewest_bits_within_tolerance():
    info = _info()
    assert choose_row(info, ROWS, "k=5 a", None)["tag"] == "s4"
    assert choose_row(info, ROWS, "k=5 a", "s2")["drop"] == 3.0
    strict = [{**r, "drop": r["drop"] + 2.0} for r in ROWS]
    with pytest.raises(HierclusterError, match=r"no spec is within .* \(specs: s8, s4, s2\)"):
        choose_row(info, strict, "k=5 a", None)


def test_head_names_follow_its_canonical_group_order():
    info = {"levels": {"k=2": {"k": 2, "kind": "learned", "assignment": [1, 0, 1], "names": ["x", "y"]}},
            "reduction": "mean_logit"}
    head, names = level_head(info, "k=2")
    assert head.assignment.tolist() == [0, 1, 0] and names == ["y", "x"]  # class 0 is in run group 1, "y"
    assert head.reduction == "mean_logit"
