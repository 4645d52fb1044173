"""Bad input through the CLI: exit 2, one line on stderr, no traceback, nothing the user had changed.

Table-driven (issue 9). Each case builds its files in a temporary folder, runs
``hiercluster.cli.main`` and checks the promise above, hashing every file in the folder
before and after. Cases that would do real work stop at input checks, so each takes
well under a second.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from hiercluster.cli import main

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "configs" / "digits.yaml"


def _digits_config(tmp: Path, extra: str = "") -> Path:
    path = tmp / "config.yaml"
    path.write_text(DIGITS.read_text() + extra, encoding="utf-8")
    return path


def _latin1_config(tmp: Path) -> list[str]:
    path = tmp / "latin1.yaml"
    path.write_bytes("data:\n  dataset: digits  # caf\xe9\n".encode("latin-1"))
    return ["run", str(path), "--out", str(tmp / "run")]


def _utf16_config(tmp: Path) -> list[str]:
    path = tmp / "utf16.yaml"
    path.write_bytes("data:\n  dataset: digits\n".encode("utf-16"))
    return ["run", str(path), "--out", str(tmp / "run")]


def _fake_checkpoint(tmp: Path) -> Path:
    """A checkpoint file whose metadata JSON beside it is not UTF-8."""
    ckpt = tmp / "model.pt"
    ckpt.write_bytes(b"not really a checkpoint")
    ckpt.with_suffix(".json").write_bytes(b'{"arch": "resnet8", "note": "\xff\xfe"}')
    return ckpt


def _latin1_metadata(tmp: Path) -> list[str]:
    return ["evaluate-checkpoint", str(_fake_checkpoint(tmp))]


def _train_out_json(tmp: Path) -> list[str]:
    return ["train", str(_digits_config(tmp)), "--out", str(tmp / "model.json"), "--set", "train.epochs=1"]


def _train_out_json_existing(tmp: Path) -> list[str]:
    (tmp / "model.json").write_text('{"a trained model": "that must survive"}')
    return ["train", str(_digits_config(tmp)), "--out", str(tmp / "model.json"), "--overwrite", "--set", "train.epochs=1"]


def _train_out_folder(tmp: Path) -> list[str]:
    (tmp / "models").mkdir()
    return ["train", str(_digits_config(tmp)), "--out", str(tmp / "models"), "--set", "train.epochs=1"]


def _plan_name_with_slash(tmp: Path) -> list[str]:
    return ["run", str(_digits_config(tmp)), "--out", str(tmp / "run"), "--set", "quant.plans=[{name: x/../../ESCAPED}]"]


def _plan_name_dot(tmp: Path) -> list[str]:
    return ["run", str(_digits_config(tmp)), "--out", str(tmp / "run"), "--set", "quant.plans=[{name: ..}]"]


def _calibration_on_eval_split(tmp: Path) -> list[str]:
    return ["run", str(_digits_config(tmp)), "--out", str(tmp / "run"), "--set", "calibration.split=test"]


def _unknown_method(tmp: Path) -> list[str]:
    return ["run", str(_digits_config(tmp)), "--out", str(tmp / "run"), "--set", "quant.methods=[hqq]"]


def _nan_tolerance(tmp: Path) -> list[str]:
    return ["run", str(_digits_config(tmp)), "--out", str(tmp / "run"), "--set", "eval.tolerance=.nan"]


def _infinite_lr(tmp: Path) -> list[str]:
    return ["train", str(_digits_config(tmp)), "--out", str(tmp / "m.pt"), "--set", "train.lr=.inf"]


def _huge_list_value(tmp: Path) -> list[str]:
    return ["run", str(_digits_config(tmp)), "--out", str(tmp / "run"), "--set", "eval.seed=[" + ",".join(["1"] * 5000) + "]"]


CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "config in Latin-1": (_latin1_config, "is not UTF-8 text (byte 0xe9"),
    "config in UTF-16": (_utf16_config, "is not UTF-8 text"),
    "metadata JSON not UTF-8": (_latin1_metadata, "metadata file"),
    "train --out NAME.json": (_train_out_json, "would be written over the weights"),
    "train --out NAME.json --overwrite": (_train_out_json_existing, "would be written over the weights"),
    "train --out a folder": (_train_out_folder, "is a folder"),
    "plan name with a path": (_plan_name_with_slash, "quant.plans[0].name"),
    "plan name '..'": (_plan_name_dot, "quant.plans[0].name"),
    "calibration on the evaluation split": (_calibration_on_eval_split, "calibration.split"),
    "unknown method": (_unknown_method, "unknown method 'hqq'"),
    "NaN tolerance": (_nan_tolerance, "eval.tolerance: expected a finite number"),
    "infinite learning rate": (_infinite_lr, "train.lr: expected a finite number"),
    "a 5,000-item value where a number belongs": (_huge_list_value, "eval.seed: expected int, got [1, 1,"),
}


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_changes_nothing(case, tmp_path, capsys):
    make, expected = CASES[case]
    argv = make(tmp_path)
    before = _snapshot(tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing the user had changed
    assert not (tmp_path.parent / "ESCAPED").exists()


@pytest.mark.parametrize("reader, what", [("grouping", "grouping file"), ("hierarchy", "hierarchy file"), ("yaml", "YAML file")])
def test_text_files_in_another_encoding_are_named(reader, what, tmp_path):
    from hiercluster.config import read_yaml
    from hiercluster.errors import HierclusterError
    from hiercluster.hierarchy import ClassHierarchy, read_groups

    path = tmp_path / "file.txt"
    path.write_bytes("caf\xe9: [zero]\n".encode("latin-1"))
    read = {"grouping": read_groups, "hierarchy": ClassHierarchy.from_json, "yaml": read_yaml}[reader]
    with pytest.raises(HierclusterError, match=f"{what} .* is not UTF-8 text \\(byte 0xe9 at offset 3\\)"):
        read(path)


def test_error_messages_quote_only_the_start_of_a_huge_value(tmp_path, capsys):
    argv = _huge_list_value(tmp_path)
    assert main(argv) == 2
    assert len(capsys.readouterr().err) < 300


def test_a_plan_that_skips_every_layer_is_refused():
    import torch.nn as nn

    import quant

    with pytest.raises(quant.QuantError, match="plan 'none' leaves every layer of Sequential float"):
        quant.quantize_model(nn.Sequential(nn.Linear(4, 2)), quant.QuantSpec(bits=4), quant.QuantPlan(name="none", skip=("*",)))
