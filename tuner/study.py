"""The study runner: an Optuna multi-objective study (maximise accuracy, minimise latency_ms) under a latency budget.

Optuna does the searching (its samplers), the storing (``RDBStorage``, any SQLAlchemy URL; :mod:`tuner.storage`),
the resuming (a study is loaded by name, trial numbers continue), the feasibility bookkeeping
(``trial.set_constraint``, ``study.best_trials``) and the clean-up of dead workers (heartbeats,
``RetryHeartbeatStaleTrialCallback``). This module adds the tuner's own:

- a study's *identity* (evaluator settings, budget, space, device, dtype, batch size, latency source), stored as a
  user attr and compared on resume;
- a *reference* unpruned latency, measured once when the study is created (after the workload was sized to the
  machine, for a demo budget in ms);
- the trial objective: space -> schedule -> accuracy on the calibration subset (cached by schedule fingerprint) and
  *measured* latency: the schedule timed in rounds interleaved with the unpruned model, ``latency_ms`` = median
  per-round ratio x reference; the constraint is the budget rule of :func:`tuner.latency.budget_verdict`;
- seed trials (no pruning, the paper's Skip default) enqueued when a study is new.
"""

from __future__ import annotations

import contextlib
import datetime
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evaluators import Evaluator, get_evaluator
from search_spaces import EncoderShape, SearchSpace, get_space
from tuner import __version__
from tuner.errors import StudyError
from tuner.evoprune import Schedule
from tuner.latency import Budget, LatencySource, WorkloadChoice, parse_budget
from tuner.measure import latency_source_for, measure_schedule
from tuner.options import RESUMABLE, RunOptions, make_sampler
from tuner.signals import StopRequest, Terminated
from tuner.storage import public_url, storage_errors
from tuner.workers import ATTR_WORKER, DeadTrial, TrialHeartbeat, owner_record, reap_dead_trials

__all__ = [
    "ATTR_BASELINE",
    "ATTR_EVALUATION",
    "ATTR_FINAL",
    "ATTR_HOLDOUT_PREFIX",
    "ATTR_META",
    "ATTR_REQUESTED",
    "ATTR_SCHEDULE",
    "ATTR_SEARCH",
    "ATTR_SEED_POINT",
    "ATTR_SETTINGS",
    "CONSTRAINT_KEY",
    "DIRECTIONS",
    "METRIC_NAMES",
    "StudyContext",
    "StudyRunner",
    "TrialOutcome",
    "TrialRecord",
    "check_resume",
    "create_or_resume",
    "evaluator_from_context",
    "load_study",
    "trial_records",
]

DIRECTIONS = ("maximize", "minimize")
METRIC_NAMES = ("accuracy", "latency_ms")
CONSTRAINT_KEY = "latency_over_budget_ms"
"""The trial constraint: the measured latency's bound (median ratio + 2 standard errors, times the reference) minus
the budget in ms; <= 0 is feasible (the rule of :func:`tuner.latency.budget_verdict`)."""

# Study user attrs.
ATTR_SETTINGS = "tuner.settings"
ATTR_SEARCH = "tuner.search"
ATTR_META = "tuner.meta"
ATTR_REQUESTED = "tuner.requested_trials"
ATTR_BASELINE = "tuner.baseline"
ATTR_FINAL = "tuner.final"
ATTR_HOLDOUT_PREFIX = "tuner.holdout."
# Trial user attrs.
ATTR_SCHEDULE = "schedule"
ATTR_EVALUATION = "evaluation"
ATTR_SEED_POINT = "seed_point"


# ---------------------------------------------------------------------------------------------------------- context


