"""The run's live status on a real rich terminal console: it fits 80x24, keeps the count, time left and best in
view, and its time left is honest from the first trials on."""

from __future__ import annotations

import io
import re

from rich.console import Console

from tuner.progress import RunProgress, eta_text
from tuner.study import TrialOutcome


class FakeClock:
    """Seconds that the test advances."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def outcome(
    number: int, *, feasible: bool, accuracy: float, latency_ms: float, seed: str | None = None
) -> TrialOutcome:
    return TrialOutcome(
        number=number, summary="skip 64->26 (stride 2, offset 0, from layer 0), w_div 0.50, ctr 0.25, keys features",
        tokens_out=26, accuracy=accuracy, latency_ms=latency_ms, upper_ms=latency_ms * 1.02, baseline_ms=60.0,
        feasible=feasible, noisy=number % 37 == 5, duplicate_of=None, seed_point=seed, forward_s=0.5, objective_s=0.8,
    )  # fmt: skip


def terminal(width: int = 80, height: int = 24) -> tuple[Console, io.StringIO]:
    stream = io.StringIO()
    console = Console(
        file=stream, width=width, height=height, force_terminal=True, color_system=None, legacy_windows=False
    )
    return console, stream


def screen_of(progress: RunProgress, width: int = 80, height: int = 24) -> list[str]:
    """What the live status draws, line by line, on a ``width`` x ``height`` terminal."""
    console = Console(width=width, height=height, record=True, file=io.StringIO(), color_system=None)
    console.print(progress._render())
    return console.export_text().rstrip("\n").splitlines()


def test_the_live_status_fits_80x24_with_count_time_left_and_best_after_many_trials() -> None:
    console, stream = terminal()
    clock = FakeClock()
    progress = RunProgress(console, live=True, clock=clock)
    progress.start(200, [])
    for number in range(150):
        clock.now += 12.0 if number < 3 else 1.5  # slow seed trials first, as a real run has
        seed = "no pruning" if number == 0 else None
        progress.trial(
            outcome(
                number, feasible=number % 3 != 0, accuracy=0.5 + number / 400, latency_ms=50 - number / 10, seed=seed
            )
        )
    lines = screen_of(progress)
    progress.stop()
    assert len(lines) <= 24 - 2 and all(len(line) <= 80 for line in lines), lines
    status = "\n".join(lines)
    assert "trial 150/200" in status
    assert re.search(r"\d+(\.\d)? s left|\d+(\.\d)?(-\d+(\.\d)?)? min left", status), status
    assert "best feasible: trial 149" in status
    assert "new best" in status  # the compact log of notable trials
    drawn = stream.getvalue()
    assert "trial 150/200" in drawn and "best feasible" in drawn  # what the live display wrote to the terminal


def test_a_short_terminal_keeps_the_bar_and_drops_log_lines() -> None:
    console, _ = terminal(height=6)
    clock = FakeClock()
    progress = RunProgress(console, live=False, clock=clock)
    progress.start(10, [])
    for number in range(8):
        clock.now += 1.0
        progress.trial(outcome(number, feasible=True, accuracy=0.5 + number / 100, latency_ms=40 - number))
    lines = screen_of(progress, height=6)
    assert len(lines) <= 6 and "trial 8/10" in "\n".join(lines) and "best feasible" in lines[-1]


def test_time_left_is_estimating_first_then_follows_recent_trials_not_the_slow_start() -> None:
    assert eta_text([40.0, 40.0], 198) == "estimating"
    # Three slow seed trials then fast ones: the median of recent intervals, not the mean since the start.
    intervals = [40.0, 40.0, 40.0] + [1.7] * 10
    assert eta_text(intervals, 187) == "5.3 min left"
    assert eta_text([1.0] * 5, 0) == "finishing"


def test_without_a_terminal_each_trial_is_one_plain_line() -> None:
    stream = io.StringIO()
    console = Console(file=stream, width=160, force_terminal=False, color_system=None)
    progress = RunProgress(console)
    progress.start(3, [])
    progress.trial(outcome(0, feasible=True, accuracy=0.9, latency_ms=30.0))
    progress.stop()
    (line,) = [line for line in stream.getvalue().splitlines() if line.startswith("trial ")]
    assert line.split()[1:3] == ["0", "1/3"] and "feasible" in line
