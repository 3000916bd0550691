"""The README's table of bad inputs and faults: one test per row, each asserting the message and the exit code.

Bad input ends with one line on stderr (``error: ...``, naming the problem and the fix), exit code 2, no traceback,
before any model is loaded, and with nothing stored lost. The signal rows (SIGINT, SIGTERM, SIGKILL) run real
processes in ``tests/test_workers.py``; the locked-database row is ``tests/test_cli.py``'s
``test_locked_database_is_a_one_line_error_and_loses_nothing``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest

from tuner.api import run_study
from tuner.options import RunOptions, output_dir

Cli = Callable[..., Any]
TINY: tuple[str, ...] = (
    "--device", "cpu", "--calib", "16", "--holdout", "8", "--batch-size", "8", "--repeats", "2", "--final-repeats",
    "3", "--latency-source", "synthetic",
)  # fmt: skip
"""A demo study whose trials take milliseconds (deterministic synthetic latency)."""


def assert_refused(result: Any, *fragments: str) -> str:
    """Exit 2, one ``error:`` line on stderr holding every fragment, no traceback; returns the line."""
    assert result.code == 2, (result.code, result.out[-2000:], result.err[-2000:])
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert "Traceback" not in result.err + result.out
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "loading the" not in result.out  # refused before any model loaded
    return lines[0]


def tiny_study(url: str, name: str = "s", **changes: Any) -> None:
    """A finished 3-trial synthetic study in ``url`` (made through the library)."""
    settings: dict[str, Any] = {
        "budget": "75%", "trials": 3, "calib": 16, "holdout": 8, "batch_size": 8, "repeats": 2, "final_repeats": 3,
        "device": "cpu", "latency_source": "synthetic", "storage": url, "study": name,
    }  # fmt: skip
    settings.update(changes)
    result = run_study(RunOptions(**settings))
    assert result.exit_code == 0


@pytest.fixture(scope="module")
def made_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SQLite file holding one finished tiny study ``s``, made once; tests copy it (:func:`study_file`)."""
    import os

    folder = tmp_path_factory.mktemp("made")
    before = Path.cwd()
    os.chdir(folder)
    try:
        tiny_study("sqlite:///s.db")
    finally:
        os.chdir(before)
    with sqlite3.connect(folder / "s.db") as connection:  # WAL into the file: a copy of the file is then complete
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return folder / "s.db"


def study_file(made: Path, name: str) -> str:
    """A copy of the made study's file in the current folder; its storage URL."""
    import shutil

    shutil.copy(made, name)
    return f"sqlite:///{name}"


# ------------------------------------------------------------------------------------------------------- settings


def test_row_unparseable_budget(tuner_workdir: Path, tuner_cli: Cli) -> None:
    assert_refused(tuner_cli("run", "--budget", "fast"), "invalid --budget 'fast'")
    assert not Path("studies").exists()


def test_row_holdout_0_is_refused_before_the_search(tuner_workdir: Path, tuner_cli: Cli) -> None:
    result = tuner_cli("run", "--budget", "75%", *TINY, "--holdout", "0")
    assert_refused(
        result,
        "--holdout must be an integer >= 1 (the export validates its choice on the held-out slice), got 0",
    )
    assert not Path("studies").exists()  # no study was made, no trial ran


def test_row_model_without_dataset_blames_the_dataset(tuner_workdir: Path, tuner_cli: Cli) -> None:
    line = assert_refused(
        tuner_cli("run", "--budget", "50ms", "--model", "org/some-model"),
        "the fidelity evaluator needs --dataset (images); give --dataset",
    )
    assert "--model" not in line


def test_row_missing_local_model(tuner_workdir: Path, tuner_cli: Cli) -> None:
    Path("images").mkdir()
    assert_refused(
        tuner_cli("run", "--budget", "50ms", "--model", "./no/such/model", "--dataset", "images"),
        "cannot load --model './no/such/model': no such folder or file; give a local folder",
    )


