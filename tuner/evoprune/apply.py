"""Apply a :class:`Schedule` to a transformers vision encoder, per instance and removably.

Only two kinds of module get an instance-level ``forward`` (their classes are never touched):

- the encoder, whose loop carries the merge state from layer to layer and, with proportional attention, passes the
  ``log(size)`` key bias to every later layer as an additive attention mask;
- each merging layer, which computes its attention itself (it needs the keys and the attention received), merges
  after the attention residual and before the MLP (the paper's Algorithm 1), then runs the MLP on fewer tokens.

Every other layer runs its own code, with the model's attention implementation (sdpa by default). Removing the
handle deletes those attributes, so the model is bit-identical to the untouched one; parameters and buffers are
never replaced, so ``state_dict`` keys never change.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from tuner.evoprune.adapters import VisionEncoder, resolve_encoder
from tuner.evoprune.errors import EvoPruneError, ScheduleError
from tuner.evoprune.merge import TokenState, merge_step
from tuner.evoprune.schedule import Schedule

_HANDLE_ATTRIBUTE = "_evoprune_handle"


class EvoPruneHandle:
    """A schedule applied to one model; a context manager that removes it on exit.

    Attributes:
        schedule: the applied schedule.
        encoder: where the model keeps its encoder.
        token_counts: patch tokens after each layer in the last forward (empty before the first).
        sizes: ``[B, T]`` patches each output token stands for, in the last forward.
        source: ``[B, N0]`` index of the output token that covers each original patch, in the last forward.
        profile: when True, every merge step is timed (with a device synchronisation) into ``merge_seconds``, and
            so is the cost of the attention statistics: a merging layer that needs them also runs the model's own
            attention once more, untimed in the total (``profile_seconds``), to tell how much slower the explicit
            attention was. For measuring overhead only, never for timing the model.
        merge_seconds: time spent scoring, matching and merging since ``profile`` was set, including the attention
            statistics' extra cost over the model's own attention.
        profile_seconds: time the profiling itself added (the extra reference attention); subtract it from a
            profiled forward's wall time.
    """

    def __init__(self, encoder: VisionEncoder, schedule: Schedule) -> None:
        self.schedule = schedule
        self.encoder = encoder
        self.token_counts: list[int] = []
        self.sizes: torch.Tensor | None = None
        self.source: torch.Tensor | None = None
        self.profile = False
        self.merge_seconds = 0.0
        self.profile_seconds = 0.0
        self._patched: list[tuple[nn.Module, str, Any]] = []

    @property
    def active(self) -> bool:
        return bool(self._patched)

    def remove(self) -> None:
        """Restore the model's own forwards. Safe to call twice."""
        for module, attribute, previous in reversed(self._patched):
            if previous is None:
                delattr(module, attribute)
            else:
                setattr(module, attribute, previous)
        self._patched.clear()
        if getattr(self.encoder.encoder, _HANDLE_ATTRIBUTE, None) is self:
            delattr(self.encoder.encoder, _HANDLE_ATTRIBUTE)

    def __enter__(self) -> EvoPruneHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def _patch(self, module: nn.Module, new_forward: Callable[..., Any]) -> None:
        # accelerate's hooks (device_map="auto") wrap ``forward`` and call ``_old_forward``: patch beneath them.
        attribute = "_old_forward" if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__ else "forward"
        previous = module.__dict__.get(attribute)
        setattr(module, attribute, types.MethodType(new_forward, module))
        self._patched.append((module, attribute, previous))


def apply(model: nn.Module, schedule: Schedule) -> EvoPruneHandle:
    """Apply ``schedule`` to the vision encoder of ``model``.

    Args:
        model: a supported transformers model (CLIP or SigLIP vision/dual models, their image classifiers, LLaVA).
        schedule: the per-layer plan; its depth and input tokens must match the encoder.

    Returns:
        A handle; use it as a context manager or call ``remove()``.

    Raises:
        UnsupportedModelError: the model has no supported vision encoder.
        ScheduleError: the schedule does not fit the encoder.
        EvoPruneError: a schedule is already applied to this model.

    Example:
        >>> from transformers import CLIPVisionConfig, CLIPVisionModel
        >>> cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        ...                        num_attention_heads=4, image_size=32, patch_size=8)
        >>> model = CLIPVisionModel(cfg).eval()
        >>> s = Schedule.preset("skip", num_layers=4, tokens_in=16, tokens_out=8)
        >>> with apply(model, s) as handle:
        ...     _ = model(pixel_values=torch.randn(2, 3, 32, 32))
        >>> handle.token_counts
        [12, 12, 8, 8]
    """
    encoder = resolve_encoder(model)
    _check_fits(encoder, schedule)
    if getattr(encoder.encoder, _HANDLE_ATTRIBUTE, None) is not None:
        raise EvoPruneError("this model already has an EvoPrune schedule applied; remove() that handle first")
    handle = EvoPruneHandle(encoder, schedule)
    if schedule.is_empty:
        # Nothing merges: leave every forward untouched (bit-identical by construction).
        handle.token_counts = [schedule.tokens_in] * schedule.num_layers
        return handle
    setattr(encoder.encoder, _HANDLE_ATTRIBUTE, handle)
    handle._patch(encoder.encoder, _make_encoder_forward(handle))
    for index in schedule.merge_layers:
        handle._patch(encoder.layers[index], _merging_layer_forward)
    return handle


