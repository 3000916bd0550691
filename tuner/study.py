"""The study runner: an Optuna multi-objective study (maximise accuracy, minimise latency_ms) under a latency budget.

Optuna does the searching (its samplers), the storing (``RDBStorage``, any SQLAlchemy URL), the resuming (a study is
loaded by name, trial numbers continue), the feasibility bookkeeping (``trial.set_constraint``, ``study.best_trials``)
and the clean-up of dead workers (heartbeats, ``RetryHeartbeatStaleTrialCallback``). This module adds the tuner's own:

- a study's *identity* (evaluator settings, budget, space, device, dtype, batch size, latency source), stored as a
  user attr and compared on resume;
- a *reference* unpruned latency, measured once when the study is created (after the workload was sized to the
  machine, for a demo budget in ms);
- the trial objective: space -> schedule -> accuracy on the calibration subset (cached by schedule fingerprint) and
  *measured* latency: the schedule timed in rounds interleaved with the unpruned model, ``latency_ms`` = median
  per-round ratio x reference; the constraint is the budget rule of :func:`evaluators.latency.budget_verdict`;
- seed trials (no pruning, the paper's Skip default) enqueued when a study is new.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from evaluators import (
    Budget,
    Evaluator,
    LatencyMeter,
    LatencySource,
    MeasuredLatency,
    PairedLatency,
    SyntheticLatency,
    get_evaluator,
    parse_budget,
)
from evaluators.latency import WorkloadChoice, choose_batch_size, synthetic_model
from search_spaces import EncoderShape, SearchSpace, get_space
from tuner import __version__
from tuner.evoprune import Schedule, apply

__all__ = [
    "CONSTRAINT_KEY",
    "DEFAULT_STORAGE",
    "DIRECTIONS",
    "METRIC_NAMES",
    "SAMPLERS",
    "RunOptions",
    "StorageError",
    "StudyContext",
    "StudyRunner",
    "TrialRecord",
    "TunerError",
    "create_or_resume",
    "default_study_name",
    "evaluator_dtype",
    "evaluator_from_context",
    "make_sampler",
    "open_storage",
    "output_dir",
    "public_url",
    "resolve_device_name",
    "stop_on_interrupt",
    "trial_records",
    "tune_allocator",
    "LATENCY_SOURCES",
    "latency_source_for",
    "measure_schedule",
    "pruned_call",
    "size_workload",
    "unpruned_schedule",
]

DEFAULT_STORAGE = "sqlite:///studies/tuner.db"
"""Where studies are kept unless ``--storage`` says otherwise (relative to the current folder)."""

DIRECTIONS = ("maximize", "minimize")
METRIC_NAMES = ("accuracy", "latency_ms")
CONSTRAINT_KEY = "latency_over_budget_ms"
"""The trial constraint: the measured latency's bound (median ratio + 2 standard errors, times the reference) minus
the budget in ms; <= 0 is feasible (the rule of :func:`evaluators.latency.budget_verdict`)."""

LATENCY_SOURCES = ("measured", "synthetic")
"""``--latency-source`` values: real timings (the default), or a deterministic model made for tests (never a
measurement)."""

SAMPLERS = ("tpe", "nsga2", "gp", "random")
"""Sampler names ``--sampler`` accepts (TPE is the default)."""

HEARTBEAT_S = 20
GRACE_S = 60
"""A trial whose worker sent no heartbeat for this long is failed (and its parameters retried once) on resume."""

# Study user attrs.
ATTR_SETTINGS = "tuner.settings"
ATTR_META = "tuner.meta"
ATTR_REQUESTED = "tuner.requested_trials"
ATTR_BASELINE = "tuner.baseline"
ATTR_FINAL = "tuner.final"
ATTR_HOLDOUT_PREFIX = "tuner.holdout."
# Trial user attrs.
ATTR_SCHEDULE = "schedule"
ATTR_EVALUATION = "evaluation"
ATTR_SEED_POINT = "seed_point"

_SQLITE_HEADER = b"SQLite format 3\x00"
SQLITE_BUSY_TIMEOUT_S = 10
"""How long an SQLite write waits for another process's lock before the run gives up with a one-line error."""


