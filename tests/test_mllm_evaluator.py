"""The LLaVA task evaluators on a tiny LLaVA with a real processor, saved and loaded like a hub checkpoint, and small
datasets written in each benchmark's schema (save_to_disk)."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from evaluators import EvaluatorError, get_evaluator
from evaluators.mllm import YES_NO, MllmItem, build_prompt, option_log_likelihoods
from search_spaces import EncoderShape
from tuner.evoprune import Schedule, Scoring
from tuner.mllm import LlavaPruning

WORDS = ["[PAD]", "[UNK]", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "Yes", "No", "A", "B", "C", "D", "E",
         "Is", "there", "a", "digit?", "Which", "one?"]  # fmt: skip


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA-1.5 (CLIP 32 px / patch 8, 4 layers; Llama 2 layers) with a word-level tokenizer, saved."""
    folder = tmp_path_factory.mktemp("llava")
    vocab = {word: index for index, word in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )  # fmt: skip
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                       num_attention_heads=4, image_size=32, patch_size=8),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, vocab_size=len(WORDS), pad_token_id=0, bos_token_id=2,
                                eos_token_id=3, max_position_embeddings=256),
        image_token_id=vocab["<image>"], vision_feature_layer=-2, vision_feature_select_strategy="default",
    )  # fmt: skip
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]


def save(tmp_path: Path, name: str, columns: dict, features: dict) -> str:
    folder = tmp_path / name
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).save_to_disk(str(folder))
    return str(folder)


