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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import optuna

from evaluators import Evaluator, get_evaluator
from evaluators.loading import resolve_device, resolve_dtype
from tuner.dashboard import FigurePublisher
from tuner.errors import TunerError
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
    create_or_resume,
    evaluator_from_context,
    load_study,
    stop_on_interrupt,
    trial_records,
)
from tuner.timing import tune_allocator

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_NO_FEASIBLE",
    "ApplyResult",
    "RunEvents",
    "RunResult",
    "apply_schedule",
    "export_study",
    "run_study",
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
    publisher = FigurePublisher(context, note=events.note)

    def on_trial(outcome: TrialOutcome) -> None:
        events.trial(outcome)
        publisher.trial_finished()  # the dashboard's figures, now and then (never fails the trial)

    source = latency_source_for(options.latency_source, task)
    runner = StudyRunner(context, task, source, options.sampler, options.seed, options.repeats, on_trial=on_trial)
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
    FigurePublisher(context, note=events.note).publish()  # the dashboard's figures with the export marked
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
        output = output_dir(context.name) / name
    schedule = exported_schedule(selection, context, task, source)
    return selection, schedule, write_export(schedule, output)


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


