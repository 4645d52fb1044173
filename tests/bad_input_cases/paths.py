"""Paths the file system refuses, values too big to quote, files that are not what they claim.

Review of issue 9: a name too long, a symbolic link loop, a path under a file, a
dangling link as ``--out``, a FIFO where a text file belongs, integers of thousands of
digits, names of megabytes in metadata, multi-line messages (a missing dataset, argparse's
usage block, torch's warnings), pickles that are not state_dicts, a plan setting out of
range, and a results database that is locked or not a file. Every path case goes through
the one mapping in ``hiercluster.cli.main`` (or :func:`hiercluster.errors.read_text`).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import sqlite3
from pathlib import Path
from typing import Any

from bad_input_cases import Case, copy_checkpoint, digits_config, finished_run

LONG_NAME = "x" * 300  # over the 255 bytes a name may have on every common file system
DIGITS_META = {
    "arch": "resnet8", "width": 8, "num_classes": 10, "in_channels": 1,
    "classes": [str(i) for i in range(10)], "dataset": "digits",
}  # fmt: skip


# --- builders -----------------------------------------------------------------------


def _loop(tmp: Path, name: str = "loop") -> Path:
    """A symbolic link that points to itself."""
    path = tmp / name
    os.symlink(path, path)
    return path


def _fake_checkpoint(tmp: Path, content: bytes, **meta: Any) -> Path:
    """``tmp/model.pt`` holding ``content``, with digits metadata (changed by ``meta``) beside it."""
    path = tmp / "model.pt"
    path.write_bytes(content)
    path.with_suffix(".json").write_text(json.dumps({**DIGITS_META, **meta}))
    return path


def _evaluate(path: Path) -> list[str]:
    return ["evaluate-checkpoint", str(path)]


def _with_checkpoint(tmp: Path) -> Path:
    copy_checkpoint(tmp)
    return digits_config(tmp, model={"checkpoint": "model.pt"})


# --- 1: paths the file system refuses -----------------------------------------------


def _config_name_too_long(tmp: Path) -> list[str]:
    return ["run", str(tmp / f"{LONG_NAME}.yaml"), "--out", str(tmp / "run")]


def _config_symlink_loop(tmp: Path) -> list[str]:
    return ["run", str(_loop(tmp, "config.yaml")), "--out", str(tmp / "run")]


def _config_under_a_file(tmp: Path) -> list[str]:
    (tmp / "afile").write_text("x")
    return ["run", str(tmp / "afile" / "config.yaml"), "--out", str(tmp / "run")]


def _train_out_too_long(tmp: Path) -> list[str]:
    return ["train", str(digits_config(tmp)), "--out", str(tmp / f"{LONG_NAME}.pt"), "--set", "train.epochs=1"]


def _run_out_too_long(tmp: Path) -> list[str]:
    return ["run", str(digits_config(tmp)), "--out", str(tmp / LONG_NAME)]


def _run_out_dangling(tmp: Path) -> list[str]:
    os.symlink(tmp / "nowhere" / "run", tmp / "dangling")
    return ["run", str(digits_config(tmp)), "--out", str(tmp / "dangling")]


def _run_out_loop(tmp: Path) -> list[str]:
    return ["run", str(digits_config(tmp)), "--out", str(_loop(tmp))]


def _checkpoint_too_long(tmp: Path) -> list[str]:
    config = digits_config(tmp, model={"checkpoint": f"{LONG_NAME}.pt"})
    return ["run", str(config), "--out", str(tmp / "run")]


def _packed_too_long(tmp: Path) -> list[str]:
    return ["evaluate", str(_with_checkpoint(tmp)), "--out", str(tmp / "run"), "--packed", str(tmp / f"{LONG_NAME}.hcq")]


def _report_too_long(tmp: Path) -> list[str]:
    return ["report", str(tmp / LONG_NAME)]


def _evaluate_checkpoint_too_long(tmp: Path) -> list[str]:
    return _evaluate(tmp / f"{LONG_NAME}.pt")


def _quantize_out_loop(tmp: Path) -> list[str]:
    return ["quantize", str(_with_checkpoint(tmp)), "--bits", "4", "--out", str(_loop(tmp, "m.hcq"))]


def _quantize_out_too_long(tmp: Path) -> list[str]:
    return ["quantize", str(_with_checkpoint(tmp)), "--bits", "4", "--out", str(tmp / f"{LONG_NAME}.hcq")]


def _unreadable_config(tmp: Path) -> list[str]:
    return ["run", str(digits_config(tmp)), "--out", str(tmp / "run")]


def _deny_reading_config(monkeypatch: Any, tmp: Path) -> None:
    """Opening the config fails as a file without read permission does (the tests run as root)."""
    real_open = os.open

    def fake_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.fsdecode(path) == str(tmp / "config.yaml"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


# --- 2: integers of thousands of digits ----------------------------------------------


def _set(tmp: Path, override: str, command: str = "run") -> list[str]:
    return [command, str(digits_config(tmp)), "--out", str(tmp / "run"), "--set", override]


# --- 3: values too long to quote --------------------------------------------------


def _metadata_arch_2mb(tmp: Path) -> list[str]:
    return _evaluate(_fake_checkpoint(tmp, b"", arch="a" * 2_000_000))


def _metadata_dataset_2mb(tmp: Path) -> list[str]:
    return _evaluate(_fake_checkpoint(tmp, b"", dataset="d" * 2_000_000))


def _metadata_class_with_newline(tmp: Path) -> list[str]:
    classes = [str(i) for i in range(9)] + ["nine\nline two\nline three\nline four"]
    return _evaluate(_fake_checkpoint(tmp, b"", classes=classes))


def _scheme_100kb(tmp: Path) -> list[str]:
    return ["quantize", str(_with_checkpoint(tmp)), "--bits", "4", "--out", str(tmp / "m.hcq"), "--scheme", "s" * 100_000]


def _plan_layer_bits_list(tmp: Path) -> list[str]:
    value = "[" + ",".join(["4"] * 60_000) + "]"
    return [
        "quantize", str(_with_checkpoint(tmp)), "--bits", "4", "--out", str(tmp / "m.hcq"), "--plan", "p",
        "--set", f"quant.plans=[{{name: p, layer_bits: {{conv1: {value}}}}}]",
    ]  # fmt: skip


# --- 4: one line, not a block -------------------------------------------------------


def _missing_dataset(tmp: Path) -> list[str]:
    (tmp / "empty").mkdir()
    checkpoint = _fake_checkpoint(tmp, b"", dataset="cifar10", in_channels=3)
    return ["evaluate-checkpoint", str(checkpoint), "--root", str(tmp / "empty")]


def _no_dataset_in_cwd(monkeypatch: Any, tmp: Path) -> None:
    """No copy of CIFAR-10 is found anywhere: the search list is the case's own folders."""
    import hiercluster.data.datasets as datasets

    monkeypatch.delenv("HIERCLUSTER_DATA", raising=False)
    monkeypatch.chdir(tmp)
    monkeypatch.setattr(datasets, "_PROJECT_DATA", tmp / "empty")


