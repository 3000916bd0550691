"""The tuner's use cases as library calls: what the CLI, the benchmarks and a notebook call.

Example (a real, small demo study; about a minute on 2 CPU cores):

    >>> from tuner.api import run_study                                          # doctest: +SKIP
    >>> from tuner.options import RunOptions                                     # doctest: +SKIP
    >>> result = run_study(RunOptions(budget="70%", trials=20, storage="sqlite:///studies/tuner.db"))  # doctest: +SKIP
    >>> result.exit_code, result.best_path                                       # doctest: +SKIP
    (0, PosixPath('studies/demo-cpu-70pct/best.json'))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optuna

from evaluators import Evaluator, get_evaluator
from evaluators.loading import resolve_device, resolve_dtype
from tuner.dashboard import FigurePublisher
from tuner.errors import StudyError, TunerError
from tuner.evoprune import Schedule
from tuner.export import Prefer, Selection, exported_schedule, pareto_front, select_schedule, write_export
from tuner.latency import BudgetVerdict, PairedLatency, WorkloadChoice, parse_budget
from tuner.measure import latency_source_for, size_workload
from tuner.options import (
    RunOptions,
    default_study_name,
    output_dir,
    resolve_device_name,
)
from tuner.plots import pareto_figure, write_pareto_html
from tuner.signals import Terminated, exit_code, graceful_stop, relay_signals
from tuner.storage import open_storage, public_url, storage_errors
from tuner.study import (
    ATTR_FINAL,
    ATTR_META,
    ATTR_REQUESTED,
    ATTR_SETTINGS,
    StudyContext,
    StudyRunner,
    TrialOutcome,
    TrialRecord,
    check_resume,
    create_or_resume,
    evaluator_from_context,
    load_study,
    trial_records,
)
from tuner.timing import tune_allocator
from tuner.workers import (
    DeadTrial,
    WorkerPool,
    describe_dead,
    reap_dead_trials,
    sharing_warning,
    split_trials,
    worker_environments,
)

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_NO_FEASIBLE",
    "ApplyResult",
    "RunEvents",
    "RunResult",
    "WorkResult",
    "apply_schedule",
    "copy_study",
    "export_study",
    "run_study",
    "work_on_study",
    "write_plot",
]

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
        interrupted: the signal that stopped the search (``"SIGINT"``, ``"SIGTERM"``), else None.
        trial_failed: the signal stopped the search at once and the running trial was marked failed (SIGTERM, a
            second SIGINT); False when it was let finish.
        dead: trials found left RUNNING by dead processes (and failed and queued again) when the run started or
            while it ran.
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
    trial_failed: bool = False
    dead: list[DeadTrial] = field(default_factory=list)
    selection: Selection | None = None
    schedule: Schedule | None = None
    best_path: Path | None = None
    plot_path: Path | None = None

    @property
    def exit_code(self) -> int:
        """0 exported, 3 no schedule meets the budget, 130 interrupted by SIGINT, 143 by SIGTERM."""
        if self.interrupted:
            return exit_code(self.interrupted)
        return 0 if self.schedule is not None else EXIT_NO_FEASIBLE


def _stored_settings(storage: optuna.storages.BaseStorage, url: str, name: str) -> dict[str, Any] | None:
    with storage_errors(url):
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            return None
        found = study.user_attrs.get(ATTR_SETTINGS)
        meta = study.user_attrs.get(ATTR_META) or {}
    return {"settings": found, "workload": meta.get("workload"), "study": study} if isinstance(found, dict) else None


def run_study(options: RunOptions, events: RunEvents | None = None) -> RunResult:
    """Run (or resume) a study, then choose, check and export its schedule and write its plot.

    Every setting is checked before any model loads (:meth:`RunOptions.validate`, then the storage). A new demo
    study with a budget in ms and no batch size gets its workload sized to this machine
    (:func:`tuner.measure.size_workload`); a resumed one keeps the batch it was created with.

    Args:
        options: the run's settings.
        events: progress receiver (default: none).

    Returns:
        What happened; :attr:`RunResult.exit_code` is the CLI's exit code.
    """
    events = events or QuietEvents()
    budget = options.validate()
    tune_allocator()
    study_name = options.study or default_study_name(
        options.model, options.evaluator_name, options.dataset, resolve_device_name(options.device), budget
    )
    storage = open_storage(options.storage)
    stored = _stored_settings(storage, options.storage, study_name)
    if stored is not None:  # a resume: settings that differ are refused now, before the model loads
        device = resolve_device_name(options.device).split(":")[0]
        check_resume(stored["study"], options.storage, options, budget, device)
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
    with storage_errors(options.storage):
        result.dead += reap_dead_trials(context.study)
    if result.dead:
        events.note(describe_dead(result.dead))
    if len(records) >= options.trials:
        context.study.set_user_attr(ATTR_REQUESTED, options.trials)
        events.note(f"the study already holds {len(records)} finished trials (--trials {options.trials})")
    elif options.workers > 1:
        _search_with_workers(options, context, result, events)
        if result.interrupted:
            return result
    else:
        _search_here(options, context, task, result, events)
        if result.interrupted:
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
    folder = output_dir(context.name, storage=options.storage)
    result.plot_path = write_plot(context, folder / "pareto.html", selection)
    best = folder / "best.json"
    if selection.chosen is not None:
        result.schedule = exported_schedule(selection, context, task, export_source)
        result.best_path = write_export(result.schedule, best)
        best.with_name("best.stale.json").unlink(missing_ok=True)  # superseded by the schedule just written
    elif best.exists():
        # A schedule from an earlier run of this study that the latest choice no longer backs: keep it, marked.
        stale = best.with_name("best.stale.json")
        best.replace(stale)
        selection.notes.append(f"moved the earlier {best} to {stale}: this run found no schedule that meets the budget")
    FigurePublisher(context, note=events.note).publish()  # the dashboard's figures with the export marked
    return result


def _search_here(
    options: RunOptions, context: StudyContext, task: Evaluator, result: RunResult, events: RunEvents
) -> None:
    """The search in this process; SIGINT and SIGTERM stop it cleanly (:func:`tuner.signals.graceful_stop`)."""

    def on_dead(dead: list[DeadTrial]) -> None:
        result.dead += dead
        events.note(describe_dead(dead))

    publisher = FigurePublisher(context, note=events.note)

    def on_trial(outcome: TrialOutcome) -> None:
        events.trial(outcome)
        publisher.trial_finished()  # the dashboard's figures, now and then (never fails the trial)

    source = latency_source_for(options.latency_source, task)
    runner = StudyRunner(
        context, task, source, options.sampler, options.seed, options.repeats, on_trial=on_trial, on_dead=on_dead
    )
    events.start(options.trials, trial_records(context.study))
    try:
        with graceful_stop(runner.stop_search, lambda: runner.in_trial, events.note) as stop:
            runner.stop = stop
            result.trials_run = runner.run(options.trials, options.timeout)
    except KeyboardInterrupt as error:  # Terminated (SIGTERM, a second SIGINT), or Ctrl-C outside the handlers
        events.stop()
        runner.fail_unfinished()
        result.interrupted = error.signal_name if isinstance(error, Terminated) else "SIGINT"
        result.trial_failed = True
        return
    finally:
        events.stop()
    if stop.requested:
        result.interrupted = stop.signal_name
        result.trial_failed = stop.hard


def _search_with_workers(options: RunOptions, context: StudyContext, result: RunResult, events: RunEvents) -> None:
    """The search in ``options.workers`` local worker processes (``python -m tuner worker``), in rounds.

    A round shares the missing trials among the workers. A worker that dies (SIGKILL, out of memory) leaves its
    running trial behind: it is found (:func:`tuner.workers.reap_dead_trials`), failed and queued again, and the
    next round runs what is still missing. SIGINT and SIGTERM are passed on to the workers, which stop as a
    single-process run does.
    """
    device = str(context.meta.get("evaluator_args", {}).get("device") or "cpu")
    warning = sharing_warning(options.workers, device)
    if warning:
        events.note(warning)
    context.study.set_user_attr(ATTR_REQUESTED, options.trials)
    extra = ["--repeats", str(options.repeats)]
    if options.timeout is not None:
        extra += ["--timeout", str(options.timeout)]
    while True:
        with storage_errors(options.storage):
            done = len(trial_records(context.study))
        missing = options.trials - done
        if missing <= 0:
            return
        shares = split_trials(missing, options.workers)
        pool = WorkerPool(options.storage, context.name, shares, worker_environments(len(shares), device), extra)
        events.note(f"starting {len(shares)} workers for {missing} trials ({', '.join(map(str, shares))} each)")
        with relay_signals(pool.forward) as stop:
            pool.start()
            ends = pool.wait()
        for end in ends:
            if end.killed_by is not None and not stop.requested:
                events.note(f"worker {end.index + 1} (process {end.pid}) was killed by {end.killed_by}")
        with storage_errors(options.storage):
            dead = reap_dead_trials(context.study)
            after = len(trial_records(context.study))
        if dead:
            result.dead += dead
            events.note(describe_dead(dead))
        result.trials_run += after - done
        if stop.requested:
            result.interrupted = stop.signal_name
            result.trial_failed = stop.hard
            return
        if after == done:
            codes = ", ".join(f"worker {end.index + 1}: {end.returncode}" for end in ends)
            raise StudyError(
                f"the worker processes of study {context.name!r} finished no trial (exit codes {codes}); see their "
                "messages above, or run with workers 1",
                param="workers",
            )
        if options.timeout is not None:
            return  # each worker had the whole timeout


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
    FigurePublisher(context, note=events.note).publish()  # the dashboard's figures show the new choice
    if selection.chosen is None:
        return selection, None, None
    if output is None:
        name = "best.json" if chosen_budget is None else f"best-{str(chosen_budget).replace('%', 'pct')}.json"
        output = output_dir(context.name, storage=storage) / name
    schedule = exported_schedule(selection, context, task, source)
    return selection, schedule, write_export(schedule, output)


@dataclass
class WorkResult:
    """What :func:`work_on_study` did.

    Attributes:
        study: the study name.
        trials_run: trials this worker finished.
        finished: finished trials the study holds now.
        requested: the study's requested count (its latest run's ``--trials``), or None.
        interrupted: the signal that stopped the worker (``"SIGINT"``, ``"SIGTERM"``), else None.
        trial_failed: its running trial was marked failed (stopped at once), not let finish.
        dead: trials of dead processes this worker found (failed and queued again).
    """

    study: str
    trials_run: int = 0
    finished: int = 0
    requested: int | None = None
    interrupted: str | None = None
    trial_failed: bool = False
    dead: list[DeadTrial] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 done, 130 stopped by SIGINT, 143 by SIGTERM."""
        return exit_code(self.interrupted) if self.interrupted else 0


