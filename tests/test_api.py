"""The library API and the CLI are one program: the same settings and seed give the same study either way."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from tuner.api import run_study
from tuner.evoprune import Schedule
from tuner.options import RunOptions, output_dir

SETTINGS: dict[str, Any] = {
    "budget": "75%", "trials": 8, "seed": 3, "calib": 24, "holdout": 24, "batch_size": 8, "repeats": 2,
    "final_repeats": 5, "device": "cpu", "latency_source": "synthetic",
}  # fmt: skip
"""A tiny demo study with the deterministic latency source (measured latency differs run to run, and the sampler
sees it: identical trials need a deterministic source)."""


def cli_args(settings: dict[str, Any]) -> list[str]:
    """The ``tuner run`` options that say the same as ``settings``."""
    return [word for name, value in settings.items() for word in ("--" + name.replace("_", "-"), str(value))]


def trials_of(storage: str, study: str) -> list[tuple[dict[str, Any], list[float] | None]]:
    loaded = optuna.load_study(study_name=study, storage=storage)
    return [(t.params, t.values) for t in loaded.get_trials(states=(TrialState.COMPLETE,))]


def test_the_library_and_the_cli_run_the_same_trials(tuner_workdir: Path, tuner_cli: Callable[..., Any]) -> None:
    result = run_study(RunOptions(**SETTINGS, storage="sqlite:///library.db", study="library"))
    assert result.exit_code == 0 and result.trials_run == SETTINGS["trials"]
    # Outside the default storage, outputs are keyed by storage and study.
    assert result.best_path == output_dir("library", storage="sqlite:///library.db") / "best.json"
    assert result.best_path.parent.name.startswith("library@sqlite-library-") and result.best_path.is_file()

    cli = tuner_cli("run", *cli_args(SETTINGS), "--storage", "sqlite:///cli.db", "--study", "cli")
    assert cli.code == 0, cli.out + cli.err

    library_trials = trials_of("sqlite:///library.db", "library")
    cli_trials = trials_of("sqlite:///cli.db", "cli")
    assert len(library_trials) == SETTINGS["trials"]
    assert [params for params, _ in library_trials] == [params for params, _ in cli_trials]
    assert [values for _, values in library_trials] == [values for _, values in cli_trials]
    exported = [
        Schedule.load(output_dir(name, storage=f"sqlite:///{name}.db") / "best.json") for name in ("library", "cli")
    ]
    assert exported[0].fingerprint() == exported[1].fingerprint()


def test_run_options_pass_the_dataset_split_to_the_evaluator() -> None:
    options = RunOptions(budget="50ms", model="m", dataset="d", dataset_split="validation", device="cpu")
    assert options.evaluator_name == "fidelity"
    assert options.evaluator_args()["dataset_split"] == "validation"
