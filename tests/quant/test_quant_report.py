"""QuantReport (quant/report.py) and the statistics behind it (quant/metrics.py).

Named test_quant_report.py, not test_report.py: tests/ has no __init__.py files, so two
test modules with the same base name (hiercluster has a report module too) would clash.
"""

import csv
import json
import math

import numpy as np
import pytest
import torch

import quant.report
from quant import QuantPlan, QuantSpec, fold_batchnorm, quantize_model
from quant.metrics import (
    five_numbers,
    outlier_fraction,
    per_channel_distinct,
    per_channel_range_ratio,
    per_channel_zero_fraction,
    sqnr_db,
    squared_error,
    tukey_fences,
)
from quant.report import LayerReport

COLUMNS = [
    "name", "shape", "numel", "bits", "scheme", "tag", "residual", "method", "mse", "sqnr_db",
    "before_min", "before_q1", "before_median", "before_q3", "before_max", "before_mean",
    "after_min", "after_q1", "after_median", "after_q3", "after_max", "after_mean",
    "zero_fraction", "zero_fraction_ch_min", "zero_fraction_ch_mean", "zero_fraction_ch_max",
    "distinct_levels", "distinct_ch_min", "distinct_ch_mean", "distinct_ch_max",
    "outlier_fraction", "range_ratio_ch_median", "range_ratio_ch_min",
    "act_bits", "act_scale", "act_zero_point", "output_mse_rtn", "output_mse",
]


@pytest.fixture
def quantized(small_net):
    spec = QuantSpec(scheme="pow2", bits=3)
    qnet, report = quantize_model(small_net, spec, QuantPlan(skip=("fc",)))
    return small_net, qnet, report


def test_rows_hold_every_column_and_every_layer(quantized):
    _, _, report = quantized
    rows = report.rows()
    assert [r["name"] for r in rows] == ["conv1", "conv2", "fc"]
    assert list(rows[0]) == COLUMNS
    # Round to nearest without data: no output errors; the skipped fc layer has no method.
    assert [r["method"] for r in rows] == ["rtn", "rtn", None]
    assert rows[0]["output_mse_rtn"] is None and rows[0]["output_mse"] is None
    assert rows[0]["shape"] == "8x1x3x3" and rows[0]["tag"] == "pow2-3b-minmax-per_channel"


def test_statistics_agree_with_independent_computations(quantized):
    model, qnet, report = quantized
    folded = fold_batchnorm(model)
    for row in report.layers:
        w = folded.get_submodule(row.name).weight.detach().double()
        q = qnet.get_submodule(row.name).weight.detach().double()
        err = ((w - q) ** 2).sum().item()
        assert row.mse == pytest.approx(err / w.numel(), rel=1e-12, abs=0)
        if err:
            assert row.sqnr_db == pytest.approx(10 * math.log10((w**2).sum().item() / err), rel=1e-12)
        else:
            assert row.sqnr_db == math.inf
        for when, t in (("before", w), ("after", q)):
            expected = np.percentile(t.numpy().ravel(), [0, 25, 50, 75, 100])
            got = getattr(row, when)
            assert np.allclose([got[k] for k in ("min", "q1", "median", "q3", "max")], expected, rtol=1e-12, atol=0)
            assert got["mean"] == pytest.approx(t.numpy().mean(), rel=1e-12, abs=1e-15)
        flat = w.float().double().numpy().ravel()
        q1, q3 = np.percentile(flat, [25, 75])
        outside = (flat < q1 - 1.5 * (q3 - q1)) | (flat > q3 + 1.5 * (q3 - q1))
        assert row.outlier_fraction == pytest.approx(outside.mean(), abs=1e-12)
        w_rows, q_rows = w.reshape(w.shape[0], -1).numpy(), q.reshape(q.shape[0], -1).numpy()
        ratios = np.ptp(q_rows, axis=1) / np.ptp(w_rows, axis=1)
        assert list(row.range_ratio_per_channel) == pytest.approx(list(ratios), rel=1e-12)
        flat_row = next(r for r in report.rows() if r["name"] == row.name)
        assert flat_row["range_ratio_ch_median"] == pytest.approx(np.median(ratios), rel=1e-12)
        assert flat_row["range_ratio_ch_min"] == pytest.approx(ratios.min(), rel=1e-12)
        assert row.zero_fraction == pytest.approx((q == 0).double().mean().item())
        assert row.distinct_levels == len(np.unique(q.numpy()))
        per_channel = q.reshape(q.shape[0], -1).numpy()
        assert list(row.distinct_per_channel) == [len(np.unique(r)) for r in per_channel]
        assert list(row.zero_fraction_per_channel) == pytest.approx([float((r == 0).mean()) for r in per_channel])


