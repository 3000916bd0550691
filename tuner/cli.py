"""The ``tuner`` command line: run, worker, export, plot, report, dashboard, studies, copy, apply, spaces, schema.

Exit codes: 0 done; 2 bad input (one line on stderr naming the problem and the fix, no traceback, nothing stored is
lost); 3 no schedule meets the budget (the closest is shown, the plot is still written); 130 interrupted by SIGINT
(Ctrl-C), 143 by SIGTERM (what is stored is kept; the same command resumes).
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from tuner.options import RunOptions

app = typer.Typer(
    name="tuner",
    help=(
        "Search the best EvoPrune token-merging schedule of a vision encoder under a latency budget, and export it.\n\n"
        "Start with: python -m tuner run --budget 50ms  (offline demo; writes studies/tuner.db, "
        "studies/<study>/best.json and studies/<study>/pareto.html)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

EXIT_BAD_INPUT = 2
EXIT_NO_FEASIBLE = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

DEFAULT_TRIALS = 200
"""Trials of a default run: on the demo, about 0.8 s each on 2 CPU cores (about 3.5 minutes for the whole run)."""

F = TypeVar("F", bound=Callable[..., Any])


class Prefer(str, Enum):
    """Which feasible Pareto-optimal schedule to export."""

    accurate = "accurate"
    fast = "fast"


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print a one-line error (no traceback) and exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


DEFAULT_STORAGE = "sqlite:///studies/tuner.db"
"""The storage every command uses unless told otherwise (the same as ``tuner.storage.DEFAULT_STORAGE``)."""


def flag(param: str) -> str:
    """The command-line flag of a library parameter name: ``batch_size`` -> ``--batch-size``."""
    return "--" + param.replace("_", "-")


def error_line(error: BaseException) -> str:
    """A bad-input error as the CLI prints it: one line, the parameters it names written as flags."""
    from tuner.errors import render

    return render(error, flag)


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from tuner.errors import BAD_INPUT_ERRORS

    return BAD_INPUT_ERRORS


def one_line_errors(command: F) -> F:
    """Decorator: the project's bad-input errors end the command with one line and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except _bad_input_errors() as error:
            fail(error_line(error))

    return wrapper  # type: ignore[return-value]


def _console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 160)  # logs and pipes: no wrapping of schedule summaries
    return console


@contextlib.contextmanager
def _quiet_libraries(storage: str | None = None) -> Iterator[None]:
    """Optuna logs (with tracebacks) and library warnings stay out of the tuner's output; with ``storage``, database
    errors inside the block become one-line :class:`~tuner.errors.StorageError`."""
    import warnings

    import optuna

    from tuner.storage import storage_errors

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with contextlib.suppress(ImportError):
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    with warnings.catch_warnings(), storage_errors(storage) if storage else contextlib.nullcontext():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------------------------------------------- run


