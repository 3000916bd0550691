"""Tests of the offline demo task: digit scenes, shipped weights and their accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPForImageClassification, CLIPVisionConfig, PreTrainedModel

from tuner.demo import model as demo_model
from tuner.demo import scenes


def test_scenes_are_deterministic_per_seed() -> None:
    x1, y1, i1 = scenes.make_scenes("train", 24, seed=3)
    x2, y2, i2 = scenes.make_scenes("train", 24, seed=3)
    x3, _, i3 = scenes.make_scenes("train", 24, seed=4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(i1, i2)
    assert not torch.equal(x1, x3)
    assert not torch.equal(i1, i3)
    assert x1.dtype == torch.float32 and y1.dtype == torch.int64 and i1.dtype == torch.int64
    assert x1.shape == (24, 3, scenes.SCENE_SIZE, scenes.SCENE_SIZE)
    assert float(x1.min()) >= -1.0 and float(x1.max()) <= 1.0


def test_render_scenes_depends_only_on_seed_and_digit() -> None:
    indices, _ = scenes.eval_pool()
    subset = indices[[0, 5, 9]]
    x_all, y_all, i_all = scenes.render_scenes(subset, seed=11)
    x_one, y_one, i_one = scenes.render_scenes(subset[1:2], seed=11)
    assert torch.equal(x_all[1], x_one[0]) and int(y_all[1]) == int(y_one[0]) and int(i_all[1]) == int(i_one[0])
    x_other, _, _ = scenes.render_scenes(subset, seed=12)
    assert not torch.equal(x_all, x_other)
    labels = scenes.digit_images()[1]
    assert torch.equal(y_all, torch.from_numpy(labels[subset].copy()))
    with pytest.raises(ValueError):
        scenes.render_scenes([len(labels)], seed=0)


def test_pools_are_disjoint_complete_and_stratified() -> None:
    train_idx, train_lab = scenes.train_pool()
    eval_idx, eval_lab = scenes.eval_pool()
    _, labels = scenes.digit_images()
    assert len(labels) == 1797
    assert not set(train_idx.tolist()) & set(eval_idx.tolist())
    assert sorted(train_idx.tolist() + eval_idx.tolist()) == list(range(len(labels)))
    assert np.array_equal(train_lab, labels[train_idx]) and np.array_equal(eval_lab, labels[eval_idx])
    for label in range(scenes.NUM_CLASSES):
        share = (eval_lab == label).sum() / (labels == label).sum()
        assert abs(share - scenes.EVAL_FRACTION) < 0.01
    # make_scenes draws from the named pool only.
    _, _, drawn_train = scenes.make_scenes("train", 64, seed=0)
    _, _, drawn_eval = scenes.make_scenes("eval", 64, seed=0)
    assert set(drawn_train.tolist()) <= set(train_idx.tolist())
    assert set(drawn_eval.tolist()) <= set(eval_idx.tolist())
    with pytest.raises(ValueError):
        scenes.make_scenes("test", 4, seed=0)  # type: ignore[arg-type]


def test_most_of_a_scene_is_background() -> None:
    indices, _ = scenes.eval_pool()
    x, _, _, layouts = scenes.render_scenes_with_layouts(indices[:64], seed=5)
    patch = demo_model.PATCH_SIZE
    grid = scenes.SCENE_SIZE // patch
    assert grid * grid >= 64
    inside_means, outside_means = [], []
    for image, layout in zip(x, layouts, strict=True):
        rows = range(layout.top // patch, (layout.top + layout.size - 1) // patch + 1)
        cols = range(layout.left // patch, (layout.left + layout.size - 1) // patch + 1)
        touched = len(rows) * len(cols)
        assert touched / (grid * grid) <= 0.25  # at least 75% of the patch tokens see only background
        mask = torch.zeros(scenes.SCENE_SIZE, scenes.SCENE_SIZE, dtype=torch.bool)
        mask[layout.top : layout.top + layout.size, layout.left : layout.left + layout.size] = True
        assert mask.float().mean() < 0.2
        gray = image.mean(0)
        inside_means.append(float(gray[mask].max()))
        outside_means.append(float(gray[~mask].mean()))
    # The digit's ink is where the layout says it is: brighter than the background around it.
    assert np.mean(np.array(inside_means) - np.array(outside_means)) > 0.8


@pytest.fixture(scope="module")
def shipped_model() -> CLIPForImageClassification:
    torch.set_num_threads(2)
    return demo_model.load_demo_model()


def test_shipped_weights_load_as_real_transformers_class(shipped_model: CLIPForImageClassification) -> None:
    assert type(shipped_model) is CLIPForImageClassification
    assert isinstance(shipped_model, PreTrainedModel)
    assert type(shipped_model).__module__.startswith("transformers.")
    assert not shipped_model.training
    vision = shipped_model.config.vision_config
    assert isinstance(vision, CLIPVisionConfig)
    assert vision.image_size == scenes.SCENE_SIZE and vision.patch_size == demo_model.PATCH_SIZE
    assert demo_model.num_patch_tokens() >= 64
    assert shipped_model.config.num_labels == 10
    assert [shipped_model.config.id2label[i] for i in range(10)] == demo_model.DEMO_CLASS_NAMES
    assert shipped_model.config._attn_implementation == "sdpa"
    assert len(shipped_model.vision_model.encoder.layers) == vision.num_hidden_layers


def test_shipped_model_is_accurate_on_eval_pool(shipped_model: CLIPForImageClassification) -> None:
    x, y, digit_index = scenes.make_scenes("eval", 300, seed=2024)
    assert set(digit_index.tolist()) <= set(scenes.eval_pool()[0].tolist())
    with torch.inference_mode():
        predictions = torch.cat([shipped_model(pixel_values=x[s : s + 100]).logits.argmax(-1) for s in (0, 100, 200)])
    accuracy = float((predictions == y).float().mean())
    assert accuracy >= 0.88, accuracy


def test_weights_file_is_small() -> None:
    weights = demo_model.WEIGHTS_DIR / "model.safetensors"
    assert (demo_model.WEIGHTS_DIR / "config.json").is_file()
    assert weights.is_file() and weights.stat().st_size <= 10 * 1024 * 1024


def test_eager_attention_loads_too() -> None:
    model = demo_model.load_demo_model(attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    x, _, _ = scenes.make_scenes("eval", 4, seed=1)
    with torch.inference_mode():
        logits = model(pixel_values=x).logits
    assert logits.shape == (4, 10)
