"""Bounded YAML reading: configs and grouping files, safe_load rules, size and alias-bomb limits."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hiercluster.errors import HierclusterError, read_text, short_repr

# The largest YAML text read (a config, a grouping file, one --set value). The shipped
# configs are under 5 KB and a grouping of ImageNet's 1,000 classes is about 30 KB; 1 MiB
# is 30x that, and libyaml parses it in well under a second.
MAX_CONFIG_BYTES = 1024 * 1024
# The most values (scalars, lists and mappings, each alias counted as its whole target)
# one YAML text may build. A real config has a few hundred, a 1,000-class grouping a few
# thousand; an alias bomb ("billion laughs") has millions to billions.
MAX_CONFIG_NODES = 100_000
# The deepest nesting of lists and mappings: a config nests 5 levels at most
# (quant.methods[0].bits[0]). Beyond this, repr and the pure-Python loader recurse deeply.
MAX_CONFIG_DEPTH = 32


# libyaml's loader when PyYAML was built with it: about 7x faster than the pure-Python one.
_LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class _Open:
    """A list or mapping being read by :func:`_check_yaml_bounds`."""

    anchor: str | None
    mapping: bool
    first_node: int  # the node count when it opened: its expanded size is the count at its end minus this
    children: int = 0
    key: str = "?"  # a mapping's latest key
    height: int = 1


def _where_in(stack: list[_Open]) -> str:
    """The key path of the node being read (``quant.bits[3]``), for messages."""
    path = ""
    for frame in stack:
        if frame.mapping:
            path += ("." if path else "") + short_repr(frame.key, 30).strip("'")
        else:
            path += f"[{frame.children}]"
    return (path if len(path) <= 60 else "..." + path[-57:]) or "(top level)"


def _check_yaml_bounds(text: str, where: str) -> None:
    """Refuse ``text`` if it builds over :data:`MAX_CONFIG_NODES` values or nests over :data:`MAX_CONFIG_DEPTH` deep.

    Counted on the event stream, before anything is built, and stopped at the cap: an
    alias (``*a``) counts the whole expanded size of its anchor each time, which is
    what every later walk of the value (checks, messages, saving) costs. An alias to a
    list or mapping that is still open (a value that contains itself) is refused.
    """
    stack: list[_Open] = []
    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (expanded size, height)
    count = 0

    def add(size: int, height: int) -> None:
        nonlocal count
        count += size
        if count > MAX_CONFIG_NODES:
            raise HierclusterError(
                f"{where} holds more than {MAX_CONFIG_NODES:,} values (aliases counted expanded), "
                f"the most this tool reads; over the limit at {_where_in(stack)}"
            )
        if len(stack) + height > MAX_CONFIG_DEPTH:
            raise HierclusterError(
                f"{where} nests lists and mappings more than {MAX_CONFIG_DEPTH} levels deep (at {_where_in(stack)})"
            )
        if stack:
            stack[-1].height = max(stack[-1].height, height + 1)

    def child_done() -> None:
        if stack:
            stack[-1].children += 1

    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.AliasEvent):
            if any(frame.anchor == event.anchor for frame in stack):
                raise HierclusterError(
                    f"{where}: the alias *{short_repr(event.anchor, 30).strip(chr(39))} at {_where_in(stack)} "
                    "refers to a value that contains it (a value cannot contain itself)"
                )
            add(*anchors.get(event.anchor, (1, 0)))  # an unknown alias is the loader's error to report
            child_done()
        elif isinstance(event, yaml.ScalarEvent):
            if stack and stack[-1].mapping and stack[-1].children % 2 == 0:
                stack[-1].key = event.value
            add(1, 0)
            if event.anchor is not None:
                anchors[event.anchor] = (1, 0)
            child_done()
        elif isinstance(event, yaml.CollectionStartEvent):
            add(1, 1)
            stack.append(_Open(event.anchor, isinstance(event, yaml.MappingStartEvent), count - 1))
        elif isinstance(event, yaml.CollectionEndEvent):
            frame = stack.pop()
            if frame.anchor is not None:
                anchors[frame.anchor] = (count - frame.first_node, frame.height)
            if stack:
                stack[-1].height = max(stack[-1].height, frame.height + 1)
            child_done()


def _one_line(exc: yaml.YAMLError) -> str:
    """A YAML error as one line: where, what (PyYAML's own message spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    text = where + problem + (f" ({context})" if context else "")
    return text if len(text) <= 200 else text[:197] + "..."


def load_yaml_text(text: str, where: str) -> Any:
    """The value of the YAML ``text``, bounded in size, count of values and depth; ``where`` names it in errors.

    Every YAML text the user hands over (a config, a grouping file, a ``--set`` value) is
    read through here: over :data:`MAX_CONFIG_BYTES`, over :data:`MAX_CONFIG_NODES` values
    with aliases expanded (an alias bomb), nested over :data:`MAX_CONFIG_DEPTH`, or
    invalid, it is one :class:`HierclusterError` line naming ``where``.

    Examples
    --------
    >>> load_yaml_text("bits: [4, 3]", "--set quant")
    {'bits': [4, 3]}
    >>> load_yaml_text("a: &a [*a]", "x.yaml")
    Traceback (most recent call last):
    ...
    hiercluster.errors.HierclusterError: x.yaml: the alias *a at a[0] refers to a value that contains it (a value cannot contain itself)
    """
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise HierclusterError(f"{where} is not UTF-8 text (character {exc.object[exc.start]!a})") from None
    if size > MAX_CONFIG_BYTES:
        raise HierclusterError(
            f"{where} is larger than {MAX_CONFIG_BYTES // 1024:,} KiB, the most this tool reads; is it the right file?"
        )
    _check_yaml_bounds_or_invalid(text, where)
    try:
        return yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        raise HierclusterError(f"{where} is not valid YAML: {_one_line(exc)}") from None
    except ValueError as exc:  # an integer of over 4,300 decimal digits: Python refuses to convert it
        if "integer string conversion" not in str(exc):
            raise
        raise HierclusterError(
            f"{where} holds an integer of over {sys.get_int_max_str_digits():,} digits; no setting takes such a number"
        ) from None


def _check_yaml_bounds_or_invalid(text: str, where: str) -> None:
    """:func:`_check_yaml_bounds`, with a YAML syntax error found on the way reported as one line."""
    try:
        _check_yaml_bounds(text, where)
    except yaml.YAMLError as exc:
        raise HierclusterError(f"{where} is not valid YAML: {_one_line(exc)}") from None


def read_yaml(path: str | Path, what: str = "YAML file") -> Any:
    """The value of the YAML file ``path`` (a config or a grouping), read by :func:`load_yaml_text`'s rules.

    A missing file, a folder, a file that is not UTF-8 or over :data:`MAX_CONFIG_BYTES`,
    an alias bomb or invalid YAML is one :class:`HierclusterError` naming ``what`` and the path.
    """
    path = Path(path)
    return load_yaml_text(read_text(path, what, max_bytes=MAX_CONFIG_BYTES), f"{what} {path}")