def test_float_layer_row(quantized):
    _, _, report = quantized
    fc = report.layer("fc")
    assert (fc.bits, fc.scheme, fc.tag, fc.mse, fc.sqnr_db) == (32, "float", "float32", 0.0, math.inf)
    assert fc.before == fc.after
    assert set(fc.range_ratio_per_channel) == {1.0}
    with pytest.raises(KeyError, match="conv1, conv2, fc"):
        report.layer("nope")


def test_pow2_rows_show_local_sparsity(quantized):
    _, _, report = quantized
    conv2 = report.layer("conv2")
    assert conv2.distinct_levels <= 2 * 3 + 1 or max(conv2.distinct_per_channel) <= 7
    assert max(conv2.distinct_per_channel) <= 2**3


def test_to_dict_is_json_and_states_float_biases(quantized):
    _, _, report = quantized
    data = report.to_dict()
    assert data["biases"] == "float32"
    assert data["spec_tag"] == "pow2-3b-minmax-per_channel"
    assert data["plan"]["skip"] == ["fc"]
    assert data["folded_batchnorm"] == [["conv1", "bn1"], ["conv2", "bn2"]]
    assert data["avg_bits_per_weight"] == pytest.approx(report.avg_bits)
    text = json.dumps(data)  # inf SQNR is written as Infinity
    assert json.loads(text)["layers"][2]["sqnr_db"] == math.inf
    conv1 = data["layers"][0]
    assert set(conv1["before"]) == set(conv1["after"]) == {"min", "q1", "median", "q3", "max", "mean"}
    assert conv1["outlier_fraction"] == report.layer("conv1").outlier_fraction
    assert conv1["range_ratio_per_channel"] == list(report.layer("conv1").range_ratio_per_channel)
    assert len(conv1["range_ratio_per_channel"]) == 8


def test_avg_bits(quantized):
    _, _, report = quantized
    n = {r.name: r.numel for r in report.layers}
    assert report.avg_bits == pytest.approx((3 * n["conv1"] + 3 * n["conv2"] + 32 * n["fc"]) / sum(n.values()))


def test_csv_round_trip(tmp_path, quantized):
    _, _, report = quantized
    path = report.to_csv(tmp_path / "report.csv")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == ["conv1", "conv2", "fc"]
    assert list(rows[0]) == COLUMNS
    assert float(rows[1]["mse"]) == report.layer("conv2").mse
    assert int(rows[2]["bits"]) == 32
    conv2 = report.layer("conv2")
    assert float(rows[1]["after_mean"]) == conv2.after["mean"]
    assert float(rows[1]["outlier_fraction"]) == conv2.outlier_fraction
    assert float(rows[1]["range_ratio_ch_min"]) == min(conv2.range_ratio_per_channel)


# A 2x5 weight whose only outlier is the 100; the "quantized" version is made by hand.
HAND_W = torch.tensor([[0.0, 1.0, 2.0, 3.0, 100.0], [-1.0, -1.0, 0.0, 1.0, 1.0]])
HAND_Q = torch.tensor([[0.0, 0.0, 0.0, 0.0, 80.0], [-1.0, -1.0, 0.0, 0.0, 0.0]])


def test_new_figures_by_hand():
    row = LayerReport.measure("w", HAND_W, HAND_Q, QuantSpec(bits=2), residual=False)
    # Sorted: -1 -1 0 0 1 1 1 2 3 100. q1 at position 2.25 -> 0, q3 at 6.75 -> 1.75;
    # fences 0 - 1.5 * 1.75 = -2.625 and 1.75 + 2.625 = 4.375: only the 100 is outside.
    assert (row.before["q1"], row.before["q3"]) == (0.0, 1.75)
    assert tukey_fences(row.before) == (-2.625, 4.375)
    assert row.outlier_fraction == 0.1
    assert (row.before["mean"], row.after["mean"]) == (pytest.approx(10.6), pytest.approx(7.8))
    # Channel 0: range 100 -> 80; channel 1: range 2 -> 1.
    assert row.range_ratio_per_channel == (0.8, 0.5)
    flat = row.row()
    assert (flat["range_ratio_ch_median"], flat["range_ratio_ch_min"]) == (pytest.approx(0.65), 0.5)
    assert (flat["before_mean"], flat["after_mean"]) == (row.before["mean"], row.after["mean"])
    assert flat["outlier_fraction"] == 0.1


