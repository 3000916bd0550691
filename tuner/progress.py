"""What ``tuner run`` shows while it works: phase lines, a live table of trials, the final Pareto table.

On a terminal the trial table redraws in place (rich ``Live``, redrawn only when a trial ends, so no drawing thread
competes with the latency measurements); elsewhere (a pipe, a log file, CI) each trial is one plain line.
"""

from __future__ import annotations

import time
from collections import deque

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tuner.export import Selection
from tuner.study import TrialOutcome, TrialRecord

__all__ = ["RunProgress", "selection_table"]


class RunProgress:
    """Progress of one run.

    Args:
        console: where to print (default: a rich console on stdout).
        live: redraw a table in place; None decides by whether the console is a terminal.
        recent: trials kept in the live table.
    """

    def __init__(self, console: Console | None = None, live: bool | None = None, recent: int = 6) -> None:
        self.console = console or Console()
        self.use_live = self.console.is_terminal if live is None else live
        self.rows: deque[TrialOutcome] = deque(maxlen=recent)
        self.best: tuple[int, float, float] | None = None
        self.total = 0
        self.done = 0
        self.started = 0.0
        self.session_trials = 0
        self.noisy = 0
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
                self._offer_best(record.number, record.accuracy, record.latency_ms)
        self.started = time.perf_counter()
        if self.use_live:
            self._live = Live(self._render(), console=self.console, auto_refresh=False, transient=False)
            self._live.start()

    def trial(self, outcome: TrialOutcome) -> None:
        """A trial finished."""
        self.done += 1
        self.session_trials += 1
        if outcome.noisy:
            self.noisy += 1
            if self.noisy == 1 or self.noisy % 10 == 0:
                self.note(
                    f"trial {outcome.number}: its latency stayed noisy after re-measuring ({self.noisy} such trials so "
                    "far): the machine looks loaded; each latency is a ratio to the unpruned model timed beside it, "
                    "but keep other jobs off the cores"
                )
        if outcome.feasible:
            self._offer_best(outcome.number, outcome.accuracy, outcome.latency_ms)
        self.rows.append(outcome)
        if self._live is not None:
            self._live.update(self._render(), refresh=True)
        else:
            self.console.print(self._line(outcome), highlight=False, soft_wrap=True)

    def stop(self) -> None:
        """End the trial loop (safe to call twice)."""
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _offer_best(self, number: int, accuracy: float, latency_ms: float) -> None:
        if self.best is None or (-accuracy, latency_ms, number) < (-self.best[1], self.best[2], self.best[0]):
            self.best = (number, accuracy, latency_ms)

    def _best_text(self) -> str:
        if self.best is None:
            return "best feasible: none yet"
        number, accuracy, latency = self.best
        return f"best feasible: trial {number}, accuracy {accuracy:.4f} at {latency:.2f} ms"

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
        table = Table(expand=False, show_edge=False, pad_edge=False)
        for header, justify in (
            ("trial", "right"),
            ("schedule", "left"),
            ("tokens", "right"),
            ("accuracy", "right"),
            ("ms (measured)", "right"),
            ("budget", "left"),
        ):
            table.add_column(header, justify=justify)  # type: ignore[arg-type]
        for row in self.rows:
            reused = f" (= {row.duplicate_of})" if row.duplicate_of is not None else ""
            table.add_row(
                str(row.number),
                row.summary if not row.seed_point else f"{row.summary} [dim]({row.seed_point})[/dim]",
                str(row.tokens_out),
                f"{row.accuracy:.4f}",
                f"{row.latency_ms:.2f}{reused}{' ~' if row.noisy else ''}",
                "[green]ok[/green]" if row.feasible else "[red]over[/red]",
            )
        elapsed = time.perf_counter() - self.started
        rate = elapsed / self.session_trials if self.session_trials else 0.0
        left = max(0, self.total - self.done) * rate
        footer = Text(
            f"trial {self.done}/{self.total} · {self._best_text()} · {rate:.1f} s/trial · "
            f"about {left / 60:.1f} min left"
        )
        return Group(table, footer)


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
