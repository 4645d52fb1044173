"""The report reads only the run directory: not the sweep's modules, its files by the run directory's names."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hiercluster.hierarchy.clustering import ClassHierarchy
from hiercluster.run.records import XZ_MAX_BYTES, LevelResult, SpecResult
from hiercluster.run.rundir import DB_FILE, FIGURE_FILES, HIERARCHY_FILE, REPORT_FILE, RUN_FILE
from hiercluster.run.store import ResultsStore

NAMES = ["cat", "dog", "sandal", "sneaker"]
LEVELS = {
    "k=4": {"k": 4, "kind": "learned", "assignment": [0, 1, 2, 3], "names": NAMES},
    "k=2": {"k": 2, "kind": "learned", "assignment": [0, 0, 1, 1], "names": ["cat+dog", "sandal+sneaker"]},
}


def _level(name: str, k: int) -> LevelResult:
    metrics = {f.name: 0.5 for f in dataclasses.fields(LevelResult) if f.name not in ("level", "grouping", "k")}
    return LevelResult(level=name, grouping="learned", k=k, **{**metrics, "group_sizes": "2+2"})


def _layer() -> dict:
    stats = {f"{when}_{q}": v for when in ("before", "after") for q, v in zip(("min", "q1", "median", "q3", "max"), range(5))}
    return {"name": "fc", "bits": 2, **{k: float(v) for k, v in stats.items()}}


def _finished_run(run: Path, device: str | None) -> Path:
    """A finished 4-class run of one 2-bit spec whose xz size was not computed (the case that read the sweep's limit)."""
    run.mkdir(parents=True)
    result = SpecResult(
        spec_key="key2", tag="asymmetric-2b+full", scheme="asymmetric", bits=2, clipping="minmax",
        granularity="per_channel", plan="full", method="rtn", bn_reestimate=False, activation_bits=None, avg_bits=2.0,
        fine_acc=0.4, fine_acc_lo=None, fine_acc_hi=None, fine_drop_lo=None, fine_drop_hi=None, logits_digest="0123abcd", fp32_bytes=4096, packed_bytes=300, gzip_bytes=280, xz_bytes=None, quantize_s=0.1, eval_s=0.1,
        metrics_s=0.1, size_s=0.1, levels=tuple(_level(name, lv["k"]) for name, lv in LEVELS.items()),
        spec_json={"scheme": "asymmetric", "bits": 2}, plan_json={"name": "full"},
        prediction_share=(0.4, 0.1, 0.3, 0.2), layers=(_layer(),),
    )
    with ResultsStore(run / DB_FILE) as store:
        store.add_spec(result)
    info = {
        "dataset": "synthetic", "eval_split": "test", "n_eval": 40, "checkpoint": "model.pt",
        "checkpoint_sha256": "0" * 64, "class_names": NAMES, "float_accuracy": 0.6,
        "float_prediction_share": [0.25] * 4, "reduction": "prob_sum", "random_seeds": 3, "tolerance": 1.0,
        "hierarchy": {"embedding": "fc_weights", "linkage": "ward", "metric": "euclidean"},
        "levels": LEVELS, "grid": [{"key": result.spec_key, "tag": result.tag}],
    }
    if device is not None:
        info["device"] = device
    (run / RUN_FILE).write_text(json.dumps(info))
    embeddings = np.random.default_rng(0).normal(size=(len(NAMES), 8))
    ClassHierarchy(linkage="ward", metric="euclidean").fit(embeddings, NAMES).to_json(run / HIERARCHY_FILE)
    return run


# What `hiercluster report` does, in a fresh interpreter: which of the run layer's modules did it load?
_REPORT_ONLY = """
import json, sys
from hiercluster.report.markdown import write_report
write_report(sys.argv[1])
print(json.dumps(sorted(m for m in sys.modules if m.startswith("hiercluster.run."))))
"""


def test_the_report_loads_no_module_of_the_sweep(tmp_path):
    run = _finished_run(tmp_path / "run", device="cpu")
    env = {**os.environ, "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-c", _REPORT_ONLY, str(run)], capture_output=True, text=True, env=env,
                          check=True)
    loaded = json.loads(done.stdout.splitlines()[-1])
    # The sweep pulls in the quantizers, the data loaders and the model zoo: the report needs none of them.
    assert not {"hiercluster.run.sweep", "hiercluster.run.prepare", "hiercluster.run.pipeline"} & set(loaded)
    assert f" {XZ_MAX_BYTES / 2**20:g} MiB" in (run / REPORT_FILE).read_text()  # the xz limit, said without the sweep


@pytest.fixture(scope="module")
def reported(tmp_path_factory) -> Path:
    from hiercluster.report.markdown import write_report

    run = _finished_run(tmp_path_factory.mktemp("reads") / "run", device="cuda")
    write_report(run)
    return run


def test_figures_are_written_and_shown_under_the_run_directory_names(reported):
    text = (reported / REPORT_FILE).read_text()
    # The frontier (accuracy vs average bits) is drawn only for runs with mixed precision; this one has none.
    figures = [file for name, file in FIGURE_FILES.items() if name != "frontier"]
    for file in figures:
        assert (reported / file).stat().st_size > 1000
        assert f"]({file})" in text
    assert sorted(p.name for p in reported.glob("*.png")) == sorted(figures)
    assert FIGURE_FILES["frontier"] not in text


def test_the_header_says_which_device_ran_the_models(reported, tmp_path):
    from hiercluster.report.markdown import write_report

    header = (reported / REPORT_FILE).read_text().split("## Fewest bits")[0]
    assert "float accuracy **60.00%** on 40 images (test split) on `cuda`\n" in header
    older = _finished_run(tmp_path / "older", device=None)  # run.json before it named the device
    header = write_report(older).read_text().split("## Fewest bits")[0]
    assert "float accuracy **60.00%** on 40 images (test split)\n" in header
