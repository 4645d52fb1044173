"""The run directory: its lock, a changed grid or hierarchy, damaged run files and databases, output paths."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from bad_input_cases import Case, digits_config
from bad_input_cases import copy_checkpoint as _copy_checkpoint
from bad_input_cases import finished_run as _finished_run

# Open lock files of the cases that hold a run directory's lock: closing one would release it.
_HELD: list[int] = []


def finished_run(tmp: Path) -> tuple[Path, Path]:
    """``bad_input_cases.finished_run`` without the progress bars of its one-time training on stderr.

    The harness captures stderr from before ``make`` runs, so the case that happens to
    train the session's checkpoint would otherwise see more than one line.
    """
    with contextlib.redirect_stderr(io.StringIO()):
        return _finished_run(tmp)


def copy_checkpoint(tmp: Path) -> Path:
    """``bad_input_cases.copy_checkpoint``, quiet like :func:`finished_run`."""
    with contextlib.redirect_stderr(io.StringIO()):
        return _copy_checkpoint(tmp)


def _hold_lock(run: Path) -> None:
    """Lock ``run`` as a running command would: flock conflicts between open files, even in one process."""
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": 4242, "command": "hiercluster run other.yaml", "started": time.time()}).encode())
    _HELD.append(fd)


def _run_while_locked(tmp: Path) -> list[str]:
    config, run = finished_run(tmp)
    _hold_lock(run)
    return ["run", str(config), "--out", str(run), "--quiet"]


def _report_while_locked(tmp: Path) -> list[str]:
    _, run = finished_run(tmp)
    _hold_lock(run)
    return ["report", str(run)]


def _grid_change(tmp: Path) -> list[str]:
    config, run = finished_run(tmp)
    return ["run", str(config), "--out", str(run), "--quiet", "--set", "quant.bits=[8, 4, 2]"]


def _retrained_checkpoint(tmp: Path) -> list[str]:
    config, run = finished_run(tmp)
    with open(tmp / "model.pt", "ab") as fh:  # other bytes under the same name: another model
        fh.write(b"retrained")
    return ["run", str(config), "--out", str(run), "--quiet"]


def _saved_config_damaged(tmp: Path) -> list[str]:
    config, run = finished_run(tmp)
    (run / "config.yaml").write_text("quant: {bitz: [4]}\n")
    return ["run", str(config), "--out", str(run), "--quiet"]


def _hierarchy_linkage_change(tmp: Path) -> list[str]:
    config, run = finished_run(tmp)
    return ["hierarchy", str(config), "--out", str(run), "--quiet", "--set", "hierarchy.linkage=average"]


def _edit_run_json(edit: Callable[[dict], None]) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        _, run = finished_run(tmp)
        info = json.loads((run / "run.json").read_text())
        edit(info)
        (run / "run.json").write_text(json.dumps(info))
        return ["report", str(run)]

    return make


def _set_assignment_text(info: dict) -> None:
    info["levels"]["k=3"]["assignment"] = "0,1,2"


def _set_grid_key_number(info: dict) -> None:
    info["grid"][0]["key"] = 5


def _set_accuracy_text(info: dict) -> None:
    info["float_accuracy"] = "high"


def _set_assignment_out_of_range(info: dict) -> None:
    info["levels"]["k=2"]["assignment"][0] = 7


def _drop_levels(info: dict) -> None:
    del info["levels"]


def _run_json_not_json(tmp: Path) -> list[str]:
    _, run = finished_run(tmp)
    (run / "run.json").write_text('{"dataset": "digits", ')
    return ["report", str(run)]


def _edit_hierarchy_json(edit: Callable[[dict], None]) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        _, run = finished_run(tmp)
        data = json.loads((run / "hierarchy.json").read_text())
        edit(data)
        (run / "hierarchy.json").write_text(json.dumps(data))
        return ["report", str(run)]

    return make


def _set_matrix_text(data: dict) -> None:
    data["graph"]["hiercluster"]["linkage_matrix"][0][2] = "far"


def _set_members_number(data: dict) -> None:
    data["nodes"][0]["members"] = 0


def _damage_results_pages(path: Path) -> None:
    """Overwrite the start of the results table's root page: a real damaged page, not a damaged header."""
    with sqlite3.connect(path) as con:
        root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'results'").fetchone()[0]
        page = con.execute("PRAGMA page_size").fetchone()[0]
    con.close()
    with open(path, "r+b") as fh:
        fh.seek((root - 1) * page)
        fh.write(b"\xff" * 64)


