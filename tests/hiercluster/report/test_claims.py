"""hiercluster.report.claims: each seed claim's verdicts and boundaries, identical widths, the per-layer table.

Rows and tables are built by hand. Accuracies are multiples of 1/128 and the tolerance
100/128 pp, so that every drop compared with the tolerance is exact in floating point.
"""

from __future__ import annotations

import doctest
import math
import os

import numpy as np
import pytest

import hiercluster.report.claims as claims
from hiercluster.evaluation.sensitivity import LayerSensitivity
from hiercluster.report.claims import (
    HOLDS,
    NOT_HOLD,
    PARTLY,
    UNDECIDED,
    SensitivityRun,
    check_claims,
    claim_3bit,
    claim_8bit,
    claim_bias,
    claim_early_layers,
    claim_grouping,
    claims_section,
    identical_note,
    identical_to_lower,
    latest_sensitivity,
    layer_section,
    normalized_entropy,
)
from hiercluster.report.markdown import level_tables, seed_table

STEP = 1 / 128  # one step of accuracy: 100 / 128 = 0.78125 pp of drop
TOL = 100 * STEP
NAMES = list("abcdefghij")
INFO = {"class_names": NAMES, "float_accuracy": 0.5, "tolerance": TOL, "float_prediction_share": [0.1] * 10,
        "levels": {"k=10": {"k": 10, "kind": "learned"}, "k=5": {"k": 5, "kind": "learned"}}}


def _spec(bits, steps, *, scheme="asymmetric", method="rtn", bn=False, act=None, avg_bits=None, lo=None, hi=None,
          clipping="minmax", digest=None, key=None, level="k=10", k=10, drop_steps=None, grouping="learned"):
    """One result row: a spec whose fine drop is ``steps`` steps, at one level (drop ``drop_steps`` steps there)."""
    tag = (f"{scheme}-{bits}b-{clipping}-per_channel+full" + ("" if method == "rtn" else f"+{method}")
           + ("+bn" if bn else ""))
    row = {"spec_key": key or tag + (f"+a{act}" if act else ""), "tag": tag, "scheme": scheme, "bits": bits,
           "clipping": clipping, "granularity": "per_channel", "plan": "full", "method": method, "bn_reestimate": bn,
           "activation_bits": act, "avg_bits": float(bits if avg_bits is None else avg_bits),
           "fine_acc": 0.5 - steps * STEP, "fine_drop_lo": lo, "fine_drop_hi": hi,
           "level": level, "k": k, "grouping": grouping,
           "drop": 100 * STEP * (steps if drop_steps is None else drop_steps),
           "acc_float": 0.5, "acc_quant": 0.5 - STEP * steps, "fp32_bytes": 4000, "packed_bytes": 100 * bits,
           "gzip_bytes": 90, "xz_bytes": 80, "random_acc_quant_mean": 0.4, "random_acc_quant_std": 0.01,
           "random_drop_mean": 1.0, "random_drop_std": 0.1, "advantage": 0.2}
    if digest is not None:
        row["logits_digest"] = digest
    return row


def test_docstring_examples():
    assert doctest.testmod(claims).failed == 0


# --- 8 bits as good as float -----------------------------------------------------------------


def test_8bit_holds_when_every_upper_end_is_within_tolerance_inclusive():
    rows = [_spec(8, 0, lo=-0.1, hi=TOL), _spec(8, 0.5, scheme="symmetric", lo=0.0, hi=0.5)]
    c = claim_8bit(INFO, rows)
    assert c["verdict"] == HOLDS
    assert c["evidence"] == (f"2 of 2 confident within {TOL:g} pp, 2 with drop ≤ {TOL:g} pp; "
                             "worst `asymmetric-8b-minmax-per_channel+full` 0.00 [-0.10, +0.78] pp")


def test_8bit_holds_partly_when_one_upper_end_is_above():
    rows = [_spec(8, 0, lo=0.0, hi=0.1), _spec(8, 1, scheme="symmetric", lo=0.3, hi=TOL + 1e-9)]  # drop == tolerance
    assert claim_8bit(INFO, rows)["verdict"] == PARTLY


