"""Choosing the schedule to export from a study, validating it, and writing it as schedule JSON.

The feasible Pareto front (accuracy on the calibration subset vs predicted latency, within the budget) is ordered by
preference (``accurate``: most accurate on the calibration subset, then faster, then the lower trial number; ``fast``:
fastest, then more accurate) and scored on the held-out slice, which the choice never looks at: it stays an honest
check of what the search picked. The first schedule whose latency, re-measured interleaved with the unpruned model,
meets the budget is chosen. When none does, the closest schedule (smallest excess) is reported and nothing is
written.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
import torch
import transformers

from evaluators import Budget, Evaluator, LatencyMeter, LatencyResult
from tuner import __version__
from tuner.evoprune import Schedule, apply
from tuner.study import (
    ATTR_FINAL,
    ATTR_HOLDOUT_PREFIX,
    StudyContext,
    TrialRecord,
    public_url,
    trial_records,
)

__all__ = [
    "MAX_FINALISTS",
    "Finalist",
    "median_upper_bound",
    "Prefer",
    "Selection",
    "exported_schedule",
    "pareto_front",
    "select_schedule",
    "write_export",
]

Prefer = Literal["accurate", "fast"]

MAX_FINALISTS = 12
"""Front schedules scored on the held-out slice, in preference order (the first one that re-measures within the
budget is exported)."""

_TOLERANCE_MS = 1e-9


def pareto_front(records: list[TrialRecord], limit_ms: float | None = None) -> list[TrialRecord]:
    """Non-dominated records (maximise accuracy, minimise predicted latency), among those within ``limit_ms``.

    For the study's own budget this is Optuna's ``study.best_trials``; it also serves other budgets (``export
    --budget``), where the stored constraint does not apply. Within a latency limit, the feasible front is the
    unconstrained front cut at the limit (a schedule that dominates a feasible one is feasible too).

    Args:
        records: finished trials.
        limit_ms: keep only records with predicted latency at most this; None keeps all.

    Returns:
        The front, ordered by latency then trial number.
    """
    pool = [r for r in records if limit_ms is None or r.latency_ms <= limit_ms + _TOLERANCE_MS]
    front = [
        r
        for r in pool
        if not any(
            o.accuracy >= r.accuracy
            and o.latency_ms <= r.latency_ms
            and (o.accuracy > r.accuracy or o.latency_ms < r.latency_ms)
            for o in pool
        )
    ]
    return sorted(front, key=lambda r: (r.latency_ms, r.number))


def median_upper_bound(samples_ms: list[float]) -> float:
    """The median plus two standard errors of the median (robust: the spread from the median absolute deviation).

    A schedule is only exported when this bound is within the budget, so that measuring it again (``tuner apply``)
    finds its median within the budget too, not just half of the time.

    Example:
        >>> round(median_upper_bound([10.0, 10.2, 9.8, 10.1, 9.9]), 3)
        10.166
    """
    ordered = sorted(samples_ms)
    median = statistics.median(ordered)
    if len(ordered) < 2:
        return median
    mad = statistics.median(abs(sample - median) for sample in ordered)
    sigma = 1.4826 * mad
    return median + 2.0 * 1.2533 * sigma / math.sqrt(len(ordered))


@dataclass
class Finalist:
    """A front schedule scored on the held-out slice, and possibly re-measured.

    Attributes:
        record: its trial.
        schedule: its schedule.
        accuracy_holdout: accuracy on the held-out slice.
        measured: the re-measured latency (interleaved with the unpruned model), once measured.
        baseline: the unpruned latency measured in the same interleaved run.
        limit_ms: the budget in ms against that baseline.
    """

    record: TrialRecord
    schedule: Schedule
    accuracy_holdout: float
    measured: LatencyResult | None = None
    baseline: LatencyResult | None = None
    limit_ms: float | None = None

    @property
    def meets_budget(self) -> bool:
        """Whether the re-measured median is within the budget with confidence (see :func:`median_upper_bound`)."""
        if self.measured is None or self.limit_ms is None:
            return False
        return median_upper_bound(self.measured.samples_ms) <= self.limit_ms

    @property
    def excess_ms(self) -> float:
        """Measured median minus the limit (or predicted minus the budget when not re-measured)."""
        if self.measured is not None and self.limit_ms is not None:
            return self.measured.median_ms - self.limit_ms
        return float("inf")


@dataclass
class Selection:
    """The outcome of :func:`select_schedule`.

    Attributes:
        budget: the budget chosen against.
        budget_ms: its limit in ms against the study's calibrated unpruned latency (the search's basis).
        prefer: ``accurate`` or ``fast``.
        records: every finished trial.
        front: the feasible Pareto front (predicted latency).
        finalists: front schedules scored on the held-out slice, in preference order.
        chosen: the exported schedule, or None when no schedule meets the budget.
        closest: when none does: the finalist with the smallest measured excess, or the trial with the smallest
            predicted excess when nothing was predicted feasible.
        accuracy_holdout_unpruned: the unpruned model on the held-out slice.
        notes: what happened on the way (a first choice failing its re-measurement, ...).
    """

    budget: Budget
    budget_ms: float
    prefer: Prefer
    records: list[TrialRecord]
    front: list[TrialRecord]
    finalists: list[Finalist] = field(default_factory=list)
    chosen: Finalist | None = None
    closest: Finalist | TrialRecord | None = None
    accuracy_holdout_unpruned: float | None = None
    notes: list[str] = field(default_factory=list)


def _preference_order(records: list[TrialRecord], prefer: Prefer) -> list[TrialRecord]:
    if prefer == "fast":
        return sorted(records, key=lambda r: (r.latency_ms, -r.accuracy, r.number))
    return sorted(records, key=lambda r: (-r.accuracy, r.latency_ms, r.number))


def _holdout(context: StudyContext, evaluator: Evaluator, schedule: Schedule) -> float:
    """Held-out accuracy of a schedule, from the study's cache or measured (and stored)."""
    fingerprint = schedule.fingerprint()
    stored = context.holdout_accuracy(fingerprint)
    if stored is not None:
        return stored
    with apply(evaluator.model, schedule):
        accuracy = evaluator.accuracy("holdout")
    context.study.set_user_attr(ATTR_HOLDOUT_PREFIX + fingerprint, accuracy)
    return accuracy


