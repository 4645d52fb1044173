"""ONNX export of a quantized model: integer weights in QDQ form, an optional head, checked in ONNX Runtime.

:func:`export_onnx` writes the model that :func:`quant.quantize_model` returned (or that
:func:`load_packed_with_codes` read back) as an ONNX file in which every quantized weight
is an integer initializer decoded by ``DequantizeLinear`` (the "QDQ" form that ONNX
Runtime, TensorRT and OpenVINO read, and that Brevitas and NNCF write).

How a weight is stored
----------------------
Weight ``W`` (a Conv/Linear weight, named as in the graph) becomes three initializers,
``W_quantized`` (integers), ``W_scale`` (float32, one per output channel: axis 0, or one
for a per-tensor spec) and ``W_zero_point`` (the integers' type), and one node
``DequantizeLinear(W_quantized, W_scale, W_zero_point) -> W``, whose output keeps the
weight's name, so the Conv or Gemm that read the float weight now reads the decoded one.
``DequantizeLinear`` computes ``(x - zero_point) * scale`` in float32, the expression
:func:`quant.dequantize` uses, so the decoded weights are bit-identical to the PyTorch
model's; every layer is decoded here in numpy before writing and compared bit for bit,
and a layer that would not match is stored as float32 (the returned ``layers`` say so).

======================  =====================================  ===========================================
scheme (b bits)         integers stored (range)                type: narrowest that the opset and ORT run
======================  =====================================  ===========================================
asymmetric              the codes, 0..2^b-1, with the zero     b<=2: uint2 (opset 25), b<=4: uint4 (21),
                        point                                  b<=8: uint8, b<=16: uint16 (21)
symmetric               the codes, -(2^(b-1)-1)..2^(b-1)-1     int2 (25) / int4 (21) / int8 / int16 (21)
binary (1 bit)          ``2c - 1``: -1 for -a, +1 for +a;       int2 (25), else int4 (21), else int8
                        scale a, zero point 0
pow2 (b <= 5)           each level as a multiple of the        b=2: int2 (25) or int4; b=3: int4;
                        smallest one: 0, +-2^(i-1) for code     b=4: int8; b=5: int16 (21)
                        +-i; scale ``a * 2^-(L-1)``
pow2 (b >= 6)           none: float32 (2^30 needs int32,       float
                        which saves nothing over float32)
======================  =====================================  ===========================================

Binary codes 0/1 are not an affine image of ``{-a, +a}`` with an integer zero point
(``(c - z) * s`` would need ``z = 1/2``), so ``2c - 1`` is stored: ``(+-1 - 0) * a`` is
exactly ``+-a``. ``int2`` holds -2..1, so +1 fits; ONNX has no 1-bit type. A pow2 level
``+-a * 2^-(L-i)`` is ``+-2^(i-1)`` times ``a * 2^-(L-1)``, a float32 product of a power
of two and the smallest level, exact whenever that smallest level is exact in float32
(it is unless ``a`` is within ``2^L`` of the subnormal range; such a layer is float).

The opset is the lowest one that gives every weight its narrowest type: 21 (int4/uint4)
unless some weight fits 2 bits and the installed ``onnx`` and ONNX Runtime run
int2/uint2, which take opset 25. The type support is probed, not assumed: each candidate
type is run through a one-node ``DequantizeLinear`` model in the installed ONNX Runtime
(when it is installed; otherwise the ``onnx`` operator schema alone decides).

Activation quantizers (``report.activations``) become ``QuantizeLinear`` /
``DequantizeLinear`` pairs on the input of their layer (uint8 for asymmetric, int8 for
symmetric; 16-bit types above 8 bits), followed by a float ``Clip`` to the grid's ends
when the grid is narrower than the type (``[qmin, qmax]`` of 4 bits in a uint8).
``QuantizeLinear`` divides by the scale where :mod:`quant` multiplies by its float32
reciprocal (as torch's fake quantization does), so an activation within a float32 step
of a rounding midpoint can land on the neighbouring level: the outputs then agree to
about a quantization step of one activation, not bit for bit.

How the graph is made
---------------------
The float graph comes from torch's TorchScript-based exporter (``torch.onnx.export(...,
dynamo=False)``) at opset 20 or lower, with the activation hooks removed from a copy of
the model (torch's default, dynamo-based exporter stops at their data-dependent finiteness
check); ``onnx.version_converter`` then takes it to the target opset, and the weights are
rewritten with the ``onnx`` API. Constant folding is off, so every weight stays one
initializer named after its parameter. A model the exporter cannot trace is an error
naming the first layer that does not export on its own.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from quant._files import write_atomic
from quant.activations import ActivationQuantizer
from quant.errors import QuantError
from quant.functional import QParams, Quantized, dequantize, dequantize_sum
from quant.layerops import weight_slots
from quant.plan import QuantPlan
from quant.report import QuantReport
from quant.spec import QuantSpec

if TYPE_CHECKING:  # onnx loads only when a model is exported
    import onnx

#: The opsets the default choice picks from: int4/uint4 arrived in DequantizeLinear-21,
#: int2/uint2 in DequantizeLinear-25.
CANDIDATE_OPSETS = (21, 25)
#: DequantizeLinear with an ``axis`` (per-channel scales) exists from opset 13.
MIN_OPSET = 13
#: The graph's input and output names.
INPUT_NAME = "input"
SCORES_NAME = "scores"
LOGITS_NAME = "logits"
# Integer types DequantizeLinear may read: (name, bits, min, max), narrowest first; at equal
# width the unsigned one first (a range of non-negative codes fits it, a signed range does not).
_INT_TYPES = (
    ("uint2", 2, 0, 3),
    ("int2", 2, -2, 1),
    ("uint4", 4, 0, 15),
    ("int4", 4, -8, 7),
    ("uint8", 8, 0, 255),
    ("int8", 8, -128, 127),
    ("uint16", 16, 0, 65535),
    ("int16", 16, -32768, 32767),
)
# int32 is left out: DequantizeLinear reads it (for biases), but 32-bit integers save nothing over float32.
_TYPE_BITS = {name: bits for name, bits, _, _ in _INT_TYPES}
# Above this the protobuf of one ModelProto cannot be serialized (2 GiB).
_MAX_PROTO_BYTES = 2**31 - 1


def _onnx() -> Any:
    """The ``onnx`` module, or a QuantError saying how to install it."""
    try:
        import onnx
    except ImportError:
        raise QuantError("ONNX export needs the onnx package: pip install 'hiercluster[export]'") from None
    return onnx


def _ort() -> Any | None:
    """``onnxruntime`` when it is installed, else None (the export then cannot be checked)."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def _tensor_type(name: str) -> int:
    return int(getattr(_onnx().TensorProto, name.upper()))


