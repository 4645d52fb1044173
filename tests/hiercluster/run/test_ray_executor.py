"""Sweeps on Ray: the same rows as the serial executor, a killed driver resumes, and what goes
wrong on the way (a wrong address, a request no node meets, a failing or foreign worker) is
one line (issue 11).

A local Ray instance with two CPUs runs the digits sweep. Ray is part of the test extra,
so CI runs these; they take about a minute and a half (Ray's start-up is most of it).
``test_executor_errors.py`` checks the same paths without a Ray instance.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.nn as nn

from hiercluster.cli import main
from hiercluster.errors import HierclusterError
from hiercluster.run import executors
from hiercluster.run.config import load_config
from hiercluster.run.executors import RayExecutor, SerialExecutor, make_executor
from hiercluster.run.grid import expand_grid
from hiercluster.run.pipeline import run_pipeline
from hiercluster.run.prepare import prepare
from hiercluster.run.sweep import sweep_context
from hiercluster.run.rundir import LOGITS_FILE, RUN_FILE
from hiercluster.run.store import ResultsStore

REPO = Path(__file__).resolve().parents[3]
DIGITS = REPO / "configs" / "digits.yaml"
TIMING_COLUMNS = {"quantize_s", "eval_s", "metrics_s", "size_s"}
# Round to nearest at three widths and GPTQ (calibrated: its packed model comes back from the worker).
OVERRIDES = [
    "quant.schemes=[asymmetric, pow2]",
    "quant.bits=[4, 3]",
    "quant.methods=[rtn, {name: gptq, bits: [2], schemes: [asymmetric]}]",
    "calibration.samples=128",
    "eval.random_seeds=3",
    "runtime.threads=1",
]


def _rows(run_dir: Path) -> dict[tuple[str, str], dict]:
    with ResultsStore(run_dir / "results.sqlite") as store:
        rows = store.results(complete=True)
    return {(r["tag"], r["level"]): {k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    ckpt = tmp_path_factory.mktemp("ray") / "model.pt"
    assert main(["train", str(DIGITS), "--out", str(ckpt), "--set", "train.epochs=2"]) == 0
    return ckpt


@pytest.fixture(scope="module")
def serial_run(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serial") / "run"
    cfg = load_config(DIGITS, [*OVERRIDES, f"model.checkpoint={checkpoint}"])
    run_pipeline(cfg, out, progress=False, executor=SerialExecutor())
    return out


def test_ray_gives_the_serial_rows(checkpoint, serial_run, tmp_path):
    import ray

    cfg = load_config(DIGITS, [*OVERRIDES, f"model.checkpoint={checkpoint}"])
    summary = run_pipeline(cfg, tmp_path / "run", progress=False, executor=RayExecutor(num_cpus=2))
    assert not ray.is_initialized()  # the local instance the run started is shut down
    ray_rows, serial_rows = _rows(tmp_path / "run"), _rows(serial_run)
    assert summary["timings"]["specs_run"] == summary["timings"]["specs_total"] == 5
    assert len(ray_rows) == 5 * 9 and ray_rows == serial_rows
    # the driver wrote the calibrated model the worker packed, byte for byte what the serial run kept
    packed = sorted((tmp_path / "run" / "packed").glob("*.hcq"))
    assert len(packed) == 1
    assert packed[0].read_bytes() == (serial_run / "packed" / packed[0].name).read_bytes()


def _session_processes(sid: int) -> list[int]:
    """Processes of session ``sid`` (the killed driver's Ray processes that outlive it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:
                found.append(int(entry.name))
    return found


def _finished_specs(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1)
        try:
            return con.execute("SELECT count(*) FROM specs").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0  # not created yet, or being written


def test_a_killed_ray_driver_resumes_to_the_serial_rows(checkpoint, serial_run, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "hiercluster.cli", "run", str(DIGITS), "--out", str(out), "--quiet",
               "--executor", "ray", "--set", f"model.checkpoint={checkpoint}"]
    for item in OVERRIDES:
        command += ["--set", item]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    while _finished_specs(out / "results.sqlite") < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)  # the driver only: nothing of it can clean up
    proc.wait(timeout=60)
    time.sleep(1.0)
    for pid in _session_processes(proc.pid):  # Ray's agents that outlive a killed driver
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    finished = _finished_specs(out / "results.sqlite")
    assert 1 <= finished < 5

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{5 - finished} of 5 specs run" in resumed.stdout
    assert _rows(out) == _rows(serial_run)


