"""Temporal merging: on video, a frame may fold tokens into matching tokens of the previous frame (docs/method.md,
section "Temporal merging").

The paper merges every frame on its own (its stated future work is cross-frame merging). Here the frames of a video
are consecutive batch items of the encoder (``frames`` per video) and a merging layer may remove a token of frame
``t >= 1`` by folding it into its best match in frame ``t - 1`` (static content) instead of into a token of its own
frame. Pure tensor code, no model knowledge; the rules:

- **Same counts.** Every frame still removes exactly the schedule's ``r`` tokens at that layer, so frames keep equal
  lengths and the batch stays one tensor. What changes is *which* tokens a frame removes and where they go.
- **Frames in time order.** Frame 0 has no previous frame and merges spatially only, exactly as without temporal
  merging. Then frame 1, 2, ... in turn: each token of frame t gets its best option, an A token (even position)
  its best spatial partner in set B (the usual EvoPrune score, :func:`tuner.evoprune.merge.spatial_scores`) or its
  best temporal partner in frame t - 1, whichever scores higher (ties go spatial); a B token only a temporal
  partner (B tokens receive spatial merges and are never folded spatially). The ``r`` tokens with the best options
  are removed. Only these choices run frame by frame (one ``[V, T, T]`` max and one sort per frame); all pair
  scores are computed at once.
- **Receivers are tokens frame t - 1 keeps unchanged** (neither removes nor merges anything into at this layer).
  This is the order that makes chains well defined: frame t is decided after frame t - 1, so no chain runs across
  frames, and a fold lands in a token whose value is the one it was matched against. It is also what makes
  consecutive frames complementary on static content: a token whose match in frame t - 1 was merged finds no exact
  partner and tends to stay, so frame t keeps what frame t - 1 merged away. The only chain left is within a frame:
  an A token folded into a B token that itself goes into frame t - 1 ends where that B token goes (one pointer step).
- **The temporal score** of the pair (token p of frame t, token q of frame t - 1) is, in the paper's product form,
  ``temporal_weight * Sim(p, q)``; in the log space of the engine ``w_sim * log((1 + cos) / 2) +
  log(temporal_weight)``. The weight stands where a spatial pair has its diversity and attention factors
  (``exp(-w_div (d_i + d_j))``, ``exp(-w_attn (s~_i + s~_j))``) and the CTR mask: those guard a unique or important
  token against being averaged with *other* content, while a temporal fold averages a token with its near-copy and
  keeps it in the video. ``temporal_weight = 1``: a near-copy in the previous frame always beats a spatial pair of
  the same similarity; lower weights ask temporal pairs to be that much more similar than the spatial ones they
  compete with; 0 switches the whole path off (the caller then runs the per-frame step, bit-identical to the engine
  without this module). With the paper's scoring, spatial scores sit near ``exp(-w_div * (d_i + d_j))`` (0.5 to
  0.7 at w_div 0.5), so weights in that band decide how much static content folds.
- **Size-weighted.** A kept token becomes the size-weighted mean of itself and everything whose chain ends in it;
  sizes add up, so a token folded into the previous frame adds its size there. Per video the sizes still sum to
  ``frames * N0``; per frame they need not (an earlier frame may stand for patches of later ones).
- **Order and source map.** A frame's kept tokens stay ordered by the first patch *of that frame* they cover
  (tokens from other frames do not move them). ``TokenState.source`` / ``source_item`` say, for every original patch
  of every frame, which item (frame) and token now covers it.

Shapes: ``B = videos * frames`` items, ``T`` patch tokens, ``C`` channels, ``D`` feature channels, ``N0`` patches.
"""

from __future__ import annotations

import math

import torch

from tuner.evoprune.merge import (
    _SIMILARITY_FLOOR,
    SpatialScores,
    TokenState,
    _accumulation_dtype,
    _take_tokens,
    spatial_scores,
)
from tuner.evoprune.scoring import Scoring

__all__ = [
    "TemporalChoice",
    "resolve_chains",
    "temporal_choice",
    "temporal_merge",
    "temporal_merge_step",
    "temporal_pair_scores",
]