@app.command()
@one_line_errors
def run(
    ctx: typer.Context,
    budget: Annotated[
        str | None,
        typer.Option(
            help="Latency budget (required, here or in --config): a time (50ms, 0.05s), a speed-up over the unpruned "
            "model (2x) or a share of its latency (60%). Per batch of --batch-size, for the timed --latency-scope."
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="A recipe: a TOML file of run settings named like these options (budget = \"50ms\", batch_size = 8; "
            "see studies/demo.toml). Options given on the command line override it."
        ),
    ] = None,
    trials: Annotated[
        int,
        typer.Option(help="Finished trials the study should hold; a resumed study runs only the missing ones.", min=1),
    ] = DEFAULT_TRIALS,
    timeout: Annotated[
        float | None, typer.Option(help="Stop searching after this many seconds (resume later with the same command).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Sampler seed: the same seed gives the same trials and export.")] = 0,
    sampler: Annotated[
        str, typer.Option(help="Optuna sampler: tpe (default), nsga2, gp (slow per trial) or random.")
    ] = "tpe",
    storage: Annotated[
        str,
        typer.Option(help="Optuna storage URL (any SQLAlchemy URL; the SQLite file and its folder are created)."),
    ] = DEFAULT_STORAGE,
    study: Annotated[
        str | None,
        typer.Option(help="Study name; default from model, task, device and budget (e.g. demo-cpu-50ms)."),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model folder or hub id; without it the offline demo model is tuned.")
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            help="Dataset (folder, file or hub id) for the fidelity/zeroshot evaluators; the LLaVA tasks default to "
            "their benchmark's hub id."
        ),
    ] = None,
    dataset_split: Annotated[
        str | None,
        typer.Option(help="The dataset's split (default: test, validation or train, whichever it has first)."),
    ] = None,
    evaluator: Annotated[
        str | None,
        typer.Option(
            "--evaluator",
            "--task",
            help="Accuracy evaluator (--task is the same option): demo (default without --model), fidelity (default "
            "with --model), zeroshot, the LLaVA tasks pope, mme, scienceqa, mmbench, gqa, videomme, mllm (a local "
            "VQA dataset), the offline LLaVA demo digits-vqa, or one an installed package adds."
        ),
    ] = None,
    calib: Annotated[
        int | None, typer.Option(help="Calibration items scored per trial (default: the evaluator's).")
    ] = None,
    holdout: Annotated[
        int | None, typer.Option(help="Held-out items that validate the final choice (default: the evaluator's).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Items per forward, for accuracy and latency alike.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto (cuda when a GPU is here).")] = "auto",
    dtype: Annotated[
        str, typer.Option(help="Model dtype: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16.")
    ] = "auto",
    space: Annotated[str, typer.Option(help="Search space (see `tuner spaces`).")] = "family",
    prefer: Annotated[
        Prefer, typer.Option(help="Which feasible Pareto-optimal schedule to export: most accurate or fastest.")
    ] = Prefer.accurate,
    repeats: Annotated[
        int,
        typer.Option(
            help="Interleaved rounds (the schedule, then the unpruned model) of each trial's latency measurement; a "
            "noisy one is measured again.",
            min=1,
        ),
    ] = 8,
    final_repeats: Annotated[
        int,
        typer.Option(
            help="Runs of the study's reference unpruned latency and rounds of the export's re-measurements.", min=1
        ),
    ] = 20,
    latency_source: Annotated[
        str,
        typer.Option(
            help="measured (real timings, the default) or synthetic (a deterministic FLOP model made for tests and "
            "reproducible experiments; never a measurement, and labelled so everywhere)."
        ),
    ] = "measured",
    latency_scope: Annotated[
        str | None,
        typer.Option(
            help="What is timed, and what the budget applies to. encoder: pixels on the device to the visual "
            "features (the vision encoder, and a LLaVA model's projector). prefill: pixels and prompt on the device to "
            "the first new token's logits (time to first token). generate: pixels and prompt to --new-tokens greedy "
            "tokens. Default: prefill for the LLaVA tasks, encoder for the others (which have only that one)."
        ),
    ] = None,
    new_tokens: Annotated[
        int, typer.Option(help="Tokens generated per timed call with --latency-scope generate.", min=1)
    ] = 16,
    frames: Annotated[
        int | None,
        typer.Option(
            help="Frames sampled uniformly from each video (video tasks only: videomme; default 8). More frames: more "
            "visual tokens per question, so more accuracy and more latency. Other tasks refuse it.",
            min=1,
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            help="Local worker processes that run the trials (one per GPU where there are GPUs; on a CPU-only machine "
            "they share the cores, which distorts measured latency). Needs a PostgreSQL or journal:/// storage. More "
            "workers, on any machine: `tuner worker`.",
            min=1,
        ),
    ] = 1,
) -> None:
    """Search schedules under a latency budget; write studies/<study>/best.json and pareto.html.

    Maximises accuracy and minimises measured latency (Optuna, multi-objective, budget as a constraint). Each trial
    times its schedule in rounds interleaved with the unpruned model; latency_ms is the median ratio times the
    study's reference unpruned latency. For the demo with a budget in ms and no --batch-size, the batch of scenes
    per timed forward is sized to this machine when the study is created (and kept on resume). An existing study
    with the same settings resumes; only --trials, --timeout, --prefer, --repeats, --final-repeats and --workers may
    change on resume, and any other difference (--seed and --sampler included) is refused, naming it. Outputs go to
    studies/<study>/ for the default storage, studies/<study>@<storage>/ for any other. Ctrl-C (SIGINT) lets the
    running trial finish, SIGTERM marks it failed; both keep every finished trial, print the command that resumes,
    and exit 130 or 143. Trials left RUNNING by a killed process are reported, failed and retried. Exit 3 when no
    schedule meets the budget.
    """
    from tuner.api import run_study
    from tuner.progress import RunProgress

    values: dict[str, Any] = {
        "budget": budget, "trials": trials, "timeout": timeout, "seed": seed, "sampler": sampler, "storage": storage,
        "study": study, "model": model, "dataset": dataset, "dataset_split": dataset_split, "evaluator": evaluator,
        "calib": calib, "holdout": holdout, "batch_size": batch_size, "device": device, "dtype": dtype,
        "space": space, "repeats": repeats, "final_repeats": final_repeats, "latency_source": latency_source,
        "prefer": prefer.value, "workers": workers, "latency_scope": latency_scope, "new_tokens": new_tokens,
        "frames": frames,
    }  # fmt: skip
    options = _run_options(ctx, values, config)
    console = _console()
    progress = RunProgress(console)
    with _quiet_libraries(options.storage):
        result = run_study(options, progress)
    if result.interrupted:
        running = "the running trial " + ("is marked failed" if result.trial_failed else "was finished first")
        _report_interrupt(
            options.storage, result.study, _resume_command(options, result.study), f"{result.interrupted}: {running}"
        )
        raise typer.Exit(result.exit_code)
    _print_selection(result.selection, progress, console)
    if result.schedule is None:
        if _on_gpu(options.device):
            console.print(GPU_SMALL_BATCH_HINT)
        console.print(f"plot: {result.plot_path}")
        raise typer.Exit(EXIT_NO_FEASIBLE)
    _print_chosen(result.schedule, result.best_path, console)
    console.print(f"plot: {result.plot_path}")


