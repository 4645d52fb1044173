"""Ctrl-C that always stops a command, at a point where stopping is safe.

Python's default SIGINT handler raises :class:`KeyboardInterrupt` wherever the main
thread happens to be. Inside a weakref callback or a ``__del__`` (torch runs many, e.g.
a ``WeakKeyDictionary`` clean-up) the exception is printed as "Exception ignored in
..." and swallowed, and the run goes on to exit 0. Here the first Ctrl-C only sets a
flag; :func:`check` raises at safe points: between specs, between batches, and at
the start of every module's forward pass (a global forward pre-hook, which also
reaches the long calibration loops of :mod:`quant` without it knowing about us). A
second Ctrl-C raises at once, for a step that never reaches a check.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_requested = threading.Event()


def requested() -> bool:
    """Whether Ctrl-C was pressed within the current :func:`handle_interrupts` block."""
    return _requested.is_set()


def check() -> None:
    """Raise :class:`KeyboardInterrupt` if Ctrl-C was pressed; call it between steps."""
    if _requested.is_set():
        raise KeyboardInterrupt


def _forward_check(_module: object, _inputs: object) -> None:
    check()


@contextmanager
def handle_interrupts(message: str = "stopping at the next safe point (Ctrl-C again to stop at once)") -> Iterator[None]:
    """Within the block, Ctrl-C sets a flag that :func:`check` turns into ``KeyboardInterrupt``.

    Only the main thread can own signal handlers; elsewhere the block changes nothing.

    Examples
    --------
    >>> import os
    >>> with handle_interrupts(message=""):
    ...     os.kill(os.getpid(), signal.SIGINT)  # handled: sets the flag, raises nothing
    ...     requested()
    True
    >>> requested()  # the flag belongs to the block
    False
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: object) -> None:
        if _requested.is_set():
            raise KeyboardInterrupt  # the second press: stop now, wherever we are
        _requested.set()
        if message:
            print(f"\n{message}", file=sys.stderr, flush=True)

    _requested.clear()
    signal.signal(signal.SIGINT, on_sigint)
    hook = None
    try:
        # torch loads here, after the handler: a Ctrl-C while it loads only sets the flag
        # (``import hiercluster.cli`` does not load torch, so a command's start-up is covered).
        import torch.nn as nn

        hook = nn.modules.module.register_module_forward_pre_hook(_forward_check)
        yield
    finally:
        _requested.clear()
        if hook is not None:
            hook.remove()
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
