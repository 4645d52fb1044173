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

from quant.calibrate import METHODS, needs_calibration
from quant.errors import QuantError
from quant.fold import fold_batchnorm
from quant.functional import (
    QParams,
    choose_qparams,
    dequantize,
    dequantize_sum,
    fake_quantize,
    quantize,
    quantize_residual,
)
from quant.model import quantize_model
from quant.packing import load_packed, model_size, read_packed_header, save_packed
from quant.plan import QuantPlan
from quant.report import LayerReport, QuantReport
from quant.spec import QuantSpec

__all__ = [
    "METHODS",
    "LayerReport",
    "QParams",
    "QuantError",
    "QuantPlan",
    "QuantReport",
    "QuantSpec",
    "choose_qparams",
    "dequantize",
    "dequantize_sum",
    "fake_quantize",
    "fold_batchnorm",
    "load_packed",
    "read_packed_header",
    "model_size",
    "needs_calibration",
    "quantize",
    "quantize_model",
    "quantize_residual",
    "save_packed",
]