def _remeasure(evaluator: Evaluator, meter: LatencyMeter, schedule: Schedule) -> tuple[LatencyResult, LatencyResult]:
    """``(baseline, candidate)``: the unpruned model and the schedule timed round-robin."""
    native_call = evaluator.latency_call()
    model = evaluator.model

    def candidate_call() -> None:
        # Applying and removing is a few attribute writes, microseconds against a forward of milliseconds.
        with apply(model, schedule):
            native_call()

    baseline, candidate = meter.measure_interleaved([native_call, candidate_call])
    return baseline, candidate


def select_schedule(
    context: StudyContext,
    evaluator: Evaluator,
    meter: LatencyMeter,
    *,
    budget: Budget | None = None,
    prefer: Prefer = "accurate",
    note: Callable[[str], None] = lambda message: None,
) -> Selection:
    """Choose the schedule to export (see the module docstring), storing held-out scores and the outcome in the study.

    Args:
        context: the study.
        evaluator: its evaluator (rebuilt with the study's arguments); no schedule applied.
        meter: measures the re-measurements (use many repeats).
        budget: the budget to choose against; None for the study's.
        prefer: ``accurate`` or ``fast``.
        note: receives progress lines.

    Returns:
        The selection; ``chosen`` is None when no schedule meets the budget.
    """
    budget = budget or context.budget
    budget_ms = context.budget_ms(budget)
    records = trial_records(context.study)
    front = pareto_front(records, budget_ms)
    selection = Selection(budget=budget, budget_ms=budget_ms, prefer=prefer, records=records, front=front)
    if not records:
        selection.notes.append("the study has no finished trial")
        return selection
    if not front:
        selection.closest = min(records, key=lambda r: (r.latency_ms - budget_ms, -r.accuracy, r.number))
        selection.notes.append(f"no trial's predicted latency is within the budget {budget} ({budget_ms:.2f} ms)")
        _store_outcome(context, selection)
        return selection

    shape = context.shape
    unpruned = Schedule.none(shape.num_layers, shape.tokens_in, family=shape.family, has_cls=shape.has_cls)
    seen: set[str] = set()
    candidates = []
    for record in _preference_order(front, prefer):
        if record.fingerprint not in seen:
            seen.add(record.fingerprint)
            candidates.append(record)
    candidates = candidates[:MAX_FINALISTS]
    note(f"scoring {len(candidates)} Pareto-optimal schedules and the unpruned model on the held-out slice")
    selection.accuracy_holdout_unpruned = _holdout(context, evaluator, unpruned)
    finalists = []
    for record in candidates:
        schedule = context.schedule_of(record.trial)
        finalists.append(Finalist(record, schedule, _holdout(context, evaluator, schedule)))
    selection.finalists = finalists

    for finalist in selection.finalists:
        note(f"re-measuring trial {finalist.record.number} interleaved with the unpruned model")
        finalist.baseline, finalist.measured = _remeasure(evaluator, meter, finalist.schedule)
        finalist.limit_ms = budget.limit_ms(finalist.baseline.median_ms)
        if finalist.meets_budget:
            selection.chosen = finalist
            break
        selection.notes.append(
            f"trial {finalist.record.number} re-measured {finalist.measured.median_ms:.2f} ms (upper bound "
            f"{median_upper_bound(finalist.measured.samples_ms):.2f} ms), not safely within the budget "
            f"{finalist.limit_ms:.2f} ms; taking the next schedule"
        )
    if selection.chosen is None:
        measured = [f for f in selection.finalists if f.measured is not None]
        selection.closest = min(measured, key=lambda f: (f.excess_ms, f.record.number))
        selection.notes.append("no Pareto-optimal schedule met the budget when re-measured")
    _store_outcome(context, selection)
    return selection


