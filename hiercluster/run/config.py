"""Run configuration: YAML validated on load into frozen dataclasses.

Each section of the YAML file is a dataclass below; :func:`load_config` reads the file
with a safe YAML loader (libyaml's when installed), applies ``--set section.key=value``
overrides, and checks every key, type and range. A mistake is one
:class:`HierclusterError` naming the key path and, for an unknown key, the nearest valid
one. Every YAML text (a config, a grouping file, a ``--set`` value) is bounded before it
is built: its size in bytes, its number of values with aliases expanded, and its nesting
depth, so that an alias bomb or a huge list is one line, not minutes or a MemoryError.
Relative input paths in the file (``model.checkpoint``, ``data.root``,
``hierarchy.reference``) are resolved against the config file's folder first, then the
current directory; ``output.dir`` is relative to the current directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hiercluster.errors import HierclusterError, short_repr
from hiercluster.limits import MAX_CLASSES
from hiercluster.models.device import check_device_name
from hiercluster.yamlio import load_yaml_text, read_yaml
from quant._files import write_text_atomic
from quant.spec import CLIPPINGS, GRANULARITIES, MAX_BITS, MIN_BITS, SCHEMES

# The most items in a list of the quant grid (bits, schemes, plans, methods, ...): every
# item multiplies the number of specs, and no sweep needs more than a few dozen.
MAX_GRID_ITEMS = 64
# hierarchy.select's value that chooses a tree per k on held-out training images.
SELECT_AUTO = "auto"

# The most explicit hierarchy.levels: one per class of ImageNet-1k.
MAX_LEVELS = 1000


@dataclass(frozen=True)
class DataConfig:
    """Section ``data``: which dataset and how to batch it."""

    dataset: str = "fashion_mnist"
    root: str | None = None
    eval_split: str = "test"
    batch_size: int = 128
    download: bool = False
    # A fixed, stratified subset of this many evaluation images (the same every run), for trying things out.
    limit: int | None = None
    # Image folders (``imagefolder``): input size, channels (1 grayscale, 3 RGB), normalization
    # (per-channel lists, or ``auto``: computed on the training split) and resizing
    # (``shorter_side``: shorter side to image_size*256/224, then a center crop; ``exact``;
    # ``none``: images must already have the size). Unset: the checkpoint's metadata, else ImageNet's.
    image_size: int | None = None
    channels: int | None = None
    mean: tuple[float, ...] | str | None = None
    std: tuple[float, ...] | str | None = None
    resize: str | None = None

    def __post_init__(self) -> None:
        # The keys on a dataset other than imagefolder are refused by data.resolve_folder_options.
        if (self.mean is None) != (self.std is None):
            given, missing = ("mean", "std") if self.std is None else ("std", "mean")
            raise HierclusterError(
                f"config key data.{given} is set but data.{missing} is not: give both (a list of one number per "
                "channel, or auto)"
            )
        for name in ("mean", "std"):
            self._check_normalization(name, getattr(self, name))

    def _check_normalization(self, name: str, value: tuple[float, ...] | str | None) -> None:
        """``auto`` (never on the evaluation split) or one number per channel; a std > 0."""
        if isinstance(value, str):
            if value != "auto":
                raise HierclusterError(
                    f"config key data.{name}: {short_repr(value)} is not auto or a list of numbers (one per channel)"
                )
            if self.eval_split == "train":
                raise HierclusterError(
                    f"config key data.{name} is auto, computed on the training split, but data.eval_split is train: "
                    "nothing is computed on the evaluation split; give data.mean and data.std as lists"
                )
            return
        if value is None:
            return
        if len(value) not in (1, 3) or (self.channels is not None and len(value) != self.channels):
            want = f"data.channels is {self.channels}" if self.channels is not None else "images have 1 or 3 channels"
            raise HierclusterError(
                f"config key data.{name} has {len(value)} values {short_repr(list(value))}, but {want}: "
                "give one value per channel"
            )
        if name == "std":
            for i, v in enumerate(value):
                if v <= 0:
                    raise HierclusterError(f"config key data.std[{i}]: must be > 0 (pixels are divided by it), got {v:g}")


@dataclass(frozen=True)
class ModelConfig:
    """Section ``model``: the architecture and its checkpoint.

    With a checkpoint that has a metadata JSON beside it, ``arch`` may be left out.
    """

    arch: str | None = None
    checkpoint: str | None = None
    width: int = 16


@dataclass(frozen=True)
class TrainConfig:
    """Section ``train``: baseline training (``hiercluster train``); writes ``model.checkpoint``."""

    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    label_smoothing: float = 0.0
    crop_padding: int = 2
    hflip: bool = True
    seed: int = 0


@dataclass(frozen=True)
class HierarchyConfig:
    """Section ``hierarchy``: how the class hierarchy is built and which levels are reported.

    ``linkage``/``metric`` default to the embedding's own (ward on L2-normalized vectors
    for ``fc_weights`` and ``centroids``; average linkage on ``1 - similarity`` for
    ``confusion``). ``levels`` lists the k (number of superclasses) to evaluate; empty means every k from
    the number of classes C down to 2 when C <= 20, and about 10 log-spaced k from C down to 2
    (both included) above that (:func:`hiercluster.run.prepare.default_level_ks`; 1,000 classes:
    1000, 501, 251, 126, 63, 32, 16, 8, 4, 2). ``reference`` is a YAML grouping
    ``{superclass: [class names]}`` evaluated beside the learned levels (``dataset:coarse``
    takes CIFAR-100's 20 coarse superclasses from the dataset files); ``names`` gives
    superclasses readable names (``{Footwear: [Sandal, Sneaker, Ankle boot]}``).

    ``embedding`` lists the trees to build (one name alone is a list of one); every tree's
    levels are evaluated, ``linkage``/``metric`` apply to each. ``select`` says which tree
    answers each k: ``auto`` picks, per k, the tree whose fewest bits within tolerance (then
    lowest drop) are best on ``holdout`` images of ``split`` (default: 5,000 or a fifth of
    the split, whichever is fewer), held out from fitting the data-based trees and never
    from the evaluation split
    (:func:`hiercluster.evaluation.selection.choose_trees`); a tree's name uses that tree
    for every k.
    """

    embedding: tuple[str, ...] = ("fc_weights", "confusion")
    linkage: str | None = None
    metric: str | None = None
    split: str = "train"
    levels: tuple[int, ...] = ()
    reference: str | None = None
    names: dict[str, Any] | None = None
    select: str = SELECT_AUTO
    holdout: int | None = None

    @property
    def selects_on_holdout(self) -> bool:
        """Whether the run chooses between trees on held-out images of ``split`` (``select: auto``, several trees)."""
        return self.select == SELECT_AUTO and len(self.embedding) > 1


@dataclass(frozen=True)
class PlanConfig:
    """One partial-quantization plan of the grid (``quant.plans`` items).

    The keys besides ``bits`` and ``schemes`` are those of :class:`quant.QuantPlan`;
    ``bits``/``schemes`` restrict the grid points the plan is applied to (empty: all).
    """

    name: str = "full"
    first_layer_bits: int | None = None
    last_layer_bits: int | None = None
    skip: tuple[str, ...] = ()
    layer_bits: dict[str, Any] | None = None
    residual_sqnr_db: float | None = None
    residual_fraction: float | None = None
    bits: tuple[int, ...] = ()
    schemes: tuple[str, ...] = ()

    def quant_plan_dict(self) -> dict[str, Any]:
        """The fields that :meth:`quant.QuantPlan.from_dict` takes."""
        d = dataclasses.asdict(self)
        for key in ("bits", "schemes"):
            d.pop(key)
        d["skip"] = list(d["skip"])
        d["layer_bits"] = dict(d["layer_bits"] or {})
        return d


@dataclass(frozen=True)
class MethodConfig:
    """One weight-rounding method of the grid (``quant.methods`` items).

    An item is a method name (``rtn``, ``gptq``, ``adaround``; :data:`quant.METHODS`)
    or a mapping with ``name`` and lists that replace the grid's own for this method:
    ``bn_reestimate``, ``bits``, ``schemes``, ``clipping``, ``budgets``; ``plans`` names the
    ``quant.plans`` it is applied with. An empty list means the grid's list (all plans).
    Several items may share a name (``gptq`` at 4-2 bits with MSE, and at 2 bits with
    min-max); a grid point they both produce is run once.
    """

    name: str = "rtn"
    bn_reestimate: tuple[bool, ...] = ()
    bits: tuple[int, ...] = ()
    schemes: tuple[str, ...] = ()
    clipping: tuple[str, ...] = ()
    plans: tuple[str, ...] = ()
    budgets: tuple[float, ...] = ()


@dataclass(frozen=True)
class QuantGridConfig:
    """Section ``quant``: the grid of weight-quantization specs swept by ``run``.

    Every combination of ``methods`` x ``bn_reestimate`` x ``schemes`` x ``bits`` x
    ``clipping`` x ``granularity`` is run with every plan (restricted by the plan's own
    ``bits``/``schemes``, and by a method item's own lists). ``rtn`` (round to nearest)
    needs no data; ``gptq``, ``adaround`` and ``bn_reestimate: true`` fit on the
    section ``calibration``'s images. ``activation_bits`` (optional) also quantizes the
    input of every layer but the first, calibrated on the first
    ``activation_calibration_batches`` batches of that calibration set.

    ``budgets`` (average bits per weight, weighted by weight count) adds one
    mixed-precision spec per budget and per method x BN re-estimation x scheme x clipping x
    granularity: each layer's width is chosen from ``candidate_bits`` (1 is binary under
    any scheme) to minimize a sensitivity proxy measured on the calibration images
    (:func:`quant.proxy.layer_costs`, :func:`quant.allocation.allocate_bits`); the plan is
    named ``mpB`` (``mp2.5``).
    """

    schemes: tuple[str, ...] = ("asymmetric", "symmetric", "pow2")
    bits: tuple[int, ...] = (8, 6, 5, 4, 3, 2)
    clipping: tuple[str, ...] = ("mse",)
    granularity: tuple[str, ...] = ("per_channel",)
    narrow_range: bool = True
    pow2_scale: bool = False
    percentile: float = 99.99
    plans: tuple[PlanConfig, ...] = (PlanConfig(),)
    methods: tuple[MethodConfig, ...] = (MethodConfig(),)
    bn_reestimate: tuple[bool, ...] = (False,)
    activation_bits: int | None = None
    activation_calibration_batches: int = 8
    budgets: tuple[float, ...] = ()
    candidate_bits: tuple[int, ...] = (1, 2, 3, 4, 8)


@dataclass(frozen=True)
class CalibrationConfig:
    """Section ``calibration``: the unlabeled images that calibrated quantization fits on.

    A fixed subset of ``samples`` images of ``split``, drawn with a generator seeded by
    ``seed``, without augmentation, in batches of ``batch_size``; loaded once per run,
    and only when some grid point needs it (a calibrated method, BN re-estimation or
    activation quantization). It must not be the evaluation split (``data.eval_split``):
    fitting on the images that are then scored inflates the result. ``allow_eval_split:
    true`` permits it anyway, and the report then says so in its header.
    """

    split: str = "train"
    samples: int = 1024
    batch_size: int = 128
    seed: int = 0
    allow_eval_split: bool = False


@dataclass(frozen=True)
class EvalConfig:
    """Section ``eval``: merged-head reduction, random baselines, bootstrap resamples and the tolerance (pp).

    ``bootstrap``: resamples of the paired bootstrap's 95% intervals (0: none), seeded by ``seed``.
    """

    reduction: str = "prob_sum"
    random_seeds: int = 100
    seed: int = 0
    tolerance: float = 1.0
    bootstrap: int = 1000


@dataclass(frozen=True)
class RuntimeConfig:
    """Section ``runtime``: how the work runs; none of it changes what a result means.

    ``threads``: torch threads for every command (default: the cores available to the
    process; ``--threads`` overrides it). ``device``: where the models run, ``auto``
    (CUDA, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (experimental)
    (``--device`` overrides it; the device type is part of every result's key).
    ``workers``: DataLoader processes for image folders (the in-memory sets are sliced).
    """

    threads: int | None = None
    device: str = "auto"
    workers: int = 0

    def __post_init__(self) -> None:
        check_device_name(self.device)  # the spelling only: whether the machine has it is checked when a command starts


@dataclass(frozen=True)
class OutputConfig:
    """Section ``output``: the run directory (``--out`` overrides it).

    ``export_models`` writes the bit-packed model chosen for each level of the headline
    table, with its grouping, under ``models/``.
    """

    dir: str = "runs/default"
    export_models: bool = True


@dataclass(frozen=True)
class RunConfig:
    """A whole configuration file."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hierarchy: HierarchyConfig = field(default_factory=HierarchyConfig)
    quant: QuantGridConfig = field(default_factory=QuantGridConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    source: str | None = None

    def __post_init__(self) -> None:
        c = self.calibration
        if c.split == self.data.eval_split and not c.allow_eval_split:
            raise HierclusterError(
                f"config key calibration.split is {c.split!r}, the same as data.eval_split: calibration data must "
                "not come from the evaluation split; use another split, or set calibration.allow_eval_split: true"
            )
        h = self.hierarchy
        if not h.embedding:
            raise HierclusterError(
                "config key hierarchy.embedding is empty; list at least one of fc_weights, centroids, confusion"
            )
        fitted = [e for e in h.embedding if e in DATA_EMBEDDINGS]
        if (fitted or h.selects_on_holdout) and h.split == self.data.eval_split:
            what = f"the {fitted[0]} hierarchy is fitted on" if fitted else "select: auto chooses between trees on"
            raise HierclusterError(
                f"config key hierarchy.split is {h.split!r}, the same as data.eval_split: {what} that split's "
                "images and must not see the images it is then scored on; use another split (the training split), "
                "or hierarchy.embedding: fc_weights alone, which needs no data"
            )
        if h.select != SELECT_AUTO and h.select not in h.embedding:
            raise HierclusterError(
                f"config key hierarchy.select is {h.select!r}, not one of the trees of hierarchy.embedding "
                f"({', '.join(h.embedding)}); use auto or one of those"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every section (without ``source``), for saving next to results."""
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d


# The embeddings fitted on images (hiercluster.hierarchy.embeddings.NEEDS_DATA, not imported here:
# that loads torch; a test checks they agree).
DATA_EMBEDDINGS = ("centroids", "confusion")

# Rules are keyed by the key path without list indices: quant.plans[1].bits -> quant.plans.bits.
# A rule on a list applies to each of its items.
_CHOICES: dict[str, tuple[str, ...]] = {
    "data.eval_split": ("train", "test"),
    "train.schedule": ("onecycle", "cosine"),
    "hierarchy.embedding": ("fc_weights", "centroids", "confusion"),
    "hierarchy.select": (SELECT_AUTO, "fc_weights", "centroids", "confusion"),
    "hierarchy.linkage": ("ward", "average", "complete", "single", "weighted"),
    "hierarchy.metric": ("cosine", "euclidean", "precomputed"),
    "hierarchy.split": ("train", "test"),
    "calibration.split": ("train", "test"),
    "eval.reduction": ("prob_sum", "mean_logit", "argmax_then_map"),
    "data.channels": (1, 3),
    "data.resize": ("none", "shorter_side", "exact"),
    "quant.schemes": SCHEMES,
    "quant.plans.schemes": SCHEMES,
    "quant.methods.schemes": SCHEMES,
    "quant.clipping": CLIPPINGS,
    "quant.methods.clipping": CLIPPINGS,
    "quant.granularity": GRANULARITIES,
}
# key path -> (lowest allowed, highest allowed or None, whether the highest is excluded)
_RANGES: dict[str, tuple[float, float | None, bool]] = {
    "train.label_smoothing": (0.0, 1.0, True),
    "train.crop_padding": (0, 256, False),  # pixels; 1-4 is usual, 256 pads even a 224-px image past its size
    "train.momentum": (0.0, None, False),
    "train.weight_decay": (0.0, None, False),
    "runtime.threads": (1, 1024, False),  # more threads than any machine has cores
    "data.image_size": (8, 4096, False),  # pixels per side: a 4096x4096 RGB batch of 128 is already 25 GiB
    "train.seed": (0, 2**63 - 1, False),  # torch.manual_seed's range
    "runtime.workers": (0, 256, False),  # DataLoader processes: more than any machine has cores
    "eval.tolerance": (0.0, None, False),
    "eval.seed": (0, 2**63 - 1, False),  # numpy's default_rng takes no negative seed
    "eval.bootstrap": (0, 100_000, False),  # resamples; 0 turns the intervals off, 1,000 is the default
    "calibration.seed": (0, 2**63 - 1, False),  # torch.Generator.manual_seed's range
    # a number of groups: at most the classes a checkpoint may have (models.MAX_NUM_CLASSES; not
    # imported here, that would load torch); the run checks it against the data's own count
    "hierarchy.levels": (1, MAX_CLASSES, False),
    # average bits per weight: 1 is every weight binary, 8 the widest width a budget may ask for
    "quant.budgets": (1.0, 8.0, False),
    "quant.methods.budgets": (1.0, 8.0, False),
    "quant.candidate_bits": (1, 8, False),
}
# key path -> the highest allowed (None: no cap) of a value that must be > 0. The caps are
# far above real use and far below what would exhaust memory or time.
_POSITIVE: dict[str, float | None] = {
    "data.batch_size": 65_536,  # images per batch: far above any batch a CNN is evaluated with
    "data.limit": 100_000_000,  # images; more than any evaluation split has
    "train.batch_size": 65_536,
    "calibration.batch_size": 65_536,
    "train.epochs": 10_000,  # 100x a long schedule
    "train.lr": None,
    "model.width": 1024,  # resnet20 at width 1024 holds 1.1 G weights (4 GiB); at 4096 it would need 66 GiB
    "eval.random_seeds": 10_000,  # random groupings per level and spec (100 by default); 1e9 tried to allocate 74.5 GiB
    "quant.activation_calibration_batches": 10_000,  # more than any calibration set has batches
    "calibration.samples": 1_000_000,  # calibration takes about 1,000 images; ImageNet's train split has 1.28 M
    "hierarchy.holdout": 1_000_000,  # held-out images of hierarchy.split for select: auto (null: 5,000 or a fifth)
}
# Keys that hold bit widths (alone or as list items), checked here so that the message names the key.
_BITS_KEYS = {
    "quant.bits",
    "quant.activation_bits",
    "quant.plans.bits",
    "quant.plans.first_layer_bits",
    "quant.plans.last_layer_bits",
    "quant.methods.bits",
}
# Lists whose items must differ: a repeated value would run the same specs (or level) twice.
_UNIQUE = {
    "hierarchy.levels",
    "hierarchy.embedding",
    "quant.schemes",
    "quant.bits",
    "quant.clipping",
    "quant.granularity",
    "quant.bn_reestimate",
    "quant.plans.bits",
    "quant.plans.schemes",
    "quant.methods.bn_reestimate",
    "quant.methods.bits",
    "quant.methods.schemes",
    "quant.methods.clipping",
    "quant.methods.plans",
    "quant.budgets",
    "quant.methods.budgets",
    "quant.candidate_bits",
}
# key path -> the most items its list may hold.
_MAX_ITEMS: dict[str, int] = {
    "hierarchy.levels": MAX_LEVELS,
    "quant.plans": MAX_GRID_ITEMS,
    "quant.methods": MAX_GRID_ITEMS,
    **{key: MAX_GRID_ITEMS for key in _UNIQUE if key.startswith("quant.")},
}
# Keys that used to exist -> where they live now.
_MOVED = {"train.threads": "runtime.threads", "data.workers": "runtime.workers"}
# Dataclasses an item of which may be written as a bare string: the string is this field.
_SHORT_FORM: dict[type, str] = {MethodConfig: "name"}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except HierclusterError:
                continue
        raise HierclusterError(f"config key {key}: expected {_type_name(tp)}, got {short_repr(value)}")
    if dataclasses.is_dataclass(tp):
        if tp in _SHORT_FORM and isinstance(value, str):
            value = {_SHORT_FORM[tp]: value}
        return _build(tp, value, key)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            value = [value]  # a single value stands for a one-item list
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise HierclusterError(f"config key {key}: expected a mapping, got {short_repr(value)}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if isinstance(value, float) or abs(value) < 2**1023 else math.inf
            if not math.isfinite(number):
                raise HierclusterError(f"config key {key}: expected a finite number, got {short_repr(value)}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    raise HierclusterError(f"config key {key}: expected {_type_name(tp)}, got {short_repr(value)}")


def _rule(path: str) -> str:
    """``path`` without list indices, as the rule tables name it: ``quant.plans[1].bits`` -> ``quant.plans.bits``."""
    return re.sub(r"\[\d+\]", "", path)


def _check_value(path: str, value: Any) -> None:
    """The range, choice and list rules of the key ``path`` (a list's rules apply to each item)."""
    rule = _rule(path)
    if isinstance(value, tuple):
        _check_list(path, rule, value)
    elif value is not None:
        _check_scalar(path, rule, value)


def _check_list(path: str, rule: str, items: tuple[Any, ...]) -> None:
    limit = _MAX_ITEMS.get(rule)
    if limit is not None and len(items) > limit:
        raise HierclusterError(f"config key {path}: {len(items):,} items, more than the {limit} allowed")
    for i, item in enumerate(items):
        _check_scalar(f"{path}[{i}]", rule, item)
    if rule in _UNIQUE:
        seen: set[Any] = set()
        for item in items:
            if item in seen:
                raise HierclusterError(f"config key {path}: {short_repr(item)} is listed twice; list each value once")
            seen.add(item)


def _check_scalar(path: str, rule: str, value: Any) -> None:
    if rule in _CHOICES and value not in _CHOICES[rule]:
        choices = _CHOICES[rule]
        # [:100]: difflib is quadratic; number choices (data.channels) get no spelling hint
        words = all(isinstance(c, str) for c in choices)
        close = difflib.get_close_matches(str(value)[:100], choices, n=1) if words else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise HierclusterError(
            f"config key {path}: {short_repr(value)} is not one of {', '.join(map(str, choices))}{hint}"
        )
    # Weight widths may be 1 (the binary scheme; width 1 in a plan is binary under any scheme);
    # activations need at least MIN_BITS.
    lowest = MIN_BITS if rule == "quant.activation_bits" else 1
    if rule in _BITS_KEYS and not lowest <= value <= MAX_BITS:
        raise HierclusterError(f"config key {path}: {short_repr(value)} bits is outside {lowest}..{MAX_BITS}")
    if rule in _POSITIVE:
        hi = _POSITIVE[rule]
        if value <= 0 or (hi is not None and value > hi):
            upper = "" if hi is None else f" and <= {hi:,}"
            raise HierclusterError(f"config key {path}: must be > 0{upper}, got {short_repr(value)}")
    if rule in _RANGES:
        lo, hi, hi_open = _RANGES[rule]
        if value < lo or (hi is not None and (value >= hi if hi_open else value > hi)):
            upper = "" if hi is None else (f" and < {hi}" if hi_open else f" and <= {hi}")
            raise HierclusterError(f"config key {path}: must be >= {lo}{upper}, got {short_repr(value)}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise HierclusterError(f"config section {prefix or '(top level)'}: expected a mapping, got {short_repr(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if path in _MOVED:
            raise HierclusterError(f"config key {path} has moved: write it as {_MOVED[path]}")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            raise HierclusterError(f"unknown config key {short_repr(path)}{hint} Valid keys here: {', '.join(names)}")
        value = _coerce(value, hints[key], path)
        _check_value(path, value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except HierclusterError:
        raise  # a dataclass's own check already names its keys
    except (TypeError, ValueError) as exc:
        raise HierclusterError(f"config section {prefix or '(top level)'}: {exc}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"quant.bits=[4,3]"`` -> ``(["quant", "bits"], [4, 3])``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise HierclusterError(f"--set expects section.key=value, got {short_repr(text)}")
    value = load_yaml_text(raw, f"the value of --set {short_repr(key.strip(), 40)}") if raw.strip() else None
    return [p for p in key.strip().split(".")], value


def _apply_override(data: dict[str, Any], parts: list[str], value: Any) -> None:
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise HierclusterError(f"--set {short_repr('.'.join(parts), 40)}: {short_repr(part, 30)} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a config file; ``path=None`` starts from the defaults.

    Examples
    --------
    >>> cfg = load_config(None, ["data.dataset=digits", "train.epochs=2"])
    >>> cfg.data.dataset, cfg.train.epochs
    ('digits', 2)
    """
    data = read_yaml(path, "config file") if path is not None else {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise HierclusterError(f"config file {path}: the top level must be a mapping of sections (data, model, ...)")
    for text in overrides:
        _apply_override(data, *parse_override(text))
    cfg = _build(RunConfig, data, "")
    return dataclasses.replace(cfg, source=str(path) if path is not None else None)


def resolve_path(value: str | Path, config_source: str | None) -> Path:
    """An input path from a config: beside the config file if it is there, else from the current directory.

    A relative path is taken from the config file's folder first, so that a config runs
    from any working directory; one that exists only relative to the current directory
    is taken from there (what older versions did first). A path found in neither place
    is the one beside the config file, so that a missing file is reported there and a
    file to be written (``train`` writes ``model.checkpoint``) goes there. Absolute
    paths, and every path when there is no config file, are taken as given.

    Examples
    --------
    >>> str(resolve_path("../data/model.pt", "configs/demo.yaml"))
    'configs/../data/model.pt'
    >>> str(resolve_path("/abs/model.pt", "configs/demo.yaml"))
    '/abs/model.pt'
    """
    p = Path(value).expanduser()
    if p.is_absolute() or config_source is None:
        return p
    beside = Path(config_source).parent / p
    if beside.exists() or not p.exists():
        return beside
    return p


def data_root(cfg: RunConfig) -> Path | None:
    """``data.root`` resolved like every config path; a root that does not exist is an error."""
    if not cfg.data.root:
        return None
    root = resolve_path(cfg.data.root, cfg.source)
    if not root.exists():
        raise HierclusterError(f"config key data.root: folder not found: {root}")
    return root


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (the run's record of what was used)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path