@dataclass
class StudyContext:
    """What a tuner study stores about itself (its user attrs), readable without the model.

    Attributes:
        study: the Optuna study.
        storage_url: where it lives.
        settings: the identity (compared on resume).
        meta: encoder shape, evaluator name and arguments, space, workload, tool version, creation time.
        baseline: unpruned accuracy and the reference latency (``latency_ms``, with its samples) measured at creation.
    """

    study: optuna.Study
    storage_url: str
    settings: dict[str, Any]
    meta: dict[str, Any]
    baseline: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, study: optuna.Study, storage_url: str) -> StudyContext:
        """Read a tuner study's attrs.

        Raises:
            StudyError: not a study made by ``tuner run``, or one whose creation was interrupted.
        """
        attrs = study.user_attrs
        if ATTR_SETTINGS not in attrs or ATTR_META not in attrs:
            raise StudyError(
                f"study {study.study_name!r} in {public_url(storage_url)} was not made by `tuner run`; "
                "give a tuner study (see `tuner studies`)"
            )
        if ATTR_BASELINE not in attrs:
            raise StudyError(
                f"study {study.study_name!r} has no reference latency yet (its first run was interrupted); "
                "run `tuner run` with the same settings to finish it"
            )
        return cls(
            study=study,
            storage_url=storage_url,
            settings=dict(attrs[ATTR_SETTINGS]),
            meta=dict(attrs[ATTR_META]),
            baseline=dict(attrs[ATTR_BASELINE]),
        )

    @property
    def name(self) -> str:
        return self.study.study_name

    @property
    def shape(self) -> EncoderShape:
        """The encoder the study's schedules are for."""
        return EncoderShape(**self.meta["encoder"])

    @property
    def space(self) -> SearchSpace:
        return get_space(self.meta["space"])

    @property
    def budget(self) -> Budget:
        return parse_budget(self.settings["budget"])

    @property
    def reference_ms(self) -> float:
        """The unpruned latency measured when the study was created: trial latencies are ratios times this."""
        return float(self.baseline["latency_ms"])

    @property
    def latency_source(self) -> str:
        """``measured``, or ``synthetic`` for a deterministic study made for tests."""
        return str(self.settings.get("latency_source", "measured"))

    @property
    def search(self) -> dict[str, Any]:
        """The study's sampler and seed (``{"sampler": "tpe", "seed": 0}`` for a study made before they were kept)."""
        found = self.study.user_attrs.get(ATTR_SEARCH)
        return dict(found) if isinstance(found, dict) else {"sampler": "tpe", "seed": 0}

    @property
    def requested_trials(self) -> int | None:
        """``--trials`` of the latest run (finished trials it asked the study to hold)."""
        value = self.study.user_attrs.get(ATTR_REQUESTED)
        return int(value) if value is not None else None

    def budget_ms(self, budget: Budget | None = None) -> float:
        """The limit in ms of ``budget`` (default: the study's) against the reference unpruned latency."""
        return (budget or self.budget).limit_ms(self.reference_ms)

    def schedule_of(self, trial: FrozenTrial) -> Schedule:
        """The schedule a trial's parameters stand for (the space's deterministic map)."""
        return self.space.to_schedule(trial.params, self.shape)

    def holdout_accuracy(self, fingerprint: str) -> float | None:
        """A held-out accuracy stored for a schedule fingerprint, if any."""
        value = self.study.user_attrs.get(ATTR_HOLDOUT_PREFIX + fingerprint)
        return float(value) if value is not None else None


def evaluator_from_context(context: StudyContext) -> Evaluator:
    """Rebuild the evaluator a study was made with (same arguments), e.g. for ``export``.

    Raises:
        EvaluatorError: it cannot be built here (no such model any more, no CUDA, ...).
    """
    meta = context.meta
    build: Callable[..., Evaluator] = get_evaluator(meta["evaluator"])
    arguments = {**meta["evaluator_args"], "batch_size": context.settings["batch_size"]}
    return build(**arguments, seed=0)


# ---------------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class TrialRecord:
    """One finished trial as the tuner reads it back.

    Attributes:
        trial: the Optuna trial.
        accuracy: accuracy on the calibration subset (objective 0).
        latency_ms: measured latency (objective 1): median ratio to the unpruned model x the study's reference.
        feasible: whether the stored constraint holds (the budget rule on the measured latency).
        evaluation: the trial's ``evaluation`` user attr (samples, ratio, bound, fingerprint, ...).
        summary: the schedule's one-line description.
    """

    trial: FrozenTrial
    accuracy: float
    latency_ms: float
    feasible: bool
    evaluation: dict[str, Any]
    summary: str

    @property
    def number(self) -> int:
        return self.trial.number

    @property
    def latency(self) -> dict[str, Any]:
        """The paired measurement's record (:meth:`PairedLatency.to_dict`): ratio, bound, samples, noise."""
        found = self.evaluation.get("latency")
        return found if isinstance(found, dict) else {}

    @property
    def upper_ms(self) -> float:
        """The bound the budget rule compares (median ratio + 2 standard errors, times the reference)."""
        return float(self.latency.get("latency_upper_ms", self.latency_ms))

    def meets(self, limit_ms: float) -> bool:
        """Whether the trial's measured latency meets a limit by the budget rule (``upper_ms <= limit_ms``)."""
        return self.upper_ms <= limit_ms + 1e-9

    @property
    def noisy(self) -> bool:
        """The measurement stayed noisy after its re-measurements (a loaded machine)."""
        return bool(self.latency.get("noisy", False))

    @property
    def fingerprint(self) -> str:
        return str(self.evaluation.get("fingerprint", ""))

    @property
    def tokens_out(self) -> int | None:
        value = self.evaluation.get("tokens_out")
        return int(value) if value is not None else None


