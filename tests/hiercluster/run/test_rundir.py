"""The run directory: its lock (with real second processes), path checks, records and the grid-change check."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hiercluster.errors import HierclusterError
from hiercluster.run.config import load_config, save_config
from hiercluster.run.rundir import (
    FIGURE_FILES,
    LOCK_FILE,
    RunLock,
    check_is_run,
    check_output_file,
    check_run_dir,
    check_same_grid,
    evaluation_path,
    exported_model_path,
    level_groups_path,
    level_yaml_path,
    packed_model_path,
    read_manifest,
    read_run_info,
    write_json,
)

# A child process that takes the lock, says so, and holds it until its stdin closes.
HOLDER = textwrap.dedent(
    """
    import sys
    from hiercluster.run.rundir import RunLock
    lock = RunLock(sys.argv[1], "hiercluster run held.yaml")
    lock.acquire()
    print("locked", flush=True)
    sys.stdin.read()
    lock.release()
    """
)


def _holder(run: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_at_once_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    proc = _holder(run)
    try:
        with pytest.raises(HierclusterError) as info:
            RunLock(run, "hiercluster run mine.yaml").acquire()
        message = str(info.value)
        assert f"run directory {run} is in use by process {proc.pid} (hiercluster run held.yaml) since " in message
        assert message.endswith("wait for it to finish or use another --out")
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == proc.pid  # the refused attempt changed nothing
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert not (run / LOCK_FILE).exists()  # released and removed
    with RunLock(run, "hiercluster run mine.yaml"):
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_the_lock_of_a_killed_process_does_not_block(tmp_path):
    run = tmp_path / "run"
    proc = _holder(run)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == proc.pid  # the stale file stays behind
    with RunLock(run, "hiercluster report run"):
        holder = json.loads((run / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "hiercluster report run"
    check_run_dir(run)  # a folder holding only a stale lock file was never a user's folder


def test_one_process_cannot_take_the_lock_twice(tmp_path):
    with RunLock(tmp_path, "first"):
        with pytest.raises(HierclusterError, match=r"in use by process \d+ \(first\)"):
            RunLock(tmp_path, "second", other_out=False).acquire()


def test_a_lock_that_created_the_folder_removes_it_when_nothing_was_written(tmp_path):
    with RunLock(tmp_path / "a", "run"):
        assert (tmp_path / "a").is_dir()
    assert not (tmp_path / "a").exists()
    with RunLock(tmp_path / "b", "run"):
        (tmp_path / "b" / "run.json").write_text("{}")
    assert (tmp_path / "b" / "run.json").is_file() and not (tmp_path / "b" / LOCK_FILE).exists()


def test_run_dir_checks(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(HierclusterError, match="is a file, not a folder; give a folder"):
        check_run_dir(tmp_path / "file")
    with pytest.raises(HierclusterError, match=f"{tmp_path / 'file'} is a file, not a folder; choose another path"):
        check_run_dir(tmp_path / "file" / "run")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(HierclusterError, match="not a hiercluster run directory"):
        check_run_dir(tmp_path / "user")
    (tmp_path / "run" / "results.sqlite").mkdir(parents=True)
    (tmp_path / "run" / "run.json").write_text("{}")
    with pytest.raises(HierclusterError, match="results.sqlite is a folder"):
        check_run_dir(tmp_path / "run")
    check_run_dir(tmp_path / "new" / "run")  # missing folders are created later


def test_is_run_and_output_file_checks(tmp_path):
    with pytest.raises(HierclusterError, match="run directory not found"):
        check_is_run(tmp_path / "missing")
    with pytest.raises(HierclusterError, match=r"not a hiercluster run directory \(no run.json\)"):
        check_is_run(tmp_path)
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(HierclusterError, match=r"\(no results.sqlite\)"):
        check_is_run(tmp_path)
    with pytest.raises(HierclusterError, match="would replace the run directory's own results.csv"):
        check_output_file(tmp_path / "results.csv")
    with pytest.raises(HierclusterError, match="is a folder; give a file name"):
        check_output_file(tmp_path)
    check_output_file(tmp_path / "model.hcq")
    check_output_file(tmp_path / "elsewhere" / "results.csv")  # not in a run directory: any name


def _run_info(**changes) -> dict:
    info = {
        "dataset": "digits", "eval_split": "test", "n_eval": 3, "checkpoint": "m.pt", "checkpoint_sha256": "ab" * 32,
        "class_names": ["a", "b", "c"], "float_accuracy": 0.9, "float_prediction_share": [0.3, 0.3, 0.4],
        "reduction": "prob_sum", "random_seeds": 3, "tolerance": 1, "hierarchy": {"embedding": "fc_weights",
        "linkage": "ward", "metric": "cosine"},
        "levels": {"k=3": {"k": 3, "kind": "learned", "assignment": [0, 1, 2], "names": ["a", "b", "c"]},
                   "k=2": {"k": 2, "kind": "learned", "assignment": [0, 0, 1], "names": ["a+b", "c"]}},
        "grid": [{"key": "k1", "tag": "asymmetric-4b-minmax-per_channel+full"}],
    }
    info.update(changes)
    return info


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"grid": [{"key": 1, "tag": "t"}]}, "grid[0].key: expected a string, got 1"),
        ({"tolerance": None}, "tolerance: expected a number, got None"),
        ({"hierarchy": {"embedding": "fc_weights", "linkage": 3, "metric": None}}, "hierarchy.linkage: expected a string or null"),
        ({"float_prediction_share": [1.0]}, "float_prediction_share has 1 entries for 3 classes"),
        ({"device": 0}, "device: expected a string, got 0"),
        ({"levels": {}}, "levels: no level"),
        ({"levels": {"k=2": {"k": 2, "kind": "learned", "assignment": [0, 0, True], "names": ["x", "y"]}}},
         "levels.k=2.assignment[2]: expected an integer, got True"),
        ({"levels": {"k=2": {"k": 2, "kind": "learned", "assignment": [0, 0, 2], "names": ["x", "y"]}}},
         "levels.k=2: 2 groups need 3 assignments in 0..1 and 2 names"),
        ({"calibration": {"split": "train"}}, "calibration: the key 'samples' is missing"),
    ],
)
def test_run_info_of_wrong_shape_is_named_damaged(tmp_path, changes, message):
    write_json(tmp_path / "run.json", _run_info(**changes))
    with pytest.raises(HierclusterError) as info:
        read_run_info(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'run.json'} is damaged: {message}")
    assert str(info.value).endswith("run `hiercluster run` again on this folder")


def test_run_info_reads_what_the_pipeline_writes(tmp_path):
    write_json(tmp_path / "run.json", _run_info())  # a run recorded before run.json named its device
    assert read_run_info(tmp_path)["levels"]["k=2"]["assignment"] == [0, 0, 1]
    write_json(tmp_path / "run.json", _run_info(device="cuda"))
    assert read_run_info(tmp_path)["device"] == "cuda"
    (tmp_path / "run.json").write_text("[" * 100_000)
    with pytest.raises(HierclusterError, match="is damaged: not valid JSON"):
        read_run_info(tmp_path)


def test_write_json_leaves_the_old_record_when_writing_fails(tmp_path):
    path = write_json(tmp_path / "run.json", {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["run.json"]


@pytest.fixture()
def saved_run(tmp_path):
    """A run directory's records of the config ``quant.bits=[4, 2]`` (no model needed to compare grids)."""
    cfg = load_config(None, ["data.dataset=digits", "quant.bits=[4, 2]", "eval.random_seeds=20"])
    save_config(cfg, tmp_path / "config.yaml")
    tags = ["asymmetric-4b", "asymmetric-2b"]
    write_json(tmp_path / "run.json", _run_info(grid=[{"key": f"k{i}", "tag": t} for i, t in enumerate(tags)]))
    return tmp_path, tags


