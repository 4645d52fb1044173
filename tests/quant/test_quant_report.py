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

from quant import QuantPlan, QuantSpec, fold_batchnorm, quantize_model
from quant.metrics import five_numbers, per_channel_distinct, per_channel_zero_fraction, sqnr_db, squared_error

COLUMNS = [
    "name", "shape", "numel", "bits", "scheme", "tag", "residual", "method", "mse", "sqnr_db",
    "before_min", "before_q1", "before_median", "before_q3", "before_max",
    "after_min", "after_q1", "after_median", "after_q3", "after_max",
    "zero_fraction", "zero_fraction_ch_min", "zero_fraction_ch_mean", "zero_fraction_ch_max",
    "distinct_levels", "distinct_ch_min", "distinct_ch_mean", "distinct_ch_max",
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


def test_metrics_by_hand():
    x = torch.tensor([[0.0, 1.0, 2.0, 0.0], [3.0, 3.0, 3.0, 3.0]])
    assert five_numbers(torch.arange(5.0)) == {"min": 0.0, "q1": 1.0, "median": 2.0, "q3": 3.0, "max": 4.0}
    assert per_channel_zero_fraction(x).tolist() == [0.5, 0.0]
    assert per_channel_distinct(x).tolist() == [3, 1]
    assert squared_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.5])) == 0.25
    assert sqnr_db(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])) == math.inf
    assert sqnr_db(torch.zeros(2), torch.ones(2)) == -math.inf
    assert sqnr_db(torch.tensor([1.0, 1.0]), torch.tensor([1.1, 0.9])) == pytest.approx(20.0, abs=1e-5)