def work_on_study(
    storage: str,
    study: str | None,
    *,
    trials: int | None = None,
    timeout: float | None = None,
    repeats: int = 8,
    worker: int | None = None,
    events: RunEvents | None = None,
) -> WorkResult:
    """Join an existing study as one more worker: run its trials until it holds its requested count.

    The study (made by ``tuner run``) says everything else: the evaluator and its settings, the budget, the space, the
    sampler and seed. Any number of workers, on any machines that reach the storage, may run at once; Optuna's
    storage coordinates them. No export: ``tuner export`` (or the ``run`` that started the study) does that.

    Args:
        storage: the storage URL (PostgreSQL or a journal file for workers on several machines).
        study: the study name (optional when the storage holds one study).
        trials: at most this many trials in this worker (default: until the study holds its requested count).
        timeout: stop after this many seconds.
        repeats: interleaved rounds of each trial's latency measurement.
        worker: this worker's index, mixed into the sampler's seed (default: from the host name and process id, so
            workers started by hand draw differently).
        events: progress receiver.

    Raises:
        StorageError: the storage cannot be opened.
        StudyError: no such study, not a tuner study, or neither ``trials`` nor a requested count to work towards.
    """
    import os
    import socket
    import zlib

    events = events or QuietEvents()
    for name, value in (("trials", trials), ("repeats", repeats)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise TunerError(f"{name} must be an integer >= 1, got {value!r}", param=name)
    if timeout is not None and timeout <= 0:
        raise TunerError(f"timeout must be a number of seconds > 0, got {timeout:g}", param="timeout")
    tune_allocator()
    backend = open_storage(storage, create=False)
    context = StudyContext.load(load_study(backend, storage, study), storage)
    requested = context.requested_trials
    if requested is None and trials is None:
        raise StudyError(f"study {context.name!r} has no requested trial count yet; give trials", param="trials")
    result = WorkResult(context.name, requested=requested)
    if requested is not None:
        target = requested
    else:
        assert trials is not None
        with storage_errors(storage):
            target = len(trial_records(context.study)) + trials
    if worker is None:
        worker = 1 + zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode()) % 1_000_000
    events.note(f"loading the {context.meta['evaluator']} evaluator of study {context.name!r}")
    task = evaluator_from_context(context)

    def on_dead(dead: list[DeadTrial]) -> None:
        result.dead += dead
        events.note(describe_dead(dead))

    search = context.search
    runner = StudyRunner(
        context,
        task,
        latency_source_for(context.latency_source, task),
        str(search["sampler"]),
        int(search["seed"]),
        repeats,
        on_trial=events.trial,
        worker=worker,
        on_dead=on_dead,
    )
    try:
        with graceful_stop(runner.stop_search, lambda: runner.in_trial, events.note) as stop:
            runner.stop = stop
            result.trials_run = runner.run(target, timeout, share=trials if trials is not None else target)
    except KeyboardInterrupt as error:
        runner.fail_unfinished()
        result.interrupted = error.signal_name if isinstance(error, Terminated) else "SIGINT"
        result.trial_failed = True
    else:
        if stop.requested:
            result.interrupted = stop.signal_name
            result.trial_failed = stop.hard
    with storage_errors(storage):
        result.finished = len(trial_records(context.study))
    return result