def test_8bit_does_not_hold_when_every_drop_is_above_tolerance():
    rows = [_spec(8, 1.01, lo=0.5, hi=1.2), _spec(8, 3, scheme="symmetric", lo=2.0, hi=2.5)]
    c = claim_8bit(INFO, rows)
    assert c["verdict"] == NOT_HOLD and "0 of 2 confident" in c["evidence"]


def test_8bit_without_intervals_is_at_most_partly_and_says_why():
    c = claim_8bit(INFO, [_spec(8, 0)])
    assert c["verdict"] == PARTLY and c["evidence"].endswith("(no intervals: run with eval.bootstrap > 0)")


def test_8bit_reads_only_data_free_uniform_weight_only_specs_and_skips_pow2():
    good = _spec(8, 0, lo=0.0, hi=0.1)
    ignored = [_spec(8, 20, scheme="pow2", lo=19, hi=21), _spec(8, 20, method="gptq", lo=19, hi=21),
               _spec(8, 20, bn=True, lo=19, hi=21), _spec(8, 20, act=4, lo=19, hi=21),
               _spec(8, 20, avg_bits=9.5, key="mixed", lo=19, hi=21), _spec(4, 20, lo=19, hi=21)]
    assert claim_8bit(INFO, [good, *ignored])["verdict"] == HOLDS
    c = claim_8bit(INFO, ignored)
    assert c["verdict"] == UNDECIDED
    assert c["evidence"] == "the grid has no data-free 8-bit spec with float activations (pow2 aside)"


# --- data-free 3 bits ------------------------------------------------------------------------


def test_3bit_holds_when_one_spec_is_confident():
    rows = [_spec(3, 5, lo=4, hi=6), _spec(3, 0.5, scheme="symmetric", lo=0.1, hi=TOL)]
    c = claim_3bit(INFO, rows, {"k=10"})
    assert c["verdict"] == HOLDS and c["evidence"].startswith("confident: `symmetric-3b")


def test_3bit_borderline_holds_partly():
    rows = [_spec(3, 1, lo=0.3, hi=1.2)]  # drop == tolerance, upper end above
    c = claim_3bit(INFO, rows, {"k=10"})
    assert c["verdict"] == PARTLY and c["evidence"].startswith("borderline: `asymmetric-3b")


def test_3bit_holds_partly_when_only_a_coarser_learned_headline_level_is_within_tolerance():
    fine = _spec(3, 4, lo=3, hi=5)
    k5 = _spec(3, 4, level="k=5", k=5, drop_steps=1)
    k5["drop_lo"], k5["drop_hi"] = 0.5, 1.0
    c = claim_3bit(INFO, [fine, k5], {"k=10", "k=5"})
    assert c["verdict"] == PARTLY
    assert c["evidence"].endswith(f"within {TOL:g} pp from k=5 on: `asymmetric-3b-minmax-per_channel+full` "
                                  "+0.78 [+0.50, +1.00] pp")
    # The same level left out of the headline, a reference grouping, or a drop above tolerance: no.
    assert claim_3bit(INFO, [fine, k5], {"k=10"})["verdict"] == NOT_HOLD
    assert claim_3bit(INFO, [fine, {**k5, "grouping": "reference"}], {"k=10", "k=5"})["verdict"] == NOT_HOLD
    assert claim_3bit(INFO, [fine, {**k5, "drop": TOL + 1e-9}], {"k=10", "k=5"})["verdict"] == NOT_HOLD


def test_3bit_undecided_without_a_data_free_3bit_spec():
    rows = [_spec(3, 0, method="gptq", lo=0, hi=0.1), _spec(4, 0, lo=0, hi=0.1)]
    assert claim_3bit(INFO, rows, {"k=10"})["verdict"] == UNDECIDED


# --- biased inference ------------------------------------------------------------------------


def test_normalized_entropy_by_hand():
    p = [0.5, 0.25, 0.25, 0.0]
    assert normalized_entropy(p) == pytest.approx(1.5 * math.log(2) / math.log(4))
    assert normalized_entropy([2.0, 2.0]) == pytest.approx(1.0)  # shares that do not sum to 1 are normalized


def _collapsed(top: float) -> list[float]:
    return [top] + [(1 - top) / 9] * 9


