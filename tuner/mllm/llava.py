"""LLaVA-1.5 with EvoPrune in its vision tower, taking the processor's usual outputs.

:func:`prepare_llava` applies a schedule to the vision layers that LLaVA uses and makes the model's ``forward`` and
``generate`` accept prompts with the native number of image tokens: each image's run is shrunk to the pruned count
(:func:`tuner.mllm.tokens.rewrite_image_runs`) before the model sees it. Everything is per instance and removable.

LLaVA reads the vision tower's hidden state at ``vision_feature_layer`` (-2 for LLaVA-1.5: the penultimate layer), yet
transformers runs every layer. The layers after the one read are made pass-throughs while prepared: the tower still
has all its layers (so hidden-state indices resolve as before), and the schedule covers only the layers that run.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration

from tuner.evoprune import EvoPruneError, EvoPruneHandle, Schedule, ScheduleError, UnsupportedModelError, apply
from tuner.evoprune.adapters import resolve_encoder
from tuner.mllm.tokens import PaddingSide, RewrittenPrompt, rewrite_image_runs

__all__ = ["LlavaPruning", "TowerPruning", "llava_layers_used", "prepare_llava", "vision_layers_that_run"]


def llava_layers_used(model: Any) -> int:
    """How many vision layers a LLaVA-family model's visual features depend on (``vision_feature_layer`` resolved).

    Raises:
        UnsupportedModelError: several feature layers (a concatenation of hidden states) are configured.
    """
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise UnsupportedModelError(
            f"vision_feature_layer={layer!r} concatenates several hidden states; EvoPrune merges one token sequence, "
            "so only a single feature layer is supported"
        )
    num_layers = resolve_encoder(model).num_layers
    index = layer % (num_layers + 1) if layer < 0 else layer  # hidden_states[0] is the embedding output
    if not 1 <= index <= num_layers:
        raise UnsupportedModelError(f"vision_feature_layer={layer} reads no layer of a {num_layers}-layer tower")
    return index


def vision_layers_that_run(model: Any) -> int:
    """Vision layers a model's output depends on: up to ``vision_feature_layer`` for a LLaVA-family model (the layers
    that run once it is prepared), else all the encoder's layers. Search spaces and latency models size schedules by it.
    """
    if isinstance(model, (LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration)):
        return llava_layers_used(model)
    return resolve_encoder(model).num_layers


class TowerPruning:
    """A schedule applied to a LLaVA-family model's vision tower, with its prompts rewritten; a context manager that
    removes it on exit. Subclasses say how a prompt is rewritten (:meth:`rewrite`).

    Attributes:
        model: the prepared model.
        schedule: the schedule over the layers that run (``layers_used`` of them).
        layers_used: vision layers that run; the rest are pass-throughs while prepared.
        native_tokens: visual features per image (or frame) of the unpruned model, before any pooling.
        pruned_tokens: visual features per image (or frame) after merging.
        engine: the engine's handle on the vision tower (token counts, sizes, CTR reductions of the last forward).
    """

    def __init__(self, model: Any, schedule: Schedule, padding_side: PaddingSide | None) -> None:
        self.model: Any = model
        self.schedule = schedule
        self.layers_used = llava_layers_used(model)
        encoder = resolve_encoder(model)
        if schedule.num_layers != self.layers_used:
            raise ScheduleError(
                f"the schedule has {schedule.num_layers} layers but this {type(model).__name__} reads vision layer "
                f"{self.layers_used} of {encoder.num_layers} (vision_feature_layer="
                f"{model.config.vision_feature_layer}); make a schedule for the {self.layers_used} layers that run"
            )
        # Features per image: the tokens out of the tower, less CLS where the "default" strategy drops token 0.
        strategy = model.config.vision_feature_select_strategy
        extra = (1 if encoder.has_cls else 0) - (1 if strategy == "default" else 0)
        self.native_tokens = schedule.tokens_in + extra
        self.pruned_tokens = schedule.tokens_out + extra
        self.padding_side = padding_side
        self._patched: list[tuple[nn.Module, str, Any]] = []
        tail = [0] * (encoder.num_layers - self.layers_used)
        full = Schedule(
            schedule.remove_per_layer + tail, schedule.tokens_in, schedule.scoring, schedule.family, schedule.has_cls
        )
        self.engine: EvoPruneHandle = apply(model, full)
        try:
            for layer in encoder.layers[self.layers_used :]:
                self._patch(layer, "forward", _pass_through)
            self._patch(model, "forward", _rewriting(self, type(model).forward))
            self._patch(model, "generate", _rewriting(self, type(model).generate))
            self._prepare()
        except Exception:
            self.remove()
            raise

    def _prepare(self) -> None:
        """More per-instance patches a model family needs (none by default)."""

    def rewrite(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` of a forward or generate call with the prompt's visual runs shrunk (when they are native)."""
        raise NotImplementedError

    def _rewrite_runs(
        self, kwargs: dict[str, Any], token_id: int, items: int, native_run: int, pruned_run: int
    ) -> dict[str, Any]:
        """Shrink each run of ``native_run`` tokens ``token_id`` to ``pruned_run`` (``items`` runs in the batch)."""
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise EvoPruneError("a pruned LLaVA needs input_ids with its pixels (inputs_embeds cannot be rewritten)")
        if native_run == pruned_run or int((input_ids == token_id).sum()) == items * pruned_run:
            return kwargs  # nothing merged, or already rewritten (generate's first forward)
        rewritten = rewrite_image_runs(
            input_ids,
            image_token_id=token_id,
            native=native_run,
            pruned=pruned_run,
            pad_token_id=_pad_token_id(self.model),
            attention_mask=kwargs.get("attention_mask"),
            labels=kwargs.get("labels"),
            padding_side=self.padding_side,
        )
        return _with_rewritten(kwargs, rewritten)

    def remove(self) -> None:
        """Restore the model's own forwards and prompts. Safe to call twice."""
        for module, attribute, previous in reversed(self._patched):
            if previous is None:
                delattr(module, attribute)
            else:
                setattr(module, attribute, previous)
        self._patched.clear()
        self.engine.remove()

    def __enter__(self) -> TowerPruning:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def _patch(self, module: nn.Module, attribute: str, function: Callable[..., Any]) -> None:
        previous = module.__dict__.get(attribute)
        setattr(module, attribute, types.MethodType(function, module))
        self._patched.append((module, attribute, previous))