def copy_study(source: str, target: str, study: str | None = None, to_study: str | None = None) -> tuple[str, int]:
    """Copy a study, with all its trials and attributes, to another storage (e.g. from PostgreSQL to a local SQLite
    file, to take it home); ``tuner export``, ``plot`` and ``studies`` then work on the copy.

    Args:
        source: the storage that holds the study.
        target: the storage to copy it to (a SQLite or journal file is created).
        study: the study (optional when the source holds one).
        to_study: its name in the target (default: the same).

    Returns:
        ``(name in the target, trials copied)``.

    Raises:
        StorageError: a storage cannot be opened.
        StudyError: no such study, or the target already holds a study of that name.
    """
    from_backend = open_storage(source, create=False)
    loaded = load_study(from_backend, source, study)
    to_backend = open_storage(target)
    name = to_study or loaded.study_name
    with storage_errors(target):
        existing = {summary.study_name for summary in optuna.get_all_study_summaries(to_backend, False)}
    if name in existing:
        raise StudyError(
            f"{public_url(target)} already holds a study {name!r}; give another to_study name or another target "
            "storage",
            param="to_study",
        )
    with storage_errors(source), storage_errors(target):
        optuna.copy_study(
            from_study_name=loaded.study_name, from_storage=from_backend, to_storage=to_backend, to_study_name=name
        )
        copied = optuna.load_study(study_name=name, storage=to_backend)
        count = len(copied.get_trials(deepcopy=False))
    return name, count