@pytest.mark.parametrize("top, verdict", [(0.5, HOLDS), (0.3, PARTLY), (0.15, NOT_HOLD)])
def test_bias_verdict_by_the_entropy_fall(top, verdict):
    rows = [_spec(2, 30)]
    c = claim_bias(INFO, rows, {rows[0]["spec_key"]: {"prediction_share": _collapsed(top)}})
    assert c["verdict"] == verdict
    h1 = normalized_entropy(_collapsed(top))
    assert f"entropy 1.000 → {h1:.3f}" in c["evidence"] and f"→ {100 * top:.1f}% (a)" in c["evidence"]


def test_bias_thresholds_are_inclusive(monkeypatch):
    rows = [_spec(2, 30)]
    details = {rows[0]["spec_key"]: {"prediction_share": _collapsed(0.4)}}
    fall = 1.0 - normalized_entropy(_collapsed(0.4))
    monkeypatch.setattr(claims, "ENTROPY_FALL_HOLDS", fall)
    assert claim_bias(INFO, rows, details)["verdict"] == HOLDS
    monkeypatch.setattr(claims, "ENTROPY_FALL_HOLDS", np.nextafter(fall, 1.0))
    monkeypatch.setattr(claims, "ENTROPY_FALL_PARTLY", fall)
    assert claim_bias(INFO, rows, details)["verdict"] == PARTLY
    monkeypatch.setattr(claims, "ENTROPY_FALL_PARTLY", np.nextafter(fall, 1.0))
    assert claim_bias(INFO, rows, details)["verdict"] == NOT_HOLD


def test_bias_uses_the_bias_sections_spec_and_is_undecided_without_one():
    rows = [_spec(4, 1), _spec(2, 30), _spec(2, 1, method="gptq")]
    details = {rows[0]["spec_key"]: {"prediction_share": _collapsed(0.1)},
               rows[1]["spec_key"]: {"prediction_share": _collapsed(0.9)},
               rows[2]["spec_key"]: {"prediction_share": _collapsed(0.1)}}
    c = claim_bias(INFO, rows, details)
    assert c["verdict"] == HOLDS and c["evidence"].startswith("`asymmetric-2b-minmax-per_channel+full`:")
    assert claim_bias(INFO, [], {})["verdict"] == UNDECIDED


# --- grouping pushes the limit ---------------------------------------------------------------


def _entry(level, k, min_bits, lowest=2, rank_p=0.01, lo=0.1, grouping="learned"):
    winner = None if min_bits is None else {"bits": min_bits, "advantage": 0.4, "advantage_lo": lo,
                                            "advantage_hi": 0.7, "rank_p": rank_p, "tag": "t", "spec_key": "s"}
    return {"level": level, "k": k, "grouping": grouping, "min_bits": min_bits, "lowest_bits": lowest,
            "winner": winner}


def test_grouping_holds_when_a_learned_level_reaches_fewer_bits_significantly():
    table = [_entry("k=10", 10, 4), _entry("k=5", 5, 3, rank_p=0.05, lo=0.01)]  # p == alpha counts
    c = claim_grouping(INFO, table)
    assert c["verdict"] == HOLDS
    assert c["evidence"] == ("fine level: 4 bits; 1 of 1 learned levels reach fewer bits, 1 of them significant: "
                             "k=5 at 3 bits: advantage +0.40 [+0.01, +0.70] pp, rank p 0.050")


@pytest.mark.parametrize("rank_p, lo", [(0.051, 0.1), (0.01, 0.0), (None, 0.1)])
def test_grouping_holds_partly_when_fewer_bits_are_not_significant(rank_p, lo):
    table = [_entry("k=10", 10, 4), _entry("k=5", 5, 3, rank_p=rank_p, lo=lo)]
    assert claim_grouping(INFO, table)["verdict"] == PARTLY


def test_grouping_without_an_interval_rests_on_rank_p():
    table = [_entry("k=10", 10, 4), _entry("k=5", 5, 3, lo=None)]
    assert claim_grouping(INFO, table)["verdict"] == HOLDS


def test_grouping_does_not_hold_when_no_learned_level_reaches_fewer_bits():
    table = [_entry("k=10", 10, 4), _entry("k=5", 5, 4), _entry("k=3", 3, None)]
    assert claim_grouping(INFO, table)["verdict"] == NOT_HOLD
    # A fine level with no passing width: any learned level that passes reaches fewer bits.
    table = [_entry("k=10", 10, None), _entry("k=5", 5, 8)]
    c = claim_grouping(INFO, table)
    assert c["verdict"] == HOLDS and c["evidence"].startswith("fine level: none in grid;")