class LlavaPruning(TowerPruning):
    """A schedule applied to a LLaVA-1.5 model: each image's run of image tokens shrinks to ``pruned_tokens``."""

    def rewrite(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return kwargs  # a decoding step or a text-only prompt
        token_id = self.model.config.image_token_id
        return self._rewrite_runs(kwargs, token_id, int(pixel_values.shape[0]), self.native_tokens, self.pruned_tokens)


def prepare_llava(
    model: LlavaForConditionalGeneration, schedule: Schedule, *, padding_side: PaddingSide | None = None
) -> LlavaPruning:
    """Apply ``schedule`` to a LLaVA model's vision tower and rewrite its prompts' image tokens to match.

    Args:
        model: a ``LlavaForConditionalGeneration`` (LLaVA-1.5: CLIP tower, ``vision_feature_layer=-2``).
        schedule: a plan over the vision layers that run (:func:`llava_layers_used`; 23 of 24 for LLaVA-1.5) and the
            tower's patch tokens (576 at 336 px).
        padding_side: where to pad rows when the attention mask shows no padding; None for the left (generation).

    Returns:
        A handle; use it as a context manager or call ``remove()``. While it holds, ``model(**inputs)`` and
        ``model.generate(**inputs)`` take the processor's outputs unchanged.

    Raises:
        UnsupportedModelError: not a LLaVA model, or several feature layers.
        ScheduleError: the schedule does not fit the layers that run or the tower's tokens.
        EvoPruneError: a schedule is already applied to this model.

    Usage (``processor`` is the model's ``LlavaProcessor``)::

        with prepare_llava(model, schedule) as pruning:
            output = model.generate(**processor(images=image, text=prompt, return_tensors="pt"))
    """
    if not isinstance(model, LlavaForConditionalGeneration):
        raise UnsupportedModelError(f"prepare_llava takes a LlavaForConditionalGeneration, got {type(model).__name__}")
    return LlavaPruning(model, schedule, padding_side)


def _with_rewritten(kwargs: dict[str, Any], rewritten: RewrittenPrompt) -> dict[str, Any]:
    """``kwargs`` with the rewritten ids, mask and labels (and positions counted again, when given)."""
    updated = {**kwargs, "input_ids": rewritten.input_ids}
    if rewritten.attention_mask is not None:
        updated["attention_mask"] = rewritten.attention_mask
    if rewritten.labels is not None:
        updated["labels"] = rewritten.labels
    if kwargs.get("position_ids") is not None:
        # Given positions counted the native prompt; count the rewritten one the same way (from its mask).
        mask = rewritten.attention_mask
        if mask is None:
            mask = torch.ones_like(rewritten.input_ids)
        updated["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return updated


def _pad_token_id(model: Any) -> int:
    for config in (model.config, getattr(model.config, "text_config", None), model.generation_config):
        value = getattr(config, "pad_token_id", None)
        if isinstance(value, int):
            return value
    return 0  # the positions are masked out; any id will do


def _pass_through(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A vision layer whose output LLaVA never reads: it returns its input (its hooks still record it)."""
    return hidden_states


def _rewriting(pruning: TowerPruning, original: Callable[..., Any]) -> Callable[..., Any]:
    # wraps: generate checks its keyword arguments against forward's signature (followed through __wrapped__).
    @functools.wraps(original)
    def call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise EvoPruneError("call a pruned LLaVA with keyword arguments (input_ids=..., pixel_values=...)")
        return original(self, **pruning.rewrite(kwargs))

    return call
