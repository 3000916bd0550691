"""Apply a :class:`Schedule` to a vision encoder (any family an adapter knows), per instance and removably.

Only two kinds of module get an instance-level ``forward`` (their classes are never touched):

- the encoder, whose loop carries the merge state from layer to layer and, with proportional attention, passes the
  ``log(size)`` key bias to every later layer as an additive attention mask;
- each merging layer, which computes its attention itself (it needs the keys and the attention received), merges
  after the attention residual and before the MLP (the paper's Algorithm 1), then runs the MLP on fewer tokens.

Every other layer runs its own code, with the model's attention implementation (sdpa by default). Removing the
handle deletes those attributes, so the model is bit-identical to the untouched one; parameters and buffers are
never replaced, so ``state_dict`` keys never change.

This module is the generic part: the encoder loop, where merges go and the attention statistics. A merging layer's
model-specific parts (norms, q/k/v and output projections, MLP) come from its family's adapter
(:class:`tuner.evoprune.adapters.LayerOps`, looked up once per forward), so a new encoder family is one adapter
module and no change here.

``apply(..., reducer="slice")`` is a timing oracle, not a method: the same layers shrink by the same counts, but each
merging layer just keeps its first tokens (no statistics, no scoring, the model's own attention), the cheapest token
reduction there is. A merging schedule's time against it is what its merging costs over free merging.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from tuner.evoprune.adapters import PRE_NORM_VIT_OPS, LayerOps, VisionEncoder, resolve_encoder
from tuner.evoprune.errors import EvoPruneError, ScheduleError
from tuner.evoprune.merge import TokenState, _accumulation_dtype, merge_step, patch_importance
from tuner.evoprune.schedule import Schedule
from tuner.evoprune.temporal import temporal_merge_step

_HANDLE_ATTRIBUTE = "_evoprune_handle"

Reducer = Literal["merge", "slice"]


class EvoPruneHandle:
    """A schedule applied to one model; a context manager that removes it on exit.

    Attributes:
        schedule: the applied schedule.
        encoder: where the model keeps its encoder.
        token_counts: patch tokens after each layer in the last forward (empty before the first).
        sizes: ``[B, T]`` patches each output token stands for, in the last forward.
        source: ``[B, N0]`` index of the output token that covers each original patch, in the last forward.
        source_item: ``[B, N0]`` the batch item (frame) holding that token, when the last forward merged temporally;
            None otherwise (every patch is then covered by a token of its own item).
        frames_per_item: frames per video when the batch items are video frames (consecutive items of one video,
            as LLaVA-OneVision's tower gets them), for temporal merging (``scoring.temporal_weight > 0``); None or 1
            for images, where temporal merging is inactive. Set it before a forward; it holds until changed.
        profile: when True, every merge step is timed (with a device synchronisation) into ``merge_seconds``, and
            so is the cost of the attention statistics: a merging layer that needs them also runs the model's own
            attention once more, untimed in the total (``profile_seconds``), to tell how much slower the explicit
            attention was. For measuring overhead only, never for timing the model.
        merge_seconds: time spent scoring, matching and merging since ``profile`` was set, including the attention
            statistics' extra cost over the model's own attention.
        profile_seconds: time the profiling itself added (the extra reference attention); subtract it from a
            profiled forward's wall time.
        reducer: ``"merge"`` (EvoPrune) or ``"slice"`` (the timing oracle, see :func:`apply`).
        attention_chunk_logits: forces how many attention logits one chunk of a merging layer's explicit attention
            holds (see :func:`attention_chunks`); None (default) picks it per device.
        ctr_reductions: ``{layer: items}``, per merging layer of the last forward, how many batch items had their
            CTR protection reduced below the method's ``N_protect`` so that the layer could remove exactly r tokens
            (a property; see its docstring).
        temporal_merges: ``{layer: tokens}``, per merging layer of the last forward, how many tokens (all items)
            folded into the previous frame instead of merging spatially (a property; empty without temporal merging).
    """

    def __init__(self, encoder: VisionEncoder, schedule: Schedule, reducer: Reducer = "merge") -> None:
        self.schedule = schedule
        self.encoder = encoder
        self.reducer: Reducer = reducer
        self.token_counts: list[int] = []
        self.sizes: torch.Tensor | None = None
        self.source: torch.Tensor | None = None
        self.source_item: torch.Tensor | None = None
        self._frames_per_item: int | None = None
        self._temporal_counts: dict[int, torch.Tensor] = {}
        self.profile = False
        self.merge_seconds = 0.0
        self.profile_seconds = 0.0
        self.attention_chunk_logits: int | None = None
        self._protection_reduced: dict[int, torch.Tensor | None] = {}
        self._patched: list[tuple[nn.Module, str, Any]] = []

    @property
    def ctr_reductions(self) -> dict[int, int]:
        """Per merging layer of the last forward, how many batch items got less CTR protection than specified.

        The method protects the ``N_protect = min(round(ctr * T), T - 2 r)`` patch tokens that receive the most
        attention. So that a layer removes exactly ``r`` tokens from every item, protection is further capped at
        ``|A| - r`` tokens of set A and ``|B| - 1`` of set B (:func:`tuner.evoprune.merge.protected_tokens`); an
        item where that cap dropped a protected token counts here. Keys are the merging layers' indices (a layer
        with no such item maps to 0); empty before the first forward, with ``reducer="slice"`` and for an empty
        schedule. Reading it synchronises with the device once (the flags stay on it during the forward).

        Example: ``{0: 0, 2: 3}`` means layer 2 reduced the protection of 3 items of the batch.
        """
        layers = list(self._protection_reduced)
        flags = [self._protection_reduced[layer] for layer in layers]
        present = [flag.sum() for flag in flags if flag is not None]
        counts = iter(torch.stack(present).tolist() if present else [])
        return {layer: 0 if flag is None else int(next(counts)) for layer, flag in zip(layers, flags, strict=True)}

    @property
    def frames_per_item(self) -> int | None:
        """Frames per video of the batches the encoder gets (consecutive items), or None for images."""
        return self._frames_per_item

    @frames_per_item.setter
    def frames_per_item(self, frames: int | None) -> None:
        if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
            raise EvoPruneError(f"frames_per_item must be None (images) or an integer >= 1, got {frames!r}")
        self._frames_per_item = frames

    @property
    def temporal_merges(self) -> dict[int, int]:
        """Per merging layer of the last forward, how many tokens folded into the previous frame (all items).

        Empty unless the last forward merged temporally (``scoring.temporal_weight > 0`` and ``frames_per_item``
        above 1). Reading it synchronises with the device once.
        """
        layers = list(self._temporal_counts)
        if not layers:
            return {}
        totals = torch.stack([self._temporal_counts[layer].sum() for layer in layers]).tolist()
        return {layer: int(total) for layer, total in zip(layers, totals, strict=True)}

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


def apply(model: nn.Module, schedule: Schedule, *, reducer: Reducer = "merge") -> EvoPruneHandle:
    """Apply ``schedule`` to the vision encoder of ``model``.

    Args:
        model: a model some adapter supports (CLIP or SigLIP vision/dual models, their image classifiers, LLaVA;
            or a family registered with :func:`tuner.evoprune.adapters.register_adapter`).
        schedule: the per-layer plan; its depth and input tokens must match the encoder.
        reducer: ``"merge"``, EvoPrune's score-guided merging; or ``"slice"``, a timing oracle for benchmarks: each
            merging layer runs the model's own attention and keeps its first ``T - r`` patch tokens (CLS stays), no
            statistics, scoring or merging. Its output is no pruning method; ``sizes`` are then all 1 and ``source``
            is -1 for a dropped patch. The scoring settings are ignored (with slicing, every size stays 1, so
            proportional attention's bias would be 0 anyway).

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
    if reducer not in ("merge", "slice"):
        raise ValueError(f"reducer must be 'merge' or 'slice', got {reducer!r}")
    encoder = resolve_encoder(model)
    _check_fits(encoder, schedule)
    if getattr(encoder.encoder, _HANDLE_ATTRIBUTE, None) is not None:
        raise EvoPruneError("this model already has an EvoPrune schedule applied; remove() that handle first")
    handle = EvoPruneHandle(encoder, schedule, reducer)
    if schedule.is_empty:
        # Nothing merges: leave every forward untouched (bit-identical by construction).
        handle.token_counts = [schedule.tokens_in] * schedule.num_layers
        return handle
    setattr(encoder.encoder, _HANDLE_ATTRIBUTE, handle)
    handle._patch(encoder.encoder, _make_encoder_forward(handle))
    layer_forward = _merging_layer_forward if reducer == "merge" else _slicing_layer_forward
    for index in schedule.merge_layers:
        handle._patch(encoder.layers[index], layer_forward)
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
    """What a merging layer needs from its encoder's forward: the state of this call and the step's settings.

    ``state`` is None with the slicing reducer (which tracks none); ``ops`` are the encoder family's block parts;
    ``chunk_logits`` is the attention chunk budget of this forward (None when no layer computes attention statistics).
    """

    def __init__(
        self,
        handle: EvoPruneHandle,
        state: TokenState | None,
        remove: int,
        cls_tokens: int,
        ops: LayerOps,
        chunk_logits: int | None = None,
        frames: int | None = None,
    ) -> None:
        self.frames = frames
        self.temporal_count: torch.Tensor | None = None
        self.handle = handle
        self.state = state
        self.remove = remove
        self.cls_tokens = cls_tokens
        self.ops = ops
        self.chunk_logits = chunk_logits


def _make_encoder_forward(handle: EvoPruneHandle) -> Callable[..., BaseModelOutput]:
    schedule = handle.schedule
    cls_tokens = 1 if handle.encoder.has_cls else 0
    ops = handle.encoder.layer_ops
    slicing = handle.reducer == "slice"
    proportional = schedule.scoring.proportional_attention and not slicing
    needs_attention = schedule.scoring.needs_attention and not slicing

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
        # Temporal merging (docs/method.md, "Temporal merging") needs frames: images (None, 1) never merge temporally.
        frames = handle.frames_per_item if schedule.scoring.temporal and not slicing else None
        if frames is not None and frames < 2:
            frames = None
        if frames is not None and batch % frames:
            raise EvoPruneError(
                f"the encoder got {batch} items, not a whole number of videos of frames_per_item={frames} frames; "
                "set handle.frames_per_item to the frames per video (None for images)"
            )
        # The state lives in this call only, so concurrent or nested forwards never share it.
        state = None if slicing else TokenState.start(batch, num_patches, hidden.device)
        chunk_logits = None
        if needs_attention:
            # Once per forward: on a GPU the default budget asks the driver for its free memory.
            chunk_logits = handle.attention_chunk_logits or default_chunk_logits(hidden.device, hidden.dtype)
        counts: list[int] = []
        reduced: dict[int, torch.Tensor | None] = {}
        temporal_counts: dict[int, torch.Tensor] = {}
        mask: torch.Tensor | None = None
        for index, layer in enumerate(self.layers):
            remove = schedule.remove_per_layer[index]
            if remove > 0:
                step = _Step(handle, state, remove, cls_tokens, ops, chunk_logits, frames)
                hidden = layer(hidden, mask, evoprune_step=step, **kwargs)
                if step.state is not None:
                    state = step.state
                    reduced[index] = state.protection_reduced
                    if step.temporal_count is not None:
                        temporal_counts[index] = step.temporal_count
                    if proportional:
                        mask = _size_bias(state.sizes, cls_tokens, hidden.dtype)
            else:
                hidden = layer(hidden, mask, **kwargs)
            counts.append(hidden.shape[1] - cls_tokens)
        handle.token_counts = counts
        handle._protection_reduced = reduced
        handle._temporal_counts = temporal_counts
        handle.source_item = None if state is None else state.source_item
        if state is None:
            # Slicing kept the first tokens: token i is patch i, the other patches were dropped.
            kept = counts[-1]
            handle.sizes = torch.ones(batch, kept, device=hidden.device, dtype=torch.float32)
            patch = torch.arange(num_patches, device=hidden.device)
            handle.source = torch.where(patch < kept, patch, -1).expand(batch, num_patches)
        else:
            handle.sizes = state.sizes
            handle.source = state.source
        return BaseModelOutput(last_hidden_state=hidden)

    return encoder_forward


def _size_bias(sizes: torch.Tensor, cls_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive key bias ``log(size)`` of proportional attention, ``[B, 1, 1, N]`` (CLS has size 1)."""
    # The log in float32 at least (float64 for a float64 model), then the model's dtype.
    bias = sizes.to(torch.promote_types(dtype, torch.float32)).log()
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
    """A merging layer: the block's attention computed here (with its statistics), the merge step, then the MLP."""
    if evoprune_step is None:
        # Called outside its encoder's loop (someone runs the block alone): behave as the block's own code.
        return type(self).forward(self, hidden_states, attention_mask, **kwargs)
    step = evoprune_step
    assert step.state is not None, "a merging layer runs with the merge reducer, which tracks the token state"
    scoring = step.handle.schedule.scoring
    ops = step.ops
    residual = hidden_states
    profile = step.handle.profile
    attention = ops.attention(self)
    normed = ops.attention_norm(self, hidden_states)
    if profile and scoring.needs_attention:
        _profile_attention_statistics(attention, normed, attention_mask, step.handle, step.chunk_logits, ops)
    attention_out, keys, received = _attention_with_statistics(
        attention, normed, attention_mask, scoring.needs_attention, step.chunk_logits, ops
    )
    hidden_states = residual + attention_out

    if profile:
        _synchronize(hidden_states)
        started = time.perf_counter()
    cls = step.cls_tokens
    features = keys if scoring.features == "keys" else hidden_states
    # s~: the attention received, normalised to mean 1 over the patch tokens (CLS excluded; docs/method.md, 4).
    # Without an attention term (w_attn 0) only the CTR ranking uses it, which no positive scale changes: the
    # patches' column sums serve as they are (four operators fewer per merging layer).
    importance = None
    if received is not None:
        importance = patch_importance(received, cls) if scoring.w_attn > 0 else received[:, cls:]
    if step.frames is None:
        # CLS passes through inside the step (the fused CPU kernel writes it with the merged tokens: no cat).
        hidden_states, step.state = merge_step(
            hidden_states, features, step.state, step.remove, scoring, importance, prefix_tokens=cls
        )
    else:
        patches, step.state, step.temporal_count = temporal_merge_step(
            hidden_states[:, cls:], features[:, cls:], step.state, step.remove, scoring, step.frames, importance
        )
        hidden_states = torch.cat([hidden_states[:, :cls], patches], dim=1) if cls else patches
    if profile:
        _synchronize(hidden_states)
        step.handle.merge_seconds += time.perf_counter() - started

    residual = hidden_states
    hidden_states = ops.mlp(self, ops.mlp_norm(self, hidden_states))
    return residual + hidden_states


def _slicing_layer_forward(
    self: Any,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    evoprune_step: _Step | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """A merging layer of the timing oracle: the block's own attention, then keep the first ``N - r`` tokens."""
    if evoprune_step is None:
        return type(self).forward(self, hidden_states, attention_mask, **kwargs)
    ops = evoprune_step.ops
    residual = hidden_states
    attention_out = ops.native_attention(self, ops.attention_norm(self, hidden_states), attention_mask, **kwargs)
    hidden_states = (residual + attention_out)[:, : hidden_states.shape[1] - evoprune_step.remove]
    residual = hidden_states
    hidden_states = ops.mlp(self, ops.mlp_norm(self, hidden_states))
    return residual + hidden_states


# Logits per chunk of (item, head) pairs in the explicit attention path on a CPU: about 1 MB of float32, so that a
# chunk's logits, softmax and column sums stay in a CPU core's cache instead of streaming a [B, H, N, N] matrix
# through memory four times.
_CHUNK_LOGITS = 1 << 18
# On a GPU, cache blocking buys nothing and every chunk costs several kernel launches from a Python loop, so a chunk
# takes as many logits as fit in this share of the memory available now, at this many bytes of temporaries per
# logit and element byte (logits, logits + bias, probabilities in the model's dtype) plus 4 of headroom (the
# softmax's own working space).
_GPU_MEMORY_SHARE = 0.25
_GPU_TEMPORARIES = 3
# Beyond this a chunk saves no launch worth having, and tensors stay under 2**31 elements (32-bit kernel indexing).
_GPU_MAX_CHUNK_LOGITS = 1 << 30


def default_chunk_logits(device: torch.device | str, dtype: torch.dtype = torch.float32) -> int:
    """How many attention logits one chunk of the explicit attention may hold on ``device`` by default.

    A CPU (and any device but CUDA) gets ``2**18`` (about 1 MB of float32: a core's cache). A CUDA device gets a
    quarter of the memory available now (free on the device plus cached by PyTorch's allocator but unused), at
    ``3 * itemsize + 4`` bytes of temporaries per logit, between ``2**18`` and ``2**30`` logits; for a 64-frame
    SigLIP so400m batch in fp16 (16 x 64 x 729**2 = 0.54e9 logits, 5.4 GB of temporaries) on a GPU with 22 GB or
    more available that is one batched computation per layer.

    Args:
        device: where the attention runs.
        dtype: the model's dtype (the logits' element size).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return _CHUNK_LOGITS
    free, _ = torch.cuda.mem_get_info(device)
    available = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    bytes_per_logit = _GPU_TEMPORARIES * dtype.itemsize + 4
    budget = int(available * _GPU_MEMORY_SHARE) // bytes_per_logit
    return max(_CHUNK_LOGITS, min(_GPU_MAX_CHUNK_LOGITS, budget))


def attention_chunks(
    batch: int, heads: int, length: int, device: torch.device | str = "cpu", budget: int | None = None
) -> list[tuple[slice, list[slice]]]:
    """How the explicit attention of a merging layer is split: slices of items, each with its slices of heads.

    Each chunk's logits hold at most ``budget`` values (at least one head of one item). Three modes follow from it:

    - ``budget >= batch * heads * length**2``: one chunk, a single batched computation;
    - ``budget >= heads * length**2``: chunks of whole items (``budget // (heads * length**2)`` items each);
    - otherwise one item at a time, in groups of ``max(1, budget // length**2)`` heads.

    Args:
        batch: items (frames) in the batch.
        heads: attention heads.
        length: tokens (queries and keys).
        device: where it runs; picks the default budget (:func:`default_chunk_logits`).
        budget: logits per chunk, forcing a mode; None for the device's default.

    Returns:
        ``[(items, [heads, ...]), ...]``, slices to index dims 0 and 1 of ``[B, H, N, d]``.

    Example:
        >>> attention_chunks(4, 2, 10, budget=4 * 2 * 100)
        [(slice(0, 4, None), [slice(None, None, None)])]
        >>> len(attention_chunks(4, 2, 10, budget=2 * 100)), attention_chunks(1, 2, 10, budget=100)[0][1]
        (4, [slice(0, 1, None), slice(1, 2, None)])
    """
    if budget is None:
        budget = default_chunk_logits(device)
    per_head = length * length
    if heads * per_head <= budget:
        items = max(1, budget // (heads * per_head))
        return [(slice(start, start + items), [slice(None)]) for start in range(0, batch, items)]
    group = max(1, budget // per_head)
    head_groups = [slice(start, start + group) for start in range(0, heads, group)]
    return [(slice(item, item + 1), head_groups) for item in range(batch)]


def _attention_with_statistics(
    attention: nn.Module,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    need_importance: bool,
    chunk_logits: int | None = None,
    ops: LayerOps = PRE_NORM_VIT_OPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The block's self-attention, also returning the keys averaged over heads and, if asked, the attention received.

    Uses the module's own projections and scale, through the family's ``ops`` (the encoder's ``layer_ops``; the
    default serves CLIP and SigLIP attention modules). Without a need for the attention received it runs sdpa. With
    it, the softmax is computed explicitly, in the chunks of :func:`attention_chunks` (``chunk_logits`` logits each,
    None for the device's default), and the column sums of the softmax are summed on the way.

    Returns:
        ``(output [B, N, C], keys [B, N, d], received [B, N] or None)``: ``received`` is the attention each token
        receives, every query counted, averaged over heads (N times the column mean; float32, float64 for a float64
        model); :func:`tuner.evoprune.merge.patch_importance` turns it into the importance ``s~``.
    """
    batch, length, _ = hidden.shape
    query, key, value = ops.project(attention, hidden)
    heads = query.shape[1]
    scale = ops.scale(attention)
    importance = None
    if need_importance:
        # The scale goes on the queries ([.., N, d]) rather than on the logits ([.., N, N]).
        query = query * scale
        # The softmax in the model's dtype (a half-precision softmax accumulates in float32 inside its kernel), the
        # column sums accumulated in float32. A float32 copy of the probabilities would double the memory traffic of
        # this path, which is what it costs on a GPU at video scale (32 frames x 729 tokens: 0.27e9 logits a layer).
        sum_dtype = _accumulation_dtype(query.dtype)
        padded = _aligns(query, mask)
        if padded:
            query, key_operand, value, mask = (*_aligned_operands(query, key, value, mask), None)
        else:
            key_operand = key
        # Chunk results are concatenated rather than written with out=, which autograd does not allow.
        outputs, received = [], []
        chunks = attention_chunks(batch, heads, length, hidden.device, chunk_logits)
        # One chunk covering everything (small token counts): the whole tensors, without indexing them (each index
        # is an operator call, and at batch 1 on a CPU these layers cost mostly per-operator overhead).
        whole = len(chunks) == 1 and chunks[0][1] == [slice(None)]
        for items, head_groups in chunks:
            item_outputs, item_received = [], []
            for head_group in head_groups:
                if whole:
                    chunk_query, chunk_key, chunk_value, chunk_mask = query, key_operand, value, mask
                else:
                    chunk_query, chunk_key = query[items, head_group], key_operand[items, head_group]
                    chunk_value = value[items, head_group]
                    chunk_mask = None if mask is None else mask[items]
                logits = torch.matmul(chunk_query, chunk_key.transpose(-1, -2))
                if chunk_mask is not None:
                    logits = logits + chunk_mask
                probabilities = torch.softmax(logits, dim=-1)
                item_received.append(probabilities.sum(dim=2, dtype=sum_dtype))
                item_outputs.append(torch.matmul(probabilities, chunk_value))
            outputs.append(_cat(item_outputs, dim=1))
            received.append(_cat(item_received, dim=1))
        output = _cat(outputs, dim=0)
        # Column sums over the queries, averaged over the heads: N times the column mean (padding keys dropped).
        importance = _cat(received, dim=0).mean(dim=1)
        if padded:
            importance = importance[:, :length]
    else:
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    output = ops.attention_output(attention, output)
    return output, key.mean(dim=1), importance


# On a GPU, attention logits of at least this many values are computed with aligned rows (:func:`_aligned_operands`):
# a row of 729 half-precision logits (SigLIP at 384 px) is 1458 bytes, not a multiple of 16, and cuBLAS then falls
# back to slow unaligned kernels for both products (measured on an H200: about a seventh of a 32-frame SigLIP so400m
# forward). Below it (one image: 5e6 logits for CLIP ViT-L/14-336) the few extra operators would cost more host
# time than they save, as a batch-1 forward on a GPU waits for the host (a threshold chosen, not measured).
_ALIGN_MIN_LOGITS = 1 << 24
_ALIGN_DEVICES: tuple[str, ...] = ("cuda",)


def _aligns(query: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether this explicit attention pads its operands (:func:`_aligned_operands`)."""
    batch, heads, length, _ = query.shape
    if query.device.type not in _ALIGN_DEVICES or batch * heads * length * length < _ALIGN_MIN_LOGITS:
        return False
    if mask is not None:
        # Only a per-key bias (proportional attention's [B, 1, 1, N]) folds into the keys.
        return tuple(mask.shape) == (batch, 1, 1, length)
    return length % 8 != 0


def _aligned_operands(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values padded so that every row of logits and probabilities is a multiple of 8 values.

    The keys get padding rows up to a multiple of 8, and every vector one more channel: 1 in the queries, the key's
    bias in the keys (proportional attention's ``log size``, else 0; a large negative number for a padding key, whose
    probability is then exactly 0), then zeros up to a multiple of 8 channels. So ``q' . k'`` is the logit with its
    bias, added inside the product (no pass over the logits), and the padding keys' columns are sliced off the
    column sums. Values get zero rows for the padding keys.

    Args:
        query: ``[B, H, N, d]`` queries, already scaled.
        key: ``[B, H, N, d]``; value: ``[B, H, N, d]``.
        mask: None or a ``[B, 1, 1, N]`` additive key bias.

    Returns:
        ``(query [B, H, N, d'], key [B, H, N', d'], value [B, H, N', d])`` with ``N'`` and ``d' > d`` multiples of 8.
    """
    *lead, length, dim = key.shape
    padded_length, padded_dim = -(-length // 8) * 8, -(-(dim + 1) // 8) * 8
    aligned_query = query.new_zeros(*lead, length, padded_dim)
    aligned_query[..., :dim] = query
    aligned_query[..., dim] = 1.0
    aligned_key = key.new_zeros(*lead, padded_length, padded_dim)
    aligned_key[..., :length, :dim] = key
    if mask is not None:
        aligned_key[..., :length, dim] = mask[:, :, 0, :]
    aligned_key[..., length:, dim] = torch.finfo(key.dtype).min / 2
    aligned_value = F.pad(value, (0, 0, 0, padded_length - length))
    return aligned_query, aligned_key, aligned_value


def _cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _profile_attention_statistics(
    attention: nn.Module,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    handle: EvoPruneHandle,
    chunk_logits: int | None,
    ops: LayerOps,
) -> None:
    """Charge the explicit attention's extra time over the model's own (sdpa) to ``merge_seconds`` (profiling only).

    Both are timed warm (after one untimed run, so neither pays for bringing the weights into the caches); the
    difference is added signed, so that timing noise averages out over the layers instead of piling up.
    """
    _synchronize(hidden)
    started = time.perf_counter()
    _attention_with_statistics(attention, hidden, mask, True, chunk_logits, ops)  # warm-up
    _synchronize(hidden)
    reference_started = time.perf_counter()
    _attention_with_statistics(attention, hidden, mask, False, None, ops)
    _synchronize(hidden)
    explicit_started = time.perf_counter()
    _attention_with_statistics(attention, hidden, mask, True, chunk_logits, ops)
    _synchronize(hidden)
    finished = time.perf_counter()
    handle.merge_seconds += (finished - explicit_started) - (explicit_started - reference_started)
    # All three runs are extra work of the profiled forward (the layer then runs its own attention as usual).
    handle.profile_seconds += finished - started


def _synchronize(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
