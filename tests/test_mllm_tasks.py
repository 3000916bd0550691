"""GQA (short answers by generation) and Video-MME (videos, sampled by video) on tiny LLaVA models saved like hub
checkpoints, with small datasets written in each benchmark's schema (GQA's two configs joined by image id; Video-MME's
table with video files written with PyAV, or frame lists)."""

from __future__ import annotations

import json
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
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)

from evaluators import EvaluatorError, get_evaluator
from evaluators.gqa import GqaEvaluator, gqa_prompt, normalize_answer
from evaluators.video_mme import (
    VIDEO_DIR_VARIABLE,
    FrameTransform,
    VideoMmeEvaluator,
    read_video_frames,
    sample_indices,
    video_prompt,
)
from tuner.evoprune import Schedule, Scoring
from tuner.mllm import LlavaPruning, OnevisionVideoPruning

TEXT = datasets.Value("string")
GQA_WORDS = ["[PAD]", "[UNK]", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "Answer", "the", "question", "using",
             "a", "single", "word", "or", "phrase.", "What", "is", "it?", "Is", "there", "cat?", "yes", "no", "red",
             "blue", "left", "right", "shirt", "man"]  # fmt: skip
VIDEO_WORDS = ["[PAD]", "[UNK]", "<s>", "</s>", "<image>", "<video>", "<|im_start|>user", "A", "B", "C", "D", "E",
               "A.", "B.", "C.", "D.", "What", "falls?", "leaf", "cup", "ball", "hat", "Answer", "with", "the",
               "option's", "letter"]  # fmt: skip


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {"image_token": "<image>", **({"video_token": "<video>"} if "<video>" in words else {})}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens=special)  # fmt: skip


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA-1.5 (CLIP 32 px / patch 8, 4 layers; Llama 2 layers) with a word-level tokenizer, saved."""
    folder = tmp_path_factory.mktemp("llava")
    tokenizer = word_tokenizer(GQA_WORDS)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)  # fmt: skip
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                       num_attention_heads=4, image_size=32, patch_size=8),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, vocab_size=len(GQA_WORDS), pad_token_id=0, bos_token_id=2,
                                eos_token_id=3, max_position_embeddings=256),
        image_token_id=GQA_WORDS.index("<image>"), vision_feature_layer=-2, vision_feature_select_strategy="default",
    )  # fmt: skip
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def onevision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA-OneVision (SigLIP 48 px / patch 8: 36 patches pooled to 9 per frame, 3 layers) with a word-level
    tokenizer and its video processor's settings, saved."""
    folder = tmp_path_factory.mktemp("onevision")
    torch.manual_seed(0)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, image_size=48, patch_size=8),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, vocab_size=len(VIDEO_WORDS), pad_token_id=0,
                                max_position_embeddings=512),
        video_token_id=VIDEO_WORDS.index("<video>"), image_token_id=VIDEO_WORDS.index("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    )  # fmt: skip
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(folder)
    word_tokenizer(VIDEO_WORDS).save_pretrained(folder)
    # What LlavaOnevisionVideoProcessor.save_pretrained writes (it needs torchvision, absent here): SigLIP's settings.
    settings = {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": 48, "width": 48},
                "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}  # fmt: skip
    (folder / "video_preprocessor_config.json").write_text(json.dumps(settings))
    return folder


def images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]


# ------------------------------------------------------------------------------------------------------------ GQA


def test_gqa_normalisation_is_lmms_evals_case_and_punctuation_rule() -> None:
    # By hand from lmms-eval's exact_match (ignore_case, ignore_punctuation: string.punctuation deleted), the model's
    # output stripped: case and punctuation never matter, articles, number words and inner spaces do.
    assert normalize_answer("Yes.") == normalize_answer("yes") == "yes"
    assert normalize_answer("  Left\n") == "left"
    assert normalize_answer("T-shirt") == "tshirt" == normalize_answer("tshirt")
    assert normalize_answer("the man's") == "the mans"
    assert normalize_answer("a cat") != normalize_answer("cat")  # GQA keeps articles (VQAv2's rule drops them)
    assert normalize_answer("two") != normalize_answer("2")  # and number words
    assert normalize_answer("white  and blue") != normalize_answer("white and blue")


def gqa_folder(tmp_path: Path, answers: list[str], name: str = "gqa") -> Path:
    """GQA's layout: questions (testdev_balanced_instructions) and images (testdev_balanced_images) joined by id.

    6 images, 3 questions each; the images are stored in another order than the questions refer to them.
    """
    folder = tmp_path / name
    image_ids = [f"n{1000 + i}" for i in range(6)]
    structural = ["verify", "query", "query"] * 6
    questions = {
        "id": [f"q{i}" for i in range(18)], "imageId": [image_ids[i // 3] for i in range(18)],
        "question": ["Is there a cat?" if kind == "verify" else "What is it?" for kind in structural],
        "answer": answers, "types": [{"structural": s, "semantic": "obj", "detailed": "x"} for s in structural],
    }  # fmt: skip
    features = datasets.Features({"id": TEXT, "imageId": TEXT, "question": TEXT, "answer": TEXT,
                                  "types": {"structural": TEXT, "semantic": TEXT, "detailed": TEXT}})  # fmt: skip
    datasets.Dataset.from_dict(questions, features=features).save_to_disk(str(folder / "testdev_balanced_instructions"))
    order = [3, 0, 5, 1, 4, 2]
    pictures = images(6, seed=1)
    datasets.Dataset.from_dict(
        {"id": [image_ids[i] for i in order], "image": [pictures[i] for i in order]},
        features=datasets.Features({"id": TEXT, "image": datasets.Image()}),
    ).save_to_disk(str(folder / "testdev_balanced_images"))
    return folder


def test_gqa_joins_questions_to_images_by_id_and_generates_greedy_answers(llava_dir: Path, tmp_path: Path) -> None:
    folder = gqa_folder(tmp_path, ["yes", "red", "blue"] * 6)
    evaluator = get_evaluator("gqa")(model=str(llava_dir), dataset=str(folder), calib=6, holdout=6, batch_size=4)
    assert isinstance(evaluator, GqaEvaluator)
    # Stratified by structural type: the 1:2 mix of verify and query questions in both slices.
    assert sorted(item.stratum for item in evaluator.calib_items) == ["query"] * 4 + ["verify"] * 2
    assert sorted(item.stratum for item in evaluator.holdout_items) == ["query"] * 4 + ["verify"] * 2
    assert {i.row for i in evaluator.calib_items}.isdisjoint(i.row for i in evaluator.holdout_items)
    questions = datasets.load_from_disk(str(folder / "testdev_balanced_instructions"))
    image_table = datasets.load_from_disk(str(folder / "testdev_balanced_images"))
    for item in evaluator.calib_items:
        assert image_table[item.image_row]["id"] == questions[item.row]["imageId"]
    # By hand: each question alone (no padding), generated greedily with the same prompt and limit, decoded.
    model, processor = evaluator.model, evaluator.processor
    predictions = evaluator.predictions("calib")
    for item, prediction in zip(evaluator.calib_items, predictions, strict=True):
        inputs = processor(images=[image_table[item.image_row]["image"]], text=[gqa_prompt(item.question)],
                           return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=GqaEvaluator.max_new_tokens, do_sample=False,
                                 pad_token_id=0)  # fmt: skip
        alone = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        assert prediction == alone and prediction
    # The scoring, end to end: a second copy whose references are those answers, written as a person would (upper
    # case, a full stop) for the first 4 calibration questions and wrong for the rest, scores exactly 4 of 6.
    answers = ["nothing-like-it"] * 18
    for item, prediction in list(zip(evaluator.calib_items, predictions, strict=True))[:4]:
        answers[item.row] = prediction.upper() + "."
    scored = get_evaluator("gqa")(model=str(llava_dir), dataset=str(gqa_folder(tmp_path, answers, "gqa2")), calib=6,
                                  holdout=6, batch_size=4)  # fmt: skip
    assert [i.row for i in scored.calib_items] == [i.row for i in evaluator.calib_items]
    assert scored.accuracy("calib") == pytest.approx(4 / 6)
    assert scored.settings()["max_new_tokens"] == 16


def test_gqa_under_a_pruned_schedule_generates_from_shorter_prompts(llava_dir: Path, tmp_path: Path) -> None:
    evaluator = get_evaluator("gqa")(model=str(llava_dir), dataset=str(gqa_folder(tmp_path, ["yes"] * 18)), calib=4,
                                     holdout=2, batch_size=4)  # fmt: skip
    schedule = Schedule([8, 4, 0], 16, scoring=Scoring(ctr=0.0), family="clip", has_cls=True)  # 16 -> 4 tokens
    lengths: list[int] = []
    hook = evaluator.model.model.language_model.register_forward_hook(
        lambda module, args, kwargs, output: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        native = evaluator.predictions("calib")
        first_native = lengths[0]
        lengths.clear()
        with evaluator.applied(schedule) as pruning:
            assert isinstance(pruning, LlavaPruning)
            pruned = evaluator.predictions("calib")
            first_pruned = lengths[0]
            accuracy = evaluator.accuracy("holdout")
            evaluator.latency_call()()
        assert evaluator.predictions("calib") == native  # removed: the native model again
    finally:
        hook.remove()
    assert first_pruned == first_native - 12  # the prefill saw 4 image tokens instead of 16
    assert len(pruned) == 4 and all(isinstance(text, str) for text in pruned) and 0.0 <= accuracy <= 1.0


def test_gqa_takes_a_single_table_and_stratifies_yes_no_against_open(llava_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "table"
    answers = ["yes", "no", "red", "left", "yes", "blue", "no", "man", "shirt", "yes", "right", "red"]
    datasets.Dataset.from_dict(
        {"image": images(12), "question": ["What is it?"] * 12, "answer": answers},
        features=datasets.Features({"image": datasets.Image(), "question": TEXT, "answer": TEXT}),
    ).save_to_disk(str(folder))
    evaluator = get_evaluator("gqa")(model=str(llava_dir), dataset=str(folder), calib=6, holdout=3, batch_size=8)
    # 5 yes/no and 7 open answers: 6 calibration questions are 3.5 open : 2.5 yes/no, the tied remainder going to
    # the first label in sorted order (open).
    assert sorted(item.stratum for item in evaluator.calib_items) == ["open"] * 4 + ["yes/no"] * 2
    assert all(item.image_row == item.row for item in evaluator.calib_items)
    assert len(evaluator.predictions("holdout")) == 3


def test_gqa_reads_a_hub_snapshot_of_parquet_files_with_its_split(llava_dir: Path, tmp_path: Path) -> None:
    # What `hf download lmms-lab-encoder/GQA --repo-type dataset` lays out: <config>/testdev-00000-of-00001.parquet.
    folder = gqa_folder(tmp_path, ["yes", "red", "blue"] * 6)
    snapshot = tmp_path / "snapshot"
    for config in ("testdev_balanced_instructions", "testdev_balanced_images"):
        (snapshot / config).mkdir(parents=True)
        parquet = snapshot / config / "testdev-00000-of-00001.parquet"
        datasets.load_from_disk(str(folder / config)).to_parquet(str(parquet))
    evaluator = get_evaluator("gqa")(model=str(llava_dir), dataset=str(snapshot), calib=3, holdout=3)
    assert evaluator.dataset_split == "testdev" and evaluator.settings()["dataset_split"] == "testdev"
    same = get_evaluator("gqa")(model=str(llava_dir), dataset=str(folder), calib=3, holdout=3)
    assert [(i.row, i.image_row) for i in evaluator.calib_items] == [(i.row, i.image_row) for i in same.calib_items]
    with pytest.raises(
        EvaluatorError, match="testdev_balanced_instructions/ has the splits testdev, not val; pick one"
    ):
        get_evaluator("gqa")(model=str(llava_dir), dataset=str(snapshot), dataset_split="val", calib=3, holdout=3)


def test_gqa_data_errors_are_one_line_and_name_the_fix(llava_dir: Path, tmp_path: Path) -> None:
    folder = gqa_folder(tmp_path, ["yes"] * 18)
    questions_only = tmp_path / "questions"
    datasets.load_from_disk(str(folder / "testdev_balanced_instructions")).save_to_disk(str(questions_only))
    with pytest.raises(EvaluatorError, match="has questions but no images; give the images beside it") as error:
        get_evaluator("gqa")(model=str(llava_dir), dataset=str(questions_only), calib=2, holdout=2)
    assert "\n" not in str(error.value)
    lone = tmp_path / "lone"
    (lone / "testdev_balanced_instructions").mkdir(parents=True)
    with pytest.raises(EvaluatorError, match="no testdev_balanced_images/; download both configs"):
        get_evaluator("gqa")(model=str(llava_dir), dataset=str(lone), calib=2, holdout=2)
    stray = gqa_folder(tmp_path, ["yes"] * 18, "stray")
    table = datasets.load_from_disk(str(stray / "testdev_balanced_images"))
    table.select(range(5)).save_to_disk(str(tmp_path / "five"))  # one image short
    broken = tmp_path / "broken"
    datasets.load_from_disk(str(folder / "testdev_balanced_instructions")).save_to_disk(
        str(broken / "testdev_balanced_instructions")
    )
    datasets.load_from_disk(str(tmp_path / "five")).save_to_disk(str(broken / "testdev_balanced_images"))
    with pytest.raises(EvaluatorError, match="1 image ids of the questions are not in testdev_balanced_images"):
        get_evaluator("gqa")(model=str(llava_dir), dataset=str(broken), calib=2, holdout=2)
    with pytest.raises(EvaluatorError, match="generated, not scored among options"):
        get_evaluator("gqa")(model=str(llava_dir), dataset=str(folder), calib=2, holdout=2).option_scores()


# ------------------------------------------------------------------------------------------------------ Video-MME


def write_video(path: Path, levels: list[int], size: tuple[int, int] = (64, 48), rate: int = 10) -> Path:
    """A video whose frame i is a flat grey of brightness ``levels[i]``, encoded with PyAV (MPEG-4 part 2); the test
    that asks for one is skipped where PyAV is missing (it comes with the dev and video extras)."""
    av = pytest.importorskip("av")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.gop_size = 4  # several key frames: seeking is exercised
        for level in levels:
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), level, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])  # mkv headers carry no frame count: the duration gives it
def test_frames_are_sampled_uniformly_by_seeking(tmp_path: Path, suffix: str) -> None:
    levels = [12 * i for i in range(20)]
    path = write_video(tmp_path / f"grey{suffix}", levels)
    frames = read_video_frames(path, 5)
    wanted = sample_indices(20, 5)
    assert wanted == [0, 4, 9, 14, 19]
    assert [f.shape for f in frames] == [(48, 64, 3)] * 5
    # Each frame is the one at its index: the flat grey nearest to it is that index's (the codec's rounding and
    # YUV range conversion move a grey by up to about 5 levels; neighbours are 12 apart).
    nearest = [int(np.argmin([abs(float(f.mean()) - level) for level in levels])) for f in frames]
    assert nearest == wanted


def test_frame_transform_is_the_video_processors_resize_rescale_normalise(onevision_dir: Path) -> None:
    transform = FrameTransform.of_model(str(onevision_dir), 48)
    assert (transform.height, transform.width, transform.image_mean) == (48, 48, (0.5, 0.5, 0.5))
    pixels = transform([np.full((20, 30, 3), 204, np.uint8), Image.new("RGB", (10, 10), (0, 255, 51))])
    assert pixels.shape == (2, 3, 48, 48)
    # By hand: (v / 255 - 0.5) / 0.5 per channel.
    assert float(pixels[0].mean()) == pytest.approx(204 / 255 * 2 - 1, abs=1e-5)
    assert [float(pixels[1, c].mean()) for c in range(3)] == pytest.approx([-1.0, 1.0, 51 / 255 * 2 - 1], abs=1e-5)
    with pytest.raises(EvaluatorError, match="makes 48x48 frames but the model's tower takes 64x64"):
        FrameTransform.of_model(str(onevision_dir), 64)


DURATIONS = ["short", "short", "medium", "medium", "long", "long", "short", "long"]


def videomme_folder(tmp_path: Path, videos: int = 8, write_files: bool = True, name: str = "videomme") -> Path:
    """Video-MME's schema (3 questions a video, lettered options, letter answers) saved to disk, with the videos as
    ``data/<videoID>.mp4`` beside it."""
    folder = tmp_path / name
    rows: dict[str, list] = {"videoID": [], "question_id": [], "duration": [], "domain": [], "question": [],
                             "options": [], "answer": []}  # fmt: skip
    for v in range(videos):
        for q in range(3):
            rows["videoID"].append(f"vid{v:03d}")
            rows["question_id"].append(f"{v:03d}-{q + 1}")
            rows["duration"].append(DURATIONS[v % len(DURATIONS)])
            rows["domain"].append("Knowledge")
            rows["question"].append("What falls?")
            rows["options"].append(["A. leaf", "B. cup", "C. ball", "D. hat"])
            rows["answer"].append("ABCD"[(v + q) % 4])
    features = datasets.Features({key: TEXT for key in rows} | {"options": datasets.Sequence(TEXT)})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    if write_files:
        rng = np.random.default_rng(0)
        for v in range(videos):
            write_video(folder / "data" / f"vid{v:03d}.mp4", [int(x) for x in rng.integers(0, 255, 12)])
    return folder


def test_videomme_samples_by_video_and_scores_letters_as_each_question_alone(
    onevision_dir: Path, tmp_path: Path
) -> None:
    folder = videomme_folder(tmp_path)
    evaluator = get_evaluator("videomme")(model=str(onevision_dir), dataset=str(folder), calib=4, holdout=3,
                                          batch_size=4, frames=4)  # fmt: skip
    assert isinstance(evaluator, VideoMmeEvaluator)
    calib_videos = {item.video for item in evaluator.calib_items}
    holdout_videos = {item.video for item in evaluator.holdout_items}
    # Sizes count videos; every question of a video is in its slice; no video in both.
    assert len(calib_videos) == 4 and len(evaluator.calib_items) == 12 and len(holdout_videos) == 3
    assert len(evaluator.holdout_items) == 9 and calib_videos.isdisjoint(holdout_videos)
    # Stratified by duration (3 short, 2 medium, 3 long videos): 4 calibration videos take 2 / 1 / 1 or so.
    durations = sorted(DURATIONS[int(video[3:])] for video in calib_videos)
    assert durations.count("medium") == 1 and len(set(durations)) == 3
    assert evaluator.calib_items[0].options == ("leaf", "cup", "ball", "hat")  # the "A. " prefixes stripped
    assert evaluator.settings()["frames"] == 4
    # By hand: each question alone (no padding): its prompt, the run of 4 x 9 + 1 video tokens, its 4 frames.
    model, tokenizer = evaluator.model, evaluator.tokenizer
    video_id = VIDEO_WORDS.index("<video>")
    letters = [VIDEO_WORDS.index(letter) for letter in "ABCD"]
    transform = FrameTransform.of_model(str(onevision_dir), 48)
    for item, scores in zip(evaluator.calib_items, evaluator.option_scores("calib"), strict=True):
        ids = tokenizer(video_prompt(item.question, item.options))["input_ids"]
        at = ids.index(video_id)
        ids = ids[:at] + [video_id] * (4 * 9 + 1) + ids[at + 1 :]
        pixels = transform(read_video_frames(folder / "data" / f"{item.video}.mp4", 4))[None]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), pixel_values_videos=pixels).logits[0, -1]
        expected = torch.log_softmax(logits, dim=-1)[letters]
        assert scores == pytest.approx(expected.tolist(), abs=1e-4)
    chosen = [max(range(4), key=s.__getitem__) for s in evaluator.option_scores("calib")]
    right = sum(choice == item.answer for choice, item in zip(chosen, evaluator.calib_items, strict=True))
    assert evaluator.accuracy("calib") == right / 12


