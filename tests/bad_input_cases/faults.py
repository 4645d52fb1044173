"""A full disk and a folder that cannot be written: exit 2, one line, nothing finished lost.

The tests run as root in CI, where file modes do not stop writes, so these faults are
injected where the operating system would raise them: ``open``/``os.open``/``mkdir``
raise ``OSError`` with the errno a read-only or full file system gives, and SQLite is
limited to the pages its database already has (``PRAGMA max_page_count``), which makes
its next insert fail with its own "database or disk is full". A real full disk (a
file-size limit) is exercised in ``tests/test_bad_inputs.py``.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path
from typing import Any

from bad_input_cases import Case, SMALL_GRID, copy_checkpoint, digits_config, finished_run


def _inside(path: Any, folder: Path) -> bool:
    try:
        return Path(os.fsdecode(path)).resolve().is_relative_to(folder.resolve())
    except (TypeError, ValueError):
        return False  # a file descriptor, not a path


def _fail_writes(monkeypatch: Any, folder: Path, code: int, only: str | None = None) -> None:
    """Every write into ``folder`` (or only to files named ``only``) raises ``OSError(code)``."""

    def hit(path: Any) -> bool:
        name = Path(os.fsdecode(path)).name if _inside(path, folder) else None
        # files are written through a temporary ".NAME.*.tmp" beside them, then renamed
        return name is not None and (only is None or name == only or name.startswith(f".{only}."))

    def error(path: Any) -> OSError:
        return OSError(code, os.strerror(code), os.fsdecode(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if any(c in mode for c in "wax+") and hit(file):
            raise error(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and hit(path):
            raise error(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if hit(path):
            raise error(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def _read_only_run_dir(tmp: Path) -> list[str]:
    config, run = finished_run(tmp)
    return ["run", str(config), "--out", str(run), "--quiet"]


def _read_only_new_run_dir(tmp: Path) -> list[str]:
    copy_checkpoint(tmp)
    config = digits_config(tmp, model={"checkpoint": "model.pt"}, **SMALL_GRID)
    return ["run", str(config), "--out", str(tmp / "runs" / "new"), "--quiet"]


def _read_only_checkpoint_folder(tmp: Path) -> list[str]:
    (tmp / "models").mkdir()
    return ["train", str(digits_config(tmp)), "--out", str(tmp / "models" / "m.pt"), "--set", "train.epochs=1"]


def _report_on_full_disk(tmp: Path) -> list[str]:
    _, run = finished_run(tmp)
    return ["report", str(run)]


def _quantize_on_full_disk(tmp: Path) -> list[str]:
    copy_checkpoint(tmp)
    config = digits_config(tmp, model={"checkpoint": "model.pt"})
    (tmp / "out").mkdir()
    return ["quantize", str(config), "--bits", "4", "--out", str(tmp / "out" / "m.hcq")]


def _train_overwrite_on_full_disk(tmp: Path) -> list[str]:
    ckpt = copy_checkpoint(tmp)  # the model the user has: --overwrite must not leave it half-written
    return ["train", str(digits_config(tmp)), "--out", str(ckpt), "--overwrite", "--set", "train.epochs=1"]


def _database_full(tmp: Path) -> list[str]:
    copy_checkpoint(tmp)
    config = digits_config(tmp, model={"checkpoint": "model.pt"}, **SMALL_GRID)
    return ["run", str(config), "--out", str(tmp / "run"), "--quiet"]


def _limit_database_pages(monkeypatch: Any, tmp: Path) -> None:
    """The first spec is saved; then the database may not grow, so the second spec's rows do not fit."""
    from hiercluster.run.store import ResultsStore

    real_add = ResultsStore.add_spec
    calls = []

    def add_spec(self: ResultsStore, *args: Any, **kwargs: Any) -> None:
        if calls:
            pages = self._con.execute("PRAGMA page_count").fetchone()[0]
            self._con.execute(f"PRAGMA max_page_count = {pages}")
        calls.append(1)
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(ResultsStore, "add_spec", add_spec)


CASES: dict[str, Case] = {
    "read-only run directory": Case(
        _read_only_run_dir, "Read-only file system", inject=lambda mp, tmp: _fail_writes(mp, tmp / "run", errno.EROFS)
    ),
    "read-only folder for a new run directory": Case(
        _read_only_new_run_dir, "Read-only file system", inject=lambda mp, tmp: _fail_writes(mp, tmp / "runs", errno.EROFS)
    ),
    "train into a folder without write permission": Case(
        _read_only_checkpoint_folder, "Permission denied", inject=lambda mp, tmp: _fail_writes(mp, tmp / "models", errno.EACCES)
    ),
    "disk full while writing report.md": Case(
        _report_on_full_disk, "no space left on the device",
        inject=lambda mp, tmp: _fail_writes(mp, tmp / "run", errno.ENOSPC, only="report.md"),
    ),
    "disk full while writing a packed model": Case(
        _quantize_on_full_disk, "no space left on the device", inject=lambda mp, tmp: _fail_writes(mp, tmp / "out", errno.ENOSPC)
    ),
    "disk full while train --overwrite replaces a model": Case(
        _train_overwrite_on_full_disk, "no space left on the device",
        inject=lambda mp, tmp: _fail_writes(mp, tmp, errno.ENOSPC),
    ),
    "results database full": Case(_database_full, "finished specs are saved; free space and re-run", inject=_limit_database_pages),
}