class TunerError(ValueError):
    """Bad input the runner finds (storage, study identity, sampler, ...): one line naming the problem and the fix."""


class StorageError(TunerError):
    """The storage cannot be opened or used: bad URL, locked, corrupt, missing driver."""


# --------------------------------------------------------------------------------------------------------- storage


def public_url(url: str) -> str:
    """The storage URL without its password (for messages and provenance)."""
    return re.sub(r"(?<=://)([^:/@]+):[^@/]*@", r"\1:***@", url)


def _sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (None for other URLs and in-memory SQLite)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///") :].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path)


def _sqlite_fast_writes(storage: optuna.storages.RDBStorage) -> None:
    """WAL journal and ``synchronous=NORMAL`` on every SQLite connection.

    A commit then costs about a millisecond instead of tens (one fsync per checkpoint, not per commit). A killed
    process still loses nothing it committed; only a power cut may lose the last commits, never corrupt the file.
    """
    from sqlalchemy import event

    def on_connect(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # connections opened before the listener reconnect with it


def _storage_error(url: str, error: BaseException) -> StorageError:
    # Optuna wraps driver errors (StorageInternalError "... during the commit"): read the whole chain.
    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = " ".join(str(part) for part in chain).lower()
    shown = public_url(url)
    if "locked" in text or "busy" in text:
        return StorageError(
            f"storage {shown} is locked by another process (a run or a dashboard writing it); wait for it to finish, "
            "or use another --storage"
        )
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return StorageError(
            f"storage {shown} is not a readable SQLite database (corrupt or another kind of file); it was left "
            "untouched: move it away or use another --storage"
        )
    if "no module named" in text or isinstance(error, ModuleNotFoundError):
        return StorageError(
            f"storage {shown} needs a database driver that is not installed ({error}); install it "
            "(PostgreSQL: pip install 'tuner[postgres]')"
        )
    if "unable to open database file" in text:
        return StorageError(f"cannot open storage {shown}: the folder is missing or not writable; fix the path")
    if "compatible" in text and "schema" in text:
        return StorageError(
            f"storage {shown} was written by another Optuna version ({_first_line(error)}); "
            f"run `optuna storage upgrade --storage {shown}`"
        )
    return StorageError(f"cannot use storage {shown}: {_first_line(chain[-1])}; check --storage")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn database errors raised inside the block into one-line :class:`StorageError`."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
        raise _storage_error(url, error) from None


def _retry_stale() -> dict[str, Any]:
    """The RDBStorage argument that re-enqueues (once) a trial whose worker died (Optuna >= 4.9 names it anew)."""
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
        return {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
    return {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=1)}  # pragma: no cover


def open_storage(url: str, *, create: bool = True) -> optuna.storages.RDBStorage:
    """Open an Optuna ``RDBStorage`` (any SQLAlchemy URL), with heartbeats so dead workers' trials get retried.

    For a ``sqlite:///`` file: its folder is created when missing (``create``), an existing file must be an SQLite
    database (it is never modified otherwise), and writes use WAL (:func:`_sqlite_fast_writes`).

    Args:
        url: the storage URL, e.g. ``sqlite:///studies/tuner.db`` or ``postgresql://user:pw@host/db``.
        create: create a missing SQLite file (False: a missing file is an error, for read-only commands).

    Returns:
        The storage.

    Raises:
        StorageError: a bad URL, a missing, locked or corrupt file, a missing driver; one line with the fix.
    """
    path = _sqlite_path(url)
    if path is not None:
        if path.exists():
            if path.is_dir():
                raise StorageError(f"storage {url} is a folder, not a database file; point --storage at a file")
            with open(path, "rb") as stream:
                header = stream.read(len(_SQLITE_HEADER))
            if header and header != _SQLITE_HEADER:
                raise StorageError(
                    f"storage {url} is not an SQLite database (corrupt or another kind of file); it was left "
                    "untouched: move it away or use another --storage"
                )
        elif not create:
            raise StorageError(f"storage {url} does not exist; run `tuner run` first or check --storage")
        else:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise StorageError(
                    f"cannot create the folder of storage {url}: {error.strerror or error}; give a writable path"
                ) from None
    elif "://" not in url:
        raise StorageError(f"invalid --storage {url!r}: give a database URL such as {DEFAULT_STORAGE}")
    engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}} if path is not None else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S, **_retry_stale()
            )
        if path is not None:
            _sqlite_fast_writes(storage)
            storage.get_all_studies()  # touches the file now, so a corrupt body fails here and not mid-run
    except StorageError:
        raise
    except Exception as error:  # noqa: BLE001 - SQLAlchemy, drivers and Optuna raise many kinds for a bad storage
        raise _storage_error(url, error) from None
    return storage