def _report_damaged_database(tmp: Path) -> list[str]:
    _, run = finished_run(tmp)
    _damage_results_pages(run / "results.sqlite")
    return ["report", str(run)]


def _run_damaged_database(tmp: Path) -> list[str]:
    config, run = finished_run(tmp)
    _damage_results_pages(run / "results.sqlite")
    return ["run", str(config), "--out", str(run), "--quiet"]


def _result_of_wrong_type(tmp: Path) -> list[str]:
    _, run = finished_run(tmp)
    with sqlite3.connect(run / "results.sqlite") as con:
        con.execute("UPDATE results SET \"drop\" = 'a lot'")
    con.close()
    return ["report", str(run)]


def _database_is_a_folder(tmp: Path) -> list[str]:
    config, run = finished_run(tmp)
    (run / "results.sqlite").unlink()
    (run / "results.sqlite").mkdir()
    return ["run", str(config), "--out", str(run), "--quiet"]


def _quantize_out_folder(tmp: Path) -> list[str]:
    (tmp / "models").mkdir()
    return ["quantize", str(digits_config(tmp)), "--bits", "4", "--out", str(tmp / "models"), "--overwrite"]


def _quantize_out_under_a_file(tmp: Path) -> list[str]:
    (tmp / "notes.txt").write_text("mine")
    return ["quantize", str(digits_config(tmp)), "--bits", "4", "--out", str(tmp / "notes.txt" / "m.hcq")]


def _quantize_out_run_file(tmp: Path) -> list[str]:
    config, run = finished_run(tmp)
    return ["quantize", str(config), "--bits", "4", "--out", str(run / "results.sqlite"), "--overwrite"]


def _quantize_report_over_run_json(tmp: Path) -> list[str]:
    config, run = finished_run(tmp)
    return ["quantize", str(config), "--bits", "4", "--out", str(run / "run"), "--overwrite"]  # report: run/run.json


def _run_out_a_file(tmp: Path) -> list[str]:
    (tmp / "results.txt").write_text("mine")
    return ["run", str(digits_config(tmp)), "--out", str(tmp / "results.txt"), "--quiet"]


def _hierarchy_out_under_a_file(tmp: Path) -> list[str]:
    (tmp / "results.txt").write_text("mine")
    return ["hierarchy", str(digits_config(tmp)), "--out", str(tmp / "results.txt" / "run"), "--quiet"]


def _report_no_run(tmp: Path) -> list[str]:
    (tmp / "folder").mkdir()
    (tmp / "folder" / "notes.txt").write_text("mine")
    return ["report", str(tmp / "folder")]


def _report_missing_folder(tmp: Path) -> list[str]:
    return ["report", str(tmp / "no-such-run")]


def _skip_every_layer(tmp: Path) -> list[str]:
    ckpt = copy_checkpoint(tmp)
    config = digits_config(tmp, model={"checkpoint": ckpt.name}, quant={"plans": [{"name": "none", "skip": ["*"]}]})
    return ["run", str(config), "--out", str(tmp / "run"), "--quiet"]


def _evaluate_packed_folder(tmp: Path) -> list[str]:
    (tmp / "model.hcq").mkdir()
    return ["evaluate", str(digits_config(tmp)), "--packed", str(tmp / "model.hcq"), "--out", str(tmp / "run"), "--quiet"]


def _run_file_is_a_folder(tmp: Path) -> list[str]:
    config, run = finished_run(tmp)
    (run / "run.json").unlink()
    (run / "run.json").mkdir()
    return ["run", str(config), "--out", str(run), "--quiet"]


def _report_with_lock(make_lock: Callable[[Path, Path], None]) -> Callable[[Path], list[str]]:
    """``report`` on a finished run whose ``.lock`` was made by ``make_lock(lock path, user's file)``."""

    def make(tmp: Path) -> list[str]:
        _, run = finished_run(tmp)
        precious = tmp / "precious.txt"
        precious.write_text("the user's own words\n")
        make_lock(run / ".lock", precious)
        return ["report", str(run)]

    return make


def _lock_symlink(lock: Path, precious: Path) -> None:
    lock.symlink_to(precious)


