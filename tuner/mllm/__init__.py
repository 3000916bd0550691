"""Multimodal LLMs with EvoPrune in their vision tower: prompts rewritten to the pruned image-token count."""

from tuner.mllm.llava import LlavaPruning, llava_layers_used, prepare_llava
from tuner.mllm.tokens import IGNORE_INDEX, RewrittenPrompt, image_runs, rewrite_image_runs

__all__ = [
    "IGNORE_INDEX",
    "LlavaPruning",
    "RewrittenPrompt",
    "image_runs",
    "llava_layers_used",
    "prepare_llava",
    "rewrite_image_runs",
]
