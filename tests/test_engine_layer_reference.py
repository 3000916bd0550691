"""Merging layers of real CLIP and SigLIP encoders against an independent eager reference, value by value.

The reference is written here from the method doc (sections 2-4 and 6), in float64, without the engine's code: a
pre-norm block (LN1, q/k/v projections, scaled softmax attention with the optional ``log(size)`` key bias of
proportional attention, output projection, residual), then on a merging layer the score-guided merge (cosine of the
head-mean keys or of the hidden states, kNN distinctiveness, attention received, CTR protection, bipartite matching by
parity over the patch tokens with CLS excluded, size-weighted mean, original order), then LN2 + MLP on the merged
tokens and the residual. Every layer's input is taken from the adapted model (forward hooks), so a mismatch points at
one layer; the sizes the reference carries are its own.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from tuner.evoprune import Schedule, Scoring, apply
from tuner.evoprune.adapters import resolve_encoder

# Every test twice: with the fused CPU kernels of a merge step and with the tensor code (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("merge_path")

IMAGE, PATCH, LAYERS, HEADS, WIDTH = 48, 8, 6, 4, 32  # 36 patch tokens
VISION = dict(
    hidden_size=WIDTH,
    intermediate_size=64,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    image_size=IMAGE,
    patch_size=PATCH,
)
PLAN = [0, 14, 0, 8, 4, 0]  # 36 -> 22 -> 14 -> 10 patch tokens: heavy steps, so that CTR caps do bind


def clip_vision() -> CLIPVisionModel:
    """A tiny random CLIP whose CLS takes about half of all attention (as in trained CLIP models), so that leaving
    CLS out of the importance normalisation makes a difference."""
    torch.manual_seed(0)
    model = CLIPVisionModel._from_config(CLIPVisionConfig(**VISION), attn_implementation="sdpa").eval().double()
    with torch.no_grad():
        # CLS is the only token with a large channel 0; every query looks for channel 0 in the keys.
        model.embeddings.class_embedding.zero_()[0] = 20.0
        direction = torch.full((WIDTH,), 3.0 / math.sqrt(WIDTH), dtype=torch.float64)
        for layer in model.encoder.layers:
            layer.self_attn.k_proj.weight[:, 0] += direction
            layer.self_attn.q_proj.bias += direction
    return model


def siglip_vision() -> SiglipVisionModel:
    torch.manual_seed(0)
    return SiglipVisionModel._from_config(SiglipVisionConfig(**VISION), attn_implementation="sdpa").eval().double()


FAMILIES = {"clip": (clip_vision, 1), "siglip": (siglip_vision, 0)}
SCORINGS = {
    "tome": Scoring(w_div=0.0, w_attn=0.0, ctr=0.0),
    "paper": Scoring(w_div=0.5, w_attn=0.0, ctr=0.25),
    "attention": Scoring(w_div=0.3, w_attn=0.5, ctr=0.1),
    "proportional": Scoring(w_div=0.5, ctr=0.25, proportional_attention=True),
    "hidden": Scoring(w_div=0.5, w_attn=0.2, ctr=0.25, features="hidden"),
    "high-ctr": Scoring(w_div=0.5, ctr=0.6),
    "all": Scoring(w_sim=2.0, w_div=1.0, w_attn=0.3, ctr=0.3, knn_k=3, tau=0.7, features="hidden",
                   proportional_attention=True),
}


# ---------------------------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------------------------


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "gelu_pytorch_tanh":
        return F.gelu(x, approximate="tanh")
    raise AssertionError(f"the reference knows no activation {name!r}")


def reference_attention(
    layer: torch.nn.Module, x: torch.Tensor, key_sizes: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pre-norm attention branch of one block (without the residual), the head-mean keys, and the attention each
    token receives (softmax column mean over all queries and heads). ``key_sizes`` [B, N] adds log(size) to the keys."""
    attn = layer.self_attn
    batch, length, width = x.shape
    head_dim = width // HEADS
    normed = F.layer_norm(x, (width,), layer.layer_norm1.weight, layer.layer_norm1.bias, layer.layer_norm1.eps)

    def heads(projection: torch.nn.Linear) -> torch.Tensor:
        return (normed @ projection.weight.T + projection.bias).view(batch, length, HEADS, head_dim).transpose(1, 2)

    query, key, value = heads(attn.q_proj), heads(attn.k_proj), heads(attn.v_proj)
    logits = query @ key.transpose(-1, -2) / math.sqrt(head_dim)
    if key_sizes is not None:
        logits = logits + key_sizes.log()[:, None, None, :]
    probs = torch.softmax(logits, dim=-1)
    out = (probs @ value).transpose(1, 2).reshape(batch, length, width)
    out = out @ attn.out_proj.weight.T + attn.out_proj.bias
    return out, key.mean(dim=1), probs.mean(dim=(1, 2))


