"""The merge step against plain loop references: EvoPrune's score, ToMe's matching, sizes, order, protection."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from tuner.evoprune import Scoring, TokenState, attention_received, knn_distinctiveness, match, merge, merge_step
from tuner.evoprune.merge import _inverse_permutation, patch_importance, protect_count, protected_tokens

# Every test twice: with the fused CPU kernels of a merge step and with the tensor code (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("merge_path")

# ---------------------------------------------------------------------------------------------------------------
# Plain reference: one item at a time, Python loops, written from docs/method.md (sections 3 and 4).
# ---------------------------------------------------------------------------------------------------------------


def _cos(u: torch.Tensor, v: torch.Tensor) -> float:
    return float((u @ v) / (u.norm() * v.norm()))


def reference_step(
    hidden: torch.Tensor,
    features: torch.Tensor,
    sizes: list[float],
    first_patch: list[int],
    remove: int,
    scoring: Scoring,
    importance: list[float] | None,
) -> tuple[list[torch.Tensor], list[float], list[int], list[int], bool]:
    """Returns the merged tokens, their sizes, their first patches, for each input token its output index, and
    whether the protection had to be cut below N_protect so that r tokens could go."""
    n = hidden.shape[0]
    a_idx = list(range(0, n, 2))
    b_idx = list(range(1, n, 2))
    cos = [[_cos(features[i], features[j]) for j in range(n)] for i in range(n)]

    # Diversity: K nearest neighbours by squared distance 2 - 2 cos, tau the median kNN distance.
    k = min(scoring.knn_k, n - 1)
    neighbour_d2 = []
    for i in range(n):
        others = sorted((cos[i][j] for j in range(n) if j != i), reverse=True)[:k]
        neighbour_d2.append([max(0.0, 2 - 2 * c) for c in others])
    if scoring.tau == "auto":
        flat = sorted(math.sqrt(d) for row in neighbour_d2 for d in row)
        tau = flat[(len(flat) - 1) // 2]  # torch.median returns the lower middle value
    else:
        tau = float(scoring.tau)
    distinct = [1 - sum(math.exp(-d / (tau * tau)) for d in row) / len(row) for row in neighbour_d2]

    protected: set[int] = set()
    n_protect = 0
    if scoring.ctr > 0:
        assert importance is not None
        # round(ctr * T), half up (docs/method.md, 4), capped at T - 2 r.
        n_protect = max(0, min(math.floor(Fraction(repr(scoring.ctr)) * n + Fraction(1, 2)), n - 2 * remove))
        by_importance = sorted(range(n), key=lambda t: (-importance[t], t))
        top = set(by_importance[:n_protect])
        for members, limit in ((a_idx, len(a_idx) - remove), (b_idx, len(b_idx) - 1)):
            in_set = [t for t in sorted(members, key=lambda t: (-importance[t], t)) if t in top]
            protected.update(in_set[: max(limit, 0)])

    def log_score(i: int, j: int) -> float:
        value = 0.0
        if scoring.w_sim > 0:
            value += scoring.w_sim * math.log(max((1 + cos[i][j]) / 2, 1e-6))
        if scoring.w_div > 0:
            value -= scoring.w_div * (distinct[i] + distinct[j])
        if scoring.w_attn > 0:
            assert importance is not None
            value -= scoring.w_attn * (importance[i] + importance[j])
        return value

    best = []
    for i in a_idx:
        candidates = [(log_score(i, j), j) for j in b_idx if j not in protected]
        score, partner = max(candidates, key=lambda c: (c[0], -c[1]))
        best.append((-math.inf if i in protected else score, i, partner))
    chosen = sorted(best, key=lambda e: (-e[0], e[1]))[:remove]

    values = {t: hidden[t].double() * sizes[t] for t in range(n)}
    total = {t: float(sizes[t]) for t in range(n)}
    first = {t: first_patch[t] for t in range(n)}
    goes_to = {t: t for t in range(n)}
    for _, i, j in chosen:
        values[j] = values[j] + values[i]
        total[j] += total[i]
        first[j] = min(first[j], first[i])
        goes_to[i] = j
    kept = sorted((t for t in range(n) if goes_to[t] == t), key=lambda t: first[t])
    position = {t: p for p, t in enumerate(kept)}
    out = [(values[t] / total[t]).float() for t in kept]
    reduced = len(protected) < n_protect
    return out, [total[t] for t in kept], [first[t] for t in kept], [position[goes_to[t]] for t in range(n)], reduced


SETTINGS = [
    Scoring(w_sim=1.0, w_div=0.0, w_attn=0.0, ctr=0.0),
    Scoring(w_sim=1.0, w_div=0.5, w_attn=0.0, ctr=0.25),
    Scoring(w_sim=1.0, w_div=0.7, w_attn=0.3, ctr=0.2, knn_k=3),
    Scoring(w_sim=0.5, w_div=1.0, w_attn=1.0, ctr=0.0, tau=0.8),
    Scoring(w_sim=0.0, w_div=1.0, w_attn=0.5, ctr=0.3),
    Scoring(w_sim=2.0, w_div=0.0, w_attn=0.0, ctr=0.4, knn_k=1),
]


@pytest.mark.parametrize("scoring", SETTINGS, ids=lambda s: f"sim{s.w_sim}-div{s.w_div}-attn{s.w_attn}-ctr{s.ctr}")
@pytest.mark.parametrize("num_tokens,steps", [(16, [5, 3, 2]), (15, [7, 2]), (24, [12, 1, 4])])
def test_merge_steps_equal_loop_reference(scoring: Scoring, num_tokens: int, steps: list[int]) -> None:
    generator = torch.Generator().manual_seed(num_tokens + len(steps))
    batch, channels = 3, 6
    hidden = torch.randn(batch, num_tokens, channels, generator=generator)
    state = TokenState.start(batch, num_tokens, "cpu")
    ref_sizes = [[1.0] * num_tokens for _ in range(batch)]
    ref_first = [list(range(num_tokens)) for _ in range(batch)]
    ref_source = [list(range(num_tokens)) for _ in range(batch)]
    ref_hidden = [hidden[b] for b in range(batch)]
    for remove in steps:
        features = torch.randn(batch, hidden.shape[1], 4, generator=generator)
        importance = torch.rand(batch, hidden.shape[1], generator=generator) * 2
        hidden, state = merge_step(hidden, features, state, remove, scoring, importance)
        ref_reduced = []
        for b in range(batch):
            out, sizes, first, position, reduced = reference_step(
                ref_hidden[b], features[b], ref_sizes[b], ref_first[b], remove, scoring, importance[b].tolist()
            )
            ref_reduced.append(reduced)
            ref_hidden[b] = torch.stack(out)
            ref_sizes[b], ref_first[b] = sizes, first
            ref_source[b] = [position[t] for t in ref_source[b]]
        expected = torch.stack(ref_hidden)
        torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
        flags = state.protection_reduced
        assert (flags.tolist() if flags is not None else [False] * batch) == ref_reduced
        assert state.sizes.tolist() == ref_sizes
        assert state.first_patch.tolist() == ref_first
        assert state.source.tolist() == ref_source
        # Sizes always sum to the original patch count; each token's size is the number of patches it covers.
        assert torch.all(state.sizes.sum(dim=1) == num_tokens)
        for b in range(batch):
            counts = torch.bincount(state.source[b], minlength=hidden.shape[1]).float()
            assert torch.equal(counts, state.sizes[b])
        # Original order kept: first patches increase along the sequence.
        assert torch.all(state.first_patch[:, 1:] > state.first_patch[:, :-1])


def tome_bipartite_soft_matching(metric: torch.Tensor, x: torch.Tensor, size: torch.Tensor, r: int):
    """ToMe's merge (facebookresearch/ToMe, tome/merge.py) for a model without class token, with merge_wavg and
    source tracking, transcribed: returns per-item token values and sizes in ToMe's order, and the source matrix."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge_fn(t: torch.Tensor, mode: str) -> torch.Tensor:
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    x = merge_fn(x * size, mode="sum")
    new_size = merge_fn(size, mode="sum")
    x = x / new_size
    n, t, _ = metric.shape
    source = torch.eye(t)[None, ...].expand(n, t, t)
    source = merge_fn(source, mode="amax")
    return x, new_size, source