def _legacy_plain_pickle(tmp: Path) -> list[str]:
    return _evaluate(_fake_checkpoint(tmp, pickle.dumps({"fc.weight": [1.0]}, protocol=4)))


def _usage_missing_config(tmp: Path) -> list[str]:
    return ["run"]


def _usage_bad_int(tmp: Path) -> list[str]:
    return ["quantize", str(digits_config(tmp)), "--bits", "four", "--out", str(tmp / "m.hcq")]


def _line_break_in_a_file_name(tmp: Path) -> list[str]:
    return _evaluate(tmp / "two\nlines.pt")


# --- 5: pickles that are not state_dicts ----------------------------------------------


def _plain_pickle_protocol_0(tmp: Path) -> list[str]:
    return _evaluate(_fake_checkpoint(tmp, pickle.dumps({"a": 1}, protocol=0)))


def _whole_model(tmp: Path) -> list[str]:
    import io

    import torch

    from hiercluster.models.zoo import build_model

    buffer = io.BytesIO()
    torch.save(build_model("resnet8", 10, 1, width=8), buffer)
    return _evaluate(_fake_checkpoint(tmp, buffer.getvalue()))


# --- 6: FIFOs where a file belongs ------------------------------------------------------


def _config_fifo(tmp: Path) -> list[str]:
    os.mkfifo(tmp / "config.yaml")
    return ["run", str(tmp / "config.yaml"), "--out", str(tmp / "run")]


