"""The report at 1,000 classes: bounded figures, a small report.md, capped tables; xz sizes that may be missing."""

from __future__ import annotations

import json
import lzma
import re
from pathlib import Path

import numpy as np
import pytest
import torch.nn as nn
from PIL import Image
from scipy.cluster.hierarchy import fcluster

import quant
from hiercluster.hierarchy.clustering import ClassHierarchy
from hiercluster.report import figures, plots
from hiercluster.report.markdown import MAX_BIAS_CLASSES, seed_table, write_report
from hiercluster.report.plots import MAX_FIGURE_PX, MAX_LEAVES, MAX_LEVELS_SHOWN, MAX_SHARE_CLASSES, spread_by_k
from hiercluster.run.records import LevelResult, SpecResult
from hiercluster.run.rundir import DB_FILE, HIERARCHY_FILE, RUN_FILE
from hiercluster.run.store import ResultsStore

C = 1000
NAMES = [f"class_{i:04d}" for i in range(C)]
# The case: `levels: []` at 1,000 classes cut the tree at every k (999 levels), plus a reference.
KS = list(range(2, C + 1))
REFERENCE_K = 20


def _level_json(k: int, kind: str) -> dict:
    """A grouping of the classes into ``k`` groups (class c in group c % k), named by members as the pipeline does."""
    assignment = [c % k for c in range(C)]
    names = ["+".join(NAMES[g::k]) for g in range(k)]
    return {"k": k, "kind": kind, "assignment": assignment, "names": names}


def _level_result(name: str, k: int, kind: str, bits: int, rng: np.random.Generator) -> LevelResult:
    acc_float = 0.7 + 0.25 * (1 - np.log(k) / np.log(C))
    drop = float(rng.uniform(0, 2) * (5 - bits))
    random_drop = drop + float(rng.uniform(0, 1))
    return LevelResult(
        level=name, grouping=kind, k=k, fine_acc_float=0.7, fine_acc_quant=0.7 - drop / 100, acc_float=acc_float,
        acc_quant=acc_float - drop / 100, drop=drop, random_acc_float_mean=acc_float, random_acc_float_std=0.01,
        random_acc_quant_mean=acc_float - random_drop / 100, random_acc_quant_std=0.01, random_drop_mean=random_drop,
        random_drop_std=0.2, advantage=random_drop - drop, drop_lo=drop - 0.3, drop_hi=drop + 0.3,
        advantage_lo=random_drop - drop - 0.4, advantage_hi=random_drop - drop + 0.4, rank_p=0.01,
        group_sizes="+".join(["1"] * k), absorbed_share=0.5, random_absorbed_share_mean=0.2,
    )


def _spec_result(bits: int, share: np.ndarray, levels: dict, xz: int | None, rng: np.random.Generator) -> SpecResult:
    spec = quant.QuantSpec(bits=bits)
    _, report = quant.quantize_model(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, C)), spec)
    return SpecResult(
        spec_key=f"key{bits}", tag=spec.tag + "+full", scheme=spec.scheme, bits=bits, clipping=spec.clipping,
        granularity=spec.granularity, plan="full", method="rtn", bn_reestimate=False, activation_bits=None,
        avg_bits=float(bits), fine_acc=0.7 - bits / 1000, fine_acc_lo=None, fine_acc_hi=None, fine_drop_lo=None, fine_drop_hi=None, logits_digest="0123abcd", fp32_bytes=4_000_000, packed_bytes=bits * 60_000,
        gzip_bytes=bits * 55_000, xz_bytes=xz, quantize_s=1.0, eval_s=1.0, metrics_s=1.0, size_s=0.1,
        levels=tuple(_level_result(name, lv["k"], lv["kind"], bits, rng) for name, lv in levels.items()),
        spec_json=spec.to_dict(), plan_json=quant.QuantPlan(name="full").to_dict(),
        prediction_share=tuple(share.tolist()), layers=tuple(report.rows()),
    )