# ------------------------------------------------------------------------------------------------------- allocator

_ALLOCATOR = {"tuned": False}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def tune_allocator() -> bool:
    """Keep freed tensor memory in the process (glibc ``mallopt``), so latency does not depend on the process's past.

    With glibc's defaults, large CPU tensors are mapped and unmapped on every forward (page faults), and the dynamic
    thresholds change as a process runs: the same forward measured 25-35% slower in a fresh process than after a
    calibration (demo, 2 cores). Raising the mmap threshold to 32 MiB and the trim threshold to 1 GiB removes that
    history dependence (and the slowdown), so ``tuner run`` and ``tuner apply`` measure alike. The cost: up to about
    1 GiB of freed memory stays with the process. Does nothing off glibc, or when ``MALLOC_MMAP_THRESHOLD_`` is set.

    Returns:
        Whether the allocator is tuned.
    """
    if _ALLOCATOR["tuned"] or not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return _ALLOCATOR["tuned"]
    try:
        libc = ctypes.CDLL("libc.so.6")
        tuned = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        tuned = False
    _ALLOCATOR["tuned"] = tuned
    return tuned


# ------------------------------------------------------------------------------------------------- names and paths


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


def default_study_name(model: str | None, evaluator: str, dataset: str | None, device: str, budget: Budget) -> str:
    """A study name from what defines the task: model, task (evaluator and dataset), device and budget.

    Example:
        >>> default_study_name(None, "demo", None, "cpu", parse_budget("50ms"))
        'demo-cpu-50ms'
        >>> default_study_name("openai/clip-vit-base-patch16", "zeroshot", "./data/pets", "cuda", parse_budget("60%"))
        'clip-vit-base-patch16-zeroshot-pets-cuda-60pct'
    """
    parts = [Path(model.rstrip("/")).name if model else "demo"]
    if evaluator != "demo" or model:
        parts.append(evaluator)
    if dataset:
        parts.append(Path(dataset.rstrip("/")).name)
    parts += [device, str(budget).replace("%", "pct")]
    return _slug("-".join(parts))


def output_dir(study_name: str, root: str | os.PathLike[str] = "studies") -> Path:
    """``studies/<study>/`` under the current folder (the study name made safe for a folder name)."""
    return Path(root) / _slug(study_name)


