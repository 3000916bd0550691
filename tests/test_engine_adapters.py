"""A new encoder family is one adapter: a toy pre-norm ViT (plain torch, no transformers class) registered from here.

The toy block names its parts differently from CLIP and SigLIP and fuses q, k and v into one projection, so the
engine can only run it through the adapter's :class:`LayerOps`. Also checked: that the shared pre-norm ViT ops
compose to CLIP's and SigLIP's own layers exactly, and the registry's rules (unique names, built-ins first, the
unsupported-model message).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel
from transformers.modeling_outputs import BaseModelOutput

from tuner.evoprune import EvoPruneError, Schedule, Scoring, UnsupportedModelError, apply
from tuner.evoprune.adapters import (
    PRE_NORM_VIT_OPS,
    LayerOps,
    VisionEncoder,
    register_adapter,
    resolve_encoder,
    supported_models,
    unregister_adapter,
)

IMAGE, PATCH, LAYERS, HEADS, WIDTH = 48, 8, 6, 4, 32
PATCHES = (IMAGE // PATCH) ** 2  # 36
FAMILY = "toy-vit"


# ---------------------------------------------------------------------------------------------------------------
# The toy family: a model, its layer ops and its adapter
# ---------------------------------------------------------------------------------------------------------------


class ToyBlock(nn.Module):
    """A pre-norm transformer block with a fused qkv projection."""

    def __init__(self) -> None:
        super().__init__()
        self.head_dim = WIDTH // HEADS
        self.norm_in = nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.norm_out = nn.LayerNorm(WIDTH)
        self.ffn = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, _ = hidden.shape
        qkv = self.qkv(self.norm_in(hidden)).view(batch, length, 3, HEADS, self.head_dim).permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attention_mask)
        hidden = hidden + self.proj(context.transpose(1, 2).reshape(batch, length, WIDTH))
        return hidden + self.ffn(self.norm_out(hidden))


class ToyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ToyBlock() for _ in range(LAYERS))

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> BaseModelOutput:
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, attention_mask)
        return BaseModelOutput(last_hidden_state=hidden)


class ToyViT(nn.Module):
    """Patch embedding, an optional class token, the encoder, a final norm."""

    def __init__(self, has_cls: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(3, WIDTH, PATCH, stride=PATCH)
        self.cls = nn.Parameter(torch.randn(1, 1, WIDTH)) if has_cls else None
        self.position = nn.Parameter(0.02 * torch.randn(1, PATCHES + int(has_cls), WIDTH))
        self.encoder = ToyEncoder()
        self.norm = nn.LayerNorm(WIDTH)
        self.eval()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(pixel_values).flatten(2).transpose(1, 2)
        if self.cls is not None:
            tokens = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], dim=1)
        return self.norm(self.encoder(inputs_embeds=tokens + self.position).last_hidden_state)


class ToyOps(LayerOps):
    """The toy block's parts; its attention "module" is the block itself (the fused projection lives there)."""

    def attention(self, layer: Any) -> nn.Module:
        return layer

    def attention_norm(self, layer: Any, hidden: torch.Tensor) -> torch.Tensor:
        return layer.norm_in(hidden)

    def project(self, attention: Any, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, length, _ = hidden.shape
        qkv = attention.qkv(hidden).view(batch, length, 3, HEADS, attention.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def scale(self, attention: Any) -> float:
        return attention.head_dim**-0.5

    def attention_output(self, attention: Any, context: torch.Tensor) -> torch.Tensor:
        batch, _, length, _ = context.shape
        return attention.proj(context.transpose(1, 2).reshape(batch, length, -1))

    def mlp_norm(self, layer: Any, hidden: torch.Tensor) -> torch.Tensor:
        return layer.norm_out(hidden)

    def mlp(self, layer: Any, hidden: torch.Tensor) -> torch.Tensor:
        return layer.ffn(hidden)


TOY_OPS = ToyOps()


def resolve_toy(model: nn.Module) -> VisionEncoder | None:
    if not isinstance(model, ToyViT):
        return None
    return VisionEncoder(FAMILY, model, model.encoder, model.cls is not None, PATCHES, WIDTH, 2 * WIDTH, TOY_OPS)


@pytest.fixture
def toy_adapter() -> Iterator[str]:
    register_adapter(FAMILY, ("ToyViT",))(resolve_toy)
    try:
        yield FAMILY
    finally:
        unregister_adapter(FAMILY)


def pixels(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------------------


SCORINGS = {
    "paper": Scoring(),
    "all-terms": Scoring(w_div=0.3, w_attn=0.5, ctr=0.1, features="hidden", proportional_attention=True),
}


@pytest.mark.parametrize("has_cls", [True, False], ids=["cls", "no-cls"])
@pytest.mark.parametrize("scoring_name", SCORINGS)
@pytest.mark.parametrize("reducer", ["merge", "slice"])
def test_a_registered_family_merges_and_removing_restores_it(
    toy_adapter: str, has_cls: bool, scoring_name: str, reducer: Any
) -> None:
    model = ToyViT(has_cls)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    cls = int(has_cls)
    scoring = SCORINGS[scoring_name]
    schedule = Schedule.preset("skip", num_layers=LAYERS, tokens_in=PATCHES, tokens_out=12, scoring=scoring)
    x = pixels(3)
    with torch.inference_mode():
        native = model(x)
        handle = apply(model, schedule, reducer=reducer)
        assert handle.encoder.family == toy_adapter and handle.encoder.layer_ops is TOY_OPS
        pruned = model(x)
        assert handle.token_counts == schedule.tokens_after(PATCHES)
        assert pruned.shape == (3, 12 + cls, WIDTH) and torch.isfinite(pruned).all()
        assert handle.sizes is not None
        assert torch.all(handle.sizes.sum(dim=1) == (PATCHES if reducer == "merge" else 12))
        assert handle.source is not None and handle.source.shape == (3, PATCHES) and int(handle.source.max()) == 11
        # Only the merging layers and the encoder carry an instance forward.
        layers = model.encoder.layers
        assert [i for i, layer in enumerate(layers) if "forward" in layer.__dict__] == schedule.merge_layers
        assert "forward" in model.encoder.__dict__
        if reducer == "merge":
            # Forced chunking of the explicit attention and profiling go through the same ops.
            handle.attention_chunk_logits = 1
            torch.testing.assert_close(model(x), pruned, rtol=1e-5, atol=1e-6)
            handle.attention_chunk_logits = None
            handle.profile = True
            assert torch.equal(model(x), pruned)
        handle.remove()
        assert not any("forward" in module.__dict__ for module in model.modules())
        restored = model(x)
    assert torch.equal(native, restored)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_a_registered_family_merges_each_item_on_its_own(toy_adapter: str) -> None:
    model = ToyViT(has_cls=True)
    schedule = Schedule.preset("mean", num_layers=LAYERS, tokens_in=PATCHES, tokens_out=9)
    x = pixels(3, seed=5)
    with torch.inference_mode(), apply(model, schedule) as handle:
        together = model(x)
        source = handle.source.clone() if handle.source is not None else None
        for item in range(3):
            alone = model(x[item : item + 1])
            torch.testing.assert_close(alone[0], together[item], rtol=1e-4, atol=1e-5)
            assert source is not None and handle.source is not None and torch.equal(handle.source[0], source[item])


def test_the_toy_ops_compose_to_the_toy_block() -> None:
    block = ToyViT(has_cls=True).encoder.layers[0]
    hidden = torch.randn(2, 37, WIDTH, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        attention = TOY_OPS.attention(block)
        query, key, value = TOY_OPS.project(attention, TOY_OPS.attention_norm(block, hidden))
        assert query.shape == key.shape == value.shape == (2, HEADS, 37, WIDTH // HEADS)
        context = F.scaled_dot_product_attention(query, key, value, scale=TOY_OPS.scale(attention))
        explicit = hidden + TOY_OPS.attention_output(attention, context)
        explicit = explicit + TOY_OPS.mlp(block, TOY_OPS.mlp_norm(block, explicit))
        # The default native attention (project, sdpa, output) is the block's own computation.
        native = hidden + TOY_OPS.native_attention(block, TOY_OPS.attention_norm(block, hidden), None)
        native = native + TOY_OPS.mlp(block, TOY_OPS.mlp_norm(block, native))
        assert torch.equal(native, block(hidden))
    torch.testing.assert_close(explicit, block(hidden))


def clip_vision() -> CLIPVisionModel:
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS, image_size=IMAGE,
        patch_size=PATCH,
    )
    return CLIPVisionModel._from_config(config, attn_implementation="sdpa").eval()


def siglip_vision() -> SiglipVisionModel:
    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS, image_size=IMAGE,
        patch_size=PATCH,
    )
    return SiglipVisionModel._from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("make", [clip_vision, siglip_vision], ids=["clip", "siglip"])
def test_clip_and_siglip_share_the_pre_norm_vit_ops(make: Any) -> None:
    encoder = resolve_encoder(make())
    assert encoder.layer_ops is PRE_NORM_VIT_OPS
    ops = encoder.layer_ops
    hidden = torch.randn(2, PATCHES + int(encoder.has_cls), WIDTH, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        for layer in encoder.layers:
            native = hidden + ops.native_attention(layer, ops.attention_norm(layer, hidden), None)
            native = native + ops.mlp(layer, ops.mlp_norm(layer, native))
            # The same modules in the same order as the layer's own forward: bit-identical.
            assert torch.equal(native, layer(hidden, None))
            attention = ops.attention(layer)
            normed = ops.attention_norm(layer, hidden)
            query, key, value = ops.project(attention, normed)
            context = F.scaled_dot_product_attention(query, key, value, scale=ops.scale(attention))
            # The explicit projections with sdpa: the module's own attention, up to rounding.
            own = ops.native_attention(layer, normed, None)
            torch.testing.assert_close(ops.attention_output(attention, context), own)


def test_an_unregistered_family_is_unsupported_and_the_message_lists_the_registered_ones() -> None:
    with pytest.raises(UnsupportedModelError, match="unsupported model ToyViT; supported: .*CLIPVisionModel"):
        apply(ToyViT(has_cls=True), Schedule.none(LAYERS, PATCHES))
    assert "ToyViT" not in supported_models()


def test_registration_rules(toy_adapter: str) -> None:
    names = supported_models()
    # Built-in families come first (they are loaded before an outside registration), the new one after them.
    assert names.index("ToyViT") > names.index("CLIPVisionModel") and names[-1] == "ToyViT"
    with pytest.raises(UnsupportedModelError, match="supported: .*SiglipVisionModel.*ToyViT"):
        apply(nn.Linear(2, 2), Schedule.none(1, PATCHES))
    # Registering the same resolver again is a no-op; another one under a taken name is an error.
    register_adapter(toy_adapter, ("ToyViT",))(resolve_toy)
    with pytest.raises(EvoPruneError, match="adapter named 'toy-vit' is already registered"):
        register_adapter(toy_adapter, ("ToyViT",))(lambda model: None)
    with pytest.raises(EvoPruneError, match="adapter named 'clip' is already registered"):
        register_adapter("clip", ("Other",))(resolve_toy)
    with pytest.raises(EvoPruneError, match="no encoder adapter named 'nope'"):
        unregister_adapter("nope")
