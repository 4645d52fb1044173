"""Bad input through the CLI: exit 2, one line on stderr, no traceback, nothing the user had changed.

Table-driven (issue 9): the cases live in ``tests/bad_input_cases/``, one module per
area. Each case builds its files in a temporary folder, runs ``hiercluster.cli.main``
and checks the promise above, hashing every file in the folder before and after.
Memory and time bombs run in a child process under ``RLIMIT_AS`` and a timeout, so a
regression fails the test instead of taking the machine down.
"""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import bad_input_cases
from bad_input_cases import Case
from hiercluster.cli import main

# Enough for Python, torch and a small run; far below what any of the bombs would take.
BOMB_MEMORY = 6 * 1024**3
BOMB_SECONDS = 60


def _all_cases() -> dict[str, Case]:
    cases: dict[str, Case] = {}
    for info in pkgutil.iter_modules(bad_input_cases.__path__):
        module = importlib.import_module(f"bad_input_cases.{info.name}")
        for name, case in getattr(module, "CASES", {}).items():
            assert name not in cases, f"case {name!r} is defined twice"
            cases[f"{info.name}: {name}"] = case
    return cases


CASES = _all_cases()


def _snapshot(folder: Path) -> dict[str, str]:
    """A fingerprint of every file: its SHA-256, or size and mtime for huge (sparse) files."""
    prints = {}
    for p in folder.rglob("*"):
        if p.is_file():
            stat = p.stat()
            if stat.st_size > 64 * 1024**2:
                prints[str(p.relative_to(folder))] = f"{stat.st_size}:{stat.st_mtime_ns}"
                continue
            digest = hashlib.sha256()
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
            prints[str(p.relative_to(folder))] = digest.hexdigest()
    return prints


def _run_bomb(argv: list[str], tmp: Path) -> tuple[int, str]:
    """``main(argv)`` in a child process limited to ``BOMB_MEMORY`` bytes of address space and ``BOMB_SECONDS``."""
    code = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({BOMB_MEMORY}, {BOMB_MEMORY}))\n"
        "from hiercluster.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp, capture_output=True, text=True, timeout=BOMB_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {BOMB_SECONDS} s: {argv}")
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line_and_changes_nothing(name, tmp_path, capsys, monkeypatch):
    case = CASES[name]
    argv = case.make(tmp_path)
    capsys.readouterr()  # what making the case printed is not the command's output
    before = _snapshot(tmp_path)
    if case.bomb:
        rc, err = _run_bomb(argv, tmp_path)
    else:
        if case.inject is not None:
            case.inject(monkeypatch, tmp_path)
        rc = main(argv)
        monkeypatch.undo()
        err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert case.expect in lines[0], lines[0]
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing the user had changed
    assert not (tmp_path.parent / "ESCAPED").exists()


def test_the_table_holds_at_least_60_cases():
    assert len(CASES) >= 60, len(CASES)


@pytest.mark.parametrize("reader, what", [("grouping", "grouping file"), ("hierarchy", "hierarchy file"), ("yaml", "YAML file")])
def test_text_files_in_another_encoding_are_named(reader, what, tmp_path):
    from hiercluster.yamlio import read_yaml
    from hiercluster.errors import HierclusterError
    from hiercluster.hierarchy.clustering import ClassHierarchy, read_groups

    path = tmp_path / "file.txt"
    path.write_bytes("caf\xe9: [zero]\n".encode("latin-1"))
    read = {"grouping": read_groups, "hierarchy": ClassHierarchy.from_json, "yaml": read_yaml}[reader]
    with pytest.raises(HierclusterError, match=f"{what} .* is not UTF-8 text \\(byte 0xe9 at offset 3\\)"):
        read(path)


def test_error_messages_quote_only_the_start_of_a_huge_value(tmp_path, capsys):
    from bad_input_cases.basic import _huge_list_value

    argv = _huge_list_value(tmp_path)
    assert main(argv) == 2
    assert len(capsys.readouterr().err) < 300


def test_a_plan_that_skips_every_layer_is_refused():
    import torch.nn as nn

    import quant

    with pytest.raises(quant.QuantError, match="plan 'none' leaves every layer of Sequential float"):
        quant.quantize_model(nn.Sequential(nn.Linear(4, 2)), quant.QuantSpec(bits=4), quant.QuantPlan(name="none", skip=("*",)))


def _run_with_file_size_limit(argv: list[str], limit: int, cwd: Path) -> tuple[int, str]:
    """``main(argv)`` in a child whose files may not grow past ``limit`` bytes: writes then fail
    with EFBIG (SIGXFSZ ignored), as on a full disk; this needs no root and no special file system."""
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "from hiercluster.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


def test_a_full_disk_at_any_point_exits_2_keeps_finished_specs_and_a_rerun_finishes(tmp_path):
    from bad_input_cases import SMALL_GRID, copy_checkpoint, digits_config
    from hiercluster.run.store import ResultsStore

    copy_checkpoint(tmp_path)
    config = digits_config(tmp_path, model={"checkpoint": "model.pt"}, **SMALL_GRID)
    argv = ["run", str(config), "--out", str(tmp_path / "run"), "--quiet"]
    codes = []
    for limit in (20_000, 60_000, 150_000):  # the run stops at a later point each time: logits, database, report
        code, err = _run_with_file_size_limit(argv, limit, tmp_path)
        codes.append(code)
        if code != 0:
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
            assert "free space and re-run" in lines[0], lines[0]
        if (tmp_path / "run" / "results.sqlite").is_file():
            with ResultsStore(tmp_path / "run" / "results.sqlite") as store:
                done = store.done_keys()
            assert len(done) <= 2
    assert 2 in codes
    assert main(argv) == 0
    with ResultsStore(tmp_path / "run" / "results.sqlite") as store:
        assert len(store.done_keys()) == 2