@pytest.mark.parametrize("n_significant, verdict", [(2, HOLDS), (1, PARTLY), (0, NOT_HOLD)])
def test_grouping_at_the_lowest_width_needs_half_the_learned_levels_significant(n_significant, verdict):
    ks = (8, 5, 3, 2)
    table = [_entry("k=10", 10, 2)] + [
        _entry(f"k={k}", k, 2, rank_p=0.01 if i < n_significant else 0.5) for i, k in enumerate(ks)
    ]
    c = claim_grouping(INFO, table)
    assert c["verdict"] == verdict
    assert c["evidence"].startswith(f"fine level: 2 bits, the lowest tested; advantage significant at {n_significant} "
                                    "of 4 learned levels")


def test_grouping_is_undecided_when_too_few_random_groupings_can_reach_alpha():
    table = [_entry("k=10", 10, 4), _entry("k=5", 5, 3)]
    c = claim_grouping({**INFO, "random_seeds": 19}, table)  # rank p >= 1/20 = 0.05: still decidable
    assert c["verdict"] == HOLDS
    c = claim_grouping({**INFO, "random_seeds": 18}, table)  # rank p >= 1/19 > 0.05
    assert c["verdict"] == UNDECIDED
    assert c["evidence"] == "with 18 random groupings the rank p cannot go below 0.053: raise eval.random_seeds"


def test_grouping_ignores_references_one_group_and_is_undecided_without_learned_levels():
    table = [_entry("k=10", 10, 4), _entry("ref", 5, 3, grouping="reference"), _entry("k=1", 1, 2)]
    assert claim_grouping(INFO, table)["verdict"] == UNDECIDED
    assert claim_grouping(INFO, [_entry("k=5", 5, 3)])["evidence"] == "no fine level"


# --- the initial layers -----------------------------------------------------------------------


def _layers(drops, se=0.1):
    return tuple(LayerSensitivity(f"l{i}", 10, d, se, d, se, 0.0, se, 0.0, se) for i, d in enumerate(drops))


def test_early_layers_from_a_sensitivity_run(tmp_path):
    run = SensitivityRun(tmp_path / "sensitivity" / "x-2b-k5.csv", _layers([5.0, 1.0, 1.0, 1.0]))
    c = claim_early_layers(run)
    assert c["verdict"] == HOLDS
    # first quarter of 4 = 1 layer: 5 vs mean(1, 1, 1) = 1; SE hypot(0.1, sqrt(3 * 0.01) / 3)
    se = math.hypot(0.1, math.sqrt(0.03) / 3)
    assert c["evidence"] == (f"sensitivity/x-2b-k5.csv: mean single-layer fine drop of the first 1 of 4 layers "
                             f"+5.00 pp vs +1.00 pp for the rest (SE of the difference {se:.2f}); most sensitive: l0")
    assert claim_early_layers(SensitivityRun(run.path, _layers([1.0, 1.0, 5.0, 1.0])))["verdict"] == NOT_HOLD


def test_early_layers_undecided_without_a_run_or_with_an_unreadable_file(tmp_path):
    c = claim_early_layers(None)
    assert c["verdict"] == UNDECIDED and "run `hiercluster sensitivity CONFIG --bits 2`" in c["evidence"]
    c = claim_early_layers(SensitivityRun(tmp_path / "sensitivity" / "bad.csv", error="no layer"))
    assert c["verdict"] == UNDECIDED and c["evidence"] == "sensitivity/bad.csv unreadable (no layer)"


def _write_csv(path, drops):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(LayerSensitivity.COLUMNS)]
    lines += [f"l{i},10,{d},0.1,{d},0.1,0,0.1,0,0.1" for i, d in enumerate(drops)]
    path.write_text("\n".join(lines) + "\n")


