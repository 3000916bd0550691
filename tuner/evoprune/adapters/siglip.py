"""SigLIP: ``SiglipVisionModel`` and the models that hold one as ``vision_model``. No CLS token."""

from __future__ import annotations

from torch import nn
from transformers import SiglipForImageClassification, SiglipModel, SiglipVisionModel

from tuner.evoprune.adapters.registry import VisionEncoder, register_adapter
from tuner.evoprune.adapters.vit import pre_norm_vit_encoder


@register_adapter("siglip", ("SiglipVisionModel", "SiglipModel", "SiglipForImageClassification"))
def resolve(model: nn.Module) -> VisionEncoder | None:
    """The SigLIP vision encoder of ``model``, or None if it is no SigLIP model."""
    if isinstance(model, (SiglipModel, SiglipForImageClassification)):
        model = model.vision_model
    if not isinstance(model, SiglipVisionModel):
        return None
    return pre_norm_vit_encoder("siglip", model, has_cls=False)
