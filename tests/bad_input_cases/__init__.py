"""Case tables of ``tests/test_bad_inputs.py``, one module per area, and what they share.

Each module defines ``CASES: dict[str, Case]``. A case builds its files in a fresh
temporary folder and returns the command line; the harness runs it and checks the
promise of issue 9: exit 2, one line on stderr naming the problem (``expect`` is a
substring of it), no traceback, and no file that was in the folder before changed.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "configs" / "digits.yaml"


@dataclass(frozen=True)
class Case:
    """One bad input.

    make : builds the case's files under the given folder and returns ``argv`` for
        ``hiercluster.cli.main``.
    expect : a substring of the single stderr line.
    bomb : run in a subprocess under a memory limit (``RLIMIT_AS``) and a time limit,
        for inputs that used to exhaust memory or hang.
    inject : ``inject(monkeypatch, folder)`` before the command runs, for faults that
        cannot be made with files alone (a full disk, a read-only folder when the tests
        run as root).
    """

    make: Callable[[Path], list[str]]
    expect: str
    bomb: bool = False
    inject: Callable[[Any, Path], None] | None = None


def digits_config(tmp: Path, extra: str = "", name: str = "config.yaml", **sections: dict[str, Any]) -> Path:
    """The shipped digits config written into ``tmp``.

    ``sections`` are merged into it key by key (``quant={"bits": [4]}``); ``extra`` is raw
    text appended after (for cases about the text itself).
    """
    import yaml

    data = yaml.safe_load(DIGITS.read_text())
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path = tmp / name
    path.write_text(yaml.safe_dump(data, sort_keys=False) + extra, encoding="utf-8")
    return path


_CACHE: dict[str, Path] = {}


def _session_folder(prefix: str) -> Path:
    """A temporary folder for what the session computes once, removed when the test process exits."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(functools.partial(shutil.rmtree, folder, ignore_errors=True))
    return folder


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def trained_digits() -> Path:
    """A resnet8 trained on digits for one epoch (trained once per test session); returns the .pt path."""
    if "ckpt" not in _CACHE:
        from hiercluster.cli import main

        folder = _session_folder("bad-inputs-ckpt-")
        out = folder / "model.pt"
        with _quiet():  # the first call may come from a case's make(): keep its stderr for the case
            assert main(["train", str(DIGITS), "--out", str(out), "--set", "train.epochs=1"]) == 0
        _CACHE["ckpt"] = out
    return _CACHE["ckpt"]


def copy_checkpoint(tmp: Path) -> Path:
    """The session's trained digits checkpoint and its metadata, copied into ``tmp``."""
    src = trained_digits()
    for p in (src, src.with_suffix(".json")):
        shutil.copy(p, tmp / p.name)
    return tmp / src.name


SMALL_GRID = {"quant": {"schemes": ["asymmetric"], "bits": [4, 2]}, "eval": {"random_seeds": 3}}


def finished_run(tmp: Path) -> tuple[Path, Path]:
    """A finished digits run (small grid) copied into ``tmp/run``; returns ``(config, run dir)``.

    The config beside it points at a checkpoint copied into ``tmp``; the run is computed
    once per session and copied for each case.
    """
    ckpt = copy_checkpoint(tmp)
    config = digits_config(tmp, model={"checkpoint": ckpt.name}, **SMALL_GRID)
    if "run" not in _CACHE:
        from hiercluster.cli import main

        folder = _session_folder("bad-inputs-run-")
        ref_ckpt = copy_checkpoint(folder)
        ref_config = digits_config(folder, model={"checkpoint": ref_ckpt.name}, **SMALL_GRID)
        with _quiet():
            assert main(["run", str(ref_config), "--out", str(folder / "run"), "--quiet"]) == 0
        _CACHE["run"] = folder / "run"
    shutil.copytree(_CACHE["run"], tmp / "run")
    return config, tmp / "run"
