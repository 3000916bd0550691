"""One EvoPrune merge step: score-guided bipartite matching with size-weighted merging.

Pure tensor code with no model knowledge (docs/method.md, sections 3 and 4). Every function works on the *patch*
tokens of one layer for a batch of items; each item is matched and merged on its own, so an item's result never
depends on the other items of the batch. The caller keeps CLS (or any other special token) out of these tensors.

Shapes: ``B`` items, ``T`` patch tokens, ``C`` channels, ``D`` feature channels, ``N0`` original patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

import torch
import torch.nn.functional as F

from tuner.evoprune import cpu_kernels
from tuner.evoprune.scoring import Scoring

# (1 + cos) / 2 is 0 for opposite tokens; the floor keeps log() finite so that w_sim * log(.) never meets 0 * -inf.
_SIMILARITY_FLOOR = 1e-6


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision and float32 inputs, float64 for float64 ones (scores, means and statistics)."""
    # A Python comparison, not torch.promote_types: that is an operator call, and a merge step is mostly per-op
    # overhead at batch 1 on a CPU.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)`` without an operator call when it already has that dtype."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


@dataclass
class TokenState:
    """What the merge steps of one forward carry from layer to layer, for the patch tokens only.

    Attributes:
        sizes: ``[B, T]`` float32, how many original patches each token stands for (1 at the start).
        source: ``[B, N0]`` int64, for every original patch the index of the token that now covers it.
        first_patch: ``[B, T]`` int64, the smallest original patch index a token covers; it orders the tokens.
            It could be derived from ``source`` but carrying it costs one gather per step instead of a scatter.
        source_item: ``[B, N0]`` int64 or None: for every original patch the batch item whose token covers it. None
            (the default, and always on images) means the patch's own item; temporal merging
            (:mod:`tuner.evoprune.temporal`) folds tokens into the previous frame's item and sets it.
        protection_reduced: ``[B]`` bool, set by :func:`merge_step` on the state it returns: for each item, whether
            that step protected fewer tokens than the method's ``N_protect`` so that it could remove exactly r
            (see :func:`protected_tokens`); None when the step protected nothing (CTR 0), when no item's protection
            could be reduced at this token count, or when no step made this state.
    """

    sizes: torch.Tensor
    source: torch.Tensor
    first_patch: torch.Tensor
    protection_reduced: torch.Tensor | None = None
    source_item: torch.Tensor | None = None

    @classmethod
    def start(cls, batch_size: int, num_patches: int, device: torch.device | str) -> TokenState:
        """The state before any merge: every token is one patch."""
        index = torch.arange(num_patches, device=device).expand(batch_size, num_patches).contiguous()
        sizes = torch.ones(batch_size, num_patches, device=device, dtype=torch.float32)
        return cls(sizes=sizes, source=index, first_patch=index.clone())

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.shape[1])


def attention_received(attention_probs: torch.Tensor, special_tokens: int = 0) -> torch.Tensor:
    """Attention each patch token *receives*: the column mean of the softmax matrix, averaged over heads.

    The paper prints the row mean, which is constantly ``1 / N`` because softmax rows sum to 1 (docs/method.md, 4).
    Every query counts (a CLS query too); the result covers the patch tokens only and is normalised over them
    (:func:`patch_importance`), so its mean is 1 whatever share of the attention the special tokens take.

    Args:
        attention_probs: ``[B, H, N, N]`` softmax probabilities (queries on dim 2, keys on dim 3).
        special_tokens: leading tokens that are not patches (1 for CLIP's CLS, 0 for SigLIP).

    Returns:
        ``[B, N - special_tokens]`` float32 (float64 for float64 input), mean 1 over the patch tokens of each item.

    Example:
        >>> probs = torch.softmax(torch.randn(1, 2, 5, 5), dim=-1)
        >>> round(attention_received(probs).mean().item(), 4)
        1.0
        >>> patches = attention_received(probs, special_tokens=1)
        >>> tuple(patches.shape), round(patches.mean().item(), 4)
        ((1, 4), 1.0)
    """
    # Reduce with a float32 accumulator instead of copying the whole [B, H, N, N] matrix to float32.
    received = attention_probs.sum(dim=(1, 2), dtype=_accumulation_dtype(attention_probs.dtype))
    return patch_importance(received, special_tokens)


