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


@register_adapter(
    "clip",
    ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel", "CLIPForImageClassification"),
)
def resolve(model: nn.Module) -> VisionEncoder | None:
    if isinstance(model, (CLIPModel, CLIPForImageClassification, CLIPVisionModelWithProjection)):
        model = model.vision_model
    if not isinstance(model, CLIPVisionModel):
        return None
    config = model.config
    return VisionEncoder(
        family="clip",
        vision_model=model,
        encoder=model.encoder,
        has_cls=True,
        num_patches=model.embeddings.num_patches,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
    )
