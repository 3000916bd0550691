"""Offline demo task: a small CLIP ViT that classifies real handwritten digits placed in larger noisy scenes.

Most patch tokens of a scene are background, so the task shows what token merging buys. The trained weights ship in
``tuner/demo/weights`` (``config.json`` + ``model.safetensors``) and load with ``from_pretrained``.
"""

from tuner.demo.model import (
    DEFAULT_BATCH_SIZE,
    DEMO_CLASS_NAMES,
    PATCH_SIZE,
    WEIGHTS_DIR,
    build_demo_config,
    build_demo_model,
    load_demo_model,
    num_patch_tokens,
)
from tuner.demo.scenes import (
    SCENE_SIZE,
    SceneLayout,
    digit_images,
    eval_pool,
    make_scenes,
    render_scenes,
    render_scenes_with_layouts,
    train_pool,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEMO_CLASS_NAMES",
    "PATCH_SIZE",
    "SCENE_SIZE",
    "WEIGHTS_DIR",
    "SceneLayout",
    "build_demo_config",
    "build_demo_model",
    "digit_images",
    "eval_pool",
    "load_demo_model",
    "make_scenes",
    "num_patch_tokens",
    "render_scenes",
    "render_scenes_with_layouts",
    "train_pool",
]
