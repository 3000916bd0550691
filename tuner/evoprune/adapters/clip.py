"""CLIP: ``CLIPVisionModel`` and the models that hold one as ``vision_model``. Token 0 is CLS."""

from __future__ import annotations

from torch import nn
from transformers import (
    CLIPForImageClassification,
    CLIPModel,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)

from tuner.evoprune.adapters.registry import VisionEncoder, register_adapter
from tuner.evoprune.adapters.vit import pre_norm_vit_encoder


@register_adapter(
    "clip",
    ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel", "CLIPForImageClassification"),
)
def resolve(model: nn.Module) -> VisionEncoder | None:
    """The CLIP vision encoder of ``model``, or None if it is no CLIP model."""
    if isinstance(model, (CLIPModel, CLIPForImageClassification, CLIPVisionModelWithProjection)):
        model = model.vision_model
    if not isinstance(model, CLIPVisionModel):
        return None
    return pre_norm_vit_encoder("clip", model, has_cls=True)
