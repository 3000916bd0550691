"""The tuner's use cases as library calls: what the CLI, the benchmarks and a notebook call.

Example (a real, small demo study; about a minute on 2 CPU cores):

    >>> from tuner.api import run_study                                          # doctest: +SKIP
    >>> from tuner.study import RunOptions                                       # doctest: +SKIP
    >>> result = run_study(RunOptions(budget="70%", trials=20, storage="sqlite:///studies/tuner.db"))  # doctest: +SKIP
    >>> result.exit_code, result.best_path                                       # doctest: +SKIP
    (0, PosixPath('studies/demo-cpu-70pct/best.json'))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import optuna

from evaluators import Budget, Evaluator, get_evaluator, parse_budget
from evaluators.latency import WorkloadChoice
from evaluators.loading import resolve_device, resolve_dtype
from search_spaces import get_space
from tuner.evoprune import Schedule
from tuner.export import Prefer, Selection, exported_schedule, pareto_front, select_schedule, write_export
from tuner.plots import pareto_figure, write_pareto_html
from tuner.study import (
    ATTR_FINAL,
    ATTR_META,
    ATTR_REQUESTED,
    ATTR_SETTINGS,
    LATENCY_SOURCES,
    SAMPLERS,
    RunOptions,
    StudyContext,
    StudyRunner,
    TrialOutcome,
    TrialRecord,
    TunerError,
    create_or_resume,
    default_study_name,
    evaluator_from_context,
    latency_source_for,
    open_storage,
    output_dir,
    public_url,
    resolve_device_name,
    size_workload,
    stop_on_interrupt,
    storage_errors,
    trial_records,
    tune_allocator,
)

__all__ = ["EXIT_INTERRUPTED", "EXIT_NO_FEASIBLE", "RunEvents", "RunResult", "export_study", "run_study", "write_plot"]

EXIT_NO_FEASIBLE = 3
EXIT_INTERRUPTED = 130


class RunEvents(Protocol):
    """What a run reports while it works (``tuner.progress.RunProgress`` draws it; :class:`QuietEvents` drops it)."""

    def note(self, message: str) -> None: ...

    def start(self, total: int, existing: list[TrialRecord]) -> None: ...

    def trial(self, outcome: TrialOutcome) -> None: ...

    def stop(self) -> None: ...


class QuietEvents:
    """Drops every event (the default of the library calls)."""

    def note(self, message: str) -> None:
        pass

    def start(self, total: int, existing: list[TrialRecord]) -> None:
        pass

    def trial(self, outcome: TrialOutcome) -> None:
        pass

    def stop(self) -> None:
        pass


@dataclass
class RunResult:
    """What :func:`run_study` did.

    Attributes:
        study: the study name.
        storage: the storage URL (password hidden).
        context: the study.
        resumed: it existed before this run.
        trials_run: trials this run finished.
        workload: the batch sized to this machine when the study was created (None when given or not sized).
        interrupted: ``"sigint"`` when Ctrl-C stopped the search after the running trial, ``"hard"`` when a second
            Ctrl-C stopped it at once (the running trial is marked failed), else None.
        selection: the export's choice (None when interrupted).
        schedule: the exported schedule with its metrics (None when nothing met the budget).
        best_path: where it was written.
        plot_path: the Pareto plot.
    """

    study: str
    storage: str
    context: StudyContext
    resumed: bool
    trials_run: int = 0
    workload: WorkloadChoice | None = None
    interrupted: str | None = None
    selection: Selection | None = None
    schedule: Schedule | None = None
    best_path: Path | None = None
    plot_path: Path | None = None

    @property
    def exit_code(self) -> int:
        """0 exported, 3 no schedule meets the budget, 130 interrupted."""
        if self.interrupted:
            return EXIT_INTERRUPTED
        return 0 if self.schedule is not None else EXIT_NO_FEASIBLE


def validate(options: RunOptions) -> Budget:
    """Check every setting that can be checked without loading a model or touching the storage.

    Returns:
        The parsed budget.

    Raises:
        TunerError, BudgetError, SearchSpaceError, EvaluatorError: one line naming the setting and the fix.
    """
    budget = parse_budget(options.budget)
    get_space(options.space)
    if options.sampler not in SAMPLERS:
        raise TunerError(f"unknown sampler {options.sampler!r}; available: {', '.join(SAMPLERS)}")
    if options.latency_source not in LATENCY_SOURCES:
        raise TunerError(f"unknown latency source {options.latency_source!r}; available: {', '.join(LATENCY_SOURCES)}")
    if options.prefer not in ("accurate", "fast"):
        raise TunerError(f"prefer must be accurate or fast, got {options.prefer!r}")
    get_evaluator(options.evaluator_name)
    resolve_dtype(options.dtype, resolve_device(resolve_device_name(options.device)))
    if options.timeout is not None and options.timeout <= 0:
        raise TunerError(f"timeout must be a number of seconds > 0, got {options.timeout:g}")
    for name in ("trials", "repeats", "final_repeats"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TunerError(f"{name} must be an integer >= 1, got {value!r}")
    return budget


def _stored_settings(storage: optuna.storages.RDBStorage, url: str, name: str) -> dict[str, Any] | None:
    with storage_errors(url):
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            return None
        found = study.user_attrs.get(ATTR_SETTINGS)
        meta = study.user_attrs.get(ATTR_META) or {}
    return {"settings": found, "workload": meta.get("workload")} if isinstance(found, dict) else None


def run_study(options: RunOptions, events: RunEvents | None = None) -> RunResult:
    """Run (or resume) a study, then choose, check and export its schedule and write its plot.

    Every setting is checked before any model loads (:func:`validate`, then the storage). A new demo study with a
    budget in ms and no batch size gets its workload sized to this machine (:func:`tuner.study.size_workload`); a
    resumed one keeps the batch it was created with.

    Args:
        options: the run's settings.
        events: progress receiver (default: none).

    Returns:
        What happened; :attr:`RunResult.exit_code` is the CLI's exit code.
    """
    events = events or QuietEvents()
    budget = validate(options)
    tune_allocator()
    study_name = options.study or default_study_name(
        options.model, options.evaluator_name, options.dataset, resolve_device_name(options.device), budget
    )
    storage = open_storage(options.storage)
    stored = _stored_settings(storage, options.storage, study_name)
    batch_size = options.batch_size
    if batch_size is None and stored is not None:
        batch_size = stored["settings"].get("batch_size")
        if stored.get("workload"):
            events.note(f"keeping the workload of study {study_name!r}: {stored['workload']['reason']}")
    events.note(f"loading the {options.evaluator_name} evaluator (model and data)")
    build: Callable[..., Evaluator] = get_evaluator(options.evaluator_name)
    task = build(**{**options.evaluator_args(), "batch_size": batch_size}, seed=0)
    workload = None
    if (
        stored is None
        and options.batch_size is None
        and budget.kind == "ms"
        and options.latency_source == "measured"
        and hasattr(task, "set_batch_size")
    ):
        workload = size_workload(task, budget, events.note)
        events.note(f"demo workload sized to this machine: {workload.reason}")
    context, resumed = create_or_resume(
        storage, options.storage, study_name, options, task, budget, events.note, workload
    )
    records = trial_records(context.study)
    events.note(
        f"{'resuming' if resumed else 'created'} study {study_name!r} in {public_url(options.storage)}: "
        f"{len(records)} finished trials, budget {budget} = {context.budget_ms():.2f} ms (unpruned reference "
        f"{context.reference_ms:.2f} ms at batch size {task.batch_size}, latency {context.latency_source})"
    )
    result = RunResult(study_name, public_url(options.storage), context, resumed, workload=workload)
    source = latency_source_for(options.latency_source, task)
    runner = StudyRunner(context, task, source, options.sampler, options.seed, options.repeats, on_trial=events.trial)
    if len(records) >= options.trials:
        runner.study.set_user_attr(ATTR_REQUESTED, options.trials)
        events.note(f"the study already holds {len(records)} finished trials (--trials {options.trials})")
    else:
        events.start(options.trials, records)
        try:
            with stop_on_interrupt(context.study, events.note) as stop:
                result.trials_run = runner.run(options.trials, options.timeout)
        except KeyboardInterrupt:
            events.stop()
            runner.fail_unfinished()
            result.interrupted = "hard"
            return result
        finally:
            events.stop()
        if stop.requested:
            result.interrupted = "sigint"
            return result
    export_source = latency_source_for(options.latency_source, task, rounds_warmup=3)
    selection = select_schedule(
        context,
        task,
        export_source,
        prefer=_prefer(options.prefer),
        rounds=options.final_repeats,
        note=events.note,  # type: ignore[arg-type]
    )
    result.selection = selection
    folder = output_dir(context.name)
    result.plot_path = write_plot(context, folder / "pareto.html", selection)
    best = folder / "best.json"
    if selection.chosen is not None:
        result.schedule = exported_schedule(selection, context, task, export_source)
        result.best_path = write_export(result.schedule, best)
    elif best.exists():
        # A schedule from an earlier run of this study that the latest choice no longer backs: keep it, marked.
        stale = best.with_name("best.stale.json")
        best.replace(stale)
        selection.notes.append(f"moved the earlier {best} to {stale}: this run found no schedule that meets the budget")
    return result


def export_study(
    storage: str,
    study: str | None,
    *,
    budget: str | None = None,
    prefer: str = "accurate",
    final_repeats: int = 20,
    output: Path | None = None,
    events: RunEvents | None = None,
) -> tuple[Selection, Schedule | None, Path | None]:
    """Choose a stored study's schedule for a budget, check it (held-out slice, measured again), write its JSON.

    Returns:
        ``(selection, exported schedule or None, path or None)``.
    """
    from tuner.study import load_study

    events = events or QuietEvents()
    chosen_budget = parse_budget(budget) if budget is not None else None
    tune_allocator()
    backend = open_storage(storage, create=False)
    context = StudyContext.load(load_study(backend, storage, study), storage)
    events.note(f"loading the {context.meta['evaluator']} evaluator of study {context.name!r}")
    task = evaluator_from_context(context)
    source = latency_source_for(context.latency_source, task, rounds_warmup=3)
    selection = select_schedule(
        context,
        task,
        source,
        budget=chosen_budget,
        prefer=_prefer(prefer),
        rounds=final_repeats,
        note=events.note,  # type: ignore[arg-type]
    )
    if selection.chosen is None:
        return selection, None, None
    if output is None:
        name = "best.json" if chosen_budget is None else f"best-{str(chosen_budget).replace('%', 'pct')}.json"
        output = output_dir(context.name) / name
    schedule = exported_schedule(selection, context, task, source)
    return selection, schedule, write_export(schedule, output)


def _prefer(value: str) -> Prefer:
    if value == "fast":
        return "fast"
    if value == "accurate":
        return "accurate"
    raise TunerError(f"prefer must be accurate or fast, got {value!r}")


def write_plot(context: StudyContext, path: Path, selection: Selection | None = None) -> Path:
    """Write the study's Pareto plot (the exported trial marked when it was chosen for the study's own budget)."""
    front = {r.number for r in pareto_front(trial_records(context.study), context.budget_ms())}
    chosen = None
    if selection is not None:
        if selection.chosen is not None and str(selection.budget) == context.settings["budget"]:
            chosen = selection.chosen.record.number
    else:
        final = context.study.user_attrs.get(ATTR_FINAL) or {}
        if final.get("budget") == context.settings["budget"]:
            chosen = final.get("chosen_trial")
    return write_pareto_html(pareto_figure(context, front, chosen), path)
