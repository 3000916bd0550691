"""What the engine needs from one transformer block of an encoder family: :class:`LayerOps`.

The engine (:mod:`tuner.evoprune.apply`) runs a merging layer itself, as the method's pre-norm block (docs/method.md,
section 2)::

    q, k, v = project(attention_norm(x))           # [B, H, N, d] each
    x = x + attention_output(softmax(q k^T * scale + bias) v)
    x = merge(x)                                     # only on a merging layer
    x = x + mlp(mlp_norm(x))

It computes the attention itself (it needs the keys and the attention each token receives), so it needs the block's
parts rather than its forward. A family's :class:`LayerOps` gives them, as ToMe keeps its block code in a per-framework
patch; everything else (the encoder loop, merge placement, attention statistics) is generic.

This module imports no transformers class: a family that is not from transformers needs none.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class LayerOps(ABC):
    """The parts of one encoder block the engine calls: norms, attention projections, MLP.

    One stateless instance serves every block of every model of a family; the engine looks it up once per forward
    (``VisionEncoder.layer_ops``) and calls each method once per merging layer, never per token. The methods take the
    block (``layer``) or its attention module (what :meth:`attention` returns, which may be the block itself) and must
    compute what the block's own forward computes in eval mode: the engine applies no dropout.

    Besides these parts the engine assumes of an encoder (``VisionEncoder.encoder``) only that its blocks are in
    ``encoder.layers``, are called as ``layer(hidden_states, attention_mask, **kwargs)`` with an additive attention
    mask (or None) and return the hidden states ``[B, N, C]``, and that its ``forward(inputs_embeds,
    attention_mask=None, **kwargs)`` returns a ``BaseModelOutput`` (the engine's encoder forward replaces it).
    """

    @abstractmethod
    def attention(self, layer: nn.Module) -> nn.Module:
        """The block's self-attention module: what :meth:`project`, :meth:`scale` and :meth:`attention_output` take."""

    @abstractmethod
    def attention_norm(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The norm before the attention (``LN1``), on ``[B, N, C]``."""

    @abstractmethod
    def project(
        self, attention: nn.Module, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of the normed tokens ``[B, N, C]``, each split into heads: ``[B, H, N, d]``."""

    @abstractmethod
    def scale(self, attention: nn.Module) -> float:
        """The factor on the attention logits (usually ``d ** -0.5``)."""

    @abstractmethod
    def attention_output(self, attention: nn.Module, context: torch.Tensor) -> torch.Tensor:
        """The heads' attention output ``[B, H, N, d]`` merged back to ``[B, N, C]`` and projected (no residual)."""

    @abstractmethod
    def mlp_norm(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The norm before the MLP (``LN2``), on ``[B, N, C]``."""

    @abstractmethod
    def mlp(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The block's MLP on the normed tokens (no residual)."""

    def native_attention(
        self, layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, **kwargs: Any
    ) -> torch.Tensor:
        """The block's attention branch on the normed tokens, as the model computes it (no residual).

        Used where the engine needs no attention statistics (the ``reducer="slice"`` timing oracle). The default
        composes :meth:`project`, sdpa and :meth:`attention_output`; a family whose attention module has its own
        forward (and attention implementation) should call that.

        Args:
            layer: the block.
            hidden: ``[B, N, C]``, already through :meth:`attention_norm`.
            mask: additive attention mask broadcastable to ``[B, H, N, N]``, or None.
            **kwargs: what the encoder passed on to its blocks.
        """
        attention = self.attention(layer)
        query, key, value = self.project(attention, hidden)
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=self.scale(attention))
        return self.attention_output(attention, context)
