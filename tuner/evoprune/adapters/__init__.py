"""Model adapters: find the vision encoder of a transformers model (one small module per family).

Public names are re-exported from :mod:`tuner.evoprune.adapters.registry`.
"""

from tuner.evoprune.adapters.registry import (
    VisionEncoder,
    register_adapter,
    resolve_encoder,
    supported_models,
)

__all__ = ["VisionEncoder", "register_adapter", "resolve_encoder", "supported_models"]
