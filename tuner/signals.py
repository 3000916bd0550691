"""Stopping cleanly on SIGINT and SIGTERM: what a run does with each, and the exit codes that say which came.

- SIGINT (Ctrl-C): the running trial finishes, then the search stops (a second SIGINT fails the trial at once).
- SIGTERM (``kill``, ``timeout``, a batch scheduler about to kill the job): the running trial is marked failed at
  once, then the search stops.

Either way every finished trial stays stored and the same command resumes. Exit codes follow the shell's convention
of 128 + the signal's number: 130 for SIGINT, 143 for SIGTERM.

Example:
    >>> exit_code("SIGINT"), exit_code("SIGTERM")
    (130, 143)
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
    "StopRequest",
    "Terminated",
    "exit_code",
    "graceful_stop",
    "relay_signals",
    "terminate_on_sigterm",
]

EXIT_SIGINT = 130
EXIT_SIGTERM = 143


def exit_code(name: str | None) -> int:
    """128 + the signal's number: 130 for ``"SIGINT"``, 143 for ``"SIGTERM"`` (130 for anything else)."""
    return EXIT_SIGTERM if name == "SIGTERM" else EXIT_SIGINT


class Terminated(KeyboardInterrupt):
    """Raised by the signal handlers to stop at once.

    A ``KeyboardInterrupt``, so that Optuna marks the running trial failed (it does that for a ``KeyboardInterrupt``
    in the objective) and re-raises it.

    Attributes:
        signal_name: ``"SIGINT"`` or ``"SIGTERM"``.
    """

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        """130 or 143."""
        return exit_code(self.signal_name)


@dataclass
class StopRequest:
    """What the signals asked of a search (set by :func:`graceful_stop`).

    Attributes:
        signal_name: the last signal received (``"SIGINT"`` or ``"SIGTERM"``), or None.
        hard: stop at once (SIGTERM, or a second SIGINT): the running trial is failed, not finished.
    """

    signal_name: str | None = None
    hard: bool = False

    @property
    def requested(self) -> bool:
        """Whether a signal asked the search to stop."""
        return self.signal_name is not None

    @property
    def exit_code(self) -> int:
        """130 (SIGINT) or 143 (SIGTERM)."""
        return exit_code(self.signal_name)


_CRITICAL_FILES = (os.path.join("optuna", "storages", "journal", "_file.py"),)
"""Code a :class:`Terminated` must not be raised into: Optuna's journal-file lock, whose ``release`` cannot unwind an
exception raised between its rename and its unlink (it then fails with FileNotFoundError, which hides the signal and
can leave the lock behind)."""

REDELIVER_SECONDS = 0.02
"""A signal that lands in critical code is sent again this much later (the code holds the lock for microseconds)."""


def _in_critical_code(frame: Any) -> bool:
    """Whether the interrupted code (``frame`` and its callers) is inside :data:`_CRITICAL_FILES`."""
    while frame is not None:
        if frame.f_code.co_filename.endswith(_CRITICAL_FILES):
            return True
        frame = frame.f_back
    return False


# Handlers of this module that are installed now, and the redeliveries still pending. A redelivery sends its signal
# only while one of these handlers is installed for it, and a block restores the previous handlers only after
# cancelling the pending ones, both under the lock: a redelivery can never reach a default handler (which would kill
# the process after it reported its stop, e.g. while the interpreter exits).
_our_handlers: set[Any] = set()
_pending: set[threading.Timer] = set()
_redelivery_lock = threading.RLock()


def _redeliver(signum: int) -> None:
    with _redelivery_lock:
        _pending.discard(threading.current_thread())  # type: ignore[arg-type]  # this timer: no longer pending
        if signal.getsignal(signum) in _our_handlers:
            os.kill(os.getpid(), signum)


def _terminate(name: str, signum: int, frame: Any) -> None:
    """Raise :class:`Terminated` where the signal landed, or, inside critical code, send the signal again shortly so
    it is raised once that code is left (the stop request is already recorded)."""
    if _in_critical_code(frame):
        timer = threading.Timer(REDELIVER_SECONDS, _redeliver, (signum,))
        timer.daemon = True  # never keeps the interpreter from exiting
        with _redelivery_lock:
            _pending.add(timer)
        timer.start()
        return
    raise Terminated(name)


@contextlib.contextmanager
def _installed(handlers: dict[int, Any]) -> Iterator[None]:
    """Install ``handlers`` (signal number to handler) for the block, then cancel pending redeliveries and restore
    the previous handlers."""
    previous = {}
    with _redelivery_lock:
        for signum, handler in handlers.items():
            _our_handlers.add(handler)
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        with _redelivery_lock:
            for timer in _pending:
                timer.cancel()
            _pending.clear()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            _our_handlers.difference_update(handlers.values())


@contextlib.contextmanager
def _quiet_in_finalisers() -> Iterator[None]:
    """Inside the block, a :class:`Terminated` raised while Python runs a finaliser (``__del__``, a weakref callback)
    is dropped instead of printed as "Exception ignored in ... Traceback": Python cannot raise from there, and the
    handler has recorded the stop request before raising, so the search still stops (after the running trial)."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, Terminated):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


@contextlib.contextmanager
def graceful_stop(
    stop_search: Callable[[], bool], in_trial: Callable[[], bool], note: Callable[[str], None]
) -> Iterator[StopRequest]:
    """Inside the block, SIGINT and SIGTERM stop a search cleanly instead of killing the process.

    The first SIGINT calls ``stop_search`` (the search ends after the running trial). SIGTERM, or a second SIGINT,
    raises :class:`Terminated` when ``in_trial()`` says a trial is running (Optuna marks it failed), else stops the
    search before the next trial. Where the search cannot be stopped (``stop_search`` returns False: outside its
    loop), any signal raises :class:`Terminated`. Outside the main thread nothing is installed.

    Args:
        stop_search: asks the search to end after the running trial; False when it is not searching.
        in_trial: whether a trial's objective is running now.
        note: prints a line.

    Yields:
        The :class:`StopRequest` the handlers fill in.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def on_signal(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        hard = name == "SIGTERM" or request.requested
        request.signal_name = name
        request.hard = request.hard or hard
        searching = stop_search()
        if not searching or (request.hard and in_trial()):
            _terminate(name, signum, frame)
            return
        if request.hard:
            note(f"{name}: stopping before the next trial")
        else:
            note(f"{name}: stopping after the running trial (Ctrl-C again to stop at once)")

    with _installed({signal.SIGINT: on_signal, signal.SIGTERM: on_signal}), _quiet_in_finalisers():
        yield request


@contextlib.contextmanager
def relay_signals(send: Callable[[int], None]) -> Iterator[StopRequest]:
    """Inside the block, SIGINT and SIGTERM are passed to ``send`` (e.g. to worker processes) instead of stopping this
    process, and recorded in the :class:`StopRequest` yielded (a second SIGINT, or a SIGTERM, makes it hard, as the
    workers' own handlers do). Outside the main thread nothing is installed."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def on_signal(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        request.hard = request.hard or name == "SIGTERM" or request.requested
        request.signal_name = name
        send(signum)

    with _installed({signal.SIGINT: on_signal, signal.SIGTERM: on_signal}):
        yield request


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Inside the block, SIGTERM raises :class:`Terminated` (as Ctrl-C raises ``KeyboardInterrupt``), so a command
    stopped by ``kill`` or a scheduler unwinds and reports instead of vanishing. Outside the main thread nothing is
    installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        _terminate("SIGTERM", signum, frame)

    with _installed({signal.SIGTERM: on_sigterm}), _quiet_in_finalisers():
        yield