def test_another_grid_is_refused_listing_what_differs(saved_run):
    out, tags = saved_run
    cfg = load_config(None, ["data.dataset=digits", "quant.bits=[4, 2, 8]", "eval.random_seeds=50"])
    with pytest.raises(HierclusterError) as info:
        check_same_grid(cfg, [*tags, "asymmetric-8b"], out, "ab" * 32, force=False)
    message = str(info.value)
    assert "(quant.bits: [4, 2] -> [4, 2, 8]; eval.random_seeds: 20 -> 50; grid: 1 spec added)" in message
    assert "pass --force" in message and len(message.splitlines()) == 1
    check_same_grid(cfg, [*tags, "asymmetric-8b"], out, "ab" * 32, force=True)


def test_what_does_not_change_results_is_no_grid_change(saved_run):
    out, tags = saved_run
    same = ["data.dataset=digits", "quant.bits=[4, 2]", "eval.random_seeds=20"]
    cfg = load_config(None, [*same, "runtime.workers=3", "data.batch_size=7", "train.epochs=1", "output.dir=x"])
    check_same_grid(cfg, tags, out, "ab" * 32, force=False)


def test_removed_specs_and_another_checkpoint_are_listed(saved_run):
    out, tags = saved_run
    cfg = load_config(None, ["data.dataset=digits", "quant.bits=[4, 2]", "eval.random_seeds=20"])
    with pytest.raises(HierclusterError, match=r"\(grid: 1 removed; checkpoint bytes: sha256 abababababab -> cdcdcdcdcdcd\)"):
        check_same_grid(cfg, tags[:1], out, "cd" * 32, force=False)


