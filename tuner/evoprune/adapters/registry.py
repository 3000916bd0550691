"""The adapter registry: which models hold which vision encoder, and how the engine runs its blocks.

An adapter is a resolver, a function that returns the :class:`VisionEncoder` of the models it knows and ``None`` for
any other, registered under a family name with :func:`register_adapter`. The built-in adapters (CLIP, SigLIP,
LLaVA) are imported on the first lookup and come first; an adapter registered from outside (a new encoder family:
one module with a resolver and its :class:`~tuner.evoprune.adapters.ops.LayerOps`) is tried after them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from tuner.evoprune.adapters.ops import LayerOps
from tuner.evoprune.errors import EvoPruneError, UnsupportedModelError


@dataclass(frozen=True)
class VisionEncoder:
    """Where a model keeps its ViT encoder, what shape it has and how its blocks are run.

    Attributes:
        family: the adapter's family name (``"clip"``, ``"siglip"``, or a registered one).
        vision_model: the module that embeds pixels and runs the encoder (``CLIPVisionModel``, ``SiglipVisionModel``).
        encoder: the module whose ``layers`` are the transformer blocks (see :class:`LayerOps` for what the engine
            assumes of it).
        has_cls: whether token 0 is a class token (never merged).
        num_patches: patch tokens per image at the configured resolution.
        hidden_size: channels of a token.
        intermediate_size: hidden channels of the MLP.
        layer_ops: the family's block parts, which a merging layer runs.
    """

    family: str
    vision_model: nn.Module
    encoder: nn.Module
    has_cls: bool
    num_patches: int
    hidden_size: int
    intermediate_size: int
    layer_ops: LayerOps

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer blocks, in order."""
        return self.encoder.layers  # type: ignore[return-value]

    @property
    def num_layers(self) -> int:
        """How many blocks the encoder has."""
        return len(self.layers)


Resolver = Callable[[nn.Module], "VisionEncoder | None"]
_BUILTIN_FAMILIES = ("clip", "siglip", "llava")
_BUILTIN_MODULES = tuple(f"{__package__}.{family}" for family in _BUILTIN_FAMILIES)
_ADAPTERS: dict[str, tuple[Resolver, tuple[str, ...]]] = {}


def register_adapter(name: str, class_names: tuple[str, ...]) -> Callable[[Resolver], Resolver]:
    """A decorator that registers a resolver: a function returning the :class:`VisionEncoder` of the models it knows.

    Resolvers are tried in registration order, the built-in ones first; the first that returns an encoder wins.

    Args:
        name: the family name (unique).
        class_names: the model classes it supports, listed in the error for an unsupported model.

    Returns:
        The decorator; it returns the resolver unchanged.

    Raises:
        EvoPruneError: (when decorating) another resolver is registered under ``name``.

    Example (a new family's module; ``MyViTOps`` subclasses :class:`~tuner.evoprune.adapters.ops.LayerOps`)::

        @register_adapter("my-vit", ("MyViT",))
        def resolve(model: nn.Module) -> VisionEncoder | None:
            if not isinstance(model, MyViT):
                return None
            return VisionEncoder("my-vit", model, model.encoder, True, 196, 768, 3072, MyViTOps())
    """

    def decorator(resolver: Resolver) -> Resolver:
        if getattr(resolver, "__module__", None) not in _BUILTIN_MODULES:
            # The built-in families are registered first, so they keep their names and their place in errors.
            _load_builtin_adapters()
        found = _ADAPTERS.get(name)
        if found is not None and found[0] is not resolver:
            raise EvoPruneError(
                f"an encoder adapter named {name!r} is already registered ({_origin(found[0])}); "
                f"register {_origin(resolver)} under another name"
            )
        _ADAPTERS[name] = (resolver, tuple(class_names))
        return resolver

    return decorator


def unregister_adapter(name: str) -> None:
    """Remove the adapter registered as ``name`` (a plugin's tests, say).

    Raises:
        EvoPruneError: no adapter has that name.
    """
    _load_builtin_adapters()
    if _ADAPTERS.pop(name, None) is None:
        raise EvoPruneError(f"no encoder adapter named {name!r}; registered: {', '.join(_ADAPTERS)}")


def _in_order() -> list[tuple[Resolver, tuple[str, ...]]]:
    """The adapters, the built-in families first in their fixed order (whatever order their modules were imported in),
    then the others in registration order."""
    _load_builtin_adapters()
    names = [name for name in _BUILTIN_FAMILIES if name in _ADAPTERS]
    names += [name for name in _ADAPTERS if name not in _BUILTIN_FAMILIES]
    return [_ADAPTERS[name] for name in names]


def supported_models() -> list[str]:
    """Every model class some adapter supports."""
    return [class_name for _, names in _in_order() for class_name in names]


def resolve_encoder(model: nn.Module) -> VisionEncoder:
    """The vision encoder inside ``model``.

    Raises:
        UnsupportedModelError: no adapter knows the model; the message lists the supported classes.
    """
    for resolver, _ in _in_order():
        found = resolver(model)
        if found is not None:
            return found
    raise UnsupportedModelError(f"unsupported model {type(model).__name__}; supported: {', '.join(supported_models())}")


ADAPTER_GROUP = "tuner.adapters"
"""Entry-point group of installed adapter plugins: each entry point names a module that registers its adapter on
import (or a resolver, registered under the entry point's name with its ``class_names`` attribute)."""

_PLUGINS = {"loaded": False}


def _load_builtin_adapters() -> None:
    # Imported lazily so that the registry module itself stays free of transformers.
    # Registration order is the order errors list the families in: the built-ins, then installed plugins.
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    if not _PLUGINS["loaded"]:
        _PLUGINS["loaded"] = True
        _load_plugins()


def _load_plugins() -> None:
    from importlib.metadata import entry_points

    for entry in entry_points(group=ADAPTER_GROUP):
        try:
            loaded = entry.load()
        except Exception as error:  # noqa: BLE001 - a broken plugin must say which one it is
            raise UnsupportedModelError(
                f"the encoder adapter plugin {entry.name!r} ({entry.value}) failed to load: {error}; "
                "fix or uninstall it"
            ) from None
        if callable(loaded) and not isinstance(loaded, type(importlib)):
            register_adapter(entry.name, tuple(getattr(loaded, "class_names", ())))(loaded)


def _origin(resolver: Resolver) -> str:
    return f"{getattr(resolver, '__module__', '?')}.{getattr(resolver, '__qualname__', repr(resolver))}"
