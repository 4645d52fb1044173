"""Typed records of a run: a reported level, one level's result, one spec's result.

These frozen dataclasses are the one definition of what a result holds. The results
store's SQLite schema is generated from their fields (:func:`result_columns` for the
results, :func:`detail_columns` for the report's details), the CSV header follows the
same order, and building a record from a mapping with an unknown or missing key is an
error that names the key, so that a renamed metric can never be written as NULL.

Examples
--------
>>> lv = Level("k=2", 2, (0, 0, 1), ("a", "b"), "learned")
>>> lv.to_json()
{'k': 2, 'kind': 'learned', 'assignment': [0, 0, 1], 'names': ['a', 'b']}
>>> [name for name, _ in sql_columns(LevelResult)][:3]
['level', 'grouping', 'k']
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from hiercluster.errors import HierclusterError

# Bumped whenever the meaning or layout of a stored result changes. It is stored in the
# database (PRAGMA user_version) and is part of every resume key, so that results of older
# code are never read as this code's.
SCHEMA_VERSION = 5

LEVEL_KINDS = ("learned", "reference")

# A spec's xz size (quant.packing.XZ_PRESET) is computed for packed payloads up to this size
# and stored as None above it: on a random ViT-B/16 (42.6 MiB) xz took 24 CPU-s per spec for a
# size within 0.1% of gzip's, which is always computed (benchmarks/bench_xz.py). It lives here,
# not in the sweep, so that the report can say so without importing the sweep (torch, quant, data).
XZ_MAX_BYTES = 4 * 2**20


@dataclass(frozen=True)
class Level:
    """A reported level: ``k`` superclasses of the classes, their names, and where they came from.

    ``kind`` is ``"learned"`` (a cut of the class hierarchy) or ``"reference"`` (a
    hand-made grouping). ``assignment[c]`` is the superclass id of class ``c``. ``tree``
    names the embedding whose tree was cut when a run builds several (``""`` otherwise, and
    for the cuts every tree shares: one class per group, and all in one).
    """

    name: str
    k: int
    assignment: tuple[int, ...]
    names: tuple[str, ...]
    kind: str
    tree: str = ""

    def __post_init__(self) -> None:
        if self.kind not in LEVEL_KINDS:
            raise HierclusterError(f"level {self.name}: kind {self.kind!r} is not one of {', '.join(LEVEL_KINDS)}")
        if len(self.names) != self.k or (self.assignment and max(self.assignment) + 1 != self.k):
            raise HierclusterError(
                f"level {self.name}: {len(self.names)} names and {max(self.assignment, default=-1) + 1} groups "
                f"for k={self.k}"
            )

    @classmethod
    def of(
        cls, name: str, assignment: Sequence[int] | np.ndarray, names: Sequence[str], kind: str, tree: str = ""
    ) -> Level:
        a = tuple(int(g) for g in np.asarray(assignment).tolist())
        return cls(name, max(a) + 1 if a else 0, a, tuple(str(n) for n in names), kind, tree)

    @property
    def array(self) -> np.ndarray:
        """The assignment as an int64 array (what the metrics take)."""
        return np.asarray(self.assignment, dtype=np.int64)

    def to_json(self) -> dict[str, Any]:
        """The form ``run.json`` holds (``tree`` only when set)."""
        out = {"k": self.k, "kind": self.kind, "assignment": list(self.assignment), "names": list(self.names)}
        return {**out, "tree": self.tree} if self.tree else out

    @property
    def group(self) -> str:
        """The levels scored in one vectorized pass share this: kind and tree (their k differ)."""
        return f"{self.kind}:{self.tree}"


def level_name(k: int, tree: str = "") -> str:
    """A learned level's name: ``"k=9"``, or ``"k=9 confusion"`` for one of several trees' cuts.

    Examples
    --------
    >>> level_name(9), level_name(9, "confusion")
    ('k=9', 'k=9 confusion')
    """
    return f"k={k} {tree}" if tree else f"k={k}"


@dataclass(frozen=True)
class LevelResult:
    """Every grouped metric of one quantized model at one level (DESIGN.md, "Merged heads and metrics").

    Accuracies are fractions; ``drop``, ``random_drop_*`` and ``advantage`` are
    percentage points; stds are over the random groupings. The statistics (DESIGN.md,
    "Statistics"): ``drop_lo``/``drop_hi`` and ``advantage_lo``/``advantage_hi``, 95%
    paired-bootstrap intervals in pp (None when ``eval.bootstrap`` is 0); ``rank_p``, the
    chance test of the learned grouping's drop among the random ones'; ``group_sizes``,
    largest first (``"4+3+1+1+1"``); ``absorbed_share`` and ``random_absorbed_share_mean``,
    ``1 - drop / fine drop`` of the learned grouping and of the random ones' mean drop (None
    when the fine drop is 0).
    """

    level: str
    grouping: str
    k: int
    fine_acc_float: float
    fine_acc_quant: float
    acc_float: float
    acc_quant: float
    drop: float
    random_acc_float_mean: float
    random_acc_float_std: float
    random_acc_quant_mean: float
    random_acc_quant_std: float
    random_drop_mean: float
    random_drop_std: float
    advantage: float
    drop_lo: Optional[float]
    drop_hi: Optional[float]
    advantage_lo: Optional[float]
    advantage_hi: Optional[float]
    rank_p: float
    group_sizes: str
    absorbed_share: Optional[float]
    random_absorbed_share_mean: Optional[float]


# Keys of :func:`~hiercluster.evaluation.metrics.evaluate_levels`' rows that hold run-wide
# settings (recorded once in run.json), not a level's result.
RUN_WIDE_METRIC_KEYS = frozenset({"reduction", "n_random"})


@dataclass(frozen=True)
class SpecResult:
    """One finished spec: its settings, sizes, timings, every level's result and the report's details.

    ``fine_acc_lo``/``fine_acc_hi`` (fractions) and ``fine_drop_lo``/``fine_drop_hi`` (pp):
    95% paired-bootstrap intervals of the fine accuracy and its drop (None when
    ``eval.bootstrap`` is 0). ``logits_digest``: a digest of the quantized model's logits
    (equal digests: bit-identical outputs, e.g. pow2 above 4 bits). ``holdout``: the drop
    (pp) of each level of several trees on the held-out training images that
    ``hierarchy.select: auto`` chooses with (empty when the run does not choose).
    """

    spec_key: str
    tag: str
    scheme: str
    bits: int
    clipping: str
    granularity: str
    plan: str
    method: str
    bn_reestimate: bool
    activation_bits: Optional[int]
    avg_bits: float
    fine_acc: float
    fine_acc_lo: Optional[float]
    fine_acc_hi: Optional[float]
    fine_drop_lo: Optional[float]
    fine_drop_hi: Optional[float]
    logits_digest: str
    fp32_bytes: int
    packed_bytes: int
    gzip_bytes: int
    xz_bytes: Optional[int]
    quantize_s: float
    eval_s: float
    metrics_s: float
    size_s: float
    levels: tuple[LevelResult, ...] = ()
    # What only the report reads (the ``specs`` table), not columns of ``results``.
    spec_json: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    plan_json: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    prediction_share: tuple[float, ...] = ()
    layers: tuple[Mapping[str, Any], ...] = ()
    holdout: Mapping[str, float] = dataclasses.field(default_factory=dict)
    # A calibrated model bit-packed (the .hcq bytes) when the run exports models; the driver keeps it.
    packed_model: Optional[bytes] = None

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per level: this spec's columns, then the level's."""
        spec = {name: getattr(self, name) for name, _ in sql_columns(SpecResult)}
        return [{**spec, **dataclasses.asdict(level)} for level in self.levels]


