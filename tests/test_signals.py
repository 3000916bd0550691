"""A stop signal that lands while Python runs a finaliser prints no traceback and still stops the search."""

from __future__ import annotations

import signal
import sys
from typing import Any

import pytest

from tuner.signals import Terminated, graceful_stop


class RaisesInFinaliser:
    """Stands for any object whose ``__del__`` is running when the SIGTERM handler raises (seen: regex's)."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGTERM)


class Broken:
    def __del__(self) -> None:
        raise ValueError("a real bug")


@pytest.fixture
def reported(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """What reaches the interpreter's hook for exceptions it cannot raise (it prints "Exception ignored in ...")."""
    seen: list[BaseException] = []

    def hook(unraisable: Any) -> None:
        seen.append(unraisable.exc_value)

    monkeypatch.setattr(sys, "unraisablehook", hook)
    return seen


def test_sigterm_in_a_finaliser_is_not_reported_and_the_stop_is_recorded(reported: list[BaseException]) -> None:
    with graceful_stop(lambda: True, lambda: True, lambda _: None) as request:
        holder = RaisesInFinaliser()
        del holder  # the handler raises Terminated inside __del__, where Python cannot propagate it
    assert reported == []
    assert request.signal_name == "SIGTERM" and request.hard  # the search still stops


def test_other_exceptions_in_finalisers_are_still_reported(reported: list[BaseException]) -> None:
    before = sys.unraisablehook
    with graceful_stop(lambda: True, lambda: False, lambda _: None):
        holder = Broken()
        del holder
    assert [str(error) for error in reported] == ["a real bug"]
    assert sys.unraisablehook is before  # restored


def test_terminated_is_a_keyboard_interrupt_with_the_shells_exit_code() -> None:
    error = Terminated("SIGTERM")
    assert isinstance(error, KeyboardInterrupt) and error.exit_code == 143
