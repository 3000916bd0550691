"""``tuner dashboard`` and ``tuner report`` for real: a real study in real SQLite, the real optuna-dashboard server in
its own process, and headless Chromium (Debian's, driven by playwright) reading the pages.

The browser tests skip, with the reason, only where no Chromium can be had (``.ci/run`` installs Debian's
``chromium``). With ``TUNER_SCREENSHOTS=docs/images`` they also write the README's screenshots there.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from tuner.api import run_study
from tuner.dashboard import figures_up_to_date
from tuner.figures import FIGURE_IDS
from tuner.options import RunOptions
from tuner.storage import open_storage
from tuner.study import StudyContext

STUDY = "dash"
SETTINGS: dict[str, Any] = {
    "budget": "50%", "trials": 12, "seed": 3, "calib": 24, "holdout": 24, "batch_size": 8, "repeats": 2,
    "final_repeats": 5, "device": "cpu", "latency_source": "synthetic",
}  # fmt: skip
"""A tiny demo study with the deterministic latency source: seconds to make, and it holds trials over the budget
(the unpruned seed point) as well as an export."""

Cli = Callable[..., Any]

SCREENSHOTS = Path(os.environ["TUNER_SCREENSHOTS"]).resolve() if os.environ.get("TUNER_SCREENSHOTS") else None
"""Where the screenshots also go (the README's: docs/images), from the folder pytest started in."""


@contextlib.contextmanager
def working_dir(folder: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@pytest.fixture(scope="module")
def study_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``tuner.db`` with one finished, exported tuner study (made once for the module)."""
    folder = tmp_path_factory.mktemp("dashboard")
    with working_dir(folder):
        result = run_study(RunOptions(**SETTINGS, storage=storage_of(folder), study=STUDY))
    assert result.exit_code == 0 and result.trials_run == SETTINGS["trials"]
    return folder


def storage_of(folder: Path) -> str:
    return f"sqlite:///{folder}/tuner.db"


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env["COLUMNS"] = "160"
    return env


@contextlib.contextmanager
def dashboard_server(folder: Path, storage: str) -> Iterator[str]:
    """``python -m tuner dashboard --port 0`` in its own process; yields the address it prints."""
    log = folder / f"dashboard-{time.monotonic_ns()}.err"
    with open(log, "w") as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "tuner", "dashboard", "--storage", storage, "--port", "0"],
            cwd=folder, env=subprocess_env(), stdout=subprocess.PIPE, stderr=errors, text=True,
        )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()

    def read_lines() -> None:
        for line in process.stdout or ():
            lines.put(line)

    threading.Thread(target=read_lines, daemon=True).start()
    try:
        deadline = time.monotonic() + 90
        address = None
        while address is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"the dashboard printed no address: {log.read_text()}") from None
            if line.startswith("dashboard: "):
                address = line.split()[1]
            assert time.monotonic() < deadline, log.read_text()
        yield address
        assert process.poll() is None, f"the dashboard stopped: {log.read_text()}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def dashboard_address(study_folder: Path) -> Iterator[str]:
    """``tuner dashboard`` on the fixture study (started once for the module)."""
    with dashboard_server(study_folder, storage_of(study_folder)) as address:
        yield address


def api(address: str, path: str) -> Any:
    """GET a JSON answer of the dashboard's API (as its page does)."""
    base = address.rsplit("/dashboard", 1)[0]
    request = urllib.request.Request(base + path, headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200
        return json.loads(answer.read())


def study_id(address: str, name: str) -> int:
    studies = api(address, "/api/studies")["study_summaries"]
    return next(s["study_id"] for s in studies if s["study_name"] == name)


# ------------------------------------------------------------------------------------------------------------ browser


def chromium_executable() -> str | None:
    """Debian's Chromium (or another Chromium on the PATH)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium, driven by playwright (the system browser: playwright downloads none)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]' installs it)")
    executable = chromium_executable()
    if executable is None:
        pytest.skip("no Chromium on this machine: install Debian's chromium (apt-get install chromium; .ci/run does)")
    with sync_playwright() as driver:
        launched = driver.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        yield launched
        launched.close()


def save_screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    """A full-page screenshot in the test's folder, and in ``$TUNER_SCREENSHOTS`` when set (the README's)."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    if SCREENSHOTS is not None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SCREENSHOTS / name)
    return path


def console_errors(page: Any) -> list[str]:
    """Collects the page's console errors and uncaught exceptions."""
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    return errors


def rendered_plots(page: Any, container: str) -> int:
    """Plotly graphs under ``container`` that drew their SVG."""
    return int(page.locator(f"{container} .main-svg").count())


# -------------------------------------------------------------------------------------------------------------- tests


def test_the_tuners_figures_and_note_are_saved_into_the_study(study_folder: Path) -> None:
    from optuna_dashboard import get_note
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    storage = open_storage(storage_of(study_folder), create=False)
    study = optuna.load_study(study_name=STUDY, storage=storage)
    context = StudyContext.load(study, storage_of(study_folder))
    assert figures_up_to_date(context)
    saved = get_plotly_graph_objects(storage.get_study_system_attrs(study._study_id))
    assert set(saved) == set(FIGURE_IDS)
    accuracy = json.loads(saved["tuner-accuracy-latency"])
    names = [trace.get("name", "") for trace in accuracy["data"]]
    assert "unpruned model" in names and "Pareto front (feasible)" in names
    assert any(name.startswith("exported (trial ") for name in names)
    assert "held-out accuracy (Pareto points)" in names
    assert any("budget 50%" in (shape.get("text") or "") for shape in accuracy["layout"].get("annotations", []))
    profile = json.loads(saved["tuner-token-profile"])
    assert any(trace["name"].startswith("paper's Skip to ") for trace in profile["data"])
    assert any(trace["name"].startswith("exported (trial ") for trace in profile["data"])
    note = get_note(study)
    for fragment in ("**model**", "**task**", "**device**", "**budget**", "**baseline**", "**best schedule**"):
        assert fragment in note
    assert f"python -m tuner export --study {STUDY}" in note


def test_the_dashboard_badges_only_feasible_trials_as_best_and_shows_readable_attributes(
    study_folder: Path, dashboard_address: str
) -> None:
    storage = storage_of(study_folder)
    study = optuna.load_study(study_name=STUDY, storage=storage)
    feasible_front = sorted(t.number for t in study.best_trials)
    infeasible = [t.number for t in study.get_trials() if any(v > 0 for v in t.constraints.values())]
    assert feasible_front and infeasible  # the fixture study has both, or this test proves nothing
    from optuna_dashboard._pareto_front import get_pareto_front_trials  # upstream's, which the fix wraps

    upstream = {t.number for t in get_pareto_front_trials(trials=study.get_trials(), directions=study.directions)}
    assert upstream & set(infeasible)  # unfixed, the dashboard would badge a trial over the budget "Best Trial"
    detail = api(dashboard_address, f"/api/studies/{study_id(dashboard_address, STUDY)}")
    assert sorted(t["number"] for t in detail["best_trials"]) == feasible_front
    by_number = {t["number"]: t for t in detail["trials"]}
    for number in infeasible:
        assert any(value > 0 for value in by_number[number]["constraints"]), number
    assert all(by_number[n]["constraints"] and by_number[n]["constraints"][0] <= 0 for n in feasible_front)
    attributes = {a["key"]: a["value"] for a in by_number[feasible_front[0]]["user_attrs"]}
    assert float(attributes["latency_ms_measured"]) > 0 and int(attributes["tokens_out"]) > 0
    assert "->" in attributes["schedule"]


def test_dashboard_in_chromium_lists_the_study_and_renders_optunas_and_the_tuners_plots(
    study_folder: Path, dashboard_address: str, browser: Any, tmp_path: Path
) -> None:
    study = optuna.load_study(study_name=STUDY, storage=storage_of(study_folder))
    (best,) = study.best_trials  # Optuna's own: the one feasible Pareto-optimal trial of the fixture study
    address = dashboard_address
    number = study_id(address, STUDY)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = console_errors(page)
    page.goto(address)
    page.get_by_text(re.compile(rf"^\d+\. {STUDY}$")).first.wait_for(timeout=30_000)  # the study list
    page.goto(f"{address}/studies/{number}")
    page.locator("#graph-pareto-front .main-svg").first.wait_for(timeout=30_000)  # Optuna's Pareto front
    for key in FIGURE_IDS:  # the tuner's figures, beside Optuna's
        page.locator(f'[id="user-defined-plot:{key}"] .main-svg').first.wait_for(timeout=30_000)
    for text in ("accuracy vs synthetic", "patch tokens after each layer", "hypervolume", "each score weight"):
        assert page.get_by_text(text).count() > 0, text
    page.get_by_text(f"Best Trial (number={best.number})").wait_for(timeout=10_000)  # only the feasible one
    save_screenshot(page, tmp_path, "dashboard.png")
    page.goto(f"{address}/studies/{number}/note")
    page.get_by_text("best schedule").first.wait_for(timeout=30_000)  # the study note
    page.goto(f"{address}/studies/{number}/trialTable")  # blank in optuna-dashboard 0.21; the tuner's table here
    rows = page.locator("table tr")
    rows.first.wait_for(timeout=30_000)
    assert rows.count() == len(study.trials) + 1
    assert page.locator("tr.over").count() == sum(any(v > 0 for v in t.constraints.values()) for t in study.trials)
    page.close()
    assert errors == [], errors


def test_report_in_chromium_renders_every_figure_offline_without_console_errors(
    study_folder: Path, browser: Any, tmp_path: Path, tuner_cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(study_folder)  # where the run wrote best.json: the report shows it, with its provenance
    report = tmp_path / "report.html"
    result = tuner_cli("report", "--study", STUDY, "--storage", storage_of(study_folder), "-o", str(report))
    assert result.code == 0, result.out + result.err
    assert result.out.strip() == f"report: {report}"
    document = report.read_text()
    assert "<script src=" not in document and 'src="http' not in document  # plotly.js inlined: works offline
    for heading in ("Pareto-optimal schedules", "Exported schedule", "Machine and versions", "remove_per_layer",
                    "&quot;provenance&quot;", "versions at the export"):  # fmt: skip
        assert heading in document
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    errors = console_errors(page)
    requested: list[str] = []
    page.route("**/*", lambda route: (requested.append(route.request.url), route.continue_()
                                      if route.request.url.startswith("file:") else route.abort()))  # fmt: skip
    page.goto(report.as_uri())
    for key in FIGURE_IDS:
        page.locator(f"#{key} .main-svg").first.wait_for(timeout=30_000)
    assert page.locator(".plotly-graph-div").count() == len(FIGURE_IDS)
    assert all(url.startswith("file:") for url in requested), requested
    assert page.locator("table tr.chosen").count() == 1  # the exported schedule's row in the Pareto table
    save_screenshot(page, tmp_path, "report.png")
    page.close()
    assert errors == []


def test_a_study_run_while_the_dashboard_reads_the_storage_loses_no_trial(tmp_path: Path) -> None:
    storage = storage_of(tmp_path)
    open_storage(storage)  # an empty storage for the dashboard to watch
    trials = 20
    log = tmp_path / "run.log"
    with dashboard_server(tmp_path, storage) as address, open(log, "w") as output_file:
        run = subprocess.Popen(
            [sys.executable, "-m", "tuner", "run", "--storage", storage, "--study", "watched", "--trials", str(trials),
             *[w for k, v in SETTINGS.items() if k != "trials" for w in ("--" + k.replace("_", "-"), str(v))]],
            cwd=tmp_path, env={**subprocess_env(), "OMP_NUM_THREADS": "1"}, stdout=output_file,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        polls, seen = 0, 0
        while run.poll() is None:  # the page's polling (its live update), four times a second
            studies = api(address, "/api/studies")["study_summaries"]
            for study in studies:
                detail = api(address, f"/api/studies/{study['study_id']}")
                seen = max(seen, sum(t["state"] == "Complete" for t in detail["trials"]))
            polls += 1
            time.sleep(0.25)
        output = log.read_text()
        # optuna-dashboard caches a study's trials for 2 s (under 100 trials): a read just after the run's last
        # trial may still show the one before it, so the final view is read until it has settled (at most 10 s).
        deadline, final_complete = time.monotonic() + 10, -1
        while final_complete != trials and time.monotonic() < deadline:
            final = api(address, f"/api/studies/{study_id(address, 'watched')}")
            final_complete = sum(t["state"] == "Complete" for t in final["trials"])
            time.sleep(0.5)
    assert run.returncode == 0, output
    assert "locked" not in output.lower(), output
    assert polls > 5 and seen > 0  # the dashboard read the study while the run wrote it
    stored = optuna.load_study(study_name="watched", storage=storage).get_trials()
    assert [t.number for t in stored] == list(range(trials))
    assert all(t.state == TrialState.COMPLETE for t in stored)
    assert final_complete == trials  # and the dashboard shows every one of them


def test_dashboard_bad_input_is_one_line_and_exit_2(tmp_path: Path, tuner_cli: Cli) -> None:
    missing = tuner_cli("dashboard", "--storage", f"sqlite:///{tmp_path}/missing.db")
    assert missing.code == 2 and missing.err.count("\n") == 1 and "does not exist" in missing.err, missing.err
    assert "Traceback" not in missing.err
    out_of_range = tuner_cli("dashboard", "--port", "70000")
    assert out_of_range.code == 2 and "--port" in out_of_range.err and "Traceback" not in out_of_range.err
    open_storage(storage_of(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = tuner_cli("dashboard", "--storage", storage_of(tmp_path), "--port", str(taken.getsockname()[1]))
    assert busy.code == 2 and busy.err.startswith("error: cannot serve on 127.0.0.1:"), busy.err
    assert "--port" in busy.err and busy.err.count("\n") == 1


def test_report_bad_input_is_one_line_and_exit_2(study_folder: Path, tmp_path: Path, tuner_cli: Cli) -> None:
    unknown = tuner_cli("report", "--study", "nope", "--storage", storage_of(study_folder), "-o", "r.html")
    assert unknown.code == 2 and "no study 'nope'" in unknown.err and unknown.err.count("\n") == 1, unknown.err
    blocked = tmp_path / "file"
    blocked.write_text("")
    unwritable = tuner_cli(
        "report", "--study", STUDY, "--storage", storage_of(study_folder), "-o", str(blocked / "report.html")
    )
    assert unwritable.code == 2 and "--output" in unwritable.err and unwritable.err.count("\n") == 1, unwritable.err
    assert "Traceback" not in unknown.err + unwritable.err


def test_a_run_saves_the_figures_now_and_then_not_after_every_trial(study_folder: Path) -> None:
    from tuner.dashboard import FigurePublisher

    storage = storage_of(study_folder)
    context = StudyContext.load(optuna.load_study(study_name=STUDY, storage=storage), storage)
    now = [0.0]
    publisher = FigurePublisher(context, interval_s=20.0, clock=lambda: now[0])
    assert publisher.enabled
    publisher.trial_finished()
    now[0] += 5.0
    publisher.trial_finished()
    assert publisher.saves == 1
    now[0] += 20.0
    publisher.trial_finished()
    assert publisher.saves == 2 and figures_up_to_date(context)


def test_the_dashboard_saves_figures_that_are_out_of_date_when_it_starts(study_folder: Path) -> None:
    from tuner.dashboard import SYSTEM_ATTR_STATE, refresh_studies

    url = storage_of(study_folder)
    storage = open_storage(url, create=False)
    study = optuna.load_study(study_name=STUDY, storage=storage)
    context = StudyContext.load(study, url)
    storage.set_study_system_attr(study._study_id, SYSTEM_ATTR_STATE, "made by an older tuner")
    assert not figures_up_to_date(context)
    saved: list[str] = []
    assert refresh_studies(storage, url, saved.append) == [STUDY]
    assert saved == [f"saving the tuner's figures into study {STUDY!r}"] and figures_up_to_date(context)
    assert refresh_studies(storage, url, saved.append) == [STUDY] and len(saved) == 1  # up to date: nothing saved
