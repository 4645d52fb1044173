"""Cases that passed before issue 9's rework, and the ones fixed first: encodings, lost models, plan names, numbers."""

from __future__ import annotations

from pathlib import Path

from bad_input_cases import Case, digits_config


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
    return ["train", str(digits_config(tmp)), "--out", str(tmp / "model.json"), "--set", "train.epochs=1"]


def _train_out_json_existing(tmp: Path) -> list[str]:
    (tmp / "model.json").write_text('{"a trained model": "that must survive"}')
    return ["train", str(digits_config(tmp)), "--out", str(tmp / "model.json"), "--overwrite", "--set", "train.epochs=1"]


def _train_out_folder(tmp: Path) -> list[str]:
    (tmp / "models").mkdir()
    return ["train", str(digits_config(tmp)), "--out", str(tmp / "models"), "--set", "train.epochs=1"]


def _plan_name_with_slash(tmp: Path) -> list[str]:
    return ["run", str(digits_config(tmp)), "--out", str(tmp / "run"), "--set", "quant.plans=[{name: x/../../ESCAPED}]"]


def _plan_name_dot(tmp: Path) -> list[str]:
    return ["run", str(digits_config(tmp)), "--out", str(tmp / "run"), "--set", "quant.plans=[{name: ..}]"]


def _calibration_on_eval_split(tmp: Path) -> list[str]:
    return ["run", str(digits_config(tmp)), "--out", str(tmp / "run"), "--set", "calibration.split=test"]


def _unknown_method(tmp: Path) -> list[str]:
    return ["run", str(digits_config(tmp)), "--out", str(tmp / "run"), "--set", "quant.methods=[hqq]"]


def _nan_tolerance(tmp: Path) -> list[str]:
    return ["run", str(digits_config(tmp)), "--out", str(tmp / "run"), "--set", "eval.tolerance=.nan"]


def _infinite_lr(tmp: Path) -> list[str]:
    return ["train", str(digits_config(tmp)), "--out", str(tmp / "m.pt"), "--set", "train.lr=.inf"]


def _huge_list_value(tmp: Path) -> list[str]:
    return ["run", str(digits_config(tmp)), "--out", str(tmp / "run"), "--set", "eval.seed=[" + ",".join(["1"] * 5000) + "]"]


CASES: dict[str, Case] = {
    "config in Latin-1": Case(_latin1_config, "is not UTF-8 text (byte 0xe9"),
    "config in UTF-16": Case(_utf16_config, "is not UTF-8 text"),
    "metadata JSON not UTF-8": Case(_latin1_metadata, "metadata file"),
    "train --out NAME.json": Case(_train_out_json, "would be written over the weights"),
    "train --out NAME.json --overwrite": Case(_train_out_json_existing, "would be written over the weights"),
    "train --out a folder": Case(_train_out_folder, "is a folder"),
    "plan name with a path": Case(_plan_name_with_slash, "quant.plans[0].name"),
    "plan name '..'": Case(_plan_name_dot, "quant.plans[0].name"),
    "calibration on the evaluation split": Case(_calibration_on_eval_split, "calibration.split"),
    "unknown method": Case(_unknown_method, "unknown method 'hqq'"),
    "NaN tolerance": Case(_nan_tolerance, "eval.tolerance: expected a finite number"),
    "infinite learning rate": Case(_infinite_lr, "train.lr: expected a finite number"),
    "a 5,000-item value where a number belongs": Case(_huge_list_value, "eval.seed: expected int, got [1, 1,"),
}


