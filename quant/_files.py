"""Files written whole or not at all (shared by :mod:`quant` and :mod:`hiercluster`)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


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