def _prefer(value: str) -> Prefer:
    if value == "fast":
        return "fast"
    if value == "accurate":
        return "accurate"
    raise TunerError(f"prefer must be accurate or fast, got {value!r}", param="prefer")


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


@dataclass
class ApplyResult:
    """What :func:`apply_schedule` measured.

    Attributes:
        schedule: the loaded schedule.
        model_name: the model it was applied to (None: the demo model).
        inputs: where the inputs came from, in words.
        batch_size: items per timed forward.
        token_counts: patch tokens after each layer.
        ctr_reductions: per merging layer, batch items whose CTR protection was reduced (``handle.ctr_reductions``).
        paired: the schedule timed interleaved with the unpruned model.
        environment: the measurement's device, threads, versions.
        verdict: the budget rule on ``paired`` for the budget stored in the schedule (None when it holds none), with
            the unpruned model measured in the same rounds as the reference.
    """

    schedule: Schedule
    model_name: str | None
    inputs: str
    batch_size: int
    token_counts: list[int]
    ctr_reductions: dict[int, int]
    paired: PairedLatency
    environment: dict[str, Any]
    verdict: BudgetVerdict | None


def apply_schedule(
    schedule: str | Path,
    *,
    model: str | None = None,
    image: Path | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    repeats: int = 20,
) -> ApplyResult:
    """Apply a schedule file to a model: tokens per layer, latency before and after, and the budget rule's verdict.

    Args:
        schedule: the schedule JSON (e.g. ``studies/<study>/best.json``).
        model: model folder or hub id; default: the schedule's model (its provenance), else the demo model.
        image: an image to run (repeated to the batch size); default: the task's own inputs (random pixels for a
            model: latency and token counts do not depend on pixel values).
        batch_size: items per timed forward; default: the study's (from the schedule).
        device: ``cpu``, ``cuda`` or ``auto``.
        repeats: interleaved rounds of the before/after measurement.

    Returns:
        The measurement and the verdict.
    """
    import torch

    from tuner.evoprune import apply
    from tuner.latency import LatencyMeter, MeasuredLatency, budget_verdict

    tune_allocator()
    loaded = Schedule.load(schedule)
    provenance, metrics = loaded.provenance, loaded.metrics
    found = provenance.get("evaluator_settings")
    settings: dict[str, Any] = found if isinstance(found, dict) else {}
    task = _task_evaluator_class(provenance)
    if task is not None:
        if image is not None:
            raise TunerError(
                f"a schedule of the {task.name} task is timed on the task's prompts and images, not on one image; "
                "leave out image",
                param="image",
            )
        return _apply_on_task(task, loaded, settings, model, batch_size, device, repeats)
    model_name = model or (settings.get("model") if settings.get("model") not in (None, "tuner.demo") else None)
    size = batch_size or _positive_int(provenance.get("batch_size")) or _positive_int(settings.get("batch_size")) or 1
    target = resolve_device(resolve_device_name(device))
    network, pixel_values, inputs = _model_and_inputs(model_name, image, size, target)
    call = _forward_call(network, pixel_values)
    with apply(network, loaded) as handle, torch.inference_mode():
        call()
        counts = list(handle.token_counts)
        reductions = handle.ctr_reductions
    source = MeasuredLatency(LatencyMeter(target, warmup=3))

    def pruned_call() -> None:
        with apply(network, loaded):
            call()

    paired = source.paired(call, pruned_call, loaded, rounds=repeats)
    budget_text = metrics.get("budget")
    verdict = (
        budget_verdict(paired, parse_budget(budget_text), paired.baseline_median_ms)
        if isinstance(budget_text, str)
        else None
    )
    return ApplyResult(loaded, model_name, inputs, size, counts, reductions, paired, source.environment(), verdict)


