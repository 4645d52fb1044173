"""The run report: every grid dimension labelled, the headline checked against results.csv, and its wording."""

from __future__ import annotations

import csv
import doctest
import json
import shutil
from pathlib import Path

import pytest
import yaml

import hiercluster.report.markdown as report
from hiercluster.cli import main
from hiercluster.errors import HierclusterError
from hiercluster.evaluation.metrics import headline
from hiercluster.report.markdown import bias_choice, chance_warning, format_headline, level_tables, seed_table
from hiercluster.report.rows import fewest_bits_cell, fmt_number, varying_dims

# Wide enough that a 2-epoch model (1 test image = 0.22 pp) passes at some widths and fails at others.
TOLERANCE = 3.0
# The issue's grid: granularity x clipping x bits, activations quantized.
GRID = ["quant.schemes=[asymmetric]", "quant.granularity=[per_channel,per_tensor]", "quant.clipping=[minmax,mse]",
        "quant.bits=[4,3]", "quant.activation_bits=4"]
N_SPECS = 2 * 2 * 2
LEVELS = [10, 5, 2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "r8.pt"
    assert main(["train", "configs/digits.yaml", "--out", str(out), "--set", "train.epochs=2"]) == 0
    return out


def _skip_plots(mp: pytest.MonkeyPatch) -> None:
    """Draw no PNGs (most of a tiny report's time): the text is what these tests check."""
    from hiercluster.report import figures as report_plots, plots

    for module in (plots, report_plots):
        mp.setattr(module, "save_figure", lambda fig, path, dpi=110: Path(path))


@pytest.fixture
def no_plots(monkeypatch):
    _skip_plots(monkeypatch)


@pytest.fixture(scope="module")
def run_dir(checkpoint, tmp_path_factory):
    """A finished run of the multi-dimension grid on digits."""
    folder = tmp_path_factory.mktemp("grid")
    cfg = {
        "data": {"dataset": "digits", "batch_size": 128},
        "model": {"checkpoint": str(checkpoint)},
        "hierarchy": {"embedding": "fc_weights", "levels": LEVELS},
        "calibration": {"samples": 64, "batch_size": 32},
        "eval": {"random_seeds": 3, "tolerance": TOLERANCE},
        "output": {"export_models": False},
    }
    config = folder / "grid.yaml"
    config.write_text(yaml.safe_dump(cfg))
    args = ["run", str(config), "--out", str(folder / "run"), "--quiet"] + [a for s in GRID for a in ("--set", s)]
    with pytest.MonkeyPatch.context() as mp:
        _skip_plots(mp)
        assert main(args) == 0
    return folder / "run"


def _csv_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _section(text: str, title: str) -> str:
    """The body of the ``## title`` section of report.md."""
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def _expected_winners(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    """Per level, straight from the CSV: the fewest bits with drop <= tolerance, then the smallest drop."""
    winners: dict[str, dict[str, str]] = {}
    for r in rows:
        if float(r["drop"]) > TOLERANCE:
            continue
        best = winners.get(r["level"])
        if best is None or (int(r["bits"]), float(r["drop"])) < (int(best["bits"]), float(best["drop"])):
            winners[r["level"]] = r
    return winners


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _edit_run_json(run: Path, **changes) -> None:
    info = json.loads((run / "run.json").read_text())
    info.update(changes)
    (run / "run.json").write_text(json.dumps(info))


# --- the multi-dimension grid -----------------------------------------------------------


def test_report_names_every_spec_by_its_full_tag(run_dir):
    rows = _csv_rows(run_dir)
    tags = set(r["tag"] for r in rows)
    assert len(tags) == N_SPECS and all(t.endswith("+a4") for t in tags)
    text = (run_dir / "report.md").read_text()
    seed = _section(text, "Accuracy and size per precision")
    seed_labels = [line.split("|")[1].strip() for line in seed.splitlines() if line.startswith("| `")]
    assert sorted(seed_labels) == sorted(f"`{t}`" for t in tags)  # one row per spec, none unlabelled
    grouped = _section(text, "Grouped accuracy per level and spec")
    columns = [cell.strip() for line in grouped.splitlines() if line.startswith("| level |")
               for cell in line.split("|")[3:-1]]
    assert sorted(columns) == sorted(f"`{t}`" for t in tags)  # every spec once, per_tensor and per_channel alike
    for granularity in ("per_channel", "per_tensor"):
        for clipping in ("minmax", "mse"):
            assert f"**clipping {clipping}, granularity {granularity}**" in grouped


def test_header_states_what_varies_activations_and_lowest_width(run_dir):
    head = (run_dir / "report.md").read_text().split("## Fewest bits")[0]
    assert "- varying: clipping (minmax, mse); granularity (per_channel, per_tensor)" in head
    assert "- the same in every spec: scheme asymmetric, plan full, method rtn" in head
    assert "activations: **quantized** to 4 bits in every spec" in head
    assert "weight bits 4, 3 (lowest tested: **3**" in head
    assert "**drop pp** = float accuracy - quantized accuracy" in head and "-Δ acc" not in head


def test_headline_matches_a_direct_query_of_results_csv(run_dir):
    rows = _csv_rows(run_dir)
    lowest = min(int(r["bits"]) for r in rows)
    expected = _expected_winners(rows)
    assert expected and lowest == 3  # some level passes, so the winners are compared, not just "none in grid"
    lines = _section((run_dir / "report.md").read_text(), "Fewest bits per hierarchy level").splitlines()
    for level in dict.fromkeys(r["level"] for r in rows):
        cells = [c.strip() for c in next(line for line in lines if line.startswith(f"| {level} |")).split("|")[1:-1]]
        w = expected.get(level)
        if w is None:
            assert cells[2] == "none in grid"
            continue
        confident = "confident" if float(w["drop_hi"]) <= TOLERANCE else "borderline"
        assert cells[2] == f"{fewest_bits_cell(int(w['bits']), lowest)} ({confident})" and cells[3] == f"`{w['tag']}`"
        drop_cell = [fmt_number(float(w[key]), signed=True) for key in ("drop", "drop_lo", "drop_hi")]
        assert cells[7] == f"{drop_cell[0]} [{drop_cell[1]}, {drop_cell[2]}]"
        if int(w["k"]) == 10:  # one class per group: no random baseline
            assert cells[8] == cells[9] == "-"
        else:
            mean, std = float(w["random_drop_mean"]), float(w["random_drop_std"])
            assert cells[8] == f"{fmt_number(mean, signed=True)} ± {fmt_number(std)}"


def test_report_has_no_negative_zero(run_dir):
    text = (run_dir / "report.md").read_text()
    for zero in ("-0.0 ", "-0.0)", "-0.0 |", "-0.00"):
        assert zero not in text


def test_cached_logits_and_an_evaluation_subset_are_said(run_dir, tmp_path, no_plots):
    copy = _copy(run_dir, tmp_path)
    info = json.loads((copy / "run.json").read_text())
    n = info["n_eval"]
    _edit_run_json(copy, data_limit={"limit": 50, "of": n}, timings={**info["timings"], "float_logits_cached": True})
    assert main(["report", str(copy)]) == 0
    head = (copy / "report.md").read_text().split("## Fewest bits")[0]
    assert f"on 50 of {n:,} test images (a fixed stratified subset" in head
    assert "float logits reused from the cache" in head and "float evaluation" not in head


def test_a_damaged_data_limit_is_refused_before_anything_is_written(run_dir, tmp_path, capsys):
    copy = _copy(run_dir, tmp_path)
    _edit_run_json(copy, data_limit={"limit": "all"})
    before = (copy / "report.md").read_text()
    assert main(["report", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert "run.json is damaged: data_limit" in err and len(err.splitlines()) == 1
    assert (copy / "report.md").read_text() == before


def test_a_chance_level_model_is_warned_about_in_the_header(run_dir, tmp_path, no_plots):
    copy = _copy(run_dir, tmp_path)
    _edit_run_json(copy, float_accuracy=0.11)
    assert main(["report", str(copy)]) == 0
    head = (copy / "report.md").read_text().split("## Fewest bits")[0]
    assert "> **Warning: the float model is at chance level (11.00% on 10 classes; chance is 10.00%)" in head


# --- tables and wording ------------------------------------------------------------------


def test_docstring_examples():
    assert doctest.testmod(report).failed == 0


def test_chance_warning_within_two_points_or_below():
    assert chance_warning(0.10, 10).startswith("the float model is at chance level (10.00% on 10 classes")
    assert chance_warning(0.119, 10) is not None and chance_warning(0.121, 10) is None
    assert chance_warning(0.02, 10).startswith("the float model is below chance level")
    assert chance_warning(0.5, 2) is not None and chance_warning(0.53, 2) is None


def _row(method, bn, bits, drop, scheme="asymmetric", level="k=10", granularity="per_channel", act=None, k=10):
    tag = f"{scheme}-{bits}b-mse-{granularity}+full" + ("" if method == "rtn" else f"+{method}") + ("+bn" if bn else "")
    return {"spec_key": tag, "tag": tag, "scheme": scheme, "bits": bits, "clipping": "mse",
            "granularity": granularity, "plan": "full", "method": method, "bn_reestimate": bn, "activation_bits": act,
            "avg_bits": float(bits), "level": level, "k": k, "grouping": "learned", "acc_float": 0.9,
            "acc_quant": 0.9 - drop / 100, "drop": drop, "advantage": 0.1, "random_drop_mean": drop + 0.1,
            "random_drop_std": 0.05, "fine_acc": 0.9 - drop / 100, "fp32_bytes": 4000, "packed_bytes": 100 * bits,
            "gzip_bytes": 90, "xz_bytes": 80, "random_acc_quant_mean": 0.5, "random_acc_quant_std": 0.1}


def test_headline_seed_and_level_tables_carry_the_method():
    rows = [_row("rtn", 0, 4, 0.5), _row("rtn", 0, 2, 40.0), _row("gptq", 1, 4, 0.2), _row("gptq", 1, 2, 0.8)]
    table = headline(rows, 1.0)
    line = format_headline(table, {"k=10": ["a"]}, 1.0).splitlines()
    assert "| winning spec |" in line[0]
    assert "| ≤ 2 (lowest tested) | `asymmetric-2b-mse-per_channel+full+gptq+bn` | 2.000 |" in line[2]
    info = {"class_names": list("abcdefghij"), "levels": {"k=10": {"k": 10}}, "float_accuracy": 0.9}
    seed = seed_table(info, rows)
    assert "**method rtn**" in seed and "**method gptq+bn**" in seed
    rtn_block, gptq_block = seed.split("**method gptq+bn**")
    assert "| `asymmetric-2b-mse-per_channel+full` | 2 | 50.00 | +40.00 |" in rtn_block
    assert "| `asymmetric-2b-mse-per_channel+full+gptq+bn` | 2 | 89.20 | +0.80 |" in gptq_block
    levels = level_tables(info, rows)
    assert "**method rtn**" in levels and "**method gptq+bn**" in levels
    assert bias_choice(rows)["method"] == "rtn"  # the bias analysis shows round to nearest when there is one
    assert bias_choice(rows[2:])["method"] == "gptq"


def test_rows_differing_only_in_granularity_get_their_own_tables():
    """The issue's bug: per_tensor and per_channel at 4 bits were one unlabelled "4-bit" row."""
    rows = [_row("rtn", 0, 4, 0.3, granularity=g, act=4) for g in ("per_channel", "per_tensor")]
    assert varying_dims(rows) == [("granularity", "granularity")]
    info = {"class_names": list("abcdefghij"), "levels": {"k=10": {"k": 10}}, "float_accuracy": 0.9}
    seed = seed_table(info, rows)
    assert "**granularity per_channel**" in seed and "**granularity per_tensor**" in seed
    assert "| `asymmetric-4b-mse-per_tensor+full` | 4 |" in seed
    levels = level_tables(info, rows)
    assert levels.count("| level | float acc % | `asymmetric-4b-mse-per_") == 2


def test_one_class_per_group_level_has_no_random_baseline():
    rows = [_row("rtn", 0, 4, 0.3), _row("rtn", 0, 4, 0.2, level="k=3", k=3)]
    info = {"class_names": list("abcdefghij"), "levels": {"k=10": {"k": 10}, "k=3": {"k": 3}}, "float_accuracy": 0.9}
    table = format_headline(headline(rows, 1.0), {}, 1.0, n_classes=10).splitlines()
    assert table[2].split("|")[9:11] == [" - ", " - "]
    assert table[3].split("|")[9:11] == [" +0.30 ± 0.05 ", " +0.10 "]
    levels = level_tables(info, rows).splitlines()
    assert next(line for line in levels if line.startswith("| k=10 |")).endswith("\\| - \\| - |")
    assert "±" in next(line for line in levels if line.startswith("| k=3 |"))


def test_data_limit_of_an_older_run_is_optional():
    assert report._evaluated_on({"n_eval": 10000, "eval_split": "test"}) == "on 10,000 images (test split)"
    with_limit = {"n_eval": 500, "eval_split": "test", "data_limit": {"limit": 500, "of": 10000}}
    assert report._evaluated_on(with_limit).startswith("on 500 of 10,000 test images")
    with pytest.raises(HierclusterError, match="data_limit: 600 of 500 images is not a subset"):
        report._check_report_info({"data_limit": {"limit": 600, "of": 500}}, Path("run.json"))


# --- seed claims, per-layer effect ------------------------------------------------------------


def _claim_rows(text: str) -> dict[str, list[str]]:
    """The claims table of report.md: claim -> its cells (verdict, evidence, rule)."""
    body = _section(text, "Seed claims, checked")
    cells = [[c.strip() for c in line.split(" | ")] for line in body.splitlines()
             if line.startswith("| ") and not line.startswith("| claim |")]
    return {c[0].lstrip("| "): c[1:] for c in cells}


def test_claims_follow_the_headline_with_a_verdict_per_claim(run_dir):
    text = (run_dir / "report.md").read_text()
    assert text.index("## Fewest bits per hierarchy level") < text.index("## Seed claims, checked") < text.index(
        "## Accuracy and size per precision")
    rows = _claim_rows(text)
    assert len(rows) == 5 and all(v[0].strip("*") in ("holds", "holds partly", "does not hold", "not decided")
                                  for v in rows.values())
    # The grid quantizes activations in every spec and tries 4 and 3 bits: no data-free weight-only claim to check.
    assert rows["8-bit weights are as good as float"][0] == "**not decided**"
    assert rows["data-free 3-bit weights lose nothing"][0] == "**not decided**"
    # 3 random groupings: rank p cannot reach 0.05.
    assert rows["grouping similar classes pushes the bit limit lower"][1].startswith("with 3 random groupings")
    assert "run `hiercluster sensitivity CONFIG --bits 2`" in rows["the initial layers matter most"][1]


def test_per_layer_table_of_the_bias_spec(run_dir):
    text = (run_dir / "report.md").read_text()
    bias_tag = text.split("## Biased inference at ", 1)[1].split("`")[1]
    body = _section(text, f"Per-layer effect of quantization (`{bias_tag}`)")
    layers = [line for line in body.splitlines() if line.startswith("| ") and not line.startswith("| layer")]
    assert layers and layers[0].startswith("| conv1 | 3 | ") and " → " in layers[0]


def test_a_sensitivity_csv_in_the_run_decides_the_early_layers_claim(run_dir, tmp_path, no_plots):
    copy = _copy(run_dir, tmp_path)
    folder = copy / "sensitivity"
    folder.mkdir()
    header = "layer,params,drop_fine,se_drop_fine,drop_k,se_drop_k,gain_fine,se_gain_fine,gain_k,se_gain_k\n"
    (folder / "spec-2b-k5.csv").write_text(header + "conv1,10,9,0.5,1,0.1,1,0.1,1,0.1\n"
                                           + "".join(f"l{i},10,1,0.5,1,0.1,1,0.1,1,0.1\n" for i in range(7)))
    assert main(["report", str(copy)]) == 0
    claim = _claim_rows((copy / "report.md").read_text())["the initial layers matter most"]
    assert claim[0] == "**holds**" and claim[1].startswith("sensitivity/spec-2b-k5.csv: mean single-layer fine drop "
                                                           "of the first 2 of 8 layers +5.00 pp vs +1.00 pp")
    (folder / "spec-2b-k5.csv").write_text("not,a,table\n")
    assert main(["report", str(copy)]) == 0  # a damaged sensitivity file leaves the claim undecided
    claim = _claim_rows((copy / "report.md").read_text())["the initial layers matter most"]
    assert claim[0] == "**not decided**" and claim[1].startswith("sensitivity/spec-2b-k5.csv unreadable (no column")
