"""Stopping work early: Ctrl-C / SIGTERM, and wall-clock deadlines on Python code.

Python runs a signal handler only between bytecodes of the main thread, so a long call into C
(HiGHS) does not see Ctrl-C by itself. :func:`cancel_on_interrupt` turns SIGINT and SIGTERM into
a cancel request the C code polls (HiGHS's user-interrupt callback), and raises
:class:`KeyboardInterrupt` once the call has returned. :func:`deadline` bounds Python work (a
Pyomo model build) by raising :class:`DeadlineExceeded` from a timer signal.

Both work in the main thread only; elsewhere (a worker thread) they do nothing, and the caller
relies on the solver's own time limit.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped a computation; ``partial`` is its best result so far, if any
    (e.g. the MIP's incumbent plan), for a caller that asked to keep it."""

    def __init__(self, partial: Any = None):
        super().__init__()
        self.partial = partial


class DeadlineExceeded(Exception):
    """A :func:`deadline` passed while the guarded Python code ran."""


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def raise_on_sigterm() -> None:
    """Make SIGTERM behave like Ctrl-C (a :class:`KeyboardInterrupt` in the main thread)."""
    if _main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)


@contextmanager
def cancel_on_interrupt(cancel: Callable[[], None]) -> Iterator[dict[str, bool]]:
    """While the block runs, SIGINT / SIGTERM call ``cancel()`` instead of raising; the block
    sees ``state["interrupted"]`` and should return what it has. On leaving the block the
    previous handlers come back and, if a signal came, :class:`Interrupted` is raised (the
    caller may catch it to attach a partial result)."""
    state = {"interrupted": False}
    if not _main_thread():
        yield state
        return

    def on_signal(signum, frame):
        state["interrupted"] = True
        cancel()

    saved = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    if state["interrupted"]:
        raise Interrupted()


@contextmanager
def deadline(at: float | None) -> Iterator[None]:
    """Raise :class:`DeadlineExceeded` in the block once ``time.perf_counter()`` passes ``at``
    (``None``: no deadline). Python code only: a call into C returns first."""
    if at is None or not _main_thread() or not math.isfinite(at):
        yield
        return
    left = at - time.perf_counter()
    if left <= 0:
        raise DeadlineExceeded()

    def on_alarm(signum, frame):
        raise DeadlineExceeded()

    saved = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, left)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, saved)