def _run_options(ctx: typer.Context, values: dict[str, Any], config: Path | None) -> RunOptions:
    """The run's :class:`~tuner.options.RunOptions`: the recipe's settings, overridden by the options given."""
    from tuner.options import RunOptions, load_recipe

    merged = dict(values)
    if config is not None:
        given = {name for name in values if _given(ctx, name)}
        merged.update({name: value for name, value in load_recipe(config).items() if name not in given})
    if merged["budget"] is None:
        fail(f"missing option --budget{' (not in the config either)' if config else ''} (see `tuner run --help`)")
    return RunOptions(**merged)


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was given (on the command line or in its environment variable), not defaulted."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _print_selection(selection: Any, progress: Any, console: Console) -> None:
    from tuner.progress import selection_table

    if selection.finalists:
        console.print(selection_table(selection))
    for line in selection.notes:
        progress.note(line)
    if selection.chosen is None:
        _report_no_feasible(selection, console)


def _print_chosen(schedule: Any, path: Any, console: Console) -> None:
    metrics, provenance = schedule.metrics, schedule.provenance
    source = "" if metrics["latency_source"] == "measured" else f" ({metrics['latency_source']}, not measured)"
    console.print(
        f"chosen: trial {provenance['trial']}: {schedule.describe()}\n"
        f"  accuracy calib {metrics['accuracy_calib']:.4f}, held-out {metrics['accuracy_holdout']:.4f} "
        f"(unpruned {metrics['accuracy_holdout_unpruned']:.4f}); latency {metrics['latency_ms']:.2f} ms measured "
        f"again{source} (bound {metrics['latency_upper_ms']:.2f} ms, budget {metrics['budget_ms']:.2f} ms, unpruned "
        f"{metrics['baseline_ms']:.2f} ms, {metrics['speedup_measured']:.2f}x)\n"
        f"schedule: {path}"
    )


