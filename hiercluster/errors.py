"""The one exception type for a user's mistake.

Anything the user can fix (a wrong path, a bad config value, a checkpoint for another
model) raises :class:`HierclusterError` with a message that names the thing that is
wrong and what would be right. The CLI prints that message alone and exits with 2;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class HierclusterError(ValueError):
    """A problem with the user's input, reported as one clear message."""


def short_repr(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about user values.

    A config value can be huge (a YAML alias bomb expands to millions of items); an
    error message quotes only its start. Containers are cut before ``repr`` walks them.

    Examples
    --------
    >>> short_repr(list(range(100)), 20)
    '[0, 1, 2, 3, 4, 5...'
    """
    if isinstance(value, (list, tuple, dict, set)) and len(value) > limit:
        value = list(value)[:limit] if not isinstance(value, dict) else dict(list(value.items())[:limit])
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of ``path``; a file in another encoding is a :class:`HierclusterError`.

    Every text file the user hands over (configs, groupings, metadata, run files) is
    read through here, so a Latin-1 or UTF-16 file gives one clear line, not a
    ``UnicodeDecodeError`` traceback.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HierclusterError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); save it as UTF-8"
        ) from None
