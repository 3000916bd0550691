"""The study runner with real components: Optuna on real SQLite, the demo evaluator, the EvoPrune engine."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from evaluators.demo import DemoEvaluator
from search_spaces import get_space
from search_spaces.base import DEFAULT_SCORING_PARAMS
from tuner.errors import StorageError, TunerError
from tuner.evoprune import Schedule
from tuner.export import pareto_front, select_schedule
from tuner.latency import (
    LatencyMeter,
    LatencyResult,
    LatencySource,
    MeasuredLatency,
    PairedLatency,
    parse_budget,
    synthetic_model,
)
from tuner.options import RunOptions, default_study_name, make_sampler
from tuner.storage import open_storage, public_url
from tuner.study import ATTR_SEED_POINT, StudyContext, StudyRunner, create_or_resume, trial_records


@pytest.fixture(scope="module")
def tiny_demo_evaluator() -> DemoEvaluator:
    """The demo task on 24 + 24 scenes at batch 8 (built once: loading renders the scenes)."""
    return DemoEvaluator(calib=24, holdout=24, batch_size=8)


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


def _runner(
    context: StudyContext, evaluator: DemoEvaluator, sampler: str = "random", source: LatencySource | None = None
) -> StudyRunner:
    source = source or MeasuredLatency(LatencyMeter("cpu", warmup=0))
    return StudyRunner(context, evaluator, source, sampler, 0, rounds=2)


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
        "front-loaded, no attention statistics, 25% tokens",
        "front-loaded, no attention statistics, 12% tokens",
    ]
    assert context.reference_ms > 0 and context.baseline["accuracy_calib"] > 0
    assert context.latency_source == "measured" and len(context.baseline["latency_blocks_ms"]) == 4
    kept = [m for m in context.baseline["latency_blocks_ms"] if m <= 1.15 * min(context.baseline["latency_blocks_ms"])]
    assert len(context.baseline["latency_samples_ms"]) == 3 * len(kept)  # 5 runs asked: 3 per block, at least


def test_identical_schedules_are_evaluated_once_also_across_resume(
    tmp_path: Path, tiny_demo_evaluator: DemoEvaluator
) -> None:
    context = _study(tmp_path, tiny_demo_evaluator)
    params = get_space("family").seed_points(context.shape)[1].params
    context.study.enqueue_trial(params)  # the same schedule as the 50% seed point
    runner = _runner(context, tiny_demo_evaluator)
    runner.run(total_trials=6, timeout=None)  # the five seed trials, then the duplicate
    assert runner.evaluations == 5
    duplicate = [r for r in trial_records(context.study) if r.evaluation["duplicate_of"] is not None]
    assert [(r.number, r.evaluation["duplicate_of"]) for r in duplicate] == [(5, 1)]
    assert duplicate[0].accuracy == trial_records(context.study)[1].accuracy

    resumed = _study(tmp_path, tiny_demo_evaluator)  # a new session on the same storage
    resumed.study.enqueue_trial(params)
    again = _runner(resumed, tiny_demo_evaluator)
    again.run(total_trials=7, timeout=None)
    assert again.evaluations == 0
    assert [r.number for r in trial_records(resumed.study)] == [0, 1, 2, 3, 4, 5, 6]


def test_constraint_marks_trials_over_the_budget_and_front_matches_optuna(
    tmp_path: Path, tiny_demo_evaluator: DemoEvaluator
) -> None:
    context = _study(tmp_path, tiny_demo_evaluator)
    runner = _runner(context, tiny_demo_evaluator)
    runner.run(total_trials=12, timeout=None)
    records = trial_records(context.study)
    budget_ms = context.budget_ms()
    for record in records:
        measured = record.latency
        assert record.latency_ms == pytest.approx(measured["ratio"] * context.reference_ms)
        assert len(measured["candidate_samples_ms"]) == len(measured["baseline_samples_ms"]) >= 2
        assert record.feasible == record.meets(budget_ms) == (record.upper_ms <= budget_ms)
    ours = sorted(r.number for r in pareto_front(records, budget_ms))
    optunas = sorted(t.number for t in context.study.best_trials)
    assert ours == optunas


class StubMeter(LatencySource):
    """A stand-in for timings with known answers: ratio 0.55 at 32 tokens out or fewer, 0.9 above (2.5 from 56 up: a
    slow outlier), 1 unpruned."""

    name = "stub"

    def reference(self, baseline: object, rounds: int) -> LatencyResult:
        raise AssertionError("the study's reference comes from create_or_resume")

    def paired(
        self, baseline: object, candidate: object, schedule: Schedule, rounds: int, reference_ms: float | None = None
    ) -> PairedLatency:  # noqa: E501
        ratio = 1.0 if schedule.is_empty else (0.55 if schedule.tokens_out <= 32 else 0.9)
        if not schedule.is_empty and schedule.tokens_out >= 56:
            ratio = 2.5
        return PairedLatency((ratio * 100.0,) * rounds, (100.0,) * rounds, self.name)


def test_feasibility_and_the_export_follow_the_measurement_not_a_model(
    tmp_path: Path, tiny_demo_evaluator: DemoEvaluator
) -> None:
    # A latency model skewed 30% high calls most pruned schedules over a 70% budget; the meter says otherwise.
    context = _study(tmp_path, tiny_demo_evaluator, budget="70%", latency_source="synthetic")
    assert context.reference_ms == 100.0
    runner = _runner(context, tiny_demo_evaluator, source=StubMeter())
    runner.run(total_trials=16, timeout=None)
    records = trial_records(context.study)
    skewed = synthetic_model(tiny_demo_evaluator.model)
    budget_ms = context.budget_ms()
    assert budget_ms == pytest.approx(70.0)
    measured_feasible = {r.number for r in records if r.latency_ms <= 55.0 + 1e-9}
    assert {r.number for r in records if r.feasible} == measured_feasible
    model_says_over = [
        r for r in records if r.feasible and 1.3 * skewed.predict_ms(context.schedule_of(r.trial)) > budget_ms
    ]
    assert model_says_over, "the test needs trials the skewed model would call infeasible"
    selection = select_schedule(context, tiny_demo_evaluator, StubMeter(), rounds=3)
    assert selection.chosen is not None and selection.chosen.record.number in measured_feasible
    assert selection.chosen.verdict is not None and selection.chosen.verdict.latency_ms == pytest.approx(55.0)


def test_resuming_with_other_settings_is_refused_naming_the_differences(
    tmp_path: Path, tiny_demo_evaluator: DemoEvaluator
) -> None:
    _study(tmp_path, tiny_demo_evaluator)
    with pytest.raises(TunerError) as caught:
        _study(tmp_path, tiny_demo_evaluator, budget="90%", space="keep_ratios")
    message = str(caught.value)
    assert "was made with different settings" in message
    assert "budget 95% -> 90%" in message and "space family -> keep_ratios" in message
    assert "give another study name" in message and caught.value.params[0] == "study"
    assert "only trials, timeout, prefer, repeats, final_repeats, workers may change on resume" in message


def test_seed_and_sampler_may_not_change_on_resume(tmp_path: Path, tiny_demo_evaluator: DemoEvaluator) -> None:
    _study(tmp_path, tiny_demo_evaluator)
    with pytest.raises(TunerError, match="different settings: sampler tpe -> nsga2, seed 0 -> 7"):
        _study(tmp_path, tiny_demo_evaluator, seed=7, sampler="nsga2")
    context = _study(tmp_path, tiny_demo_evaluator, repeats=3, final_repeats=4, trials=9, prefer="fast", workers=2)
    assert context.settings["budget"] == "95%" and context.search == {"sampler": "tpe", "seed": 0}


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
    with pytest.raises(StorageError, match="invalid storage"):
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


def test_the_plot_uses_measured_latency_marks_the_export_at_its_remeasured_value_and_clips_outliers(
    tmp_path: Path, tiny_demo_evaluator: DemoEvaluator
) -> None:
    from tuner.plots import CLIP_FACTOR, pareto_figure

    context = _study(tmp_path, tiny_demo_evaluator, budget="70%", latency_source="synthetic")
    context.study.enqueue_trial({"family": "mean", "keep": 0.9, **DEFAULT_SCORING_PARAMS})  # 58 tokens: 250 ms
    runner = _runner(context, tiny_demo_evaluator, source=StubMeter())
    runner.run(total_trials=10, timeout=None)
    selection = select_schedule(context, tiny_demo_evaluator, StubMeter(), rounds=3)
    assert selection.chosen is not None
    records = trial_records(context.study)
    context.study.set_user_attr("tuner.final", {**context.study.user_attrs["tuner.final"], "latency_ms": 54.0})
    front = {r.number for r in pareto_front(records, context.budget_ms())}
    figure = pareto_figure(context, front, selection.chosen.record.number)
    traces = {trace.name: trace for trace in figure.data}
    exported = next(trace for name, trace in traces.items() if name.startswith("exported"))
    assert list(exported.x) == [54.0]  # the re-measured value, not the search's
    x_max = CLIP_FACTOR * max(context.budget_ms(), context.reference_ms)
    assert figure.layout.xaxis.range[1] == pytest.approx(x_max * 1.02)
    assert max(r.latency_ms for r in records) == pytest.approx(250.0) and 250.0 > x_max
    for trace in figure.data:
        assert all(x <= x_max for x in trace.x)
    assert "slower trials clipped to the right edge" in figure.layout.title.text
    feasible_names = ("meets the budget", "Pareto front (feasible)")
    feasible_x = {x for name, trace in traces.items() if name in feasible_names for x in trace.x}
    assert feasible_x and all(x <= context.budget_ms() for x in feasible_x)
    assert "synthetic (not measured)" in figure.layout.title.text  # this study's reference is synthetic