def test_videomme_under_a_pruned_schedule_merges_every_frame(onevision_dir: Path, tmp_path: Path) -> None:
    evaluator = get_evaluator("videomme")(model=str(onevision_dir), dataset=str(videomme_folder(tmp_path)), calib=2,
                                          holdout=1, batch_size=3, frames=2, latency_scope="encoder")  # fmt: skip
    schedule = Schedule([18, 6, 0], 36, scoring=Scoring(ctr=0.0), family="siglip", has_cls=False)  # 12 a frame
    native = evaluator.option_scores("calib")
    with evaluator.applied(schedule) as pruning:
        assert isinstance(pruning, OnevisionVideoPruning)
        pruned = evaluator.option_scores("calib")
        accuracy = evaluator.accuracy("holdout")
        evaluator.latency_call()()  # the encoder scope: the frames of one batch through tower and projector
        assert pruning.engine.token_counts == [18, 12, 12]
        assert pruning.engine.sizes is not None and pruning.engine.sizes.shape == (3 * 2, 12)  # 3 videos x 2 frames
    assert evaluator.option_scores("calib") == native  # removed: the native model again
    assert len(pruned) == 6 and pruned != native and 0.0 <= accuracy <= 1.0


def test_videomme_finds_videos_in_the_folder_the_environment_names(
    onevision_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = videomme_folder(tmp_path, videos=2, write_files=False)
    with pytest.raises(EvaluatorError) as error:
        get_evaluator("videomme")(model=str(onevision_dir), dataset=str(folder), calib=1, holdout=1, frames=2)
    message = str(error.value)
    assert "no video file for videoID 'vid00" in message and f"set {VIDEO_DIR_VARIABLE}" in message
    assert "\n" not in message
    elsewhere = tmp_path / "downloads"
    for v in range(2):
        write_video(elsewhere / f"vid{v:03d}.mkv", [10, 20, 30])
    monkeypatch.setenv(VIDEO_DIR_VARIABLE, str(elsewhere))
    evaluator = get_evaluator("videomme")(model=str(onevision_dir), dataset=str(folder), calib=1, holdout=1, frames=2)
    assert len(evaluator.option_scores("holdout")) == 3


def test_videomme_reads_a_hub_snapshot_with_the_videos_unzipped_beside_it(onevision_dir: Path, tmp_path: Path) -> None:
    # `hf download lmms-eval/Video-MME --repo-type dataset` lays out videomme/test-00000-of-00001.parquet and the
    # video zips, which unzip to data/<videoID>.mp4.
    folder = videomme_folder(tmp_path, videos=2)
    snapshot = tmp_path / "snapshot"
    (snapshot / "videomme").mkdir(parents=True)
    datasets.load_from_disk(str(folder)).to_parquet(str(snapshot / "videomme" / "test-00000-of-00001.parquet"))
    (folder / "data").rename(snapshot / "data")
    evaluator = get_evaluator("videomme")(model=str(onevision_dir), dataset=str(snapshot / "videomme"), calib=1,
                                          holdout=1, frames=2)  # fmt: skip
    assert evaluator.dataset_split == "test" and len(evaluator.calib_items) == 3


def test_videomme_takes_a_local_dataset_of_frame_lists(onevision_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    rng = np.random.default_rng(3)
    clips = [[Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(5)] for _ in range(4)]
    datasets.Dataset.from_dict(
        {"video": clips, "question": ["What falls?"] * 4, "choices": [["leaf", "cup"]] * 4, "answer": [0, 1, 1, 0]},
        features=datasets.Features({"video": datasets.Sequence(datasets.Image()), "question": TEXT,
                                    "choices": datasets.Sequence(TEXT), "answer": datasets.Value("int64")}),
    ).save_to_disk(str(folder))  # fmt: skip
    evaluator = get_evaluator("videomme")(model=str(onevision_dir), dataset=str(folder), calib=2, holdout=2, frames=3)
    inputs = evaluator._batches["calib"][0][0]
    assert inputs["pixel_values_videos"].shape == (2, 3, 3, 48, 48)
    assert int((inputs["input_ids"][0] == VIDEO_WORDS.index("<video>")).sum()) == 3 * 9 + 1
    assert all(len(scores) == 2 for scores in evaluator.option_scores("calib"))


def test_videomme_data_errors_are_one_line(onevision_dir: Path, llava_dir: Path, tmp_path: Path) -> None:
    no_video = tmp_path / "novideo"
    datasets.Dataset.from_dict({"question": ["q"] * 2, "options": [["a", "b"]] * 2, "answer": ["A", "B"]}).save_to_disk(
        str(no_video)
    )
    with pytest.raises(EvaluatorError, match="no video column .* and no videoID"):
        get_evaluator("videomme")(model=str(onevision_dir), dataset=str(no_video), calib=1, holdout=1)
    no_options = tmp_path / "nooptions"
    datasets.Dataset.from_dict({"videoID": ["v"] * 2, "question": ["q"] * 2, "answer": ["A", "B"]}).save_to_disk(
        str(no_options)
    )
    with pytest.raises(EvaluatorError, match="has no options column"):
        get_evaluator("videomme")(model=str(onevision_dir), dataset=str(no_options), calib=1, holdout=1)
    folder = videomme_folder(tmp_path, videos=2)
    with pytest.raises(EvaluatorError, match="needs a LLaVA-OneVision or LLaVA-Video model"):
        get_evaluator("videomme")(model=str(llava_dir), dataset=str(folder), calib=1, holdout=1)
    with pytest.raises(EvaluatorError, match="frames must be an integer >= 1"):
        get_evaluator("videomme")(model=str(onevision_dir), dataset=str(folder), frames=0)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(EvaluatorError, match="cannot decode video"):
        read_video_frames(broken, 2)


def test_a_videomme_study_searches_the_temporal_weight_and_exports_it(onevision_dir: Path, tmp_path: Path) -> None:
    """Through the real CLI: a video task's study knows its frames per video, so the search space proposes temporal
    merging (a dimension only video studies have) and the export carries the chosen weight."""
    import os
    import subprocess
    import sys

    import optuna

    dataset = videomme_folder(tmp_path, videos=6)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "COLUMNS": "160"}
    storage = f"sqlite:///{tmp_path}/studies/v.db"
    command = [sys.executable, "-m", "tuner", "run", "--model", str(onevision_dir), "--task", "videomme",
               "--dataset", str(dataset), "--budget", "99%", "--trials", "6", "--calib", "3", "--holdout", "2",
               "--batch-size", "2", "--latency-source", "synthetic", "--storage", storage]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode in (0, 3), result.stdout + result.stderr
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert study.user_attrs["tuner.meta"]["encoder"]["frames_per_item"] == 8  # the evaluator's default frames
    weights = [trial.params.get("temporal_weight") for trial in study.trials]
    assert all(weight is not None for weight in weights) and any(weight > 0 for weight in weights), weights
    for best in (tmp_path / "studies").rglob("best.json"):  # when one met the budget
        loaded = Schedule.load(best)
        assert loaded.scoring.temporal_weight == pytest.approx(loaded.provenance["trial_params"]["temporal_weight"])
