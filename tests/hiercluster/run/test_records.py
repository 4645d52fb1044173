"""Typed records: the store's schema comes from them, and a wrong key or version is refused."""

from __future__ import annotations

import dataclasses
import doctest
import hashlib
import sqlite3

import pytest

from hiercluster.errors import HierclusterError
from hiercluster.run.records import (
    RUN_WIDE_METRIC_KEYS,
    SCHEMA_VERSION,
    Level,
    LevelResult,
    SpecResult,
    build_record,
    detail_columns,
    nullable_columns,
    result_columns,
    sql_columns,
)
from hiercluster.run.store import RESULT_COLUMNS, ResultsStore


def _level_result(level: str = "k=2", **changes) -> LevelResult:
    values = {f.name: 0.5 for f in dataclasses.fields(LevelResult)}
    values.update({"level": level, "grouping": "learned", "k": 2, "group_sizes": "1+1", **changes})
    return LevelResult(**values)


def _spec_result(key: str = "abc", levels=None, **changes) -> SpecResult:
    values = dict(
        spec_key=key, tag="asymmetric-4b", scheme="asymmetric", bits=4, clipping="minmax", granularity="per_channel",
        plan="full", method="rtn", bn_reestimate=False, activation_bits=None, avg_bits=4.0, fine_acc=0.9,
        fine_acc_lo=None, fine_acc_hi=None, fine_drop_lo=None, fine_drop_hi=None, logits_digest="0123abcd",
        fp32_bytes=400, packed_bytes=60, gzip_bytes=55, xz_bytes=None, quantize_s=0.1, eval_s=0.2, metrics_s=0.01,
        size_s=0.02, levels=tuple(levels or [_level_result("k=2"), _level_result("k=3", k=3)]),
        spec_json={"scheme": "asymmetric", "bits": 4}, plan_json={}, prediction_share=(0.5, 0.5),
        layers=(),
    )
    values.update(changes)
    return SpecResult(**values)


def test_the_schema_is_generated_from_the_records():
    names = [f.name for f in dataclasses.fields(SpecResult)] + [f.name for f in dataclasses.fields(LevelResult)]
    not_columns = {"levels", "spec_json", "plan_json", "prediction_share", "layers", "holdout", "packed_model"}
    assert RESULT_COLUMNS == [n for n in names if n not in not_columns]
    assert dict(sql_columns(LevelResult))["k"] == "INTEGER"
    assert dict(sql_columns(LevelResult))["drop"] == "REAL"
    assert dict(sql_columns(SpecResult))["tag"] == "TEXT"
    assert dict(sql_columns(SpecResult))["bn_reestimate"] == "INTEGER"
    assert nullable_columns(SpecResult) == {
        "activation_bits", "xz_bytes", "fine_acc_lo", "fine_acc_hi", "fine_drop_lo", "fine_drop_hi"
    }
    assert nullable_columns(LevelResult) == {
        "drop_lo", "drop_hi", "advantage_lo", "advantage_hi", "absorbed_share", "random_absorbed_share_mean"
    }


def test_the_schema_version_is_pinned_to_the_columns():
    # Bump SCHEMA_VERSION when this changes, then pin the new digest and version here together: a database
    # of the old columns is refused as another version, with the command that rebuilds it.
    digest = hashlib.sha256(str(result_columns()).encode()).hexdigest()
    assert (SCHEMA_VERSION, digest) == (5, "965b0d00754315b5fe60893eb22f948634f2f99b9123f9b6cd53ff33fd5adea0")
    assert detail_columns() == [
        ("spec_key", "TEXT"), ("spec_json", "TEXT"), ("plan_json", "TEXT"), ("prediction_share", "TEXT"), ("layers", "TEXT"),
        ("holdout", "TEXT"),
    ]


def test_a_level_field_named_like_a_spec_field_is_refused():
    # dict(result_columns()) would keep one "tag" column, and each row the level's value under it.
    @dataclasses.dataclass(frozen=True)
    class Clash(LevelResult):
        tag: str = ""
        bits: int = 0

    with pytest.raises(TypeError, match="SpecResult and Clash both have the fields bits, tag"):
        result_columns(SpecResult, Clash)
    assert [name for name, _ in result_columns()] == RESULT_COLUMNS  # the real records have no clash


