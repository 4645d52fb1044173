"""Checks shared by the frozen configs: each failure names the field, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def one_of(owner: str, field: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{owner}.{field}={value!r} is invalid; allowed: {', '.join(map(repr, allowed))}")


def int_in(owner: str, field: str, value: Any, lo: int, hi: int) -> None:
    # bool is an int subclass; True as a bit width is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{owner}.{field}={value!r} is invalid; allowed: an integer in [{lo}, {hi}]")


def boolean(owner: str, field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{field}={value!r} is invalid; allowed: True or False")


def number_in(owner: str, field: str, value: Any, lo: float, hi: float, *, lo_open: bool, hi_open: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        number = float(value)
        ok = (number > lo if lo_open else number >= lo) and (number < hi if hi_open else number <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{owner}.{field}={value!r} is invalid; allowed: a number in {interval}")
    return number


def known_keys(owner: str, data: Mapping[str, Any], valid: Iterable[str]) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{owner}.from_dict expects a mapping, got {type(data).__name__}")
    valid = tuple(valid)
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise ValueError(f"{owner}: unknown key {unknown[0]!r}; valid keys: {', '.join(valid)}")