def _resume_command(options: Any, study_name: str) -> str:
    """The command that resumes this run: the study, its storage (password hidden) and every setting that defines it."""
    import shlex

    from tuner.storage import public_url

    words = ["python", "-m", "tuner", "run", "--budget", options.budget, "--study", study_name]
    defaults = {
        "storage": DEFAULT_STORAGE, "space": "family", "device": "auto", "dtype": "auto", "latency_source": "measured",
        "seed": 0, "sampler": "tpe", "workers": 1, "new_tokens": 16,
    }  # fmt: skip
    for name in ("storage", "model", "dataset", "dataset_split", "evaluator", "calib", "holdout", "batch_size", "space",
                 "device", "dtype", "latency_source", "seed", "sampler", "workers", "latency_scope",
                 "new_tokens", "frames"):  # fmt: skip
        value = getattr(options, name)
        if value is not None and value != defaults.get(name):
            words += [flag(name), public_url(value) if name == "storage" else str(value)]  # no password shown
    words += ["--trials", str(options.trials)]
    return shlex.join(words)


def _report_interrupt(storage: str, study_name: str, resume_hint: str, running: str) -> None:
    import optuna
    from optuna.trial import TrialState

    from tuner.storage import open_storage, public_url

    finished = "some"
    with contextlib.suppress(Exception):
        loaded = optuna.load_study(study_name=study_name, storage=open_storage(storage, create=False))
        finished = str(len(loaded.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))))
    typer.echo(
        f"interrupted: {finished} finished trials of study {study_name!r} are stored in {public_url(storage)} "
        f"({running}); resume with: {resume_hint}",
        err=True,
    )


# Measured on an H200 (docs/engine-speed.md, "On a GPU"): a one-image forward launches operators faster than the host
# can issue them, so fewer tokens save little there while each merge step adds operators.
GPU_SMALL_BATCH_HINT = (
    "on a GPU a small batch waits for the host to launch its operators, where fewer tokens save little and each merge "
    "step adds operators; EvoPrune pays where the GPU computes: larger batches (--batch-size), more frames, longer "
    "prompts (docs/engine-speed.md)"
)


def _on_gpu(device: str) -> bool:
    from tuner.options import resolve_device_name

    return resolve_device_name(device).startswith("cuda")


def _report_no_feasible(selection: Any, console: Console) -> None:
    from tuner.export import Finalist

    closest = selection.closest
    console.print(f"[bold red]no schedule meets the budget {selection.budget}[/bold red]")
    if isinstance(closest, Finalist) and closest.verdict is not None:
        console.print(
            f"closest: trial {closest.record.number}: {closest.record.summary}: measured again "
            f"{closest.verdict.describe()}; accuracy {closest.record.accuracy:.4f}"
        )
    elif closest is not None:
        console.print(
            f"closest: trial {closest.number}: {closest.summary}: {closest.latency_ms:.2f} ms measured (bound "
            f"{closest.upper_ms:.2f} ms), {closest.upper_ms - selection.budget_ms:.2f} ms over "
            f"{selection.budget_ms:.2f} ms; accuracy {closest.accuracy:.4f}"
        )
    console.print("loosen the budget (e.g. a larger --budget), or widen the search (--trials, --space keep_ratios)")


def _open_context(storage: str, study: str | None) -> Any:
    from tuner.storage import open_storage
    from tuner.study import StudyContext, load_study

    backend = open_storage(storage, create=False)
    return StudyContext.load(load_study(backend, storage, study), storage)


# ------------------------------------------------------------------------------------------------- export and plot


StudyOption = Annotated[
    str | None, typer.Option(help="Study name (see `tuner studies`); optional when the storage holds only one.")
]
StorageOption = Annotated[str, typer.Option(help="Optuna storage URL.")]


