"""Multimodal LLMs with EvoPrune in their vision tower: prompts rewritten to the pruned image-token count."""

from tuner.mllm.llava import LlavaPruning, TowerPruning, llava_layers_used, prepare_llava, vision_layers_that_run
from tuner.mllm.onevision import OnevisionVideoPruning, pooled_tokens_per_frame, prepare_onevision_video
from tuner.mllm.tokens import IGNORE_INDEX, RewrittenPrompt, image_runs, rewrite_image_runs

__all__ = [
    "IGNORE_INDEX",
    "LlavaPruning",
    "OnevisionVideoPruning",
    "RewrittenPrompt",
    "image_runs",
    "TowerPruning",
    "llava_layers_used",
    "pooled_tokens_per_frame",
    "prepare_llava",
    "prepare_onevision_video",
    "rewrite_image_runs",
    "vision_layers_that_run",
]