@pytest.fixture(scope="module")
def big_run(tmp_path_factory) -> Path:
    """A synthetic finished run: 1,000 classes, 999 learned levels and a reference, a 4-bit and a 2-bit spec.

    The 2-bit spec has no xz size (a payload over the sweep's limit) and collapses its
    predictions onto a few classes, as low-bit models do.
    """
    run = tmp_path_factory.mktemp("big") / "run"
    run.mkdir()
    rng = np.random.default_rng(0)
    levels = {f"k={k}": _level_json(k, "learned") for k in KS}
    levels["reference"] = _level_json(REFERENCE_K, "reference")
    float_share = rng.dirichlet(np.full(C, 50.0))
    shares = {4: rng.dirichlet(np.full(C, 20.0)), 2: rng.dirichlet(np.full(C, 0.05))}
    specs = [_spec_result(4, shares[4], levels, 230_000, rng), _spec_result(2, shares[2], levels, None, rng)]
    with ResultsStore(run / DB_FILE) as store:
        for result in specs:
            store.add_spec(result)
    info = {
        "dataset": "synthetic", "eval_split": "test", "n_eval": 50_000, "checkpoint": "model.pt",
        "checkpoint_sha256": "0" * 64, "class_names": NAMES, "float_accuracy": 0.7,
        "float_prediction_share": float_share.tolist(), "reduction": "logsumexp", "random_seeds": 20,
        "tolerance": 1.0, "hierarchy": {"embedding": "fc_weights", "linkage": "ward", "metric": "euclidean"},
        "levels": levels, "grid": [{"key": s.spec_key, "tag": s.tag} for s in specs],
    }
    (run / RUN_FILE).write_text(json.dumps(info))
    ClassHierarchy(linkage="ward", metric="euclidean").fit(rng.normal(size=(C, 8)), NAMES).to_json(run / HIERARCHY_FILE)
    write_report(run)
    return run


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def _table_rows(section: str) -> list[str]:
    """The body rows of the first Markdown table in ``section`` (header and rule left out)."""
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return rows[2:]


def test_report_md_stays_small(big_run):
    text = (big_run / "report.md").read_text()
    # Measured before the caps: 10.5 MB. Tens of KB now.
    assert len(text.encode()) < 50_000
    assert max(len(line) for line in text.splitlines()) < 1_500


def test_bias_table_lists_the_largest_changes_and_sums_up_the_rest(big_run):
    text = (big_run / "report.md").read_text()
    rows = _table_rows(_section(text, "Biased inference"))
    assert len(rows) == MAX_BIAS_CLASSES + 1
    info = json.loads((big_run / RUN_FILE).read_text())
    with ResultsStore(big_run / DB_FILE) as store:
        quantized = np.array(store.spec_details("key2")["prediction_share"])
    change = np.abs(quantized - np.array(info["float_prediction_share"]))
    expected = [NAMES[i] for i in np.argsort(-change, kind="stable")[:MAX_BIAS_CLASSES]]
    assert [row.split("|")[1].strip() for row in rows[:-1]] == expected
    rest = np.argsort(-change, kind="stable")[MAX_BIAS_CLASSES:]
    summary = rows[-1]
    assert f"*{C - MAX_BIAS_CLASSES} other classes*" in summary
    assert f"at most {100 * change[rest].max():.1f} pp" in summary
    assert f"{100 * quantized[rest].sum():.1f} in all" in summary


def test_per_level_tables_show_a_spread_of_levels(big_run):
    text = (big_run / "report.md").read_text()
    total = len(KS) + 1
    note = f"Showing {MAX_LEVELS_SHOWN} of {total} levels, spread over k"
    headline = _section(text, "Fewest bits per hierarchy level")
    assert note in headline
    shown = [row.split("|")[1].strip() for row in _table_rows(headline)]
    assert len(shown) == MAX_LEVELS_SHOWN
    assert {"k=2", f"k={C}", "reference"} <= set(shown)
    levels = _section(text, "Grouped accuracy per level and spec")
    assert note in levels and len(_table_rows(levels)) == MAX_LEVELS_SHOWN
    listed = [line for line in _section(text, "Hierarchy levels").splitlines() if line.startswith("- **")]
    assert len(listed) == MAX_LEVELS_SHOWN
    k2 = next(line for line in listed if line.startswith("- **k=2**"))
    assert k2.count("(500 classes)") == 2  # both halves named short, with their sizes


