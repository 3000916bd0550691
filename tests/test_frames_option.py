"""``frames`` (``--frames``): frames sampled per video, a run option from the CLI and recipes through ``RunOptions`` and
``EvaluatorOptions`` to the Video-MME evaluator, kept by the study and the export so that resume and ``tuner apply``
sample the same; every task without video refuses it in one line.

Real tiny models and data: the LLaVA-OneVision, LLaVA-1.5 and Video-MME folders of ``test_mllm_tasks``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from test_cli import assert_one_line_error
from test_mllm_tasks import VIDEO_WORDS, llava_dir, onevision_dir, videomme_folder

from evaluators import Evaluator, EvaluatorError, EvaluatorOptions, get_evaluator
from evaluators.video_mme import VideoMmeEvaluator
from tuner.api import apply_schedule
from tuner.cli import _resume_command
from tuner.errors import TunerError
from tuner.evoprune import Schedule, Scoring
from tuner.options import RunOptions, load_recipe_text

__all__ = ["llava_dir", "onevision_dir"]  # module fixtures shared with test_mllm_tasks (built once here too)

Cli = Any  # the tuner_cli fixture of conftest


def video_run(onevision: Path, dataset: Path, **extra: Any) -> RunOptions:
    """A small Video-MME run: 2 calibration videos and 1 held-out video, 3 questions each, batch 3, on the CPU."""
    return RunOptions(budget="99%", model=str(onevision), dataset=str(dataset), evaluator="videomme", calib=2,
                      holdout=1, batch_size=3, device="cpu", **extra)  # fmt: skip


def build(task: str, **settings: Any) -> Evaluator:
    """The registered evaluator ``task`` built from keyword settings, as ``tuner run`` builds it."""
    factory: Callable[..., Evaluator] = get_evaluator(task)
    return factory(**settings)


def video_tokens(evaluator: Any) -> int:
    """The video tokens of the first calibration prompt (frames x 9 pooled tokens + the newline here)."""
    inputs = evaluator._batches["calib"][0][0]
    return int((inputs["input_ids"][0] == VIDEO_WORDS.index("<video>")).sum())


def test_run_options_frames_reach_the_videomme_evaluator(onevision_dir: Path, tmp_path: Path) -> None:
    options = video_run(onevision_dir, videomme_folder(tmp_path, videos=3), frames=3)
    options.validate()
    # What `tuner run` builds (tuner.api.run_study) and stores as the study's evaluator arguments.
    assert options.evaluator_args()["frames"] == 3
    evaluator = build(options.evaluator_name, **options.evaluator_args(), seed=0)
    assert isinstance(evaluator, VideoMmeEvaluator)
    assert evaluator.frames == evaluator.frames_per_item == 3
    inputs = evaluator._batches["calib"][0][0]
    assert inputs["pixel_values_videos"].shape == (3, 3, 3, 48, 48)  # 3 questions of one video, 3 frames, 48 px
    assert video_tokens(evaluator) == 3 * 9 + 1
    assert evaluator.settings()["frames"] == 3  # the study's identity and the export's provenance
    assert "videos of 3 frames" in evaluator.describe_latency()
    # The timed call runs on those frames.
    with torch.inference_mode():
        evaluator.latency_call()()


def test_frames_come_from_evaluator_options_and_the_keyword_still_overrides(
    onevision_dir: Path, tmp_path: Path
) -> None:
    folder = videomme_folder(tmp_path, videos=2)
    shared = EvaluatorOptions(model=str(onevision_dir), dataset=str(folder), calib=1, holdout=1, frames=2)
    from_options = VideoMmeEvaluator(shared)
    assert from_options.frames == 2 and video_tokens(from_options) == 2 * 9 + 1
    overridden = VideoMmeEvaluator(shared, frames=1)  # the constructor keyword of before, now an option field
    assert overridden.frames == 1 and video_tokens(overridden) == 1 * 9 + 1
    # None is the evaluator's default; every other value is checked in one line.
    assert EvaluatorOptions().frames is None and VideoMmeEvaluator.check_frames(None) == 8
    for bad in (0, -2, 2.5, True, "8"):
        with pytest.raises(EvaluatorError, match="^frames must be an integer >= 1, got"):
            VideoMmeEvaluator(shared, frames=bad)


def test_tasks_without_video_refuse_frames_in_one_line(llava_dir: Path) -> None:
    for task, settings in (
        ("pope", {"model": str(llava_dir)}),
        ("demo", {}),
        ("fidelity", {"model": "x", "dataset": "y"}),
    ):
        with pytest.raises(EvaluatorError) as caught:
            build(task, frames=4, **settings)
        message = str(caught.value)
        assert "\n" not in message and caught.value.params == ("frames",)
        assert message == f"frames applies to video tasks (videomme); task {task!r} has no video: leave out frames"
    # frames=None (not given) is every evaluator's default: nothing to refuse.
    assert get_evaluator("pope").check_frames(None) is None
    # Refused by the run's checks too, before any model or data loads (the folder does not exist).
    options = RunOptions(budget="50ms", evaluator="pope", model="/no/such/llava", frames=4)
    with pytest.raises(EvaluatorError, match="task 'pope' has no video"):
        options.validate()
    assert "frames" not in RunOptions(budget="50ms").evaluator_args()  # only given: plugins never see the keyword


def test_a_recipe_sets_frames_and_the_resume_command_keeps_it() -> None:
    recipe = load_recipe_text('budget = "2x"\nframes = 16', "inline")
    assert RunOptions(**recipe).frames == 16
    with pytest.raises(TunerError, match="key 'frames' in config inline must be an integer"):
        load_recipe_text('frames = "16"', "inline")
    with pytest.raises(EvaluatorError, match="frames must be an integer >= 1, got 0"):
        RunOptions(budget="2x", evaluator="videomme", model="m", frames=0).validate()
    kept = _resume_command(RunOptions(budget="2x", evaluator="videomme", model="m", frames=16), "s")
    assert "--frames 16" in kept
    assert "--frames" not in _resume_command(RunOptions(budget="2x", evaluator="videomme", model="m"), "s")


def test_the_cli_refuses_bad_frames_in_one_line(tuner_workdir: Path, tuner_cli: Cli) -> None:
    assert_one_line_error(
        tuner_cli("run", "--budget", "50ms", "--frames", "0"), "--frames", "greater than or equal to 1"
    )
    assert_one_line_error(
        tuner_cli("run", "--budget", "50ms", "--task", "pope", "--frames", "4"),
        "--frames applies to video tasks (videomme); task 'pope' has no video: leave out --frames",
    )
    assert_one_line_error(tuner_cli("run", "--budget", "50ms", "--frames", "4"), "task 'demo' has no video")
    Path("video.toml").write_text('budget = "50ms"\nframes = 4\n')
    assert_one_line_error(tuner_cli("run", "--config", "video.toml"), "task 'demo' has no video")
    assert not Path("studies/tuner.db").exists()  # refused before any study is made
    help_text = tuner_cli("run", "--help").out
    assert "--frames" in help_text and "Frames sampled uniformly from each video" in " ".join(help_text.split())


def test_a_videomme_study_keeps_its_frames_and_studies_says_them(
    onevision_dir: Path, tuner_workdir: Path, tuner_cli: Cli
) -> None:
    dataset = videomme_folder(tuner_workdir, videos=3)
    storage = f"sqlite:///{tuner_workdir}/studies/v.db"
    run = ("run", "--model", str(onevision_dir), "--task", "videomme", "--dataset", str(dataset), "--budget", "99%",
           "--calib", "2", "--holdout", "1", "--batch-size", "3", "--latency-source", "synthetic", "--device", "cpu",
           "--storage", storage, "--final-repeats", "3", "--frames", "2")  # fmt: skip
    result = tuner_cli(*run, "--trials", "2")
    assert result.code == 0, result.out + result.err  # synthetic latency: the pruned seed trial meets 99%
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert study.user_attrs["tuner.settings"]["frames"] == 2  # the study's identity
    assert study.user_attrs["tuner.meta"]["evaluator_args"]["frames"] == 2  # what export and workers rebuild from
    assert study.user_attrs["tuner.meta"]["encoder"]["frames_per_item"] == 2
    listed = tuner_cli("studies", "--storage", storage)
    assert listed.code == 0 and "(prefill scope, 2 frames per video)" in listed.out, listed.out
    # Resuming with other frames is another study: refused, naming the difference.
    other = tuner_cli(*run[:-1], "3", "--trials", "3")
    assert_one_line_error(other, "frames 2 -> 3")
    # The export carries them, and `tuner apply` rebuilds the task from it with the same frames (not the default 8).
    (best,) = Path("studies").rglob("best.json")
    assert Schedule.load(best).provenance["evaluator_settings"]["frames"] == 2
    applied = tuner_cli("apply", "--schedule", str(best), "--device", "cpu", "--repeats", "2")
    assert applied.code in (0, 3), applied.out + applied.err  # 3: the real timing missed the synthetic budget
    assert "videos of 2 frames" in " ".join(applied.out.split()), applied.out


def test_apply_rebuilds_the_videomme_task_with_the_schedules_frames(onevision_dir: Path, tmp_path: Path) -> None:
    """``tuner apply`` rebuilds a task from the schedule's ``evaluator_settings`` (what the export stores: the
    evaluator's ``settings()``); the frames come back with them, not the default 8."""
    options = video_run(onevision_dir, videomme_folder(tmp_path, videos=3), frames=3)
    evaluator = build("videomme", **options.evaluator_args(), seed=0)
    schedule = Schedule([18, 6, 0], 36, scoring=Scoring(ctr=0.0), family="siglip", has_cls=False,
                        provenance={"evaluator": "videomme", "evaluator_settings": evaluator.settings()})  # fmt: skip
    path = tmp_path / "best.json"
    schedule.save(path)
    result = apply_schedule(path, device="cpu", repeats=2)
    assert "videos of 3 frames" in result.inputs, result.inputs
    assert result.token_counts == [18, 12, 12] and result.batch_size == 3
