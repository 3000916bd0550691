"""Fused CPU kernels for one merge step at small batches: the matching and the merge, each one compiled loop.

At batch 1 on a CPU a merge step is mostly the fixed price of its operator calls (about 60 of them, each a few
microseconds, and each re-reading its inputs from memory), not arithmetic (docs/engine-speed.md). These kernels do
the same arithmetic as the tensor code of :mod:`tuner.evoprune.merge`, which stays the reference and the path on
every other device, in two calls compiled with numba: :func:`match_kernel` (kNN distinctiveness, attention penalty,
CTR protection, best partners, the top ``r``) and :func:`merge_kernel` (sizes, order, size-weighted means, source
map, with the leading special tokens copied through, so no concatenation follows).

They serve float32 CPU tensors that need no gradient, when numba is installed and ``TUNER_CPU_KERNELS`` is not
``0``; :func:`enabled` says whether a call qualifies. Results equal the tensor code's: the same tokens merge into
the same destinations (the best partner is found as the maximum of ``(1 + cos) * exp(-penalty / w_sim)``, which
is ``exp`` of the tensor code's log score, so the two can differ only where two scores tie to the last bit), sizes
and source maps are identical, merged tokens agree to float32 rounding and tokens that take no part pass through
bit-identical. ``tests/test_cpu_kernels.py`` checks this against the tensor code on random inputs.

The first call of each kernel compiles it (a few seconds; cached on disk next to this module when the folder is
writable), which a timed run's warm-up absorbs.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

numba: Any
try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; without it the tensor code runs
    numba = None

# Set TUNER_CPU_KERNELS=0 to run the tensor code everywhere (to compare, or where numba misbehaves).
ENABLED = numba is not None and os.environ.get("TUNER_CPU_KERNELS", "1") != "0"


def enabled(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels serve these tensors: float32 on a CPU, no gradient needed, kernels enabled."""
    if not ENABLED:
        return False
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.dtype != torch.float32 or tensor.requires_grad:
            return False
    return True


def _njit(function: Any) -> Any:
    # nogil: other Python threads (a worker's heartbeat, a progress bar) run while a kernel works; no fastmath, so
    # that float operations keep the tensor code's rounding.
    return numba.njit(cache=True, nogil=True)(function) if numba is not None else function


def _njit_fast(function: Any) -> Any:
    return numba.njit(cache=True, nogil=True, fastmath=True)(function) if numba is not None else function


@_njit_fast
def _block_max(row, start, stop):  # type: ignore[no-untyped-def]  # pragma: no cover
    # fastmath lets the compiler vectorise this reduction; a maximum is exact in any order.
    largest = row[start]
    for j in range(start + 1, stop):
        largest = max(largest, row[j])
    return largest