def _check_fits(encoder: VisionEncoder, schedule: Schedule) -> None:
    if schedule.num_layers != encoder.num_layers:
        raise ScheduleError(
            f"the schedule has {schedule.num_layers} layers but this {encoder.family} encoder has "
            f"{encoder.num_layers}; make a schedule for this encoder"
        )
    if schedule.tokens_in != encoder.num_patches:
        raise ScheduleError(
            f"the schedule expects {schedule.tokens_in} patch tokens but this {encoder.family} encoder makes "
            f"{encoder.num_patches}; make a schedule for this resolution"
        )
    if schedule.family is not None and schedule.family != encoder.family:
        raise ScheduleError(f"the schedule was made for a {schedule.family} encoder, this one is {encoder.family}")
    if schedule.has_cls is not None and schedule.has_cls != encoder.has_cls:
        raise ScheduleError(
            f"the schedule was made for an encoder {'with' if schedule.has_cls else 'without'} a CLS token; "
            f"this {encoder.family} encoder is {'with' if encoder.has_cls else 'without'} one"
        )


class _Step:
    """What a merging layer needs from its encoder's forward: the state of this call and the step's settings."""

    def __init__(self, handle: EvoPruneHandle, state: TokenState, remove: int, cls_tokens: int) -> None:
        self.handle = handle
        self.state = state
        self.remove = remove
        self.cls_tokens = cls_tokens