def test_latest_sensitivity_reads_the_most_recent_csv(tmp_path):
    assert latest_sensitivity(tmp_path) is None
    old, new = tmp_path / "sensitivity" / "a-4b-k5.csv", tmp_path / "sensitivity" / "b-2b-k5.csv"
    _write_csv(old, [1.0, 2.0])
    _write_csv(new, [3.0, 1.0, 0.5])
    os.utime(old, ns=(2_000_000_000_000_000_000, 2_000_000_000_000_000_000))  # newer than the other
    os.utime(new, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    run = latest_sensitivity(tmp_path)
    assert run.path == old and run.error is None and [r.drop_fine for r in run.rows] == [1.0, 2.0]


@pytest.mark.parametrize("text, error", [
    ("layer,params\nl0,3\n", "no column drop_fine and 7 more"),
    ("layer,params,drop_fine,se_drop_fine,drop_k,se_drop_k,gain_fine,se_gain_fine,gain_k\n", "no column se_gain_k"),
    (",".join(LayerSensitivity.COLUMNS) + "\n", "no layer"),
    (",".join(LayerSensitivity.COLUMNS) + "\nl0,10,x,0,0,0,0,0,0,0\n", "line 2 is not a layer's figures"),
    (",".join(LayerSensitivity.COLUMNS) + "\nl0,10,1\n", "line 2 is not a layer's figures"),
])
def test_a_bad_sensitivity_csv_is_an_error_not_a_crash(tmp_path, text, error):
    path = tmp_path / "sensitivity" / "x.csv"
    path.parent.mkdir()
    path.write_text(text)
    run = latest_sensitivity(tmp_path)
    assert run.path == path and run.rows == () and run.error == error
    assert claim_early_layers(run)["verdict"] == UNDECIDED


def test_a_csv_that_is_not_utf8_is_unreadable(tmp_path):
    path = tmp_path / "sensitivity" / "x.csv"
    path.parent.mkdir()
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert latest_sensitivity(tmp_path).error


# --- the section ------------------------------------------------------------------------------


def test_claims_section_has_one_row_per_claim_in_order():
    rows = [_spec(8, 0, lo=0, hi=0.1), _spec(3, 5, lo=4, hi=6), _spec(2, 30)]
    details = {r["spec_key"]: {"prediction_share": _collapsed(0.9)} for r in rows}
    table = [_entry("k=10", 10, 8, lowest=2), _entry("k=5", 5, 3)]
    lines = claims_section(INFO, rows, details, table)
    assert lines[0] == "## Seed claims, checked"
    body = [line for line in lines if line.startswith("| ") and not line.startswith("| claim")]
    verdicts = [line.split(" | ")[1] for line in body]
    assert verdicts == [f"**{v}**" for v in (HOLDS, NOT_HOLD, HOLDS, HOLDS, UNDECIDED)]
    assert [c["verdict"] for c in check_claims(INFO, rows, details, table)] == [HOLDS, NOT_HOLD, HOLDS, HOLDS,
                                                                                 UNDECIDED]


def test_a_pipe_in_a_class_name_does_not_break_the_table():
    info = {**INFO, "class_names": ["a|b"] + NAMES[1:]}
    rows = [_spec(2, 30)]
    lines = claims_section(info, rows, {rows[0]["spec_key"]: {"prediction_share": _collapsed(0.9)}}, [])
    bias = next(line for line in lines if line.startswith("| low-bit inference"))
    assert "(a\\|b)" in bias and bias.count(" | ") == 3


# --- identical logits at different widths -----------------------------------------------------


def test_identical_digests_are_flagged_with_the_narrowest_twin():
    rows = [_spec(8, 1, scheme="pow2", digest="aa"), _spec(6, 1, scheme="pow2", digest="aa"),
            _spec(4, 1, scheme="pow2", digest="aa"), _spec(3, 2, scheme="pow2", digest="bb")]
    assert identical_to_lower(rows) == {rows[0]["spec_key"]: 4, rows[1]["spec_key"]: 4}


def test_different_digests_other_settings_or_no_digest_are_not_flagged():
    assert identical_to_lower([_spec(8, 1, scheme="pow2", digest="aa"), _spec(4, 1, scheme="pow2", digest="bb")]) == {}
    assert identical_to_lower([_spec(8, 1, scheme="pow2", digest="aa"),
                               _spec(4, 1, scheme="pow2", digest="aa", clipping="mse")]) == {}
    assert identical_to_lower([_spec(8, 1, scheme="pow2", digest="aa"), _spec(4, 1, digest="aa")]) == {}
    assert identical_to_lower([_spec(8, 1, scheme="pow2"), _spec(4, 1, scheme="pow2")]) == {}  # older run
    assert identical_to_lower([_spec(8, 1, scheme="pow2", digest="aa"), _spec(4, 1, scheme="pow2")]) == {}


def test_flagged_widths_in_the_precision_and_level_tables():
    rows = [_spec(8, 1, scheme="pow2", digest="aa"), _spec(4, 1, scheme="pow2", digest="aa"),
            _spec(8, 0, digest="cc")]
    info = {**INFO, "levels": {"k=10": {"k": 10, "kind": "learned"}}}
    seed = seed_table(info, rows)
    assert "| `pow2-8b-minmax-per_channel+full` | 8 (= 4 bits) | 49.22 |" in seed
    assert "| `pow2-4b-minmax-per_channel+full` | 4 | 49.22 |" in seed
    assert "| `asymmetric-8b-minmax-per_channel+full` | 8 | 50.00 |" in seed
    note = seed.strip().splitlines()[-1]
    assert note.startswith("\"(= N bits)\": the quantized model's logits are bit-identical")
    assert "`pow2-8b-minmax-per_channel+full` (= 4 bits)" in note and "4 bits reach a·2^-6" in note
    assert "The headline names" not in note  # the 4-bit twin passes wherever the 8-bit one does
    levels = level_tables(info, rows)
    assert "`pow2-8b-minmax-per_channel+full` (= 4 bits) |" in levels and "see the note" in levels
    unflagged = [{k: v for k, v in r.items() if k != "logits_digest"} for r in rows]
    assert "(= " not in seed_table(info, unflagged) and "(= " not in level_tables(info, unflagged)


def test_identical_note_names_a_flagged_winner():
    rows = [_spec(8, 1, scheme="pow2", digest="aa"), _spec(4, 1, scheme="pow2", digest="aa")]
    flags = identical_to_lower(rows)
    note = identical_note(rows, flags, [rows[0], None])
    assert note.endswith("The headline names `pow2-8b-minmax-per_channel+full`: read it at the narrower width.")
    assert identical_note(rows, {}) == ""


# --- per-layer effect -------------------------------------------------------------------------


def _layer(name, bits=2, **extra):
    row = {"name": name, "bits": bits, "before_mean": -0.00123, "after_mean": 0.0, "outlier_fraction": 0.0125,
           "range_ratio_ch_median": 0.9, "range_ratio_ch_min": 0.5, "sqnr_db": 12.34}
    return {**row, **extra}


def test_layer_table_rows_for_the_bias_sections_spec():
    rows = [_spec(4, 1), _spec(2, 30)]
    layers = [_layer("conv1"), _layer("fc", bits=32), _layer("old", range_ratio_ch_median=float("nan"))]
    for key in ("before_mean", "after_mean", "outlier_fraction", "range_ratio_ch_min", "sqnr_db"):
        del layers[2][key]  # a row stored before these columns existed
    details = {rows[0]["spec_key"]: {"layers": [_layer("other")]}, rows[1]["spec_key"]: {"layers": layers}}
    lines = layer_section(rows, details)
    assert lines[0] == "## Per-layer effect of quantization (`asymmetric-2b-minmax-per_channel+full`)"
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| layer")]
    assert table == [
        "| conv1 | 2 | -1.23e-03 → 0 | 1.25 | 0.900 (min 0.500) | 12.3 |",
        "| fc | float | -1.23e-03 → 0 | 1.25 | - | - |",
        "| old | 2 | - | - | - | - |",
    ]
    assert "Showing the first" not in lines[2]


def test_layer_table_is_capped_and_says_so():
    rows = [_spec(2, 30)]
    details = {rows[0]["spec_key"]: {"layers": [_layer(f"l{i}") for i in range(claims.MAX_LAYER_ROWS + 5)]}}
    lines = layer_section(rows, details)
    assert sum(line.startswith("| l") and not line.startswith("| layer") for line in lines) == claims.MAX_LAYER_ROWS
    assert f"Showing the first {claims.MAX_LAYER_ROWS} of {claims.MAX_LAYER_ROWS + 5} layers" in lines[2]
    assert layer_section(rows, {rows[0]["spec_key"]: {"layers": []}}) == [] and layer_section([], {}) == []