class _WorkerLines:
    """A worker's progress: one plain line per event, marked with the worker's process id (workers share a log)."""

    def __init__(self, console: Console) -> None:
        import os

        self.console = console
        self.tag = f"worker {os.getpid()}"

    def note(self, message: str) -> None:
        self.console.print(f"{self.tag}: {message}", highlight=False, soft_wrap=True, markup=False)

    def start(self, total: int, existing: list[Any]) -> None:
        pass

    def trial(self, outcome: Any) -> None:
        verdict = "meets the budget" if outcome.feasible else "over the budget"
        self.console.print(
            f"{self.tag}: trial {outcome.number}: {outcome.summary}: accuracy {outcome.accuracy:.4f}, "
            f"{outcome.latency_ms:.2f} ms ({verdict})",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )

    def stop(self) -> None:
        pass


@app.command()
@one_line_errors
def worker(
    study: StudyOption = None,
    storage: StorageOption = DEFAULT_STORAGE,
    trials: Annotated[
        int | None,
        typer.Option(
            help="At most this many trials in this worker (default: until the study holds its --trials).", min=1
        ),
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    repeats: Annotated[int, typer.Option(help="Interleaved rounds of each trial's latency measurement.", min=1)] = 8,
    worker_index: Annotated[
        int | None,
        typer.Option(help="This worker's number, mixed into the sampler's seed (default: from host and process id)."),
    ] = None,
) -> None:
    """Join an existing study (made by `tuner run`) as one more worker, on this machine or any other.

    Everything else comes from the study: evaluator, model, data, budget, space, sampler, seed. Start as many workers
    as there are GPUs or machines, on a storage they all reach: PostgreSQL (pip install 'tuner[postgres]'; e.g.
    --storage postgresql://user:pw@host/db) or a journal file on a shared file system (journal:////shared/tuner.log).
    A worker that dies leaves its running trial behind; it is failed and retried by the next worker or run that looks
    (at once on the same machine; after the heartbeat's grace period from another one). SIGINT lets the running trial
    finish, SIGTERM marks it failed; exit 130 or 143. `tuner export` (or the run that made the study) exports.
    """
    from tuner.api import work_on_study

    console = _console()
    events = _WorkerLines(console)
    with _quiet_libraries(storage):
        result = work_on_study(
            storage, study, trials=trials, timeout=timeout, repeats=repeats, worker=worker_index, events=events
        )
    requested = result.requested if result.requested is not None else "?"
    events.note(
        f"ran {result.trials_run} trials; study {result.study!r} holds {result.finished} finished of {requested} "
        "requested"
    )
    if result.interrupted:
        running = "the running trial " + ("is marked failed" if result.trial_failed else "was finished first")
        events.note(f"stopped by {result.interrupted} ({running}); start the worker again to go on")
        raise typer.Exit(result.exit_code)


@app.command()
@one_line_errors
def export(
    study: StudyOption = None,
    storage: StorageOption = DEFAULT_STORAGE,
    budget: Annotated[
        str | None, typer.Option(help="Choose for another budget than the study's (50ms, 2x, 60%).")
    ] = None,
    prefer: Annotated[Prefer, typer.Option(help="Most accurate or fastest feasible schedule.")] = Prefer.accurate,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="File to write; default studies/<study>/best.json (best-<budget>.json with --budget).",
        ),
    ] = None,
    final_repeats: Annotated[int, typer.Option(help="Timed runs of each interleaved re-measurement.", min=1)] = 20,
) -> None:
    """Choose a stored study's schedule for a budget, validate it (held-out slice, measured again), write JSON.

    Rebuilds the study's evaluator (same model, data, device and batch). A schedule is exported only when it meets the
    budget measured again, by the same rule as `run` (median ratio + 2 standard errors, times the study's reference
    unpruned latency, within the limit). Exit 3 when no schedule meets the budget.
    """
    from tuner.api import export_study
    from tuner.progress import RunProgress

    console = _console()
    progress = RunProgress(console, live=False)
    with _quiet_libraries(storage):
        selection, schedule, path = export_study(
            storage, study, budget=budget, prefer=prefer.value, final_repeats=final_repeats, output=output,
            events=progress,
        )  # fmt: skip
    _print_selection(selection, progress, console)
    if schedule is None:
        raise typer.Exit(EXIT_NO_FEASIBLE)
    _print_chosen(schedule, path, console)


