"""Model adapters: find a model's vision encoder and run its blocks' parts (one small module per family).

A family is one module: a resolver registered with :func:`register_adapter` that returns a :class:`VisionEncoder`,
whose ``layer_ops`` (a :class:`LayerOps`) give the engine the block's norms, attention projections and MLP. CLIP and
SigLIP share :class:`PreNormViTOps`. Public names are re-exported from the submodules.
"""

from tuner.evoprune.adapters.ops import LayerOps
from tuner.evoprune.adapters.registry import (
    VisionEncoder,
    register_adapter,
    resolve_encoder,
    supported_models,
    unregister_adapter,
)
from tuner.evoprune.adapters.vit import PRE_NORM_VIT_OPS, PreNormViTOps

__all__ = [
    "PRE_NORM_VIT_OPS",
    "LayerOps",
    "PreNormViTOps",
    "VisionEncoder",
    "register_adapter",
    "resolve_encoder",
    "supported_models",
    "unregister_adapter",
]
