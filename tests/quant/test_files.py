"""quant._files: a file opened for reading only when it is a regular file."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from quant._files import NotRegularFileError, file_kind, open_regular


def test_a_regular_file_is_opened(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    with open_regular(tmp_path / "a.bin") as fh:
        assert fh.read() == b"abc"


def _release_a_blocked_reader(path: Path) -> None:
    """Open the FIFO's write end in a thread: a reader that blocked on it is released (the test fails, not hangs)."""

    def release() -> None:
        with open(path, "wb"):
            pass

    threading.Thread(target=release, daemon=True).start()


@pytest.mark.parametrize(
    "make, kind",
    [
        (lambda tmp: tmp, "a folder"),
        (lambda tmp: Path("/dev/null"), "a device"),
        (lambda tmp: (os.mkfifo(tmp / "pipe"), _release_a_blocked_reader(tmp / "pipe"), tmp / "pipe")[-1], "a named pipe (FIFO)"),
    ],
    ids=["folder", "device", "fifo"],
)
def test_anything_else_is_refused_at_once_naming_what_it_is(tmp_path, make, kind):
    path = make(tmp_path)
    with pytest.raises(NotRegularFileError) as err:
        open_regular(path)
    assert err.value.kind == kind and err.value.filename == str(path)
    assert str(err.value) == f"{path} is {kind}, not a regular file"
    assert isinstance(err.value, OSError)  # code that reports failed opens reports this one too


def test_a_failed_open_is_the_operating_systems_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_regular(tmp_path / "missing")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(OSError) as err:
        open_regular(tmp_path / "loop")
    assert err.value.errno == errno.ELOOP


def test_no_descriptor_is_left_open_by_a_refusal(tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(NotRegularFileError):
            open_regular(tmp_path)
    assert len(os.listdir("/proc/self/fd")) == before


def test_file_kind_names_a_socket():
    import stat

    assert file_kind(stat.S_IFSOCK) == "a socket" and file_kind(stat.S_IFREG) == "not a regular file"