@app.command()
@one_line_errors
def plot(
    study: StudyOption = None,
    storage: StorageOption = DEFAULT_STORAGE,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="HTML file to write; default studies/<study>/pareto.html.")
    ] = None,
) -> None:
    """Write a study's Pareto plot (accuracy vs measured latency, budget line, baseline) as self-contained HTML."""
    from tuner.api import write_plot
    from tuner.options import output_dir

    with _quiet_libraries(storage):
        context = _open_context(storage, study)
        path = write_plot(context, output or output_dir(context.name, storage=storage) / "pareto.html")
    typer.echo(f"plot: {path}")


@app.command()
@one_line_errors
def report(
    study: StudyOption = None,
    storage: StorageOption = DEFAULT_STORAGE,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="HTML file to write; default studies/<study>/report.html.")
    ] = None,
) -> None:
    """Write a study's report: one self-contained HTML file (works offline) with the tuner's figures, the Pareto table
    (calibration and held-out accuracy, measured latency with its spread, tokens), the exported schedule, and the
    machine and versions it was measured on."""
    from tuner.options import output_dir
    from tuner.report import write_report

    with _quiet_libraries(storage):
        context = _open_context(storage, study)
        path = write_report(context, output or output_dir(context.name, storage=storage) / "report.html")
    typer.echo(f"report: {path}")


@app.command()
@one_line_errors
def dashboard(
    storage: StorageOption = DEFAULT_STORAGE,
    host: Annotated[
        str, typer.Option(help="Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free one).", min=0, max=65535)] = 8080,
) -> None:
    """Browse the studies in optuna-dashboard, with the tuner's figures and a summary note in each study.

    Safe beside a running study: the SQLite file is in WAL mode, so reading it never blocks the run. Ctrl-C stops.
    """
    from tuner.dashboard import start_dashboard

    with _quiet_libraries(storage):
        board = start_dashboard(storage, host, port, note=lambda line: typer.echo(f"· {line}"))
        listed = ", ".join(board.studies) if board.studies else "none yet (start one with `tuner run`)"
        typer.echo(f"dashboard: {board.url} (storage {board.storage_url}; tuner studies: {listed}; Ctrl-C stops it)")
        sys.stdout.flush()
        try:
            board.serve_forever()
        except KeyboardInterrupt:
            typer.echo("dashboard stopped")
        finally:
            board.close()


@app.command()
@one_line_errors
def studies(storage: StorageOption = DEFAULT_STORAGE) -> None:
    """List the studies in a storage: trials finished of requested, budget, measured best, exported trial."""
    import optuna

    from tuner.errors import StudyError
    from tuner.storage import open_storage, public_url
    from tuner.study import StudyContext, trial_records

    lines: list[str] = []
    with _quiet_libraries(storage):
        backend = open_storage(storage, create=False)
        summaries = optuna.get_all_study_summaries(backend, include_best_trial=False)
        for summary in sorted(summaries, key=lambda s: s.study_name):
            loaded = optuna.load_study(study_name=summary.study_name, storage=backend)
            try:
                context = StudyContext.load(loaded, storage)
            except StudyError:
                lines.append(f"{summary.study_name}: not a finished tuner study ({summary.n_trials} trials)")
                continue
            lines += _study_lines(context, trial_records(loaded))
    console = _console()
    if summaries:
        console.print(f"studies in {public_url(storage)}")
        for line in lines:
            console.print(line, highlight=False, soft_wrap=True)
    else:
        console.print(f"no studies in {public_url(storage)}; start one with: python -m tuner run --budget 50ms")