def trial_records(study: optuna.Study) -> list[TrialRecord]:
    """Every COMPLETE trial of a tuner study, in trial-number order."""
    records = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.values is None or len(trial.values) != 2:
            continue
        constraints = trial.constraints
        records.append(
            TrialRecord(
                trial=trial,
                accuracy=float(trial.values[0]),
                latency_ms=float(trial.values[1]),
                feasible=all(value <= 0 for value in constraints.values()),
                evaluation=dict(trial.user_attrs.get(ATTR_EVALUATION, {})),
                summary=str(trial.user_attrs.get(ATTR_SCHEDULE, "")),
            )
        )
    return records


# ----------------------------------------------------------------------------------------------- create or resume


def _identity(options: RunOptions, evaluator: Evaluator, budget: Budget) -> dict[str, Any]:
    """The settings that define the objective: a resumed study must match them."""
    identity = dict(evaluator.settings())
    identity.update(
        {
            "evaluator": options.evaluator_name,
            "budget": str(budget),
            "space": options.space,
            "batch_size": evaluator.batch_size,
            "device": evaluator.device.type,
            "latency_source": options.latency_source,
        }
    )
    return dict(sorted(identity.items()))


def _search(options: RunOptions) -> dict[str, Any]:
    """The search settings a study keeps: its sampler and seed (another one on resume would change the trials)."""
    return {"sampler": options.sampler, "seed": options.seed}


def _differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    keys = list(dict.fromkeys([*wanted, *stored]))
    return [
        f"{key} {_short(stored.get(key))} -> {_short(wanted.get(key))}"
        for key in keys
        if stored.get(key) != wanted.get(key)
    ]


def _short(value: Any) -> str:
    text = "unset" if value is None else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _refuse_differences(study_name: str, storage_url: str, differences: list[str]) -> None:
    if differences:
        raise StudyError(
            f"study {study_name!r} in {public_url(storage_url)} was made with different settings: "
            f"{', '.join(differences)}; give another study name or the same settings (only "
            f"{', '.join(RESUMABLE)} may change on resume)",
            param=("study", *RESUMABLE),
        )


PRECHECKED = ("evaluator", "budget", "space", "latency_source", "calib", "holdout", "batch_size")
"""Identity settings a resumed study is checked on before its model loads (the rest need the loaded task)."""


def check_resume(study: optuna.Study, storage_url: str, options: RunOptions, budget: Budget, device: str) -> None:
    """Refuse, before any model loads, a resume whose settings differ from the stored study's where that can be
    told from the settings alone: the sampler and seed, the evaluator, budget, space, latency source and device, and
    the sizes given explicitly. :func:`create_or_resume` checks the whole identity once the task is loaded.

    Raises:
        StudyError: the differences, named.
    """
    stored = study.user_attrs.get(ATTR_SETTINGS)
    wanted: dict[str, Any] = {
        "evaluator": options.evaluator_name, "budget": str(budget), "space": options.space,
        "latency_source": options.latency_source, "device": device, "calib": options.calib,
        "holdout": options.holdout, "batch_size": options.batch_size, "latency_scope": options.latency_scope,
        "frames": options.frames,
    }  # fmt: skip
    differences = []
    if isinstance(stored, dict):
        known = {key: value for key, value in wanted.items() if key in stored and value is not None}
        differences += _differences({key: stored[key] for key in known}, known)
    stored_search = study.user_attrs.get(ATTR_SEARCH)
    if isinstance(stored_search, dict):
        differences += _differences(stored_search, _search(options))
    _refuse_differences(study.study_name, storage_url, differences)


