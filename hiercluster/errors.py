"""The one exception type for a user's mistake, and the words for a path that cannot be used.

Anything the user can fix (a wrong path, a bad config value, a checkpoint for another
model) raises :class:`HierclusterError` with a message that names the thing that is
wrong and what would be right. The CLI prints that message alone and exits with 2;
any other exception is a bug and keeps its traceback. An ``OSError`` about a path the
user gave (too long a name, a symbolic link loop, a file where a folder belongs, ...)
is put into one line by :func:`path_problem`, wherever it is raised.
"""

from __future__ import annotations

import ast
import errno
import os
from pathlib import Path

from quant._files import NotRegularFileError, open_regular
from quant._validate import short_repr  # noqa: F401  (one implementation, re-exported for hiercluster)


class HierclusterError(ValueError):
    """A problem with the user's input, reported as one clear message."""


# The largest text file read whole (configs, groupings, metadata, run files): far above any
# real one, far below what would exhaust memory.
MAX_TEXT_BYTES = 64 * 1024 * 1024

# A path quoted in a message is cut to this many characters: a name too long for the file
# system (255 bytes per name on most) is still recognisable, and the line stays readable.
MAX_PATH_CHARS = 200

# errno -> what it means for a path the user gave, and what to do about it. Permission
# errors are worded by _permission_advice (reading and writing need different fixes).
_PATH_ADVICE: dict[int, str] = {
    errno.ENOENT: "no such file or folder; check the path",
    errno.ENAMETOOLONG: "a name in it is longer than the file system allows (255 bytes on most); use a shorter path",
    errno.ELOOP: "a symbolic link in it leads back to itself; fix or remove the link",
    errno.ENOTDIR: "a part of it that should be a folder is a file; check the path",
    errno.EISDIR: "it is a folder; give a file",
    errno.EEXIST: "something is already there; remove it or choose another path",
    errno.ENXIO: "it is a device or named pipe with nothing at the other end; give a regular file",
    errno.ENODEV: "it is a device that cannot be used this way; give a regular file",
    errno.ETXTBSY: "it is in use by a running program; choose another path",
    errno.EBUSY: "it is in use by the system (a mount point?); choose another path",
    errno.EMLINK: "its folder holds too many entries or links; choose another path",
    errno.EXDEV: "it is on another file system than its temporary file; choose another path",
}
_PERMISSION = {errno.EACCES, errno.EPERM}
PATH_ERRNOS = frozenset(_PATH_ADVICE) | _PERMISSION
_SYMLINK_LOOP = "Symlink loop from "  # pathlib's RuntimeError for a loop met by Path.resolve (Python < 3.13)


def quote_path(path: str | os.PathLike[str] | bytes) -> str:
    """``path`` as text for a message, its middle cut when it is longer than :data:`MAX_PATH_CHARS`.

    Examples
    --------
    >>> text = quote_path("/tmp/" + "x" * 300 + ".yaml")
    >>> len(text), text[:8], text[-8:]
    (199, '/tmp/xxx', 'xxx.yaml')
    """
    text = os.fsdecode(path)
    if len(text) <= MAX_PATH_CHARS:
        return text
    half = (MAX_PATH_CHARS - 3) // 2
    return text[:half] + "..." + text[-half:]


def _permission_advice(path: str) -> str:
    """Whether ``path`` could not be read or its folder not written, as far as ``os.access`` can tell."""
    if os.path.lexists(path) and not os.access(path, os.R_OK):
        return "it cannot be read; make it readable or give another file"
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(parent) and not os.access(parent, os.W_OK):
        return "its folder cannot be written; make it writable or choose another path"
    return "make it accessible (readable, or writable for an output) or choose another path"


def path_problem(exc: BaseException) -> str | None:
    """One line for an ``OSError`` about a path the user gave, or None for anything else.

    Covers what the file system says about a path itself: a name too long, a symbolic
    link loop (also pathlib's ``RuntimeError`` for one), a file where a folder belongs,
    a folder where a file belongs, something already there, permission denied, a
    device or FIFO that cannot be opened. The line names the path and the cause. Full
    disks and read-only file systems are not path problems (see the CLI).

    Examples
    --------
    >>> path_problem(OSError(errno.ENAMETOOLONG, "File name too long", "/tmp/abc"))
    'cannot use /tmp/abc: File name too long; a name in it is longer than the file system allows (255 bytes on most); use a shorter path'
    >>> path_problem(ValueError("x")) is None
    True
    """
    if isinstance(exc, RuntimeError) and str(exc).startswith(_SYMLINK_LOOP):
        try:
            where = str(ast.literal_eval(str(exc)[len(_SYMLINK_LOOP) :]))
        except (ValueError, SyntaxError):
            where = str(exc)[len(_SYMLINK_LOOP) :]
        return f"cannot use {quote_path(where)}: Too many levels of symbolic links; {_PATH_ADVICE[errno.ELOOP]}"
    if isinstance(exc, NotRegularFileError):
        return f"cannot use {quote_path(exc.filename)}: it is {exc.kind}; give a regular file"
    if not isinstance(exc, OSError) or exc.errno not in PATH_ERRNOS or exc.filename is None:
        return None
    where, name = quote_path(exc.filename), os.fsdecode(exc.filename)
    if exc.errno in _PERMISSION:
        advice = _permission_advice(name)
    elif exc.errno == errno.EEXIST and os.path.islink(name) and not os.path.exists(name):
        advice = "it is a symbolic link that leads nowhere (or back to itself); remove it or choose another path"
    else:
        advice = _PATH_ADVICE[exc.errno]
    return f"cannot use {where}: {exc.strerror or os.strerror(exc.errno)}; {advice}"


def read_text(path: str | Path, what: str = "file", max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of ``path``; a file in another encoding, or over ``max_bytes``, is a :class:`HierclusterError`.

    Every text file the user hands over (configs, groupings, metadata, run files) is
    read through here, so a Latin-1 or UTF-16 file gives one clear line, not a
    ``UnicodeDecodeError`` traceback, and a huge file is refused before it is read.
    Only a regular file is read: a named pipe or a device would block or never end.
    """
    path = Path(path)
    try:
        with open_regular(path) as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise HierclusterError(f"{what} not found: {quote_path(path)}") from None
    except NotRegularFileError as exc:
        raise HierclusterError(f"{what} {quote_path(path)} is {exc.kind}, not a file") from None
    except OSError as exc:
        advice = "make it readable or give another file" if exc.errno in _PERMISSION else _PATH_ADVICE.get(exc.errno)
        raise HierclusterError(
            f"{what} {quote_path(path)} cannot be read: {exc.strerror or exc}" + (f"; {advice}" if advice else "")
        ) from None
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
