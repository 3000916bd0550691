"""The study runner with real components: Optuna on real SQLite, the demo evaluator, the EvoPrune engine."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from evaluators import LatencyMeter, parse_budget
from evaluators.demo import DemoEvaluator
from search_spaces import get_space
from tuner.export import pareto_front
from tuner.study import (
    ATTR_SEED_POINT,
    RunOptions,
    StorageError,
    StudyContext,
    StudyRunner,
    TunerError,
    create_or_resume,
    default_study_name,
    make_sampler,
    open_storage,
    public_url,
    trial_records,
)


@pytest.fixture(scope="module")
def tiny_demo_evaluator() -> DemoEvaluator:
    """The demo task on 24 + 24 scenes at batch 8 (built once: loading renders the scenes)."""
    return DemoEvaluator(calib=24, holdout=24, batch_size=8)


@pytest.fixture(autouse=True)
def _shared_calibration(monkeypatch: pytest.MonkeyPatch, tuner_calibration_cache: Path) -> None:
    monkeypatch.setenv("TUNER_CACHE_DIR", str(tuner_calibration_cache))


def _options(tmp_path: Path, **changes: object) -> RunOptions:
    options = RunOptions(
        budget="95%",
        storage=f"sqlite:///{tmp_path}/studies/tuner.db",
        calib=24,
        holdout=24,
        batch_size=8,
        device="cpu",
        repeats=2,
        final_repeats=5,
    )
    for name, value in changes.items():
        setattr(options, name, value)
    return options


def _study(tmp_path: Path, evaluator: DemoEvaluator, **changes: object) -> StudyContext:
    options = _options(tmp_path, **changes)
    storage = open_storage(options.storage)
    context, _ = create_or_resume(
        storage, options.storage, "s", options, evaluator, parse_budget(options.budget), lambda _: None
    )
    return context


def _runner(context: StudyContext, evaluator: DemoEvaluator, sampler: str = "random") -> StudyRunner:
    return StudyRunner(context, evaluator, LatencyMeter("cpu", repeats=2, warmup=0), sampler, 0)


def test_new_study_is_set_up_with_metric_names_settings_and_seed_trials(
    tmp_path: Path, tiny_demo_evaluator: DemoEvaluator
) -> None:
    context = _study(tmp_path, tiny_demo_evaluator)
    study = context.study
    assert study.metric_names == ["accuracy", "latency_ms"]
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert context.settings["budget"] == "95%" and context.settings["calib"] == 24
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.user_attrs[ATTR_SEED_POINT] for t in waiting] == [
        "no pruning",
        "paper skip default, 50% tokens",
        "paper skip default, 25% tokens",
    ]
    assert context.latency_model.baseline_ms > 0 and context.baseline["accuracy_calib"] > 0


def test_identical_schedules_are_evaluated_once_also_across_resume(
    tmp_path: Path, tiny_demo_evaluator: DemoEvaluator
) -> None:
    context = _study(tmp_path, tiny_demo_evaluator)
    params = get_space("family").seed_points(context.shape)[1].params
    context.study.enqueue_trial(params)  # the same schedule as the 50% seed point
    runner = _runner(context, tiny_demo_evaluator)
    runner.run(total_trials=4, timeout=None)
    assert runner.evaluations == 3
    duplicate = [r for r in trial_records(context.study) if r.evaluation["duplicate_of"] is not None]
    assert [(r.number, r.evaluation["duplicate_of"]) for r in duplicate] == [(3, 1)]
    assert duplicate[0].accuracy == trial_records(context.study)[1].accuracy

    resumed = _study(tmp_path, tiny_demo_evaluator)  # a new session on the same storage
    resumed.study.enqueue_trial(params)
    again = _runner(resumed, tiny_demo_evaluator)
    again.run(total_trials=5, timeout=None)
    assert again.evaluations == 0
    assert [r.number for r in trial_records(resumed.study)] == [0, 1, 2, 3, 4]


def test_constraint_marks_trials_over_the_budget_and_front_matches_optuna(
    tmp_path: Path, tiny_demo_evaluator: DemoEvaluator
) -> None:
    context = _study(tmp_path, tiny_demo_evaluator)
    runner = _runner(context, tiny_demo_evaluator)
    runner.run(total_trials=12, timeout=None)
    records = trial_records(context.study)
    budget_ms = context.budget_ms()
    for record in records:
        assert record.feasible == (record.latency_ms <= budget_ms)
    assert not records[0].feasible  # no pruning: 100% of the unpruned latency, over 95%
    ours = sorted(r.number for r in pareto_front(records, budget_ms))
    optunas = sorted(t.number for t in context.study.best_trials)
    assert ours == optunas


def test_resuming_with_other_settings_is_refused_naming_the_differences(
    tmp_path: Path, tiny_demo_evaluator: DemoEvaluator
) -> None:
    _study(tmp_path, tiny_demo_evaluator)
    with pytest.raises(TunerError) as caught:
        _study(tmp_path, tiny_demo_evaluator, budget="90%", space="keep_ratios")
    message = str(caught.value)
    assert "was made with different settings" in message
    assert "budget 95% -> 90%" in message and "space family -> keep_ratios" in message
    assert "use --study NEW_NAME" in message


def test_seed_and_sampler_may_change_on_resume(tmp_path: Path, tiny_demo_evaluator: DemoEvaluator) -> None:
    _study(tmp_path, tiny_demo_evaluator)
    context = _study(tmp_path, tiny_demo_evaluator, seed=7, sampler="nsga2")
    assert context.settings["budget"] == "95%"


def test_an_interrupted_seed_trial_is_enqueued_again(tmp_path: Path, tiny_demo_evaluator: DemoEvaluator) -> None:
    context = _study(tmp_path, tiny_demo_evaluator)
    trial = context.study.ask()  # pops the "no pruning" seed trial, as a run would
    context.study.tell(trial, state=TrialState.FAIL)  # ... and a Ctrl-C marks it failed
    resumed = _study(tmp_path, tiny_demo_evaluator)
    labels = [t.user_attrs[ATTR_SEED_POINT] for t in resumed.study.get_trials(states=(TrialState.WAITING,))]
    assert labels.count("no pruning") == 1


def test_samplers_are_seeded_and_unknown_ones_refused() -> None:
    for name in ("tpe", "nsga2", "gp", "random"):
        assert isinstance(make_sampler(name, 0), optuna.samplers.BaseSampler)
    with pytest.raises(TunerError, match="unknown sampler 'cmaes'; available: tpe, nsga2, gp, random"):
        make_sampler("cmaes", 0)


def test_storage_refuses_a_corrupt_file_and_leaves_it_untouched(tmp_path: Path) -> None:
    path = tmp_path / "tuner.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match="not an SQLite database"):
        open_storage(f"sqlite:///{path}")
    assert path.read_bytes() == b"this is not a database" * 100


def test_storage_refuses_a_corrupt_sqlite_body(tmp_path: Path) -> None:
    path = tmp_path / "tuner.db"
    path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4096)
    with pytest.raises(StorageError, match="not a readable SQLite database"):
        open_storage(f"sqlite:///{path}")
    assert path.read_bytes() == b"SQLite format 3\x00" + b"\xff" * 4096


def test_storage_errors_for_bad_urls_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="invalid --storage"):
        open_storage("studies/tuner.db")
    with pytest.raises(StorageError, match="does not exist"):
        open_storage(f"sqlite:///{tmp_path}/missing.db", create=False)
    with pytest.raises(StorageError, match="is a folder"):
        open_storage(f"sqlite:///{tmp_path}")
    open_storage(f"sqlite:///{tmp_path}/new/folder/tuner.db")
    assert (tmp_path / "new/folder/tuner.db").is_file()


def test_public_url_hides_the_password() -> None:
    assert public_url("postgresql://tuner:s3cret@db:5432/studies") == "postgresql://tuner:***@db:5432/studies"
    assert public_url("sqlite:///studies/tuner.db") == "sqlite:///studies/tuner.db"


def test_default_study_names() -> None:
    assert default_study_name(None, "demo", None, "cpu", parse_budget("50ms")) == "demo-cpu-50ms"
    assert (
        default_study_name("/models/llava-1.5/", "fidelity", "/data/pope", "cuda", parse_budget("2x"))
        == "llava-1.5-fidelity-pope-cuda-2x"
    )
