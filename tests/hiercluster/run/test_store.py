"""The results store: damaged files are one clear error at whatever operation meets them; storage errors are not damage."""

from __future__ import annotations

import csv
import dataclasses
import sqlite3
from pathlib import Path

import pytest

from hiercluster.errors import HierclusterError
from hiercluster.run.records import SCHEMA_VERSION, LevelResult, SpecResult, detail_columns, result_columns
from hiercluster.run.store import RESULT_COLUMNS, ResultsStore, check_database


def _layer(**changes) -> dict:
    """One layer's statistics as the report reads them."""
    quartiles = ("min", "q1", "median", "q3", "max")
    layer = {"name": "fc", "bits": 4, **{f"{w}_{q}": 0.1 for w in ("before", "after") for q in quartiles}}
    layer.update(changes)
    return layer


def _level(i: int) -> LevelResult:
    """Level ``k=i``: every metric 0.5 (the store does not interpret them)."""
    metrics = {f.name: 0.5 for f in dataclasses.fields(LevelResult) if f.name not in ("level", "grouping", "k")}
    return LevelResult(level=f"k={i}", grouping="learned", k=i, **{**metrics, "group_sizes": f"{i}"})


def _spec(key: str, levels: int = 40, **changes) -> SpecResult:
    """One finished spec with enough level rows to fill several database pages."""
    result = SpecResult(
        spec_key=key, tag=key, scheme="asymmetric", bits=4, clipping="minmax", granularity="per_channel", plan="full",
        method="rtn", bn_reestimate=False, activation_bits=8, avg_bits=4.0, fine_acc=0.5, fine_acc_lo=None, fine_acc_hi=None, fine_drop_lo=None, fine_drop_hi=None, logits_digest="0123abcd", fp32_bytes=4000,
        packed_bytes=500, gzip_bytes=450, xz_bytes=400, quantize_s=0.1, eval_s=0.2, metrics_s=0.3, size_s=0.4,
        levels=tuple(_level(i) for i in range(levels)),
        spec_json={"scheme": "asymmetric", "bits": 4},
        plan_json={"name": "full"},
        prediction_share=(0.5, 0.5),
        layers=(_layer(),),
    )
    return dataclasses.replace(result, **changes)


@pytest.fixture()
def db(tmp_path) -> Path:
    path = tmp_path / "results.sqlite"
    with ResultsStore(path) as store:
        for i in range(5):
            store.add_spec(_spec(f"s{i}"))
    return path


def _damage_page(path: Path, table: str = "results") -> None:
    """Overwrite the start of ``table``'s root b-tree page (a data page, not the file header)."""
    with sqlite3.connect(path) as con:
        root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
        size = con.execute("PRAGMA page_size").fetchone()[0]
    con.close()
    assert root > 1
    with open(path, "r+b") as fh:
        fh.seek((root - 1) * size)
        fh.write(b"\xff" * 64)


def _bump_change_counter(path: Path) -> None:
    """What another writer does to the header: an open connection then drops its page cache."""
    with open(path, "r+b") as fh:
        fh.seek(24)
        counter = int.from_bytes(fh.read(4), "big")
        fh.seek(24)
        fh.write((counter + 1).to_bytes(4, "big"))


def test_damaged_pages_found_at_open(db):
    _damage_page(db)
    with pytest.raises(HierclusterError, match=rf"results database {db} is damaged \(Page \d+: .*\); move it away"):
        ResultsStore(db)
    with pytest.raises(HierclusterError, match="is damaged"):
        check_database(db)


def test_damage_met_by_a_query_after_open_is_one_clear_error(db):
    store = ResultsStore(db)
    assert len(store.results()) == 5 * 40
    _damage_page(db)
    _bump_change_counter(db)
    with pytest.raises(HierclusterError, match=r"is damaged \(database disk image is malformed\)"):
        store.results()
    store.close()


