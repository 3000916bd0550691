"""What ``tuner run`` shows while it works: phase lines, a live status of the trials, the final Pareto table.

On a terminal the status redraws in place (rich ``Live``, redrawn only when a trial ends, so no drawing thread
competes with the latency measurements) and always fits the screen, down to 80x24: a compact log of notable trials
(seed points, a new best or a new fastest schedule that meets the budget, a measurement that stayed noisy), each cut to
one line, then a bar with the trial count and the time left, then the best feasible trial so far. Elsewhere (a pipe,
a log file, CI) each trial is one plain line.

The time left is honest early: it reads "estimating" until :data:`ETA_MIN_TRIALS` trials of this session have
finished, then it is the trials left times the median time between recent trials (the first trials, with the
unpruned seed point and warm-up, are the slowest and would inflate a mean), shown as a range when recent trials
vary.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from tuner.export import Selection
from tuner.study import TrialOutcome, TrialRecord

__all__ = ["ETA_MIN_TRIALS", "RunProgress", "eta_text", "selection_table"]

ETA_MIN_TRIALS = 3
"""Trials of this session timed before a time left is shown."""

ETA_WINDOW = 20
"""Recent intervals between trials that the time left is computed from."""


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min" if seconds >= 600 else f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def eta_text(intervals: list[float], left: int) -> str:
    """The time left for ``left`` more trials, from the recent intervals between trials.

    Example:
        >>> eta_text([30.0, 1.0], 10)
        'estimating'
        >>> eta_text([30.0, 1.0, 1.0, 1.0, 1.0], 100)
        '1.7 min left'
        >>> eta_text([1.0, 3.0, 1.0, 3.0, 1.0, 3.0], 100)
        '1.7-5.0 min left'
    """
    if left <= 0:
        return "finishing"
    if len(intervals) < ETA_MIN_TRIALS:
        return "estimating"
    recent = intervals[-ETA_WINDOW:]
    middle = statistics.median(recent)
    if len(recent) >= 4:
        low, _, high = statistics.quantiles(recent, n=4, method="inclusive")
        if high > 1.3 * low:
            low_text, high_text = _duration(left * low), _duration(left * high)
            if low_text.split()[-1] == high_text.split()[-1]:
                return f"{low_text.split()[0]}-{high_text} left"
            return f"{low_text}-{high_text} left"
    return f"{_duration(left * middle)} left"


class RunProgress:
    """Progress of one run.

    Args:
        console: where to print (default: a rich console on stdout).
        live: redraw the status in place; None decides by whether the console is a terminal.
        log_lines: notable trials kept in the live status (fewer on a short terminal).
        clock: seconds, monotonic (a test passes its own).
    """

    def __init__(
        self,
        console: Console | None = None,
        live: bool | None = None,
        log_lines: int = 8,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.console = console or Console()
        self.use_live = self.console.is_terminal if live is None else live
        self.log: deque[str] = deque(maxlen=log_lines)
        self.best: tuple[int, float, float] | None = None
        self.fastest: tuple[int, float, float] | None = None
        self.total = 0
        self.done = 0
        self.session_trials = 0
        self.noisy = 0
        self.intervals: list[float] = []
        self.clock = clock
        self._last = 0.0
        self._live: Live | None = None

    # ----------------------------------------------------------------------------------------------------- phases

    def note(self, message: str) -> None:
        """A one-line status message (loading, calibrating, re-measuring, ...)."""
        self.console.print(f"[dim]·[/dim] {message}", highlight=False)

    # ----------------------------------------------------------------------------------------------------- trials

    def start(self, total: int, existing: list[TrialRecord]) -> None:
        """Begin the trial loop: ``total`` trials wanted, ``existing`` already finished (a resumed study)."""
        self.total = total
        self.done = len(existing)
        for record in existing:
            if record.feasible:
                self._offer(record.number, record.accuracy, record.latency_ms)
        self._last = self.clock()
        if self.use_live:
            self._live = Live(self._render(), console=self.console, auto_refresh=False, transient=False)
            self._live.start()

    def trial(self, outcome: TrialOutcome) -> None:
        """A trial finished."""
        now = self.clock()
        self.intervals.append(now - self._last)
        self._last = now
        self.done += 1
        self.session_trials += 1
        marks = self._offer(outcome.number, outcome.accuracy, outcome.latency_ms) if outcome.feasible else []
        if outcome.noisy:
            self.noisy += 1
            marks.append("noisy")
            if self.noisy == 1 or self.noisy % 10 == 0:
                self.note(
                    f"trial {outcome.number}: its latency stayed noisy after re-measuring ({self.noisy} such trials so "
                    "far): the machine looks loaded; each latency is a ratio to the unpruned model timed beside it, "
                    "but keep other jobs off the machine"
                )
        if outcome.seed_point:
            marks.append(f"seed: {outcome.seed_point}")
        if marks:
            self.log.append(self._log_line(outcome, marks))
        if self._live is not None:
            self._live.update(self._render(), refresh=True)
        else:
            self.console.print(self._line(outcome), highlight=False, soft_wrap=True)

    def stop(self) -> None:
        """End the trial loop (safe to call twice)."""
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _offer(self, number: int, accuracy: float, latency_ms: float) -> list[str]:
        """Take a feasible trial into the best and fastest so far; what it became, in words."""
        marks = []
        if self.best is None or (-accuracy, latency_ms, number) < (-self.best[1], self.best[2], self.best[0]):
            self.best = (number, accuracy, latency_ms)
            marks.append("new best")
        if self.fastest is None or (latency_ms, -accuracy) < (self.fastest[2], -self.fastest[1]):
            self.fastest = (number, accuracy, latency_ms)
            marks.append("new fastest")
        return marks

    def _best_text(self) -> str:
        if self.best is None:
            return "best feasible: none yet"
        number, accuracy, latency = self.best
        return f"best feasible: trial {number}, accuracy {accuracy:.4f} at {latency:.2f} ms"

    @staticmethod
    def _log_line(outcome: TrialOutcome, marks: list[str]) -> str:
        status = "ok" if outcome.feasible else "over"
        return (
            f"#{outcome.number:<4d} {outcome.accuracy:.4f} {outcome.latency_ms:7.2f} ms {status:4s} "
            f"{', '.join(marks)}: {outcome.summary}"
        )

    def _line(self, outcome: TrialOutcome) -> str:
        status = "feasible" if outcome.feasible else "over budget"
        origin = f" [{outcome.seed_point}]" if outcome.seed_point else ""
        duplicate = f" (= trial {outcome.duplicate_of})" if outcome.duplicate_of is not None else ""
        noisy = " noisy" if outcome.noisy else ""
        return (
            f"trial {outcome.number:4d} {self.done}/{self.total}  acc {outcome.accuracy:.4f}  "
            f"{outcome.latency_ms:7.2f} ms measured{noisy}  {status:11s}  {outcome.summary}"
            f"{duplicate}{origin}  | {self._best_text()}"
        )

    def _render(self) -> Group:
        """The live status: at most ``log_lines`` notable trials (fewer on a short terminal), the bar, the best."""
        room = max(0, min(len(self.log), self.console.height - 4))
        lines: list[Text | Table] = [
            Text(line, no_wrap=True, overflow="ellipsis") for line in list(self.log)[len(self.log) - room :]
        ]
        bar = Table.grid(padding=(0, 1), expand=True)
        bar.add_column(no_wrap=True)
        bar.add_column(ratio=1)
        bar.add_column(no_wrap=True, justify="right")
        bar.add_row(
            f"trial {self.done}/{self.total}",
            ProgressBar(total=max(1, self.total), completed=min(self.done, self.total)),
            eta_text(self.intervals, self.total - self.done),
        )
        lines.append(bar)
        lines.append(Text(self._best_text(), no_wrap=True, overflow="ellipsis"))
        return Group(*lines)


def selection_table(selection: Selection) -> Table:
    """The Pareto table printed at the end: front schedules with held-out accuracy and re-measured latency."""
    table = Table(
        title=f"Pareto-optimal schedules that meet {selection.budget} ({selection.budget_ms:.2f} ms), measured again"
    )
    for header in (
        "trial",
        "schedule",
        "tokens",
        "acc calib",
        "acc holdout",
        "search ms",
        "again ms / limit",
        "status",
    ):
        table.add_column(header, justify="left" if header in ("schedule", "status") else "right")
    chosen = selection.chosen.record.number if selection.chosen else None
    for finalist in selection.finalists:
        record, verdict = finalist.record, finalist.verdict
        if verdict is not None:
            measured = f"{verdict.latency_ms:.2f} (<= {verdict.upper_ms:.2f}) / {verdict.limit_ms:.2f}"
            status = (
                "[bold green]chosen[/bold green]"
                if record.number == chosen
                else ("meets" if verdict.met else "[red]over when measured again[/red]")
            )
        else:
            measured, status = "-", ""
        table.add_row(
            str(record.number),
            record.summary,
            str(record.tokens_out),
            f"{record.accuracy:.4f}",
            f"{finalist.accuracy_holdout:.4f}",
            f"{record.latency_ms:.2f}",
            measured,
            status,
        )
    return table