def test_zero_extra_weights_is_tome_bipartite_soft_matching() -> None:
    generator = torch.Generator().manual_seed(7)
    batch, num_tokens, channels, r = 4, 20, 8, 7
    x = torch.randn(batch, num_tokens, channels, generator=generator)
    metric = torch.randn(batch, num_tokens, 5, generator=generator)
    sizes = torch.randint(1, 4, (batch, num_tokens), generator=generator).float()
    state = TokenState(
        sizes=sizes.clone(),
        source=torch.arange(num_tokens).expand(batch, num_tokens).contiguous(),
        first_patch=torch.arange(num_tokens).expand(batch, num_tokens).contiguous(),
    )
    ours, ours_state = merge_step(x, metric, state, r, Scoring(w_div=0.0, w_attn=0.0, ctr=0.0))
    tome_x, tome_size, tome_source = tome_bipartite_soft_matching(metric, x, sizes[..., None], r)
    # Same partition of the patches, same values and sizes: compare per original patch.
    tome_token_of_patch = tome_source.argmax(dim=1)  # [B, N0]
    for b in range(batch):
        ours_per_patch = ours[b][ours_state.source[b]]
        tome_per_patch = tome_x[b][tome_token_of_patch[b]]
        torch.testing.assert_close(ours_per_patch, tome_per_patch, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            ours_state.sizes[b][ours_state.source[b]], tome_size[b, :, 0][tome_token_of_patch[b]]
        )


