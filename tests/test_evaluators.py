"""Evaluators on real components: calibration splits, the demo, fidelity and zero-shot on tiny saved models and data.

Tiny random models are built from configs and saved with ``save_pretrained``; datasets are written with ``datasets``
(``save_to_disk``) or as an image folder; the tokenizer is a tiny BPE vocabulary written here. Nothing touches a hub.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image
from transformers import (
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPForImageClassification,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
)

from evaluators import (
    DemoEvaluator,
    EvaluatorError,
    FidelityEvaluator,
    ZeroShotEvaluator,
    available_evaluators,
    get_evaluator,
    random_split,
    resolve_sizes,
    stratified_split,
)
from evaluators.loading import resolve_device, resolve_dtype
from tuner.demo import DEMO_CLASS_NAMES, WEIGHTS_DIR, build_demo_model, eval_pool
from tuner.evoprune import Schedule, Scoring, apply

# ------------------------------------------------------------------------------------------------- registry


def test_registry_lists_the_built_in_evaluators() -> None:
    names = ["demo", "digits-vqa", "fidelity", "gqa", "mllm", "mmbench", "mme", "pope", "scienceqa", "videomme",
             "zeroshot"]  # fmt: skip
    assert available_evaluators() == names
    assert get_evaluator("demo") is DemoEvaluator
    assert get_evaluator("fidelity") is FidelityEvaluator
    assert get_evaluator("zeroshot") is ZeroShotEvaluator
    with pytest.raises(EvaluatorError) as caught:
        get_evaluator("x")
    assert (
        str(caught.value)
        == "unknown evaluator 'x'; available: demo, digits-vqa, fidelity, gqa, mllm, mmbench, mme, pope, scienceqa, "
        "videomme, zeroshot"
    )


def test_dtype_and_device() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("fp16", cpu) == torch.float16 and resolve_dtype(torch.bfloat16, cpu) == torch.bfloat16
    with pytest.raises(EvaluatorError, match="unknown dtype 'fp8'; use auto, fp32, fp16 or bf16"):
        resolve_dtype("fp8", cpu)
    with pytest.raises(EvaluatorError, match="unknown device"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(EvaluatorError, match="not available here"):
            resolve_device("cuda")


# ------------------------------------------------------------------------------------------ calibration splits


def test_stratified_split_allocates_proportionally_and_disjointly() -> None:
    labels = [0] * 50 + [1] * 30 + [2] * 20
    rng = np.random.default_rng(1)
    labels = [labels[i] for i in rng.permutation(len(labels))]  # interleaved, as in a real dataset
    calib, holdout = stratified_split(labels, calib=20, holdout=30, seed=7)
    assert len(calib) == 20 and len(holdout) == 30
    assert not set(calib) & set(holdout)
    assert calib == sorted(calib) and holdout == sorted(holdout)
    assert Counter(labels[i] for i in calib) == {0: 10, 1: 6, 2: 4}
    assert Counter(labels[i] for i in holdout) == {0: 15, 1: 9, 2: 6}


def test_stratified_split_uneven_quotas_go_to_the_largest_remainders() -> None:
    labels = [0] * 7 + [1] * 2 + [2] * 1
    calib, holdout = stratified_split(labels, calib=5, holdout=5, seed=0)
    # Quotas 3.5 / 1.0 / 0.5: label 0 gets the leftover (remainder 0.5 ties with label 2; the smaller label wins).
    assert Counter(labels[i] for i in calib) == {0: 4, 1: 1}
    assert sorted(calib + holdout) == list(range(10))


def test_stratified_split_is_seeded() -> None:
    labels = [i % 4 for i in range(200)]
    first = stratified_split(labels, 40, 40, seed=3)
    assert stratified_split(labels, 40, 40, seed=3) == first
    assert stratified_split(labels, 40, 40, seed=4) != first
    # The calibration subset does not depend on the held-out size.
    assert stratified_split(labels, 40, 10, seed=3)[0] == first[0]
    # String labels work too.
    names = ["cat", "dog"] * 10
    calib, _ = stratified_split(names, 6, 4, seed=0)
    assert Counter(names[i] for i in calib) == {"cat": 3, "dog": 3}


def test_split_sizes_are_checked_with_the_numbers() -> None:
    with pytest.raises(EvaluatorError) as caught:
        stratified_split([0, 1] * 270, calib=500, holdout=300, seed=0)
    assert str(caught.value) == "calib 500 and holdout 300 need 800 items; the dataset has 540; lower them"
    assert caught.value.params == ("calib", "holdout")
    with pytest.raises(EvaluatorError, match="calib must be an integer >= 1, got 0"):
        stratified_split([0, 1], calib=0, holdout=1, seed=0)
    with pytest.raises(EvaluatorError, match="holdout must be an integer >= 0, got -1"):
        random_split(10, calib=1, holdout=-1, seed=0)
    with pytest.raises(EvaluatorError, match="need 11 items; the dataset has 10"):
        random_split(10, calib=5, holdout=6, seed=0)


def test_random_split() -> None:
    calib, holdout = random_split(100, 30, 20, seed=5)
    assert len(calib) == 30 and len(holdout) == 20 and not set(calib) & set(holdout)
    assert (calib, holdout) == random_split(100, 30, 20, seed=5)
    assert calib != random_split(100, 30, 20, seed=6)[0]
    assert random_split(100, 30, 5, seed=5)[0] == calib
    assert calib != list(range(30))  # not the first rows


def test_default_sizes_shrink_to_a_small_dataset_but_explicit_ones_do_not() -> None:
    assert resolve_sizes(None, None, 1000, 256, 256) == (256, 256)
    assert resolve_sizes(None, None, 11, 256, 256) == (6, 5)
    assert resolve_sizes(4, None, 11, 256, 256) == (4, 7)
    assert resolve_sizes(None, 3, 11, 256, 256) == (8, 3)
    with pytest.raises(EvaluatorError, match="need 300 items; the dataset has 11"):
        resolve_sizes(256, 44, 11, 256, 256)


# ---------------------------------------------------------------------------------------------------- demo

SHIPPED = (WEIGHTS_DIR / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def demo_class(tmp_path_factory: pytest.TempPathFactory) -> type[DemoEvaluator]:
    """The shipped demo evaluator, or (while no weights ship) the same evaluator on a random stand-in model."""
    if SHIPPED:
        return DemoEvaluator
    stand_in = tmp_path_factory.mktemp("demo-weights")
    torch.manual_seed(0)
    build_demo_model().eval().save_pretrained(str(stand_in))

    class StandInDemoEvaluator(DemoEvaluator):
        weights_dir = stand_in

    return StandInDemoEvaluator


@pytest.fixture(scope="module")
def demo(demo_class: type[DemoEvaluator]) -> DemoEvaluator:
    """The demo at its default sizes."""
    return demo_class(seed=0)


@pytest.fixture(scope="module")
def small_demo(demo_class: type[DemoEvaluator]) -> DemoEvaluator:
    """The demo on fewer scenes, for tests that run many forward passes."""
    return demo_class(seed=0, calib=48, holdout=32, batch_size=16)


def test_demo_splits_are_stratified_disjoint_eval_pool_digits(demo: DemoEvaluator) -> None:
    assert (demo.calib, demo.holdout) == (DemoEvaluator.default_calib, DemoEvaluator.default_holdout) == (256, 256)
    assert len(demo.calib_indices) == len(set(demo.calib_indices)) == 256
    assert len(demo.holdout_indices) == len(set(demo.holdout_indices)) == 256
    assert not set(demo.calib_indices) & set(demo.holdout_indices)
    pool_digits, pool_labels = eval_pool()
    label_of = dict(zip(pool_digits.tolist(), pool_labels.tolist(), strict=True))
    assert set(demo.calib_indices) | set(demo.holdout_indices) <= set(label_of)
    pool_share = Counter(pool_labels.tolist())
    calib_counts = Counter(label_of[d] for d in demo.calib_indices)
    for label, count in pool_share.items():
        assert abs(calib_counts[label] - 256 * count / len(pool_labels)) < 1  # proportional, up to rounding


def test_demo_unpruned_accuracy(demo: DemoEvaluator) -> None:
    calib = demo.accuracy("calib")
    assert 0.0 <= calib <= 1.0
    if SHIPPED:
        assert calib >= 0.85, calib


def test_demo_accuracy_is_deterministic(small_demo: DemoEvaluator, demo_class: type[DemoEvaluator]) -> None:
    calib, holdout = small_demo.accuracy("calib"), small_demo.accuracy("holdout")
    assert 0.0 <= calib <= 1.0 and 0.0 <= holdout <= 1.0
    assert small_demo.accuracy() == calib
    again = demo_class(seed=0, calib=48, holdout=32, batch_size=8)  # same scenes, other batches
    assert again.calib_indices == small_demo.calib_indices and again.holdout_indices == small_demo.holdout_indices
    assert again.accuracy("holdout") == holdout
    other = demo_class(seed=1, calib=48, holdout=32)
    assert other.calib_indices != small_demo.calib_indices
    with pytest.raises(EvaluatorError, match="unknown split 'test'; use 'calib' or 'holdout'"):
        small_demo.accuracy("test")  # type: ignore[arg-type]


def test_demo_accuracy_under_a_heavy_schedule(small_demo: DemoEvaluator) -> None:
    unpruned = small_demo.accuracy("calib")
    heavy = Schedule.from_keep_ratios([0.5, 0.5, 0.5, 1.0, 1.0, 1.0], tokens_in=64, scoring=Scoring())
    with apply(small_demo.model, heavy) as handle:
        pruned = small_demo.accuracy("calib")
    assert handle.token_counts == [32, 16, 8, 8, 8, 8]
    assert 0.0 <= pruned <= 1.0
    if SHIPPED:
        assert pruned <= unpruned
    assert small_demo.accuracy("calib") == unpruned  # removing the schedule restores the model exactly


def test_demo_latency_call_and_settings(demo: DemoEvaluator) -> None:
    output = demo.latency_call()()
    assert output.logits.shape == (demo.batch_size, len(DEMO_CLASS_NAMES))
    settings = demo.settings()
    json.dumps(settings)
    assert settings["evaluator"] == "demo" and settings["calib"] == 256 and settings["dtype"] == "fp32"
    assert len(settings["weights_sha256"]) == 64


@pytest.mark.parametrize(
    "kwargs", [{"model": "openai/clip-vit-base-patch16"}, {"dataset": "mnist"}, {"dataset_split": "test"}]
)
def test_demo_takes_no_model_or_dataset(kwargs: dict[str, Any]) -> None:
    with pytest.raises(EvaluatorError, match="the demo evaluator takes no model, dataset or dataset_split"):
        DemoEvaluator(**kwargs)


def test_demo_sizes_are_checked(demo_class: type[DemoEvaluator]) -> None:
    available = len(eval_pool()[1])
    with pytest.raises(EvaluatorError, match=f"calib 500 and holdout 300 need 800 items; the dataset has {available}"):
        demo_class(calib=500, holdout=300)
    with pytest.raises(EvaluatorError, match="batch_size must be an integer >= 1"):
        demo_class(batch_size=0)


# ----------------------------------------------------------------------------------------------- tiny models

IMAGE, PATCH, LAYERS = 32, 8, 4  # 16 patch tokens + CLS
VISION: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    image_size=IMAGE,
    patch_size=PATCH,
)
CLASSES = ["cat", "dog", "car"]


def image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})


def random_images(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 48), (36, 36), (50, 40)]
    return [Image.fromarray((rng.random((*sizes[i % 3], 3)) * 255).astype("uint8"), mode="RGB") for i in range(count)]


def tiny_tokenizer() -> CLIPTokenizer:
    """A tiny CLIP BPE tokenizer: every letter (and with the end-of-word mark), digits, '.' and CLIP's specials."""
    symbols = list("abcdefghijklmnopqrstuvwxyz0123456789.")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>")]  # one real merge chain: "cat" is a single token
    for merged in ("ca", "cat</w>"):
        vocab[merged] = len(vocab)
    # The tokenizers backend needs pairs at run time (transformers annotates merges as strings).
    return CLIPTokenizer(vocab=vocab, merges=merges)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def clip_vision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clip-vision")
    torch.manual_seed(0)
    CLIPVisionModel._from_config(CLIPVisionConfig(**VISION)).save_pretrained(str(folder))
    image_processor().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def clip_classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clip-classifier")
    torch.manual_seed(0)
    config = CLIPConfig(  # type: ignore[call-arg]  # num_labels goes to PretrainedConfig's **kwargs
        vision_config=VISION,
        text_config=dict(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        num_labels=5,
    )
    CLIPForImageClassification._from_config(config).save_pretrained(str(folder))
    image_processor().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def clip_dual_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clip-dual")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        vision_config=VISION,
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        projection_dim=16,
    )
    CLIPModel._from_config(config).save_pretrained(str(folder))
    CLIPProcessor(image_processor=image_processor(), tokenizer=tokenizer).save_pretrained(str(folder))
    return folder


