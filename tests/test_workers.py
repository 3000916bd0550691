"""Workers and faults end to end, on three real storages: SQLite (one process), a journal file and a PostgreSQL server
that the tests start (:func:`conftest.postgres_server`). Real ``python -m tuner`` processes, real signals.

The deterministic latency source and a tiny demo workload keep every trial to milliseconds; the processes still load
torch and the demo model, which is most of each test's time.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from conftest import PostgresServer, TunerCliResult
from optuna.trial import FrozenTrial, TrialState

from tuner.storage import open_storage
from tuner.workers import ATTR_WORKER

STUDY = "w"
TINY: tuple[str, ...] = (
    "--budget", "75%", "--device", "cpu", "--calib", "8", "--holdout", "8", "--batch-size", "8", "--repeats", "2",
    "--final-repeats", "3", "--latency-source", "synthetic", "--study", STUDY,
)  # fmt: skip
"""A demo study whose trials take milliseconds (synthetic latency: deterministic, labelled NOT measured)."""

KINDS = ("sqlite", "journal", "postgres")

KILLED_TOTAL = 16
"""Trials of the killed-worker study."""
WORKERS = {"sqlite": 1, "journal": 4, "postgres": 4}
"""SQLite is for one process (a run with --workers refuses it); the others take four workers."""
TOTAL = {"sqlite": 40, "journal": 40, "postgres": 100}
"""Trials of the exactly-once test: 4 workers x 25 on PostgreSQL; fewer elsewhere, to keep the suite short."""


@pytest.fixture(params=KINDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """``(kind, url)`` of a fresh, empty storage of each kind."""
    kind = request.param
    if kind == "postgres":
        return kind, request.getfixturevalue("postgres_server").database()
    url = f"sqlite:///{tmp_path}/tuner.db" if kind == "sqlite" else f"journal:///{tmp_path}/tuner.log"
    open_storage(url)  # made before any process races to create its tables
    return kind, url


@pytest.fixture
def env(tuner_subprocess_env: dict[str, str]) -> dict[str, str]:
    """One thread per process (several workers share two cores), and lines never wrapped (the tests read them)."""
    return {**tuner_subprocess_env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "1000"}


def tuner(*args: str) -> list[str]:
    return [sys.executable, "-m", "tuner", *args]


def load_trials(url: str) -> list[FrozenTrial]:
    """The study's trials, read through a fresh storage object as the tuner opens it (the journal needs that; a
    long-lived SQLite reader can keep seeing an old snapshot)."""
    try:
        storage = open_storage(url, create=False)
    except ValueError:  # not created yet
        return []
    try:
        return optuna.load_study(study_name=STUDY, storage=storage).get_trials(deepcopy=False)
    except KeyError:  # the study is not created yet
        return []
    finally:
        engine = getattr(storage, "engine", None)
        if engine is not None:
            engine.dispose()  # no connection left open per poll


def storage_file(url: str) -> str:
    """The file of a file storage (``""`` for a database server)."""
    from tuner.storage import storage_path

    path = storage_path(url)
    return str(path) if path is not None else ""


def complete(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.state == TrialState.COMPLETE]


def wait_for(url: str, condition: Callable[[list[FrozenTrial]], bool], process: subprocess.Popen, limit_s: float = 150):
    """Poll the storage until ``condition(trials)`` holds (the process must still run)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        trials = load_trials(url)
        if condition(trials):
            return trials
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"condition not met in {limit_s} s: {process.communicate()}")