def _make_encoder_forward(handle: EvoPruneHandle) -> Callable[..., BaseModelOutput]:
    schedule = handle.schedule
    cls_tokens = 1 if handle.encoder.has_cls else 0
    proportional = schedule.scoring.proportional_attention

    def encoder_forward(
        self: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> BaseModelOutput:
        if attention_mask is not None:
            raise EvoPruneError("EvoPrune cannot merge tokens under an encoder attention mask; pass none")
        hidden = inputs_embeds
        batch, length, _ = hidden.shape
        num_patches = length - cls_tokens
        if num_patches != schedule.tokens_in:
            raise ScheduleError(
                f"the schedule expects {schedule.tokens_in} patch tokens but the encoder received {num_patches} "
                "(another image size?); make a schedule for this resolution"
            )
        # The state lives in this call only, so concurrent or nested forwards never share it.
        state = TokenState.start(batch, num_patches, hidden.device)
        counts: list[int] = []
        mask: torch.Tensor | None = None
        for index, layer in enumerate(self.layers):
            remove = schedule.remove_per_layer[index]
            if remove > 0:
                step = _Step(handle, state, remove, cls_tokens)
                hidden = layer(hidden, mask, evoprune_step=step, **kwargs)
                state = step.state
                if proportional:
                    mask = _size_bias(state.sizes, cls_tokens, hidden.dtype)
            else:
                hidden = layer(hidden, mask, **kwargs)
            counts.append(hidden.shape[1] - cls_tokens)
        handle.token_counts = counts
        handle.sizes = state.sizes
        handle.source = state.source
        return BaseModelOutput(last_hidden_state=hidden)

    return encoder_forward


def _size_bias(sizes: torch.Tensor, cls_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive key bias ``log(size)`` of proportional attention, ``[B, 1, 1, N]`` (CLS has size 1)."""
    bias = sizes.log()
    if cls_tokens:
        bias = F.pad(bias, (cls_tokens, 0))
    return bias.to(dtype)[:, None, None, :]


def _merging_layer_forward(
    self: Any,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    evoprune_step: _Step | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    if evoprune_step is None:
        # Called outside its encoder's loop (someone runs the block alone): behave as the block's own code.
        return type(self).forward(self, hidden_states, attention_mask, **kwargs)
    step = evoprune_step
    scoring = step.handle.schedule.scoring
    residual = hidden_states
    profile = step.handle.profile
    normed = self.layer_norm1(hidden_states)
    if profile and scoring.needs_attention:
        _profile_attention_statistics(self.self_attn, normed, attention_mask, step.handle)
    attention_out, keys, importance = _attention_with_statistics(
        self.self_attn, normed, attention_mask, scoring.needs_attention
    )
    hidden_states = residual + attention_out

    if profile:
        _synchronize(hidden_states)
        started = time.perf_counter()
    cls = step.cls_tokens
    features = keys if scoring.features == "keys" else hidden_states
    patches, step.state = merge_step(
        hidden_states[:, cls:],
        features[:, cls:],
        step.state,
        step.remove,
        scoring,
        importance[:, cls:] if importance is not None else None,
    )
    hidden_states = torch.cat([hidden_states[:, :cls], patches], dim=1) if cls else patches
    if profile:
        _synchronize(hidden_states)
        step.handle.merge_seconds += time.perf_counter() - started

    residual = hidden_states
    hidden_states = self.mlp(self.layer_norm2(hidden_states))
    return residual + hidden_states


# Logits per chunk of (item, head) pairs in the explicit attention path: about 1 MB of float32, so that a chunk's
# logits, softmax and column sums stay in a CPU core's cache instead of streaming a [B, H, N, N] matrix through memory
# four times (and a GPU never holds the whole matrix for a large batch of frames).
_CHUNK_LOGITS = 1 << 18


def _attention_with_statistics(
    attention: Any, hidden: torch.Tensor, mask: torch.Tensor | None, need_importance: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The block's self-attention, also returning the keys averaged over heads and, if asked, the attention received.

    Uses the module's own projections and scale. Without a need for the attention received it runs sdpa. With it,
    the softmax is computed explicitly, chunk by chunk, and the attention each token receives (the column mean of
    the softmax, heads averaged, scaled by N: :func:`tuner.evoprune.merge.attention_received`) is summed on the way.

    Returns:
        ``(output [B, N, C], keys [B, N, d], importance [B, N] float32 or None)``.
    """
    batch, length, _ = hidden.shape
    shape = (batch, length, -1, attention.head_dim)
    query = attention.q_proj(hidden).view(shape).transpose(1, 2)
    key = attention.k_proj(hidden).view(shape).transpose(1, 2)
    value = attention.v_proj(hidden).view(shape).transpose(1, 2)
    heads = query.shape[1]
    importance = None
    if need_importance:
        # The scale goes on the queries ([.., N, d]) rather than on the logits ([.., N, N]).
        query = query * attention.scale
        # Chunk results are concatenated rather than written with out=, which autograd does not allow.
        outputs, received = [], []
        for items, head_groups in _chunks(batch, heads, length):
            item_outputs, item_received = [], []
            for head_group in head_groups:
                logits = torch.matmul(query[items, head_group], key[items, head_group].transpose(-1, -2))
                if mask is not None:
                    logits = logits + mask[items]
                probabilities = torch.softmax(logits, dim=-1, dtype=torch.float32)
                item_received.append(probabilities.sum(dim=2))
                item_outputs.append(torch.matmul(probabilities.to(query.dtype), value[items, head_group]))
            outputs.append(_cat(item_outputs, dim=1))
            received.append(_cat(item_received, dim=1))
        output = _cat(outputs, dim=0)
        # Column sums over the queries, averaged over the heads: N times the column mean.
        importance = _cat(received, dim=0).mean(dim=1)
    else:
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attention.scale)
    output = attention.out_proj(output.transpose(1, 2).reshape(batch, length, -1))
    return output, key.mean(dim=1), importance


def _chunks(batch: int, heads: int, length: int) -> list[tuple[slice, list[slice]]]:
    """Slices of items, each with its slices of heads, whose logits hold about ``_CHUNK_LOGITS`` values: several
    whole items while an item's heads fit, else one item at a time in groups of heads."""
    per_head = length * length
    if heads * per_head <= _CHUNK_LOGITS:
        items = max(1, _CHUNK_LOGITS // (heads * per_head))
        return [(slice(start, start + items), [slice(None)]) for start in range(0, batch, items)]
    group = max(1, _CHUNK_LOGITS // per_head)
    head_groups = [slice(start, start + group) for start in range(0, heads, group)]
    return [(slice(item, item + 1), head_groups) for item in range(batch)]


def _cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _profile_attention_statistics(
    attention: Any, hidden: torch.Tensor, mask: torch.Tensor | None, handle: EvoPruneHandle
) -> None:
    """Charge the explicit attention's extra time over the model's own (sdpa) to ``merge_seconds`` (profiling only).

    Both are timed warm (after one untimed run, so neither pays for bringing the weights into the caches); the
    difference is added signed, so that timing noise averages out over the layers instead of piling up.
    """
    _synchronize(hidden)
    started = time.perf_counter()
    _attention_with_statistics(attention, hidden, mask, True)  # warm-up
    _synchronize(hidden)
    reference_started = time.perf_counter()
    _attention_with_statistics(attention, hidden, mask, False)
    _synchronize(hidden)
    explicit_started = time.perf_counter()
    _attention_with_statistics(attention, hidden, mask, True)
    _synchronize(hidden)
    finished = time.perf_counter()
    handle.merge_seconds += (finished - explicit_started) - (explicit_started - reference_started)
    # All three runs are extra work of the profiled forward (the layer then runs its own attention as usual).
    handle.profile_seconds += finished - started


def _synchronize(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