def labelled_dataset(count: int = 30) -> Dataset:
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=CLASSES)})
    labels = [i % len(CLASSES) for i in range(count)]
    return Dataset.from_dict({"image": random_images(count, seed=3), "label": labels}, features=features)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A save_to_disk folder of unlabelled images in an ``img`` column."""
    folder = tmp_path_factory.mktemp("images")
    Dataset.from_dict({"img": random_images(24, seed=1)}, features=Features({"img": ImageFeature()})).save_to_disk(
        str(folder)
    )
    return folder


@pytest.fixture(scope="module")
def labelled_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A save_to_disk DatasetDict (train and test) with an image column and a ClassLabel label column."""
    folder = tmp_path_factory.mktemp("labelled")
    DatasetDict({"train": labelled_dataset(12), "test": labelled_dataset(30)}).save_to_disk(str(folder))
    return folder


# ------------------------------------------------------------------------------------------------- fidelity


def test_fidelity_is_one_unpruned_and_below_one_pruned(clip_vision_dir: Path, images_dir: Path) -> None:
    evaluator = FidelityEvaluator(model=str(clip_vision_dir), dataset=str(images_dir), calib=8, holdout=6, batch_size=4)
    assert evaluator.metric == "feature_cosine"
    assert len(evaluator.calib_indices) == 8 and len(evaluator.holdout_indices) == 6
    assert not set(evaluator.calib_indices) & set(evaluator.holdout_indices)
    assert evaluator.accuracy("calib") == 1.0 and evaluator.accuracy("holdout") == 1.0
    with apply(evaluator.model, Schedule.none(LAYERS, 16)):
        assert evaluator.accuracy("calib") == 1.0
    heavy = Schedule.from_keep_ratios([0.5, 0.5, 1.0, 1.0], tokens_in=16)
    with apply(evaluator.model, heavy) as handle:
        pruned = evaluator.accuracy("calib")
        assert evaluator.accuracy("calib") == pruned
    assert handle.token_counts == [8, 4, 4, 4]
    assert 0.0 <= pruned < 1.0
    settings = evaluator.settings()
    json.dumps(settings)
    assert settings["image_column"] == "img" and settings["dataset_split"] is None
    assert evaluator.latency_call()().shape == (4, 32)  # pooled features of one batch


