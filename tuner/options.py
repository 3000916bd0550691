"""What a run is told: :class:`RunOptions`, its recipes (TOML files), and what follows from it alone (the sampler,
the device name, the default study name, the output folder).

A *recipe* is a TOML file of :class:`RunOptions` fields (``tuner run --config studies/demo.toml``); flags given on the
command line override it:

    >>> recipe = load_recipe_text('budget = "50ms"\\ntrials = 40\\nsampler = "nsga2"', "inline")
    >>> RunOptions(**recipe).sampler, RunOptions(**recipe).trials
    ('nsga2', 40)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from tuner.errors import EvaluatorError, TunerError
from tuner.latency import Budget
from tuner.storage import DEFAULT_STORAGE, same_storage, storage_path

__all__ = [
    "LATENCY_SOURCES",
    "RESUMABLE",
    "SAMPLERS",
    "RunOptions",
    "default_study_name",
    "load_recipe",
    "load_recipe_text",
    "make_sampler",
    "output_dir",
    "resolve_device_name",
    "storage_key",
]

LATENCY_SOURCES = ("measured", "synthetic")
"""``latency_source`` values: real timings (the default), or a deterministic model made for tests (never a
measurement)."""

SAMPLERS = ("tpe", "nsga2", "gp", "random")
"""Sampler names ``sampler`` accepts (TPE is the default)."""

RESUMABLE = ("trials", "timeout", "prefer", "repeats", "final_repeats", "workers")
"""Settings that may differ when a study is resumed (or joined by a worker); every other setting defines the study, and
a run that gives another value is refused with the difference named."""


@dataclass
class RunOptions:
    """Everything ``tuner run`` is told (see its ``--help``; each field is the flag of the same name).

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
        dataset_split: the dataset's split, or None for test, validation or train, whichever it has first.
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
        workers: local worker processes (``python -m tuner worker``) that run the trials; 1 runs them in this
            process.
        latency_scope: what is timed: ``encoder``, ``prefill`` or ``generate`` (``evaluators.base.LATENCY_SCOPES``);
            None for the evaluator's default (``prefill`` for the LLaVA tasks, ``encoder`` for the others).
        new_tokens: tokens generated per timed call with the ``generate`` scope.
        frames: frames sampled per video for a video task (``videomme``), or None for the evaluator's default; other
            tasks refuse it.
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
    dataset_split: str | None = None
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
    workers: int = 1
    latency_scope: str | None = None
    new_tokens: int = 16
    frames: int | None = None

    @property
    def evaluator_name(self) -> str:
        """The evaluator to use: as given, else ``demo`` without a model and ``fidelity`` with one."""
        if self.evaluator:
            return self.evaluator
        return "fidelity" if self.model else "demo"

    def validate(self) -> Budget:
        """Check every setting that can be checked without loading a model or touching the storage.

        Returns:
            The parsed budget.

        Raises:
            TunerError: (or a subclass: BudgetError, SearchSpaceError, EvaluatorError) one line naming the setting.
        """
        from evaluators import get_evaluator
        from evaluators.loading import resolve_device, resolve_dtype
        from search_spaces import get_space
        from tuner.latency import parse_budget

        budget = parse_budget(self.budget)
        get_space(self.space)
        if self.sampler not in SAMPLERS:
            raise TunerError(f"unknown sampler {self.sampler!r}; available: {', '.join(SAMPLERS)}")
        if self.latency_source not in LATENCY_SOURCES:
            raise TunerError(f"unknown latency source {self.latency_source!r}; available: {', '.join(LATENCY_SOURCES)}")
        if self.prefer not in ("accurate", "fast"):
            raise TunerError(f"prefer must be accurate or fast, got {self.prefer!r}", param="prefer")
        get_evaluator(self.evaluator_name)
        resolve_dtype(self.dtype, resolve_device(resolve_device_name(self.device)))
        if self.timeout is not None and self.timeout <= 0:
            raise TunerError(f"timeout must be a number of seconds > 0, got {self.timeout:g}", param="timeout")
        for name in ("trials", "repeats", "final_repeats", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TunerError(f"{name} must be an integer >= 1, got {value!r}", param=name)
        if self.workers > 1 and self.storage.startswith("sqlite"):
            raise TunerError(
                f"workers {self.workers} cannot share an SQLite storage (one writer at a time: they would wait on its "
                "lock or fail); give a PostgreSQL URL or journal:///path as storage, or workers 1",
                param=("workers", "storage"),
            )
        self._validate_task()
        return budget

    def _validate_task(self) -> None:
        """The task's settings, checked without loading anything: sizes, required options, model and dataset names.

        The export re-scores its finalists on the held-out slice, so ``holdout`` must be 1 or more now, not after
        the search.
        """
        from evaluators import get_evaluator
        from evaluators.loading import check_source

        for name, minimum in (("calib", 1), ("holdout", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                why = " (the export validates its choice on the held-out slice)" if name == "holdout" else ""
                raise EvaluatorError(f"{name} must be an integer >= {minimum}{why}, got {value!r}", param=name)
        evaluator = get_evaluator(self.evaluator_name)
        evaluator.check_latency_scope(self.latency_scope, self.new_tokens)
        evaluator.check_frames(self.frames)
        evaluator.check_required({"model": self.model, "dataset": self.dataset})
        for kind in ("model", "dataset"):
            value = getattr(self, kind)
            if value is not None and evaluator.requires:
                check_source(value, kind)

    def evaluator_args(self) -> dict[str, Any]:
        """Constructor arguments of the evaluator (stored in the study, so ``export`` can rebuild it)."""
        return {
            "model": self.model,
            "dataset": self.dataset,
            "dataset_split": self.dataset_split,
            "calib": self.calib,
            "holdout": self.holdout,
            "batch_size": self.batch_size,
            "device": resolve_device_name(self.device),
            "dtype": self.dtype,
            "latency_scope": self.latency_scope,
            "new_tokens": self.new_tokens,
            # Only when given: evaluators without video (plugins' among them) never see the keyword.
            **({"frames": self.frames} if self.frames is not None else {}),
        }


# ---------------------------------------------------------------------------------------------------------- recipes

_KINDS: dict[str, tuple[type, ...]] = {
    field.name: (float, int) if field.name == "timeout" else (int,) if "int" in str(field.type) else (str,)
    for field in dataclasses.fields(RunOptions)
}


def load_recipe_text(text: str, source: str) -> dict[str, Any]:
    """The :class:`RunOptions` fields a recipe's TOML text sets (a subset; checked, not yet defaulted).

    Args:
        text: the TOML text: ``name = value`` lines, names of :class:`RunOptions` fields.
        source: where it comes from (for messages).

    Raises:
        TunerError: not TOML, an unknown key (the message lists the valid ones) or a value of the wrong type; the
            message names the ``config`` parameter.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise TunerError("reading a config needs Python 3.11 or the tomli package", param="config") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise TunerError(f"config {source} is not valid TOML: {error}", param="config") from None
    valid = ", ".join(_KINDS)
    for key, value in document.items():
        kinds = _KINDS.get(key)
        if kinds is None:
            raise TunerError(f"unknown key {key!r} in config {source}; valid keys: {valid}", param="config")
        if isinstance(value, bool) or not isinstance(value, kinds):
            wanted = "a number" if float in kinds else "an integer" if int in kinds else "a string"
            raise TunerError(f"key {key!r} in config {source} must be {wanted}, got {value!r}", param="config")
    return document


def load_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The :class:`RunOptions` fields a recipe file sets (see :func:`load_recipe_text`).

    Raises:
        TunerError: the file cannot be read, or its content is not a recipe.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise TunerError(f"cannot read config {os.fspath(path)}: {error.strerror or error}", param="config") from None
    return load_recipe_text(text, os.fspath(path))


# ------------------------------------------------------------------------------------------------- names and paths


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


def default_study_name(model: str | None, evaluator: str, dataset: str | None, device: str, budget: Budget) -> str:
    """A study name from what defines the task: model, task (evaluator and dataset), device and budget.

    Example:
        >>> from tuner.latency import parse_budget
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


def output_dir(study_name: str, root: str | os.PathLike[str] = "studies", *, storage: str = DEFAULT_STORAGE) -> Path:
    """Where a study's outputs go: ``studies/<study>/`` under the current folder for a study in the default storage,
    ``studies/<study>@<storage key>/`` for one in any other storage, so that two storages holding studies of the same
    name never overwrite each other's ``best.json`` (the study name made safe for a folder name).

    Example:
        >>> output_dir("demo-cpu-50ms").as_posix()
        'studies/demo-cpu-50ms'
        >>> output_dir("demo-cpu-50ms", storage="postgresql://tuner:secret@db/studies").as_posix()
        'studies/demo-cpu-50ms@postgresql-db-studies-7fef94bc'
    """
    folder = _slug(study_name)
    if not same_storage(storage, DEFAULT_STORAGE):
        folder += "@" + storage_key(storage)
    return Path(root) / folder


def storage_key(storage: str) -> str:
    """A short folder-safe name of a storage: its kind, where it is (never its password) and a hash of the whole.

    File storages are keyed by their absolute path, so one file reached by two spellings gets one key.

    Example:
        >>> storage_key("postgresql://tuner:secret@db/studies")
        'postgresql-db-studies-7fef94bc'
    """
    path = storage_path(storage)
    scheme = storage.split(":", 1)[0]
    kind = scheme.split("+")[0]
    if path is not None:
        identity = f"{scheme}:{path.resolve()}"
        readable = f"{kind}-{path.stem}"
    else:
        location = re.sub(r"^[^:]+://([^@/]*@)?", "", storage)
        identity = f"{scheme}://{location}"  # without user and password: a changed password keeps the folder
        readable = f"{kind}-{location}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:8]
    return f"{_slug(readable)[:48]}-{digest}"


def resolve_device_name(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is here, else ``cpu``; anything else as given (checked by the evaluator)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ---------------------------------------------------------------------------------------------------------- sampler


def make_sampler(name: str, seed: int, finished_trials: int = 0, worker: int = 0) -> optuna.samplers.BaseSampler:
    """The Optuna sampler ``name``, seeded from ``seed``, the trials the study already has and the worker.

    Mixing in ``finished_trials`` keeps a resumed study from replaying the random draws of its first session, while
    two fresh studies with the same seed still draw the same; mixing in ``worker`` keeps parallel workers from
    drawing the same. TPE runs with a constant liar: a worker treats the others' running trials as bad results, so
    it does not propose the same region while they are measured.

    Args:
        name: one of :data:`SAMPLERS`.
        seed: the run's seed.
        finished_trials: trials already in the study.
        worker: the worker's index (0 for a run in one process; ``python -m tuner worker`` processes count from 1).

    Raises:
        TunerError: an unknown name.
    """
    if name not in SAMPLERS:
        raise TunerError(f"unknown sampler {name!r}; available: {', '.join(SAMPLERS)}")
    entropy = [seed, finished_trials] if worker == 0 else [seed, finished_trials, worker]
    session_seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            # Multivariate over the parameters every trial has; the family's conditional shape parameters are sampled
            # independently (``group=True`` models them jointly too but reads the storage once per group: +10 ms a
            # trial here, 2% of a demo trial).
            return optuna.samplers.TPESampler(seed=session_seed, multivariate=True, constant_liar=True)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=session_seed, population_size=20)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=session_seed)
        return optuna.samplers.RandomSampler(seed=session_seed)