def kill_mid_trial(url: str, alive: Callable[[], bool], skip_pid: int | None, after: int) -> tuple[int, int]:
    """SIGKILL the process that runs a trial, while the trial runs: once ``after`` trials are finished, find a RUNNING
    trial, freeze its process (SIGSTOP), check the trial is still RUNNING, then kill. Returns ``(pid, trial)``."""
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and alive():
        trials = load_trials(url)
        if len(complete(trials)) >= after:
            for trial in trials:
                owner = trial.user_attrs.get(ATTR_WORKER) or {}
                pid = owner.get("pid")
                if trial.state != TrialState.RUNNING or owner.get("trial") != trial.number or pid in (skip_pid, None):
                    continue
                os.kill(pid, signal.SIGSTOP)
                now = {t.number: t.state for t in load_trials(url)}
                # Not while it holds the journal file's lock (Optuna breaks a dead holder's lock only after 30 s).
                if now.get(trial.number) == TrialState.RUNNING and not os.path.lexists(f"{storage_file(url)}.lock"):
                    os.kill(pid, signal.SIGKILL)
                    return pid, trial.number
                os.kill(pid, signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("no running trial seen")


@pytest.fixture
def cli_fd(
    capfd: pytest.CaptureFixture[str],
    tuner_workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> Callable[..., TunerCliResult]:
    """The real entry point in this process (a run's parent: no start-up cost), its output read at the file
    descriptors, so the lines of the worker processes it starts are read too."""
    import torch

    from tuner.cli import main

    repo = str(Path(__file__).resolve().parents[1])
    for name, value in (("OMP_NUM_THREADS", "1"), ("COLUMNS", "1000"), ("PYTHONPATH", repo)):
        monkeypatch.setenv(name, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker processes: two cores shared by several
    request.addfinalizer(lambda: torch.set_num_threads(threads))

    def invoke(*args: str) -> TunerCliResult:
        capfd.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        out, err = capfd.readouterr()
        return TunerCliResult(code, out, err)

    return invoke


# -------------------------------------------------------------------------------------------------------- workers


def test_workers_run_every_trial_exactly_once(
    storage: tuple[str, str], tuner_workdir: Path, cli_fd: Callable[..., TunerCliResult]
) -> None:
    kind, url = storage
    workers, total = WORKERS[kind], TOTAL[kind]
    done = cli_fd("run", *TINY, "--storage", url, "--trials", str(total), "--workers", str(workers))
    assert done.code == 0, done.out[-3000:] + done.err[-3000:]
    trials = load_trials(url)
    assert sorted(t.number for t in trials) == list(range(total))  # none lost, none duplicated, none failed
    assert all(t.state == TrialState.COMPLETE for t in trials)
    per_process = collections.Counter(t.user_attrs[ATTR_WORKER]["pid"] for t in trials)
    share = total // workers
    assert sorted(per_process.values()) == [share] * workers  # e.g. 4 processes x 25 trials
    if workers > 1:
        assert os.getpid() not in per_process  # the run's own process only coordinates
        shares = ", ".join([str(share)] * workers)
        assert f"starting {workers} workers for {total} trials ({shares} each)" in done.out
        import torch

        if not torch.cuda.is_available():
            assert f"{workers} workers share this machine's" in done.out and "distorted" in done.out
    folders = list((tuner_workdir / "studies").glob(f"{STUDY}@*"))  # outputs keyed by storage and study
    assert len(folders) == 1 and (folders[0] / "best.json").is_file(), done.out[-2000:]


def test_a_killed_worker_trial_is_retried_and_the_study_completes(
    storage: tuple[str, str], tuner_workdir: Path, env: dict[str, str], cli_fd: Callable[..., TunerCliResult]
) -> None:
    kind, url = storage
    # Trials of 64 calibration scenes (tens of ms, not a few): the poller must see one RUNNING before all are done,
    # also on a loaded CI machine where it polls slowly.
    previous = ("", *TINY[:-1])
    slow = tuple("64" if before == "--calib" else value for before, value in zip(previous, TINY, strict=True))
    args = ("run", *slow, "--storage", url, "--trials", str(KILLED_TOTAL))
    if kind == "sqlite":  # one process: the run itself is killed, and the next run finds its trial
        process = subprocess.Popen(tuner(*args), cwd=tuner_workdir, env=env, stdout=subprocess.DEVNULL)
        victim, number = kill_mid_trial(url, lambda: process.poll() is None, None, after=2)
        process.wait(timeout=30)
        result = cli_fd(*args)
    else:  # two workers: one is killed, the run goes on with the other, then runs another round for what is missing
        found: list[tuple[int, int]] = []
        killer = threading.Thread(target=lambda: found.append(kill_mid_trial(url, lambda: True, os.getpid(), 2)))
        killer.start()
        result = cli_fd(*args, "--workers", "2")
        killer.join(timeout=30)
        assert found, result.out[-3000:] + result.err[-3000:]
        victim, number = found[0]
        assert f"(process {victim}) was killed by SIGKILL" in result.out
    assert result.code == 0, result.out[-3000:] + result.err[-3000:]
    retries = [t for t in load_trials(url) if t.system_attrs.get("failed_trial") == number]
    assert len(retries) == 1
    retry = retries[0]
    assert f"found trial {number} RUNNING, left by process {victim} on" in result.out
    assert f"that is gone: marked failed, its parameters queued again as trial {retry.number}" in result.out
    trials = {t.number: t for t in load_trials(url)}
    assert trials[number].state == TrialState.FAIL
    # The retry runs the dead trial's parameters (those it had drawn when it died) again.
    assert retry.state == TrialState.COMPLETE and retry.params.items() >= trials[number].params.items()
    assert len(complete(list(trials.values()))) == KILLED_TOTAL
    assert not [t for t in trials.values() if t.state == TrialState.RUNNING]


# -------------------------------------------------------------------------------------------------------- signals


def test_sigint_and_sigterm_keep_finished_trials_and_the_study_resumes(
    storage: tuple[str, str], tuner_workdir: Path, env: dict[str, str], cli_fd: Callable[..., TunerCliResult]
) -> None:
    kind, url = storage
    args = ("run", *TINY, "--storage", url)
    kept: dict[int, object] = {}
    for name, code, running in (
        ("SIGINT", 130, "SIGINT: the running trial was finished first"),
        ("SIGTERM", 143, "SIGTERM: "),
    ):
        # On PostgreSQL the SIGTERM goes to a run with two workers, which passes it on to them.
        workers = 2 if kind == "postgres" and name == "SIGTERM" else 1
        process = subprocess.Popen(
            tuner(*args, "--workers", str(workers), "--trials", "1000"), cwd=tuner_workdir, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        target = len(kept) + 4
        wait_for(url, lambda trials, target=target: len(complete(trials)) >= target, process)  # type: ignore[misc]
        process.send_signal(getattr(signal, name))
        _, err = process.communicate(timeout=120)
        assert process.returncode == code, (name, err[-2000:])
        assert "Traceback" not in err
        assert "interrupted: " in err and running in err and "resume with: python -m tuner run --budget 75%" in err
        assert f"--storage {url}" in err and (workers == 1 or f"--workers {workers}" in err)
        trials = load_trials(url)
        assert not [t for t in trials if t.state == TrialState.RUNNING]  # finished or failed, never left running
        if name == "SIGINT":
            assert not [t for t in trials if t.state == TrialState.FAIL]
        finished = {t.number: t.datetime_complete for t in complete(trials)}
        assert {number: finished[number] for number in kept} == kept  # every finished trial kept as it was
        kept = finished

    resumed = cli_fd(*args, "--trials", str(len(kept) + 2))
    assert resumed.code == 0, resumed.out[-3000:] + resumed.err[-3000:]
    assert f"resuming study '{STUDY}'" in resumed.out
    trials = load_trials(url)
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # the numbering goes on
    finished = {t.number: t.datetime_complete for t in complete(trials)}
    assert len(finished) == len(kept) + 2 and {number: finished[number] for number in kept} == kept
    assert min(set(finished) - set(kept)) > max(kept)


def test_a_worker_joins_a_study_and_runs_it_to_its_requested_trials(
    tmp_path: Path, cli_fd: Callable[..., TunerCliResult]
) -> None:
    url = f"journal:///{tmp_path}/shared.log"
    started = cli_fd("run", *TINY, "--storage", url, "--trials", "6", "--timeout", "0.01")  # stops after one trial
    assert started.code in (0, 3), started.out[-2000:] + started.err[-2000:]
    assert len(complete(load_trials(url))) < 6
    joined = cli_fd("worker", "--study", STUDY, "--storage", url)
    assert joined.code == 0, joined.out[-2000:] + joined.err[-2000:]
    assert f"study '{STUDY}' holds 6 finished of 6 requested" in joined.out
    trials = load_trials(url)
    assert len(complete(trials)) == 6 and sorted(t.number for t in trials) == list(range(6))
    assert "Traceback" not in joined.err


# ----------------------------------------------------------------------------------------------------------- copy


def test_copy_takes_a_study_home(postgres_server: PostgresServer, tuner_workdir: Path, tuner_cli: Callable) -> None:
    url = postgres_server.database()
    made = tuner_cli("run", *TINY, "--storage", url, "--trials", "6")
    assert made.code == 0, made.out[-2000:] + made.err[-2000:]
    home = f"sqlite:///{tuner_workdir}/home.db"
    original = load_trials(url)
    copied = tuner_cli("copy", "--from", url, "--to", home)
    assert copied.code == 0, copied.out + copied.err
    assert f"copied study '{STUDY}' ({len(original)} trials) from " in copied.out
    taken = load_trials(home)
    assert [(t.number, t.state, t.values, t.params) for t in taken] == [
        (t.number, t.state, t.values, t.params) for t in original
    ]
    listed = tuner_cli("studies", "--storage", home)
    assert listed.code == 0 and f"{STUDY}: 6 finished / 6 requested" in listed.out, listed.out


def test_a_journal_trial_whose_worker_on_another_machine_went_silent_is_retried(tmp_path: Path) -> None:
    from tuner.workers import ATTR_HEARTBEAT, reap_dead_trials

    study = optuna.create_study(
        storage=open_storage(f"journal:///{tmp_path}/j.log"), study_name="j", directions=["maximize", "minimize"]
    )
    distributions = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    silent, beating = study.ask(distributions), study.ask(distributions)
    for trial, heartbeat in ((silent, time.time() - 120), (beating, time.time())):
        trial.set_user_attr(ATTR_WORKER, {"trial": trial.number, "host": "another-machine", "pid": 1, "start": None})
        trial.set_user_attr(ATTR_HEARTBEAT, heartbeat)
    dead = reap_dead_trials(study)
    assert [(d.number, d.host, d.reason) for d in dead] == [(silent.number, "another-machine", "no heartbeat")]
    trials = study.get_trials()
    assert trials[silent.number].state == TrialState.FAIL and trials[beating.number].state == TrialState.RUNNING
    retry = trials[dead[0].retried_as]
    assert retry.state == TrialState.WAITING and retry.params == trials[silent.number].params