def test_fidelity_of_a_classifier_is_top1_agreement(clip_classifier_dir: Path, images_dir: Path) -> None:
    evaluator = FidelityEvaluator(model=str(clip_classifier_dir), dataset=str(images_dir), batch_size=8)
    assert evaluator.metric == "top1_agreement"
    assert (evaluator.calib, evaluator.holdout) == (12, 12)  # defaults shrunk to halves of 24 images
    assert evaluator.accuracy("calib") == 1.0
    with apply(evaluator.model, Schedule.from_keep_ratios([0.5, 0.5, 0.5, 0.5], tokens_in=16)):
        agreement = evaluator.accuracy("calib")
    assert agreement in {k / 12 for k in range(13)}
    assert evaluator.latency_call()().shape == (8, 5)  # the logits of one batch


def test_fidelity_reads_an_image_folder(clip_vision_dir: Path, tmp_path: Path) -> None:
    for index, image in enumerate(random_images(6, seed=9)):
        (tmp_path / ("a" if index % 2 else "b")).mkdir(exist_ok=True)
        image.save(tmp_path / ("a" if index % 2 else "b") / f"{index}.png")
    evaluator = FidelityEvaluator(model=str(clip_vision_dir), dataset=str(tmp_path), calib=3, holdout=3, seed=2)
    assert evaluator.image_column == "image" and evaluator.accuracy("holdout") == 1.0