def test_a_file_that_is_not_a_database(tmp_path):
    (tmp_path / "results.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(HierclusterError, match="is damaged \\(file is not a database\\)"):
        ResultsStore(tmp_path / "results.sqlite")


def test_a_folder_is_refused(tmp_path):
    (tmp_path / "results.sqlite").mkdir()
    with pytest.raises(HierclusterError, match="results.sqlite is a folder, not a file"):
        ResultsStore(tmp_path / "results.sqlite")


def test_a_full_disk_is_not_called_damage(db):
    store = ResultsStore(db)
    pages = store._con.execute("PRAGMA page_count").fetchone()[0]
    store._con.execute(f"PRAGMA max_page_count = {pages}")  # the database cannot grow: SQLite's "disk is full"
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
        store.add_spec(_spec("big", levels=400))
    store.close()
    with ResultsStore(db) as again:  # nothing was lost
        assert len(again.done_keys()) == 5


def test_a_read_only_database_is_not_called_damage(db):
    store = ResultsStore(db)
    store._con.close()
    store._con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)  # as a read-only file or folder opens
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        store.add_spec(_spec("new"))
    store.close()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_database_deleted_or_replaced_while_open_is_never_written(db, how):
    store = ResultsStore(db)
    db.unlink()
    if how == "replaced":
        ResultsStore(db).close()
    with pytest.raises(HierclusterError, match=f"results database {db} was deleted or replaced while this command ran"):
        store.add_spec(_spec("new"))
    store.close()


def test_values_of_the_wrong_type_are_damage(db):
    with sqlite3.connect(db) as con:
        con.execute("UPDATE results SET fine_acc = 'high' WHERE spec_key = 's3'")
        con.execute("UPDATE specs SET layers = '{not json' WHERE spec_key = 's1'")
    con.close()
    with ResultsStore(db) as store:
        assert len(store.results(["s0"])) == 40  # other specs' rows are not read
        with pytest.raises(HierclusterError, match="damaged \\(the fine_acc of spec 's3' is 'high', not real\\)"):
            store.results()
        with pytest.raises(HierclusterError, match="damaged \\(the details of spec 's1' are not JSON\\)"):
            store.spec_details("s1")


def test_details_read_back_as_written(tmp_path):
    with ResultsStore(tmp_path / "results.sqlite") as store:
        store.add_spec(_spec("s", holdout={"fine": 1.5, "k=2 confusion": 0.25}))
        details = store.spec_details("s", n_classes=2)
        assert details["prediction_share"] == [0.5, 0.5] and details["layers"] == [_layer()]
        assert details["holdout"] == {"fine": 1.5, "k=2 confusion": 0.25}
        assert store.spec_details("missing") is None


@pytest.mark.parametrize(
    "column, text, message",
    [
        ("prediction_share", '{"a": 1}', "prediction_share: expected a list of a number, got {'a': 1}"),
        ("prediction_share", '["high", 0.5]', r"prediction_share\[0\]: expected a number, got 'high'"),
        ("layers", "[1, 2]", r"layers\[0\]: expected an object, got 1"),
        ("layers", '[{"name": "fc"}]', r"layers\[0\]: the key 'bits' is missing"),
        ("spec_json", '"4-bit"', "spec: expected an object, got '4-bit'"),
        ("spec_json", '{"scheme": "asymmetric", "bits": null}', "spec.bits: expected an integer, got None"),
        ("plan_json", "[]", "plan: expected dict, got"),
    ],
)
def test_details_of_the_wrong_shape_are_damage(tmp_path, column, text, message):
    db = tmp_path / "results.sqlite"
    with ResultsStore(db) as store:
        store.add_spec(_spec("s"))
    with sqlite3.connect(db) as con:
        con.execute(f"UPDATE specs SET {column} = ?", (text,))
    con.close()
    with ResultsStore(db) as store, pytest.raises(HierclusterError, match=rf"is damaged \(the details of spec 's': {message}"):
        store.spec_details("s")


def test_a_prediction_share_per_another_class_count_is_damage(db):
    with ResultsStore(db) as store:
        with pytest.raises(HierclusterError, match=r"prediction_share has 2 values for 10 classes\)"):
            store.spec_details("s0", n_classes=10)