def test_xz_not_computed_is_said(big_run):
    seed = _section((big_run / "report.md").read_text(), "Accuracy and size per precision")
    assert "xz: LZMA2 preset 6" in seed
    assert "computed for every spec whose payload is at most 4 MiB and, above that, for the exported winners only" in seed
    two_bit = next(row for row in _table_rows(seed) if "-2b-" in row)
    four_bit = next(row for row in _table_rows(seed) if "-4b-" in row)
    assert two_bit.split("|")[8].strip() == "not computed"
    assert four_bit.split("|")[8].strip() == f"{230_000 / 1024:.1f}"


def test_every_png_is_bounded(big_run):
    pngs = sorted(big_run.glob("*.png"))
    assert {p.stem for p in pngs} == {"dendrogram", "drop_vs_bits", "pareto", "quartiles", "prediction_share"}
    for path in pngs:
        width, height = Image.open(path).size
        assert max(width, height) <= MAX_FIGURE_PX, (path.name, width, height)


def test_save_figure_lowers_the_resolution_of_a_huge_figure(tmp_path):
    fig = plots.new_figure(40.0, 10.0)
    fig.add_subplot().plot([0, 1], [0, 1])
    width, height = Image.open(plots.save_figure(fig, tmp_path / "huge.png", dpi=120)).size
    assert width == MAX_FIGURE_PX and height == MAX_FIGURE_PX // 4


def _captured(monkeypatch, module):
    figs = []
    monkeypatch.setattr(module, "save_figure", lambda fig, path, dpi=110: figs.append(fig) or Path(path))
    return figs


def test_dendrogram_shows_the_top_clusters_with_their_sizes(monkeypatch):
    rng = np.random.default_rng(1)
    tree = ClassHierarchy(linkage="ward", metric="euclidean").fit(rng.normal(size=(C, 6)), NAMES)
    figs = _captured(monkeypatch, plots)
    plots.plot_dendrogram(tree, "tree.png")
    labels = [t.get_text() for t in figs[0].axes[0].get_yticklabels()]
    assert len(labels) == MAX_LEAVES
    sizes = [int(re.search(r"\((\d+)\)$", label).group(1)) for label in labels]
    # The same cut by scipy: the top MAX_LEAVES clusters of the linkage.
    reference = np.bincount(fcluster(tree.linkage_matrix_, MAX_LEAVES, criterion="maxclust"))[1:]
    assert sorted(sizes) == sorted(reference.tolist()) and sum(sizes) == C
    assert "top 40 clusters of 1000 classes" in figs[0].axes[0].get_title()
    width, height = figs[0].get_size_inches() * 120
    assert max(width, height) <= MAX_FIGURE_PX


def test_a_small_dendrogram_keeps_every_class(monkeypatch):
    names = [f"c{i}" for i in range(12)]
    tree = ClassHierarchy().fit(np.random.default_rng(2).normal(size=(12, 4)), names)
    figs = _captured(monkeypatch, plots)
    plots.plot_dendrogram(tree, "tree.png")
    assert sorted(t.get_text() for t in figs[0].axes[0].get_yticklabels()) == sorted(names)


