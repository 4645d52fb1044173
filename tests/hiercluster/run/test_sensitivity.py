"""Layer sensitivity: paired differences by hand, the library function against a direct loop, the CLI on digits."""

from __future__ import annotations

import copy
import csv
import fnmatch
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import quant
from hiercluster.evaluation.metrics import grouped_accuracies
from hiercluster.evaluation.sensitivity import (
    LayerSensitivity,
    additivity,
    correct,
    early_layers_verdict,
    paired_difference,
)
from hiercluster.run.sensitivity import layer_sensitivities, literal_pattern, only_float_plan, only_quantized_plan

# --- pure parts -----------------------------------------------------------------------------


def test_paired_difference_by_hand():
    # d = a - b = [0, 1, 0, 1, -1]: mean 0.2; squared deviations sum to 2.8, so std (ddof=1) = sqrt(0.7).
    diff, se = paired_difference(np.array([1, 1, 0, 1, 0]), np.array([1, 0, 0, 0, 1]))
    assert diff == pytest.approx(20.0)
    assert se == pytest.approx(100 * math.sqrt(0.7) / math.sqrt(5))


def test_paired_difference_identical_models_has_zero_error():
    a = np.array([1, 0, 1, 1], dtype=bool)
    assert paired_difference(a, a) == (0.0, 0.0)
    assert math.isnan(paired_difference(a[:1], a[:1])[1])


@pytest.mark.parametrize("reduction", ["prob_sum", "mean_logit", "argmax_then_map"])
def test_correct_agrees_with_grouped_accuracies(reduction):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(300, 7, generator=g)
    y = torch.randint(0, 7, (300,), generator=g)
    a = np.array([0, 1, 0, 2, 1, 2, 2])
    assert correct(z, y, a, reduction).mean() == pytest.approx(grouped_accuracies(z, y, a[None], reduction)[0])
    assert correct(z, y).mean() == pytest.approx(float((z.argmax(1) == y).float().mean()))


def test_literal_pattern_matches_only_its_name():
    names = ["head[0]", "head0", "head[*]", "heads", "a?b", "axb"]
    for name in names:
        assert [n for n in names if fnmatch.fnmatchcase(n, literal_pattern(name))] == [name]
    plan = only_quantized_plan("head[0]", names)
    assert [n for n in names if not plan.is_skipped(n)] == ["head[0]"]
    assert [n for n in names if only_float_plan("a?b").is_skipped(n)] == ["a?b"]


def _row(name, drop, se=0.1):
    return LayerSensitivity(name, 10, drop, se, drop, se, 0.0, 0.0, 0.0, 0.0)


def test_verdict_rules():
    # 8 layers: the first quarter is the first 2.
    holds = [_row("a", 5.0), _row("b", 4.0)] + [_row(f"c{i}", 0.5) for i in range(6)]
    assert early_layers_verdict(holds)["verdict"] == "holds"
    assert early_layers_verdict(holds)["early"] == ["a", "b"]
    # Higher on average but within noise (large SEs).
    noisy = [_row("a", 1.0, 5.0), _row("b", 1.0, 5.0)] + [_row(f"c{i}", 0.9, 5.0) for i in range(6)]
    assert early_layers_verdict(noisy)["verdict"] == "holds partly"
    # Lower on average, but the single most sensitive layer is early.
    top_early = [_row("a", 3.0), _row("b", 0.0)] + [_row(f"c{i}", 2.0) for i in range(6)]
    assert early_layers_verdict(top_early)["verdict"] == "holds partly"
    assert early_layers_verdict(top_early)["most_sensitive"] == "a"
    late = [_row("a", 0.1), _row("b", 0.2)] + [_row(f"c{i}", 2.0) for i in range(6)]
    assert early_layers_verdict(late)["verdict"] == "does not hold"
    assert early_layers_verdict([_row("a", 1.0)])["verdict"] == "not decided"


def test_additivity_sums_single_drops():
    rows = [_row("a", 1.0), _row("b", 2.5)]
    assert additivity(rows, {"fine": 10.0, "k": 4.0}) == {"sum_fine": 3.5, "whole_fine": 10.0, "sum_k": 3.5, "whole_k": 4.0}


# --- the library function against a direct loop ----------------------------------------------


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.add_module("head[0]", nn.Linear(6 * 4 * 4, 12))  # a name fnmatch would misread unescaped
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv(x)))).flatten(1)
        return self.fc(torch.relu(getattr(self, "head[0]")(x)))


def _tiny_case():
    torch.manual_seed(0)
    model = _Tiny().eval()
    x = torch.randn(240, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    flip = torch.rand(240) < 0.25  # some wrong labels, so that quantization can also fix a sample
    y = torch.where(flip, torch.randint(0, 5, (240,)), y)
    loader = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 240, 64)]
    return model, x, y, loader