def test_a_wrong_address_fails_before_the_run_writes_anything(checkpoint, tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    out = tmp_path / "run"
    code = main(["run", str(DIGITS), "--out", str(out), "--quiet", "--executor", "ray", "--address", address,
                 "--set", f"model.checkpoint={checkpoint}"])
    err = capsys.readouterr().err
    assert code == 2 and f"--address {address}: nothing answers there" in err, err
    assert len(err.strip().splitlines()) == 1
    # no float logits computed, nothing of the run written: the executor connects before prepare
    assert not (out / LOGITS_FILE).exists() and not (out / RUN_FILE).exists()


@pytest.fixture(scope="module")
def digits_prep(checkpoint, tmp_path_factory):
    """The sweep context of a digits run of two round-to-nearest specs (the float model's logits and levels)."""
    cfg = load_config(DIGITS, [*OVERRIDES, "quant.methods=[rtn]", "quant.bits=[4]", f"model.checkpoint={checkpoint}"])
    grid = expand_grid(cfg)
    prep = prepare(cfg, tmp_path_factory.mktemp("prep"), progress=False, grid=grid)
    return sweep_context(prep, grid), grid


def _digits_model(*layers: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Flatten(), *layers)  # digits: 8x8 grayscale images, 10 classes


def test_what_goes_wrong_on_a_worker_is_one_line(digits_prep, monkeypatch):
    """One local instance for every check: a request no node meets, a worker's exception, its
    warnings, and a worker whose code differs from the driver's."""
    import ray

    prep, grid = digits_prep
    todo = [(point, f"key-{i}") for i, point in enumerate(grid)]
    assert len(todo) == 2
    with RayExecutor(num_cpus=2) as executor:
        # three CPUs per task on a two-CPU instance: refused before a task is submitted (Ray would wait forever)
        with pytest.raises(HierclusterError, match=r"requests 3 CPUs.*lower runtime\.threads .* to at most 2$"):
            next(RayExecutor(threads_per_task=3).map(prep, todo))

        # a worker's exception: its type and first line, the spec, and how to resume
        broken = dataclasses.replace(prep, model=_digits_model(nn.Linear(63, 10)))
        tag = re.escape(grid[0].tag)
        with pytest.raises(HierclusterError, match=rf"^spec {tag} failed on a Ray worker: RuntimeError: mat1 and mat2.*"
                           "run the same command again to resume$"):
            list(executor.map(broken, todo[:1]))

        # warnings raised on the workers (nn.Softmax() without dim warns at every call) are shown here, once
        chatty = dataclasses.replace(prep, model=_digits_model(nn.Linear(64, 10), nn.Softmax()))
        with pytest.warns(UserWarning) as shown:
            results = list(executor.map(chatty, todo))
        assert sorted(r.spec_key for r in results) == ["key-0", "key-1"]
        assert [str(w.message) for w in shown].count(_softmax_warning(shown)) == 1

        # a worker whose code is not the driver's: its result is refused
        monkeypatch.setattr(executors, "code_version", lambda: {"torch": "0.0-driver"})
        mismatch = r"with torch .* where this command has torch 0\.0-driver; install the same hiercluster"
        with pytest.raises(HierclusterError, match=mismatch):
            list(executor.map(prep, todo[:1]))
    assert not ray.is_initialized()


def _softmax_warning(shown) -> str:
    found = [str(w.message) for w in shown if "softmax" in str(w.message).lower()]
    assert found, [str(w.message) for w in shown]
    return found[0]


def test_executor_choices_are_checked():
    assert make_executor("serial").name == "serial"
    assert make_executor("ray", "auto").address == "auto"
    with pytest.raises(HierclusterError, match="--address is for --executor ray"):
        make_executor("serial", "HOST:6379")
    with pytest.raises(HierclusterError, match="unknown executor 'dask'"):
        make_executor("dask")


def test_the_serial_executor_does_not_import_ray(tmp_path):
    """The default path never imports Ray (it is optional, and slow to import)."""
    code = (
        "import sys\n"
        "from hiercluster.run import pipeline, executors\n"
        "executors.make_executor('serial')\n"
        "assert 'ray' not in sys.modules, 'ray imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_missing_ray_is_one_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    from hiercluster.run.executors import _import_ray

    with pytest.raises(HierclusterError, match=r"pip install 'hiercluster\[ray\]'"):
        _import_ray()