def test_range_ratio_skips_constant_channels():
    w = torch.tensor([[0.0, 4.0], [2.0, 2.0], [1.0, 3.0], [0.0, 1.0]])
    q = torch.tensor([[0.0, 2.0], [2.0, 2.0], [1.0, 7.0], [0.0, 1.0]])
    ratios = per_channel_range_ratio(w, q)
    assert ratios[[0, 2, 3]].tolist() == [0.5, 3.0, 1.0] and math.isnan(ratios[1])
    flat = LayerReport.measure("w", w, q, QuantSpec(bits=2), residual=False).row()
    # The NaN of the constant channel is left out: median (not mean, 1.5) of 0.5, 1.0, 3.0.
    assert (flat["range_ratio_ch_median"], flat["range_ratio_ch_min"]) == (1.0, 0.5)
    constant = torch.ones(2, 3)
    flat = LayerReport.measure("c", constant, constant, None, residual=False).row()
    assert math.isnan(flat["range_ratio_ch_median"]) and math.isnan(flat["range_ratio_ch_min"])
    assert flat["outlier_fraction"] == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        per_channel_range_ratio(w, q[:2])


def test_outlier_fraction_fences_are_inclusive():
    # q1 = 1, q3 = 3, fences [-2, 6]: -2 and 6 sit on the fences and are not outliers.
    x = torch.tensor([-2.0, 1.0, 1.0, 2.0, 3.0, 3.0, 6.0])
    assert five_numbers(x)["q1"] == 1.0 and five_numbers(x)["q3"] == 3.0
    assert outlier_fraction(x) == 0.0
    assert outlier_fraction(torch.cat([x, torch.tensor([-2.5, 6.5])])) == pytest.approx(2 / 9)


def test_measuring_leaves_the_tensors_alone():
    w, q = HAND_W.clone(), HAND_Q.clone()
    LayerReport.measure("w", w, q, QuantSpec(bits=2), residual=False)
    assert torch.equal(w, HAND_W) and torch.equal(q, HAND_Q)


def test_new_figures_do_not_change_what_is_quantized(small_net, monkeypatch):
    spec = QuantSpec(scheme="asymmetric", bits=3)
    qnet, report = quantize_model(small_net, spec)
    # The same run with the new figures replaced by constants: the same weights and codes.
    monkeypatch.setattr(quant.report, "mean", lambda x: -1.0)
    monkeypatch.setattr(quant.report, "outlier_fraction_sorted", lambda ordered, stats=None: -1.0)
    monkeypatch.setattr(quant.report, "per_channel_range_ratio", lambda before, after: -torch.ones(before.shape[0]))
    plain_net, plain = quantize_model(small_net, spec)
    assert plain.layer("conv1").outlier_fraction == -1.0 != report.layer("conv1").outlier_fraction
    state, plain_state = qnet.state_dict(), plain_net.state_dict()
    assert list(state) == list(plain_state)
    assert all(torch.equal(state[k], plain_state[k]) for k in state)
    for name, terms in report.codes.items():
        for (codes, params), (plain_codes, plain_params) in zip(terms, plain.codes[name], strict=True):
            assert torch.equal(codes, plain_codes) and torch.equal(params.scale, plain_params.scale)


def test_metrics_by_hand():
    x = torch.tensor([[0.0, 1.0, 2.0, 0.0], [3.0, 3.0, 3.0, 3.0]])
    assert five_numbers(torch.arange(5.0)) == {"min": 0.0, "q1": 1.0, "median": 2.0, "q3": 3.0, "max": 4.0}
    assert per_channel_zero_fraction(x).tolist() == [0.5, 0.0]
    assert per_channel_distinct(x).tolist() == [3, 1]
    assert squared_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.5])) == 0.25
    assert sqnr_db(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])) == math.inf
    assert sqnr_db(torch.zeros(2), torch.ones(2)) == -math.inf
    assert sqnr_db(torch.tensor([1.0, 1.0]), torch.tensor([1.1, 0.9])) == pytest.approx(20.0, abs=1e-5)