def test_attention_importance_is_column_mean_not_row_mean() -> None:
    # Every query attends mostly to token 2: the column mean singles it out, the row mean is 1/N for all.
    logits = torch.zeros(1, 2, 5, 5)
    logits[..., 2] = 4.0
    probs = torch.softmax(logits, dim=-1)
    received = attention_received(probs)
    row_mean = probs.mean(dim=(1, 3)) * 5
    assert torch.allclose(row_mean, torch.ones_like(row_mean))
    assert received.argmax().item() == 2
    expected_column = probs[0, 0, 0, 2] * 5
    torch.testing.assert_close(received[0, 2], expected_column)
    torch.testing.assert_close(received.mean(), torch.tensor(1.0))


def test_protected_tokens_and_unchosen_tokens_pass_through_bit_identical() -> None:
    generator = torch.Generator().manual_seed(3)
    batch, num_tokens = 2, 32
    hidden = torch.randn(batch, num_tokens, 8, generator=generator)
    importance = torch.rand(batch, num_tokens, generator=generator)
    state = TokenState.start(batch, num_tokens, "cpu")
    scoring = Scoring(w_div=0.5, ctr=0.25)
    out, new_state = merge_step(hidden, hidden, state, 6, scoring, importance)
    protected_a, protected_b = protected_tokens(importance, scoring.ctr, 6)
    assert int(protected_a.sum() + protected_b.sum()) == batch * int(0.25 * num_tokens)
    for b in range(batch):
        protected = [2 * i for i in protected_a[b].nonzero()[:, 0].tolist()]
        protected += [2 * j + 1 for j in protected_b[b].nonzero()[:, 0].tolist()]
        for token in protected:
            new_index = new_state.source[b, token]
            assert new_state.sizes[b, new_index] == 1  # neither merged nor received
            assert torch.equal(out[b, new_index], hidden[b, token])
        # Any size-1 output token is bit-identical to its input.
        for new_index in (new_state.sizes[b] == 1).nonzero()[:, 0].tolist():
            token = new_state.first_patch[b, new_index]
            assert torch.equal(out[b, new_index], hidden[b, token])