class TemporalChoice:
    """The decisions of one temporal merging step, before they are applied.

    Attributes:
        target: ``[B * T]`` int64: for every token (flat index ``item * T + position``) the token it folds into, or
            itself when it stays; an A token may point to a B token that goes too (see :func:`resolve_chains`).
        removed: ``[B, T]`` bool, the ``r`` tokens each item removes.
        temporal: ``[B, T]`` bool, the removed tokens that fold into the previous frame.
        reduced: ``[B]`` CTR-reduction flags of the spatial scoring (None without protection).
        remove: r, the tokens every item removes.
    """

    def __init__(
        self,
        target: torch.Tensor,
        removed: torch.Tensor,
        temporal: torch.Tensor,
        reduced: torch.Tensor | None,
        remove: int,
    ) -> None:
        self.remove = remove
        self.target = target
        self.removed = removed
        self.temporal = temporal
        self.reduced = reduced

    @property
    def temporal_counts(self) -> torch.Tensor:
        """``[B]`` how many of each item's removed tokens folded into the previous frame."""
        return self.temporal.sum(dim=1)


def _check_frames(batch: int, frames: int) -> None:
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be an integer >= 1, got {frames!r}")
    if batch % frames:
        raise ValueError(f"a batch of {batch} items is not a whole number of videos of {frames} frames")


