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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from hiercluster import __version__
from hiercluster.errors import HierclusterError, short_repr
from hiercluster.run.records import SCHEMA_VERSION, LevelResult, SpecResult, nullable_columns, result_columns
from quant._files import write_text_atomic
from quant._validate import check_json

_T = TypeVar("_T")

# Column name -> SQLite type, in CSV order: generated from the records, never spelled here.
_COLUMN_TYPES: dict[str, str] = dict(result_columns())
RESULT_COLUMNS = list(_COLUMN_TYPES)
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
        if not self._check_schema_version():
            # A new database: its tables and its version in one transaction, so that a kill
            # in between never leaves tables without a version (which would be refused). An
            # existing one is not written to here: setting the version again rewrites the
            # file's header, and commands that only read must leave the file as it was.
            cols = ", ".join(f'"{c}" {t}' for c, t in _COLUMN_TYPES.items())
            self._con.execute("BEGIN IMMEDIATE")
            try:
                self._con.execute(f"CREATE TABLE results ({cols}, PRIMARY KEY (spec_key, level))")
                self._con.execute(
                    "CREATE TABLE specs (spec_key TEXT PRIMARY KEY, spec_json TEXT, plan_json TEXT, "
                    "prediction_share TEXT, layers TEXT)"
                )
                self._con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self._con.commit()
            except BaseException:
                self._con.rollback()
                raise
        # Reads every page once (cheap next to any run): damage is found before work that would need the file.
        first = self._con.execute("PRAGMA quick_check(1)").fetchone()
        if first is None or first[0] != "ok":
            raise self.damaged(first[0] if first else "its integrity check returned nothing")

    def _check_schema_version(self) -> bool:
        """True for a database of this schema version, False for a new (empty) one.

        A database written by code of another schema version is refused: its rows mean other things.
        """
        version = self._con.execute("PRAGMA user_version").fetchone()[0]
        has_tables = self._con.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0] > 0
        if version == SCHEMA_VERSION:
            return True
        if version == 0 and not has_tables:
            return False
        written = f"schema version {version}" if version else "an older hiercluster (no schema version)"
        raise HierclusterError(
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
        cols = ", ".join(f'"{c}"' for c in RESULT_COLUMNS)
        marks = ", ".join("?" for _ in RESULT_COLUMNS)
        with self._con:
            self._con.execute("DELETE FROM results WHERE spec_key = ?", (result.spec_key,))
            self._con.executemany(
                f"INSERT INTO results ({cols}) VALUES ({marks})",
                [[_plain(row[c]) for c in RESULT_COLUMNS] for row in result.rows()],
            )
            self._con.execute(
                "INSERT OR REPLACE INTO specs VALUES (?, ?, ?, ?, ?)",
                (
                    result.spec_key,
                    json.dumps(dict(result.spec_json)),
                    json.dumps(dict(result.plan_json)),
                    json.dumps([float(v) for v in result.prediction_share]),
                    json.dumps([dict(layer) for layer in result.layers], default=_plain),
                ),
            )

    @_guarded
    def results(self, keys: Iterable[str] | None = None, complete: bool = False) -> list[dict[str, Any]]:
        """Rows of ``results`` as dicts (only those of ``keys`` when given), in insertion order.

        Every value is checked against its column's type: a row edited by hand into nonsense
        is reported as damage here, not as a ``TypeError`` deep inside the report. With
        ``complete``, a missing value (NULL) where the records never hold one is damage too
        (a database of other code is refused when it is opened, so only a hand edit does that).
        """
        cur = self._con.execute("SELECT * FROM results ORDER BY rowid")
        names = [d[0] for d in cur.description]
        wanted = set(keys) if keys is not None else None
        rows = []
        for values in cur:
            row = dict(zip(names, values))
            if wanted is None or row["spec_key"] in wanted:
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
        row = self._con.execute("SELECT * FROM specs WHERE spec_key = ?", (key,)).fetchone()
        if row is None:
            return None
        where = f"the details of spec {short_repr(key, 30)}"
        try:
            details = {
                "spec_key": row[0],
                "spec": json.loads(row[1]),
                "plan": json.loads(row[2]),
                "prediction_share": json.loads(row[3]),
                "layers": json.loads(row[4]),
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
}
SPEC_DETAILS_SPEC: dict[str, Any] = {
    "spec": {"scheme": str, "bits": int},
    "plan": dict,
    "prediction_share": [float],
    "layers": [_LAYER_SPEC],
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


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars, so sqlite3 and json take them."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