def create_or_resume(
    storage: optuna.storages.BaseStorage,
    storage_url: str,
    study_name: str,
    options: RunOptions,
    evaluator: Evaluator,
    budget: Budget,
    note: Callable[[str], None],
    workload: WorkloadChoice | None = None,
) -> tuple[StudyContext, bool]:
    """Load the study ``study_name`` if it exists (checking its settings), else create and set it up.

    A new study gets its metric names, settings, meta (with the ``workload`` choice, if the batch was sized), the
    space's seed trials, and its reference: the unpruned model's latency (``final_repeats`` runs of the latency
    source) and calibration accuracy. An existing one must have the same settings; seed, sampler, trials, timeout,
    prefer and the measurement rounds may change.

    Returns:
        ``(context, resumed)``.

    Raises:
        StudyError: the study exists with other settings (the message lists the differences), or is not a tuner study.
    """
    space = get_space(options.space)
    identity = _identity(options, evaluator, budget)
    sampler = optuna.samplers.RandomSampler()  # placeholder; the runner sets the real one once trials are counted
    try:
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
        existing = True
    except KeyError:
        existing = False
    if existing:
        stored = study.user_attrs.get(ATTR_SETTINGS)
        has_trials = len(study.get_trials(deepcopy=False)) > 0
        if stored is None and has_trials:
            raise StudyError(
                f"study {study_name!r} in {public_url(storage_url)} was not made by `tuner run`; give another study "
                "name",
                param="study",
            )
        differences = _differences(stored, identity) if stored is not None else []
        stored_search = study.user_attrs.get(ATTR_SEARCH)
        if isinstance(stored_search, dict):
            differences += _differences(stored_search, _search(options))
        _refuse_differences(study_name, storage_url, differences)
        if [d.name.lower() for d in study.directions] != list(DIRECTIONS):
            raise StudyError(
                f"study {study_name!r} does not maximise accuracy and minimise latency; give another study name",
                param="study",
            )
    else:
        study = optuna.create_study(
            storage=storage, study_name=study_name, directions=["maximize", "minimize"], sampler=sampler
        )

    shape = EncoderShape.of_model(evaluator.model, frames_per_item=evaluator.frames_per_item)
    attrs = study.user_attrs
    if ATTR_SETTINGS not in attrs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(METRIC_NAMES))
        study.set_user_attr(ATTR_SETTINGS, identity)
        study.set_user_attr(
            ATTR_META,
            {
                "tool_version": __version__,
                "space": options.space,
                "evaluator": options.evaluator_name,
                "evaluator_args": options.evaluator_args(),
                "encoder": {
                    "num_layers": shape.num_layers,
                    "tokens_in": shape.tokens_in,
                    "family": shape.family,
                    "has_cls": shape.has_cls,
                    "frames_per_item": shape.frames_per_item,
                },
                "workload": workload.to_dict() if workload is not None else None,
                "created": _now(),
            },
        )
    if ATTR_SEARCH not in attrs:
        study.set_user_attr(ATTR_SEARCH, _search(options))
    if ATTR_BASELINE not in attrs:
        # Seeds first: an interruption before the reference is stored leaves the study "new", and the next run
        # enqueues again (skip_if_exists keeps one of each).
        for point in space.distinct_seed_points(shape):
            study.enqueue_trial(point.params, user_attrs={ATTR_SEED_POINT: point.label}, skip_if_exists=True)
        source = latency_source_for(options.latency_source, evaluator, rounds_warmup=3)
        note(f"timed: {evaluator.describe_latency()}")
        note(f"measuring the unpruned model's reference latency ({options.final_repeats} runs, {source.name})")
        baseline = _reference(evaluator, source, options.final_repeats, note)
        study.set_user_attr(ATTR_BASELINE, baseline)
    else:
        _requeue_interrupted_seeds(study, space, shape)
    return StudyContext.load(study, storage_url), existing and ATTR_SETTINGS in attrs


REFERENCE_BLOCKS = 4
"""The reference is measured in this many blocks, spread over time (the calibration accuracy pass between two)."""