def patch_importance(received: torch.Tensor, special_tokens: int = 0) -> torch.Tensor:
    """The importance ``s~`` of docs/method.md (section 4): attention received, normalised to mean 1 over patches.

    ``s~_i = T * s_i / sum_{j in patches} s_j`` over the ``T`` patch tokens, so the special tokens (CLS) neither count
    nor shift the scale: the ``w_attn`` term weighs the same on a model with and without CLS.

    Args:
        received: ``[B, N]`` attention received by every token, in any positive scale (column sums or means).
        special_tokens: leading tokens to leave out.

    Returns:
        ``[B, N - special_tokens]`` in the accumulation dtype (float32, or float64 for float64 input).
    """
    patches = _as_dtype(received[:, special_tokens:], _accumulation_dtype(received.dtype))
    total = patches.sum(dim=1, keepdim=True).clamp_min_(torch.finfo(patches.dtype).tiny)
    return patches * (patches.shape[1] / total)


def knn_distinctiveness(
    cosine: torch.Tensor, knn_k: int, tau: float | str = "auto"
) -> torch.Tensor:
    """Local distinctiveness ``d_i = 1 - mean_k exp(-||v_i - v_k||^2 / tau^2)`` over the K nearest neighbours.

    Uses the cosine matrix of L2-normalised features, where ``||u - v||^2 = 2 - 2 cos(u, v)``, so the similarity
    matrix of the step serves both terms.

    Args:
        cosine: ``[B, T, T]`` cosine similarities between the tokens of each item.
        knn_k: K; capped at ``T - 1``.
        tau: a positive number, or ``"auto"`` for the median kNN distance of each item.

    Returns:
        ``[B, T]`` float32 (float64 for float64 input) in [0, 1); high means a unique token.
    """
    # A float32 copy (one copy also for half precision input): the computation overwrites its diagonal.
    return _knn_distinctiveness(cosine.to(_accumulation_dtype(cosine.dtype), copy=True), knn_k, tau)