def test_a_missing_value_is_damage_only_where_this_code_writes_one(db):
    with sqlite3.connect(db) as con:
        con.execute("UPDATE results SET \"drop\" = NULL WHERE spec_key = 's2'")
        con.execute("UPDATE results SET activation_bits = NULL")
    con.close()
    with ResultsStore(db) as store:
        assert len(store.results(["s1"], complete=True)) == 40  # activation_bits may be NULL
        assert len(store.results(["s2"])) == 40  # rows of older code are read as they are
        with pytest.raises(HierclusterError, match=r"damaged \(the drop of spec 's2' is missing\)"):
            store.results(["s2"], complete=True)


def test_a_missing_method_is_damage_in_a_complete_read(db):
    # method and bn_reestimate are always written now: NULL there is not a row of older code
    for column, key in (("method", "s3"), ("bn_reestimate", "s4")):
        with sqlite3.connect(db) as con:
            con.execute(f"UPDATE results SET {column} = NULL WHERE spec_key = ?", (key,))
        con.close()
        with ResultsStore(db) as store, pytest.raises(HierclusterError, match=rf"the {column} of spec '{key}' is missing"):
            store.results([key], complete=True)


# --- rows written from typed records ----------------------------------------------------


def test_rows_read_back_as_the_record_wrote_them(tmp_path):
    result = _spec("s", levels=3, method="gptq", bn_reestimate=True, activation_bits=None, xz_bytes=None)
    with ResultsStore(tmp_path / "results.sqlite") as store:
        store.add_spec(result)
        rows = store.results(complete=True)
        store.export_csv(tmp_path / "r.csv")
    assert [r["level"] for r in rows] == ["k=0", "k=1", "k=2"]
    # Each row is the spec's fields then the level's, by hand from the record.
    first = rows[0]
    assert first["spec_key"] == "s" and first["method"] == "gptq" and first["bn_reestimate"] == 1
    assert first["activation_bits"] is None and first["xz_bytes"] is None and first["packed_bytes"] == 500
    assert first["k"] == 0 and first["grouping"] == "learned" and first["advantage"] == 0.5
    assert list(first) == RESULT_COLUMNS
    with open(tmp_path / "r.csv", newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0] == RESULT_COLUMNS and len(table) == 4
    assert dict(zip(table[0], table[2]))["level"] == "k=1"


def test_rewriting_a_spec_replaces_its_rows(tmp_path):
    with ResultsStore(tmp_path / "results.sqlite") as store:
        store.add_spec(_spec("s", levels=3))
        store.add_spec(_spec("s", levels=2, fine_acc=0.75))
        rows = store.results()
    assert [r["level"] for r in rows] == ["k=0", "k=1"] and {r["fine_acc"] for r in rows} == {0.75}


# --- schema version ---------------------------------------------------------------------


def _user_version(path: Path) -> int:
    con = sqlite3.connect(path)
    try:
        return con.execute("PRAGMA user_version").fetchone()[0]
    finally:
        con.close()


def test_an_empty_file_becomes_a_database_of_this_version(tmp_path):
    (tmp_path / "results.sqlite").write_bytes(b"")
    ResultsStore(tmp_path / "results.sqlite").close()
    assert _user_version(tmp_path / "results.sqlite") == SCHEMA_VERSION


def _refusal(path: Path) -> str:
    """The message that tells how to rebuild ``path`` (what the store says and the CLI prints)."""
    return (
        rf"results database {path} was written by .*; this hiercluster \S+ reads schema version {SCHEMA_VERSION}\. "
        rf"Rebuild it: move the file away \(mv {path} {path}\.old\) and run `hiercluster run CONFIG --out {path.parent}` "
        "again; the finished specs are recomputed"
    )


def test_an_old_database_without_a_version_is_refused_not_migrated(tmp_path):
    # What code before the typed records wrote: no user_version, no method/bn_reestimate columns.
    db = tmp_path / "results.sqlite"
    old_columns = [c for c in RESULT_COLUMNS if c not in ("method", "bn_reestimate")]
    with sqlite3.connect(db) as con:
        con.execute(f"CREATE TABLE results ({', '.join(map(repr, old_columns))}, PRIMARY KEY (spec_key, level))")
        con.execute("CREATE TABLE specs (spec_key TEXT PRIMARY KEY, spec_json TEXT, plan_json TEXT, "
                    "prediction_share TEXT, layers TEXT)")
        con.execute("INSERT INTO results (spec_key, level, bits) VALUES ('old', 'k=2', 4)")
    con.close()
    with pytest.raises(HierclusterError, match=_refusal(db)) as err:
        ResultsStore(db)
    assert "written by an older hiercluster (no schema version)" in str(err.value)
    with sqlite3.connect(db) as con:
        names = [r[1] for r in con.execute("PRAGMA table_info(results)")]
        assert _user_version(db) == 0
    con.close()
    assert names == old_columns  # no column added