def _metadata_fifo(tmp: Path) -> list[str]:
    (tmp / "model.pt").write_bytes(b"")
    os.mkfifo(tmp / "model.json")
    return _evaluate(tmp / "model.pt")


def _checkpoint_fifo(tmp: Path) -> list[str]:
    (tmp / "model.json").write_text(json.dumps(DIGITS_META))
    os.mkfifo(tmp / "model.pt")
    return _evaluate(tmp / "model.pt")


# --- 7, 8: a plan out of range; a results database in use or not a file ----------------


def _plan_bits_99(tmp: Path) -> list[str]:
    return [
        "quantize", str(_with_checkpoint(tmp)), "--bits", "4", "--out", str(tmp / "m.hcq"), "--plan", "p",
        "--set", "quant.plans=[{name: p, layer_bits: {conv1: 99}}]",
    ]  # fmt: skip


_HELD: list[sqlite3.Connection] = []  # connections holding a database's lock until the next locked case


def _locked_database(tmp: Path) -> list[str]:
    _, run = finished_run(tmp)
    while _HELD:
        _HELD.pop().close()
    con = sqlite3.connect(run / "results.sqlite")
    con.execute("BEGIN EXCLUSIVE")  # what another program writing the file holds
    _HELD.append(con)
    return ["report", str(run)]


def _no_busy_wait(monkeypatch: Any, tmp: Path) -> None:
    """SQLite gives up on a lock at once instead of after its 5 s default (the case stays fast)."""
    real_connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: real_connect(*a, **{**k, "timeout": 0.05}))


def _database_fifo(tmp: Path) -> list[str]:
    config, run = finished_run(tmp)
    (run / "results.sqlite").unlink()
    os.mkfifo(run / "results.sqlite")
    return ["run", str(config), "--out", str(run), "--quiet"]