def _reference_correct(model, x, y, quantized, spec, assignment):
    """Per-sample fine and grouped (prob_sum) correctness with the named layers fake-quantized by hand."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in m.named_modules():
            if name in quantized:
                module.weight.copy_(quant.fake_quantize(module.weight, spec))
        z = m(x)
    p = torch.softmax(z.double(), 1).numpy()
    a = np.asarray(assignment)
    group_p = np.stack([p[:, a == g].sum(1) for g in range(a.max() + 1)], 1)
    return (z.argmax(1) == y).numpy(), group_p.argmax(1) == a[y.numpy()]


def _se(d):
    return 100 * np.std(d, ddof=1) / np.sqrt(len(d))


def test_layer_sensitivities_against_direct_loop():
    model, x, y, loader = _tiny_case()
    spec = quant.QuantSpec(scheme="asymmetric", bits=2, clipping="minmax", granularity="per_channel")
    assignment = np.array([0, 0, 1, 1, 1])
    result = layer_sensitivities(model, spec, loader, assignment)
    names = ["conv", "conv2", "head[0]", "fc"]
    assert [r.layer for r in result.rows] == names
    assert [r.params for r in result.rows] == [36, 216, 96 * 12, 60]
    ref_f, ref_k = _reference_correct(model, x, y, set(), spec, assignment)
    all_f, all_k = _reference_correct(model, x, y, set(names), spec, assignment)
    assert result.float_acc == pytest.approx({"fine": ref_f.mean(), "k": ref_k.mean()})
    assert result.whole_acc == pytest.approx({"fine": all_f.mean(), "k": all_k.mean()})
    assert result.n_samples == 240 and result.k == 2
    moved = 0
    for row, name in zip(result.rows, names):
        one_f, one_k = _reference_correct(model, x, y, {name}, spec, assignment)
        but_f, but_k = _reference_correct(model, x, y, set(names) - {name}, spec, assignment)
        expected = [
            100 * (ref_f.astype(float) - one_f).mean(), _se(ref_f.astype(float) - one_f),
            100 * (ref_k.astype(float) - one_k).mean(), _se(ref_k.astype(float) - one_k),
            100 * (but_f.astype(float) - all_f).mean(), _se(but_f.astype(float) - all_f),
            100 * (but_k.astype(float) - all_k).mean(), _se(but_k.astype(float) - all_k),
        ]
        assert row.row()[2:] == pytest.approx(expected, abs=1e-9), name
        moved += row.drop_fine != 0
    assert moved >= 2  # 2 bits moves predictions: the comparison is not between zeros
    whole_drop = 100 * (ref_f.mean() - all_f.mean())
    assert result.additivity["whole_fine"] == pytest.approx(whole_drop)
    assert result.additivity["sum_fine"] == pytest.approx(sum(r.drop_fine for r in result.rows))


def test_layer_sensitivities_uses_given_float_logits():
    model, x, y, loader = _tiny_case()
    spec = quant.QuantSpec(scheme="symmetric", bits=3)
    fake = (torch.zeros(240, 5), y)  # all predictions class 0: the float side must come from these
    result = layer_sensitivities(model, spec, loader, np.array([0, 1, 1, 2, 2]), float_logits=fake)
    assert result.float_acc["fine"] == pytest.approx(float((y == 0).float().mean()))


# --- the command on digits ------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_setup(tmp_path_factory):
    from bad_input_cases import copy_checkpoint, digits_config

    folder = tmp_path_factory.mktemp("sens")
    ckpt = copy_checkpoint(folder)
    return digits_config(folder, model={"checkpoint": ckpt.name}), folder


def test_cli_writes_csv_and_plot(digits_setup, capsys):
    from hiercluster.cli import main
    from hiercluster.models.zoo import load_checkpoint
    from quant.layerops import weight_slots

    config, folder = digits_setup
    out = folder / "run"
    argv = ["sensitivity", str(config), "--bits", "2", "--limit", "120", "--out", str(out), "--quiet", "--threads", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert 'verdict: "the initial layers matter most"' in printed and "not additive" in printed
    csv_file = out / "sensitivity" / "asymmetric-2b-minmax-per_channel-k2.csv"
    assert (out / "sensitivity" / "asymmetric-2b-minmax-per_channel-k2.png").stat().st_size > 0
    with csv_file.open() as f:
        rows = list(csv.DictReader(f))
    model, _ = load_checkpoint(folder / "model.pt")
    assert [r["layer"] for r in rows] == [s.name for s in weight_slots(model)]
    assert list(rows[0]) == list(LayerSensitivity.COLUMNS)
    assert all(math.isfinite(float(r[c])) for r in rows for c in LayerSensitivity.COLUMNS[2:])


@pytest.mark.parametrize(
    "flags, expect",
    [
        (["--bits", "1"], "--bits 1 is outside 2..16"),
        (["--bits", "9", "--scheme", "pow2"], "--bits 9 is outside 2..8, the widths scheme pow2 allows"),
        (["--bits", "2", "--scheme", "nope"], "--scheme 'nope' is not a scheme"),
        (["--bits", "2", "--k", "10"], "--k 10 is outside 2..9"),
        (["--bits", "2", "--k", "1"], "--k 1 is outside 2..C-1"),
    ],
)
def test_cli_refuses_bad_flags(digits_setup, capsys, flags, expect):
    from hiercluster.cli import main

    config, folder = digits_setup
    assert main(["sensitivity", str(config), "--out", str(folder / "bad"), "--quiet", "--limit", "50", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and len(err.splitlines()) == 1


def test_the_sensitivity_groups_by_the_tree_the_run_chose_for_k(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from hiercluster.run import sensitivity as run_sensitivity_module

    first, second = SimpleNamespace(name="fc_weights"), SimpleNamespace(name="confusion")
    prep = SimpleNamespace(trees={"fc_weights": first, "confusion": second}, hierarchy=first)
    # No run in the folder: the first tree.
    assert run_sensitivity_module.sensitivity_tree(prep, tmp_path, 3) is first
    (tmp_path / "run.json").write_text("{}")
    selection = {"by_k": {"3": {"tree": "confusion", "candidates": {}}}}
    monkeypatch.setattr(run_sensitivity_module, "read_run_info", lambda folder: {"tree_selection": selection})
    assert run_sensitivity_module.sensitivity_tree(prep, tmp_path, 3) is second  # the run's choice for k=3
    assert run_sensitivity_module.sensitivity_tree(prep, tmp_path, 4) is first  # a k it did not choose
    one = SimpleNamespace(trees={"fc_weights": first}, hierarchy=first)
    assert run_sensitivity_module.sensitivity_tree(one, tmp_path, 3) is first
