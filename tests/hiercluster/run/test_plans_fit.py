"""check_plans_fit judges a plan on the weights quant.quantize_model quantizes, attention projections included."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import quant
from hiercluster.errors import HierclusterError
from hiercluster.run.grid import GridPoint, check_plans_fit

SPEC = quant.QuantSpec(bits=4)
# Every Conv/Linear layer of the model below; its only other weight is the attention's in_proj_weight.
LINEAR_LAYERS = ("0", "1.self_attn.out_proj", "1.linear1", "1.linear2", "2")


def transformer() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16),
        nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.0, batch_first=True),
        nn.Linear(16, 3),
    ).eval()


def point(*skip: str) -> GridPoint:
    return GridPoint(SPEC, quant.QuantPlan(name="p", skip=skip))


def quantizes_something(model: nn.Module, plan: quant.QuantPlan) -> bool:
    """The reference: whether quant.quantize_model accepts the plan."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant.quantize_model(model, SPEC, plan)
    except quant.QuantError as exc:
        assert "leaves every layer" in str(exc)
        return False
    return True


def test_skipping_every_linear_layer_still_quantizes_the_attention_weight():
    model = transformer()
    p = point(*LINEAR_LAYERS)
    check_plans_fit(model, [p], "tiny")  # accepted: the in_proj_weight is still quantized
    _, report = quant.quantize_model(model, SPEC, p.plan)
    assert [row.name for row in report.layers if row.scheme != "float"] == ["1.self_attn.in_proj_weight"]


def test_a_pattern_matching_only_attention_weights_counts():
    model = transformer()
    with pytest.raises(HierclusterError) as err:
        check_plans_fit(model, [point(*LINEAR_LAYERS, "*.in_proj_weight")], "tiny")
    message = str(err.value)
    assert "config key quant.plans: plan 'p' leaves every layer of model tiny float" in message
    assert "match all 6 of its weights" in message


@pytest.mark.parametrize("skip", [
    (),
    ("*",),
    ("1.*",),
    LINEAR_LAYERS,
    (*LINEAR_LAYERS, "*in_proj*"),
    ("0", "2", "1.linear*"),
    ("*proj*", "*linear*", "0", "2"),
])
def test_agrees_with_quantize_model(skip):
    model = transformer()
    p = point(*skip)
    try:
        check_plans_fit(model, [p])
        accepted = True
    except HierclusterError:
        accepted = False
    assert accepted == quantizes_something(model, p.plan)


def test_a_model_with_no_weight_to_quantize():
    with pytest.raises(HierclusterError, match="the Sequential model has no Conv or Linear layer and no attention"):
        check_plans_fit(nn.Sequential(nn.ReLU()), [point()])
