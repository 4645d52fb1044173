"""Run configuration: YAML validated on load into frozen dataclasses.

Each section of the YAML file is a dataclass below; :func:`load_config` reads the file
with ``yaml.safe_load``, applies ``--set section.key=value`` overrides, and checks every
key and type. A mistake is one :class:`HierclusterError` naming the key path and, for
an unknown key, the nearest valid one. Relative paths in the file are resolved against
the current directory first, then the config file's folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hiercluster.errors import HierclusterError, read_text, short_repr


@dataclass(frozen=True)
class DataConfig:
    """Section ``data``: which dataset and how to batch it."""

    dataset: str = "fashion_mnist"
    root: str | None = None
    eval_split: str = "test"
    batch_size: int = 128
    workers: int = 0
    download: bool = False


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
    threads: int | None = None


@dataclass(frozen=True)
class HierarchyConfig:
    """Section ``hierarchy``: how the class hierarchy is built and which levels are reported.

    ``linkage``/``metric`` default to the embedding's own (ward on L2-normalized vectors
    for ``fc_weights`` and ``centroids``; average linkage on ``1 - similarity`` for
    ``confusion``). ``levels`` lists the k (number of superclasses) to evaluate; empty means every k from
    the number of classes down to 2. ``reference`` is a YAML grouping
    ``{superclass: [class names]}`` evaluated beside the learned levels (``dataset:coarse``
    takes CIFAR-100's 20 coarse superclasses from the dataset files); ``names`` gives
    superclasses readable names (``{Footwear: [Sandal, Sneaker, Ankle boot]}``).
    """

    embedding: str = "fc_weights"
    linkage: str | None = None
    metric: str | None = None
    split: str = "train"
    levels: tuple[int, ...] = ()
    reference: str | None = None
    names: dict[str, Any] | None = None


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
    ``bn_reestimate``, ``bits``, ``schemes``, ``clipping``; ``plans`` names the
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
    """Section ``eval``: merged-head reduction, random baselines and the tolerance (pp)."""

    reduction: str = "prob_sum"
    random_seeds: int = 20
    seed: int = 0
    tolerance: float = 1.0


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
    source: str | None = None

    def __post_init__(self) -> None:
        c = self.calibration
        if c.split == self.data.eval_split and not c.allow_eval_split:
            raise HierclusterError(
                f"config key calibration.split is {c.split!r}, the same as data.eval_split: calibration data must "
                "not come from the evaluation split; use another split, or set calibration.allow_eval_split: true"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every section (without ``source``), for saving next to results."""
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d


_CHOICES: dict[str, tuple[str, ...]] = {
    "data.eval_split": ("train", "test"),
    "train.schedule": ("onecycle", "cosine"),
    "hierarchy.embedding": ("fc_weights", "centroids", "confusion"),
    "hierarchy.linkage": ("ward", "average", "complete", "single", "weighted"),
    "hierarchy.metric": ("cosine", "euclidean", "precomputed"),
    "hierarchy.split": ("train", "test"),
    "calibration.split": ("train", "test"),
    "eval.reduction": ("prob_sum", "mean_logit", "argmax_then_map"),
}
# key path -> (lowest allowed, highest allowed or None, whether the highest is excluded)
_RANGES: dict[str, tuple[float, float | None, bool]] = {
    "train.label_smoothing": (0.0, 1.0, True),
    "train.crop_padding": (0, None, False),
    "train.momentum": (0.0, None, False),
    "train.weight_decay": (0.0, None, False),
    "train.threads": (1, None, False),
    "data.workers": (0, None, False),
    "eval.tolerance": (0.0, None, False),
    "calibration.seed": (0, 2**63 - 1, False),  # torch.Generator.manual_seed's range
}
_POSITIVE = {
    "data.batch_size",
    "train.epochs",
    "train.batch_size",
    "train.lr",
    "model.width",
    "eval.random_seeds",
    "quant.activation_calibration_batches",
    "calibration.samples",
    "calibration.batch_size",
}
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
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            raise HierclusterError(f"unknown config key {short_repr(path)}{hint} Valid keys here: {', '.join(names)}")
        value = _coerce(value, hints[key], path)
        if path in _CHOICES and value is not None and value not in _CHOICES[path]:
            raise HierclusterError(f"config key {path}: {short_repr(value)} is not one of {', '.join(_CHOICES[path])}")
        if path in _POSITIVE and value is not None and value <= 0:
            raise HierclusterError(f"config key {path}: must be > 0, got {short_repr(value)}")
        if path in _RANGES and value is not None:
            lo, hi, hi_open = _RANGES[path]
            if value < lo or (hi is not None and (value >= hi if hi_open else value > hi)):
                upper = "" if hi is None else (f" and < {hi}" if hi_open else f" and <= {hi}")
                raise HierclusterError(f"config key {path}: must be >= {lo}{upper}, got {short_repr(value)}")
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
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise HierclusterError(f"--set {short_repr(text)}: value is not valid YAML: {exc}") from None
    return [p for p in key.strip().split(".")], value


def _apply_override(data: dict[str, Any], parts: list[str], value: Any) -> None:
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise HierclusterError(f"--set {'.'.join(parts)}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> Any:
    """``yaml.safe_load`` a file, with clear errors for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise HierclusterError(f"file not found: {path}")
    try:
        return yaml.safe_load(read_text(path, "YAML file"))
    except yaml.YAMLError as exc:
        raise HierclusterError(f"{path} is not valid YAML: {exc}") from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a config file; ``path=None`` starts from the defaults.

    Examples
    --------
    >>> cfg = load_config(None, ["data.dataset=digits", "train.epochs=2"])
    >>> cfg.data.dataset, cfg.train.epochs
    ('digits', 2)
    """
    data = read_yaml(path) if path is not None else {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise HierclusterError(f"{path}: the top level must be a mapping of sections (data, model, ...)")
    for text in overrides:
        _apply_override(data, *parse_override(text))
    cfg = _build(RunConfig, data, "")
    return dataclasses.replace(cfg, source=str(path) if path is not None else None)


def resolve_path(value: str | Path, config_source: str | None) -> Path:
    """A path from a config: as given if it exists (or is absolute), else beside the config file."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists() or config_source is None:
        return p
    beside = Path(config_source).parent / p
    return beside if beside.exists() else p


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
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path