# Fields of SpecResult kept as JSON text in the ``specs`` table (what only the report reads).
DETAIL_FIELDS = frozenset({"spec_json", "plan_json", "prediction_share", "layers", "holdout"})
# Fields of SpecResult that are not columns of the ``results`` table: the details, the level
# results (rows of their own) and the packed model (a file of the run directory, never stored).
_NOT_COLUMNS = DETAIL_FIELDS | {"levels", "packed_model"}
_SQL_TYPES = {int: "INTEGER", float: "REAL", str: "TEXT", bool: "INTEGER"}


def _column_type(hint: Any, where: str) -> tuple[str, bool]:
    """``(SQLite type, may be NULL)`` of a field's type hint."""
    nullable = False
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        nullable = True
        hint = next(a for a in args if a is not type(None))
    if hint not in _SQL_TYPES:
        raise TypeError(f"{where}: no SQLite column type for {hint!r}")
    return _SQL_TYPES[hint], nullable


def sql_columns(record: type) -> list[tuple[str, str]]:
    """``[(column, SQLite type)]`` of a record's stored fields, in declaration order."""
    hints = typing.get_type_hints(record)
    return [
        (f.name, _column_type(hints[f.name], f"{record.__name__}.{f.name}")[0])
        for f in dataclasses.fields(record)
        if f.name not in _NOT_COLUMNS
    ]