def test_a_damaged_run_json_does_not_block_the_run_that_rewrites_it(saved_run):
    out, tags = saved_run
    (out / "run.json").write_text("{")
    cfg = load_config(None, ["data.dataset=digits", "quant.bits=[4, 2]", "eval.random_seeds=20"])
    check_same_grid(cfg, tags, out, "ab" * 32, force=False)


# --- the lock file itself, and the run's own folders ----------------------------------------


def _symlink(lock: Path, target: Path) -> None:
    lock.symlink_to(target)


def _hard_link(lock: Path, target: Path) -> None:
    os.link(target, lock)


def _fifo(lock: Path, target: Path) -> None:
    os.mkfifo(lock)


def _folder(lock: Path, target: Path) -> None:
    lock.mkdir()


@pytest.mark.parametrize(
    "make, what",
    [(_symlink, "a symbolic link"), (_hard_link, r"a file with other names \(a hard link\)"), (_fifo, "a named pipe"),
     (_folder, "a folder")],
)
def test_a_lock_path_that_is_not_a_plain_file_is_refused_and_left_alone(tmp_path, make, what):
    run = tmp_path / "run"
    run.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("mine\n")
    make(run / LOCK_FILE, precious)
    with pytest.raises(HierclusterError, match=f"{run / LOCK_FILE} is {what}, not the lock file this tool keeps there; "
                       "move it away and run again"):
        RunLock(run, "hiercluster report run").acquire()
    assert precious.read_text() == "mine\n" and os.path.lexists(run / LOCK_FILE)


def test_a_dangling_lock_symlink_creates_nothing_at_its_target(tmp_path):
    (tmp_path / LOCK_FILE).symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(HierclusterError, match="is a symbolic link"):
        RunLock(tmp_path, "hiercluster run x").acquire()
    assert not (tmp_path / "elsewhere.txt").exists()


@pytest.mark.parametrize("name", ["levels", "models", "packed"])
def test_a_file_where_the_run_keeps_a_folder_is_refused(tmp_path, name):
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / name).write_text("mine")
    with pytest.raises(HierclusterError, match=f"{tmp_path / name} is a file, but a run directory keeps its {name} folder"):
        check_run_dir(tmp_path)


# --- the model manifest ----------------------------------------------------------------------


def _manifest(**entry_changes) -> dict:
    entry = {"model": "asymmetric-4b.hcq", "spec_key": "k1", "groups": "k2_groups.yaml", "bits": 4, "method": "rtn",
             "tag": "asymmetric-4b", "drop_pp": 0.5}
    entry.update(entry_changes)
    return {"reduction": "prob_sum", "levels": {"k=2": entry}}


