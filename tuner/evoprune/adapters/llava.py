"""LLaVA: the vision tower (CLIP or SigLIP) inside ``LlavaForConditionalGeneration`` / ``LlavaModel``, and inside
LLaVA-OneVision / LLaVA-Video (``LlavaOnevisionForConditionalGeneration`` / ``LlavaOnevisionModel``)."""

from __future__ import annotations

from torch import nn
from transformers import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
)

from tuner.evoprune.adapters.registry import VisionEncoder, register_adapter, resolve_encoder


@register_adapter(
    "llava",
    (
        "LlavaForConditionalGeneration (CLIP or SigLIP tower)",
        "LlavaModel",
        "LlavaOnevisionForConditionalGeneration (SigLIP tower)",
        "LlavaOnevisionModel",
    ),
)
def resolve(model: nn.Module) -> VisionEncoder | None:
    """The vision tower's encoder of a LLaVA model (through the tower's own adapter), or None."""
    if isinstance(model, (LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration)):
        model = model.model
    if not isinstance(model, (LlavaModel, LlavaOnevisionModel)):
        return None
    return resolve_encoder(model.vision_tower)