def _study_lines(context: Any, records: list[Any]) -> list[str]:
    """What `tuner studies` says of one study: trials, budget, reference, measured best, export."""
    from tuner.study import ATTR_FINAL

    requested = context.requested_trials
    noisy = sum(r.noisy for r in records)
    source = (
        context.latency_source if context.latency_source == "measured" else f"{context.latency_source} (NOT measured)"
    )
    lines = [
        f"{context.name}: {len(records)} finished / {requested if requested is not None else '?'} requested trials; "
        f"budget {context.settings.get('budget')} = {context.budget_ms():.2f} ms; unpruned reference "
        f"{context.reference_ms:.2f} ms at batch {context.settings.get('batch_size')}; latency {source}"
        f" ({context.settings.get('latency_scope') or 'encoder'} scope"
        + (f", {context.settings['frames']} frames per video" if context.settings.get("frames") else "")
        + ")"
        + (f"; {noisy} trials stayed noisy (a loaded machine)" if noisy else "")
    ]
    feasible = [r for r in records if r.feasible]
    best = min(feasible, key=lambda r: (-r.accuracy, r.latency_ms, r.number)) if feasible else None
    lines.append(
        f"  best that meets the budget (measured): trial {best.number}, accuracy {best.accuracy:.4f} at "
        f"{best.latency_ms:.2f} ms: {best.summary}"
        if best
        else "  best that meets the budget (measured): none"
    )
    final = context.study.user_attrs.get(ATTR_FINAL) or {}
    if final.get("chosen_trial") is not None:
        lines.append(
            f"  exported: trial {final['chosen_trial']} for {final.get('budget')}: {final['latency_ms']:.2f} ms "
            f"measured again (limit {final['limit_ms']:.2f} ms), held-out accuracy "
            f"{final.get('accuracy_holdout', 0.0):.4f}"
        )
    elif final:
        lines.append(f"  exported: nothing; no schedule met {final.get('budget')} when measured again")
    else:
        lines.append("  exported: not yet (tuner export)")
    return lines


@app.command(name="copy")
@one_line_errors
def copy_command(
    from_storage: Annotated[str, typer.Option("--from", help="The storage that holds the study (any storage URL).")],
    to_storage: Annotated[
        str, typer.Option("--to", help="Where to copy it, e.g. sqlite:///home.db (a file is created).")
    ],
    study: StudyOption = None,
    to_study: Annotated[str | None, typer.Option(help="Its name in the target (default: the same).")] = None,
) -> None:
    """Copy a study with all its trials to another storage (take a PostgreSQL study home as an SQLite file)."""
    from tuner.api import copy_study
    from tuner.storage import public_url

    with _quiet_libraries(from_storage):
        name, count = copy_study(from_storage, to_storage, study, to_study)
    typer.echo(
        f"copied study {name!r} ({count} trials) from {public_url(from_storage)} to {public_url(to_storage)}; "
        f"e.g. python -m tuner studies --storage {public_url(to_storage)}"
    )


# ------------------------------------------------------------------------------------------------------------ apply