SLOW_BLOCK = 1.15
"""A block whose median is this much slower than the fastest block's was a slow phase of the machine: left out."""


def _reference(evaluator: Evaluator, source: LatencySource, runs: int, note: Callable[[str], None]) -> dict[str, Any]:
    """The study's reference: the unpruned model's latency (and its calibration accuracy).

    Measured in :data:`REFERENCE_BLOCKS` blocks spread over time; a block more than :data:`SLOW_BLOCK` slower than the
    fastest one fell in a slow phase of a shared host and is left out (and said so), since every trial's latency is
    its measured ratio times this value.
    """
    call = evaluator.latency_call()
    per_block = max(3, -(-runs // REFERENCE_BLOCKS))
    blocks = []
    accuracy = None
    for index in range(REFERENCE_BLOCKS):
        blocks.append(source.reference(call, per_block))
        if index == REFERENCE_BLOCKS // 2 - 1:
            note("scoring the unpruned model on the calibration subset")
            accuracy = evaluator.accuracy("calib")
    fastest = min(block.median_ms for block in blocks)
    kept = [block for block in blocks if block.median_ms <= SLOW_BLOCK * fastest]
    if len(kept) < len(blocks):
        slow = ", ".join(f"{block.median_ms:.1f}" for block in blocks if block not in kept)
        note(
            f"left out {len(blocks) - len(kept)} of {len(blocks)} blocks of the reference measurement as a slow phase "
            f"of the machine (medians {slow} ms against {fastest:.1f} ms)"
        )
    samples = [sample for block in kept for sample in block.samples_ms]
    ordered = sorted(samples)
    return {
        "accuracy_calib": accuracy,
        "latency_ms": statistics.median(samples),
        "latency_p90_ms": ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))],
        "latency_samples_ms": [round(sample, 4) for sample in samples],
        "latency_blocks_ms": [round(block.median_ms, 4) for block in blocks],
        "latency_source": source.name,
        "environment": source.environment(),
        "measured": _now(),
    }


def _requeue_interrupted_seeds(study: optuna.Study, space: SearchSpace, shape: EncoderShape) -> None:
    """Enqueue again a seed trial whose only run failed (interrupted), so no seed point is lost to a Ctrl-C."""
    trials = study.get_trials(deepcopy=False)
    alive = {TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING}
    for point in space.distinct_seed_points(shape):
        runs = [trial for trial in trials if trial.user_attrs.get(ATTR_SEED_POINT) == point.label]
        if runs and not any(trial.state in alive for trial in runs):
            study.enqueue_trial(point.params, user_attrs={ATTR_SEED_POINT: point.label})


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------------------- runner


@dataclass
class TrialOutcome:
    """What one finished objective call reports to the progress display and the overhead benchmark.

    Attributes:
        number: trial number.
        summary: the schedule's one-line description.
        tokens_out: patch tokens after the encoder.
        accuracy: calibration accuracy.
        latency_ms: measured latency (the objective): median ratio to the unpruned model x the reference.
        upper_ms: the bound the budget rule compares.
        baseline_ms: the unpruned model's median in the same rounds (None when reused from an identical schedule).
        feasible: meets the budget by the budget rule.
        noisy: the measurement stayed noisy after its re-measurements.
        duplicate_of: the trial whose evaluation was reused, or None.
        seed_point: the seed label of an enqueued trial, or None.
        forward_s: seconds spent in model forward passes (accuracy and latency calls).
        objective_s: seconds of the whole objective call.
    """

    number: int
    summary: str
    tokens_out: int
    accuracy: float
    latency_ms: float
    upper_ms: float
    baseline_ms: float | None
    feasible: bool
    noisy: bool
    duplicate_of: int | None
    seed_point: str | None
    forward_s: float
    objective_s: float