def reference_mlp(layer: torch.nn.Module, x: torch.Tensor, act: str) -> torch.Tensor:
    width = x.shape[-1]
    normed = F.layer_norm(x, (width,), layer.layer_norm2.weight, layer.layer_norm2.bias, layer.layer_norm2.eps)
    hidden = activation(act, normed @ layer.mlp.fc1.weight.T + layer.mlp.fc1.bias)
    return x + hidden @ layer.mlp.fc2.weight.T + layer.mlp.fc2.bias


def reference_merge(
    tokens: torch.Tensor,
    features: torch.Tensor,
    received: torch.Tensor,
    sizes: list[float],
    first: list[int],
    remove: int,
    scoring: Scoring,
) -> tuple[torch.Tensor, list[float], list[int], list[int], bool]:
    """One item's merge step on its patch tokens [T, C]. Returns the merged tokens, their sizes and first patches,
    each input token's output index, and whether the CTR protection had to shrink below N_protect."""
    n = tokens.shape[0]
    normed = features / features.norm(dim=-1, keepdim=True)
    cos = normed @ normed.T
    # s~ = s * T over the patch tokens: mean 1 there, CLS left out.
    importance = received * n / received.sum()

    # kNN distinctiveness: K nearest by squared distance 2 - 2 cos (self excluded), tau the median kNN distance.
    k = min(scoring.knn_k, n - 1)
    neighbour_d2 = []
    for i in range(n):
        others = sorted((float(cos[i, j]) for j in range(n) if j != i), reverse=True)[:k]
        neighbour_d2.append([max(0.0, 2.0 - 2.0 * c) for c in others])
    if scoring.tau == "auto":
        distances = sorted(math.sqrt(d) for row in neighbour_d2 for d in row)
        tau = distances[(len(distances) - 1) // 2]
    else:
        tau = float(scoring.tau)
    distinct = [1.0 - sum(math.exp(-d / tau**2) for d in row) / len(row) for row in neighbour_d2]

    a_tokens, b_tokens = list(range(0, n, 2)), list(range(1, n, 2))
    protected: set[int] = set()
    n_protect = 0
    if scoring.ctr > 0:
        n_protect = max(0, min(math.floor(Fraction(repr(scoring.ctr)) * n + Fraction(1, 2)), n - 2 * remove))
        ranked = sorted(range(n), key=lambda t: (-float(importance[t]), t))[:n_protect]
        # So that exactly r tokens go: at most |A| - r protected in A, |B| - 1 in B (the most important ones).
        protected.update([t for t in ranked if t % 2 == 0][: len(a_tokens) - remove])
        protected.update([t for t in ranked if t % 2 == 1][: len(b_tokens) - 1])

    def log_score(i: int, j: int) -> float:
        value = 0.0
        if scoring.w_sim > 0:
            value += scoring.w_sim * math.log((1.0 + float(cos[i, j])) / 2.0)
        if scoring.w_div > 0:
            value -= scoring.w_div * (distinct[i] + distinct[j])
        if scoring.w_attn > 0:
            value -= scoring.w_attn * float(importance[i] + importance[j])
        return value

    best = []
    for i in a_tokens:
        score, partner = max((log_score(i, j), -j) for j in b_tokens if j not in protected)
        best.append((-math.inf if i in protected else score, -i, -partner))
    chosen = sorted(best, reverse=True)[:remove]

    total = {t: sizes[t] for t in range(n)}
    value = {t: tokens[t] * sizes[t] for t in range(n)}
    first_patch = {t: first[t] for t in range(n)}
    goes_to = {t: t for t in range(n)}
    for _, minus_i, j in chosen:
        i = -minus_i
        value[j] = value[j] + value[i]
        total[j] += total[i]
        first_patch[j] = min(first_patch[j], first_patch[i])
        goes_to[i] = j
    kept = sorted((t for t in range(n) if goes_to[t] == t), key=lambda t: first_patch[t])
    position = {t: p for p, t in enumerate(kept)}
    merged = torch.stack([value[t] / total[t] for t in kept])
    return (
        merged,
        [total[t] for t in kept],
        [first_patch[t] for t in kept],
        [position[goes_to[t]] for t in range(n)],
        len(protected) < n_protect,
    )


class ReferenceState:
    """Sizes, first patches and source map of every item, carried by the reference from layer to layer."""

    def __init__(self, batch: int, patches: int) -> None:
        self.sizes = [[1.0] * patches for _ in range(batch)]
        self.first = [list(range(patches)) for _ in range(batch)]
        self.source = [list(range(patches)) for _ in range(batch)]


def reference_layer(
    layer: torch.nn.Module,
    x: torch.Tensor,
    remove: int,
    scoring: Scoring,
    state: ReferenceState,
    cls: int,
    act: str,
) -> tuple[torch.Tensor, int]:
    """One block on [B, N, C]; merges when ``remove`` > 0. Returns the output and how many items had their CTR
    protection reduced."""
    key_sizes = None
    if scoring.proportional_attention:
        key_sizes = torch.tensor([[1.0] * cls + sizes for sizes in state.sizes], dtype=x.dtype)
    attention_out, keys, received = reference_attention(layer, x, key_sizes)
    x = x + attention_out
    reduced = 0
    if remove > 0:
        features = keys if scoring.features == "keys" else x
        items = []
        for b in range(x.shape[0]):
            merged, sizes, first, position, was_reduced = reference_merge(
                x[b, cls:], features[b, cls:], received[b, cls:], state.sizes[b], state.first[b], remove, scoring
            )
            items.append(torch.cat([x[b, :cls], merged]))
            state.sizes[b], state.first[b] = sizes, first
            state.source[b] = [position[t] for t in state.source[b]]
            reduced += was_reduced
        x = torch.stack(items)
    return reference_mlp(layer, x, act), reduced


# ---------------------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------------------


def run_with_captures(
    model: torch.nn.Module, schedule: Schedule, pixels: torch.Tensor, chunk_logits: int | None = None
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], object]:
    """Each layer's (input, output) in a forward of the adapted model, and the handle."""
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [
        layer.register_forward_hook(lambda _module, args, output: captured.append((args[0], output)))
        for layer in resolve_encoder(model).layers
    ]
    try:
        with torch.inference_mode(), apply(model, schedule) as handle:
            handle.attention_chunk_logits = chunk_logits
            model(pixel_values=pixels)
    finally:
        for hook in hooks:
            hook.remove()
    return captured, handle


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scoring_name", SCORINGS)
def test_adapted_layers_equal_the_eager_reference(family: str, scoring_name: str) -> None:
    make, cls = FAMILIES[family]
    model = make()
    scoring = SCORINGS[scoring_name]
    schedule = Schedule(PLAN, tokens_in=36, scoring=scoring)
    batch = 4
    pixels = torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    captured, handle = run_with_captures(model, schedule, pixels)
    assert len(captured) == LAYERS

    state = ReferenceState(batch, 36)
    reductions: dict[int, int] = {}
    with torch.no_grad():
        for index, (layer, (layer_input, layer_output)) in enumerate(
            zip(resolve_encoder(model).layers, captured, strict=True)
        ):
            expected, reduced = reference_layer(
                layer, layer_input, PLAN[index], scoring, state, cls, model.config.hidden_act
            )
            if PLAN[index] > 0:
                reductions[index] = reduced
            assert layer_output.dtype == torch.float64
            torch.testing.assert_close(layer_output, expected, msg=lambda m, i=index: f"layer {i}: {m}")

    assert handle.sizes is not None and handle.source is not None
    assert handle.sizes.tolist() == state.sizes
    assert handle.source.tolist() == state.source
    assert handle.ctr_reductions == reductions
    if scoring_name == "high-ctr":
        # The plan is heavy enough that the caps bind somewhere: the deviation is counted, not hidden.
        assert sum(reductions.values()) > 0
    if scoring.ctr == 0:
        assert set(reductions.values()) == {0}


@pytest.mark.parametrize("chunk_logits", [1 << 30, HEADS * 37 * 37, 2 * 37 * 37, 1])
def test_reference_holds_in_every_attention_chunking(chunk_logits: int) -> None:
    # Single batched computation, one item per chunk, groups of heads, one head: the same layer outputs.
    model = clip_vision()
    scoring = SCORINGS["all"]
    schedule = Schedule(PLAN, tokens_in=36, scoring=scoring)
    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    captured, _ = run_with_captures(model, schedule, pixels, chunk_logits)
    state = ReferenceState(3, 36)
    with torch.no_grad():
        for index, (layer, (layer_input, layer_output)) in enumerate(
            zip(resolve_encoder(model).layers, captured, strict=True)
        ):
            expected, _ = reference_layer(layer, layer_input, PLAN[index], scoring, state, 1, "quick_gelu")
            torch.testing.assert_close(layer_output, expected)
