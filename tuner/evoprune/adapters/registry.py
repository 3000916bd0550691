"""The adapter registry: which transformers classes hold which vision encoder."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from tuner.evoprune.errors import UnsupportedModelError


@dataclass(frozen=True)
class VisionEncoder:
    """Where a model keeps its ViT encoder and what shape it has.

    Attributes:
        family: ``"clip"`` or ``"siglip"``.
        vision_model: the module that embeds pixels and runs the encoder (``CLIPVisionModel``, ``SiglipVisionModel``).
        encoder: the module whose ``layers`` are the transformer blocks.
        has_cls: whether token 0 is a class token (never merged).
        num_patches: patch tokens per image at the configured resolution.
        hidden_size: channels of a token.
        intermediate_size: hidden channels of the MLP.
    """

    family: str
    vision_model: nn.Module
    encoder: nn.Module
    has_cls: bool
    num_patches: int
    hidden_size: int
    intermediate_size: int

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layers  # type: ignore[return-value]

    @property
    def num_layers(self) -> int:
        return len(self.layers)


Resolver = Callable[[nn.Module], "VisionEncoder | None"]
_BUILTIN_FAMILIES = ("clip", "siglip", "llava")
_ADAPTERS: dict[str, tuple[Resolver, tuple[str, ...]]] = {}


def register_adapter(name: str, class_names: tuple[str, ...]) -> Callable[[Resolver], Resolver]:
    """Register a resolver that returns the :class:`VisionEncoder` of the models it knows, else ``None``.

    Args:
        name: the family name shown in errors.
        class_names: the model classes it supports, shown in errors.
    """

    def decorator(resolver: Resolver) -> Resolver:
        _ADAPTERS[name] = (resolver, class_names)
        return resolver

    return decorator


def supported_models() -> list[str]:
    """Every model class some adapter supports."""
    _load_builtin_adapters()
    return [class_name for _, names in _ADAPTERS.values() for class_name in names]


def resolve_encoder(model: nn.Module) -> VisionEncoder:
    """The vision encoder inside ``model``.

    Raises:
        UnsupportedModelError: no adapter knows the model; the message lists the supported classes.
    """
    _load_builtin_adapters()
    for resolver, _ in _ADAPTERS.values():
        found = resolver(model)
        if found is not None:
            return found
    raise UnsupportedModelError(f"unsupported model {type(model).__name__}; supported: {', '.join(supported_models())}")


def _load_builtin_adapters() -> None:
    # Imported lazily so that the registry module itself stays free of transformers.
    # Registration order is the order errors list the families in.
    for family in _BUILTIN_FAMILIES:
        importlib.import_module(f"tuner.evoprune.adapters.{family}")
