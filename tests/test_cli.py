"""The ``tuner`` command line end to end, on the real demo (tiny config), real SQLite, real Optuna."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import optuna
import pytest
from optuna.trial import TrialState

import tuner.cli as cli_module
from tuner.options import output_dir

Cli = Callable[..., Any]  # the tuner_cli fixture: (*args) -> result with .code, .out, .err
TINY_RUN_ARGS: tuple[str, ...] = (
    "--calib", "24", "--holdout", "24", "--batch-size", "8", "--repeats", "2", "--final-repeats", "5",
)  # fmt: skip
"""A demo run small enough for seconds: 24 + 24 scenes, batch 8, few timed runs."""
BUDGET = "3s"  # per batch of 8 scenes (about 10 ms): met even on a busy shared CPU, so runs end with an export
STUDY = "demo-cpu-3000ms"


def run_tiny(cli: Cli, *extra: str, budget: str = BUDGET, trials: int = 6) -> Any:
    return cli("run", "--budget", budget, "--trials", str(trials), "--device", "cpu", *TINY_RUN_ARGS, *extra)


def assert_one_line_error(result: Any, *fragments: str) -> None:
    assert result.code == 2, (result.code, result.out, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert "Traceback" not in result.err + result.out
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def study_trials(path: Path = Path("studies/tuner.db"), name: str = STUDY) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{path}").get_trials()


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished tiny run, made once; tests that change a study work on a copy (:func:`copy_of`)."""
    folder = tmp_path_factory.mktemp("finished")
    command = [sys.executable, "-m", "tuner", "run", "--budget", BUDGET, "--trials", "10", "--device", "cpu"]
    env = _env()
    done = subprocess.run([*command, *TINY_RUN_ARGS], cwd=folder, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return folder


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env["COLUMNS"] = "160"
    return env


def copy_of(finished: Path, target: Path) -> None:
    shutil.copytree(finished / "studies", target / "studies")


# ----------------------------------------------------------------------------------------------------------- run


def test_run_end_to_end_writes_database_schedule_and_plot(finished_study: Path, tuner_cli: Cli) -> None:
    studies = finished_study / "studies"
    assert (studies / "tuner.db").is_file()
    best = studies / STUDY / "best.json"
    document = json.loads(best.read_text())
    schema = json.loads(tuner_cli("schema").out)
    jsonschema.validate(document, schema)
    metrics, provenance = document["metrics"], document["provenance"]
    assert metrics["feasible"] is True and metrics["latency_source"] == "measured"
    assert metrics["latency_ms"] <= metrics["latency_upper_ms"] <= metrics["budget_ms"]
    measured = metrics["latency_measured"]
    # 5 rounds per attempt; a noisy attempt (a loaded CI machine) is measured again and pooled.
    assert len(measured["candidate_samples_ms"]) == len(measured["baseline_samples_ms"]) == 5 * measured["attempts"]
    assert metrics["latency_ms"] == measured["ratio"] * metrics["baseline_ms"]
    for key in ("accuracy_calib", "accuracy_holdout", "accuracy_holdout_unpruned", "baseline_ms", "speedup_measured"):
        assert isinstance(metrics[key], float)
    assert provenance["study"] == STUDY and isinstance(provenance["trial"], int)
    assert set(provenance["versions"]) >= {"torch", "transformers", "optuna", "tuner"}
    html = (studies / STUDY / "pareto.html").read_text()
    assert "<script src=" not in html and 'src="http' not in html  # self-contained: plotly.js is embedded
    assert "Plotly.newPlot" in html and len(html) > 1_000_000
    assert "unpruned model" in html and "budget 3000ms" in html


def test_resume_continues_numbers_and_redoes_no_finished_trial(tuner_workdir: Path, tuner_cli: Cli) -> None:
    first = run_tiny(tuner_cli, trials=4)
    assert first.code == 0, first.out + first.err
    # Seed trials the first run did not reach stay enqueued (WAITING): only the finished ones are compared.
    before = {t.number: t.datetime_complete for t in study_trials() if t.state == TrialState.COMPLETE}
    assert sorted(before) == [0, 1, 2, 3]
    second = run_tiny(tuner_cli, trials=7)
    assert second.code == 0, second.out + second.err
    assert "resuming study" in second.out
    trials = study_trials()
    assert [t.number for t in trials] == list(range(7))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.number: t.datetime_complete for t in trials if t.number < 4} == before
    assert [line.split()[1] for line in second.out.splitlines() if line.startswith("trial ")] == ["4", "5", "6"]