def _task_evaluator_class(provenance: dict[str, Any]) -> type[Evaluator] | None:
    """The evaluator class of a schedule whose model needs more than its encoder patched (a LLaVA task: the prompts
    are rewritten too), else None: such a schedule is applied and timed through its task, in its latency scope."""
    name = provenance.get("evaluator")
    if not isinstance(name, str):
        return None
    try:
        cls = get_evaluator(name)
    except TunerError:
        return None
    return cls if cls.applied is not Evaluator.applied else None


def _apply_on_task(
    task: type[Evaluator],
    loaded: Schedule,
    settings: dict[str, Any],
    model: str | None,
    batch_size: int | None,
    device: str,
    repeats: int,
) -> ApplyResult:
    """:func:`apply_schedule` for a task's schedule: the task rebuilt from the schedule's provenance (its model, data,
    batch and latency scope; ``model``, ``batch_size`` and ``device`` override), timed with the schedule applied as
    the study applied it."""
    import dataclasses

    import torch

    from evaluators import EvaluatorOptions
    from tuner.latency import budget_verdict
    from tuner.measure import measure_schedule

    names = {field.name for field in dataclasses.fields(EvaluatorOptions)} - {"device"}
    arguments = {key: value for key, value in settings.items() if key in names}
    if model is not None:
        arguments["model"] = model
    if batch_size is not None:
        arguments["batch_size"] = batch_size
    build: Callable[..., Evaluator] = task
    evaluator = build(device=resolve_device_name(device), **arguments)
    with evaluator.applied(loaded) as prepared, torch.inference_mode():
        evaluator.latency_call()()
        handle = getattr(prepared, "engine", prepared)
        # The tower's pass-through layers after the one the model reads count too; the schedule covers those that run.
        counts, reductions = list(handle.token_counts)[: loaded.num_layers], dict(handle.ctr_reductions)
    source = latency_source_for("measured", evaluator, rounds_warmup=3)
    paired = measure_schedule(evaluator, source, loaded, rounds=repeats)
    budget_text = loaded.metrics.get("budget")
    verdict = (
        budget_verdict(paired, parse_budget(budget_text), paired.baseline_median_ms)
        if isinstance(budget_text, str)
        else None
    )
    inputs = f"the {evaluator.name} task's first calibration batch; {evaluator.describe_latency()}"
    model_name = getattr(evaluator, "model_name", arguments.get("model"))
    return ApplyResult(
        loaded, model_name, inputs, evaluator.batch_size, counts, reductions, paired, source.environment(), verdict
    )


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _model_and_inputs(model_name: str | None, image: Path | None, batch: int, device: Any) -> tuple[Any, Any, str]:
    """The model (eval mode, on ``device``) and one batch of inputs, with a word on where the inputs come from."""
    import torch

    from evaluators.loading import load_image_processor, load_model
    from tuner.errors import TunerError

    if model_name is None:
        from tuner.demo import SCENE_SIZE, eval_pool, load_demo_model, render_scenes

        network: Any = load_demo_model(device=device)
        if image is not None:
            pixels = _image_tensor(image, SCENE_SIZE)
            source = f"image {image}"
        else:
            digits, _ = eval_pool()
            pixels, _, _ = render_scenes(digits[:batch], seed=0)
            source = "demo scenes"
    else:
        network = load_model(model_name, device=device, dtype=resolve_dtype("auto", device))
        config = getattr(network, "config", None)
        vision = getattr(config, "vision_config", config)
        side = int(getattr(vision, "image_size", 224))
        if image is not None:
            from PIL import Image, UnidentifiedImageError

            processor = load_image_processor(model_name)
            try:
                picture = Image.open(image).convert("RGB")
            except (OSError, UnidentifiedImageError) as error:
                raise TunerError(f"cannot read image {str(image)!r}: {error}; give a PNG or JPEG file") from None
            pixels = processor(images=[picture], return_tensors="pt")["pixel_values"].float()
            source = f"image {image}"
        else:
            pixels = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
            source = "random pixels (latency and token counts do not depend on pixel values)"
    dtype = next(network.parameters()).dtype
    picks = torch.arange(batch) % len(pixels)
    return network, pixels[picks].to(device=device, dtype=dtype).contiguous(), source


def _image_tensor(path: Path, side: int) -> Any:
    """An image as the demo model takes it: RGB, ``side`` x ``side``, normalised to [-1, 1], batch of one."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from tuner.errors import TunerError

    try:
        picture = Image.open(path).convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
    except (OSError, UnidentifiedImageError) as error:
        raise TunerError(f"cannot read image {str(path)!r}: {error}; give a PNG or JPEG file") from None
    array = np.asarray(picture, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).sub(0.5).div(0.5)


def _forward_call(network: Any, pixel_values: Any) -> Callable[[], Any]:
    """The vision path on one batch, as the evaluators time it."""
    from evaluators.fidelity import image_outputs

    def forward() -> Any:
        return image_outputs(network, pixel_values)

    return forward