def resolve_device_name(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is here, else ``cpu``; anything else as given (checked by the evaluator)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ---------------------------------------------------------------------------------------------------------- sampler


def make_sampler(name: str, seed: int, finished_trials: int = 0) -> optuna.samplers.BaseSampler:
    """The Optuna sampler ``name``, seeded from ``seed`` and the trials the study already has.

    Mixing in ``finished_trials`` keeps a resumed study from replaying the random draws of its first session, while
    two fresh studies with the same seed still draw the same.

    Args:
        name: one of :data:`SAMPLERS`.
        seed: the run's seed.
        finished_trials: trials already in the study.

    Raises:
        TunerError: an unknown name.
    """
    if name not in SAMPLERS:
        raise TunerError(f"unknown sampler {name!r}; available: {', '.join(SAMPLERS)}")
    session_seed = int(np.random.SeedSequence([seed, finished_trials]).generate_state(1)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            # Multivariate over the parameters every trial has; the family's conditional shape parameters are sampled
            # independently (``group=True`` models them jointly too but reads the storage once per group: +10 ms a
            # trial here, 2% of a demo trial).
            return optuna.samplers.TPESampler(seed=session_seed, multivariate=True)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=session_seed, population_size=20)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=session_seed)
        return optuna.samplers.RandomSampler(seed=session_seed)


# ---------------------------------------------------------------------------------------------------------- options


@dataclass
class RunOptions:
    """Everything ``tuner run`` is told (see its ``--help``).

    Attributes:
        budget: latency budget text (``50ms``, ``0.05s``, ``2x``, ``60%``).
        trials: finished trials the study should hold at the end (a resumed study runs only the missing ones).
        timeout: seconds of searching in this session, or None.
        seed: sampler seed.
        sampler: one of :data:`SAMPLERS`.
        storage: storage URL.
        study: study name, or None for :func:`default_study_name`.
        model: model folder or hub id, or None for the demo.
        dataset: dataset, or None.
        evaluator: evaluator name, or None (``demo`` without a model, ``fidelity`` with one).
        calib: calibration items, or None for the evaluator's default.
        holdout: held-out items, or None for the evaluator's default.
        batch_size: items per forward, or None for the evaluator's default.
        device: ``auto``, ``cpu`` or ``cuda``.
        dtype: ``auto``, ``fp32``, ``fp16`` or ``bf16``.
        space: search space name.
        repeats: interleaved rounds (schedule + unpruned model) of a trial's latency measurement.
        final_repeats: rounds of the reference measurement and of the export's re-measurements.
        latency_source: ``measured`` (real timings) or ``synthetic`` (deterministic, for tests; never a measurement).
        prefer: which feasible Pareto-optimal schedule the export takes: ``accurate`` or ``fast``.
    """

    budget: str
    trials: int = 200
    timeout: float | None = None
    seed: int = 0
    sampler: str = "tpe"
    storage: str = DEFAULT_STORAGE
    study: str | None = None
    model: str | None = None
    dataset: str | None = None
    evaluator: str | None = None
    calib: int | None = None
    holdout: int | None = None
    batch_size: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    space: str = "family"
    repeats: int = 8
    final_repeats: int = 20
    latency_source: str = "measured"
    prefer: str = "accurate"

    @property
    def evaluator_name(self) -> str:
        """The evaluator to use: as given, else ``demo`` without a model and ``fidelity`` with one."""
        if self.evaluator:
            return self.evaluator
        return "fidelity" if self.model else "demo"

    def evaluator_args(self) -> dict[str, Any]:
        """Constructor arguments of the evaluator (stored in the study, so ``export`` can rebuild it)."""
        return {
            "model": self.model,
            "dataset": self.dataset,
            "calib": self.calib,
            "holdout": self.holdout,
            "batch_size": self.batch_size,
            "device": resolve_device_name(self.device),
            "dtype": self.dtype,
        }


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
            TunerError: not a study made by ``tuner run``, or one whose creation was interrupted.
        """
        attrs = study.user_attrs
        if ATTR_SETTINGS not in attrs or ATTR_META not in attrs:
            raise TunerError(
                f"study {study.study_name!r} in {public_url(storage_url)} was not made by `tuner run`; "
                "give a tuner study (see `tuner studies`)"
            )
        if ATTR_BASELINE not in attrs:
            raise TunerError(
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
    model = evaluator.model

    def call() -> None:
        with apply(model, schedule):
            native_call()

    return call


def measure_schedule(
    evaluator: Evaluator, source: LatencySource, schedule: Schedule, rounds: int, reference_ms: float | None = None
) -> PairedLatency:
    """``schedule`` timed in ``rounds`` rounds interleaved with the unpruned model (see :class:`PairedLatency`)."""
    return source.paired(evaluator.latency_call(), pruned_call(evaluator, schedule), schedule, rounds, reference_ms)


SIZING_PROBE_KEEP = 0.25
"""Workload sizing times the paper's Skip schedule at this share of tokens as the "strong pruning" probe."""