def nullable_columns(record: type) -> set[str]:
    """The stored fields of ``record`` that may hold NULL (``Optional`` in the dataclass)."""
    hints = typing.get_type_hints(record)
    return {
        f.name
        for f in dataclasses.fields(record)
        if f.name not in _NOT_COLUMNS and _column_type(hints[f.name], f.name)[1]
    }


def build_record(record: type, values: Mapping[str, Any], where: str, ignore: frozenset[str] = frozenset()) -> Any:
    """``record(**values)``, refusing an unknown or a missing key with one error that names it.

    Keys in ``ignore`` are dropped on purpose (see :data:`RUN_WIDE_METRIC_KEYS`).
    """
    names = [f.name for f in dataclasses.fields(record) if f.init]
    required = {
        f.name
        for f in dataclasses.fields(record)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    unknown = sorted(set(values) - set(names) - ignore)
    missing = sorted(required - set(values))
    if unknown or missing:
        parts = ([f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"] if unknown else []) + (
            [f"missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}"] if missing else []
        )
        raise HierclusterError(f"{where}: {'; '.join(parts)} for a {record.__name__} (its fields: {', '.join(names)})")
    return record(**{k: plain_value(v) for k, v in values.items() if k in names})


def plain_value(value: Any) -> Any:
    """numpy scalars -> Python scalars, so that sqlite3 and json take them; anything else as it is.

    Examples
    --------
    >>> plain_value(np.float32(0.5)), plain_value(np.int64(3)), plain_value("a")
    (0.5, 3, 'a')
    """
    if isinstance(value, np.generic):
        return value.item()
    return value


def result_columns(spec: type = SpecResult, level: type = LevelResult) -> list[tuple[str, str]]:
    """The columns of the ``results`` table (and of ``results.csv``): a spec's, then a level's.

    A level field named like a spec field would make two columns of one name (a dict of
    the columns keeps one, a row keeps the level's value): that is refused here, at import
    of the store, rather than found as a wrong value in a table.
    """
    columns = sql_columns(spec) + sql_columns(level)
    names = [name for name, _ in columns]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise TypeError(
            f"{spec.__name__} and {level.__name__} both have the field{'s' if len(clashes) > 1 else ''} "
            f"{', '.join(clashes)}: the results table needs one column per name; rename one of them"
        )
    return columns


def detail_columns(spec: type = SpecResult) -> list[tuple[str, str]]:
    """The columns of the ``specs`` table: ``spec_key``, then each of :data:`DETAIL_FIELDS` as JSON text.

    Examples
    --------
    >>> [name for name, _ in detail_columns()]
    ['spec_key', 'spec_json', 'plan_json', 'prediction_share', 'layers', 'holdout']
    """
    return [("spec_key", "TEXT")] + [(f.name, "TEXT") for f in dataclasses.fields(spec) if f.name in DETAIL_FIELDS]


__all__ = [
    "DETAIL_FIELDS",
    "LEVEL_KINDS",
    "Level",
    "LevelResult",
    "RUN_WIDE_METRIC_KEYS",
    "SCHEMA_VERSION",
    "SpecResult",
    "XZ_MAX_BYTES",
    "build_record",
    "detail_columns",
    "level_name",
    "nullable_columns",
    "plain_value",
    "result_columns",
    "sql_columns",
]
