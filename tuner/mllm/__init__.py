"""Multimodal LLMs with EvoPrune in their vision tower: prompts rewritten to the pruned image-token count."""

from tuner.mllm.llava import LlavaPruning, TowerPruning, llava_layers_used, prepare_llava, vision_layers_that_run
from tuner.mllm.onevision import (
    OnevisionPruning,
    OnevisionVideoPruning,
    image_tile_grid,
    native_image_tokens,
    pooled_tokens_per_frame,
    prepare_onevision,
    prepare_onevision_video,
)
from tuner.mllm.tokens import IGNORE_INDEX, RewrittenPrompt, image_runs, rewrite_image_runs, runs_hold

__all__ = [
    "IGNORE_INDEX",
    "LlavaPruning",
    "OnevisionPruning",
    "OnevisionVideoPruning",
    "RewrittenPrompt",
    "image_runs",
    "image_tile_grid",
    "TowerPruning",
    "llava_layers_used",
    "native_image_tokens",
    "pooled_tokens_per_frame",
    "prepare_llava",
    "prepare_onevision",
    "prepare_onevision_video",
    "rewrite_image_runs",
    "runs_hold",
    "vision_layers_that_run",
]
