"""CLI and config: train/evaluate-checkpoint end to end on digits; bad input exits 2 with one line."""

import errno
import json
import os
import sqlite3

import pytest
import yaml

from hiercluster.cli import main, storage_problem
from hiercluster.config import load_config
from hiercluster.errors import HierclusterError, path_problem


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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["no-such-command"], "hiercluster: error: argument COMMAND: invalid choice: 'no-such-command'"),
        (["run"], "hiercluster run: error: the following arguments are required: config (see hiercluster run --help)"),
        (["quantize", "c.yaml", "--out", "m.hcq", "--bits", "x" * 100_000], "hiercluster quantize: error: argument --bits"),
    ],
)
def test_usage_error_exits_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.err.count("\n") == 1 and len(captured.err) < 400
    assert "usage:" not in captured.err and captured.out == ""


def test_help_exits_0(capsys):
    assert main(["run", "--help"]) == 0
    assert "usage: hiercluster run" in capsys.readouterr().out


# --- the one mapping of OSError for a path the user gave -------------------------------


@pytest.mark.parametrize(
    "code, advice",
    [
        (errno.ENAMETOOLONG, "File name too long; a name in it is longer than the file system allows"),
        (errno.ELOOP, "Too many levels of symbolic links; a symbolic link in it leads back to itself"),
        (errno.ENOTDIR, "Not a directory; a part of it that should be a folder is a file"),
        (errno.EISDIR, "Is a directory; it is a folder; give a file"),
        (errno.ENOENT, "No such file or directory; no such file or folder"),
        (errno.EEXIST, "File exists; something is already there"),
        (errno.ENXIO, "No such device or address; it is a device or named pipe with nothing at the other end"),
    ],
)
def test_path_problem_names_the_path_and_the_cause(code, advice):
    exc = OSError(code, os.strerror(code), "/some/where")
    assert path_problem(exc).startswith(f"cannot use /some/where: {advice}")


def test_path_problem_cuts_a_long_path_in_the_middle():
    exc = OSError(errno.ENAMETOOLONG, "File name too long", "/a/" + "x" * 5000 + ".yaml")
    text = path_problem(exc)
    assert text.startswith("cannot use /a/xxx") and "...xxx" in text and ".yaml: File name too long" in text
    assert len(text) < 400


def test_path_problem_leaves_other_errors_alone():
    assert path_problem(OSError(errno.ENOENT, "No such file or directory")) is None  # no path: not the user's
    assert path_problem(OSError(errno.EIO, "Input/output error", "/x")) is None
    assert path_problem(RuntimeError("CUDA error")) is None
    assert path_problem(ValueError("x")) is None


def test_pathlibs_symlink_loop_is_a_path_problem(tmp_path):
    loop = tmp_path / "m.hcq"
    loop.symlink_to(loop)
    try:
        loop.resolve()
    except (RuntimeError, OSError) as exc:  # RuntimeError before Python 3.13, OSError(ELOOP) since
        assert path_problem(exc) == (
            f"cannot use {loop}: Too many levels of symbolic links; a symbolic link in it leads back to itself; "
            "fix or remove the link"
        )
    else:
        pytest.fail("resolve() followed a symbolic link loop")


def test_a_dangling_symbolic_link_is_named_as_one(tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "nowhere" / "run")
    with pytest.raises(FileExistsError) as err:
        (tmp_path / "out").mkdir(parents=True, exist_ok=True)
    assert "is a symbolic link that leads nowhere (or back to itself)" in path_problem(err.value)


def test_permission_denied_on_reading_does_not_say_write(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    path.write_bytes(b"x")
    monkeypatch.setattr(os, "access", lambda p, mode: mode != os.R_OK)  # as for a file mode 000, even as root
    exc = PermissionError(errno.EACCES, "Permission denied", str(path))
    assert storage_problem(exc, "run") is None
    assert path_problem(exc) == f"cannot use {path}: Permission denied; it cannot be read; make it readable or give another file"


def test_permission_denied_in_an_unwritable_folder_says_write(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda p, mode: mode != os.W_OK)
    exc = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "new.pt"))
    assert storage_problem(exc, "run") == (
        f"cannot write {tmp_path / 'new.pt'} (Permission denied); finished specs are saved; "
        "make it writable or choose another --out, and re-run"
    )


def test_permission_denied_that_os_access_cannot_explain_fits_both(tmp_path):
    exc = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x"))  # root: os.access says yes
    if os.access(tmp_path, os.W_OK):
        assert "readable, or writable for an output" in path_problem(exc)


# --- the results database ------------------------------------------------------------------


def test_a_locked_database_is_in_use(tmp_path):
    exc = sqlite3.OperationalError("database is locked")
    assert storage_problem(exc, "run", tmp_path / "results.sqlite") == (
        f"the results database {tmp_path / 'results.sqlite'} is in use by another program (SQLite: database is locked); "
        "finished specs are saved; close that program (or wait for it) and re-run"
    )


def test_a_database_that_is_a_fifo_is_named_as_one_not_a_full_disk(tmp_path):
    os.mkfifo(tmp_path / "results.sqlite")
    exc = sqlite3.OperationalError("disk I/O error")
    assert storage_problem(exc, "run", tmp_path / "results.sqlite") == (
        f"the results database {tmp_path / 'results.sqlite'} is a named pipe (FIFO), not a database file; "
        "move it away and re-run"
    )
    assert "free space" in storage_problem(exc, "run", tmp_path / "other.sqlite")


def test_main_maps_an_oserror_from_any_command_to_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / ("x" * 300))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hiercluster report: error: cannot use ") and "File name too long" in err
    assert err.count("\n") == 1


def test_main_keeps_the_traceback_of_an_unexpected_oserror(monkeypatch):
    import hiercluster.cli as cli

    def broken(args):
        raise OSError(errno.EIO, "Input/output error")  # no path: a bug or a failing disk, not a user's mistake

    monkeypatch.setattr(cli, "cmd_report", broken)
    with pytest.raises(OSError, match="Input/output error"):
        main(["report", "x"])


def test_quantize_a_plan_out_of_range_is_one_line(tmp_path, capsys):
    argv = ["quantize", "configs/digits.yaml", "--bits", "4", "--out", str(tmp_path / "m.hcq"), "--plan", "p",
            "--set", "quant.plans=[{name: p, layer_bits: {conv1: 99}}]"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "config section quant: QuantPlan.layer_bits['conv1']=99 is invalid" in err and err.count("\n") == 1


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


def test_a_message_quoting_a_line_break_stays_one_line(tmp_path, capsys):
    assert main(["evaluate-checkpoint", str(tmp_path / "two\nlines.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "two\\nlines.json" in err