def test_a_manifest_reads_back_as_written(tmp_path):
    write_json(tmp_path / "manifest.json", _manifest())
    assert read_manifest(tmp_path / "manifest.json") == _manifest()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"reduction": "prob_sum", "levels": []}, "levels: expected dict, got []"),
        (_manifest(bits="4"), "levels.k=2.bits: expected an integer, got '4'"),
        (_manifest(model="../../outside.hcq"), "levels.k=2.model: '../../outside.hcq' is not a file name ending in .hcq"),
        (_manifest(model="notes.txt"), "levels.k=2.model: 'notes.txt' is not a file name ending in .hcq"),
        (_manifest(groups=".hidden_groups.yaml"), "levels.k=2.groups: '.hidden_groups.yaml' is not a file name"),
    ],
)
def test_a_damaged_manifest_is_named(tmp_path, data, message):
    write_json(tmp_path / "manifest.json", data)
    with pytest.raises(HierclusterError) as info:
        read_manifest(tmp_path / "manifest.json")
    assert str(info.value).startswith(f"{tmp_path / 'manifest.json'} is damaged: {message}")


def test_a_deeply_nested_manifest_is_damaged_not_a_recursion_error(tmp_path):
    (tmp_path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(HierclusterError, match="is damaged: not valid JSON"):
        read_manifest(tmp_path / "manifest.json")


def test_a_huge_level_name_is_quoted_only_in_part(tmp_path):
    write_json(tmp_path / "manifest.json", {"reduction": "prob_sum", "levels": {"k" * 100_000: 3}})
    with pytest.raises(HierclusterError, match=r"is damaged: levels\.k+\.\.\.: expected an object, got 3") as info:
        read_manifest(tmp_path / "manifest.json")
    assert len(str(info.value)) < 300


# --- the run directory's file names live here only -------------------------------------------


def test_each_file_of_a_run_directory_has_its_path_here(tmp_path):
    # By hand: the layout DESIGN.md describes.
    assert packed_model_path(tmp_path, "0123abcd") == tmp_path / "packed" / "0123abcd.hcq"
    assert level_yaml_path(tmp_path, 12) == tmp_path / "levels" / "k12.yaml"
    assert exported_model_path(tmp_path, "asymmetric-4b+full") == tmp_path / "models" / "asymmetric-4b+full.hcq"
    assert level_groups_path(tmp_path, "k=12") == tmp_path / "models" / "k12_groups.yaml"
    assert evaluation_path(tmp_path, Path("elsewhere") / "m4.hcq") == tmp_path / "evaluations" / "m4.json"
    assert {name: Path(file).suffix for name, file in FIGURE_FILES.items()} == dict.fromkeys(
        ["dendrogram", "drop_vs_bits", "pareto", "quartiles", "prediction_share", "frontier"], ".png"
    )


def test_the_manifest_accepts_the_names_the_export_writes(tmp_path):
    entry = {"model": exported_model_path(tmp_path, "a-4b").name, "groups": level_groups_path(tmp_path, "k=2").name}
    write_json(tmp_path / "manifest.json", _manifest(**entry))
    assert read_manifest(tmp_path / "manifest.json")["levels"]["k=2"]["groups"] == "k2_groups.yaml"


def _run_dir_names() -> set[str]:
    """The file names (and name endings) of a run directory, which no module but rundir may spell."""
    from hiercluster.run import rundir

    return {
        *rundir.RUN_FILES, *rundir.FIGURE_FILES.values(), rundir.MANIFEST_FILE, rundir.MODEL_SUFFIX,
        rundir.GROUPS_SUFFIX,
    }


def test_no_other_module_spells_a_run_directory_file_name():
    import ast

    import hiercluster

    names = _run_dir_names()
    root = Path(hiercluster.__file__).parent
    spelled = [
        f"{path.relative_to(root)}:{node.lineno} {node.value!r}"
        for path in sorted(root.rglob("*.py"))
        if path.name != "rundir.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value in names  # also the parts of an f-string
    ]
    assert spelled == []


def test_all_lists_every_public_name():
    import inspect

    from hiercluster.run import rundir

    public = {
        name for name, value in vars(rundir).items()
        if not name.startswith("_") and not inspect.ismodule(value)
        and getattr(value, "__module__", rundir.__name__) == rundir.__name__  # not what it imports
    }
    assert sorted(rundir.__all__) == sorted(public)
