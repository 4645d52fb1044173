"""xz sizes the sweep skips are computed for the exported winners only: database, CSV, report."""

from __future__ import annotations

import csv
import json
import lzma
import sqlite3
import struct
from pathlib import Path

import pytest
import torch
import yaml

from hiercluster.cli import main
from hiercluster.models.zoo import build_model, save_checkpoint
from hiercluster.run import sweep
from quant.packing import XZ_PRESET


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained narrow resnet8 for digits: the test checks bookkeeping, not accuracy."""
    out = tmp_path_factory.mktemp("ckpt") / "r8.pt"
    torch.manual_seed(0)
    meta = {"arch": "resnet8", "num_classes": 10, "in_channels": 1, "width": 4, "dataset": "digits",
            "classes": [str(i) for i in range(10)]}
    save_checkpoint(build_model("resnet8", 10, 1, width=4), out, meta)
    return out


@pytest.fixture
def no_plot_files(monkeypatch):
    """Skip drawing the report's PNGs (most of a tiny run's time); the report text is unchanged."""
    from hiercluster.report import figures, plots

    monkeypatch.setattr(plots, "save_figure", lambda fig, path, dpi=110: Path(path))
    monkeypatch.setattr(figures, "save_figure", lambda fig, path, dpi=110: Path(path))


def _run(folder: Path, checkpoint: Path, export: bool) -> Path:
    cfg = {
        "data": {"dataset": "digits", "batch_size": 256},
        "model": {"checkpoint": str(checkpoint)},
        "hierarchy": {"levels": [10, 3]},
        "quant": {"schemes": ["asymmetric"], "bits": [8, 4, 2], "clipping": ["minmax"]},
        "eval": {"random_seeds": 2},
        "output": {"export_models": export},
    }
    folder.mkdir(exist_ok=True)
    path = folder / "xz.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = folder / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    return out


def _xz_by_spec(run: Path) -> dict[str, set]:
    with sqlite3.connect(run / "results.sqlite") as con:
        rows = con.execute("SELECT spec_key, xz_bytes FROM results").fetchall()
    out: dict[str, set] = {}
    for key, xz in rows:
        out.setdefault(key, set()).add(xz)
    return out


def _payload_xz(path: Path) -> int:
    """xz of a packed file's payload, cut out by the documented layout (prefix, header, payload, digest)."""
    data = path.read_bytes()
    _, _, head_len, body_len = struct.unpack("<8sIQQ", data[:28])
    return len(lzma.compress(data[28 + head_len : 28 + head_len + body_len], format=lzma.FORMAT_XZ, preset=XZ_PRESET))


def test_winners_get_xz_and_the_others_do_not(tmp_path, checkpoint, monkeypatch, no_plot_files):
    eager = _xz_by_spec(_run(tmp_path / "eager", checkpoint, export=False))  # every payload is under the limit here
    monkeypatch.setattr(sweep, "XZ_MAX_BYTES", 0)
    run = _run(tmp_path / "lazy", checkpoint, export=True)

    manifest = json.loads((run / "models" / "manifest.json").read_text())
    winners = {entry["spec_key"]: entry["model"] for entry in manifest["levels"].values()}
    lazy = _xz_by_spec(run)
    assert set(lazy) == set(eager) and 0 < len(winners) < len(lazy)  # some specs win, some do not
    for key, values in lazy.items():
        if key in winners:
            # Every level row of a winner: the size the sweep would have computed, and the file's payload's.
            assert values == eager[key] and values == {_payload_xz(run / "models" / winners[key])}
        else:
            assert values == {None}
    with open(run / "results.csv", newline="") as fh:
        csv_xz = {(r["spec_key"], r["xz_bytes"]) for r in csv.DictReader(fh)}
    assert csv_xz == {(key, str(next(iter(v))) if key in winners else "") for key, v in lazy.items()}

    seed = (run / "report.md").read_text().split("## Accuracy and size per precision", 1)[1].split("\n## ", 1)[0]
    assert "for the exported winners only" in seed
    cells = [line.split("|")[8].strip() for line in seed.splitlines() if line.startswith("| `")]
    assert cells.count("not computed") == len(lazy) - len(winners)


def test_resumed_run_keeps_the_winners_xz(tmp_path, checkpoint, monkeypatch, no_plot_files):
    monkeypatch.setattr(sweep, "XZ_MAX_BYTES", 0)
    run = _run(tmp_path, checkpoint, export=True)
    before = _xz_by_spec(run)
    assert _run(tmp_path, checkpoint, export=True) == run  # nothing to sweep; the export runs again
    assert _xz_by_spec(run) == before and any(v != {None} for v in before.values())