def test_row_hub_id_with_the_hub_unreachable_fails_in_seconds(
    tuner_workdir: Path, tuner_cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    Path("images").mkdir()
    started = time.perf_counter()
    result = tuner_cli("run", "--budget", "50ms", "--model", "no-such-org/no-such-model", "--dataset", "images")
    assert_refused(
        result,
        "cannot load --model 'no-such-org/no-such-model': not a local path, and the hub is unreachable from here "
        "(HF_HUB_OFFLINE is set) with no cached copy",
    )
    assert time.perf_counter() - started < 10  # no half-minute of retries


def test_row_unknown_sampler_space_or_evaluator(tuner_workdir: Path, tuner_cli: Cli) -> None:
    assert_refused(tuner_cli("run", "--budget", "50ms", "--sampler", "cmaes"), "unknown sampler 'cmaes'; available:")


def test_row_workers_on_sqlite(tuner_workdir: Path, tuner_cli: Cli) -> None:
    assert_refused(
        tuner_cli("run", "--budget", "50ms", "--workers", "4"),
        "--workers 4 cannot share an SQLite --storage",
        "give a PostgreSQL URL or journal:///path as --storage, or --workers 1",
    )


# -------------------------------------------------------------------------------------------------------- storage


def test_row_storage_folder_cannot_be_made(tuner_workdir: Path, tuner_cli: Cli) -> None:
    Path("a-file").write_text("not a folder")
    for url in (f"sqlite:///{tuner_workdir}/a-file/dir/x.db", f"journal:///{tuner_workdir}/a-file/dir/x.log"):
        assert_refused(
            tuner_cli("run", "--budget", "75%", *TINY, "--storage", url),
            f"cannot create the folder of {url}: Not a directory; give a writable --storage path",
        )


def test_row_storage_is_not_a_url(tuner_workdir: Path, tuner_cli: Cli) -> None:
    assert_refused(
        tuner_cli("run", "--budget", "75%", *TINY, "--storage", "studies/tuner.db"),
        "invalid --storage 'studies/tuner.db': give a database URL such as sqlite:///studies/tuner.db",
    )


def test_row_storage_file_is_not_a_database(tuner_workdir: Path, tuner_cli: Cli) -> None:
    Path("x.db").write_bytes(b"someone's notes" * 40)
    assert_refused(
        tuner_cli("run", "--budget", "75%", *TINY, "--storage", "sqlite:///x.db"),
        "sqlite:///x.db is not an SQLite database (corrupt or another kind of file); it was left untouched",
    )
    assert Path("x.db").read_bytes() == b"someone's notes" * 40
    Path("x.log").write_bytes(b"\x00\x01 not a journal\n")
    assert_refused(
        tuner_cli("run", "--budget", "75%", *TINY, "--storage", "journal:///x.log"),
        "journal:///x.log is not a readable Optuna journal",
        "it was left untouched",
    )
    assert Path("x.log").read_bytes() == b"\x00\x01 not a journal\n"


def test_row_database_server_unreachable(tuner_workdir: Path, tuner_cli: Cli) -> None:
    url = "postgresql+psycopg2://tuner:secret@127.0.0.1:1/studies"
    line = assert_refused(
        tuner_cli("run", "--budget", "75%", *TINY, "--storage", url),
        "cannot reach the database server of postgresql+psycopg2://tuner:***@127.0.0.1:1/studies",
        "start it, or fix the host, port, user or password in the --storage URL",
    )
    assert "secret" not in line


def test_row_database_driver_missing(tuner_workdir: Path, tuner_cli: Cli) -> None:
    assert_refused(
        tuner_cli("run", "--budget", "75%", *TINY, "--storage", "mysql://tuner@127.0.0.1/studies"),
        "needs a database driver that is not installed",
        "pip install 'tuner[postgres]'",
    )


# ----------------------------------------------------------------------------------------------- existing studies


def test_row_resume_with_another_seed_or_sampler(tuner_workdir: Path, tuner_cli: Cli, made_study: Path) -> None:
    study_file(made_study, "s.db")
    before = optuna.load_study(study_name="s", storage="sqlite:///s.db").get_trials()
    common = ("run", "--budget", "75%", *TINY, "--storage", "sqlite:///s.db", "--study", "s", "--trials", "5")
    assert_refused(
        tuner_cli(*common, "--seed", "5", "--sampler", "random"),
        "was made with different settings: sampler tpe -> random, seed 0 -> 5",
        "only --trials, --timeout, --prefer, --repeats, --final-repeats, --workers may change on resume",
    )
    after = optuna.load_study(study_name="s", storage="sqlite:///s.db").get_trials()
    assert [(t.number, t.state, t.values) for t in after] == [(t.number, t.state, t.values) for t in before]
    resumed = tuner_cli(*common, "--repeats", "3", "--final-repeats", "4", "--prefer", "fast")
    assert resumed.code == 0, resumed.out + resumed.err  # the settings that may change do


def test_row_worker_for_a_study_that_does_not_exist(tuner_workdir: Path, tuner_cli: Cli, made_study: Path) -> None:
    study_file(made_study, "s.db")
    assert_refused(
        tuner_cli("worker", "--study", "nope", "--storage", "sqlite:///s.db"),
        "no study 'nope' in sqlite:///s.db; stored studies: s",
    )
    assert_refused(tuner_cli("worker", "--storage", "sqlite:///missing.db"), "sqlite:///missing.db does not exist")


def test_row_copy_onto_a_study_of_the_same_name(tuner_workdir: Path, tuner_cli: Cli, made_study: Path) -> None:
    study_file(made_study, "a.db")
    study_file(made_study, "b.db")
    count = len(optuna.load_study(study_name="s", storage="sqlite:///a.db").trials)
    assert_refused(
        tuner_cli("copy", "--from", "sqlite:///a.db", "--to", "sqlite:///b.db"),
        "sqlite:///b.db already holds a study 's'; give another --to-study name or another target storage",
    )
    copied = tuner_cli("copy", "--from", "sqlite:///a.db", "--to", "sqlite:///b.db", "--to-study", "s2")
    assert copied.code == 0 and f"copied study 's2' ({count} trials)" in copied.out, copied.out + copied.err
    trials = [optuna.load_study(study_name=name, storage="sqlite:///b.db").trials for name in ("s", "s2")]
    assert [(t.number, t.state, t.values) for t in trials[0]] == [(t.number, t.state, t.values) for t in trials[1]]


# ---------------------------------------------------------------------------------------------------- no schedule


def test_row_no_schedule_meets_the_budget_marks_an_earlier_best_stale(tuner_workdir: Path, tuner_cli: Cli) -> None:
    url = "sqlite:///s.db"
    folder = output_dir("impossible", storage=url)
    assert folder.name.startswith("impossible@sqlite-s-")  # keyed by storage and study: cannot collide
    folder.mkdir(parents=True)
    (folder / "best.json").write_text(json.dumps({"earlier": True}))
    result = tuner_cli("run", "--budget", "0.01ms", *TINY, "--storage", url, "--study", "impossible", "--trials", "3")
    assert result.code == 3, result.out + result.err
    assert "no schedule meets the budget 0.01ms" in result.out and "closest: trial" in result.out
    assert not (folder / "best.json").exists()
    assert json.loads((folder / "best.stale.json").read_text()) == {"earlier": True}
    assert "moved the earlier" in result.out and "best.stale.json" in result.out


def test_outputs_of_same_named_studies_in_two_storages_do_not_collide(
    tuner_workdir: Path, tuner_cli: Cli, made_study: Path
) -> None:
    for name in ("a.db", "b.db"):  # two storages, each with a study named s
        url = study_file(made_study, name)
        result = tuner_cli("plot", "--storage", url)
        assert result.code == 0, result.out + result.err
    first, second = output_dir("s", storage="sqlite:///a.db"), output_dir("s", storage="sqlite:///b.db")
    assert first != second and first.parent == second.parent == Path("studies")
    assert (first / "pareto.html").is_file() and (second / "pareto.html").is_file()
    assert output_dir("s", storage=f"sqlite:///{tuner_workdir}/a.db") == first  # one file, one folder
