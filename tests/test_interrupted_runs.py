"""A run stopped at any moment resumes to exactly the results of a run never stopped (issue 9).

The digits sweep (round to nearest and GPTQ with BN re-estimation, so that the
calibrated path and its packed-model cache are covered) runs once uninterrupted. Then
a second run directory is stopped at seeded random moments, with SIGKILL (nothing can
be cleaned up) or SIGINT (Ctrl-C: must always exit 130), and resumed each time; its
final results must equal the uninterrupted run's in every numeric column but the
timings. Every command runs in a child process, as a user would run it.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hiercluster.cli import main
from hiercluster.run.rundir import LOCK_FILE

REPO = Path(__file__).resolve().parent.parent
TIMING_COLUMNS = {"quantize_s", "eval_s", "metrics_s", "size_s"}
OVERRIDES = [
    "--set", "quant.methods=[rtn, {name: gptq, bn_reestimate: [true], bits: [2]}]",
    "--set", "calibration.samples=256",
    "--set", "eval.random_seeds=5",
]


def _command(ckpt: Path, out: Path) -> list[str]:
    config = REPO / "configs" / "digits.yaml"
    return [
        sys.executable, "-m", "hiercluster.cli", "run", str(config), "--out", str(out), "--quiet",
        "--set", f"model.checkpoint={ckpt}", *OVERRIDES,
    ]


def _results(run_dir: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(run_dir / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {(r["spec_key"], r["level"]): {k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path, float]:
    """(checkpoint, uninterrupted run directory, its wall time in seconds with start-up)."""
    folder = tmp_path_factory.mktemp("interrupted")
    ckpt = folder / "model.pt"
    assert main(["train", str(REPO / "configs" / "digits.yaml"), "--out", str(ckpt), "--set", "train.epochs=2"]) == 0
    start = time.perf_counter()
    done = subprocess.run(_command(ckpt, folder / "reference"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return ckpt, folder / "reference", time.perf_counter() - start


def _stop_and_resume(reference, tmp_path: Path, sig: signal.Signals, seed: int, times: int) -> list[tuple[float, int, str]]:
    """Stop a run ``times`` times with ``sig`` at seeded random moments, then let it finish; returns (moment, exit, stderr).

    A moment counts from when the command holds its run directory's lock (it is past
    Python's start-up, which is not ours to handle) and falls within the reference run's
    working time.
    """
    ckpt, ref_dir, _ = reference
    work_s = json.loads((ref_dir / "run.json").read_text())["timings"]["total_s"]
    rng = random.Random(seed)
    out = tmp_path / "run"
    stops = []
    for _ in range(times):
        moment = rng.uniform(0.0, 0.9) * work_s
        proc = subprocess.Popen(_command(ckpt, out), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + 120
        while not (out / LOCK_FILE).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(moment)
        if proc.poll() is None:
            os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
        stops.append((moment, proc.returncode, err))
    done = subprocess.run(_command(ckpt, out), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return stops


def test_sigkill_at_random_moments_then_resume_gives_the_same_results(reference, tmp_path):
    _stop_and_resume(reference, tmp_path, signal.SIGKILL, seed=9, times=3)
    assert _results(tmp_path / "run") == _results(reference[1])


def test_ctrl_c_always_exits_130_and_the_run_resumes_to_the_same_results(reference, tmp_path):
    stops = _stop_and_resume(reference, tmp_path, signal.SIGINT, seed=130, times=4)
    for moment, code, err in stops:
        if code == 0:  # the run had finished before the signal came: nothing to interrupt
            continue
        # -SIGINT: the signal came as the interpreter was exiting, after the command had returned
        # (Python restores the default handler then); a shell shows that as 130 too.
        assert code in (130, -signal.SIGINT), f"Ctrl-C after {moment:.1f} s gave exit {code}:\n{err}"
        assert "Traceback" not in err and "Exception ignored" not in err, err
    assert any(code == 130 for _, code, _ in stops)
    assert _results(tmp_path / "run") == _results(reference[1])