def _ir_version(model: onnx.ModelProto) -> int:
    onnx = _onnx()
    try:
        needed = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except (TypeError, ValueError):
        needed = model.ir_version
    return max(int(model.ir_version), int(needed))


# --- which integer types the installed onnx and ONNX Runtime read -------------------------


@functools.cache
def _schema_types(op: str, opset: int) -> frozenset[str]:
    """The integer types ``op`` (DequantizeLinear or QuantizeLinear) takes at ``opset``, per the onnx schema."""
    onnx = _onnx()
    try:
        schema = onnx.defs.get_schema(op, opset)
    except Exception:  # noqa: BLE001 - an opset beyond the installed onnx
        return frozenset()
    allowed = set()
    for constraint in schema.type_constraints:
        allowed |= {t.removeprefix("tensor(").removesuffix(")") for t in constraint.allowed_type_strs}
    known = {name for name, *_ in _INT_TYPES if hasattr(onnx.TensorProto, name.upper())}
    return frozenset(allowed & known)


def _one_node_model(op: str, type_name: str, opset: int) -> tuple[bytes, dict[str, np.ndarray], np.ndarray]:
    """A tiny per-axis DequantizeLinear (or QuantizeLinear -> DequantizeLinear) model, its feed and expected output."""
    onnx = _onnx()
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    _, _, lo, hi = next(t for t in _INT_TYPES if t[0] == type_name)
    dtype = helper.tensor_dtype_to_np_dtype(_tensor_type(type_name))
    lo, hi = max(lo, -(2**20)), min(hi, 2**20)  # int32: (x - zero_point) must not overflow
    codes = np.array([[lo, hi], [hi, lo]], dtype=np.int64)
    zero = np.array([0, -1] if lo < 0 else [lo, hi], dtype=np.int64)
    scale = np.array([0.5, 0.25], dtype=np.float32)
    expected = ((codes - zero[:, None]).astype(np.float32) * scale[:, None]).astype(np.float32)
    inits = [
        numpy_helper.from_array(scale, "s"),
        numpy_helper.from_array(zero.astype(dtype), "z"),
    ]
    feeds: dict[str, np.ndarray] = {}
    inputs = []
    if op == "DequantizeLinear":
        inits.append(numpy_helper.from_array(codes.astype(dtype), "x"))
        nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"], axis=0)]
    else:
        feeds = {"f": expected}
        inputs = [helper.make_tensor_value_info("f", onnx.TensorProto.FLOAT, list(codes.shape))]
        nodes = [
            helper.make_node("QuantizeLinear", ["f", "s", "z"], ["q"], axis=0),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=0),
        ]
    graph = helper.make_graph(
        nodes, "probe", inputs, [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, list(codes.shape))], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = _ir_version(model)
    return model.SerializeToString(), feeds, expected


@functools.cache
def _runtime_reads(op: str, type_name: str, opset: int) -> bool:
    """Whether the installed ONNX Runtime runs ``op`` over ``type_name`` at ``opset`` correctly (True without ORT)."""
    ort = _ort()
    if ort is None:
        return True
    data, feeds, expected = _one_node_model(op, type_name, opset)
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        got = session.run(None, feeds)[0]
    except Exception:  # noqa: BLE001 - ORT raises its own types for an unknown type or opset
        return False
    return bool(np.array_equal(got, expected))


