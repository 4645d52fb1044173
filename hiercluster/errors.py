"""The one exception type for a user's mistake.

Anything the user can fix (a wrong path, a bad config value, a checkpoint for another
model) raises :class:`HierclusterError` with a message that names the thing that is
wrong and what would be right. The CLI prints that message alone and exits with 2;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path

from quant._validate import short_repr  # noqa: F401  (one implementation, re-exported for hiercluster)


class HierclusterError(ValueError):
    """A problem with the user's input, reported as one clear message."""


# The largest text file read whole (configs, groupings, metadata, run files): far above any
# real one, far below what would exhaust memory.
MAX_TEXT_BYTES = 64 * 1024 * 1024


def read_text(path: str | Path, what: str = "file", max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of ``path``; a file in another encoding, or over ``max_bytes``, is a :class:`HierclusterError`.

    Every text file the user hands over (configs, groupings, metadata, run files) is
    read through here, so a Latin-1 or UTF-16 file gives one clear line, not a
    ``UnicodeDecodeError`` traceback, and a huge file is refused before it is read.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise HierclusterError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise HierclusterError(f"{what} {path} is a folder, not a file") from None
    if len(data) > max_bytes:
        raise HierclusterError(
            f"{what} {path} is larger than {max_bytes // 1024:,} KiB, the most this tool reads; is it the right file?"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HierclusterError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); save it as UTF-8"
        ) from None