def test_opening_a_database_changes_no_byte_of_it(db):
    # report and refused commands open the store to read: the file must stay as it was
    before = db.read_bytes()
    with ResultsStore(db) as store:
        store.results()
    check_database(db)
    assert db.read_bytes() == before


# --- row order: the keys', not the finishing order ------------------------------------------


def _tied(key: str) -> SpecResult:
    """A spec whose every level has the same bits and drop as any other ``_tied`` spec: only the row order decides."""
    levels = tuple(dataclasses.replace(_level(k), level=f"k={k}", drop=0.25) for k in (10, 2, 5))  # not in name order
    return dataclasses.replace(_spec(key, levels=0), levels=levels)


@pytest.mark.parametrize("finished", [["a", "b"], ["b", "a"]])
def test_rows_come_in_the_order_of_the_keys_whatever_order_the_specs_finished_in(tmp_path, finished):
    # Under Ray, specs are written in the order they finish; the headline breaks ties by the earlier row.
    from hiercluster.evaluation.metrics import headline

    db = tmp_path / "results.sqlite"
    with ResultsStore(db) as store:
        for key in finished:
            store.add_spec(_tied(key))
        rows = store.results(["a", "b"], complete=True)
        store.export_csv(tmp_path / "r.csv", ["a", "b"])
    assert [(r["spec_key"], r["level"]) for r in rows] == [
        (key, level) for key in "ab" for level in ("k=10", "k=2", "k=5")  # each spec's levels as written
    ]
    assert {t["level"]: t["winner"]["spec_key"] for t in headline(rows, 1.0)} == {"k=10": "a", "k=2": "a", "k=5": "a"}
    with open(tmp_path / "r.csv", newline="") as fh:
        table = list(csv.reader(fh))
    assert [row[0] for row in table[1:]] == ["a"] * 3 + ["b"] * 3


def test_the_csv_is_the_same_whichever_spec_finished_first(tmp_path):
    texts = []
    for order in (["a", "b"], ["b", "a"]):
        folder = tmp_path / "".join(order)
        with ResultsStore(folder / "results.sqlite") as store:
            for key in order:
                store.add_spec(_tied(key))
            texts.append(store.export_csv(folder / "results.csv", ["a", "b"]).read_bytes())
    assert texts[0] == texts[1]


def test_keys_given_twice_or_unknown_give_each_spec_once(db):
    with ResultsStore(db) as store:
        rows = store.results(["s3", "s1", "s3", "nowhere"])
    assert [r["spec_key"] for r in rows] == ["s3"] * 40 + ["s1"] * 40


# --- the schema the file holds must be the one this code writes ---------------------------


def _drift(db: Path, *statements: str) -> None:
    with sqlite3.connect(db) as con:
        for statement in statements:
            con.execute(statement)
    con.close()


@pytest.mark.parametrize(
    "statements, words",
    [
        (["ALTER TABLE results DROP COLUMN xz_bytes"], "results table without xz_bytes"),
        (["ALTER TABLE results ADD COLUMN ece REAL"], "results table with ece"),
        (["ALTER TABLE specs ADD COLUMN calibration_json TEXT"], "specs table with calibration_json"),
        (["ALTER TABLE specs DROP COLUMN layers"], "specs table without layers"),
        (["DROP TABLE specs"], "no specs table"),
        (["ALTER TABLE results RENAME COLUMN advantage TO gain"], "results table without advantage, with gain"),
    ],
)
def test_a_database_of_this_version_with_other_columns_is_refused_with_the_rebuild_command(db, statements, words):
    # A record field added, removed or renamed without bumping SCHEMA_VERSION: the rows would not mean what they say.
    _drift(db, *statements)
    before = db.read_bytes()
    with pytest.raises(HierclusterError, match=_refusal(db)) as err:
        ResultsStore(db)
    assert f"written by code of schema version {SCHEMA_VERSION} with other columns ({words}" in str(err.value)
    assert db.read_bytes() == before