def _knn_distinctiveness(cosine: torch.Tensor, knn_k: int, tau: float | str) -> torch.Tensor:
    """:func:`knn_distinctiveness` on a float32/64 cosine matrix it may overwrite (its diagonal)."""
    num_tokens = cosine.shape[-1]
    k = min(knn_k, num_tokens - 1)
    if k < 1:
        return torch.zeros(cosine.shape[:2], device=cosine.device, dtype=cosine.dtype)
    # A token is not its own neighbour: its cosine goes below any other (-1 .. 1). The neighbours' order does not
    # matter (only their values are used), so topk need not sort them.
    cosine.diagonal(dim1=1, dim2=2).fill_(-2.0)
    neighbour_cos = cosine.topk(k, dim=-1, sorted=False).values
    squared_distance = (1.0 - neighbour_cos).mul_(2.0).clamp_min_(0.0)
    if tau == "auto":
        # Per item, so that an item's result never depends on the others in its batch. The median distance is the
        # square root of the median squared distance (a monotone map; the lower median picks the same element).
        flat = squared_distance.flatten(1)
        median = flat.kthvalue((flat.shape[1] + 1) // 2, dim=1).values
        kernel = torch.exp(squared_distance / median.clamp_min(1e-12).neg_().view(-1, 1, 1))
    else:
        kernel = torch.exp(squared_distance * (-1.0 / float(tau) ** 2))
    return 1.0 - kernel.mean(dim=-1)


def protect_count(ctr: float, num_tokens: int, remove: int) -> int:
    """The method's ``N_protect = min(round(ctr * T), T - 2 r)``, rounded half up (0.25 * 6 = 1.5 protects 2).

    Example:
        >>> protect_count(0.25, 6, 1), protect_count(0.25, 576, 100), protect_count(0.15, 10, 1)
        (2, 144, 2)
    """
    # Decimal of the shortest repr, so that e.g. 0.35 * 10 is 3.5 (rounds to 4), not 3.4999999999999996.
    wanted = int((Decimal(repr(float(ctr))) * num_tokens).to_integral_value(rounding=ROUND_HALF_UP))
    return max(0, min(wanted, num_tokens - 2 * remove))


def protected_tokens(importance: torch.Tensor, ctr: float, remove: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The CTR hard protection: which tokens of set A and set B may neither merge nor receive.

    The top ``N_protect = min(round(ctr * T), T - 2 r)`` tokens by attention received are protected (docs/method.md, 4;
    :func:`protect_count`, rounded half up). So that the step always removes exactly ``r`` tokens (every item of a
    batch keeps the same length), protection inside A is further capped at ``|A| - r`` tokens and inside B at
    ``|B| - 1``, dropping the least important protected ones. That cap is a deviation from the method: the step
    reports, per item, whether it applied (:attr:`TokenState.protection_reduced`; ``EvoPruneHandle.ctr_reductions``
    counts the items per layer).

    Args:
        importance: ``[B, T]`` attention received by each patch token.
        ctr: share of tokens to protect, in [0, 1).
        remove: r, the number of tokens this step removes.

    Returns:
        ``(protected_a, protected_b)``: bool masks ``[B, |A|]`` and ``[B, |B|]``.
    """
    mask = torch.zeros(importance.shape, dtype=torch.bool, device=importance.device)
    protection = _protection(importance, ctr, remove)
    if protection is not None:
        candidates, keep, _ = protection
        mask.scatter_(1, candidates, True if keep is None else keep)
    return mask[:, 0::2], mask[:, 1::2]


def _caps_cannot_bind(num_protect: int, num_tokens: int, remove: int) -> bool:
    """Whether neither CTR cap (``|A| - r`` in A, ``|B| - 1`` in B) can bind, whichever sets the ``num_protect``
    candidates fall in (the usual case: r below about T / 4 at CTR 0.25)."""
    return num_protect <= min(num_tokens // 2 - 1, (num_tokens + 1) // 2 - remove)


def _protection(
    importance: torch.Tensor, ctr: float, remove: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """:func:`protected_tokens` as ``(candidates, keep, reduced)``; None when nothing is protected.

    ``candidates`` ``[B, N_protect]`` are the most important tokens, ``keep`` (same shape, bool) which of them stay
    protected under the caps, and ``reduced`` ``[B]`` the items where a cap dropped one. Where no cap can bind at
    this token count, ``keep`` and ``reduced`` are None: every candidate is protected.
    """
    num_tokens = importance.shape[1]
    num_a, num_b = (num_tokens + 1) // 2, num_tokens // 2
    num_protect = protect_count(ctr, num_tokens, remove)
    if num_protect == 0:
        return None
    # The candidates, most important first (ties to the lower index).
    candidates = torch.argsort(importance, dim=1, descending=True, stable=True)[:, :num_protect]
    if _caps_cannot_bind(num_protect, num_tokens, remove):
        # No item's protection is reduced: skip the walk, which is most of this function's operators.
        return candidates, None, None
    # Walking the candidates in order, a token is kept protected while its own set is under its cap: B while fewer
    # than |B| - 1 B tokens came before it, A while fewer than |A| - r A tokens did (at walk position j, j - count_b
    # A tokens came before).
    in_b = candidates.remainder(2)
    count_b = in_b.cumsum(dim=1)
    walked = torch.arange(1, num_protect + 1, device=importance.device)
    keep = torch.where(in_b.bool(), count_b < num_b, walked - count_b <= num_a - remove)
    # Flags stay on the device (no host synchronisation); whoever reports them reads them once, after the forward.
    return candidates, keep, ~keep.all(dim=1)


def match(
    features: torch.Tensor,
    remove: int,
    scoring: Scoring,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose which A tokens fold into which B tokens (bipartite matching on the EvoPrune score).

    Set A holds patch tokens 0, 2, 4, ..., set B tokens 1, 3, 5, ... Each A token picks its best B partner under
    ``log Score``; the ``remove`` A tokens with the highest best score are merged.

    Args:
        features: ``[B, T, D]`` token features (keys averaged over heads, or hidden states).
        remove: r, at most ``T // 2``.
        scoring: the weights, CTR and kNN settings.
        importance: ``[B, T]`` attention received (mean 1 over the patch tokens, :func:`patch_importance`); required
            when ``scoring.needs_attention``.

    Returns:
        ``(src, dst)``: ``[B, r]`` indices into A of the tokens that merge, and ``[B, r]`` indices into B of
        the tokens they merge into. ``src`` is ordered by decreasing score.
    """
    src, dst, _ = _match(features, remove, scoring, importance)
    return src, dst


def _match(
    features: torch.Tensor,
    remove: int,
    scoring: Scoring,
    importance: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`match`, also returning the ``[B]`` flags of the items whose CTR protection was reduced (None: no
    protection in this step)."""
    if _fused(features, importance):
        return _fused_match(features, remove, scoring, importance)
    scores = spatial_scores(features, remove, scoring, importance)
    order = torch.argsort(scores.best_score, dim=-1, descending=True, stable=True)
    src = order[:, :remove]
    dst = scores.best_partner.gather(1, src)
    return src, dst, scores.reduced


def _fused(features: torch.Tensor, importance: torch.Tensor | None) -> bool:
    """Whether a step on these tensors runs the fused CPU kernels (:mod:`tuner.evoprune.cpu_kernels`)."""
    return cpu_kernels.enabled(features) and (importance is None or cpu_kernels.enabled(importance))


def _check_remove(num_tokens: int, remove: int) -> None:
    if not 0 < remove <= num_tokens // 2:
        raise ValueError(f"a merge step can remove 1..{num_tokens // 2} of {num_tokens} tokens, asked for {remove}")


def _fused_match(
    features: torch.Tensor, remove: int, scoring: Scoring, importance: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`_match` by :func:`tuner.evoprune.cpu_kernels.match_kernel`: the cosines here, the rest in one call."""
    num_tokens = features.shape[1]
    _check_remove(num_tokens, remove)
    if scoring.needs_attention and importance is None:
        raise ValueError("these scoring settings need the attention received by each token")
    normed = F.normalize(features, dim=-1)  # float32 already: the kernels serve nothing else
    cosine = normed @ normed.transpose(1, 2)
    num_protect, protect_all = 0, True
    if scoring.needs_attention and scoring.ctr > 0:
        num_protect = protect_count(scoring.ctr, num_tokens, remove)
        # As _protection: where neither cap can bind, every candidate is protected and nothing is reported.
        protect_all = _caps_cannot_bind(num_protect, num_tokens, remove)
    src, dst, reduced = cpu_kernels.match_kernel(
        cosine,
        importance if scoring.needs_attention else None,
        scoring.w_sim,
        scoring.w_div,
        scoring.w_attn,
        scoring.knn_k,
        scoring.tau,
        num_protect,
        protect_all,
        remove,
    )
    return src, dst, None if num_protect == 0 or protect_all else reduced


@dataclass
class SpatialScores:
    """What the spatial matching of one step computes, before the top ``r`` are picked (for the temporal step).

    Attributes:
        best_score: ``[B, |A|]`` each A token's best ``log Score`` over set B, its own penalty included
            (``-inf`` for a protected token).
        best_partner: ``[B, |A|]`` index into B of that partner.
        normed: ``[B, T, D]`` the L2-normalised features (accumulation dtype).
        penalty: ``[B, T]`` each token's penalty ``w_div * d + w_attn * s~`` (``+inf`` if protected); None when
            no term applies.
        reduced: ``[B]`` flags of the items whose CTR protection was reduced; None without protection or
            where no reduction was possible.
    """

    best_score: torch.Tensor
    best_partner: torch.Tensor
    normed: torch.Tensor
    penalty: torch.Tensor | None
    reduced: torch.Tensor | None


def spatial_scores(
    features: torch.Tensor,
    remove: int,
    scoring: Scoring,
    importance: torch.Tensor | None,
) -> SpatialScores:
    """Score every A token's best B partner (the part of :func:`match` before the top ``r`` are chosen).

    Args:
        features: ``[B, T, D]`` token features.
        remove: r, at most ``T // 2`` (it bounds the CTR protection).
        scoring: the weights, CTR and kNN settings.
        importance: ``[B, T]`` attention received (mean 1), required when ``scoring.needs_attention``.

    Returns:
        The scores, partners, normalised features and penalties (:class:`SpatialScores`).
    """
    _check_remove(features.shape[1], remove)
    compute_dtype = _accumulation_dtype(features.dtype)
    normed = F.normalize(_as_dtype(features, compute_dtype), dim=-1)
    if scoring.w_div > 0:
        cosine = normed @ normed.transpose(1, 2)
        cosine_ab = cosine[:, 0::2, 1::2]
    else:
        cosine_ab = normed[:, 0::2] @ normed[:, 1::2].transpose(1, 2)

    # log((1 + cos) / 2) without its constant -log 2, which shifts every score alike and so changes no choice.
    if scoring.w_sim > 0:
        log_score = cosine_ab.clamp_min(2.0 * _SIMILARITY_FLOOR - 1.0).log1p_()
        if scoring.w_sim != 1.0:
            log_score.mul_(scoring.w_sim)
    else:
        log_score = torch.zeros(cosine_ab.shape, device=features.device, dtype=compute_dtype)

    # Penalties of one token: w_div * d + w_attn * s~, and +inf for a CTR-protected token (so that it neither merges
    # nor receives). The A token's part does not change its choice of partner, so it is added after the argmax; the
    # B token's part before.
    penalty: torch.Tensor | None = None
    reduced: torch.Tensor | None = None
    if scoring.w_div > 0:
        # The log score above no longer needs the cosine matrix, so the kNN term may overwrite its diagonal.
        penalty = _knn_distinctiveness(cosine, scoring.knn_k, scoring.tau).mul_(scoring.w_div)
    if scoring.needs_attention:
        if importance is None:
            raise ValueError("these scoring settings need the attention received by each token")
        if scoring.w_attn > 0:
            attention_penalty = _as_dtype(importance, compute_dtype) * scoring.w_attn
            penalty = attention_penalty if penalty is None else penalty.add_(attention_penalty)
        protection = _protection(importance, scoring.ctr, remove) if scoring.ctr > 0 else None
        if protection is not None:
            candidates, keep, reduced = protection
            # +inf written in, not multiplied: a negative log score times -inf would be +inf.
            if penalty is None:
                penalty = torch.zeros(importance.shape, device=importance.device, dtype=compute_dtype)
            if keep is None:
                penalty = penalty.scatter_(1, candidates, float("inf"))
            else:
                protected = torch.zeros(importance.shape, dtype=torch.bool, device=importance.device)
                penalty = penalty.masked_fill_(protected.scatter_(1, candidates, keep), float("inf"))

    if penalty is not None:
        log_score = log_score.sub_(penalty[:, None, 1::2])
    best_score, best_partner = log_score.max(dim=-1)
    if penalty is not None:
        best_score = best_score.sub_(penalty[:, 0::2])
    return SpatialScores(best_score, best_partner, normed, penalty, reduced)


def _flat_rows(index: torch.Tensor, length: int) -> torch.Tensor:
    """Row numbers in a ``[B * length, ...]`` view of per-item indices ``[B, K]``, flattened."""
    if index.shape[0] == 1:
        return index.reshape(-1)
    offsets = torch.arange(index.shape[0], device=index.device)[:, None] * length
    return (index + offsets).flatten()


def _take_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tokens[b, index[b]]`` for every item: ``[B, T, C]`` and ``[B, K]`` give ``[B, K, C]``.

    One index_select on the flattened batch: on a CPU it is about ten times faster than ``gather`` with an index
    expanded over the channels, which matters for small encoders where a merge step competes with tiny layers.
    """
    batch, length, channels = tokens.shape
    rows = tokens.reshape(batch * length, channels).index_select(0, _flat_rows(index, length))
    return rows.view(batch, index.shape[1], channels)


def _inverse_permutation(order: torch.Tensor, scatter: bool) -> torch.Tensor:
    """``[B, T]`` inverse of the per-item permutations ``order``: ``result[b, order[b, i]] = i``.

    One argsort on a CPU (a single operator, faster there than the scatter's three); on a GPU an argsort is a
    segmented sort of several kernels, so there (``scatter``) the ranks are scattered instead. Same result.
    """
    if not scatter:
        return torch.argsort(order, dim=1)
    batch, length = order.shape
    ranks = torch.arange(length, device=order.device).expand(batch, length)
    return torch.empty_like(order).scatter_(1, order, ranks)


def merge(
    hidden: torch.Tensor, state: TokenState, src: torch.Tensor, dst: torch.Tensor
) -> tuple[torch.Tensor, TokenState]:
    """Fold the A tokens ``src`` into the B tokens ``dst`` by size-weighted mean; keep the original order.

    ``b <- (size_b * b + sum size_i * a_i) / (size_b + sum size_i)``; sizes add up. Tokens that take no part pass
    through bit-identical. The remaining tokens are ordered by the smallest original patch they cover.

    Args:
        hidden: ``[B, T, C]`` patch tokens.
        state: sizes, source map and order keys of these tokens.
        src: ``[B, r]`` indices into A (even positions) of the tokens that merge.
        dst: ``[B, r]`` indices into B (odd positions) of the tokens they merge into.

    Returns:
        The ``[B, T - r, C]`` merged tokens and the updated state.
    """
    return _merge(hidden, state, src, dst, 0)


def _merge(
    hidden: torch.Tensor, state: TokenState, src: torch.Tensor, dst: torch.Tensor, prefix: int
) -> tuple[torch.Tensor, TokenState]:
    """:func:`merge` on ``[B, prefix + T, C]`` tokens whose first ``prefix`` (CLS) pass through unchanged."""
    if state.source_item is not None:
        raise ValueError("this state went through temporal merging; merge it with tuner.evoprune.temporal")
    if cpu_kernels.enabled(hidden):
        tokens, sizes, first_patch, source = cpu_kernels.merge_kernel(
            hidden, prefix, state.sizes, state.first_patch, state.source, src, dst
        )
        return tokens, TokenState(sizes=sizes, source=source, first_patch=first_patch)
    if prefix == 0:
        return _merge_tensors(hidden, state, src, dst)
    patches, new_state = _merge_tensors(hidden[:, prefix:], state, src, dst)
    return torch.cat([hidden[:, :prefix], patches], dim=1), new_state


def _merge_tensors(
    hidden: torch.Tensor, state: TokenState, src: torch.Tensor, dst: torch.Tensor
) -> tuple[torch.Tensor, TokenState]:
    """:func:`merge` in tensor operations (every device; the reference of the fused CPU kernel)."""
    batch, num_tokens, channels = hidden.shape
    remove = src.shape[1]
    kept = num_tokens - remove
    device = hidden.device
    src_pos, dst_pos = src * 2, (dst * 2).add_(1)

    # Sizes add up: the new size of every token (A tokens that merge away keep theirs, unused).
    src_sizes = state.sizes.gather(1, src_pos)
    sizes = state.sizes.scatter_add(1, dst_pos, src_sizes)

    # Order key: the first patch each token covers, merged A tokens last. (A sort key rather than nonzero(): no host
    # synchronisation on a GPU.)
    order_key = state.first_patch.clone()
    order_key[:, 1::2].scatter_reduce_(1, dst, state.first_patch.gather(1, src_pos), reduce="amin")
    order_key.scatter_(1, src_pos, torch.iinfo(torch.long).max)
    sorted_key, order = torch.sort(order_key, dim=1)
    kept_pos = order[:, :kept]

    # new_index[b, p]: the output token that input position p ends up in: its rank in the order (merged A tokens
    # rank last, at kept and beyond), and for a merged A token its destination's.
    new_index = _inverse_permutation(order, scatter=order.is_cuda)
    new_index.scatter_(1, src_pos, new_index.gather(1, dst_pos))

    # One weighted sum into the output tokens: each input token weighs its size over its output token's size. A
    # token that takes no part weighs exactly 1.0 (size / same size) and is added to zero, so it passes through
    # bit-identical; a destination gets the size-weighted mean of its group. One index_add instead of separate
    # gathers for sources, destinations and the tokens that pass: at batch 1 on a CPU a merge step costs mostly
    # per-operator overhead (docs/engine-speed.md). Sums in float32 (float64 for float64 tokens): sizes reach
    # hundreds and fp16 would overflow.
    new_sizes = sizes.gather(1, kept_pos)
    sum_dtype = _accumulation_dtype(hidden.dtype)
    weight = _as_dtype(state.sizes, sum_dtype) / _as_dtype(new_sizes.gather(1, new_index), sum_dtype)
    merged = torch.zeros(batch * kept, channels, device=device, dtype=sum_dtype)
    weighted = _as_dtype(hidden, sum_dtype).mul(weight[..., None])
    merged.index_add_(0, _flat_rows(new_index, kept), weighted.reshape(-1, channels))
    new_state = TokenState(
        sizes=new_sizes,
        source=new_index.gather(1, state.source),
        first_patch=sorted_key[:, :kept],
    )
    merged = _as_dtype(merged.view(batch, kept, channels), hidden.dtype)
    return merged, new_state


def merge_step(
    hidden: torch.Tensor,
    features: torch.Tensor,
    state: TokenState,
    remove: int,
    scoring: Scoring,
    importance: torch.Tensor | None = None,
    prefix_tokens: int = 0,
) -> tuple[torch.Tensor, TokenState]:
    """Score, match and merge: one EvoPrune step on the patch tokens of a batch.

    Args:
        hidden: ``[B, P + T, C]`` tokens: ``P = prefix_tokens`` special tokens, then the patch tokens to merge.
        features: ``[B, P + T, D]`` features the similarity and kNN terms use (the prefix's are ignored).
        state: the carried sizes, source map and order keys.
        remove: r, how many tokens this step removes (0 returns the inputs).
        scoring: the scoring settings.
        importance: ``[B, T]`` attention received (mean 1 over the patch tokens), needed when
            ``scoring.needs_attention``.
        prefix_tokens: leading tokens that are not patches (CLIP's CLS): they pass through unchanged, first.

    Returns:
        ``[B, P + T - r, C]`` tokens and the new state; its ``protection_reduced`` flags the items whose CTR protection
        this step had to reduce (None when it protected nothing).

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> x = torch.randn(2, 8, 4)
        >>> state = TokenState.start(2, 8, "cpu")
        >>> out, state = merge_step(x, x, state, 3, Scoring(w_div=0.0, ctr=0.0))
        >>> tuple(out.shape), state.sizes.sum(dim=1).tolist()
        ((2, 5, 4), [8.0, 8.0])
    """
    if remove == 0:
        return hidden, state
    patch_features = features[:, prefix_tokens:] if prefix_tokens else features
    src, dst, reduced = _match(patch_features, remove, scoring, importance)
    merged, new_state = _merge(hidden, state, src, dst, prefix_tokens)
    new_state.protection_reduced = reduced
    return merged, new_state