@app.command(name="apply")
@one_line_errors
def apply_command(
    schedule: Annotated[Path, typer.Option(help="Schedule JSON (e.g. studies/<study>/best.json).")],
    model: Annotated[
        str | None,
        typer.Option(help="Model folder or hub id; default: the schedule's model (provenance), else the demo model."),
    ] = None,
    image: Annotated[
        Path | None, typer.Option(help="Image to run (repeated to the batch size); default: the task's own inputs.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Batch size of the timing; default: the study's (from the schedule).", min=1)
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
    repeats: Annotated[int, typer.Option(help="Timed runs of the interleaved before/after measurement.", min=1)] = 20,
) -> None:
    """Apply a schedule to a model: tokens per layer, latency before and after, and whether its budget is met.

    Exit 3 when the latency budget stored in the schedule's metrics is not met.
    """
    from tuner.api import apply_schedule
    from tuner.latency import BUDGET_RULE

    console = _console()
    with _quiet_libraries():
        result = apply_schedule(
            schedule, model=model, image=image, batch_size=batch_size, device=device, repeats=repeats
        )
    loaded, paired, size = result.schedule, result.paired, result.batch_size
    console.print(
        f"schedule: {loaded.describe()}\nmodel: {result.model_name or 'the demo model'}; inputs: {result.inputs}, "
        f"batch {size}"
    )
    table = Table()
    for header in ("layer", "tokens in", "merged", "tokens out"):
        table.add_column(header, justify="right")
    tokens = loaded.tokens_in
    for layer, (remove, out) in enumerate(zip(loaded.remove_per_layer, result.token_counts, strict=True)):
        table.add_row(str(layer), str(tokens), str(remove) if remove else "", str(out))
        tokens = out
    console.print(table)
    reduced = {layer: items for layer, items in result.ctr_reductions.items() if items}
    if reduced:
        listed = ", ".join(f"layer {layer}: {items} of {size} items" for layer, items in reduced.items())
        console.print(
            f"CTR protection reduced below the method's share so that a layer removes exactly its r tokens: {listed}"
        )
    elif loaded.scoring.ctr > 0:
        console.print("CTR protection: as specified in every merging layer")
    before, after = paired.baseline_median_ms, paired.candidate_median_ms
    environment = result.environment
    console.print(
        f"latency before: {before:.2f} ms, after: {after:.2f} ms, {1 / paired.ratio:.2f}x (median ratio "
        f"{paired.ratio:.3f} over {len(paired.ratios)} interleaved rounds{', noisy' if paired.noisy else ''}) on "
        f"{environment['device_name']} ({environment['threads']} threads)"
    )
    if result.verdict is not None:
        console.print(
            f"budget {loaded.metrics['budget']}: {result.verdict.describe()}; rule: {BUDGET_RULE} (reference: before)"
        )
        if not result.verdict.met:
            raise typer.Exit(EXIT_NO_FEASIBLE)


# ------------------------------------------------------------------------------------------------- spaces and schema


@app.command()
def spaces() -> None:
    """List the search spaces, with their parameters (the default is marked)."""
    from search_spaces import DEFAULT_SPACE, available_spaces, get_space

    for name in available_spaces():
        space = get_space(name)
        marker = " (default)" if name == DEFAULT_SPACE else ""
        typer.echo(f"{name}{marker}: {space.summary}")
        for line in space.describe():
            typer.echo(f"    {line}")


@app.command()
def schema() -> None:
    """Print the JSON Schema (draft 2020-12) of the exported schedule format."""
    from tuner.evoprune import schedule_schema

    typer.echo(json.dumps(schedule_schema(), indent=2))


# ------------------------------------------------------------------------------------------------------------- main


def _click_exceptions() -> tuple[type[Exception], type[Exception]]:
    """``(UsageError, NoArgsIsHelpError)`` of the click that typer uses.

    typer >= 0.23 vendors click as ``typer._click``; older versions use the ``click`` package.
    """
    try:
        from typer._click import exceptions as errors
    except ImportError:  # pragma: no cover - older typer
        from click import exceptions as errors  # type: ignore[no-redef]
    return errors.UsageError, errors.NoArgsIsHelpError


def _usage_message(error: Any) -> str:
    param = getattr(error, "param", None)
    opts = getattr(param, "opts", None)
    if type(error).__name__ == "MissingParameter" and opts:
        return f"missing option {opts[0]}"
    return " ".join(error.format_message().split())


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI. Usage errors and bad input end with one line on stderr and exit code 2."""
    from tuner.signals import Terminated, terminate_on_sigterm

    usage_error, no_args_is_help = _click_exceptions()
    try:
        with terminate_on_sigterm():
            code = app(args=argv, standalone_mode=False, prog_name="tuner")
    except no_args_is_help as error:
        context = getattr(error, "ctx", None)
        typer.echo(context.get_help() if context is not None else "")
        sys.exit(0)
    except usage_error as error:
        context = getattr(error, "ctx", None)
        command = context.command_path if context is not None else "tuner"
        typer.echo(f"error: {_usage_message(error)} (see `{command} --help`)", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except Terminated as error:
        typer.echo(f"interrupted by {error.signal_name}; what is stored is kept", err=True)
        sys.exit(error.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted by SIGINT; what is stored is kept", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except _bad_input_errors() as error:
        typer.echo(f"error: {error_line(error)}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    sys.exit(code if isinstance(code, int) else 0)