def size_workload(
    evaluator: Evaluator, budget: Budget, note: Callable[[str], None] = lambda message: None
) -> WorkloadChoice:
    """Size the evaluator's timed batch to this machine for a budget in ms (see :func:`choose_batch_size`).

    The probe is the paper's Skip schedule to 25% of the tokens with the paper's scoring, measured interleaved with
    the unpruned model at each candidate batch. The evaluator is left at the chosen batch.

    Raises:
        TunerError: the evaluator cannot change its batch, or the budget is not a time.
    """
    resize = getattr(evaluator, "set_batch_size", None)
    if resize is None or budget.kind != "ms":
        raise TunerError("only an evaluator with set_batch_size and a budget in ms can size its workload")
    shape = EncoderShape.of_model(evaluator.model)
    tokens_out = max(1, round(SIZING_PROBE_KEEP * shape.tokens_in))
    probe = Schedule.preset("skip", num_layers=shape.num_layers, tokens_in=shape.tokens_in, tokens_out=tokens_out,
                            family=shape.family, has_cls=shape.has_cls)  # fmt: skip
    source = MeasuredLatency(LatencyMeter(evaluator.device, warmup=1, dtype=evaluator_dtype(evaluator)))

    def measure(batch: int) -> tuple[float, float]:
        resize(batch)
        paired = measure_schedule(evaluator, source, probe, rounds=5)
        return paired.baseline_median_ms, paired.candidate_median_ms

    note(f"sizing the demo workload to this machine for the budget {budget} (unpruned vs {probe.describe()})")
    choice = choose_batch_size(measure, budget.limit_ms(1.0))
    resize(choice.batch_size)
    return choice


