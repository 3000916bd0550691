"""Measuring schedules on an evaluator: the latency source a study names, a schedule's timed call, workload sizing.

Every latency the tuner reports is a schedule's timed call measured in rounds interleaved with the unpruned model
(:func:`measure_schedule`, :class:`~tuner.latency.PairedLatency`); :func:`size_workload` sizes a demo's batch to the
machine so that a budget in ms is within reach of pruning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from evaluators import Evaluator
from search_spaces import EncoderShape
from tuner.errors import StudyError, TunerError
from tuner.evoprune import Schedule, Scoring
from tuner.latency import (
    Budget,
    LatencyMeter,
    LatencySource,
    MeasuredLatency,
    PairedLatency,
    SyntheticLatency,
    WorkloadChoice,
    choose_batch_size,
    synthetic_model,
)
from tuner.options import LATENCY_SOURCES

__all__ = [
    "SIZING_PROBE_KEEP",
    "evaluator_dtype",
    "latency_source_for",
    "measure_schedule",
    "pruned_call",
    "size_workload",
    "sizing_probe",
    "unpruned_schedule",
]


def evaluator_dtype(evaluator: Evaluator) -> Any:
    """The evaluator's model dtype when it says (for the meter's provenance), else None."""
    return getattr(evaluator, "dtype", None)


def latency_source_for(name: str, evaluator: Evaluator, rounds_warmup: int = 1) -> LatencySource:
    """The latency source ``--latency-source`` names, for the evaluator's model and device.

    Raises:
        TunerError: an unknown name.
    """
    if name == "measured":
        return MeasuredLatency(LatencyMeter(evaluator.device, warmup=rounds_warmup, dtype=evaluator_dtype(evaluator)))
    if name == "synthetic":
        return SyntheticLatency(synthetic_model(evaluator.model))
    raise TunerError(f"unknown latency source {name!r}; available: {', '.join(LATENCY_SOURCES)}")


def unpruned_schedule(shape: EncoderShape) -> Schedule:
    """The empty schedule of an encoder (no layer merges)."""
    return Schedule.none(shape.num_layers, shape.tokens_in, family=shape.family, has_cls=shape.has_cls)


def pruned_call(evaluator: Evaluator, schedule: Schedule) -> Callable[[], None]:
    """The evaluator's timed call under ``schedule`` (applied and removed around each call: microseconds)."""
    native_call = evaluator.latency_call()

    def call() -> None:
        with evaluator.applied(schedule):
            native_call()

    return call


def measure_schedule(
    evaluator: Evaluator, source: LatencySource, schedule: Schedule, rounds: int, reference_ms: float | None = None
) -> PairedLatency:
    """``schedule`` timed in ``rounds`` rounds interleaved with the unpruned model (see :class:`PairedLatency`)."""
    return source.paired(evaluator.latency_call(), pruned_call(evaluator, schedule), schedule, rounds, reference_ms)


SIZING_PROBE_KEEP = 0.2
"""Workload sizing's "strong pruning" probe keeps this share of the tokens (see :func:`sizing_probe`)."""


def sizing_probe(shape: EncoderShape) -> Schedule:
    """The schedule workload sizing holds against the budget: the kind the search finds on the demo.

    The paper's Decreasing family (alpha 3.5: most merging in the first layers) to 20% of the tokens, with the
    diversity term and no attention statistics. On the demo (2-core CPUs, batch 24-96) it runs at 0.46-0.6 of the
    unpruned time, and schedules of this shape kept the unpruned calibration accuracy in earlier studies.
    """
    tokens_out = max(1, round(SIZING_PROBE_KEEP * shape.tokens_in))
    return Schedule.preset(
        "decreasing", num_layers=shape.num_layers, tokens_in=shape.tokens_in, tokens_out=tokens_out, alpha=3.5,
        scoring=Scoring(w_div=0.5, w_attn=0.0, ctr=0.0), family=shape.family, has_cls=shape.has_cls,
    )  # fmt: skip


def size_workload(
    evaluator: Evaluator, budget: Budget, note: Callable[[str], None] = lambda message: None
) -> WorkloadChoice:
    """Size the evaluator's timed batch to this machine for a budget in ms (see :func:`choose_batch_size`).

    The probe (:func:`sizing_probe`) is measured interleaved with the unpruned model at each candidate batch. The
    evaluator is left at the chosen batch.

    Raises:
        StudyError: the evaluator cannot change its batch, or the budget is not a time.
    """
    resize = getattr(evaluator, "set_batch_size", None)
    if resize is None or budget.kind != "ms":
        raise StudyError("only an evaluator with set_batch_size and a budget in ms can size its workload")
    probe = sizing_probe(EncoderShape.of_model(evaluator.model))
    source = MeasuredLatency(LatencyMeter(evaluator.device, warmup=1, dtype=evaluator_dtype(evaluator)))

    def measure(batch: int) -> tuple[float, float]:
        resize(batch)
        paired = measure_schedule(evaluator, source, probe, rounds=6)
        return paired.baseline_median_ms, paired.candidate_median_ms

    note(f"sizing the demo workload to this machine for the budget {budget} (unpruned vs {probe.describe()})")
    choice = choose_batch_size(measure, budget.limit_ms(1.0))
    resize(choice.batch_size)
    return choice

