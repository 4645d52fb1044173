"""Files written whole or not at all (shared by :mod:`quant` and :mod:`hiercluster`)."""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


class NotRegularFileError(OSError):
    """A path to read that is a folder, a named pipe, a device or a socket, not a regular file.

    ``kind`` says which ("a named pipe (FIFO)"); ``filename`` is the path. An
    ``OSError``, so code that reports failed opens reports this one too.
    """

    def __init__(self, path: str | Path, kind: str) -> None:
        super().__init__(f"{path} is {kind}, not a regular file")
        self.filename = str(path)
        self.kind = kind

    def __str__(self) -> str:  # OSError's own reads "[Errno None] None: 'path'" once filename is set
        return f"{self.filename} is {self.kind}, not a regular file"


def file_kind(mode: int) -> str:
    """What a non-regular ``st_mode`` is, in words: "a folder", "a named pipe (FIFO)", "a device", ..."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular(path: str | Path) -> BinaryIO:
    """``path`` opened for reading in binary, refused unless it is a regular file.

    O_NONBLOCK so that opening a FIFO with no writer returns at once instead of
    hanging; fstat on the open descriptor, so the checked file is the one read.

    Raises
    ------
    NotRegularFileError
        ``path`` is a folder, a FIFO, a device or a socket.
    OSError
        ``open`` failed (missing, permission denied, a symbolic link loop, ...).

    Examples
    --------
    >>> open_regular("/dev/null")
    Traceback (most recent call last):
    ...
    quant._files.NotRegularFileError: /dev/null is a device, not a regular file
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(path, file_kind(mode))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` through ``write(handle)`` on a temporary file beside it, then rename.

    A crash, a kill or a full disk mid-write never leaves a partial file under ``path``,
    and a file that was there before stays whole until the new one is complete. The
    temporary name is fresh (not ``mkstemp``, whose 0600 mode would ignore the umask).

    Examples
    --------
    >>> import tempfile
    >>> p = write_atomic(Path(tempfile.mkdtemp()) / "a.txt", lambda fh: fh.write(b"hello"))
    >>> p.read_text()
    'hello'
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """:func:`write_atomic` for UTF-8 text."""
    data = text.encode("utf-8")
    return write_atomic(path, lambda handle: handle.write(data))


def save_torch_atomic(path: str | Path, obj: object) -> Path:
    """``torch.save(obj)`` to ``path`` whole or not at all.

    Serialized in memory first: torch's zip writer reports a failed write (a full disk)
    as a ``RuntimeError`` from C++, where a plain file write gives the ``OSError`` that
    names the cause.
    """
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_atomic(path, lambda handle: handle.write(buffer.getbuffer()))