def test_a_merged_token_that_takes_no_part_in_a_later_step_passes_through_bit_identical() -> None:
    # The merge weighs every token by its size over its output token's size; for a token that takes no part that is
    # size / size, exactly 1.0, whatever the size (here up to several patches after a first step).
    generator = torch.Generator().manual_seed(5)
    batch, num_tokens = 3, 40
    hidden = torch.randn(batch, num_tokens, 8, generator=generator) * 3.7
    scoring = Scoring(w_div=0.5, ctr=0.25)
    importance = torch.rand(batch, num_tokens, generator=generator)
    hidden, state = merge_step(hidden, hidden, TokenState.start(batch, num_tokens, "cpu"), 15, scoring, importance)
    assert bool((state.sizes > 1).any())
    importance = torch.rand(batch, hidden.shape[1], generator=generator)
    inputs = (hidden.clone(), state.sizes.clone(), state.source.clone(), state.first_patch.clone())
    out, new_state = merge_step(hidden, hidden, state, 6, scoring, importance)
    # The step leaves its inputs as they were.
    after = (hidden, state.sizes, state.source, state.first_patch)
    assert all(torch.equal(a, b) for a, b in zip(inputs, after, strict=True))
    checked = 0
    for b in range(batch):
        for position in range(hidden.shape[1]):
            # The output token of an original patch this token covers.
            new_index = int(new_state.source[b][state.source[b] == position][0])
            if new_state.sizes[b, new_index] == state.sizes[b, position]:  # took no part
                assert torch.equal(out[b, new_index], hidden[b, position])
                checked += int(state.sizes[b, position] > 1)
    assert checked > 0


def test_protection_never_blocks_the_requested_removal() -> None:
    # All the important tokens are in A: protection inside A is capped so the step still removes r.
    num_tokens, remove = 16, 7
    importance = torch.zeros(1, num_tokens)
    importance[0, 0::2] = torch.arange(8, 0, -1).float()
    protected_a, protected_b = protected_tokens(importance, 0.5, remove)
    assert int(protected_a.sum()) == 8 - remove
    x = torch.randn(1, num_tokens, 4)
    out, state = merge_step(x, x, TokenState.start(1, num_tokens, "cpu"), remove, Scoring(ctr=0.5), importance)
    assert out.shape[1] == num_tokens - remove


def test_knn_distinctiveness_is_high_for_a_unique_token() -> None:
    cluster = torch.randn(1, 1, 16) + 0.01 * torch.randn(1, 9, 16)
    outlier = -cluster[:, :1]
    features = torch.nn.functional.normalize(torch.cat([cluster, outlier], dim=1), dim=-1)
    distinct = knn_distinctiveness(features @ features.transpose(1, 2), knn_k=3)
    assert distinct[0, -1] == distinct[0].max()
    assert torch.all((distinct >= 0) & (distinct <= 1))  # [0, 1); exp may underflow to exactly 1


def test_zero_weight_switches_its_term_off_exactly() -> None:
    generator = torch.Generator().manual_seed(11)
    features = torch.randn(2, 18, 6, generator=generator)
    importance = torch.rand(2, 18, generator=generator) * 3
    plain = match(features, 5, Scoring(w_div=0.0, w_attn=0.0, ctr=0.0))
    with_zero = match(features, 5, Scoring(w_div=0.0, w_attn=0.0, ctr=0.0, knn_k=2, tau=0.3), importance)
    assert all(torch.equal(p, q) for p, q in zip(plain, with_zero, strict=True))
    with_attention = match(features, 5, Scoring(w_div=0.0, w_attn=5.0, ctr=0.0), importance)
    assert not all(torch.equal(p, q) for p, q in zip(plain, with_attention, strict=True))


def test_match_rejects_a_removal_above_half() -> None:
    with pytest.raises(ValueError, match="1..5 of 10"):
        match(torch.randn(1, 10, 4), 6, Scoring(ctr=0.0, w_div=0.0))