def test_prediction_share_shows_the_largest_classes_and_the_others(monkeypatch):
    rng = np.random.default_rng(3)
    sf, sq = rng.dirichlet(np.full(C, 10.0)), rng.dirichlet(np.full(C, 0.1))
    figs = _captured(monkeypatch, plots)
    plots.plot_prediction_share(sf, sq, NAMES, "share.png")
    ax = figs[0].axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    top = sorted(range(C), key=lambda i: -max(sf[i], sq[i]))[:MAX_SHARE_CLASSES]
    assert ticks == [NAMES[i] for i in top] + [f"others (mean of {C - MAX_SHARE_CLASSES})"]
    rest = np.setdiff1d(np.arange(C), top)
    float_bars, quant_bars = ax.containers
    assert float_bars[-1].get_height() == pytest.approx(sf[rest].mean())
    assert quant_bars[-1].get_height() == pytest.approx(sq[rest].mean())
    assert [b.get_height() for b in quant_bars[:-1]] == pytest.approx(sq[top].tolist())
    width, height = figs[0].get_size_inches() * 120
    assert max(width, height) <= MAX_FIGURE_PX


def test_drop_vs_bits_draws_and_lists_a_spread_of_levels(big_run):
    with ResultsStore(big_run / DB_FILE) as store:
        rows = store.results()
    fig = figures.drop_vs_bits_figure(rows, tolerance=1.0)
    drawn = {line.get_label() for ax in fig.axes for line in ax.get_lines() if line.get_gid() == "level-line"}
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(drawn) == MAX_LEVELS_SHOWN and "reference" in drawn and {"k=2", f"k={C}"} <= drawn
    assert [t for t in legend if t.startswith("k=") or t == "reference"] == [
        lv for lv in dict.fromkeys(r["level"] for r in rows) if lv in drawn]
    assert f"{MAX_LEVELS_SHOWN} of {len(KS) + 1} levels drawn" in fig._suptitle.get_text()


def test_spread_by_k_keeps_the_ends_and_spreads_over_log_k():
    ks = {f"k={k}": k for k in KS} | {"reference": REFERENCE_K}
    chosen = spread_by_k(ks, 12, keep=["reference"])
    assert len(chosen) == 12 and chosen[-1] == "reference"
    picked = [ks[name] for name in chosen[:-1]]
    assert picked[0] == 2 and picked[-1] == C
    # Consecutive picks grow by about the same factor: (1000 / 2) ** (1 / 10) = 1.86.
    ratios = np.array(picked[1:]) / np.array(picked[:-1])
    assert np.all((ratios > 1.5) & (ratios < 2.5))
    few = {"a": 3, "b": 2}
    assert spread_by_k(few, 12) == ["a", "b"]


def test_model_size_skips_xz_above_the_limit_only():
    qnet, report = quant.quantize_model(nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 10)), quant.QuantSpec(bits=4))
    full = quant.model_size(qnet, report)
    payload = quant.packing._serialize(*quant.packing._encode(qnet, report))[1][:-32]
    assert full["xz_bytes"] == len(lzma.compress(payload, format=lzma.FORMAT_XZ, preset=quant.packing.XZ_PRESET))
    at_limit = quant.model_size(qnet, report, xz_max_bytes=full["packed_bytes"])
    over = quant.model_size(qnet, report, xz_max_bytes=full["packed_bytes"] - 1)
    assert at_limit == full
    assert over["xz_bytes"] is None and {k: v for k, v in over.items() if k != "xz_bytes"} == {
        k: v for k, v in full.items() if k != "xz_bytes"}
    for bad in (-1, 1.5, True, "4"):
        with pytest.raises(ValueError, match="xz_max_bytes"):
            quant.model_size(qnet, report, xz_max_bytes=bad)


def test_seed_table_without_missing_xz_names_only_the_preset():
    rng = np.random.default_rng(4)
    levels = {f"k={C}": _level_json(C, "learned")}
    result = _spec_result(4, rng.dirichlet(np.ones(C)), levels, 1234, rng)
    rows = [{**row, "spec_key": result.spec_key} for row in result.rows()]
    info = {"class_names": NAMES, "levels": levels, "float_accuracy": 0.7}
    text = seed_table(info, rows)
    assert "xz: LZMA2 preset 6 of the bit-packed payload." in text and "Not computed" not in text
