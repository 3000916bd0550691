"""Choosing the schedule to export from a study, validating it, and writing it as schedule JSON.

The feasible Pareto front (accuracy on the calibration subset vs *measured* latency, among trials that meet the
budget by the budget rule) is ordered by preference (``accurate``: most accurate on the calibration subset, then
faster, then the lower trial number; ``fast``: fastest, then more accurate) and scored on the held-out slice, which the
choice never looks at: it stays an honest check of what the search picked. Each finalist is measured again,
interleaved with the unpruned model, and the first that meets the budget by the same rule
(:func:`tuner.latency.budget_verdict`) is chosen. When none does, the closest (smallest excess) is reported and
nothing is written.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
import torch
import transformers

from evaluators import Evaluator
from tuner import __version__
from tuner.evoprune import Schedule
from tuner.latency import (
    BASELINE_DRIFT,
    BUDGET_RULE,
    Budget,
    BudgetVerdict,
    LatencySource,
    PairedLatency,
    budget_verdict,
)
from tuner.measure import measure_schedule, unpruned_schedule
from tuner.storage import public_url
from tuner.study import ATTR_FINAL, ATTR_HOLDOUT_PREFIX, StudyContext, TrialRecord, trial_records

__all__ = [
    "MAX_FINALISTS",
    "Finalist",
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


def pareto_front(records: list[TrialRecord], limit_ms: float | None = None) -> list[TrialRecord]:
    """Non-dominated records (maximise accuracy, minimise measured latency), among those that meet ``limit_ms``.

    For the study's own budget this is Optuna's ``study.best_trials`` (the stored constraint is the same rule); it
    also serves other budgets (``export --budget``), where the stored constraint does not apply.

    Args:
        records: finished trials.
        limit_ms: keep only records that meet this limit by the budget rule; None keeps all.

    Returns:
        The front, ordered by latency then trial number.
    """
    pool = [r for r in records if limit_ms is None or r.meets(limit_ms)]
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


@dataclass
class Finalist:
    """A front schedule scored on the held-out slice, and possibly measured again.

    Attributes:
        record: its trial.
        schedule: its schedule.
        accuracy_holdout: accuracy on the held-out slice.
        paired: the re-measurement (interleaved with the unpruned model), once taken.
        verdict: the budget rule on that re-measurement.
    """

    record: TrialRecord
    schedule: Schedule
    accuracy_holdout: float
    paired: PairedLatency | None = None
    verdict: BudgetVerdict | None = None

    @property
    def meets_budget(self) -> bool:
        """Whether the re-measurement meets the budget by the budget rule."""
        return self.verdict is not None and self.verdict.met

    @property
    def excess_ms(self) -> float:
        """The re-measured bound minus the limit (infinite when not re-measured)."""
        if self.verdict is None:
            return float("inf")
        return self.verdict.upper_ms - self.verdict.limit_ms


@dataclass
class Selection:
    """The outcome of :func:`select_schedule`.

    Attributes:
        budget: the budget chosen against.
        budget_ms: its limit in ms against the study's reference unpruned latency.
        prefer: ``accurate`` or ``fast``.
        front: the feasible Pareto front (measured latency, budget rule).
        finalists: front schedules scored on the held-out slice, in preference order.
        chosen: the exported schedule, or None when no schedule meets the budget.
        closest: when none does: the finalist with the smallest re-measured excess, or the trial with the smallest
            measured excess when no trial met the budget.
        accuracy_holdout_unpruned: the unpruned model on the held-out slice.
        notes: what happened on the way (a first choice failing its re-measurement, a loaded machine, ...).
    """

    budget: Budget
    budget_ms: float
    prefer: Prefer
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
    with evaluator.applied(schedule):
        accuracy = evaluator.accuracy("holdout")
    context.study.set_user_attr(ATTR_HOLDOUT_PREFIX + fingerprint, accuracy)
    return accuracy


def select_schedule(
    context: StudyContext,
    evaluator: Evaluator,
    source: LatencySource,
    *,
    budget: Budget | None = None,
    prefer: Prefer = "accurate",
    rounds: int = 20,
    note: Callable[[str], None] = lambda message: None,
) -> Selection:
    """Choose the schedule to export (see the module docstring), storing held-out scores and the outcome in the study.

    Args:
        context: the study.
        evaluator: its evaluator (rebuilt with the study's arguments); no schedule applied.
        source: the study's latency source (measures the finalists again).
        budget: the budget to choose against; None for the study's.
        prefer: ``accurate`` or ``fast``.
        rounds: interleaved rounds of each re-measurement.
        note: receives progress lines.

    Returns:
        The selection; ``chosen`` is None when no schedule meets the budget.
    """
    budget = budget or context.budget
    budget_ms = context.budget_ms(budget)
    records = trial_records(context.study)
    front = pareto_front(records, budget_ms)
    selection = Selection(budget=budget, budget_ms=budget_ms, prefer=prefer, front=front)
    if not records:
        selection.notes.append("the study has no finished trial")
        return selection
    if not front:
        selection.closest = min(records, key=lambda r: (r.upper_ms - budget_ms, -r.accuracy, r.number))
        selection.notes.append(f"no trial's measured latency meets the budget {budget} ({budget_ms:.2f} ms)")
        _store_outcome(context, selection)
        return selection

    seen: set[str] = set()
    candidates = []
    for record in _preference_order(front, prefer):
        if record.fingerprint not in seen:
            seen.add(record.fingerprint)
            candidates.append(record)
    candidates = candidates[:MAX_FINALISTS]
    note(f"scoring {len(candidates)} Pareto-optimal schedules and the unpruned model on the held-out slice")
    selection.accuracy_holdout_unpruned = _holdout(context, evaluator, unpruned_schedule(context.shape))
    selection.finalists = [
        Finalist(record, schedule, _holdout(context, evaluator, schedule))
        for record in candidates
        for schedule in [context.schedule_of(record.trial)]
    ]

    reference = context.reference_ms
    for finalist in selection.finalists:
        note(f"measuring trial {finalist.record.number} again, interleaved with the unpruned model")
        finalist.paired = measure_schedule(evaluator, source, finalist.schedule, rounds, reference)
        finalist.verdict = budget_verdict(finalist.paired, budget, reference)
        drift = finalist.paired.baseline_median_ms / reference - 1.0
        if abs(drift) > BASELINE_DRIFT:
            selection.notes.append(
                f"the unpruned model measured {finalist.paired.baseline_median_ms:.2f} ms beside trial "
                f"{finalist.record.number}, {drift:+.0%} off the study's reference {reference:.2f} ms: the machine is "
                "loaded or not the one the study was made on; verdicts use the ratio to the unpruned model measured "
                "in the same rounds"
            )
        if finalist.meets_budget:
            selection.chosen = finalist
            break
        selection.notes.append(
            f"trial {finalist.record.number} measured again: {finalist.verdict.describe()}; taking the next schedule"
        )
    if selection.chosen is None:
        selection.closest = min(selection.finalists, key=lambda f: (f.excess_ms, f.record.number))
        selection.notes.append("no Pareto-optimal schedule met the budget when measured again")
    _store_outcome(context, selection)
    return selection


def _store_outcome(context: StudyContext, selection: Selection) -> None:
    chosen = selection.chosen
    verdict = chosen.verdict if chosen else None
    context.study.set_user_attr(
        ATTR_FINAL,
        {
            "budget": str(selection.budget),
            "prefer": selection.prefer,
            "chosen_trial": chosen.record.number if chosen else None,
            "latency_ms": verdict.latency_ms if verdict else None,
            "latency_upper_ms": verdict.upper_ms if verdict else None,
            "limit_ms": verdict.limit_ms if verdict else None,
            "baseline_ms": chosen.paired.baseline_median_ms if chosen and chosen.paired else None,
            "accuracy_calib": chosen.record.accuracy if chosen else None,
            "accuracy_holdout": chosen.accuracy_holdout if chosen else None,
            "accuracy_holdout_unpruned": selection.accuracy_holdout_unpruned,
            "finalists": {
                str(f.record.number): {
                    "accuracy_holdout": f.accuracy_holdout,
                    "latency_ms": f.verdict.latency_ms if f.verdict else None,
                    "met": f.meets_budget if f.verdict else None,
                }
                for f in selection.finalists
            },
            "at": _now(),
        },
    )


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def exported_schedule(
    selection: Selection, context: StudyContext, evaluator: Evaluator, source: LatencySource
) -> Schedule:
    """The chosen schedule with its metrics and provenance (the ``best.json`` document).

    ``provenance.timestamps`` holds the only values that differ between two identical runs besides measured times.

    Raises:
        ValueError: nothing was chosen.
    """
    chosen = selection.chosen
    if chosen is None or chosen.paired is None or chosen.verdict is None:
        raise ValueError("no schedule was chosen")
    record, schedule, paired, verdict = chosen.record, chosen.schedule, chosen.paired, chosen.verdict
    unpruned_holdout = selection.accuracy_holdout_unpruned
    metrics: dict[str, Any] = {
        "accuracy_calib": record.accuracy,
        "accuracy_holdout": chosen.accuracy_holdout,
        "accuracy_calib_unpruned": context.baseline.get("accuracy_calib"),
        "accuracy_holdout_unpruned": unpruned_holdout,
        "accuracy_holdout_kept": (chosen.accuracy_holdout / unpruned_holdout) if unpruned_holdout else None,
        "latency_source": context.latency_source,
        "latency_ms": verdict.latency_ms,
        "latency_upper_ms": verdict.upper_ms,
        "latency_ms_search": record.latency_ms,
        "latency_measured": paired.to_dict(context.reference_ms),
        "baseline_ms": context.reference_ms,
        "speedup_measured": 1.0 / paired.ratio,
        "flops_speedup_predicted": _flops_speedup(evaluator, schedule),
        "tokens_out": schedule.tokens_out,
        "budget": str(selection.budget),
        "budget_ms": verdict.limit_ms,
        "feasible": verdict.met,
        "budget_rule": BUDGET_RULE,
        "latency_scope": (
            f"{evaluator.describe_latency()} ({context.meta['evaluator']} evaluator); {len(paired.ratios)} rounds "
            "interleaved with the unpruned model; latency_ms = median ratio x the study's reference unpruned latency "
            f"{context.reference_ms:.2f} ms"
        ),
    }
    proposed_by = dict(record.evaluation.get("proposed_by") or {})
    environment = source.environment()
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
        "device_name": environment.get("device_name", environment["source"]),
        "dtype": context.settings.get("dtype"),
        "batch_size": evaluator.batch_size,
        "threads": environment.get("threads"),
        "workload": context.meta.get("workload"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "optuna": optuna.__version__,
            "tuner": __version__,
        },
        "latency_environment": environment,
        "selection": {
            "finalists": [f.record.number for f in selection.finalists],
            "notes": list(selection.notes),
        },
        "timestamps": {"exported": _now(), "study_created": context.meta.get("created")},
    }
    return dataclasses.replace(schedule, metrics=metrics, provenance=provenance)


def _flops_speedup(evaluator: Evaluator, schedule: Schedule) -> float:
    """The encoder FLOP ratio native / pruned (a prediction, labelled so in the metrics)."""
    from tuner.evoprune.adapters import resolve_encoder

    encoder = resolve_encoder(evaluator.model)
    return schedule.predicted_speedup(encoder.hidden_size, encoder.intermediate_size)


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