def test_same_command_again_does_not_search_more(finished_study: Path, tuner_workdir: Path, tuner_cli: Cli) -> None:
    copy_of(finished_study, tuner_workdir)
    result = run_tiny(tuner_cli, trials=10)
    assert result.code == 0, result.out + result.err
    assert "already holds 10 finished trials" in result.out
    assert len(study_trials()) == 10


def test_resume_with_other_settings_is_refused(finished_study: Path, tuner_workdir: Path, tuner_cli: Cli) -> None:
    copy_of(finished_study, tuner_workdir)
    result = tuner_cli(
        "run", "--budget", "90%", "--study", STUDY, "--device", "cpu", "--calib", "16", "--holdout", "24",
        "--batch-size", "8",
    )  # fmt: skip
    assert_one_line_error(result, f"study '{STUDY}'", "different settings", "budget 3000ms -> 90%", "calib 24 -> 16")
    assert len(study_trials()) == 10  # nothing stored was touched


def test_same_seed_gives_the_same_trials_and_export_with_the_synthetic_latency_source(
    tuner_workdir: Path, tuner_cli: Cli
) -> None:
    # Measured latency differs run to run, and the sampler sees it: identical trials need the deterministic source.
    exports = []
    for name in ("a", "b"):
        result = run_tiny(
            tuner_cli, "--storage", f"sqlite:///{name}.db", "--seed", "3", "--study", name, "--latency-source",
            "synthetic", budget="75%", trials=12,
        )  # fmt: skip
        assert result.code == 0, result.out + result.err
        exports.append(json.loads((output_dir(name, storage=f"sqlite:///{name}.db") / "best.json").read_text()))
    params = [[t.params for t in study_trials(Path(f"{name}.db"), name)] for name in ("a", "b")]
    assert params[0] == params[1]
    assert exports[0]["plan"] == exports[1]["plan"] and exports[0]["scoring"] == exports[1]["scoring"]
    assert exports[0]["provenance"]["trial"] == exports[1]["provenance"]["trial"]
    assert exports[0]["metrics"]["latency_ms"] == exports[1]["metrics"]["latency_ms"]
    assert exports[0]["metrics"]["latency_source"] == "synthetic"


def test_other_seed_gives_other_trials(finished_study: Path, tuner_workdir: Path, tuner_cli: Cli) -> None:
    result = run_tiny(tuner_cli, "--seed", "11", trials=10)
    assert result.code == 0, result.out + result.err
    ours = [t.params for t in study_trials()]
    theirs = [t.params for t in study_trials(finished_study / "studies/tuner.db")]
    assert ours[:3] == theirs[:3]  # the seed trials
    assert ours[3:] != theirs[3:]


@pytest.mark.parametrize("budget", ["fast", "", "50", "0ms", "-3ms", "0.95x", "150%", "nanms", "infms", "ms"])
def test_bad_budgets_are_one_line_errors(budget: str, tuner_workdir: Path, tuner_cli: Cli) -> None:
    result = tuner_cli("run", "--budget", budget)
    assert_one_line_error(result, "budget")
    assert not Path("studies").exists()  # refused before anything was stored


@pytest.mark.parametrize(
    ("budget", "shown"), [("1000ms", "1000ms"), ("1 s", "1000ms"), ("1.05X", "1.05x"), ("99.5%", "99.5%")]
)
def test_good_budget_forms_run(budget: str, shown: str, tuner_workdir: Path, tuner_cli: Cli) -> None:
    result = run_tiny(tuner_cli, budget=budget, trials=1)
    # One trial (no pruning) is over a relative budget: exit 3 with the closest schedule; the run itself worked.
    assert result.code in (0, 3), result.out + result.err
    assert f"budget {shown} = " in result.out
    assert Path(f"studies/demo-cpu-{shown.replace('%', 'pct')}/pareto.html").is_file()