def test_merge_keeps_dtype_and_handles_large_sizes_in_half_precision() -> None:
    x = torch.full((1, 8, 4), 300.0, dtype=torch.bfloat16)
    state = TokenState.start(1, 8, "cpu")
    state.sizes = torch.full((1, 8), 500.0)
    out, new_state = merge(x, state, torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))
    assert out.dtype == torch.bfloat16
    assert torch.all(out == 300.0)
    assert new_state.sizes.sum().item() == 4000.0


def test_protection_count_rounds_half_up() -> None:
    # N_protect = min(round(ctr * T), T - 2 r), half up: 0.25 * 6 = 1.5 protects 2, 0.35 * 10 = 3.5 protects 4
    # (not the float product 3.4999999999999996), and T - 2 r still caps it.
    assert protect_count(0.25, 6, 1) == 2
    assert protect_count(0.35, 10, 1) == 4
    assert protect_count(0.25, 577 - 1, 100) == 144
    assert protect_count(0.1, 14, 1) == 1  # 1.4
    assert protect_count(0.5, 16, 7) == 2  # 8, capped at 16 - 14
    assert protect_count(0.0, 16, 1) == 0
    importance = torch.arange(6.0).flip(0)[None]
    protected_a, protected_b = protected_tokens(importance, 0.25, 1)
    assert protected_a.tolist() == [[True, False, False]] and protected_b.tolist() == [[True, False, False]]


def test_reduced_protection_is_flagged_per_item() -> None:
    # Importance ranks: item 0 all A tokens first, item 1 tokens in index order, item 2 all B tokens first.
    num_tokens, remove = 16, 7
    importance = torch.zeros(3, num_tokens)
    importance[0, 0::2] = torch.arange(8, 0, -1).float()
    importance[1, :8] = torch.arange(8, 0, -1).float()
    importance[2, 1::2] = torch.arange(8, 0, -1).float()
    x = torch.randn(3, num_tokens, 4, generator=torch.Generator().manual_seed(1))
    scoring = Scoring(ctr=0.5)  # N_protect = min(8, 16 - 14) = 2
    _, state = merge_step(x, x, TokenState.start(3, num_tokens, "cpu"), remove, scoring, importance)
    assert state.protection_reduced is not None
    # N_protect is 2: item 0 protects tokens 0 and 2 (both A, cap 1: reduced), item 1 tokens 0 and 1 (one each:
    # fine), item 2 tokens 1 and 3 (both B, cap 7: fine).
    assert state.protection_reduced.tolist() == [True, False, False]
    _, state = merge_step(x, x, TokenState.start(3, num_tokens, "cpu"), remove, Scoring(ctr=0.0, w_div=0.0))
    assert state.protection_reduced is None


def test_importance_is_normalised_over_the_patch_tokens() -> None:
    # CLS (token 0) takes most of the attention: s~ over the patches still has mean 1, and keeps their ratios.
    logits = torch.zeros(2, 3, 7, 7)
    logits[..., 0] = 3.0
    probs = torch.softmax(logits + torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(0)), dim=-1)
    with_cls = attention_received(probs)
    patches = attention_received(probs, special_tokens=1)
    assert with_cls[:, 0].min() > 3  # CLS receives most
    torch.testing.assert_close(patches.mean(dim=1), torch.ones(2))
    column_mean = probs.mean(dim=(1, 2))[:, 1:]
    torch.testing.assert_close(patches, column_mean * 6 / column_mean.sum(dim=1, keepdim=True))
    torch.testing.assert_close(patch_importance(with_cls, 1), patches)


@pytest.mark.parametrize("scatter", [False, True])
def test_inverse_permutation_by_argsort_and_by_scatter(scatter: bool) -> None:
    # The GPU path scatters ranks, the CPU path argsorts: both must invert every item's permutation.
    generator = torch.Generator().manual_seed(5)
    order = torch.stack([torch.randperm(9, generator=generator) for _ in range(3)])
    inverse = _inverse_permutation(order, scatter=scatter)
    assert torch.equal(inverse.gather(1, order), torch.arange(9).expand(3, 9))
    assert torch.equal(inverse, torch.argsort(order, dim=1))