CASES: dict[str, Case] = {
    # 1: one mapping of OSError (and pathlib's symlink-loop RuntimeError) for every subcommand
    "config name too long": Case(_config_name_too_long, "File name too long; a name in it is longer"),
    "config is a symbolic link loop": Case(_config_symlink_loop, "Too many levels of symbolic links"),
    "config under a file": Case(_config_under_a_file, "Not a directory; a part of it that should be a folder is a file"),
    "train --out name too long": Case(_train_out_too_long, "File name too long"),
    "run --out name too long": Case(_run_out_too_long, "File name too long"),
    "run --out a dangling symbolic link": Case(_run_out_dangling, "is a symbolic link that leads nowhere"),
    "run --out a symbolic link loop": Case(_run_out_loop, "is a symbolic link that leads nowhere (or back to itself)"),
    "model.checkpoint name too long": Case(_checkpoint_too_long, "File name too long"),
    "evaluate --packed name too long": Case(_packed_too_long, "File name too long"),
    "report DIR name too long": Case(_report_too_long, "File name too long"),
    "evaluate-checkpoint name too long": Case(_evaluate_checkpoint_too_long, "File name too long"),
    "quantize --out a symbolic link loop": Case(_quantize_out_loop, "m.hcq is a symbolic link that leads nowhere (or back to itself)"),
    "quantize --out name too long": Case(_quantize_out_too_long, "File name too long"),
    "config without read permission": Case(_unreadable_config, "config.yaml cannot be read: Permission denied; make it readable", inject=_deny_reading_config),
    # 2: integers over Python's 4,300-digit conversion limit
    "train.epochs of 5,000 digits": Case(
        lambda tmp: _set(tmp, "train.epochs=" + "9" * 5000), "holds an integer of over 4,300 digits"
    ),
    "train.epochs of 4,000 hex digits": Case(
        lambda tmp: _set(tmp, "train.epochs=0x" + "f" * 4000), "got <an integer of about 4,817 digits>"
    ),
    "hierarchy.levels of 4,000 hex digits": Case(
        lambda tmp: _set(tmp, "hierarchy.levels=[0x" + "f" * 4000 + "]"), "hierarchy.levels[0]: must be >= 1"
    ),
    # 3: values quoted short
    "metadata arch of 2 MB": Case(_metadata_arch_2mb, "key 'arch': a name of 2,000,000 characters"),
    "metadata dataset of 2 MB": Case(_metadata_dataset_2mb, "key 'dataset': a name of 2,000,000 characters"),
    "metadata class name with line breaks": Case(_metadata_class_with_newline, "holds a line break or control character"),
    "data.dataset of 900 KB": Case(lambda tmp: _set(tmp, "data.dataset=" + "d" * 900_000), "ddd...; known: fashion_mnist"),
    "--scheme of 100 KB": Case(_scheme_100kb, "sss... is invalid; allowed:"),
    "plan layer_bits a list of 120 KB": Case(_plan_layer_bits_list, "layer_bits['conv1']=[4, 4,"),
    # 4: one line, not a block
    "dataset not found anywhere": Case(_missing_dataset, "in any of", inject=_no_dataset_in_cwd),
    "legacy plain pickle (torch warns)": Case(_legacy_plain_pickle, "is a plain Python pickle (of a dict), not a torch checkpoint"),
    "usage: a missing argument": Case(_usage_missing_config, "required: config (see hiercluster run --help)"),
    "usage: --bits four": Case(_usage_bad_int, "invalid int value: 'four' (see hiercluster quantize --help)"),
    "a file name with a line break": Case(_line_break_in_a_file_name, "two\\nlines.pt"),
    # 5: what a pickle holds, named plainly
    "plain pickle of a dict (protocol 0)": Case(_plain_pickle_protocol_0, "is a plain Python pickle (of a dict)"),
    "a whole pickled model": Case(
        _whole_model, "holds a whole pickled model (GLOBAL hiercluster.models.zoo.CifarResNet), not a state_dict"
    ),
    # 6: a FIFO is refused, never read (reading would hang)
    "config is a FIFO": Case(_config_fifo, "config.yaml is a named pipe (FIFO), not a file", bomb=True),
    "metadata JSON is a FIFO": Case(_metadata_fifo, "model.json is a named pipe (FIFO), not a file", bomb=True),
    "checkpoint is a FIFO": Case(_checkpoint_fifo, "model.pt is a named pipe (FIFO), not a file", bomb=True),
    # 7, 8
    "quantize --plan with a layer at 99 bits": Case(_plan_bits_99, "layer_bits['conv1']=99 is invalid"),
    "results database locked by another program": Case(
        _locked_database, "is in use by another program", inject=_no_busy_wait
    ),
    "results database is a FIFO": Case(_database_fifo, "results.sqlite is a named pipe (FIFO), not a database file"),
}


def _train_out_dangling_link(tmp: Path) -> list[str]:
    (tmp / "model.pt").symlink_to(tmp / "nowhere" / "model.pt")
    return ["train", str(digits_config(tmp)), "--out", str(tmp / "model.pt"), "--set", "train.epochs=1"]


def _report_database_fifo(tmp: Path) -> list[str]:
    (tmp / "run").mkdir()
    (tmp / "run" / "run.json").write_text("{}")
    os.mkfifo(tmp / "run" / "results.sqlite")
    return ["report", str(tmp / "run")]


CASES["train --out a dangling symbolic link"] = Case(_train_out_dangling_link, "leads nowhere")
CASES["report on a run whose results.sqlite is a FIFO"] = Case(_report_database_fifo, "is not a regular file")