def _fused_layers_model(type_name: str, opset: int) -> bytes:
    """Conv and Gemm whose inputs are quantized (QDQ) and whose weights are ``type_name``: what ORT fuses
    into its integer kernels (QLinearConv, QGemm)."""
    onnx = _onnx()
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    _, _, lo, hi = next(t for t in _INT_TYPES if t[0] == type_name)
    dtype = helper.tensor_dtype_to_np_dtype(_tensor_type(type_name))
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "sa"),
        # zero point 0, as after a ReLU: ORT then drops the Relu and fuses Conv with the QDQ around it
        numpy_helper.from_array(np.array(0, np.uint8), "za"),
        numpy_helper.from_array(rng.integers(lo, hi + 1, (3, 2, 1, 1)).astype(dtype), "w"),
        numpy_helper.from_array(np.full(3, 0.1, np.float32), "sw"),
        numpy_helper.from_array(np.zeros(3, np.int64).astype(dtype), "zw"),
        numpy_helper.from_array(np.zeros(3, np.float32), "b"),
        numpy_helper.from_array(rng.integers(lo, hi + 1, (4, 48)).astype(dtype), "g"),
        numpy_helper.from_array(np.full(4, 0.1, np.float32), "sg"),
        numpy_helper.from_array(np.zeros(4, np.int64).astype(dtype), "zg"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sa", "za"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sa", "za"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd", "b"], ["c"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "sa", "za"], ["rq"]),
        helper.make_node("DequantizeLinear", ["rq", "sa", "za"], ["rd"]),
        helper.make_node("Flatten", ["rd"], ["f"]),
        helper.make_node("DequantizeLinear", ["g", "sg", "zg"], ["gd"], axis=0),
        helper.make_node("Gemm", ["f", "gd"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "probe", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = _ir_version(model)
    return model.SerializeToString()


@functools.cache
def _runtime_fuses(type_name: str, opset: int) -> bool:
    """Whether ONNX Runtime, with its default optimizations, runs a layer with ``type_name`` weights whose
    input is quantized (True without ORT).

    ORT rewrites QDQ around a Conv or Gemm into its integer kernels (QLinearConv, QGemm); 1.32 does so
    for int2/uint2 weights too and then refuses the model, so this is probed, not assumed. How close
    the integer kernels come to the float computation is the whole model's check, not this one (x86
    kernels for uint8 inputs and int8 weights can saturate on extreme values).
    """
    ort = _ort()
    if ort is None:
        return True
    x = {"x": np.linspace(-1.0, 3.0, 32, dtype=np.float32).reshape(1, 2, 4, 4)}
    try:
        ort.InferenceSession(_fused_layers_model(type_name, opset), providers=["CPUExecutionProvider"]).run(None, x)
    except Exception:  # noqa: BLE001 - ORT raises its own types for a graph it refuses
        return False
    return True


def supported_types(op: str, opset: int) -> tuple[str, ...]:
    """The integer types that ``op`` takes at ``opset`` in the installed onnx and ONNX Runtime, narrowest first.

    Examples
    --------
    >>> "uint4" in supported_types("DequantizeLinear", 21), "uint4" in supported_types("DequantizeLinear", 20)
    (True, False)
    """
    in_schema = _schema_types(op, opset)
    return tuple(name for name, *_ in _INT_TYPES if name in in_schema and _runtime_reads(op, name, opset))


def narrowest_type(lo: int, hi: int, opset: int, op: str = "DequantizeLinear", quantized_input: bool = False) -> str | None:
    """The narrowest integer type holding ``[lo, hi]`` that ``op`` takes at ``opset`` here, or None.

    ``quantized_input``: for the weight of a layer whose input is quantized too, which ONNX
    Runtime fuses into an integer kernel; only the types it runs there are taken.

    Examples
    --------
    >>> narrowest_type(0, 15, 21), narrowest_type(-1, 1, 21), narrowest_type(0, 255, 21)
    ('uint4', 'int4', 'uint8')
    """
    allowed = supported_types(op, opset)
    for name, _, tmin, tmax in _INT_TYPES:
        if name in allowed and tmin <= lo and hi <= tmax and (not quantized_input or _runtime_fuses(name, opset)):
            return name
    return None


# --- weights as integers -------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Term:
    """One quantized term as ``DequantizeLinear`` reads it: ``(ints - zero_point) * scale`` along axis 0."""

    ints: np.ndarray  # int64, the weight's shape
    scale: np.ndarray  # float32, (C,) or ()
    zero_point: np.ndarray  # int64, like scale
    lo: int  # the range the grid allows (the type is chosen from it, not from the values present)
    hi: int
    form: str  # "codes", "binary_pm1" or "pow2_multiples"
    per_channel: bool

    def decode(self) -> np.ndarray:
        """float32 values as DequantizeLinear computes them: the integer difference, then one float32 product."""
        shape = (-1,) + (1,) * (self.ints.ndim - 1) if self.per_channel else ()
        diff = (self.ints - self.zero_point.reshape(shape)).astype(np.float32)
        return diff * self.scale.reshape(shape)


def _as_term(codes: Tensor, params: QParams) -> _Term | str:
    """The DequantizeLinear form of one ``(codes, params)`` term, or why it has none."""
    ints = codes.detach().cpu().to(torch.int64).numpy()
    scale = params.scale.detach().cpu().to(torch.float32).numpy().astype(np.float32)
    zero_point = params.zero_point.detach().cpu().to(torch.int64).numpy()
    per_channel = params.axis == 0
    if not bool(np.all(np.isfinite(scale) & (scale > 0))):
        return "a scale is not a positive finite float32"
    if params.scheme in ("asymmetric", "symmetric"):
        return _Term(ints, scale, zero_point, params.qmin, params.qmax, "codes", per_channel)
    zeros = np.zeros_like(zero_point)
    if params.scheme == "binary":
        # codes 0/1 stand for -a/+a; 2c - 1 is their affine form with zero point 0 and scale a
        return _Term(2 * ints - 1, scale, zeros, -1, 1, "binary_pm1", per_channel)
    if params.scheme == "pow2":
        top = params.qmax  # L: code +-i is +-a * 2^-(L-i) = +-2^(i-1) * (a * 2^-(L-1))
        widest = _INT_TYPES[-1][3]
        if 2 ** (top - 1) > widest:
            return (f"pow2 at {params.bits} bits: its largest level is 2^{top - 1} times its smallest, "
                    f"beyond {_INT_TYPES[-1][0]}, the widest integer type written")
        exact = scale.astype(np.float64) * 2.0 ** -(top - 1)
        step = exact.astype(np.float32)
        if not np.array_equal(step.astype(np.float64), exact):
            return "pow2: the smallest level a * 2^-(L-1) of some channel is not exact in float32 (a is tiny)"
        magnitude = np.left_shift(np.int64(1), np.maximum(np.abs(ints) - 1, 0))
        multiples = np.where(ints == 0, 0, np.sign(ints) * magnitude)
        return _Term(multiples, step, zeros, -(2 ** (top - 1)), 2 ** (top - 1), "pow2_multiples", per_channel)
    return f"scheme {params.scheme!r} has no integer form here"


def _bit_identical(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))


@dataclass(eq=False)
class _LayerPlan:
    """How one quantized weight is written: its terms and their types, or float32 and why."""

    name: str
    bits: int
    scheme: str
    terms: list[_Term]
    types: list[str]
    reason: str | None = None  # set when the weight is stored as float32
    quantized_input: bool = False  # an activation quantizer feeds the layer
    n_terms: int = 1  # two for a residual layer

    @property
    def is_float(self) -> bool:
        return self.reason is not None

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "bits": self.bits,
            "scheme": self.scheme,
            "terms": self.n_terms,
            "onnx_type": "float" if self.is_float else "+".join(self.types),
            "form": "float" if self.is_float else self.terms[0].form,
        }
        if self.is_float:
            out["reason"] = self.reason
        return out


def _plan_layer(name: str, parts: tuple[Quantized, ...], quantized_input: bool = False) -> _LayerPlan:
    """Encode every term of a layer and check that DequantizeLinear gives back exactly its weight."""
    first = parts[0][1]
    plan = _LayerPlan(
        name, first.bits * len(parts), first.scheme, [], [], quantized_input=quantized_input, n_terms=len(parts)
    )
    for codes, params in parts:
        term = _as_term(codes, params)
        if isinstance(term, str):
            plan.reason = term
            plan.terms = []
            return plan
        expected = dequantize(codes, params).detach().cpu().numpy().astype(np.float32)
        if not _bit_identical(term.decode(), expected):
            plan.reason = "its DequantizeLinear decoding is not bit-identical to the PyTorch weight"
            plan.terms = []
            return plan
        plan.terms.append(term)
    return plan


def _assign_types(plans: list[_LayerPlan], opset: int) -> None:
    """Give every term the narrowest type at ``opset``; a term no type holds makes its layer float."""
    for plan in plans:
        if plan.is_float:
            continue
        types = [narrowest_type(t.lo, t.hi, opset, quantized_input=plan.quantized_input) for t in plan.terms]
        if any(t is None for t in types):
            term = plan.terms[types.index(None)]
            plan.reason = f"no integer type at opset {opset} holds its range [{term.lo}, {term.hi}]"
            plan.terms, plan.types = [], []
        else:
            plan.types = [t for t in types if t is not None]


def _stored_bits(plans: list[_LayerPlan], opset: int) -> int:
    """Bits the integer weights take if written at ``opset`` (a term no type holds counts 32 per element)."""
    total = 0
    for plan in plans:
        for term in plan.terms:
            name = narrowest_type(term.lo, term.hi, opset, quantized_input=plan.quantized_input)
            total += term.ints.size * (32 if name is None else _TYPE_BITS[name])
    return total


def choose_opset(plans: list[_LayerPlan]) -> int:
    """The lowest candidate opset that stores every weight in its narrowest type here."""
    onnx = _onnx()
    highest = onnx.defs.onnx_opset_version()
    usable = [o for o in CANDIDATE_OPSETS if o <= highest and supported_types("DequantizeLinear", o)]
    if not usable:
        return min(highest, CANDIDATE_OPSETS[0])
    costs = {o: _stored_bits(plans, o) for o in usable}
    best = min(costs.values())
    return min(o for o in usable if costs[o] == best)


# --- the float graph ---------------------------------------------------------------------


class _Exported(nn.Module):
    """``model`` followed by ``head``: the outputs the ONNX graph will have."""

    def __init__(self, model: nn.Module, head: nn.Module | None, fine_logits: bool) -> None:
        super().__init__()
        self.model = model
        self.head = head
        self.fine_logits = fine_logits

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        logits = self.model(x)
        if self.head is None:
            return (logits,)
        scores = self.head(logits)
        return (scores, logits) if self.fine_logits else (scores,)


def output_names(head: nn.Module | None, fine_logits: bool) -> list[str]:
    """``["scores"]``, ``["scores", "logits"]`` or, without a head, ``["logits"]``."""
    if head is None:
        return [LOGITS_NAME]
    return [SCORES_NAME, LOGITS_NAME] if fine_logits else [SCORES_NAME]


def _exporter_max_opset() -> int:
    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    except ImportError:  # older torch: its exporter reaches 17 at least
        return 17
    return int(ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter: it warns that it is the legacy one and that shape checks are traced as
    constants, and its C++ log prints the whole TorchScript graph before it raises (its logging
    switch tests the function ``_jit_is_onnx_log_enabled`` instead of calling it, so the log is
    always on): the log function is replaced for the duration of the export."""
    log = getattr(torch._C, "_jit_onnx_log", None)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if log is not None:
            torch._C._jit_onnx_log = lambda *args: None
        try:
            yield
        finally:
            if log is not None:
                torch._C._jit_onnx_log = log


def _torch_export(module: nn.Module, example: Tensor, opset: int, names: list[str]) -> bytes:
    """The float graph of ``module`` from torch's TorchScript exporter (batch dimension dynamic)."""
    buffer = io.BytesIO()
    with _quiet():
        torch.onnx.export(
            module,
            (example,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *names)},
            do_constant_folding=False,  # every weight stays one initializer, named after its parameter
        )
    return buffer.getvalue()


def _leaf_calls(model: nn.Module, example: Tensor) -> list[tuple[str, nn.Module, tuple]]:
    """Each leaf module's first call during one forward pass: name, module, inputs."""
    calls: list[tuple[str, nn.Module, tuple]] = []
    seen: set[int] = set()
    handles = []
    for name, module in model.named_modules():
        if any(True for _ in module.children()):
            continue

        def record(mod: nn.Module, args: tuple, name: str = name) -> None:
            if id(mod) not in seen:
                seen.add(id(mod))
                calls.append((name, mod, args))

        handles.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _untraceable_layer(model: nn.Module, example: Tensor, opset: int) -> str | None:
    """The first layer (in call order) that the exporter cannot export on its own, or None."""
    for name, module, args in _leaf_calls(model, example):
        if not args or not all(isinstance(a, Tensor) for a in args):
            continue
        try:
            with _quiet():
                torch.onnx.export(module, args, io.BytesIO(), dynamo=False, opset_version=opset, do_constant_folding=False)
        except Exception:  # noqa: BLE001 - any failure of the exporter names this layer
            return name or type(module).__name__
    return None


def _float_graph(wrapper: _Exported, example: Tensor, opset: int, names: list[str]) -> onnx.ModelProto:
    """Trace ``wrapper`` at ``opset`` (through the converter above the exporter's highest opset)."""
    onnx = _onnx()
    traced = min(opset, _exporter_max_opset())
    try:
        data = _torch_export(wrapper, example, traced, names)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; the layer is what the user needs
        layer = _untraceable_layer(wrapper.model, example, traced)
        first = " ".join(str(exc).split())[:200]
        where = f"layer {layer!r} ({type(wrapper.model.get_submodule(layer)).__name__})" if layer else "the model"
        if layer is None and wrapper.head is not None:
            where = "the model or its head"
        raise QuantError(f"ONNX export: torch's exporter cannot trace {where}: {first}") from None
    model = onnx.load_from_string(data)
    if opset != traced:
        try:
            model = onnx.version_converter.convert_version(model, opset)
        except Exception as exc:  # noqa: BLE001 - the converter raises RuntimeError or its own types
            first = " ".join(str(exc).split())[:200]
            raise QuantError(f"ONNX export: the graph cannot be converted from opset {traced} to {opset}: {first}") from None
    return model


# --- the rewrite into QDQ ---------------------------------------------------------------------


def _initializer_names(graph: onnx.GraphProto, model: nn.Module, plans: list[_LayerPlan], prefix: str) -> dict[str, str]:
    """Graph initializer of each planned layer's weight: by its parameter name, else by exact value."""
    onnx = _onnx()
    inits = {t.name: t for t in graph.initializer}
    slots = {slot.name: slot for slot in weight_slots(model)}
    found = {}
    for plan in plans:
        slot = slots[plan.name]
        name = prefix + slot.state_key
        if name not in inits:
            weight = slot.weight.detach().cpu().numpy()
            name = next(
                (
                    t.name
                    for t in graph.initializer
                    if list(t.dims) == list(weight.shape)
                    and t.data_type == onnx.TensorProto.FLOAT
                    and np.array_equal(onnx.numpy_helper.to_array(t), weight)
                ),
                "",
            )
        if not name:
            raise QuantError(
                f"ONNX export: the weight of layer {plan.name!r} is not an initializer of the exported graph "
                "(the exporter computed it), so it cannot be stored as integers"
            )
        found[plan.name] = name
    return found


def _term_initializers(base: str, term: _Term, type_name: str) -> list[Any]:
    onnx = _onnx()
    dtype = onnx.helper.tensor_dtype_to_np_dtype(_tensor_type(type_name))
    return [
        onnx.numpy_helper.from_array(term.ints.astype(dtype), f"{base}_quantized"),
        onnx.numpy_helper.from_array(term.scale.astype(np.float32), f"{base}_scale"),
        onnx.numpy_helper.from_array(term.zero_point.astype(dtype), f"{base}_zero_point"),
    ]


def _weight_nodes(weight: str, plan: _LayerPlan) -> tuple[list[Any], list[Any]]:
    """Initializers and nodes that compute ``weight`` from its integer terms (a residual layer adds them)."""
    helper = _onnx().helper
    inits, nodes, outputs = [], [], []
    single = len(plan.terms) == 1
    for j, (term, type_name) in enumerate(zip(plan.terms, plan.types)):
        base = weight if single else f"{weight}_term{j}"
        inits += _term_initializers(base, term, type_name)
        out = weight if single else f"{base}_dequantized"
        axis = {"axis": 0} if term.per_channel else {}
        nodes.append(
            helper.make_node(
                "DequantizeLinear", [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"], [out],
                name=f"{base}_DequantizeLinear", **axis,
            )
        )
        outputs.append(out)
    total = outputs[0]
    for j, out in enumerate(outputs[1:], start=1):  # in order, as quant.dequantize_sum adds them
        name = weight if j == len(outputs) - 1 else f"{weight}_sum{j}"
        nodes.append(helper.make_node("Add", [total, out], [name], name=f"{name}_Add"))
        total = name
    return inits, nodes


# Nodes a weight may pass through before the matmul that uses it (Linear on a >2-D input: Transpose, MatMul).
_PASS_THROUGH = ("Transpose", "Identity", "Cast", "Reshape")
_MATMULS = ("Conv", "Gemm", "MatMul")


def _matmul_nodes(graph: onnx.GraphProto, tensor: str) -> list[int]:
    """Indices of the Conv/Gemm/MatMul nodes whose second input is ``tensor`` (or a pass-through of it)."""
    found, frontier, seen = [], [tensor], set()
    while frontier:
        name = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        for i, node in enumerate(graph.node):
            if name not in node.input:
                continue
            if node.op_type in _MATMULS and len(node.input) > 1 and node.input[1] == name:
                found.append(i)
            elif node.op_type in _PASS_THROUGH and node.input[0] == name:
                frontier.extend(node.output)
    return sorted(found)


def activation_type(params: QParams) -> str:
    """The QuantizeLinear type of an activation quantizer: uint8/int8 up to 8 bits, else uint16/int16."""
    signed = params.qmin < 0
    if params.bits <= 8:
        return "int8" if signed else "uint8"
    return "int16" if signed else "uint16"


def _activation_nodes(source: str, layer: str, params: QParams, opset: int, index: int) -> tuple[list[Any], list[Any], str]:
    """QuantizeLinear -> DequantizeLinear (-> Clip) of ``source``: initializers, nodes, output name."""
    onnx = _onnx()
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    type_name = activation_type(params)
    if type_name not in supported_types("QuantizeLinear", opset):
        raise QuantError(
            f"ONNX export: the {params.bits}-bit input quantizer of layer {layer!r} needs QuantizeLinear over "
            f"{type_name}, which opset {opset} or the installed ONNX Runtime lacks"
        )
    dtype = helper.tensor_dtype_to_np_dtype(_tensor_type(type_name))
    base = f"{layer}_input{index}"
    scale = float(params.scale)
    zero_point = int(params.zero_point)
    inits = [
        numpy_helper.from_array(np.array(scale, dtype=np.float32), f"{base}_scale"),
        numpy_helper.from_array(np.array(zero_point, dtype=dtype), f"{base}_zero_point"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", [source, f"{base}_scale", f"{base}_zero_point"], [f"{base}_quantized"],
                         name=f"{base}_QuantizeLinear"),
        helper.make_node("DequantizeLinear", [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"],
                         [f"{base}_dequantized"], name=f"{base}_DequantizeLinear"),
    ]
    out = f"{base}_dequantized"
    _, _, tmin, tmax = next(t for t in _INT_TYPES if t[0] == type_name)
    if (params.qmin, params.qmax) != (tmin, tmax):
        # The type saturates at its own ends; the grid's are narrower. (q - z) * s grows with q, so clamping the
        # decoded value to the decoded ends equals clamping the code (exact in float32, as in quant).
        ends = np.array([params.qmin - zero_point, params.qmax - zero_point], dtype=np.float32) * np.float32(scale)
        inits += [
            numpy_helper.from_array(np.array(ends[0], dtype=np.float32), f"{base}_min"),
            numpy_helper.from_array(np.array(ends[1], dtype=np.float32), f"{base}_max"),
        ]
        nodes.append(helper.make_node("Clip", [out, f"{base}_min", f"{base}_max"], [f"{base}_clipped"], name=f"{base}_Clip"))
        out = f"{base}_clipped"
    return inits, nodes, out


def _rewrite(
    model: onnx.ModelProto,
    weights: dict[str, str],
    plans: list[_LayerPlan],
    activations: Mapping[str, QParams],
    opset: int,
) -> None:
    """Replace each planned weight initializer by its integer terms, and add the activations' QDQ pairs."""
    graph = model.graph
    by_layer = {plan.name: plan for plan in plans}
    front_inits, front_nodes, rewritten = [], [], set()
    for layer, weight in weights.items():
        if weight in rewritten:  # a tied weight: one set of integers
            continue
        rewritten.add(weight)
        inits, nodes = _weight_nodes(weight, by_layer[layer])
        front_inits += inits
        front_nodes += nodes
    kept = [t for t in graph.initializer if t.name not in rewritten]
    before: dict[int, list[Any]] = {}
    act_inits = []
    for layer, params in activations.items():
        if layer not in weights:
            raise QuantError(f"ONNX export: layer {layer!r} has an input quantizer but no quantized weight in the report")
        users = _matmul_nodes(graph, weights[layer])
        if not users:
            raise QuantError(
                f"ONNX export: the input of layer {layer!r} is not found in the graph (no Conv/Gemm/MatMul reads its weight)"
            )
        for i, index in enumerate(users):
            node = graph.node[index]
            inits, nodes, out = _activation_nodes(node.input[0], layer, params, opset, i)
            act_inits += inits
            before.setdefault(index, []).extend(nodes)
            node.input[0] = out
    ordered = list(front_nodes)
    for index, node in enumerate(graph.node):
        ordered += before.get(index, [])
        ordered.append(node)
    del graph.initializer[:]
    graph.initializer.extend([*kept, *front_inits, *act_inits])
    del graph.node[:]
    graph.node.extend(ordered)


# --- checks and the entry point ---------------------------------------------------------


def _strip_activation_hooks(model: nn.Module) -> dict[str, QParams]:
    """Remove the activation quantizer hooks of ``model`` (in place); their parameters by layer."""
    found = {}
    for name, module in model.named_modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, ActivationQuantizer):
                found[name] = hook.params
                del module._forward_pre_hooks[key]
    return found


def _check_model_and_report(model: nn.Module, report: QuantReport) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(report, QuantReport):
        raise TypeError(f"report must be a QuantReport, got {type(report).__name__}")
    slots = {slot.name: slot for slot in weight_slots(model)}
    for layer, parts in report.codes.items():
        slot = slots.get(layer)
        if slot is None:
            raise QuantError(f"the report's layer {layer!r} is not in this model; pass the model returned with the report")
        weight = slot.weight.detach()
        if weight.dtype != torch.float32:
            raise QuantError(f"ONNX export writes float32 models; layer {layer!r} is {weight.dtype} (use model.float())")
        if not torch.equal(dequantize_sum(parts).cpu().to(weight.dtype), weight.cpu()):
            raise QuantError(
                f"layer {layer!r}: the model's weight is not the one the report's codes encode "
                "(was the model changed after quantize_model?)"
            )


def _check_example(example_input: Any) -> Tensor:
    if not isinstance(example_input, Tensor) or not example_input.is_floating_point():
        raise TypeError("example_input must be a floating-point torch.Tensor batch, e.g. torch.randn(1, 3, 32, 32)")
    if example_input.dim() == 0 or example_input.shape[0] < 1:
        raise QuantError(f"example_input must be a batch of at least one sample, got shape {tuple(example_input.shape)}")
    return example_input.detach().to("cpu", torch.float32)


def _metadata(report: QuantReport, plans: list[_LayerPlan], metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """``metadata_props``: the quantizer's own keys, then the caller's (strings kept, anything else as JSON)."""
    props = {
        "quant.spec": json.dumps(report.spec.to_dict(), sort_keys=True),
        "quant.method": report.method,
        "quant.weights": json.dumps({p.name: p.info()["onnx_type"] for p in plans}),
    }
    if not math.isnan(report.avg_bits):
        props["quant.avg_bits"] = repr(report.avg_bits)
    for key, value in (metadata or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be strings, got {key!r}")
        props[key] = value if isinstance(value, str) else json.dumps(value)
    return props


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest ``|a - b|`` over entries finite in both; ``inf`` when the non-finite entries differ.

    A merged head scores ``-inf`` for a group whose probability underflows; such entries
    must line up, and the difference is measured on the rest.

    Examples
    --------
    >>> max_abs_diff(np.array([1.0, -np.inf]), np.array([1.5, -np.inf]))
    0.5
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return math.inf
    for test in (np.isnan, np.isposinf, np.isneginf):
        if not np.array_equal(test(a), test(b)):
            return math.inf
    finite = np.isfinite(a)
    return float(np.abs(a[finite] - b[finite]).max()) if finite.any() else 0.0


def _check_in_runtime(data: bytes, example: Tensor, reference: tuple[Tensor, ...], names: list[str]) -> dict[str, Any]:
    """Run the written model on ``example`` in ONNX Runtime and compare it with the PyTorch outputs."""
    ort = _ort()
    if ort is None:
        return {"onnxruntime": None, "max_abs_diff": None, "max_abs_diff_by_output": None, "argmax_agreement": None}
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        got = session.run(names, {INPUT_NAME: example.numpy()})
    except Exception as exc:  # noqa: BLE001 - ORT raises its own types for a model it refuses
        first = " ".join(str(exc).split())[:300]
        raise QuantError(f"ONNX export: ONNX Runtime {ort.__version__} cannot run the exported model: {first}") from None
    diffs = {name: max_abs_diff(g, r.numpy()) for name, g, r in zip(names, got, reference)}
    agreement = float(np.mean(got[0].argmax(-1) == reference[0].numpy().argmax(-1)))
    return {
        "onnxruntime": ort.__version__,
        "max_abs_diff": max(diffs.values()),
        "max_abs_diff_by_output": diffs,
        "argmax_agreement": agreement,
    }


def export_onnx(
    model: nn.Module,
    report: QuantReport,
    path: str | Path,
    example_input: Tensor,
    *,
    head: nn.Module | None = None,
    opset: int | None = None,
    fine_logits: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``model`` as ONNX with its quantized weights as integers (see the module docstring).

    Parameters
    ----------
    model, report
        As returned together by :func:`quant.quantize_model` (or :func:`load_packed_with_codes`);
        the report's codes must still encode the model's weights. Neither is modified.
    path : str or Path
        The ``.onnx`` file to write (replaced atomically if it exists).
    example_input : Tensor
        A batch of inputs (any batch size: the graph's batch dimension is dynamic); traced,
        and used to compare ONNX Runtime's outputs with PyTorch's.
    head : nn.Module, optional
        Applied to the model's output in the graph (e.g. a merged superclass head); the
        graph's first output is then ``"scores"``.
    opset : int, optional
        ONNX opset (>= 13). Default: the lowest of 21 and 25 that stores every weight in its
        narrowest type in the installed onnx and ONNX Runtime (:func:`choose_opset`).
    fine_logits : bool, default False
        With a ``head``: also output the model's own logits (``"logits"``).
    metadata : mapping, optional
        Written to the model's ``metadata_props`` (non-string values as JSON), after the
        exporter's own ``quant.*`` keys (spec, method, per-layer type, average bits).

    Returns
    -------
    dict
        ``path``, ``file_bytes``, ``opset``, ``ir_version``, ``input`` and ``outputs`` (names),
        ``layers`` (per quantized weight: ``name``, ``bits``, ``scheme``, ``terms``,
        ``onnx_type``, ``form``, and ``reason`` when stored as float), ``float_weights`` (the
        quantized weights stored as float32; :attr:`QuantReport.unquantized` weights are
        always float), ``activations`` (layer, bits, type of each input quantizer),
        ``onnxruntime`` (its version, None when it is not installed), ``max_abs_diff``
        (largest difference to PyTorch over the outputs on ``example_input``),
        ``max_abs_diff_by_output`` and ``argmax_agreement`` (first output), these three None
        without ONNX Runtime.

    Raises
    ------
    QuantError
        The report does not encode the model, a weight is not float32, torch's exporter
        cannot trace the model (the message names the layer), or the onnx package is missing.

    Examples
    --------
    >>> import os, tempfile
    >>> from quant import QuantSpec, quantize_model
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).eval()
    >>> qnet, report = quantize_model(net, QuantSpec(bits=4))
    >>> info = export_onnx(qnet, report, os.path.join(tempfile.mkdtemp(), "net.onnx"), torch.randn(2, 1, 8, 8))
    >>> info["opset"], [layer["onnx_type"] for layer in info["layers"]]
    (21, ['uint4', 'uint4'])
    >>> info["max_abs_diff"] < 1e-5
    True
    """
    onnx = _onnx()
    _check_model_and_report(model, report)
    example = _check_example(example_input)
    if head is not None and not isinstance(head, nn.Module):
        raise TypeError(f"head must be an nn.Module, got {type(head).__name__}")
    highest = onnx.defs.onnx_opset_version()
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= highest):
        raise ValueError(f"opset={opset!r} is invalid; allowed: an integer in [{MIN_OPSET}, {highest}]")
    names = output_names(head, bool(fine_logits))

    head_copy = None if head is None else copy.deepcopy(head).cpu().eval()
    wrapper = _Exported(copy.deepcopy(model).cpu().eval(), head_copy, bool(fine_logits))
    with torch.no_grad():
        reference = tuple(t.detach().cpu() for t in wrapper(example))  # with the activation quantizers, as PyTorch runs it
    hooked = _strip_activation_hooks(wrapper.model)
    if set(hooked) != set(report.activations):
        raise QuantError(
            f"the model's input quantizers ({sorted(hooked)}) are not the report's ({sorted(report.activations)}); "
            "pass the model returned with the report"
        )

    plans = [_plan_layer(name, parts, name in report.activations) for name, parts in report.codes.items()]
    opset = choose_opset(plans) if opset is None else opset
    _assign_types(plans, opset)
    graph_model = _float_graph(wrapper, example, opset, names)
    weights = _initializer_names(graph_model.graph, wrapper.model, [p for p in plans if not p.is_float], "model.")
    _rewrite(graph_model, weights, [p for p in plans if not p.is_float], report.activations, opset)
    graph_model.ir_version = _ir_version(graph_model)
    graph_model.producer_name = "quant.export_onnx"
    graph_model.doc_string = (
        "Quantized weights as integer initializers decoded by DequantizeLinear (QDQ); "
        f"outputs: {', '.join(names)}."
    )
    onnx.helper.set_model_props(graph_model, _metadata(report, plans, metadata))
    if graph_model.ByteSize() > _MAX_PROTO_BYTES:
        raise QuantError("ONNX export: the model is larger than 2 GiB, the limit of one ONNX protobuf file")
    onnx.checker.check_model(graph_model)
    data = graph_model.SerializeToString()
    checked = _check_in_runtime(data, example, reference, names)  # before writing: a refused model is not left behind
    path = Path(path)
    write_atomic(path, lambda handle: handle.write(data))
    info = {
        "path": str(path),
        "file_bytes": len(data),
        "opset": opset,
        "ir_version": int(graph_model.ir_version),
        "input": INPUT_NAME,
        "outputs": names,
        "layers": [p.info() for p in plans],
        "float_weights": [p.name for p in plans if p.is_float] + list(report.unquantized),
        "activations": [{"name": n, "bits": p.bits, "onnx_type": activation_type(p)} for n, p in report.activations.items()],
    }
    info.update(checked)
    return info


# --- a packed file's codes -------------------------------------------------------------------


def load_packed_with_codes(path: str | Path, model: nn.Module) -> tuple[nn.Module, QuantReport]:
    """:func:`quant.load_packed`, plus a report holding the file's integer codes (for :func:`export_onnx`).

    The file is checked as :func:`quant.load_packed` checks it (format, architecture,
    payload, SHA-256). The report carries what the file holds: ``codes``, ``activations``,
    ``spec``, ``plan``, ``method``; it has no per-layer statistics (``layers`` is empty,
    ``avg_bits`` NaN).

    Examples
    --------
    >>> import os, tempfile
    >>> from quant import QuantSpec, quantize_model, save_packed
    >>> net = nn.Linear(16, 4)
    >>> qnet, report = quantize_model(net, QuantSpec(bits=3))
    >>> path = save_packed(os.path.join(tempfile.mkdtemp(), "net.hcq"), qnet, report)
    >>> loaded, codes_report = load_packed_with_codes(path, net)
    >>> torch.equal(codes_report.codes[""][0][0], report.codes[""][0][0])
    True
    """
    from quant import packing

    path = Path(path)
    qmodel = packing.load_packed(path, model)
    with packing._open_regular(path) as handle:
        front = packing._read_front(path, handle)
        body = packing._read_body(path, handle, front)
    layer_of = {slot.state_key: slot.name for slot in weight_slots(qmodel)}
    codes: dict[str, tuple[Quantized, ...]] = {}
    header = front.header
    with packing._damaged(path):
        for i, entry in enumerate(header["entries"]):
            if entry["kind"] != "quantized":
                continue
            if entry["name"] not in layer_of:
                raise QuantError(f"header.entries[{i}]: {entry['name']!r} is not a weight a quantizer handles")
            codes[layer_of[entry["name"]]] = tuple(
                packing._decode_term(term, body, entry["shape"], f"header.entries[{i}].terms[{j}]")
                for j, term in enumerate(entry["terms"])
            )
    activations = {}
    for name, module in qmodel.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, ActivationQuantizer):
                activations[name] = hook.params
    try:
        spec, plan = QuantSpec.from_dict(header["spec"]), QuantPlan.from_dict(header["plan"])
    except (TypeError, ValueError) as exc:
        raise QuantError(f"{path} is damaged: header.spec or header.plan: {exc}") from None
    report = QuantReport(
        layers=(),
        spec=spec,
        plan=plan,
        codes=codes,
        activations=activations,
        method=str(header.get("method", "rtn")),
        bn_reestimated=bool(header.get("bn_reestimated", False)),
    )
    return qmodel, report


__all__ = [
    "CANDIDATE_OPSETS",
    "activation_type",
    "choose_opset",
    "export_onnx",
    "load_packed_with_codes",
    "max_abs_diff",
    "narrowest_type",
    "output_names",
    "supported_types",
]
