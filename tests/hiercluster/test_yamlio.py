"""hiercluster.yamlio: bounded YAML reading (size, value count, depth, aliases, one-line errors)."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
import yaml

import hiercluster.yamlio as yamlio
from hiercluster.errors import HierclusterError
from hiercluster.yamlio import load_yaml_text, read_yaml


def test_docstring_examples():
    assert doctest.testmod(yamlio).failed == 0


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _bomb(levels: int) -> str:
    """A "billion laughs" document: ``10**levels`` values once its aliases are expanded."""
    text = "l0: &l0 [a, a, a, a, a, a, a, a, a, a]\n"
    for i in range(1, levels):
        text += f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]\n"
    return text


# --- size, count and depth of a YAML text ---------------------------------------------


def test_the_value_count_cap_is_exact(monkeypatch):
    monkeypatch.setattr(yamlio, "MAX_CONFIG_NODES", 6)
    # top mapping, key, list, 3 items = 6 values
    assert load_yaml_text("a: [1, 2, 3]", "x") == {"a": [1, 2, 3]}
    with pytest.raises(HierclusterError, match=r"x holds more than 6 values .* at a\[3\]"):
        load_yaml_text("a: [1, 2, 3, 4]", "x")


def test_an_alias_counts_its_whole_target_each_time(monkeypatch):
    text = "a: &a [1, 2, 3]\nb: [*a, *a, *a]\n"  # 1 + (1 + 4) + (1 + 1 + 3 * 4) = 20 values expanded
    monkeypatch.setattr(yamlio, "MAX_CONFIG_NODES", 20)
    assert load_yaml_text(text, "x")["b"][2] == [1, 2, 3]
    monkeypatch.setattr(yamlio, "MAX_CONFIG_NODES", 19)
    with pytest.raises(HierclusterError, match=r"at b\[2\]"):
        load_yaml_text(text, "x")


def test_a_billion_laughs_file_is_refused_at_once_naming_file_and_key(tmp_path):
    path = _write(tmp_path, _bomb(9), "bomb.yaml")
    with pytest.raises(HierclusterError, match=r"YAML file .*bomb\.yaml holds more than 100,000 values .* at l4\["):
        read_yaml(path)


def test_a_large_flat_list_is_refused_by_count():
    with pytest.raises(HierclusterError, match="holds more than 100,000 values"):
        load_yaml_text("a: [" + ",".join(["1"] * 100_001) + "]", "big")


@pytest.mark.parametrize(
    "text, where",
    [("a: &a [1, *a]", r"a\[1\]"), ("a: &a {b: *a}", r"a\.b"), ("&top [[*top]]", r"\[0\]\[0\]")],
)
def test_a_value_that_contains_itself_is_refused(text, where):
    with pytest.raises(HierclusterError, match=f"the alias \\*\\w+ at {where} refers to a value that contains it"):
        load_yaml_text(text, "x")


def test_an_alias_to_a_finished_anchor_inside_a_list_is_fine():
    assert load_yaml_text("a: &a [1]\nb: [*a, [*a]]", "x")["b"] == [[1], [[1]]]


def test_nesting_deeper_than_the_cap_is_refused(monkeypatch):
    ok = "[" * yamlio.MAX_CONFIG_DEPTH + "]" * yamlio.MAX_CONFIG_DEPTH
    assert load_yaml_text(ok, "x") is not None
    deep = "[" * (yamlio.MAX_CONFIG_DEPTH + 1) + "]" * (yamlio.MAX_CONFIG_DEPTH + 1)
    with pytest.raises(HierclusterError, match="nests lists and mappings more than 32 levels deep"):
        load_yaml_text(deep, "x")


def test_an_alias_adds_its_targets_depth():
    inner = "[" * 20 + "]" * 20
    with pytest.raises(HierclusterError, match="more than 32 levels deep"):
        load_yaml_text(f"a: &a {inner}\nb: " + "[" * 15 + "*a" + "]" * 15, "x")


@pytest.mark.parametrize(
    "text, message",
    [
        ("a: [1, 2\nb: 3", r"x is not valid YAML: line 2, column 2: did not find expected ',' or '\]'"),
        ("a: *nope", "x is not valid YAML: line 1, column 4: found undefined alias"),
        ("a: 1\n---\nb: 2", "expected a single document"),
    ],
)
def test_invalid_yaml_is_one_line(text, message):
    with pytest.raises(HierclusterError, match=message) as info:
        load_yaml_text(text, "x")
    assert "\n" not in str(info.value)


def test_libyaml_is_used_when_pyyaml_has_it():
    assert yamlio._LOADER is getattr(yaml, "CSafeLoader", yaml.SafeLoader)
