"""The pre-norm ViT block that CLIP and SigLIP share in transformers, once for both adapters.

Both families' encoder layers are ``layer_norm1``, ``self_attn`` (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``,
``head_dim``, ``scale``), ``layer_norm2``, ``mlp``; their vision models keep ``embeddings.num_patches``, ``encoder``
and ``config.hidden_size`` / ``config.intermediate_size``. Only the class token and the model classes differ, which
is all their adapter files declare.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tuner.evoprune.adapters.ops import LayerOps
from tuner.evoprune.adapters.registry import VisionEncoder


class PreNormViTOps(LayerOps):
    """:class:`LayerOps` of transformers' CLIP and SigLIP encoder layers."""

    def attention(self, layer: Any) -> nn.Module:
        return layer.self_attn

    def attention_norm(self, layer: Any, hidden: torch.Tensor) -> torch.Tensor:
        return layer.layer_norm1(hidden)

    def project(self, attention: Any, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, length, _ = hidden.shape
        shape = (batch, length, -1, attention.head_dim)
        query = attention.q_proj(hidden).view(shape).transpose(1, 2)
        key = attention.k_proj(hidden).view(shape).transpose(1, 2)
        value = attention.v_proj(hidden).view(shape).transpose(1, 2)
        return query, key, value

    def scale(self, attention: Any) -> float:
        return attention.scale

    def attention_output(self, attention: Any, context: torch.Tensor) -> torch.Tensor:
        batch, _, length, _ = context.shape
        return attention.out_proj(context.transpose(1, 2).reshape(batch, length, -1))

    def mlp_norm(self, layer: Any, hidden: torch.Tensor) -> torch.Tensor:
        return layer.layer_norm2(hidden)

    def mlp(self, layer: Any, hidden: torch.Tensor) -> torch.Tensor:
        return layer.mlp(hidden)

    def native_attention(
        self, layer: Any, hidden: torch.Tensor, mask: torch.Tensor | None, **kwargs: Any
    ) -> torch.Tensor:
        # The module's own forward: the model's attention implementation (sdpa by default).
        output, _ = layer.self_attn(hidden_states=hidden, attention_mask=mask, **kwargs)
        return output


PRE_NORM_VIT_OPS = PreNormViTOps()
"""The one (stateless) instance the CLIP and SigLIP adapters share."""


def pre_norm_vit_encoder(family: str, vision_model: Any, has_cls: bool) -> VisionEncoder:
    """The :class:`VisionEncoder` of a CLIP- or SigLIP-style vision model (``CLIPVisionModel``, ...).

    Args:
        family: the adapter's family name.
        vision_model: the module that embeds pixels and runs the encoder.
        has_cls: whether token 0 is a class token.
    """
    config = vision_model.config
    return VisionEncoder(
        family=family,
        vision_model=vision_model,
        encoder=vision_model.encoder,
        has_cls=has_cls,
        num_patches=vision_model.embeddings.num_patches,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        layer_ops=PRE_NORM_VIT_OPS,
    )
