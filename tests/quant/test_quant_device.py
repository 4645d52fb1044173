"""quant.device: where a model lives, moving nested batches, and that calibration goes through it.

This machine has no GPU. The "meta" device stands in for another device where only the
move itself matters (a meta tensor has a shape and dtype but no data); the CUDA path
itself is exercised only where a GPU exists.
"""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import pytest
import torch
import torch.nn as nn

import quant
import quant.activations
import quant.calibrate
from quant.device import model_device, to_device, to_model_device

Pair = namedtuple("Pair", "x y")


def test_model_device_is_the_first_parameters_then_buffers_then_cpu():
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(nn.Linear(2, 2).to("meta")) == torch.device("meta")
    only_buffers = nn.BatchNorm1d(3, affine=False).to("meta")  # running statistics, no parameters
    assert list(only_buffers.parameters()) == [] and model_device(only_buffers) == torch.device("meta")
    assert model_device(nn.ReLU()) == torch.device("cpu")


def test_to_device_moves_every_tensor_of_a_nested_batch_and_keeps_the_containers():
    x, y, w = torch.randn(2, 3), torch.arange(2), torch.ones(1, dtype=torch.float64)
    batch = {"pair": Pair(x, y), "items": [w, "label", 3], "tuple": (x,), "od": OrderedDict(a=y)}
    out = to_device(batch, "meta")
    assert type(out) is dict and type(out["pair"]) is Pair and type(out["items"]) is list
    assert type(out["tuple"]) is tuple and type(out["od"]) is OrderedDict
    tensors = [out["pair"].x, out["pair"].y, out["items"][0], out["tuple"][0], out["od"]["a"]]
    assert all(t.device.type == "meta" for t in tensors)
    # Shapes and dtypes are kept (a float64 tensor is not cast); other values pass through.
    assert [(t.shape, t.dtype) for t in tensors] == [(s.shape, s.dtype) for s in (x, y, w, x, y)]
    assert out["items"][1:] == ["label", 3]
    # The caller's batch is left as it was.
    assert batch["pair"].x.device.type == "cpu" and batch["items"][0] is w


def test_a_tensor_already_there_is_returned_itself_and_values_are_unchanged():
    x = torch.randn(4, 3)
    assert to_device(x, torch.device("cpu")) is x
    moved = to_device((x.double(), None), "cpu")
    assert moved[1] is None and moved[0].dtype == torch.float64 and torch.equal(moved[0], x.double())
    assert to_model_device(x, nn.Linear(3, 1)) is x
    assert to_model_device(x, nn.Linear(3, 1).to("meta")).device.type == "meta"


class _Probe(nn.Module):
    """Records every input it is called with (class-level, so deep copies record too)."""

    inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _Probe.inputs.append(x)
        return x


def _spy(monkeypatch, *modules):
    """Replace ``to_device`` in ``modules`` by a copy-making spy; returns the ids of what it handed out.

    The spy returns a clone, so an input that reached a model without going through
    ``to_device`` is a different object from everything the spy returned.
    """
    handed_out: set[int] = set()
    real = to_device

    def spy(batch, device):
        out = real(batch, device)
        out = out.clone() if isinstance(out, torch.Tensor) else out
        handed_out.add(id(out))
        spy.keep.append(out)  # keeps ids unique for the test's duration
        return out

    spy.keep = []
    for module in modules:
        monkeypatch.setattr(module, "to_device", spy)
    return handed_out


def _calibrated_options(name: str) -> dict:
    from quant.adaround import AdaRoundOptions

    return {
        "gptq+bn": {"method": "gptq", "bn_reestimate": True},
        "adaround": {"method": "adaround", "options": AdaRoundOptions(iters=5)},
        "rtn+bias+activations": {
            "method": "rtn", "bias_correction": True, "act_spec": quant.QuantSpec(bits=8, granularity="per_tensor"),
        },
    }[name]


@pytest.mark.parametrize("name", ["gptq+bn", "adaround", "rtn+bias+activations"])
def test_every_calibration_forward_pass_gets_its_batch_from_to_device(monkeypatch, name):
    options = _calibrated_options(name)
    handed_out = _spy(monkeypatch, quant.calibrate, quant.activations)
    torch.manual_seed(0)
    net = nn.Sequential(_Probe(), nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    batches = [torch.randn(16, 6), (torch.randn(8, 6), torch.zeros(8))]  # a tensor and an (x, y) pair
    _Probe.inputs = []
    quant.quantize_model(net, quant.QuantSpec(bits=4), calibration=batches, **options)
    inputs = [x for x in _Probe.inputs if isinstance(x, torch.Tensor)]  # not torch.fx's tracing proxies (fold)
    assert inputs, "calibration ran no forward pass"
    strays = [tuple(x.shape) for x in inputs if id(x) not in handed_out]
    assert strays == [], f"forward passes on batches that did not go through quant.device.to_device: {strays}"