def test_a_column_of_another_type_is_refused(tmp_path):
    db = tmp_path / "results.sqlite"
    columns = [f'"{name}" {"TEXT" if name == "bits" else sql_type}' for name, sql_type in result_columns()]
    specs = ", ".join(f'"{name}" {sql_type}' for name, sql_type in detail_columns())
    _drift(
        db, f"CREATE TABLE results ({', '.join(columns)}, PRIMARY KEY (spec_key, level))",
        f"CREATE TABLE specs ({specs}, PRIMARY KEY (spec_key))", f"PRAGMA user_version = {SCHEMA_VERSION}",
    )
    with pytest.raises(HierclusterError, match=r"with other columns \(results table bits TEXT not INTEGER\)"):
        ResultsStore(db)


def test_the_tables_hold_the_columns_of_the_records(tmp_path):
    db = tmp_path / "results.sqlite"
    with ResultsStore(db) as store:
        store.add_spec(_spec("s", packed_model=b"\x00PACKED-MODEL-BYTES\x00"))
    con = sqlite3.connect(db)
    tables = {name: [(r[1], r[2]) for r in con.execute(f"PRAGMA table_info({name})")] for name in ("results", "specs")}
    con.close()
    # The specs table by hand from the brief: SpecResult's fields that are neither columns of results, nor
    # the level rows, nor the packed model (never stored).
    others = [f.name for f in dataclasses.fields(SpecResult) if f.name not in RESULT_COLUMNS]
    assert others == ["levels", "spec_json", "plan_json", "prediction_share", "layers", "holdout", "packed_model"]
    assert tables["specs"] == [("spec_key", "TEXT")] + [(name, "TEXT") for name in others[1:-1]]
    assert tables["results"] == result_columns()
    assert b"PACKED-MODEL-BYTES" not in db.read_bytes()


def test_details_of_numpy_values_and_read_only_mappings_read_back_as_plain_json(tmp_path):
    import types

    import numpy as np

    result = _spec(
        "s", spec_json=types.MappingProxyType({"scheme": "asymmetric", "bits": np.int64(4)}),
        prediction_share=(np.float32(0.25), np.float64(0.75)), layers=(_layer(after_max=np.float32(0.5)),),
    )
    with ResultsStore(tmp_path / "results.sqlite") as store:
        store.add_spec(result)
        details = store.spec_details("s", n_classes=2)
    assert details == {
        "spec_key": "s", "spec": {"scheme": "asymmetric", "bits": 4}, "plan": {"name": "full"},
        "prediction_share": [0.25, 0.75], "layers": [_layer(after_max=0.5)], "holdout": {},
    }


# --- two processes creating one new database -------------------------------------------------


def test_a_database_created_by_another_opener_meanwhile_is_not_called_damage(tmp_path, monkeypatch):
    # Library use without the run's lock: both openers find an empty file, the other one creates the
    # tables first. The second must find them once it holds the write lock, not fail on CREATE TABLE.
    db = tmp_path / "results.sqlite"
    real = ResultsStore._check_schema
    calls = []

    def racing(self):
        found = real(self)
        calls.append(found)
        if len(calls) == 1:  # between our first look and our write lock, the other opener wins
            monkeypatch.setattr(ResultsStore, "_check_schema", real)
            with ResultsStore(db) as other:
                other.add_spec(_spec("theirs", levels=2))
            monkeypatch.setattr(ResultsStore, "_check_schema", racing)
        return found

    monkeypatch.setattr(ResultsStore, "_check_schema", racing)
    with ResultsStore(db) as store:
        assert calls == [False, True]  # checked again under the lock, and found the other's database
        assert store.done_keys() == {"theirs"}
        store.add_spec(_spec("ours", levels=2))
    assert _user_version(db) == SCHEMA_VERSION


def test_the_module_examples_hold():
    import doctest

    import hiercluster.run.store as store_module

    assert doctest.testmod(store_module).failed == 0