def create_or_resume(
    storage: optuna.storages.RDBStorage,
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
        TunerError: the study exists with other settings (the message lists the differences), or is not a tuner study.
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
            raise TunerError(
                f"study {study_name!r} in {public_url(storage_url)} was not made by `tuner run`; use --study NEW_NAME"
            )
        if stored is not None and stored != identity:
            raise TunerError(
                f"study {study_name!r} in {public_url(storage_url)} was made with different settings: "
                f"{', '.join(_differences(stored, identity))}; use --study NEW_NAME or the same settings"
            )
        if [d.name.lower() for d in study.directions] != list(DIRECTIONS):
            raise TunerError(
                f"study {study_name!r} does not maximise accuracy and minimise latency; use --study NEW_NAME"
            )
    else:
        study = optuna.create_study(
            storage=storage, study_name=study_name, directions=["maximize", "minimize"], sampler=sampler
        )

    shape = EncoderShape.of_model(evaluator.model)
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
                },
                "workload": workload.to_dict() if workload is not None else None,
                "created": _now(),
            },
        )
    if ATTR_BASELINE not in attrs:
        # Seeds first: an interruption before the reference is stored leaves the study "new", and the next run
        # enqueues again (skip_if_exists keeps one of each).
        for point in space.distinct_seed_points(shape):
            study.enqueue_trial(point.params, user_attrs={ATTR_SEED_POINT: point.label}, skip_if_exists=True)
        source = latency_source_for(options.latency_source, evaluator, rounds_warmup=3)
        note(f"measuring the unpruned model's reference latency ({options.final_repeats} runs, {source.name})")
        reference = source.reference(evaluator.latency_call(), options.final_repeats)
        note("scoring the unpruned model on the calibration subset")
        baseline = {
            "accuracy_calib": evaluator.accuracy("calib"),
            "latency_ms": reference.median_ms,
            "latency_p90_ms": reference.p90_ms,
            "latency_samples_ms": [round(sample, 4) for sample in reference.samples_ms],
            "latency_source": source.name,
            "environment": source.environment(),
            "measured": _now(),
        }
        study.set_user_attr(ATTR_BASELINE, baseline)
    else:
        _requeue_interrupted_seeds(study, space, shape)
    return StudyContext.load(study, storage_url), existing and ATTR_SETTINGS in attrs


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
    ) -> None:
        self.context = context
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
        context.study.sampler = make_sampler(sampler_name, seed, finished)

    @property
    def study(self) -> optuna.Study:
        return self.context.study

    def completed(self) -> int:
        """COMPLETE trials in the study."""
        return len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    def objective(self, trial: optuna.Trial) -> tuple[float, float]:
        """One trial: schedule -> (accuracy on the calibration subset, measured latency in ms), with the constraint."""
        started = time.perf_counter()
        self.current_trial = trial
        schedule = self.space.sample(trial, self.shape)
        fingerprint = schedule.fingerprint()
        cached = self._cache.get(fingerprint)
        forward_s = 0.0
        baseline_ms: float | None = None
        if cached is None:
            forward_started = time.perf_counter()
            with apply(self.evaluator.model, schedule):
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

    def run(self, total_trials: int, timeout: float | None) -> int:
        """Run trials until the study holds ``total_trials`` finished ones (or ``timeout`` seconds pass).

        Returns:
            Trials run in this session.
        """
        self.study.set_user_attr(ATTR_REQUESTED, total_trials)
        missing = max(0, total_trials - self.completed())
        if missing == 0:
            return 0
        before = len(self.outcomes)
        with storage_errors(self.context.storage_url):
            self.study.optimize(self.objective, n_trials=missing, timeout=timeout, gc_after_trial=False)
        return len(self.outcomes) - before

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


@dataclass
class StopRequest:
    """Set by :func:`stop_on_interrupt` when Ctrl-C asked the search to stop."""

    requested: bool = False


@contextlib.contextmanager
def stop_on_interrupt(study: optuna.Study, note: Callable[[str], None]) -> Iterator[StopRequest]:
    """First Ctrl-C: let the running trial finish, then stop (``study.stop()``); a second one interrupts at once.

    Outside the main thread (where signal handlers cannot be set) Ctrl-C keeps its default behaviour.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def on_interrupt(_signum: int, _frame: Any) -> None:
        if request.requested:
            raise KeyboardInterrupt
        try:
            study.stop()
        except RuntimeError:  # not inside the optimisation loop
            raise KeyboardInterrupt from None
        request.requested = True
        note("stopping after the running trial (Ctrl-C again to stop at once)")

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield request
    finally:
        signal.signal(signal.SIGINT, previous)


def load_study(storage: optuna.storages.RDBStorage, storage_url: str, name: str | None) -> optuna.Study:
    """A stored study by name; without a name, the only study in the storage.

    Raises:
        TunerError: no such study (the message lists the stored ones), or several and no name.
    """
    with storage_errors(storage_url):
        names = [summary.study_name for summary in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if name is None:
        if len(names) == 1:
            name = names[0]
        else:
            listed = ", ".join(names) if names else "none"
            raise TunerError(f"give --study: {public_url(storage_url)} holds {len(names)} studies ({listed})")
    if name not in names:
        listed = ", ".join(names) if names else "none"
        raise TunerError(f"no study {name!r} in {public_url(storage_url)}; stored studies: {listed}")
    with storage_errors(storage_url):
        return optuna.load_study(study_name=name, storage=storage)


def evaluator_dtype(evaluator: Evaluator) -> Any:
    """The evaluator's model dtype when it says (for the meter's provenance), else None."""
    return getattr(evaluator, "dtype", None)