def pope_dataset(tmp_path: Path, rows: int = 12) -> str:
    columns = {"image": images(rows), "question": ["Is there a digit?"] * rows,
               "answer": ["yes" if i % 2 else "no" for i in range(rows)]}  # fmt: skip
    features = {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
    return save(tmp_path, "pope", columns, features)


def test_option_log_likelihood_against_hand_computed_values() -> None:
    # Next-token probabilities 0.5 / 0.3 / 0.2: log-likelihoods are log(0.5), log(0.3), whatever the logits' scale.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])) + 7.0
    (scores,) = option_log_likelihoods(logits, [[0, 1]])
    assert scores == pytest.approx([np.log(0.5), np.log(0.3)], abs=1e-6)
    assert option_log_likelihoods(torch.zeros(2, 4), [[3], [0, 1, 2]]) == [[pytest.approx(np.log(0.25))]] + [
        [pytest.approx(np.log(0.25))] * 3
    ]


def test_pope_scores_batched_left_padded_prompts_as_each_alone(llava_dir: Path, tmp_path: Path) -> None:
    evaluator = get_evaluator("pope")(model=str(llava_dir), dataset=pope_dataset(tmp_path), calib=6, holdout=4,
                                      batch_size=4)  # fmt: skip
    assert [item.answer for item in evaluator.calib_items].count(0) == 3  # stratified: 3 yes, 3 no
    assert {i.row for i in evaluator.calib_items}.isdisjoint({i.row for i in evaluator.holdout_items})
    batched = evaluator.option_scores("calib")
    # By hand: each item alone (no padding), the log-softmax at the last position, at the tokens of Yes and No.
    model, processor = evaluator.model, evaluator.processor
    dataset = datasets.load_from_disk(evaluator.dataset_name)
    yes, no = processor.tokenizer.convert_tokens_to_ids(["Yes", "No"])
    for item, scores in zip(evaluator.calib_items, batched, strict=True):
        inputs = processor(images=[dataset[item.row]["image"]], text=[build_prompt(item)], return_tensors="pt")
        with torch.no_grad():
            log_probs = torch.log_softmax(model(**inputs).logits[0, -1], dim=-1)
        assert scores == pytest.approx([float(log_probs[yes]), float(log_probs[no])], abs=1e-4)
    accuracy = evaluator.accuracy("calib")
    expected = sum((s[0] < s[1]) == bool(i.answer) for s, i in zip(batched, evaluator.calib_items, strict=True))
    assert accuracy == expected / 6


def test_a_schedule_prunes_the_prompts_and_the_prefill(llava_dir: Path, tmp_path: Path) -> None:
    evaluator = get_evaluator("pope")(model=str(llava_dir), dataset=pope_dataset(tmp_path), calib=4, holdout=2,
                                      batch_size=4)  # fmt: skip
    shape = EncoderShape.of_model(evaluator.model)
    assert (shape.num_layers, shape.tokens_in) == (3, 16)  # the layers LLaVA reads, not the whole tower
    schedule = Schedule([8, 4, 0], 16, scoring=Scoring(ctr=0.0), family="clip", has_cls=True)
    prompt_lengths = []
    hook = evaluator.model.model.language_model.register_forward_hook(
        lambda module, args, kwargs, output: prompt_lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        native = evaluator.option_scores("calib")
        with evaluator.applied(schedule) as pruning:
            assert isinstance(pruning, LlavaPruning)
            pruned = evaluator.option_scores("calib")
            accuracy = evaluator.accuracy("holdout")
            evaluator.latency_call()()
        assert evaluator.option_scores("calib") == native  # removed: the native model again
    finally:
        hook.remove()
    assert prompt_lengths[1] == prompt_lengths[0] - 12 and prompt_lengths[-1] == prompt_lengths[0]
    assert len(pruned) == 4 and pruned != native and 0.0 <= accuracy <= 1.0


def test_multiple_choice_schemas_of_mmbench_and_scienceqa(llava_dir: Path, tmp_path: Path) -> None:
    text = datasets.Value("string")
    mmbench = save(
        tmp_path, "mmbench",
        {"image": images(8), "question": ["Which one?"] * 8, "hint": [None] * 8, "A": ["x"] * 8, "B": ["y"] * 8,
         "C": ["z"] * 4 + [None] * 4, "D": [None] * 8, "answer": ["A", "B", "C", "A", "B", "A", "B", "A"]},
        {"image": datasets.Image(), "question": text, "hint": text, "A": text, "B": text, "C": text, "D": text,
         "answer": text},
    )  # fmt: skip
    evaluator = get_evaluator("mmbench")(model=str(llava_dir), dataset=mmbench, calib=4, holdout=4)
    options = {item.options for item in evaluator.calib_items + evaluator.holdout_items}
    assert options == {("x", "y", "z"), ("x", "y")}
    assert 0.0 <= evaluator.accuracy("calib") <= 1.0
    scienceqa = save(
        tmp_path, "scienceqa",
        {"image": images(6), "question": ["Which one?"] * 6, "choices": [["cat", "dog"]] * 6, "answer": [0, 1] * 3},
        {"image": datasets.Image(), "question": text, "choices": datasets.Sequence(text),
         "answer": datasets.Value("int64")},
    )  # fmt: skip
    evaluator = get_evaluator("scienceqa")(model=str(llava_dir), dataset=scienceqa, calib=4, holdout=2)
    assert all(item.options == ("cat", "dog") for item in evaluator.calib_items)
    assert len(evaluator.option_scores("holdout")) == 2


def test_mme_samples_question_pairs_together(llava_dir: Path, tmp_path: Path) -> None:
    text = datasets.Value("string")
    pairs = 6
    mme = save(
        tmp_path, "mme",
        {"image": images(2 * pairs), "question_id": [f"img{i // 2}.png" for i in range(2 * pairs)],
         "question": ["Is there a digit?"] * (2 * pairs), "answer": ["Yes", "No"] * pairs},
        {"image": datasets.Image(), "question_id": text, "question": text, "answer": text},
    )  # fmt: skip
    evaluator = get_evaluator("mme")(model=str(llava_dir), dataset=mme, calib=3, holdout=2)
    calib_groups = [item.group for item in evaluator.calib_items]
    assert len(calib_groups) == 6 and all(calib_groups.count(group) == 2 for group in calib_groups)
    assert set(calib_groups).isdisjoint(item.group for item in evaluator.holdout_items)


def test_bad_models_and_datasets_are_one_line_errors(llava_dir: Path, tmp_path: Path) -> None:
    text = datasets.Value("string")
    no_answer = save(tmp_path, "bad", {"image": images(4), "question": ["Is there a digit?"] * 4},
                     {"image": datasets.Image(), "question": text})  # fmt: skip
    with pytest.raises(EvaluatorError, match="answer"):
        get_evaluator("pope")(model=str(llava_dir), dataset=no_answer, calib=2, holdout=2)
    wrong = save(tmp_path, "wrong", {"image": images(4), "question": ["q"] * 4, "answer": ["maybe"] * 4},
                 {"image": datasets.Image(), "question": text, "answer": text})  # fmt: skip
    with pytest.raises(EvaluatorError, match="'maybe' is not yes or no"):
        get_evaluator("pope")(model=str(llava_dir), dataset=wrong, calib=2, holdout=2)
    with pytest.raises(EvaluatorError, match="needs a LLaVA model"):
        get_evaluator("pope")(dataset=wrong)
    with pytest.raises(EvaluatorError, match="no options for a multiple-choice task"):
        get_evaluator("mmbench")(model=str(llava_dir), dataset=wrong, calib=2, holdout=2)


def test_the_prompt_is_llava_15s_single_turn() -> None:
    prompt = build_prompt(MllmItem(0, "Is there a digit?", YES_NO, 0, "0"), image_token="<im>")
    assert prompt == "USER: <im>\nIs there a digit?\nAnswer the question using a single word or phrase. ASSISTANT:"


def test_tuner_run_searches_a_llava_task_and_exports_a_schedule_for_the_layers_that_run(
    llava_dir: Path, tmp_path: Path
) -> None:
    import json
    import os
    import re
    import subprocess
    import sys

    dataset = pope_dataset(tmp_path, rows=16)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "COLUMNS": "160"}
    storage = f"sqlite:///{tmp_path}/studies/t.db"
    command = [sys.executable, "-m", "tuner", "run", "--model", str(llava_dir), "--task", "pope", "--dataset",
               dataset, "--budget", "99%", "--trials", "5", "--calib", "8", "--holdout", "4", "--batch-size", "4",
               "--latency-source", "synthetic", "--storage", storage]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "timed: prefill scope: pixels and prompt on the device to the first new token's logits" in result.stdout
    (best,) = (tmp_path / "studies").rglob("best.json")
    schedule = Schedule.from_json(best.read_text())
    assert schedule.num_layers == 3 and schedule.tokens_in == 16  # the layers LLaVA reads, not the tower's 4
    metrics = json.loads(best.read_text())["metrics"]
    assert metrics["latency_source"] == "synthetic" and metrics["latency_scope"].startswith("prefill scope: pixels")
    evaluator = get_evaluator("pope")(model=str(llava_dir), dataset=dataset, calib=8, holdout=4, batch_size=4)
    with evaluator.applied(schedule):
        assert 0.0 <= evaluator.accuracy("holdout") <= 1.0
    # `tuner apply` rebuilds the task from the schedule's provenance and times it in the study's scope (prefill).
    applied = subprocess.run([sys.executable, "-m", "tuner", "apply", "--schedule", str(best), "--repeats", "3"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert applied.returncode in (0, 3), applied.stdout + applied.stderr
    assert "the pope task's first calibration batch; prefill scope" in " ".join(applied.stdout.split())
    last_row = re.search(rf"│\s*{schedule.num_layers - 1}\s*│.*│\s*(\d+)\s*│", applied.stdout)
    assert last_row is not None and int(last_row.group(1)) == schedule.tokens_out, applied.stdout
    bad = subprocess.run([sys.executable, "-m", "tuner", "apply", "--schedule", str(best), "--image", str(best)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert bad.returncode == 2 and "leave out --image" in bad.stderr and "Traceback" not in bad.stderr


def language_model_calls(evaluator) -> tuple[list[int], object]:
    """Prompt lengths the language model is called with (one entry per forward), and the hook to remove."""
    lengths: list[int] = []
    hook = evaluator.model.model.language_model.register_forward_hook(
        lambda module, args, kwargs, output: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    return lengths, hook


@pytest.mark.parametrize("scope", ["encoder", "prefill", "generate"])
def test_each_latency_scope_times_what_it_says_under_a_schedule(llava_dir: Path, tmp_path: Path, scope: str) -> None:
    evaluator = get_evaluator("pope")(model=str(llava_dir), dataset=pope_dataset(tmp_path), calib=4, holdout=2,
                                      batch_size=4, latency_scope=scope, new_tokens=5)  # fmt: skip
    assert evaluator.latency_scope == scope and evaluator.settings()["latency_scope"] == scope
    assert f"{scope} scope" in evaluator.describe_latency() and "batch of 4" in evaluator.describe_latency()
    tower_calls: list[int] = []
    tower_hook = evaluator.model.model.vision_tower.register_forward_hook(
        lambda module, args, output: tower_calls.append(1)
    )
    schedule = Schedule([8, 4, 0], 16, scoring=Scoring(ctr=0.0), family="clip", has_cls=True)
    lengths, hook = language_model_calls(evaluator)
    try:
        evaluator.latency_call()()
        native = list(lengths)
        lengths.clear()
        with evaluator.applied(schedule):
            evaluator.latency_call()()
    finally:
        hook.remove()
        tower_hook.remove()
    assert len(tower_calls) == 2  # the vision tower runs once per timed call, in every scope
    if scope == "encoder":
        assert native == [] and lengths == []  # no language model inside the timing
    elif scope == "prefill":
        assert len(native) == 1 and lengths == [native[0] - 12]  # one forward over the pruned prompt
    else:
        # Exactly new_tokens forwards: the prefill (pruned prompt), then one token at a time.
        assert len(native) == 5 and native[1:] == [1] * 4
        assert lengths == [native[0] - 12] + [1] * 4
    assert evaluator.settings().get("new_tokens") == (5 if scope == "generate" else None)


def test_encoder_only_evaluators_refuse_language_model_scopes(tmp_path: Path) -> None:
    with pytest.raises(EvaluatorError, match="the demo evaluator cannot time the prefill scope .*available: encoder"):
        get_evaluator("demo").check_latency_scope("prefill")
    with pytest.raises(EvaluatorError, match="unknown latency scope 'ttft'; available: encoder, prefill, generate"):
        get_evaluator("pope").check_latency_scope("ttft")
    assert get_evaluator("pope").check_latency_scope(None) == "prefill"
    assert get_evaluator("demo").check_latency_scope(None) == "encoder"