def _lock_hard_link(lock: Path, precious: Path) -> None:
    os.link(precious, lock)


def _lock_fifo(lock: Path, precious: Path) -> None:
    os.mkfifo(lock)


def _lock_folder(lock: Path, precious: Path) -> None:
    lock.mkdir()


def _other_checkpoint(tmp: Path) -> Path:
    """``m2.pt``: the session's checkpoint with other classifier weights (another tree), metadata beside it."""
    import torch

    ckpt = copy_checkpoint(tmp)
    state = torch.load(ckpt, weights_only=True)
    state["fc.weight"] = torch.randn(state["fc.weight"].shape, generator=torch.Generator().manual_seed(7))
    torch.save(state, tmp / "m2.pt")
    (tmp / "m2.json").write_text(ckpt.with_suffix(".json").read_text())
    return tmp / "m2.pt"


def _hierarchy_other_checkpoint(tmp: Path) -> list[str]:
    config, run = finished_run(tmp)
    m2 = _other_checkpoint(tmp)
    return ["hierarchy", str(config), "--out", str(run), "--quiet", "--set", f"model.checkpoint={m2}"]


def _forced_run_refused_after_load(override: str) -> Callable[[Path], list[str]]:
    """``run --force`` with another checkpoint and ``override``, a mistake found once the model is loaded.

    The refusal must come before the float evaluation: the run's logits cache stays as it was.
    """

    def make(tmp: Path) -> list[str]:
        config, run = finished_run(tmp)
        m2 = _other_checkpoint(tmp)
        return ["run", str(config), "--out", str(run), "--quiet", "--force", "--set", f"model.checkpoint={m2}",
                "--set", override]

    return make


def _edit_specs(sql: str) -> Callable[[Path], list[str]]:
    """``report`` after ``sql`` edited the results database of a finished run."""

    def make(tmp: Path) -> list[str]:
        _, run = finished_run(tmp)
        with sqlite3.connect(run / "results.sqlite") as con:
            con.execute(sql)
        con.close()
        return ["report", str(run)]

    return make


def _run_folder_is_a_file(name: str, command: str) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        config, run = finished_run(tmp)
        if (run / name).is_dir():
            for p in (run / name).iterdir():
                p.unlink()
            (run / name).rmdir()
        (run / name).write_text("a file where the run keeps a folder\n")
        return [command, str(config), "--out", str(run), "--quiet"]

    return make


