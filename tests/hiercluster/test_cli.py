"""CLI and config: train/evaluate-checkpoint end to end on digits; bad input exits 2 with one line."""

import json

import pytest
import yaml

from hiercluster.cli import main
from hiercluster.config import load_config
from hiercluster.errors import HierclusterError


def test_train_then_evaluate(tmp_path, capsys):
    out = tmp_path / "ckpt" / "r8.pt"
    rc = main(["train", "configs/digits.yaml", "--out", str(out), "--set", "train.epochs=2"])
    assert rc == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    for key in ("dataset", "arch", "epochs", "seed", "test_accuracy", "wall_time_s", "versions", "classes"):
        assert key in meta
    assert meta["epochs"] == 2 and meta["dataset"] == "digits" and "torch" in meta["versions"]
    capsys.readouterr()
    assert main(["evaluate-checkpoint", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{meta['test_accuracy'] * 100:.2f}%" in printed
    # A second train to the same path refuses to overwrite what is there.
    before = out.read_bytes()
    assert main(["train", "configs/digits.yaml", "--out", str(out), "--set", "train.epochs=1"]) == 2
    assert out.read_bytes() == before and "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.epoch=3", "did you mean 'train.epochs'"),
        ("data.batch_size=abc", "data.batch_size: expected int"),
        ("trian.epochs=3", "unknown config key 'trian'; did you mean 'train'"),
        ("data.eval_split=val", "is not one of train, test"),
    ],
)
def test_config_errors_exit_2_with_one_line(override, message, capsys):
    assert main(["train", "configs/digits.yaml", "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_files_exit_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["evaluate-checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "nope" in capsys.readouterr().err


def test_usage_error_exits_2():
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2


def test_load_config_types_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"dataset": "digits"}, "train": {"lr": 1}}))
    cfg = load_config(path, ["train.epochs=3", "model.arch=resnet8"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.train.epochs == 3
    assert cfg.model.arch == "resnet8" and cfg.data.batch_size == 128
    path.write_text("- just\n- a list\n")
    with pytest.raises(HierclusterError, match="top level must be a mapping"):
        load_config(path)
    path.write_text("data: {dataset: [unclosed\n")
    with pytest.raises(HierclusterError, match="not valid YAML"):
        load_config(path)
