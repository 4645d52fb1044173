"""Results store: one SQLite database per run directory.

Table ``results`` holds one row per (quant spec, level) with every metric of DESIGN.md,
the spec's fine accuracy, model sizes and timings. Table ``specs`` holds one row per
finished spec with what only the report needs (prediction shares, per-layer statistics).
A spec's rows are written in one transaction as soon as it finishes, so an interrupted
sweep loses at most the spec in flight; a spec is identified by a key that hashes
everything that affects its result, which is how a re-run knows what to skip.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from hiercluster import __version__
from hiercluster.errors import HierclusterError, short_repr
from hiercluster.run.records import (
    SCHEMA_VERSION,
    LevelResult,
    SpecResult,
    detail_columns,
    nullable_columns,
    plain_value,
    result_columns,
)
from quant._files import write_text_atomic
from quant._validate import check_json

_T = TypeVar("_T")

# Column name -> SQLite type, in CSV order: generated from the records, never spelled here
# (result_columns refuses two fields of one name, which this dict would merge).
_COLUMN_TYPES: dict[str, str] = dict(result_columns())
RESULT_COLUMNS = list(_COLUMN_TYPES)
# The ``specs`` table: ``spec_key``, then each detail field of SpecResult as JSON text.
DETAIL_COLUMNS = [name for name, _ in detail_columns()]
# Columns that hold NULL in rows this code writes (``Optional`` fields of the records).
_MAY_BE_NULL = nullable_columns(SpecResult) | nullable_columns(LevelResult)


def method_label(method: str | None, bn_reestimate: Any = False) -> str:
    """How a spec's weights were rounded, as shown in tags and tables.

    ``None`` (a row of a store written before methods existed) reads as ``rtn``.

    Examples
    --------
    >>> method_label("gptq", True), method_label("rtn", 0), method_label(None)
    ('gptq+bn', 'rtn', 'rtn')
    """
    return (method or "rtn") + ("+bn" if bn_reestimate else "")


def row_method(row: dict[str, Any]) -> str:
    """The method label of a result row (``"gptq+bn"``, ``"rtn"``)."""
    return method_label(row.get("method"), row.get("bn_reestimate"))


def spec_key(parts: dict[str, Any]) -> str:
    """A stable hash of everything that affects a spec's results (a JSON-able dict)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (identifies a checkpoint in spec keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# SQLite errors that say nothing about the file's contents: a full disk, a read-only folder or
# file, a file that cannot be opened, another writer. Moving such a database away would throw
# good results away, so they are never reported as damage (the CLI names the cause).
_NOT_DAMAGE = ("full", "readonly", "read-only", "unable to open", "locked", "disk I/O error")


def _guarded(method: Callable[..., _T]) -> Callable[..., _T]:
    """Run a store operation; a damaged database file becomes one :class:`HierclusterError`.

    SQLite finds damaged pages when a query reads them, not when the file is opened, so
    every operation is guarded, not only the opening.
    """

    @functools.wraps(method)
    def guarded(self: ResultsStore, *args: Any, **kwargs: Any) -> _T:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and any(s in str(exc) for s in _NOT_DAMAGE):
                raise
            raise self.damaged(str(exc)) from None

    return guarded


