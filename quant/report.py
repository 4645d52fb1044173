"""`QuantReport`: what quantization did to each layer (the seeds' range, quartile and sparsity analyses)."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from quant._files import write_text_atomic
from quant.clipping import sort_rows
from quant.functional import QParams, Quantized
from quant.metrics import (
    QUARTILES,
    distinct_sorted,
    five_numbers_sorted,
    mean,
    outlier_fraction_sorted,
    per_channel_distinct,
    per_channel_range_ratio,
    per_channel_zero_fraction,
    sqnr_from,
    squared_error,
)
from quant.plan import FLOAT_BITS, QuantPlan
from quant.spec import QuantSpec


def _summary(values: Tensor) -> dict[str, float]:
    values = values.to(torch.float64)
    return {"min": float(values.min()), "mean": float(values.mean()), "max": float(values.max())}


def _ratio_summary(ratios: tuple[float, ...]) -> dict[str, float]:
    """Median and min of the defined (non-NaN) per-channel range ratios; NaN for both when none is."""
    defined = torch.tensor([r for r in ratios if not math.isnan(r)], dtype=torch.float64)
    if not defined.numel():
        return {"median": math.nan, "min": math.nan}
    stats = five_numbers_sorted(defined.sort().values)
    return {"median": stats["median"], "min": stats["min"]}


@dataclass(frozen=True)
class LayerReport:
    """Statistics of one weight (Conv/Linear, or an attention projection) before and after quantization.

    ``bits`` is the effective width per weight: twice the code width for a residual
    (two-term) layer, 32 for a layer left float. ``zero_fraction`` and
    ``distinct_levels`` describe the quantized weight (the seed's "local sparsity"),
    also per output channel (``*_per_channel`` lists; ``*_channels`` min/mean/max).
    ``before`` and ``after`` hold the five numbers (``min q1 median q3 max``) and the
    ``mean`` of the float and of the quantized weight: a shifted mean is a bias every
    output of the layer inherits. ``outlier_fraction`` is the share of the *float*
    weight's elements outside Tukey's fences ``[q1 - 1.5 IQR, q3 + 1.5 IQR]`` of its own
    quartiles: the long tails a min-max range has to cover. ``range_ratio_per_channel``
    is, per output channel (axis 0), ``(max - min)`` after over ``(max - min)`` before
    (NaN for a channel that is constant in the float weight). The flat row summarizes it
    by its median (the typical channel, robust to a few channels with a near-zero float
    range whose ratio explodes, which would drag a mean) and its min (the channel that
    clipping or rounding to zero shrank most, which a mean would hide).
    ``method`` is how the weights were rounded (None for a float layer). For the
    calibrated methods, ``output_mse_rtn`` and ``output_mse`` are the mean squared
    errors of the layer's output (without bias) against the float weight's output on
    the same calibration inputs, with round-to-nearest and with the method.
    """

    name: str
    shape: tuple[int, ...]
    numel: int
    bits: int
    scheme: str
    tag: str
    residual: bool
    mse: float
    sqnr_db: float
    before: dict[str, float]
    after: dict[str, float]
    zero_fraction: float
    distinct_levels: int
    zero_fraction_per_channel: tuple[float, ...]
    distinct_per_channel: tuple[int, ...]
    outlier_fraction: float
    range_ratio_per_channel: tuple[float, ...]
    act_bits: int | None = None
    act_scale: float | None = None
    act_zero_point: int | None = None
    method: str | None = None
    output_mse_rtn: float | None = None
    output_mse: float | None = None

    @classmethod
    def measure(cls, name: str, weight: Tensor, quantized: Tensor, spec: QuantSpec | None, residual: bool) -> LayerReport:
        """Compare ``weight`` with its quantized version; ``spec`` None means the layer stayed float."""
        before = sort_rows(weight.detach().to(torch.float32).reshape(1, -1))[0]
        after = sort_rows(quantized.detach().to(torch.float32).reshape(1, -1))[0]
        error = squared_error(weight, quantized)
        before_stats = five_numbers_sorted(before)
        return cls(
            name=name,
            shape=tuple(weight.shape),
            numel=weight.numel(),
            bits=FLOAT_BITS if spec is None else spec.bits * (2 if residual else 1),
            scheme="float" if spec is None else spec.scheme,
            tag="float32" if spec is None else spec.tag + ("-residual" if residual else ""),
            residual=residual,
            mse=error / weight.numel(),
            sqnr_db=sqnr_from(weight, error),
            before={**before_stats, "mean": mean(weight)},
            after={**five_numbers_sorted(after), "mean": mean(quantized)},
            zero_fraction=float((after == 0).sum()) / after.numel(),
            distinct_levels=int(distinct_sorted(after)),
            zero_fraction_per_channel=tuple(per_channel_zero_fraction(quantized).tolist()),
            distinct_per_channel=tuple(per_channel_distinct(quantized).tolist()),
            outlier_fraction=outlier_fraction_sorted(before, before_stats),
            range_ratio_per_channel=tuple(per_channel_range_ratio(weight, quantized).tolist()),
            method=None if spec is None else "rtn",
        )

    def with_activation(self, params: QParams) -> LayerReport:
        """This row plus the input (activation) quantizer of the layer."""
        return replace(self, act_bits=params.bits, act_scale=float(params.scale), act_zero_point=int(params.zero_point))

    def with_calibration(self, info: Any) -> LayerReport:
        """This row with the method and output errors of a :class:`quant.calibrate.LayerCalibration`."""
        return replace(self, method=info.method, output_mse_rtn=info.output_mse_rtn, output_mse=info.output_mse)

    def _head(self, shape: Any) -> dict[str, Any]:
        """The scalar fields both exports start with; ``shape`` in the export's own form."""
        return {
            "name": self.name,
            "shape": shape,
            "numel": self.numel,
            "bits": self.bits,
            "scheme": self.scheme,
            "tag": self.tag,
            "residual": self.residual,
            "method": self.method,
            "mse": self.mse,
            "sqnr_db": self.sqnr_db,
        }

    def to_dict(self) -> dict[str, Any]:
        """All fields; tuples become lists."""
        return {
            **self._head(list(self.shape)),
            "before": dict(self.before),
            "after": dict(self.after),
            "zero_fraction": self.zero_fraction,
            "distinct_levels": self.distinct_levels,
            "zero_fraction_per_channel": list(self.zero_fraction_per_channel),
            "distinct_per_channel": list(self.distinct_per_channel),
            "outlier_fraction": self.outlier_fraction,
            "range_ratio_per_channel": list(self.range_ratio_per_channel),
            "act_bits": self.act_bits,
            "act_scale": self.act_scale,
            "act_zero_point": self.act_zero_point,
            "output_mse_rtn": self.output_mse_rtn,
            "output_mse": self.output_mse,
        }

    def row(self) -> dict[str, Any]:
        """One flat row: scalars only; per-channel lists summarized as min/mean/max, range ratios as median/min."""
        out = self._head("x".join(map(str, self.shape)))
        for when, stats in (("before", self.before), ("after", self.after)):
            out.update({f"{when}_{k}": stats[k] for k in (*QUARTILES, "mean")})
        out["zero_fraction"] = self.zero_fraction
        out.update({f"zero_fraction_ch_{k}": v for k, v in _summary(torch.tensor(self.zero_fraction_per_channel)).items()})
        out["distinct_levels"] = self.distinct_levels
        out.update({f"distinct_ch_{k}": v for k, v in _summary(torch.tensor(self.distinct_per_channel)).items()})
        out["outlier_fraction"] = self.outlier_fraction
        out.update({f"range_ratio_ch_{k}": v for k, v in _ratio_summary(self.range_ratio_per_channel).items()})
        out.update(act_bits=self.act_bits, act_scale=self.act_scale, act_zero_point=self.act_zero_point)
        out.update(output_mse_rtn=self.output_mse_rtn, output_mse=self.output_mse)
        return out


@dataclass(frozen=True, eq=False)
class QuantReport:
    """Result of :func:`quant.quantize_model`: per-layer statistics plus the integer codes.

    Attributes
    ----------
    layers : tuple of LayerReport
        One row per weight a matmul uses (:func:`quant.layerops.weight_slots`: Conv/Linear
        layers and attention projections), in ``named_modules`` order (float ones included),
        then a float row per weight no quantizer handles (:attr:`unquantized`).
    spec, plan, act_spec
        What was asked for.
    biases : str
        Always ``"float32"``: biases (including those created by BatchNorm folding) are
        not quantized.
    folded : tuple of (str, str)
        The (layer, BatchNorm) pairs folded before quantization.
    fp32_bytes : int
        4 bytes per floating-point element of the *original* (unfolded) model's
        ``state_dict`` (parameters and buffers such as BatchNorm statistics).
    codes : dict
        Layer name -> tuple of ``(codes, QParams)`` terms (two for a residual layer);
        :func:`quant.save_packed` and :func:`quant.model_size` read them from here.
    activations : dict
        Layer name -> ``QParams`` of its input quantizer (empty without ``act_spec``).
    method : str
        How the weights were rounded: ``"rtn"``, ``"gptq"`` or ``"adaround"``.
    bn_reestimated, bias_corrected : bool
        Whether output statistics were matched to the float model's after rounding.
    unquantized : tuple of str
        Parameters of two or more dimensions that stayed float32 because no quantizer
        handles them (:func:`quant.layerops.unquantized_weights`: transposed convolutions,
        ``nn.Bilinear``, embeddings, ...); each has a float row in :attr:`layers`, so
        :attr:`avg_bits` counts it at 32 bits.

    Examples
    --------
    >>> import torch.nn as nn
    >>> from quant import quantize_model
    >>> _, report = quantize_model(nn.Sequential(nn.Linear(8, 4)), QuantSpec(bits=4))
    >>> report.avg_bits
    4.0
    >>> report.rows()[0]["tag"]
    'asymmetric-4b-minmax-per_channel'
    """

    layers: tuple[LayerReport, ...]
    spec: QuantSpec
    plan: QuantPlan
    act_spec: QuantSpec | None = None
    biases: str = "float32"
    folded: tuple[tuple[str, str], ...] = ()
    fp32_bytes: int = 0
    codes: dict[str, tuple[Quantized, ...]] = field(default_factory=dict, repr=False)
    activations: dict[str, QParams] = field(default_factory=dict, repr=False)
    method: str = "rtn"
    bn_reestimated: bool = False
    bias_corrected: bool = False
    unquantized: tuple[str, ...] = ()

    @property
    def avg_bits(self) -> float:
        """Mean bits per element of the weights in :attr:`layers` (residual ones count 2b, float ones 32,
        :attr:`unquantized` ones included)."""
        total = sum(layer.numel for layer in self.layers)
        return sum(layer.bits * layer.numel for layer in self.layers) / total if total else math.nan

    def layer(self, name: str) -> LayerReport:
        """The row of layer ``name``."""
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no layer {name!r} in the report; layers: {', '.join(r.name for r in self.layers)}")

    def rows(self) -> list[dict[str, Any]]:
        """Flat per-layer rows (see :meth:`LayerReport.row`)."""
        return [layer.row() for layer in self.layers]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (codes excluded; an SQNR of a perfectly kept layer is ``inf``, the range
        ratio of a channel constant in the float weight NaN)."""
        return {
            "spec": self.spec.to_dict(),
            "spec_tag": self.spec.tag,
            "plan": self.plan.to_dict(),
            "act_spec": None if self.act_spec is None else self.act_spec.to_dict(),
            "method": self.method,
            "bn_reestimated": self.bn_reestimated,
            "bias_corrected": self.bias_corrected,
            "biases": self.biases,
            "avg_bits_per_weight": self.avg_bits,
            "folded_batchnorm": [list(pair) for pair in self.folded],
            "fp32_bytes": self.fp32_bytes,
            "unquantized": list(self.unquantized),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def to_csv(self, path: str | Path) -> Path:
        """Write :meth:`rows` as CSV (one line per layer) and return the path."""
        path = Path(path)
        rows = self.rows()
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["name"])
        writer.writeheader()
        writer.writerows(rows)
        return write_text_atomic(path, text.getvalue())