def test_no_feasible_schedule_exits_3_shows_the_closest_and_still_plots(tuner_workdir: Path, tuner_cli: Cli) -> None:
    result = run_tiny(tuner_cli, budget="0.01ms", trials=4)
    assert result.code == 3, result.out + result.err
    assert "no schedule meets the budget 0.01ms" in result.out
    assert "closest: trial" in result.out
    assert Path("studies/demo-cpu-0.01ms/pareto.html").is_file()
    assert not Path("studies/demo-cpu-0.01ms/best.json").exists()
    assert "on a GPU" not in result.out  # the small-batch hint is for GPU runs only


def test_no_feasible_schedule_on_a_gpu_says_why_small_batches_do_not_pay(
    tuner_workdir: Path, tuner_cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The study runs on this CPU; only the CLI's device check answers "GPU", as it would on a CUDA machine.
    monkeypatch.setattr(cli_module, "_on_gpu", lambda device: True)
    result = run_tiny(tuner_cli, budget="0.01ms", trials=2)
    assert result.code == 3, result.out + result.err
    hint = " ".join(result.out.split())
    assert "on a GPU a small batch waits for the host to launch its operators" in hint
    assert "--batch-size" in hint


@pytest.mark.parametrize(
    ("option", "value", "fragments"),
    [
        ("--space", "nope", ("unknown search space 'nope'", "family, keep_ratios")),
        (
            "--evaluator",
            "nope",
            (
                "unknown evaluator 'nope'",
                "demo, digits-vqa, fidelity, gqa, mllm, mmbench, mme, pope, scienceqa, videomme, zeroshot",
            ),
        ),
        ("--sampler", "nope", ("unknown sampler 'nope'", "tpe, nsga2, gp, random")),
        ("--task", "nope", ("unknown evaluator 'nope'",)),
        ("--latency-scope", "prefill", ("the demo evaluator cannot time the prefill scope", "available: encoder")),
        ("--latency-scope", "ttft", ("unknown latency scope 'ttft'", "encoder, prefill, generate")),
        ("--model", "/no/such/model --dataset /no/such/data", ("no such folder",)),
        ("--trials", "0", ("--trials",)),
        ("--device", "quantum", ("quantum",)),
    ],
)
def test_unknown_names_are_one_line_errors(
    option: str, value: str, fragments: tuple[str, ...], tuner_workdir: Path, tuner_cli: Cli
) -> None:
    assert_one_line_error(tuner_cli("run", "--budget", "50ms", option, *value.split()), *fragments)


def test_corrupt_database_is_refused_and_left_untouched(tuner_workdir: Path, tuner_cli: Cli) -> None:
    Path("studies").mkdir()
    content = b"not a database, but someone's file" * 50
    Path("studies/tuner.db").write_bytes(content)
    assert_one_line_error(run_tiny(tuner_cli), "not an SQLite database", "left untouched")
    assert_one_line_error(tuner_cli("studies"), "not an SQLite database")
    assert Path("studies/tuner.db").read_bytes() == content


def test_a_storage_path_that_cannot_be_made_is_refused_before_any_model_loads(
    tuner_workdir: Path, tuner_cli: Cli
) -> None:
    Path("a-file").write_text("not a folder")
    started = time.perf_counter()
    result = run_tiny(tuner_cli, "--storage", f"sqlite:///{tuner_workdir}/a-file/sub/x.db")
    assert_one_line_error(result, "cannot create the folder of", "give a writable --storage path")
    assert "loading the demo evaluator" not in result.out
    assert time.perf_counter() - started < 30


def test_missing_budget_is_a_one_line_usage_error(tuner_workdir: Path, tuner_cli: Cli) -> None:
    assert_one_line_error(tuner_cli("run"), "--budget", "tuner run --help")


# ------------------------------------------------------------------------------------------- export, plot, studies


def test_export_prefers_accurate_or_fast(finished_study: Path, tuner_workdir: Path, tuner_cli: Cli) -> None:
    copy_of(finished_study, tuner_workdir)
    fast = tuner_cli("export", "--prefer", "fast", "-o", "fast.json")
    accurate = tuner_cli("export", "-o", "accurate.json")
    assert fast.code == 0 and accurate.code == 0, fast.out + fast.err + accurate.out + accurate.err
    f, a = json.loads(Path("fast.json").read_text()), json.loads(Path("accurate.json").read_text())
    assert f["metrics"]["latency_ms_search"] <= a["metrics"]["latency_ms_search"]
    assert f["metrics"]["accuracy_calib"] <= a["metrics"]["accuracy_calib"]
    trials = [t for t in study_trials() if t.state == TrialState.COMPLETE]
    feasible = [t for t in trials if all(v <= 0 for v in t.constraints.values())]
    assert f["metrics"]["latency_ms_search"] == min(t.values[1] for t in feasible)
    assert f["provenance"]["prefer"] == "fast" and a["provenance"]["prefer"] == "accurate"


def test_export_for_another_budget(finished_study: Path, tuner_workdir: Path, tuner_cli: Cli) -> None:
    copy_of(finished_study, tuner_workdir)
    result = tuner_cli("export", "--study", STUDY, "--budget", "2s")
    assert result.code == 0, result.out + result.err
    document = json.loads(Path(f"studies/{STUDY}/best-2000ms.json").read_text())
    assert document["metrics"]["budget"] == "2000ms" and document["metrics"]["budget_ms"] == 2000.0
    impossible = tuner_cli("export", "--budget", "0.01ms")
    assert impossible.code == 3 and "closest: trial" in impossible.out


def test_export_and_plot_of_unknown_study(finished_study: Path, tuner_workdir: Path, tuner_cli: Cli) -> None:
    copy_of(finished_study, tuner_workdir)
    assert_one_line_error(tuner_cli("export", "--study", "nope"), "no study 'nope'", STUDY)
    assert_one_line_error(tuner_cli("plot", "--study", "nope"), "no study 'nope'")
    assert_one_line_error(tuner_cli("export", "--storage", "sqlite:///missing.db"), "does not exist")


def test_plot_writes_self_contained_html(finished_study: Path, tuner_workdir: Path, tuner_cli: Cli) -> None:
    copy_of(finished_study, tuner_workdir)
    result = tuner_cli("plot", "--study", STUDY, "-o", "p.html")
    assert result.code == 0, result.err
    html = Path("p.html").read_text()
    assert "Plotly.newPlot" in html and "<script src=" not in html and "Pareto front" in html


def test_studies_lists_trials_budget_and_best(finished_study: Path, tuner_workdir: Path, tuner_cli: Cli) -> None:
    copy_of(finished_study, tuner_workdir)
    result = tuner_cli("studies")
    assert result.code == 0, result.err
    assert STUDY in result.out and "10 finished / 10 requested" in result.out
    assert "3000ms" in result.out and "trial " in result.out and "measured again" in result.out


# ------------------------------------------------------------------------------------------------------------ apply


def test_apply_prints_tokens_per_layer_and_latency(finished_study: Path, tuner_cli: Cli) -> None:
    best = finished_study / "studies" / STUDY / "best.json"
    document = json.loads(best.read_text())
    result = tuner_cli("apply", "--schedule", str(best), "--device", "cpu", "--repeats", "5")
    assert result.code in (0, 3), result.out + result.err  # 3: the budget was not met on this re-measurement
    rows = [
        [cell.strip() for cell in line.strip("│ ").split("│")]
        for line in result.out.splitlines()
        if line.count("│") >= 3 and line.strip("│ ").split("│")[0].strip().isdigit()
    ]
    tokens = document["encoder"]["tokens_in"]
    expected = []
    for layer, remove in enumerate(document["plan"]["remove_per_layer"]):
        expected.append([str(layer), str(tokens), str(remove) if remove else "", str(tokens - remove)])
        tokens -= remove
    assert rows == expected
    assert "latency before:" in result.out and "after:" in result.out and "budget 3000ms: met" in result.out
    assert "interleaved rounds" in result.out


def test_apply_with_an_image(finished_study: Path, tuner_workdir: Path, tuner_cli: Cli) -> None:
    from PIL import Image

    Image.new("RGB", (100, 80), (200, 30, 30)).save("red.png")
    best = finished_study / "studies" / STUDY / "best.json"
    result = tuner_cli("apply", "--schedule", str(best), "--image", "red.png", "--batch-size", "2", "--repeats", "3")
    assert result.code in (0, 3), result.out + result.err
    assert "image red.png" in result.out


def test_apply_refuses_a_malformed_schedule_with_its_json_path(tuner_workdir: Path, tuner_cli: Cli) -> None:
    Path("bad.json").write_text('{"format": "evoprune-schedule", "version": 1, "encoder": {"family": 3}}')
    assert_one_line_error(tuner_cli("apply", "--schedule", "bad.json"), "bad.json", "$.encoder")
    Path("broken.json").write_text("{not json")
    assert_one_line_error(tuner_cli("apply", "--schedule", "broken.json"), "not valid JSON")
    assert_one_line_error(tuner_cli("apply", "--schedule", "missing.json"), "missing.json")


# ------------------------------------------------------------------------------------------------ spaces and help


def test_spaces_lists_spaces_with_parameters(tuner_cli: Cli) -> None:
    result = tuner_cli("spaces")
    assert result.code == 0
    assert "family (default):" in result.out and "keep_ratios:" in result.out
    assert "w_div:" in result.out and "keep_<layer>:" in result.out


@pytest.mark.parametrize(
    "command",
    ["run", "worker", "export", "plot", "report", "dashboard", "studies", "copy", "apply", "spaces", "schema"],
)
def test_every_command_has_help(command: str, tuner_cli: Cli) -> None:
    result = tuner_cli(command, "--help")
    assert result.code == 0
    assert len(result.out.splitlines()) > 3
    main_help = tuner_cli("--help")
    assert command in main_help.out


def test_run_help_explains_every_option(tuner_cli: Cli) -> None:
    text = tuner_cli("run", "--help").out
    options = "--budget --config --trials --timeout --seed --sampler --storage --study --model --dataset"
    options += " --dataset-split --evaluator --calib"
    options += " --latency-source --repeats --final-repeats"
    for option in [
        *options.split(),
        "--holdout",
        "--batch-size",
        "--device",
        "--space",
        "--prefer",
        "--latency-source",
    ]:
        assert option in text


# -------------------------------------------------------------------------------------------------------- Ctrl-C


INTERRUPTED_RUN = [sys.executable, "-m", "tuner", "run", "--budget", BUDGET, "--device", "cpu", *TINY_RUN_ARGS]


def start_run_and_wait_for_trials(workdir: Path, env: dict, trials: int) -> subprocess.Popen:
    """Start a long tiny run in a subprocess and return once it has printed ``trials`` trial lines (or 120 s)."""
    process = subprocess.Popen(
        [*INTERRUPTED_RUN, "--trials", "200"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    seen, deadline = 0, time.monotonic() + 120
    while seen < trials and time.monotonic() < deadline:
        seen += process.stdout.readline().startswith("trial ")
    return process


def resume_run(workdir: Path, env: dict, trials: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*INTERRUPTED_RUN, "--trials", str(trials)], cwd=workdir, env=env, capture_output=True, text=True
    )


def test_ctrl_c_keeps_finished_trials_and_the_study_resumes(tuner_workdir: Path, tuner_subprocess_env: dict) -> None:
    process = start_run_and_wait_for_trials(tuner_workdir, tuner_subprocess_env, 3)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, out + err
    hint = f"resume with: python -m tuner run --budget {BUDGET} --study {STUDY} --calib 24 --holdout 24 --batch-size 8"
    assert "interrupted:" in err and hint in err
    assert "Traceback" not in err
    trials = study_trials(tuner_workdir / "studies/tuner.db")
    finished = [t.number for t in trials if t.state == TrialState.COMPLETE]
    # The first Ctrl-C lets the running trial finish (its line was printed as its objective ended), then stops.
    assert "running trial was finished first" in err
    assert len(finished) >= 3 and all(t.state != TrialState.RUNNING for t in trials)

    resumed = resume_run(tuner_workdir, tuner_subprocess_env, len(finished) + 2)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = study_trials(tuner_workdir / "studies/tuner.db")
    assert len([t for t in after if t.state == TrialState.COMPLETE]) == len(finished) + 2
    assert [t.number for t in after][: len(trials)] == [t.number for t in trials]


def test_a_killed_worker_loses_no_finished_trial(tuner_workdir: Path, tuner_subprocess_env: dict) -> None:
    process = start_run_and_wait_for_trials(tuner_workdir, tuner_subprocess_env, 4)
    process.kill()  # SIGKILL: no clean-up at all
    process.communicate(timeout=30)
    finished = [t.number for t in study_trials() if t.state == TrialState.COMPLETE]
    assert len(finished) >= 3

    resumed = resume_run(tuner_workdir, tuner_subprocess_env, len(finished) + 2)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = study_trials()
    complete = [t.number for t in after if t.state == TrialState.COMPLETE]
    assert set(finished) <= set(complete) and len(complete) == len(finished) + 2


def test_locked_database_is_a_one_line_error_and_loses_nothing(
    finished_study: Path, tuner_workdir: Path, tuner_cli: Cli
) -> None:
    import sqlite3

    copy_of(finished_study, tuner_workdir)
    holder = sqlite3.connect("studies/tuner.db", timeout=0)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing (a second run, a dashboard)
    try:
        result = run_tiny(tuner_cli, "--study", "another", trials=1)
    finally:
        holder.rollback()
        holder.close()
    assert_one_line_error(result, "is locked by another process", "use another --storage")
    assert len(study_trials()) == 10


# ----------------------------------------------------------------------------------------------------------- recipes


TINY_RECIPE = """\
budget = "3s"
trials = 3
seed = 2
calib = 24
holdout = 24
batch_size = 8
repeats = 2
final_repeats = 5
device = "cpu"
study = "recipe"
"""


def test_a_recipe_runs_and_options_given_override_it(tuner_workdir: Path, tuner_cli: Cli) -> None:
    Path("recipe.toml").write_text(TINY_RECIPE)
    result = tuner_cli("run", "--config", "recipe.toml", "--trials", "4", "--holdout", "16")
    assert result.code == 0, result.out + result.err
    trials = study_trials(name="recipe")
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 4  # --trials 4 overrides the file's 3
    settings = optuna.load_study(study_name="recipe", storage="sqlite:///studies/tuner.db").user_attrs["tuner.settings"]
    assert settings["calib"] == 24 and settings["holdout"] == 16 and settings["batch_size"] == 8  # file, flag, file
    assert Path("studies/recipe/best.json").is_file()


def test_a_recipe_with_an_unknown_key_is_a_one_line_error(tuner_workdir: Path, tuner_cli: Cli) -> None:
    Path("recipe.toml").write_text('budget = "3s"\nbuget = "4s"\n')
    result = tuner_cli("run", "--config", "recipe.toml")
    assert_one_line_error(result, "unknown key 'buget' in --config recipe.toml", "valid keys: budget, trials")
    Path("typed.toml").write_text('budget = "3s"\ntrials = "many"\n')
    assert_one_line_error(tuner_cli("run", "--config", "typed.toml"), "key 'trials'", "must be an integer")
    Path("nobudget.toml").write_text("trials = 3\n")
    assert_one_line_error(tuner_cli("run", "--config", "nobudget.toml"), "--budget", "tuner run --help")
    assert_one_line_error(tuner_cli("run", "--config", "missing.toml"), "cannot read --config missing.toml")
    assert not Path("studies").exists()


def test_the_committed_recipes_are_valid() -> None:
    from tuner.options import RunOptions, load_recipe

    recipes = sorted((Path(__file__).resolve().parents[1] / "studies").glob("*.toml"))
    assert recipes, "studies/ holds no recipe"
    for path in recipes:
        RunOptions(**load_recipe(path)).validate()


def test_library_errors_name_the_flags(tuner_workdir: Path, tuner_cli: Cli) -> None:
    result = tuner_cli("run", "--budget", "3s", "--device", "cpu", "--batch-size", "0")
    assert_one_line_error(result, "--batch-size must be an integer >= 1, got 0")
    result = tuner_cli("run", "--budget", "3s", "--device", "cpu", "--dataset", "somewhere")
    assert_one_line_error(result, "the demo evaluator takes no --model, --dataset or --dataset-split")
