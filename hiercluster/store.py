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
import hashlib
import json
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hiercluster.errors import HierclusterError

# Column name -> SQLite type, in CSV order.
SPEC_COLUMNS: dict[str, str] = {
    "spec_key": "TEXT",
    "tag": "TEXT",
    "scheme": "TEXT",
    "bits": "INTEGER",
    "clipping": "TEXT",
    "granularity": "TEXT",
    "plan": "TEXT",
    "method": "TEXT",
    "bn_reestimate": "INTEGER",
    "activation_bits": "INTEGER",
    "avg_bits": "REAL",
    "fine_acc": "REAL",
    "fp32_bytes": "INTEGER",
    "packed_bytes": "INTEGER",
    "gzip_bytes": "INTEGER",
    "xz_bytes": "INTEGER",
    "quantize_s": "REAL",
    "eval_s": "REAL",
    "metrics_s": "REAL",
    "size_s": "REAL",
}
LEVEL_COLUMNS: dict[str, str] = {
    "level": "TEXT",
    "grouping": "TEXT",
    "k": "INTEGER",
    "fine_acc_float": "REAL",
    "fine_acc_quant": "REAL",
    "acc_float": "REAL",
    "acc_quant": "REAL",
    "drop": "REAL",
    "random_acc_float_mean": "REAL",
    "random_acc_float_std": "REAL",
    "random_acc_quant_mean": "REAL",
    "random_acc_quant_std": "REAL",
    "random_drop_mean": "REAL",
    "random_drop_std": "REAL",
    "advantage": "REAL",
}
RESULT_COLUMNS = list(SPEC_COLUMNS) + list(LEVEL_COLUMNS)


def method_label(method: str | None, bn_reestimate: Any = False) -> str:
    """How a spec's weights were rounded, as shown in tags and tables.

    ``None`` (a row of a store written before methods existed) reads as ``rtn``.

    Examples
    --------
    >>> method_label("gptq", True), method_label("rtn", 0), method_label(None)
    ('gptq+bn', 'rtn', 'rtn')
    """
    return (method or "rtn") + ("+bn" if bn_reestimate else "")


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


class ResultsStore:
    """The SQLite database of a run directory (``results.sqlite``).

    Examples
    --------
    >>> import tempfile, os
    >>> store = ResultsStore(os.path.join(tempfile.mkdtemp(), "results.sqlite"))
    >>> store.done_keys()
    set()
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._con = sqlite3.connect(self.path)
        cols = ", ".join(f'"{c}" {t}' for c, t in {**SPEC_COLUMNS, **LEVEL_COLUMNS}.items())
        try:
            with self._con:
                self._con.execute(f"CREATE TABLE IF NOT EXISTS results ({cols}, PRIMARY KEY (spec_key, level))")
                self._con.execute(
                    "CREATE TABLE IF NOT EXISTS specs (spec_key TEXT PRIMARY KEY, spec_json TEXT, plan_json TEXT, "
                    "prediction_share TEXT, layers TEXT)"
                )
                self._add_missing_columns()
            self._con.execute("SELECT spec_key FROM specs LIMIT 1").fetchall()
        except sqlite3.DatabaseError as exc:
            self._con.close()
            raise HierclusterError(
                f"results database {self.path} is damaged ({exc}); move it away and run again to recompute"
            ) from None

    def _add_missing_columns(self) -> None:
        """Give a database written by older code the columns added since (their old rows stay NULL there).

        Old rows are never read back for a current grid (the code version is part of every
        spec key), but the file must still open and take new rows.
        """
        have = {row[1] for row in self._con.execute("PRAGMA table_info(results)")}
        for name, sql_type in {**SPEC_COLUMNS, **LEVEL_COLUMNS}.items():
            if name not in have:
                self._con.execute(f'ALTER TABLE results ADD COLUMN "{name}" {sql_type}')

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def done_keys(self) -> set[str]:
        """Keys of the specs whose results are complete."""
        return {r[0] for r in self._con.execute("SELECT spec_key FROM specs")}

    def add_spec(
        self,
        spec_row: dict[str, Any],
        level_rows: Sequence[dict[str, Any]],
        spec_json: dict[str, Any],
        plan_json: dict[str, Any],
        prediction_share: Sequence[float],
        layers: Sequence[dict[str, Any]],
    ) -> None:
        """Write one finished spec: its level rows and its details, in one transaction."""
        key = spec_row["spec_key"]
        cols = ", ".join(f'"{c}"' for c in RESULT_COLUMNS)
        marks = ", ".join("?" for _ in RESULT_COLUMNS)
        with self._con:
            self._con.execute("DELETE FROM results WHERE spec_key = ?", (key,))
            self._con.executemany(
                f"INSERT INTO results ({cols}) VALUES ({marks})",
                [[_plain({**spec_row, **row}.get(c)) for c in RESULT_COLUMNS] for row in level_rows],
            )
            self._con.execute(
                "INSERT OR REPLACE INTO specs VALUES (?, ?, ?, ?, ?)",
                (key, json.dumps(spec_json), json.dumps(plan_json), json.dumps([float(v) for v in prediction_share]),
                 json.dumps(layers, default=_plain)),
            )

    def results(self, keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Rows of ``results`` as dicts (only those of ``keys`` when given), in insertion order."""
        cur = self._con.execute("SELECT * FROM results ORDER BY rowid")
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r)) for r in cur]
        if keys is not None:
            wanted = set(keys)
            rows = [r for r in rows if r["spec_key"] in wanted]
        return rows

    def spec_details(self, key: str) -> dict[str, Any] | None:
        """The ``specs`` row of ``key`` with its JSON decoded, or None."""
        row = self._con.execute("SELECT * FROM specs WHERE spec_key = ?", (key,)).fetchone()
        if row is None:
            return None
        return {
            "spec_key": row[0],
            "spec": json.loads(row[1]),
            "plan": json.loads(row[2]),
            "prediction_share": json.loads(row[3]),
            "layers": json.loads(row[4]),
        }

    def export_csv(self, path: str | Path, keys: Iterable[str] | None = None) -> Path:
        """Write ``results`` (optionally only ``keys``) to a CSV file with a header row."""
        path = Path(path)
        rows = self.results(keys)
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=RESULT_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        return path


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars, so sqlite3 and json take them."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
