"""CLI and config: train/evaluate-checkpoint end to end on digits; bad input exits 2 with one line."""

import errno
import json
import os
import sqlite3

import pytest
import yaml

from hiercluster.cli import main, storage_problem
from hiercluster.run.config import load_config
from hiercluster.errors import HierclusterError, path_problem


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """A resnet8 (width 8) trained on digits for 2 epochs (about 70% test accuracy), with its metadata JSON."""
    import torch

    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("ckpt") / "ckpt" / "r8.pt"
    assert main(["train", "configs/digits.yaml", "--out", str(out), "--set", "train.epochs=2", "--threads", "1"]) == 0
    torch.set_num_threads(before)  # --threads set it for the whole process
    return out


@pytest.fixture
def keep_threads():
    """Restore torch's thread count after a test that lets a command change it."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_train_then_evaluate(digits_model, tmp_path, capsys):
    out = digits_model
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
    assert err.count("\n") == 1 and "two\\nlines.pt" in err


# --- issue 10: runtime options, plain state_dicts, warnings, saved evaluations ------------------


def _subcommands() -> dict:
    import argparse

    from hiercluster.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_subcommand_takes_threads_and_every_flag_has_help():
    commands = _subcommands()
    assert set(commands) == {"train", "evaluate-checkpoint", "run", "hierarchy", "quantize", "evaluate", "report", "sensitivity", "export"}
    for name, parser in commands.items():
        flags = {opt for action in parser._actions for opt in action.option_strings}
        assert "--threads" in flags, name
        assert ("--limit" in flags) == (name in ("run", "evaluate", "evaluate-checkpoint", "sensitivity")), name
        for action in parser._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"


def test_version_names_hiercluster_and_torch(capsys):
    import hiercluster

    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"hiercluster {hiercluster.__version__} (torch ") and out.count("\n") == 1


@pytest.mark.parametrize("flag", ["--threads", "--limit", "--batch-size", "--width", "--num-classes"])
@pytest.mark.parametrize("value", ["0", "-3", "two", "10" * 3000])
def test_count_flags_refuse_what_is_not_a_positive_whole_number(flag, value, capsys):
    assert main(["evaluate-checkpoint", "model.pt", flag, value]) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: expected a whole number from 1 to" in err and err.count("\n") == 1 and len(err) < 400


def test_threads_come_from_the_flag_else_the_config_else_the_cores(digits_model, tmp_path, keep_threads, capsys):
    import torch

    from hiercluster.cli import available_cores

    assert main(["evaluate-checkpoint", str(digits_model), "--threads", "1", "--limit", "10"]) == 0
    assert torch.get_num_threads() == 1
    assert main(["report", str(tmp_path / "no-run"), "--threads", "3"]) == 2  # set before the run is looked at
    assert torch.get_num_threads() == 3
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset": "digits"}, "model": {"checkpoint": str(digits_model)},
                                      "runtime": {"threads": 1}}))  # fmt: skip
    out = str(tmp_path / "h")
    assert main(["hierarchy", str(config), "--out", out, "--quiet"]) == 0
    assert torch.get_num_threads() == 1
    assert main(["hierarchy", str(config), "--out", out, "--quiet", "--threads", "2"]) == 0  # the flag wins
    assert torch.get_num_threads() == 2
    assert main(["hierarchy", str(config), "--out", out, "--quiet", "--set", "runtime.threads=null"]) == 0
    assert torch.get_num_threads() == available_cores()
    capsys.readouterr()


def test_evaluate_checkpoint_on_a_stratified_subset_says_so(digits_model, capsys):
    assert main(["evaluate-checkpoint", str(digits_model), "--limit", "50"]) == 0
    assert "(50 of 450 test images, a stratified subset): accuracy" in capsys.readouterr().out
    assert main(["evaluate-checkpoint", str(digits_model), "--limit", "451"]) == 2
    assert "more than the 450 images of the test split of digits" in capsys.readouterr().err


def test_evaluate_checkpoint_of_a_plain_state_dict_needs_arch(digits_model, tmp_path, capsys):
    plain = tmp_path / "plain.pt"
    plain.write_bytes(digits_model.read_bytes())  # the weights alone: no metadata JSON beside them
    meta = json.loads(digits_model.with_suffix(".json").read_text())
    assert main(["evaluate-checkpoint", str(plain), "--arch", "resnet8", "--width", "8", "--dataset", "digits"]) == 0
    out = capsys.readouterr().out
    assert f"{plain}: resnet8 on digits (test split, 450 images): accuracy {meta['test_accuracy'] * 100:.2f}%" in out
    for argv, message in [
        ([], "has no metadata file plain.json beside it: pass its architecture with --arch NAME"),
        (["--arch", "resnet8", "--width", "8"], "no metadata naming its dataset; pass --dataset NAME"),
        (["--arch", "resnet8", "--dataset", "digits"], "file (8, 1, 3, 3) vs model (16, 1, 3, 3)"),
        (["--arch", "resnet8", "--width", "8", "--dataset", "digits", "--num-classes", "5"],
         "--num-classes 5: the data has 10 classes"),
    ]:  # fmt: skip
        assert main(["evaluate-checkpoint", str(plain), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    # With metadata, the flags may only repeat it.
    assert main(["evaluate-checkpoint", str(digits_model), "--arch", "resnet8", "--width", "8"]) == 0
    capsys.readouterr()
    assert main(["evaluate-checkpoint", str(digits_model), "--arch", "resnet20"]) == 2
    assert "--arch 'resnet20' contradicts the metadata" in capsys.readouterr().err


def test_evaluate_checkpoint_takes_a_config(digits_model, tmp_path, capsys):
    plain = tmp_path / "plain.pt"
    plain.write_bytes(digits_model.read_bytes())
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset": "digits", "limit": 40}, "model": {"arch": "resnet8", "width": 8}}))
    assert main(["evaluate-checkpoint", str(plain), "--config", str(config)]) == 0
    assert "resnet8 on digits (40 of 450 test images, a stratified subset)" in capsys.readouterr().out
    assert main(["evaluate-checkpoint", str(plain), "--config", str(config), "--limit", "30"]) == 0  # the flag wins
    assert "(30 of 450 test images" in capsys.readouterr().out


def _always_class_0(checkpoint, tmp_path):
    """A plain state_dict of ``checkpoint``'s model that predicts class 0 for every image: 10% on digits' test split."""
    import torch

    state = torch.load(checkpoint, weights_only=True)
    state["fc.bias"][0] = 1e4  # the fc rows stay as trained: the hierarchy still has directions to cluster
    path = tmp_path / "dead.pt"
    torch.save(state, path)
    return path


def test_a_model_at_chance_gets_one_warning_line(digits_model, tmp_path, capsys):
    dead = _always_class_0(digits_model, tmp_path)
    assert main(["evaluate-checkpoint", str(dead), "--arch", "resnet8", "--width", "8", "--dataset", "digits"]) == 0
    captured = capsys.readouterr()
    assert "accuracy 10.00%" in captured.out
    assert captured.err == (
        "hiercluster evaluate-checkpoint: warning: the float model is at chance level (10.00% on 10 classes; "
        "chance is 10.00%): its drops and fewest bits say nothing about quantization\n"
    )
    assert main(["evaluate-checkpoint", str(digits_model)]) == 0
    assert capsys.readouterr().err == ""


def _digits_config(tmp_path, checkpoint, **sections) -> str:
    data = {"data": {"dataset": "digits"}, "model": {"checkpoint": str(checkpoint)},
            "quant": {"schemes": ["asymmetric"], "bits": [4], "clipping": ["minmax"]}, "eval": {"random_seeds": 3}}  # fmt: skip
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_quantize_prints_the_plan_name_and_the_reports_average_bits(digits_model, tmp_path, capsys):
    plans = {"plans": [{"name": "first8", "first_layer_bits": 8}, {"name": "full"}]}
    config = _digits_config(tmp_path, digits_model, quant={"schemes": ["asymmetric"], "bits": [4], **plans})
    out = tmp_path / "m.hcq"
    assert main(["quantize", config, "--bits", "4", "--out", str(out)]) == 0  # no --plan: the grid's first
    printed = capsys.readouterr().out
    report = json.loads(out.with_name("m.hcq.json").read_text())
    avg = report["report"]["avg_bits_per_weight"]
    assert report["plan"]["name"] == "first8" and 4 < avg < 4.1
    assert f"(plan first8) of {digits_model}: average {avg:.3f} bits per weight" in printed
    default = _digits_config(tmp_path, digits_model)
    assert main(["quantize", default, "--bits", "4", "--out", str(out), "--overwrite"]) == 0
    assert "(plan full) of" in capsys.readouterr().out


def test_evaluate_saves_its_table_in_the_run_directory(digits_model, tmp_path, capsys):
    config = _digits_config(tmp_path, digits_model)
    packed = tmp_path / "m4.hcq"
    assert main(["quantize", config, "--bits", "4", "--out", str(packed)]) == 0
    run = tmp_path / "run"
    assert main(["evaluate", config, "--packed", str(packed), "--out", str(run), "--quiet", "--limit", "100"]) == 0
    printed = capsys.readouterr().out
    record_file = run / "evaluations" / "m4.json"
    assert f"saved {record_file}" in printed and "on 100 of 450 test images, a stratified subset" in printed
    record = json.loads(record_file.read_text())
    assert record["packed"] == str(packed) and record["data_limit"] == {"limit": 100, "of": 450}
    # the default two trees: k=10 is both trees' cut; every other k once per tree
    trees = [f"k={k} {tree}" for k in range(9, 1, -1) for tree in ("fc_weights", "confusion")]
    assert record["n_eval"] == 100 and [row["level"] for row in record["levels"]] == ["k=10", *trees]
    for row in record["levels"]:  # the printed table, row by row
        assert f"{row['level']:<10} {row['k']:>3} {100 * row['acc_float']:>8.2f} {100 * row['acc_quant']:>8.2f}" in printed
    assert not (run / "float_logits.pt").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("hierarchy.levels=[1000]", "config key hierarchy.levels: k=1000 is outside 1..10 (the number of classes)"),
        ("hierarchy.names={Odd: ['1', '7', '0']}", "superclass name 'Odd' ('0+1+7') matches no cluster of the hierarchy"),
    ],
)
def test_levels_and_names_are_refused_before_any_evaluation(digits_model, tmp_path, monkeypatch, capsys, override, message):
    from hiercluster.run import prepare

    def no_evaluation(*args, **kwargs):
        raise AssertionError("the float model was evaluated")

    monkeypatch.setattr(prepare, "collect_logits", no_evaluation)
    run = tmp_path / "run"
    assert main(["run", _digits_config(tmp_path, digits_model), "--out", str(run), "--quiet", "--set", override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (run / "float_logits.pt").exists()


def test_the_imagenet_template_fits_any_folder_of_ten_classes():
    cfg = load_config("configs/imagenet_folder.yaml")
    assert cfg.hierarchy.levels and max(cfg.hierarchy.levels) <= 10


def test_run_with_limit_says_so_and_warns_at_chance(digits_model, tmp_path, capsys):
    dead = _always_class_0(digits_model, tmp_path)
    config = _digits_config(tmp_path, dead, model={"arch": "resnet8", "width": 8}, hierarchy={"levels": [10, 2]})
    assert main(["run", config, "--out", str(tmp_path / "run"), "--quiet", "--limit", "100"]) == 0
    captured = capsys.readouterr()
    assert "float accuracy 10.00% (on 100 of 450 test images, a stratified subset);" in captured.out
    warning = (
        "warning: the float model is at chance level (10.00% on 10 classes; chance is 10.00%): "
        "its drops and fewest bits say nothing about quantization\n"
    )
    assert captured.err == f"hiercluster run: {warning}"
    assert main(["report", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().err == f"hiercluster report: {warning}"