CASES: dict[str, Case] = {
    "run while another command holds the lock": Case(
        _run_while_locked, "is in use by process 4242 (hiercluster run other.yaml) since"
    ),
    "report while another command holds the lock": Case(_report_while_locked, "is in use by process 4242"),
    "another grid into a finished run": Case(
        _grid_change, "holds a run of another grid (quant.bits: [4, 2] -> [8, 4, 2]; grid: 1 spec added)"
    ),
    "another checkpoint into a finished run": Case(_retrained_checkpoint, "checkpoint bytes: sha256"),
    "a run whose saved config.yaml is damaged": Case(_saved_config_damaged, "config.yaml cannot be read"),
    "hierarchy with another linkage into a finished run": Case(_hierarchy_linkage_change, "linkage ward -> average"),
    "run.json: an assignment that is text": Case(
        _edit_run_json(_set_assignment_text), "run.json is damaged: levels.k=3.assignment: expected a list of an integer"
    ),
    "run.json: a spec key that is a number": Case(
        _edit_run_json(_set_grid_key_number), "run.json is damaged: grid[0].key: expected a string, got 5"
    ),
    "run.json: an accuracy that is text": Case(
        _edit_run_json(_set_accuracy_text), "run.json is damaged: float_accuracy: expected a number, got 'high'"
    ),
    "run.json: a group id out of range": Case(_edit_run_json(_set_assignment_out_of_range), "run.json is damaged: levels.k=2"),
    "run.json: no levels": Case(_edit_run_json(_drop_levels), "run.json is damaged: the top level: the key 'levels' is missing"),
    "run.json: not JSON": Case(_run_json_not_json, "run.json is damaged: not valid JSON"),
    "hierarchy.json: a merge height that is text": Case(
        _edit_hierarchy_json(_set_matrix_text), "is damaged: graph.hiercluster.linkage_matrix[0][2]: expected a number"
    ),
    "hierarchy.json: members that are a number": Case(
        _edit_hierarchy_json(_set_members_number), "is damaged: nodes[0].members: expected a list"
    ),
    "damaged database pages (report)": Case(_report_damaged_database, "results.sqlite is damaged (Page"),
    "damaged database pages (run)": Case(_run_damaged_database, "results.sqlite is damaged (Page"),
    "a result edited into text": Case(_result_of_wrong_type, "results.sqlite is damaged (the drop of spec"),
    "results.sqlite is a folder": Case(_database_is_a_folder, "results.sqlite is a folder"),
    "run.json is a folder": Case(_run_file_is_a_folder, "run.json is a folder"),
    "quantize --out a folder": Case(_quantize_out_folder, "is a folder; give a file name"),
    "quantize --out under a file": Case(_quantize_out_under_a_file, "notes.txt is a file, not a folder"),
    "quantize --out a run's database": Case(_quantize_out_run_file, "would replace the run directory's own results.sqlite"),
    "quantize --out whose report is a run's run.json": Case(
        _quantize_report_over_run_json, "would replace the run directory's own run.json"
    ),
    "run --out an existing file": Case(_run_out_a_file, "results.txt is a file, not a folder"),
    "hierarchy --out under a file": Case(_hierarchy_out_under_a_file, "results.txt is a file, not a folder"),
    "report on a folder that holds no run": Case(_report_no_run, "is not a hiercluster run directory (no run.json)"),
    "report on a missing folder": Case(_report_missing_folder, "run directory not found"),
    "a plan that skips every layer": Case(_skip_every_layer, "plan 'none' leaves every layer"),
    "evaluate --packed a folder": Case(_evaluate_packed_folder, "is a folder; give a packed model file"),
    ".lock is a symbolic link to a user's file": Case(
        _report_with_lock(_lock_symlink), ".lock is a symbolic link, not the lock file this tool keeps there"
    ),
    ".lock is a hard link to a user's file": Case(
        _report_with_lock(_lock_hard_link), ".lock is a file with other names (a hard link), not the lock file"
    ),
    ".lock is a named pipe": Case(_report_with_lock(_lock_fifo), ".lock is a named pipe, not the lock file"),
    ".lock is a folder (report)": Case(_report_with_lock(_lock_folder), ".lock is a folder, not the lock file"),
    "hierarchy of another checkpoint into a finished run": Case(
        _hierarchy_other_checkpoint, "holds a run whose hierarchy differs from this one"
    ),
    "run --force, another checkpoint, a level k above the class count": Case(
        _forced_run_refused_after_load("hierarchy.levels=[50, 2]"), "hierarchy.levels: k=50 is outside 1..10"
    ),
    "run --force, another checkpoint, a missing reference grouping": Case(
        _forced_run_refused_after_load("hierarchy.reference=nowhere.yaml"), "hierarchy.reference: file not found"
    ),
    "run --force, another checkpoint, hierarchy.names with an unknown class": Case(
        _forced_run_refused_after_load("hierarchy.names={Odd: ['1', 'eleven']}"), "unknown class 'eleven'"
    ),
    "specs: a prediction share that is an object": Case(
        _edit_specs("""UPDATE specs SET prediction_share = '{"a": 1}'"""),
        "prediction_share: expected a list of a number, got {'a': 1}",
    ),
    "specs: layers that are numbers": Case(
        _edit_specs("UPDATE specs SET layers = '[1, 2]'"), "layers[0]: expected an object, got 1"
    ),
    "specs: a spec that is text": Case(
        _edit_specs("""UPDATE specs SET spec_json = '"4-bit"'"""), "spec: expected an object, got '4-bit'"
    ),
    "specs: a prediction share of another length": Case(
        _edit_specs("UPDATE specs SET prediction_share = '[0.5, 0.5]'"), "prediction_share has 2 values for 10 classes"
    ),
    "specs: a spec's details deleted": Case(_edit_specs("DELETE FROM specs"), "has results but no details"),
    "results: a drop set to NULL": Case(_edit_specs('UPDATE results SET "drop" = NULL'), "' is missing); move it away"),
    "models is a file (run)": Case(
        _run_folder_is_a_file("models", "run"), "models is a file, but a run directory keeps its models folder there"
    ),
    "levels is a file (hierarchy)": Case(
        _run_folder_is_a_file("levels", "hierarchy"), "levels is a file, but a run directory keeps its levels folder"
    ),
}