class ResultsStore:
    """The SQLite database of a run directory (``results.sqlite``).

    A damaged file is a :class:`HierclusterError` at whichever operation meets the damage.
    Before every write the file is checked to be the one opened: a database deleted or
    replaced while a run goes on would otherwise take the run's results into a file no
    one can see.

    Examples
    --------
    >>> import tempfile, os
    >>> store = ResultsStore(os.path.join(tempfile.mkdtemp(), "results.sqlite"))
    >>> store.done_keys()
    set()
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise HierclusterError(f"results database {self.path} is a folder, not a file; move it away and run again")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._con = sqlite3.connect(self.path)
        try:
            self._create_tables()
            self._identity = _identity(self.path)
        except BaseException:
            self._con.close()
            raise

    def damaged(self, why: str) -> HierclusterError:
        """The error for a damaged database file (``why``: what SQLite or the check found)."""
        why = " ".join(why.replace("*** in database main ***", "").split())  # SQLite's report spans lines
        if len(why) > 120:
            why = why[:117] + "..."
        return HierclusterError(
            f"results database {self.path} is damaged ({why}); "
            "move it away and run again to recompute"
        )

    @_guarded
    def _create_tables(self) -> None:
        # An existing database is not written to here: setting the version again rewrites the
        # file's header, and commands that only read must leave the file as it was.
        if not self._check_schema():
            self._create_schema()
        # Reads every page once (cheap next to any run): damage is found before work that would need the file.
        first = self._con.execute("PRAGMA quick_check(1)").fetchone()
        if first is None or first[0] != "ok":
            raise self.damaged(first[0] if first else "its integrity check returned nothing")

    def _create_schema(self) -> None:
        """A new database: its tables and its version in one transaction.

        One transaction, so that a kill in between never leaves tables without a version
        (which would be refused). The schema is checked again once the write lock is held:
        another process opening the same new file (library use, without the run's lock)
        may have created it since the first check, and then nothing is written.
        """
        self._con.execute("BEGIN IMMEDIATE")
        try:
            if not self._check_schema():
                for table, columns, key in (
                    ("results", result_columns(), "spec_key, level"),
                    ("specs", detail_columns(), "spec_key"),
                ):
                    cols = ", ".join(f'"{name}" {sql_type}' for name, sql_type in columns)
                    self._con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({cols}, PRIMARY KEY ({key}))")
                self._con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._con.commit()
        except BaseException:
            self._con.rollback()
            raise

    def _check_schema(self) -> bool:
        """True for a database of this schema, False for a new (empty) one.

        A database of another schema version is refused: its rows mean other things. So
        is one of this version whose tables have other columns than this code writes (a
        record field added or retyped without bumping ``SCHEMA_VERSION``).
        """
        version = self._con.execute("PRAGMA user_version").fetchone()[0]
        has_tables = self._con.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0] > 0
        if version == 0 and not has_tables:
            return False
        if version != SCHEMA_VERSION:
            raise self._rebuild(f"schema version {version}" if version else "an older hiercluster (no schema version)")
        drift = [
            change
            for table, expected in (("results", result_columns()), ("specs", detail_columns()))
            if (change := _column_changes(table, self._table_columns(table), expected))
        ]
        if drift:
            raise self._rebuild(f"code of schema version {version} with other columns ({'; '.join(drift)})")
        return True

    def _table_columns(self, table: str) -> list[tuple[str, str]]:
        """``[(column, declared type)]`` of a table as the file holds it (empty when there is no such table)."""
        return [(row[1], row[2]) for row in self._con.execute(f"PRAGMA table_info({table})")]

    def _rebuild(self, written: str) -> HierclusterError:
        """The refusal of a database this code cannot read (``written``: by what), with how to rebuild it."""
        return HierclusterError(
            f"results database {self.path} was written by {written}; this hiercluster {__version__} reads "
            f"schema version {SCHEMA_VERSION}. Rebuild it: move the file away (mv {self.path} {self.path}.old) "
            f"and run `hiercluster run CONFIG --out {self.path.parent}` again; the finished specs are recomputed"
        )

    def _check_same_file(self) -> None:
        """Refuse to write when the database file was deleted or replaced since it was opened."""
        try:
            same = _identity(self.path) == self._identity
        except FileNotFoundError:
            same = False
        if not same:
            raise HierclusterError(
                f"results database {self.path} was deleted or replaced while this command ran: the specs finished "
                "so far are no longer saved there; run the same command again to recompute them"
            )

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @_guarded
    def done_keys(self) -> set[str]:
        """Keys of the specs whose results are complete."""
        return {r[0] for r in self._con.execute("SELECT spec_key FROM specs")}

    @_guarded
    def add_spec(self, result: SpecResult) -> None:
        """Write one finished spec: its level rows and its details, in one transaction."""
        if not isinstance(result, SpecResult):
            raise TypeError(f"add_spec takes a SpecResult, got {type(result).__name__}")
        self._check_same_file()
        details = {"spec_key": result.spec_key, **{name: _json_text(getattr(result, name)) for name in DETAIL_COLUMNS[1:]}}
        with self._con:
            self._con.execute("DELETE FROM results WHERE spec_key = ?", (result.spec_key,))
            self._con.executemany(
                f"INSERT INTO results ({_quoted(RESULT_COLUMNS)}) VALUES ({_marks(RESULT_COLUMNS)})",
                [[plain_value(row[c]) for c in RESULT_COLUMNS] for row in result.rows()],
            )
            self._con.execute(
                f"INSERT OR REPLACE INTO specs ({_quoted(DETAIL_COLUMNS)}) VALUES ({_marks(DETAIL_COLUMNS)})",
                [details[c] for c in DETAIL_COLUMNS],
            )

    @_guarded
    def set_xz_bytes(self, key: str, xz_bytes: int) -> None:
        """Fill in the xz size of finished spec ``key`` (every level row of it): the sweep skips
        xz for big payloads, and the export computes it for the winners it writes."""
        self._check_same_file()
        with self._con:
            self._con.execute("UPDATE results SET xz_bytes = ? WHERE spec_key = ?", (int(xz_bytes), key))

    @_guarded
    def results(self, keys: Iterable[str] | None = None, complete: bool = False) -> list[dict[str, Any]]:
        """Rows of ``results`` as dicts: those of ``keys`` in the order of ``keys``, else all in the order written.

        Within a spec the levels come in the order they were written. Ordering by ``keys``
        (the grid's order) rather than by when each spec finished makes every tie-break
        that takes the earlier row (:func:`~hiercluster.evaluation.metrics.min_bits`) and
        results.csv the same whether the specs ran one after another or in parallel.

        Every value is checked against its column's type: a row edited by hand into nonsense
        is reported as damage here, not as a ``TypeError`` deep inside the report. With
        ``complete``, a missing value (NULL) where the records never hold one is damage too
        (a database of other code is refused when it is opened, so only a hand edit does that).
        """
        select = f"SELECT {_quoted(RESULT_COLUMNS)} FROM results"
        if keys is None:
            cursors: Iterable[sqlite3.Cursor] = [self._con.execute(f"{select} ORDER BY rowid")]
        else:  # one indexed query per spec (the primary key starts with spec_key): other specs' rows are not read
            cursors = (
                self._con.execute(f"{select} WHERE spec_key = ? ORDER BY rowid", (key,)) for key in dict.fromkeys(keys)
            )
        rows = []
        for cursor in cursors:
            for values in cursor:
                row = dict(zip(RESULT_COLUMNS, values))
                self._check_types(row, complete)
                rows.append(row)
        return rows

    def _check_types(self, row: dict[str, Any], complete: bool) -> None:
        for column, sql_type in _COLUMN_TYPES.items():
            value = row.get(column)
            if value is None and complete and column not in _MAY_BE_NULL:
                raise self.damaged(f"the {column} of spec {short_repr(row.get('spec_key'), 30)} is missing")
            if value is not None and not isinstance(value, _PYTHON_TYPES[sql_type]):
                raise self.damaged(
                    f"the {column} of spec {short_repr(row.get('spec_key'), 30)} is {short_repr(value, 30)}, "
                    f"not {sql_type.lower()}"
                )

    @_guarded
    def spec_details(self, key: str, n_classes: int | None = None) -> dict[str, Any] | None:
        """The ``specs`` row of ``key`` with its JSON decoded and its shape checked, or None.

        A row edited by hand into JSON of another shape (or, given ``n_classes``, a
        prediction share of another length) is damage, reported as one error.
        """
        values = self._con.execute(f"SELECT {_quoted(DETAIL_COLUMNS)} FROM specs WHERE spec_key = ?", (key,)).fetchone()
        if values is None:
            return None
        stored = dict(zip(DETAIL_COLUMNS, values))
        where = f"the details of spec {short_repr(key, 30)}"
        try:
            details = {
                "spec_key": stored["spec_key"],
                # spec_json -> "spec", plan_json -> "plan": the names the report reads
                **{name.removesuffix("_json"): json.loads(stored[name]) for name in DETAIL_COLUMNS[1:]},
            }
        except (TypeError, ValueError, RecursionError):
            raise self.damaged(f"{where} are not JSON") from None
        try:
            check_json(details, SPEC_DETAILS_SPEC, "", error=HierclusterError)
        except HierclusterError as exc:
            raise self.damaged(f"{where}: {str(exc).lstrip('.')}") from None
        share = details["prediction_share"]
        if n_classes is not None and len(share) != n_classes:
            raise self.damaged(f"{where}: prediction_share has {len(share)} values for {n_classes} classes")
        return details

    def export_csv(self, path: str | Path, keys: Iterable[str] | None = None) -> Path:
        """Write ``results`` (optionally only ``keys``) to a CSV file with a header row."""
        path = Path(path)
        rows = self.results(keys)
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        return write_text_atomic(path, text.getvalue())


# The JSON of a ``specs`` row as the report reads it (:meth:`ResultsStore.spec_details`): the weight
# spec's scheme and bits, one prediction share per class, and each layer's weight quartiles.
_QUARTILES = ("min", "q1", "median", "q3", "max")  # quant.metrics.QUARTILES, not imported here: that loads torch
_LAYER_SPEC: dict[str, Any] = {
    "name": str,
    "bits": (int, None),
    **{f"{when}_{stat}": float for when in ("before", "after") for stat in _QUARTILES},
    # Added with issue 12 (quant.report.LayerReport.row); optional, so rows stored before still read.
    **{f"{key}?": float for key in ("before_mean", "after_mean", "outlier_fraction",
                                    "range_ratio_ch_median", "range_ratio_ch_min")},
}
SPEC_DETAILS_SPEC: dict[str, Any] = {
    "spec": {"scheme": str, "bits": int},
    "plan": dict,
    "prediction_share": [float],
    "layers": [_LAYER_SPEC],
    "holdout": dict,  # level name -> held-out drop (pp); values checked by the tree selection that reads them
}
# What sqlite3 returns for each declared type; an INTEGER column may hold a whole REAL after
# SQLite's own conversions, and a REAL column an integer.
_PYTHON_TYPES: dict[str, tuple[type, ...]] = {"TEXT": (str,), "INTEGER": (int, float), "REAL": (int, float)}


def check_database(path: str | Path) -> None:
    """Open and check an existing results database, so that a damaged one is refused before any work."""
    if Path(path).exists():
        ResultsStore(path).close()


def _identity(path: Path) -> tuple[int, int]:
    """``(device, inode)``: which file ``path`` names now."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _quoted(columns: Iterable[str]) -> str:
    """``"a", "b"``: column names for SQL (``drop`` is a keyword)."""
    return ", ".join(f'"{c}"' for c in columns)


def _marks(columns: Iterable[str]) -> str:
    return ", ".join("?" for _ in columns)


def _jsonable(value: Any) -> Any:
    """A detail field as plain JSON values: mappings as dicts, tuples as lists, numpy scalars as Python ones."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return plain_value(value)


def _json_text(value: Any) -> str:
    return json.dumps(_jsonable(value))


# How many names a schema refusal lists per kind of change; the rest are counted.
_LISTED_COLUMNS = 5


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED_COLUMNS])
    return shown + (f" and {len(names) - _LISTED_COLUMNS} more" if len(names) > _LISTED_COLUMNS else "")


def _column_changes(table: str, actual: list[tuple[str, str]], expected: list[tuple[str, str]]) -> str:
    """How a table's ``(column, type)`` list differs from what this code writes; ``""`` when it does not.

    Examples
    --------
    >>> _column_changes("specs", [("a", "TEXT"), ("b", "REAL")], [("a", "TEXT"), ("b", "TEXT"), ("c", "TEXT")])
    'specs table without c, b REAL not TEXT'
    >>> _column_changes("specs", [], [("a", "TEXT")])
    'no specs table'
    """
    if actual == expected:
        return ""
    if not actual:
        return f"no {table} table"
    have, want = dict(actual), dict(expected)
    parts = []
    if missing := [name for name in want if name not in have]:
        parts.append(f"without {_names(missing)}")
    if extra := [name for name in have if name not in want]:
        parts.append(f"with {_names(extra)}")
    parts += [f"{name} {have[name] or 'untyped'} not {want[name]}" for name in want if name in have and have[name] != want[name]]
    return f"{table} table " + (", ".join(parts) if parts else "columns in another order")