class StudyRunner:
    """Runs trials of one study: the objective, the evaluation cache, the Optuna loop.

    Args:
        context: the study and what it stores.
        evaluator: the task (its model is where schedules are applied).
        source: where latencies come from (the study's latency source).
        sampler_name: ``--sampler``.
        seed: ``--seed``.
        rounds: interleaved rounds of each trial's latency measurement.
        on_trial: called with each :class:`TrialOutcome` (the progress display).
        worker: the worker's index (0 in a single-process run; workers count from 1), mixed into the sampler's seed.
        on_dead: called with the trials found left behind by dead processes (before the first trial and after each).

    Attributes:
        stop: the signals' request (set by the caller inside :func:`tuner.signals.graceful_stop`): a hard stop fails
            a trial that was asked for but not yet started.
        in_trial: whether an objective call is running now.
    """

    def __init__(
        self,
        context: StudyContext,
        evaluator: Evaluator,
        source: LatencySource,
        sampler_name: str,
        seed: int,
        rounds: int = 8,
        on_trial: Callable[[TrialOutcome], None] | None = None,
        worker: int = 0,
        on_dead: Callable[[list[DeadTrial]], None] | None = None,
    ) -> None:
        self.context = context
        self.worker = worker
        self.on_dead = on_dead
        self.stop: StopRequest | None = None
        self.in_trial = False
        self.evaluator = evaluator
        self.source = source
        self.space = context.space
        self.shape = context.shape
        self.reference_ms = context.reference_ms
        self.budget_ms = context.budget_ms()
        self.sampler_name = sampler_name
        self.seed = seed
        self.rounds = rounds
        self.on_trial = on_trial
        self.outcomes: list[TrialOutcome] = []
        self.evaluations = 0
        self.current_trial: optuna.Trial | None = None
        self._cache: dict[str, dict[str, Any]] = {}
        for record in trial_records(context.study):
            if record.fingerprint and record.evaluation.get("duplicate_of") is None:
                self._cache.setdefault(record.fingerprint, {**record.evaluation, "trial": record.number})
        finished = len(context.study.get_trials(deepcopy=False))
        context.study.sampler = make_sampler(sampler_name, seed, finished, worker)

    @property
    def study(self) -> optuna.Study:
        return self.context.study

    def completed(self) -> int:
        """COMPLETE trials in the study."""
        return len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    def objective(self, trial: optuna.Trial) -> tuple[float, float]:
        """One trial: schedule -> (accuracy on the calibration subset, measured latency in ms), with the constraint.

        The trial first records which process runs it (:data:`tuner.workers.ATTR_WORKER`), so that it is found and
        retried should this process die.
        """
        if self.stop is not None and self.stop.hard:
            raise Terminated(self.stop.signal_name or "SIGTERM")  # Optuna marks the trial failed
        self.in_trial = True
        try:
            with TrialHeartbeat(self.study, trial._trial_id):
                return self._objective(trial)
        finally:
            self.in_trial = False

    def _objective(self, trial: optuna.Trial) -> tuple[float, float]:
        started = time.perf_counter()
        trial.set_user_attr(ATTR_WORKER, owner_record(trial.number))
        self.current_trial = trial
        schedule = self.space.sample(trial, self.shape)
        fingerprint = schedule.fingerprint()
        cached = self._cache.get(fingerprint)
        forward_s = 0.0
        baseline_ms: float | None = None
        if cached is None:
            forward_started = time.perf_counter()
            with self.evaluator.applied(schedule):
                accuracy = self.evaluator.accuracy("calib")
            paired = measure_schedule(self.evaluator, self.source, schedule, self.rounds, self.reference_ms)
            forward_s = time.perf_counter() - forward_started
            self.evaluations += 1
            baseline_ms = paired.baseline_median_ms
            evaluation: dict[str, Any] = {
                "fingerprint": fingerprint,
                "tokens_out": schedule.tokens_out,
                "remove_per_layer": schedule.remove_per_layer,
                "accuracy_calib": accuracy,
                "latency": paired.to_dict(self.reference_ms),
                "duplicate_of": None,
            }
            self._cache[fingerprint] = {**evaluation, "trial": trial.number}
        else:
            evaluation = {key: value for key, value in cached.items() if key != "trial"}
            evaluation["duplicate_of"] = cached["trial"]
            accuracy = float(cached["accuracy_calib"])
        latency = evaluation["latency"]
        latency_ms, upper_ms = float(latency["latency_ms"]), float(latency["latency_upper_ms"])
        evaluation["proposed_by"] = self._proposer(trial)
        trial.set_user_attr(ATTR_SCHEDULE, schedule.describe())
        trial.set_user_attr(ATTR_EVALUATION, evaluation)
        # Readable in any Optuna tool without opening the evaluation record.
        trial.set_user_attr("latency_ms_measured", round(latency_ms, 4))
        trial.set_user_attr("tokens_out", schedule.tokens_out)
        trial.set_constraint(CONSTRAINT_KEY, upper_ms - self.budget_ms)
        outcome = TrialOutcome(
            number=trial.number,
            summary=schedule.describe(),
            tokens_out=schedule.tokens_out,
            accuracy=accuracy,
            latency_ms=latency_ms,
            upper_ms=upper_ms,
            baseline_ms=baseline_ms,
            feasible=upper_ms <= self.budget_ms + 1e-9,
            noisy=bool(latency.get("noisy")) and cached is None,
            duplicate_of=evaluation["duplicate_of"],
            seed_point=trial.user_attrs.get(ATTR_SEED_POINT),
            forward_s=forward_s,
            objective_s=time.perf_counter() - started,
        )
        self.outcomes.append(outcome)
        if self.on_trial is not None:
            self.on_trial(outcome)
        return accuracy, latency_ms

    def _proposer(self, trial: optuna.Trial) -> dict[str, Any]:
        label = trial.user_attrs.get(ATTR_SEED_POINT)
        if label is not None:
            return {"by": "seed point", "seed_point": label}
        return {"by": "sampler", "sampler": self.sampler_name, "seed": self.seed}

    def run(self, total_trials: int, timeout: float | None, share: int | None = None) -> int:
        """Run trials until the study holds ``total_trials`` finished ones (or ``timeout`` seconds pass).

        Before the first trial and after each one, trials left RUNNING by dead processes on this host are failed and
        queued again (:func:`tuner.workers.reap_dead_trials`; ``on_dead`` hears of them).

        Args:
            total_trials: finished trials the study should hold (the run's ``--trials``).
            timeout: seconds, or None.
            share: a worker's share: run at most this many trials, and stop early once the study holds
                ``total_trials`` (other workers finished them); the study's requested count is left as it is.

        Returns:
            Trials run in this session.
        """
        with storage_errors(self.context.storage_url):
            self._reap()
            if share is None:
                self.study.set_user_attr(ATTR_REQUESTED, total_trials)
            missing = max(0, total_trials - self.completed())
            if share is not None:
                missing = min(missing, share)
            if missing == 0:
                return 0
            before = len(self.outcomes)

            def after_trial(study: optuna.Study, _trial: FrozenTrial) -> None:
                self._reap()
                if share is not None and self.completed() >= total_trials:
                    study.stop()

            self.study.optimize(
                self.objective, n_trials=missing, timeout=timeout, gc_after_trial=False, callbacks=[after_trial]
            )
        return len(self.outcomes) - before

    def _reap(self) -> None:
        dead = reap_dead_trials(self.study)
        if dead and self.on_dead is not None:
            self.on_dead(dead)

    def stop_search(self) -> bool:
        """Ask the search to end after the running trial; False when no search is running (outside ``optimize``)."""
        try:
            self.study.stop()
        except RuntimeError:
            return False
        return True

    def fail_unfinished(self) -> None:
        """Mark this session's last trial failed if it is still running (after a hard interrupt)."""
        trial = self.current_trial
        if trial is None:
            return
        with contextlib.suppress(Exception), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = next(t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number)
            if stored.state == TrialState.RUNNING:
                self.study.tell(trial.number, state=TrialState.FAIL)


def load_study(storage: optuna.storages.BaseStorage, storage_url: str, name: str | None) -> optuna.Study:
    """A stored study by name; without a name, the only study in the storage.

    Raises:
        StudyError: no such study (the message lists the stored ones), or several and no name.
    """
    with storage_errors(storage_url):
        names = [summary.study_name for summary in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if name is None:
        if len(names) == 1:
            name = names[0]
        else:
            listed = ", ".join(names) if names else "none"
            raise StudyError(
                f"give a study name: {public_url(storage_url)} holds {len(names)} studies ({listed})", param="study"
            )
    if name not in names:
        listed = ", ".join(names) if names else "none"
        raise StudyError(f"no study {name!r} in {public_url(storage_url)}; stored studies: {listed}")
    with storage_errors(storage_url):
        return optuna.load_study(study_name=name, storage=storage)
