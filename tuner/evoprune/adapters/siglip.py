"""SigLIP: ``SiglipVisionModel`` and the models that hold one as ``vision_model``. No CLS token."""

from __future__ import annotations

from torch import nn
from transformers import SiglipForImageClassification, SiglipModel, SiglipVisionModel

from tuner.evoprune.adapters.registry import VisionEncoder, register_adapter


@register_adapter("siglip", ("SiglipVisionModel", "SiglipModel", "SiglipForImageClassification"))
def resolve(model: nn.Module) -> VisionEncoder | None:
    if isinstance(model, (SiglipModel, SiglipForImageClassification)):
        model = model.vision_model
    if not isinstance(model, SiglipVisionModel):
        return None
    config = model.config
    return VisionEncoder(
        family="siglip",
        vision_model=model,
        encoder=model.encoder,
        has_cls=False,
        num_patches=model.embeddings.num_patches,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
    )
