"""quant: data-free post-training quantization of PyTorch weights, usable on its own.

Schemes (asymmetric, symmetric, power-of-two), per-tensor or per-channel, with min-max,
MSE or percentile range setting; BatchNorm folding; whole-model quantization with
partial (per-layer bits, float layers) and residual quantization; activation
quantization; per-layer reports; bit-packed files and true compressed sizes.

Examples
--------
>>> import torch
>>> import quant
>>> w = torch.randn(16, 8)
>>> spec = quant.QuantSpec(scheme="symmetric", bits=4, clipping="mse")
>>> codes, params = quant.quantize(w, spec)
>>> int(codes.abs().max()) <= 7
True
>>> torch.equal(quant.dequantize(codes, params), quant.fake_quantize(w, spec))
True
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it. Imported on first use, so that ``import quant``
# (and its torch-free helpers such as ``quant._validate``) stays light: a program can set
# itself up (a Ctrl-C handler, say) before torch loads.
_EXPORTS = {
    "allocate_bits": "quant.allocation",
    "allocation_plan": "quant.allocation",
    "average_bits": "quant.allocation",
    "layer_costs": "quant.proxy",
    "METHODS": "quant.calibrate",
    "needs_calibration": "quant.calibrate",
    "QuantError": "quant.errors",
    "fold_batchnorm": "quant.fold",
    "QParams": "quant.functional",
    "choose_qparams": "quant.functional",
    "dequantize": "quant.functional",
    "dequantize_sum": "quant.functional",
    "export_onnx": "quant.onnx_export",
    "fake_quantize": "quant.functional",
    "quantize": "quant.functional",
    "quantize_residual": "quant.functional",
    "quantize_model": "quant.model",
    "load_packed": "quant.packing",
    "model_size": "quant.packing",
    "read_packed_header": "quant.packing",
    "save_packed": "quant.packing",
    "packed_file_bytes": "quant.packing",
    "QuantPlan": "quant.plan",
    "LayerReport": "quant.report",
    "QuantReport": "quant.report",
    "QuantSpec": "quant.spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'quant' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