def test_the_module_examples_hold():
    from hiercluster.run import records

    assert doctest.testmod(records).failed == 0


def test_a_new_field_becomes_a_column():
    @dataclasses.dataclass(frozen=True)
    class Extended(LevelResult):
        ece: float = 0.0

    assert sql_columns(Extended)[-1] == ("ece", "REAL")


def test_the_database_columns_are_the_records(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as store:
        store.add_spec(_spec_result())
        rows = store.results(complete=True)
    con = sqlite3.connect(tmp_path / "r.sqlite")
    declared = [(r[1], r[2]) for r in con.execute("PRAGMA table_info(results)")]
    con.close()
    assert declared == result_columns()
    assert [r["level"] for r in rows] == ["k=2", "k=3"]
    assert rows[0]["xz_bytes"] is None and rows[0]["bn_reestimate"] == 0 and rows[1]["k"] == 3


@pytest.mark.parametrize("change, words", [
    ({"renamed_drop": 1.0}, "unknown key renamed_drop"),
    ({"drop": None, "__delete__": "drop"}, "missing key drop"),
])
def test_an_unknown_or_missing_key_is_refused(change, words):
    values = {f.name: 0.5 for f in dataclasses.fields(LevelResult)} | {"level": "k=2", "grouping": "learned", "k": 2}
    delete = change.pop("__delete__", None)
    values.update(change)
    if delete:
        del values[delete]
    with pytest.raises(HierclusterError, match=words) as info:
        build_record(LevelResult, values, "level k=2")
    assert "level k=2" in str(info.value) and "LevelResult" in str(info.value)


def test_run_wide_metric_keys_are_dropped_only_when_named():
    values = {f.name: 0.5 for f in dataclasses.fields(LevelResult)} | {"level": "k=2", "grouping": "learned", "k": 2}
    values |= {"reduction": "prob_sum", "n_random": 20}
    with pytest.raises(HierclusterError, match="unknown keys n_random, reduction"):
        build_record(LevelResult, values, "level k=2")
    assert build_record(LevelResult, values, "level k=2", ignore=RUN_WIDE_METRIC_KEYS).k == 2


def test_the_store_takes_only_a_spec_result(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as store, pytest.raises(TypeError, match="SpecResult"):
        store.add_spec({"spec_key": "abc"})


def test_the_database_holds_its_schema_version(tmp_path):
    ResultsStore(tmp_path / "r.sqlite").close()
    con = sqlite3.connect(tmp_path / "r.sqlite")
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    con.close()


@pytest.mark.parametrize("version", [SCHEMA_VERSION - 1, SCHEMA_VERSION + 1, 0])
def test_a_database_of_another_version_is_refused_with_the_rebuild_command(tmp_path, version):
    path = tmp_path / "results.sqlite"
    con = sqlite3.connect(path)
    con.execute('CREATE TABLE results ("spec_key" TEXT, "level" TEXT)')
    con.execute(f"PRAGMA user_version = {version}")
    con.commit()
    con.close()
    before = path.read_bytes()
    with pytest.raises(HierclusterError) as info:
        ResultsStore(path)
    message = str(info.value)
    assert f"reads schema version {SCHEMA_VERSION}" in message
    assert f"mv {path} {path}.old" in message and "hiercluster run CONFIG --out" in message
    assert (f"schema version {version}" if version else "no schema version") in message
    assert path.read_bytes() == before  # nothing rewritten


def test_level_records_check_themselves():
    level = Level.of("k=2", [0, 1, 0], ["a", "b"], "learned")
    assert level.k == 2 and level.array.tolist() == [0, 1, 0] and level.to_json()["names"] == ["a", "b"]
    with pytest.raises(HierclusterError, match="kind 'other'"):
        Level.of("k=2", [0, 1, 0], ["a", "b"], "other")
    with pytest.raises(HierclusterError, match="1 names and 2 groups"):
        Level.of("k=2", [0, 1, 0], ["a"], "learned")
    with pytest.raises(dataclasses.FrozenInstanceError):
        level.k = 3
