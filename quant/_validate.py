"""Checks shared by the frozen configs: each failure names the field, the value and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any


def one_of(owner: str, field: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{owner}.{field}={short_repr(value)} is invalid; allowed: {', '.join(map(repr, allowed))}")


def int_in(owner: str, field: str, value: Any, lo: int, hi: int) -> None:
    # bool is an int subclass; True as a bit width is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{owner}.{field}={short_repr(value)} is invalid; allowed: an integer in [{lo}, {hi}]")


def boolean(owner: str, field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{field}={short_repr(value)} is invalid; allowed: True or False")


def number_in(owner: str, field: str, value: Any, lo: float, hi: float, *, lo_open: bool, hi_open: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        number = float(value)
        ok = (number > lo if lo_open else number >= lo) and (number < hi if hi_open else number <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{owner}.{field}={short_repr(value)} is invalid; allowed: a number in {interval}")
    return number


def known_keys(owner: str, data: Mapping[str, Any], valid: Iterable[str]) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{owner}.from_dict expects a mapping, got {type(data).__name__}")
    valid = tuple(valid)
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise ValueError(f"{owner}: unknown key {short_repr(unknown[0])}; valid keys: {', '.join(valid)}")


def _describe(spec: Any) -> str:
    if isinstance(spec, tuple):
        return " or ".join(_describe(s) for s in spec)
    if isinstance(spec, list):
        return f"a list of {_describe(spec[0])}" if spec else "a list"
    if isinstance(spec, dict):
        return "an object"
    if spec is None or spec is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(spec, spec.__name__)


def _matches_type(value: Any, tp: type) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # JSON true is not a count or a size
        return False
    if tp is float:
        return isinstance(value, (int, float))
    return isinstance(value, tp)


def check_json(value: Any, spec: Any, where: str, error: type[Exception] = ValueError) -> None:
    """Check decoded JSON (or YAML) ``value`` against a small shape ``spec``; raise ``error`` naming the place.

    ``spec`` is a type (``int``, ``float`` also taking ints, ``str``, ``bool``, ``dict``, ``list``;
    ``bool`` is never an ``int`` here), ``None`` (null), a tuple of alternatives, ``[item_spec]``
    (a list whose every item matches), or ``{key: spec}`` (an object with those keys; a key
    ending in ``?`` may be absent; other keys are allowed). The message is one line: where,
    what was expected, and the start of what was found.

    Examples
    --------
    >>> check_json({"bits": 4, "shape": [3, 2]}, {"bits": int, "shape": [int], "note?": str}, "entry")
    >>> check_json({"bits": "4"}, {"bits": int}, "entry")
    Traceback (most recent call last):
    ...
    ValueError: entry.bits: expected an integer, got '4'
    """
    if isinstance(spec, tuple):
        for alternative in spec:
            try:
                check_json(value, alternative, where, error)
                return
            except error:
                continue
        _fail(value, spec, where, error)
    elif spec is None or spec is type(None):
        if value is not None:
            _fail(value, spec, where, error)
    elif isinstance(spec, list):
        if not isinstance(value, list):
            _fail(value, spec, where, error)
        if spec:
            for i, item in enumerate(value):
                check_json(item, spec[0], f"{where}[{i}]", error)
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            _fail(value, spec, where, error)
        for key, sub in spec.items():
            name = key[:-1] if key.endswith("?") else key
            if name not in value:
                if key.endswith("?"):
                    continue
                raise error(f"{where}: the key {short_repr(name)} is missing")
            check_json(value[name], sub, f"{where}.{name}", error)
    elif not _matches_type(value, spec):
        _fail(value, spec, where, error)


def _fail(value: Any, spec: Any, where: str, error: type[Exception]) -> None:
    raise error(f"{where}: expected {_describe(spec)}, got {short_repr(value)}")


# The largest integer a message quotes (about 30 digits, far above any real setting); a larger
# one is described by its size: repr() of one over 4,300 digits raises (Python's guard against
# quadratic conversion), and a long run of digits says nothing more to the reader.
_MAX_INT_BITS = 100


def short_repr(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about user values.

    A value can be huge (a YAML alias bomb expands to millions of items, a hex literal
    to thousands of digits); an error message quotes only its start. Containers are cut
    before ``repr`` walks them, a huge integer is described by its number of digits,
    and a value whose ``repr`` fails is named by its type.

    Examples
    --------
    >>> short_repr(list(range(100)), 20)
    '[0, 1, 2, 3, 4, 5...'
    >>> short_repr(16 ** 4000)
    '<an integer of about 4,817 digits>'
    """
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        # bits * log10(2) is the digit count to within one; computing it exactly costs as much as repr
        return f"<an integer of about {int(value.bit_length() * math.log10(2)) + 1:,} digits>"
    if isinstance(value, (list, tuple, dict, set, frozenset)) and len(value) > limit:
        value = list(value)[:limit] if not isinstance(value, dict) else dict(list(value.items())[:limit])
    if isinstance(value, (str, bytes)) and len(value) > limit:
        value = value[:limit]  # repr of the start only: a 100 MB string is not copied to be cut
    try:
        text = repr(value)
    except (ValueError, RecursionError, MemoryError):  # a nested huge integer, or nesting deeper than the stack
        return f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