def temporal_pair_scores(spatial: SpatialScores, scoring: Scoring, frames: int) -> torch.Tensor:
    """The log score of every temporal pair, before any choice: ``[V, F - 1, T, T]``.

    Row ``p`` of ``[v, t - 1]`` holds token p of frame t against every token q of frame t - 1:
    ``w_sim * log((1 + cos) / 2) + log(temporal_weight)``, without the constant ``-w_sim * log 2`` as the spatial
    scores (:func:`tuner.evoprune.merge.spatial_scores`). No diversity or attention penalty and no CTR mask: they
    guard a token against being averaged with *other* content, and a temporal fold averages it with its near-copy
    (docs/method.md, "Temporal merging"); the weight stands in their place.

    Args:
        spatial: the step's spatial scores (their normalised features are reused).
        scoring: the settings; ``temporal_weight`` must be > 0.
        frames: frames per video (consecutive items), at least 2.
    """
    normed = spatial.normed
    batch, num_tokens, _ = normed.shape
    by_frame = normed.view(batch // frames, frames, num_tokens, -1)
    # Rows: the tokens of frame t; columns: those of frame t - 1.
    cosine = by_frame[:, 1:] @ by_frame[:, :-1].transpose(-1, -2)
    if scoring.w_sim == 0:
        return cosine.zero_()
    log_score = cosine.clamp_min_(2.0 * _SIMILARITY_FLOOR - 1.0).log1p_()
    if scoring.w_sim != 1.0:
        log_score.mul_(scoring.w_sim)
    if scoring.temporal_weight != 1.0:
        log_score.add_(math.log(scoring.temporal_weight))
    return log_score


def temporal_choice(
    features: torch.Tensor,
    remove: int,
    scoring: Scoring,
    frames: int,
    importance: torch.Tensor | None = None,
) -> TemporalChoice:
    """Decide which ``r`` tokens every frame removes, and whether each goes spatially or into the previous frame.

    Frames are decided in time order (frame 0 as the spatial step would); frame t may fold a token only into a token
    that frame t - 1 keeps unchanged (neither removes nor merges into). The pair scores are computed for all frames
    at once; only the choices are sequential.

    Args:
        features: ``[B, T, D]`` token features of ``B / frames`` videos, frames consecutive.
        remove: r, at most ``T // 2``.
        scoring: the settings (``temporal_weight`` > 0).
        frames: frames per video.
        importance: ``[B, T]`` attention received (mean 1 per item), needed when ``scoring.needs_attention``.

    Returns:
        The decisions (:class:`TemporalChoice`).
    """
    batch, num_tokens, _ = features.shape
    _check_frames(batch, frames)
    spatial = spatial_scores(features, remove, scoring, importance)
    device = features.device
    videos = batch // frames
    # Each token's spatial option: its best B partner for an A token, none (-inf) for a B token.
    option = torch.full((batch, num_tokens), float("-inf"), device=device, dtype=spatial.best_score.dtype)
    option[:, 0::2] = spatial.best_score
    position = torch.arange(num_tokens, device=device).repeat(batch, 1)
    position[:, 0::2] = spatial.best_partner * 2 + 1
    option = option.view(videos, frames, num_tokens)
    position = position.view(videos, frames, num_tokens)
    removed = torch.zeros((videos, frames, num_tokens), dtype=torch.bool, device=device)
    temporal = torch.zeros_like(removed)
    chosen = _top(option[:, 0], remove)
    removed[:, 0].scatter_(1, chosen, True)
    # Tokens a frame may not fold into: those the previous frame removes or changes (receives into, spatially).
    blocked = _changed(removed[:, 0], position[:, 0], chosen, None)
    if frames > 1:
        pair_scores = temporal_pair_scores(spatial, scoring, frames)
        for frame in range(1, frames):
            scores = pair_scores[:, frame - 1].masked_fill(blocked[:, None, :], float("-inf"))
            best, partner = scores.max(dim=-1)
            goes_back = best > option[:, frame]  # strictly better: ties go spatial
            chosen = _top(torch.where(goes_back, best, option[:, frame]), remove)
            removed[:, frame].scatter_(1, chosen, True)
            temporal[:, frame] = goes_back & removed[:, frame]
            position[:, frame] = torch.where(goes_back, partner, position[:, frame])
            blocked = _changed(removed[:, frame], position[:, frame], chosen, goes_back)
    item = torch.arange(batch, device=device).view(videos, frames, 1) - temporal.long()
    own = torch.arange(batch * num_tokens, device=device).view(videos, frames, num_tokens)
    target = torch.where(removed, item * num_tokens + position, own).flatten()
    return TemporalChoice(
        target, removed.view(batch, num_tokens), temporal.view(batch, num_tokens), spatial.reduced, remove
    )


def _changed(
    removed: torch.Tensor, position: torch.Tensor, chosen: torch.Tensor, goes_back: torch.Tensor | None
) -> torch.Tensor:
    """``[V, T]`` the tokens of a frame that this step removes or that receive a spatial merge of that frame."""
    spatial = torch.ones_like(chosen) if goes_back is None else (~goes_back.gather(1, chosen)).long()
    received = torch.zeros_like(position).scatter_add_(1, position.gather(1, chosen), spatial)
    return removed | (received > 0)


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest scores of each row, ties to the lower index (as the spatial step)."""
    return torch.argsort(scores, dim=-1, descending=True, stable=True)[:, :count]


def resolve_chains(target: torch.Tensor) -> torch.Tensor:
    """Every token's final destination: a removed token's destination, or that token's own when it too goes.

    Chains are at most two edges long: an A token folded into a B token of its frame that goes into the previous
    frame, whose receiving token is kept by construction; one pointer-doubling step resolves them.

    Args:
        target: ``[B * T]`` flat destinations (a staying token points to itself).

    Returns:
        ``[B * T]`` destinations that all stay.

    Example:
        >>> resolve_chains(torch.tensor([1, 3, 2, 3])).tolist()
        [3, 3, 2, 3]
    """
    return target[target]


def temporal_merge(hidden: torch.Tensor, state: TokenState, choice: TemporalChoice) -> tuple[torch.Tensor, TokenState]:
    """Apply the decisions: fold every removed token into the end of its chain by size-weighted mean.

    Args:
        hidden: ``[B, T, C]`` patch tokens.
        state: their sizes, source map and order keys.
        choice: the step's decisions (:func:`temporal_choice`).

    Returns:
        The ``[B, T - r, C]`` merged tokens (each frame in its own spatial order) and the new state, with
        ``source_item`` set.
    """
    hidden = hidden.contiguous()
    batch, num_tokens, channels = hidden.shape
    kept = num_tokens - choice.remove
    device = hidden.device
    flat = batch * num_tokens
    final = resolve_chains(choice.target)

    sizes = state.sizes.reshape(flat)
    new_sizes = torch.zeros_like(sizes).scatter_add_(0, final, sizes)
    # Weighted sums in float32 at least (sizes reach hundreds); a token nobody folds into passes through unchanged.
    sum_dtype = _accumulation_dtype(hidden.dtype)
    # Out of place: for float32 tokens ``.to`` returns the caller's tensor itself.
    weighted = hidden.reshape(flat, channels).to(sum_dtype) * sizes[:, None]
    totals = torch.zeros(flat, channels, device=device, dtype=sum_dtype).index_add_(0, final, weighted)
    receives = (new_sizes != sizes)[:, None]
    means = totals.div_(new_sizes.clamp_min(1.0)[:, None]).to(hidden.dtype)
    values = torch.where(receives, means, hidden.reshape(flat, channels))

    # Order key: the first patch of its *own* frame a token covers (tokens from other frames do not move it).
    token_item = torch.arange(flat, device=device) // num_tokens
    same_item = (final // num_tokens) == token_item
    largest = torch.iinfo(torch.long).max
    first = torch.where(same_item, state.first_patch.reshape(flat), largest)
    order_key = torch.full((flat,), largest, device=device, dtype=torch.long)
    order_key.scatter_reduce_(0, final, first, reduce="amin")
    order_key = order_key.view(batch, num_tokens)
    kept_pos = torch.argsort(order_key, dim=1)[:, :kept]

    # Position of every kept token within its item's output; then the source map through the chains.
    new_position = torch.zeros(batch, num_tokens, dtype=torch.long, device=device)
    new_position.scatter_(1, kept_pos, torch.arange(kept, device=device).expand_as(kept_pos))
    old_item = (
        token_item.view(batch, num_tokens)[:, :1].expand_as(state.source)
        if state.source_item is None
        else state.source_item
    )
    covering = final[old_item * num_tokens + state.source]
    new_state = TokenState(
        sizes=new_sizes.view(batch, num_tokens).gather(1, kept_pos),
        source=new_position.view(flat)[covering],
        first_patch=order_key.gather(1, kept_pos),
        source_item=covering // num_tokens,
    )
    return _take_tokens(values.view(batch, num_tokens, channels), kept_pos), new_state


def temporal_merge_step(
    hidden: torch.Tensor,
    features: torch.Tensor,
    state: TokenState,
    remove: int,
    scoring: Scoring,
    frames: int,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, TokenState, torch.Tensor]:
    """One merging layer on video with temporal merging: decide (:func:`temporal_choice`), then apply.

    Args:
        hidden: ``[B, T, C]`` patch tokens, ``B / frames`` videos with their frames consecutive.
        features: ``[B, T, D]`` features the scores use.
        state: the carried sizes, source map and order keys.
        remove: r, tokens every frame removes (0 returns the inputs).
        scoring: the settings; ``temporal_weight`` > 0.
        frames: frames per video.
        importance: ``[B, T]`` attention received (mean 1 per item), needed when ``scoring.needs_attention``.

    Returns:
        ``[B, T - r, C]`` tokens, the new state (``protection_reduced`` as in the spatial step) and ``[B]`` how
        many tokens of each item folded into the previous frame.

    Example:
        >>> x = torch.randn(1, 8, 4).expand(3, 8, 4)  # one video, three identical frames
        >>> state = TokenState.start(3, 8, "cpu")
        >>> scoring = Scoring(w_div=0.0, ctr=0.0, temporal_weight=1.0)
        >>> out, state, moved = temporal_merge_step(x, x, state, 2, scoring, frames=3)
        >>> tuple(out.shape), moved.tolist(), state.sizes.sum().item()
        ((3, 6, 4), [0, 2, 2], 24.0)
    """
    if remove == 0:
        return hidden, state, torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
    choice = temporal_choice(features, remove, scoring, frames, importance)
    merged, new_state = temporal_merge(hidden, state, choice)
    new_state.protection_reduced = choice.reduced
    return merged, new_state, choice.temporal_counts