@_njit
def _knn_penalty(cosine, knn_k, tau, w_div, top, squared, penalty):  # type: ignore[no-untyped-def]  # pragma: no cover
    """``penalty = w_div * (1 - mean_k exp(-d^2 / tau^2))`` over each row's K nearest tokens (diagonal excluded).

    Overwrites the diagonal of ``cosine`` (a token is not its own neighbour), as the tensor code does.
    """
    num_tokens = cosine.shape[0]
    k = min(knn_k, num_tokens - 1)
    # At least K blocks, so that K values reach the bound (the diagonal's -2 only where the bound is below it).
    block = max(1, num_tokens // k)
    for i in range(num_tokens):
        cosine[i, i] = -2.0
    for i in range(num_tokens):
        row = cosine[i]
        best = top[i]
        # A lower bound of the K-th largest cosine: the smallest of the maxima of the blocks (K distinct values
        # are at least that large). Only values from it up can be among the K largest, so few reach the insertion.
        bound = np.float32(np.inf)
        for start in range(0, num_tokens, block):
            bound = min(bound, _block_max(row, start, min(num_tokens, start + block)))
        # The K largest cosines of the row, kept sorted (descending): each candidate passes down the list, the
        # larger of each pair staying (minimum and maximum, no data-dependent branch to mispredict).
        for q in range(k):
            best[q] = -np.inf
        for j in range(num_tokens):
            value = row[j]
            if value >= bound:
                for q in range(k):
                    held = best[q]
                    best[q] = max(held, value)
                    value = min(held, value)
        for q in range(k):
            distance = (np.float32(1.0) - best[q]) * np.float32(2.0)
            squared[i * k + q] = distance if distance > 0 else np.float32(0.0)
    count = num_tokens * k
    if tau <= 0:
        # tau "auto": the lower median of the item's squared kNN distances, as torch.kthvalue((n + 1) // 2).
        middle = (count + 1) // 2 - 1
        median = np.partition(squared[:count], middle)[middle]
        divisor = -max(median, np.float32(1e-12))
        for i in range(num_tokens):
            total = np.float32(0.0)
            for q in range(k):
                total += np.exp(squared[i * k + q] / divisor)
            penalty[i] = (np.float32(1.0) - total / np.float32(k)) * np.float32(w_div)
    else:
        factor = np.float32(-1.0 / (tau * tau))
        for i in range(num_tokens):
            total = np.float32(0.0)
            for q in range(k):
                total += np.exp(squared[i * k + q] * factor)
            penalty[i] = (np.float32(1.0) - total / np.float32(k)) * np.float32(w_div)


@_njit
def _match_kernel(  # type: ignore[no-untyped-def]  # pragma: no cover
    cosine, importance, w_sim, w_div, w_attn, knn_k, tau, num_protect, protect_all, remove, src, dst, reduced
):
    batch, num_tokens, _ = cosine.shape
    num_a, num_b = (num_tokens + 1) // 2, num_tokens // 2
    penalty = np.zeros(num_tokens, np.float32)
    top = np.empty((num_tokens, max(1, min(knn_k, num_tokens - 1))), np.float32)
    squared = np.empty(top.size, np.float32)
    factor_b = np.empty(num_b, np.float32)
    best_score = np.empty(num_a, np.float32)
    best_partner = np.empty(num_a, np.int64)
    floor = np.float32(2e-6 - 1.0)  # 2 * _SIMILARITY_FLOOR - 1
    for item in range(batch):
        cos = cosine[item]
        penalty[:] = 0.0
        if w_div > 0:
            _knn_penalty(cos, knn_k, tau, w_div, top, squared, penalty)
        if w_attn > 0:
            for i in range(num_tokens):
                penalty[i] += importance[item, i] * np.float32(w_attn)
        reduced[item] = False
        if num_protect > 0:
            # Most important first, ties to the lower index (a stable sort of the negated importance).
            order = np.argsort(-importance[item], kind="mergesort")
            if protect_all:
                for q in range(num_protect):
                    penalty[order[q]] = np.inf
            else:
                count_b = 0
                for q in range(num_protect):
                    token = order[q]
                    if token % 2 == 1:
                        count_b += 1
                        keep = count_b < num_b
                    else:
                        keep = (q + 1) - count_b <= num_a - remove
                    if keep:
                        penalty[token] = np.inf
                    else:
                        reduced[item] = True
        # argmax_b of w_sim * log(1 + cos) - p_b is argmax_b of (1 + cos) * exp(-p_b / w_sim): one exp per B token
        # instead of a log per pair. The smallest finite penalty is taken out so the factors cannot underflow.
        lowest = np.inf
        for j in range(num_b):
            lowest = min(lowest, penalty[2 * j + 1])
        for j in range(num_b):
            excess = penalty[2 * j + 1] - lowest
            if w_sim > 0:
                factor_b[j] = np.exp(-excess / np.float32(w_sim))
            else:
                factor_b[j] = np.float32(1.0) if excess == 0 else np.float32(0.0)
        for a in range(num_a):
            row = cos[2 * a]
            score = np.float32(-1.0)
            partner = 0
            for j in range(num_b):
                value = row[2 * j + 1]
                if value < floor:
                    value = floor
                product = (np.float32(1.0) + value) * factor_b[j]
                if product > score:
                    score = product
                    partner = j
            if w_sim > 0:
                value = row[2 * partner + 1]
                if value < floor:
                    value = floor
                log_score = np.float32(np.log1p(value))
                if w_sim != 1.0:
                    log_score *= np.float32(w_sim)
            else:
                log_score = np.float32(0.0)
            best_score[a] = (log_score - penalty[2 * partner + 1]) - penalty[2 * a]
            best_partner[a] = partner
        order_a = np.argsort(-best_score, kind="mergesort")
        for q in range(remove):
            src[item, q] = order_a[q]
            dst[item, q] = best_partner[order_a[q]]


def match_kernel(
    cosine: torch.Tensor,
    importance: torch.Tensor | None,
    w_sim: float,
    w_div: float,
    w_attn: float,
    knn_k: int,
    tau: float | str,
    num_protect: int,
    protect_all: bool,
    remove: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The matching of :func:`tuner.evoprune.merge.match` from the cosine matrix, as ``(src, dst, reduced)``.

    Args:
        cosine: ``[B, T, T]`` float32 cosines of the L2-normalised features (contiguous).
        importance: ``[B, T]`` float32 attention importance (mean 1), or None where no term uses it.
        w_sim, w_div, w_attn, knn_k, tau: the scoring settings (:class:`tuner.evoprune.Scoring`).
        num_protect: ``N_protect`` of the CTR protection (0: none).
        protect_all: whether no cap can bind, so every candidate is protected.
        remove: r.

    Returns:
        ``src`` and ``dst`` ``[B, r]`` int64 as :func:`tuner.evoprune.merge.match` returns them, and the ``[B]``
        flags of the items whose protection a cap reduced.
    """
    batch, num_tokens, _ = cosine.shape
    src = torch.empty(batch, remove, dtype=torch.long)
    dst = torch.empty(batch, remove, dtype=torch.long)
    reduced = torch.empty(batch, dtype=torch.bool)
    if importance is None:
        importance = torch.zeros(batch, num_tokens, dtype=torch.float32)
    _match_kernel(
        cosine.contiguous().numpy(),
        importance.contiguous().numpy(),
        float(w_sim),
        float(w_div),
        float(w_attn),
        int(knn_k),
        -1.0 if tau == "auto" else float(tau),
        int(num_protect),
        bool(protect_all),
        int(remove),
        src.numpy(),
        dst.numpy(),
        reduced.numpy(),
    )
    return src, dst, reduced


@_njit
def _merge_kernel(  # type: ignore[no-untyped-def]  # pragma: no cover
    hidden, prefix, sizes, first_patch, source, src, dst, out, new_sizes, new_first, new_source
):
    batch, _, channels = hidden.shape
    num_tokens = sizes.shape[1]
    remove = src.shape[1]
    kept = num_tokens - remove
    grown = np.empty(num_tokens, np.float32)
    key = np.empty(num_tokens, np.int64)
    new_index = np.empty(num_tokens, np.int64)
    largest = np.iinfo(np.int64).max
    for item in range(batch):
        size = sizes[item]
        grown[:] = size
        key[:] = first_patch[item]
        for q in range(remove):
            a, b = 2 * src[item, q], 2 * dst[item, q] + 1
            grown[b] += size[a]
            key[b] = min(key[b], first_patch[item, a])
        for q in range(remove):
            key[2 * src[item, q]] = largest
        # Kept tokens in the order of the first patch they cover (distinct keys), merged A tokens last.
        order = np.argsort(key)
        for i in range(num_tokens):
            new_index[order[i]] = i
        for q in range(remove):
            new_index[2 * src[item, q]] = new_index[2 * dst[item, q] + 1]
        for i in range(kept):
            new_sizes[item, i] = grown[order[i]]
            new_first[item, i] = key[order[i]]
        for i in range(source.shape[1]):
            new_source[item, i] = new_index[source[item, i]]
        for i in range(prefix):
            out[item, i, :] = hidden[item, i, :]
        out[item, prefix:, :] = 0.0
        # In input order, as index_add_ adds: a token that takes no part is added to zero with weight exactly 1.
        for p in range(num_tokens):
            row = prefix + new_index[p]
            weight = size[p] / new_sizes[item, new_index[p]]
            for c in range(channels):
                out[item, row, c] += hidden[item, prefix + p, c] * weight


def merge_kernel(
    hidden: torch.Tensor,
    prefix: int,
    sizes: torch.Tensor,
    first_patch: torch.Tensor,
    source: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`tuner.evoprune.merge.merge` on tokens that may start with ``prefix`` special tokens (copied through).

    Args:
        hidden: ``[B, prefix + T, C]`` float32 tokens.
        prefix: leading tokens that pass through unchanged (CLS).
        sizes, first_patch, source: the :class:`tuner.evoprune.merge.TokenState` of the ``T`` patch tokens.
        src, dst: ``[B, r]`` as :func:`tuner.evoprune.merge.match` returns them.

    Returns:
        ``(tokens [B, prefix + T - r, C], sizes, first_patch, source)`` of the merged tokens.
    """
    batch, length, channels = hidden.shape
    kept = length - prefix - src.shape[1]
    out = torch.empty(batch, prefix + kept, channels, dtype=hidden.dtype)
    new_sizes = torch.empty(batch, kept, dtype=torch.float32)
    new_first = torch.empty(batch, kept, dtype=torch.long)
    new_source = torch.empty(source.shape, dtype=torch.long)
    _merge_kernel(
        hidden.contiguous().numpy(),
        int(prefix),
        sizes.contiguous().numpy(),
        first_patch.contiguous().numpy(),
        source.contiguous().numpy(),
        src.contiguous().numpy(),
        dst.contiguous().numpy(),
        out.numpy(),
        new_sizes.numpy(),
        new_first.numpy(),
        new_source.numpy(),
    )
    return out, new_sizes, new_first, new_source