def _store_outcome(context: StudyContext, selection: Selection) -> None:
    chosen = selection.chosen
    context.study.set_user_attr(
        ATTR_FINAL,
        {
            "budget": str(selection.budget),
            "prefer": selection.prefer,
            "chosen_trial": chosen.record.number if chosen else None,
            "measured_ms": chosen.measured.median_ms if chosen and chosen.measured else None,
            "baseline_ms": chosen.baseline.median_ms if chosen and chosen.baseline else None,
            "accuracy_holdout": chosen.accuracy_holdout if chosen else None,
            "finalists": [f.record.number for f in selection.finalists],
            "at": _now(),
        },
    )


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _latency_summary(result: LatencyResult) -> dict[str, Any]:
    return {
        "median": result.median_ms,
        "median_upper_bound": median_upper_bound(result.samples_ms),
        "p90": result.p90_ms,
        "spread_ms": result.p90_ms - result.median_ms,
        "samples": len(result.samples_ms),
        "samples_ms": [round(sample, 4) for sample in result.samples_ms],
    }


def exported_schedule(
    selection: Selection, context: StudyContext, evaluator: Evaluator, meter: LatencyMeter
) -> Schedule:
    """The chosen schedule with its metrics and provenance (the ``best.json`` document).

    ``provenance.timestamps`` holds the only values that differ between two identical runs besides measured times.

    Raises:
        ValueError: nothing was chosen.
    """
    chosen = selection.chosen
    if chosen is None or chosen.measured is None or chosen.baseline is None or chosen.limit_ms is None:
        raise ValueError("no schedule was chosen")
    record, schedule = chosen.record, chosen.schedule
    latency_model = context.latency_model
    unpruned_holdout = selection.accuracy_holdout_unpruned
    metrics: dict[str, Any] = {
        "accuracy_calib": record.accuracy,
        "accuracy_holdout": chosen.accuracy_holdout,
        "accuracy_calib_unpruned": context.baseline.get("accuracy_calib"),
        "accuracy_holdout_unpruned": unpruned_holdout,
        "accuracy_holdout_kept": (chosen.accuracy_holdout / unpruned_holdout) if unpruned_holdout else None,
        "latency_ms_predicted": record.latency_ms,
        "latency_ms_measured": _latency_summary(chosen.measured),
        "baseline_ms": chosen.baseline.median_ms,
        "baseline_latency_ms_measured": _latency_summary(chosen.baseline),
        "speedup_measured": chosen.baseline.median_ms / chosen.measured.median_ms,
        "speedup_predicted": latency_model.predict_speedup(schedule),
        "flops_speedup": schedule.predicted_speedup(latency_model.hidden_size, latency_model.intermediate_size),
        "tokens_out": schedule.tokens_out,
        "budget": str(selection.budget),
        "budget_ms": chosen.limit_ms,
        "budget_ms_search": selection.budget_ms,
        "feasible": chosen.meets_budget,
        "budget_check": "re-measured median + 2 standard errors <= budget_ms",
        "latency_scope": (
            f"one forward of the {context.meta['evaluator']} evaluator's timed call (vision path) at batch size "
            f"{evaluator.batch_size}, median of {chosen.measured.repeats} runs interleaved with the unpruned model"
        ),
    }
    proposed_by = dict(record.evaluation.get("proposed_by") or {})
    environment = meter.environment()
    provenance: dict[str, Any] = {
        "tool": "tuner",
        "tool_version": __version__,
        "study": context.name,
        "storage": public_url(context.storage_url),
        "trial": record.number,
        "trial_params": dict(record.trial.params),
        "space": context.meta["space"],
        "proposed_by": proposed_by,
        "sampler": proposed_by.get("sampler"),
        "seed": proposed_by.get("seed"),
        "seed_point": proposed_by.get("seed_point"),
        "prefer": selection.prefer,
        "evaluator": context.meta["evaluator"],
        "evaluator_settings": evaluator.settings(),
        "device": str(evaluator.device),
        "device_name": environment["device_name"],
        "dtype": context.settings.get("dtype"),
        "batch_size": evaluator.batch_size,
        "threads": environment["threads"],
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "optuna": optuna.__version__,
            "tuner": __version__,
        },
        "latency_model": context.latency_model.to_dict(),
        "selection": {
            "finalists": [f.record.number for f in selection.finalists],
            "notes": list(selection.notes),
        },
        "timestamps": {"exported": _now(), "study_created": context.meta.get("created")},
    }
    return dataclasses.replace(schedule, metrics=metrics, provenance=provenance)


def write_export(schedule: Schedule, path: str | Path) -> Path:
    """Write the schedule JSON (atomically), creating the folder, readable as any new file is. Returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    schedule.save(target)
    # save() writes through a private temporary file (mode 0600); give the export the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(target, 0o666 & ~umask)
    return target