def test_fidelity_errors(clip_vision_dir: Path, images_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(EvaluatorError, match="needs model"):
        FidelityEvaluator(dataset=str(images_dir))
    with pytest.raises(EvaluatorError) as caught:
        FidelityEvaluator(model=str(tmp_path / "nowhere"), dataset=str(images_dir))
    assert str(caught.value) == (
        f"cannot load model {str(tmp_path / 'nowhere')!r}: no such folder; give a local folder with a CLIP or SigLIP "
        "checkpoint"
    )
    with pytest.raises(EvaluatorError, match="holds no transformers checkpoint"):
        FidelityEvaluator(model=str(tmp_path), dataset=str(images_dir))
    bert = tmp_path / "bert"
    BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(str(bert))
    with pytest.raises(
        EvaluatorError, match=r"is a BertModel, which EvoPrune does not support; supported: CLIPVisionModel"
    ):
        FidelityEvaluator(model=str(bert), dataset=str(images_dir))
    with pytest.raises(EvaluatorError, match="not found: no such folder or file"):
        FidelityEvaluator(model=str(clip_vision_dir), dataset=str(tmp_path / "no-data"))
    texts = tmp_path / "texts"
    Dataset.from_dict({"text": ["a", "b"], "score": [1, 2]}).save_to_disk(str(texts))
    with pytest.raises(EvaluatorError) as caught:
        FidelityEvaluator(model=str(clip_vision_dir), dataset=str(texts))
    assert "has no image column (looked for image, img); its columns: text, score" in str(caught.value)
    with pytest.raises(EvaluatorError, match="calib 20 and holdout 20 need 40 items; the dataset has 24"):
        FidelityEvaluator(model=str(clip_vision_dir), dataset=str(images_dir), calib=20, holdout=20)
    with pytest.raises(EvaluatorError, match="has one split"):
        FidelityEvaluator(model=str(clip_vision_dir), dataset=str(images_dir), dataset_split="validation")


# ------------------------------------------------------------------------------------------------- zero-shot


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1

    module.register_forward_hook(hook)
    return calls


def test_zeroshot_accuracy(clip_dual_dir: Path, labelled_dir: Path) -> None:
    evaluator = ZeroShotEvaluator(
        model=str(clip_dual_dir), dataset=str(labelled_dir), calib=12, holdout=9, batch_size=5
    )
    assert evaluator.dataset_split == "test" and evaluator.class_names == CLASSES
    assert evaluator.text_embeddings.shape == (3, 16)
    assert len(set(map(tuple, evaluator.text_embeddings.tolist()))) == 3  # three different prompts
    assert torch.allclose(evaluator.text_embeddings.norm(dim=-1), torch.ones(3))
    labels = [i % 3 for i in range(30)]
    assert Counter(labels[i] for i in evaluator.calib_indices) == {0: 4, 1: 4, 2: 4}
    assert not set(evaluator.calib_indices) & set(evaluator.holdout_indices)

    text_calls = count_calls(evaluator.model.get_submodule("text_model"))
    embeddings = evaluator.text_embeddings
    calib = evaluator.accuracy("calib")
    assert calib in {k / 12 for k in range(13)}
    assert evaluator.accuracy("calib") == calib
    holdout = evaluator.accuracy("holdout")
    assert 0.0 <= holdout <= 1.0
    with apply(evaluator.model, Schedule.from_keep_ratios([0.5, 0.5, 1.0, 1.0], tokens_in=16)):
        assert 0.0 <= evaluator.accuracy("calib") <= 1.0
    assert text_calls[0] == 0 and evaluator.text_embeddings is embeddings  # prompts were embedded once, up front

    again = ZeroShotEvaluator(model=str(clip_dual_dir), dataset=str(labelled_dir), calib=12, holdout=9, batch_size=4)
    assert again.calib_indices == evaluator.calib_indices
    assert again.accuracy("calib") == calib  # another batch size, the same answer
    assert torch.equal(again.text_embeddings, embeddings)
    assert evaluator.latency_call()().shape == (5, 16)  # image embeddings of one batch
    settings = evaluator.settings()
    json.dumps(settings)
    assert settings["classes"] == 3 and settings["label_column"] == "label"


def test_zeroshot_other_split_and_column_names(clip_dual_dir: Path, tmp_path: Path) -> None:
    data = labelled_dataset(12).rename_columns({"image": "img", "label": "labels"})
    DatasetDict({"validation": data}).save_to_disk(str(tmp_path / "renamed"))
    evaluator = ZeroShotEvaluator(model=str(clip_dual_dir), dataset=str(tmp_path / "renamed"))
    assert (evaluator.image_column, evaluator.label_column, evaluator.dataset_split) == ("img", "labels", "validation")
    assert (evaluator.calib, evaluator.holdout) == (6, 6)


def test_zeroshot_errors(clip_dual_dir: Path, clip_vision_dir: Path, labelled_dir: Path, tmp_path: Path) -> None:
    unlabelled = tmp_path / "unlabelled"
    Dataset.from_dict({"image": random_images(4, seed=0), "caption": ["x"] * 4}).save_to_disk(str(unlabelled))
    with pytest.raises(EvaluatorError) as caught:
        ZeroShotEvaluator(model=str(clip_dual_dir), dataset=str(unlabelled))
    assert str(caught.value) == (
        f"dataset {str(unlabelled)!r} has no label column (looked for label, labels); its columns: image, caption"
    )
    plain = tmp_path / "plain-labels"
    Dataset.from_dict(
        {"image": random_images(4, seed=0), "label": [0, 1, 0, 1]},
        features=Features({"image": ImageFeature(), "label": Value("int64")}),
    ).save_to_disk(str(plain))
    with pytest.raises(EvaluatorError, match="column 'label' is a Value, not a ClassLabel"):
        ZeroShotEvaluator(model=str(clip_dual_dir), dataset=str(plain))
    with pytest.raises(EvaluatorError, match="needs a CLIP or SigLIP dual encoder"):
        ZeroShotEvaluator(model=str(clip_vision_dir), dataset=str(labelled_dir))
    with pytest.raises(EvaluatorError, match="has no split 'dev'; its splits: train, test"):
        ZeroShotEvaluator(model=str(clip_dual_dir), dataset=str(labelled_dir), dataset_split="dev")
