"""Applying schedules to transformers' real model classes (tiny random models built from configs)."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPForImageClassification,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipConfig,
    SiglipModel,
    SiglipTextConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from tuner.evoprune import (
    EvoPruneError,
    Schedule,
    ScheduleError,
    Scoring,
    UnsupportedModelError,
    apply,
    attention_received,
)
from tuner.evoprune.adapters import resolve_encoder
from tuner.evoprune.apply import attention_chunks, default_chunk_logits
from tuner.evoprune.merge import patch_importance

IMAGE, PATCH, LAYERS = 48, 8, 6  # 36 patch tokens
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    image_size=IMAGE,
    patch_size=PATCH,
)


def clip_vision() -> CLIPVisionModel:
    torch.manual_seed(0)
    return CLIPVisionModel._from_config(CLIPVisionConfig(**VISION), attn_implementation="sdpa").eval()


def siglip_vision() -> SiglipVisionModel:
    torch.manual_seed(0)
    return SiglipVisionModel._from_config(SiglipVisionConfig(**VISION), attn_implementation="sdpa").eval()


FAMILIES = {"clip": (clip_vision, True), "siglip": (siglip_vision, False)}
SCORINGS = [
    Scoring(),
    Scoring(w_div=0.0, w_attn=0.0, ctr=0.0),
    Scoring(w_div=0.3, w_attn=0.5, ctr=0.1, features="hidden", proportional_attention=True),
]


def pixels(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_schedule_is_bit_identical_and_removable(family: str) -> None:
    make, _ = FAMILIES[family]
    model = make()
    before_state = snapshot(model)
    x = pixels(2)
    with torch.inference_mode():
        native = model(pixel_values=x).last_hidden_state
        with apply(model, Schedule.none(LAYERS, 36)) as handle:
            patched = model(pixel_values=x).last_hidden_state
        assert handle.token_counts == [36] * LAYERS
        after = model(pixel_values=x).last_hidden_state
    assert torch.equal(native, patched)
    assert torch.equal(native, after)
    after_state = model.state_dict()
    assert list(after_state) == list(before_state)
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scoring", SCORINGS, ids=["paper", "tome", "all-terms"])
def test_token_counts_follow_the_schedule_and_remove_restores(family: str, scoring: Scoring) -> None:
    make, has_cls = FAMILIES[family]
    model = make()
    before_state = snapshot(model)
    schedule = Schedule.preset("skip", num_layers=LAYERS, tokens_in=36, tokens_out=12, scoring=scoring)
    x = pixels(3)
    with torch.inference_mode():
        native = model(pixel_values=x, output_hidden_states=True)
        handle = apply(model, schedule)
        pruned = model(pixel_values=x, output_hidden_states=True)
        assert handle.token_counts == schedule.tokens_after(36)
        cls = 1 if has_cls else 0
        assert pruned.last_hidden_state.shape == (3, 12 + cls, 32)
        # Hidden states of every layer are captured with the pruned lengths.
        assert [h.shape[1] - cls for h in pruned.hidden_states] == [36] + schedule.tokens_after(36)
        assert handle.sizes is not None and handle.source is not None
        assert torch.all(handle.sizes.sum(dim=1) == 36)
        assert handle.source.shape == (3, 36) and int(handle.source.max()) == 11
        # Only merging layers (and the encoder) carry an instance forward; the class is untouched.
        layers = model.encoder.layers
        assert [i for i, layer in enumerate(layers) if "forward" in layer.__dict__] == schedule.merge_layers
        assert "forward" in model.encoder.__dict__
        assert model.config._attn_implementation == "sdpa"
        handle.remove()
        assert not any("forward" in m.__dict__ for m in model.modules())
        restored = model(pixel_values=x, output_hidden_states=True)
    assert torch.equal(native.last_hidden_state, restored.last_hidden_state)
    assert all(torch.equal(a, b) for a, b in zip(native.hidden_states, restored.hidden_states, strict=True))
    assert all(torch.equal(before_state[k], v) for k, v in model.state_dict().items())
    assert list(model.state_dict()) == list(before_state)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_item_is_merged_on_its_own(family: str) -> None:
    make, _ = FAMILIES[family]
    model = make()
    schedule = Schedule.preset("mean", num_layers=LAYERS, tokens_in=36, tokens_out=9)
    x = pixels(4, seed=5)
    with torch.inference_mode(), apply(model, schedule) as handle:
        together = model(pixel_values=x).last_hidden_state
        source_together = handle.source.clone()
        for item in range(4):
            alone = model(pixel_values=x[item : item + 1]).last_hidden_state
            torch.testing.assert_close(alone[0], together[item], rtol=1e-4, atol=1e-5)
            assert torch.equal(handle.source[0], source_together[item])


def test_other_instances_of_the_class_are_untouched() -> None:
    patched, untouched = clip_vision(), clip_vision()
    x = pixels(1)
    with torch.inference_mode():
        reference = untouched(pixel_values=x).last_hidden_state
        with apply(patched, Schedule.preset("skip", num_layers=LAYERS, tokens_in=36, tokens_out=10)):
            assert patched(pixel_values=x).last_hidden_state.shape[1] == 11
            assert torch.equal(untouched(pixel_values=x).last_hidden_state, reference)


def test_proportional_attention_changes_the_result() -> None:
    model = clip_vision()
    x = pixels(2)
    outs = []
    for proportional in (False, True):
        scoring = Scoring(proportional_attention=proportional)
        schedule = Schedule.preset("first", num_layers=LAYERS, tokens_in=36, tokens_out=12, n=2, scoring=scoring)
        with torch.inference_mode(), apply(model, schedule):
            outs.append(model(pixel_values=x).last_hidden_state)
    assert outs[0].shape == outs[1].shape
    assert not torch.allclose(outs[0], outs[1])


def test_half_precision_runs_and_keeps_dtype() -> None:
    model = siglip_vision().to(torch.bfloat16)
    schedule = Schedule.preset("skip", num_layers=LAYERS, tokens_in=36, tokens_out=12)
    with torch.inference_mode(), apply(model, schedule) as handle:
        out = model(pixel_values=pixels(2).to(torch.bfloat16)).last_hidden_state
    assert out.dtype == torch.bfloat16 and out.shape == (2, 12, 32)
    assert torch.isfinite(out.float()).all()
    assert handle.token_counts[-1] == 12


def dual_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    clip_cfg = CLIPConfig(
        text_config=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        vision_config=CLIPVisionConfig(**VISION),
        projection_dim=16,
    )
    siglip_cfg = SiglipConfig(
        text_config=SiglipTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        vision_config=SiglipVisionConfig(**VISION),
    )
    classifier_cfg = CLIPConfig(
        text_config=clip_cfg.text_config.to_dict(), vision_config=clip_cfg.vision_config.to_dict(), num_labels=3
    )
    llava_cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000
        ),
        image_token_id=999,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return {
        "CLIPModel": CLIPModel(clip_cfg).eval(),
        "SiglipModel": SiglipModel(siglip_cfg).eval(),
        "CLIPForImageClassification": CLIPForImageClassification(classifier_cfg).eval(),
        "LlavaForConditionalGeneration": LlavaForConditionalGeneration(llava_cfg).eval(),
    }


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipModel", "CLIPForImageClassification"])
def test_vision_side_of_dual_and_classifier_models(name: str) -> None:
    model = dual_models()[name]
    schedule = Schedule.preset("skip", num_layers=LAYERS, tokens_in=36, tokens_out=16)
    x = pixels(2)
    with torch.inference_mode():
        native = model.get_image_features(pixel_values=x) if name != "CLIPForImageClassification" else None
        with apply(model, schedule) as handle:
            if name == "CLIPForImageClassification":
                logits = model(pixel_values=x).logits
                assert logits.shape == (2, 3)
            else:
                pruned = model.get_image_features(pixel_values=x)
                assert pruned.last_hidden_state.shape[1] == 16 + (1 if name == "CLIPModel" else 0)
                assert not torch.equal(pruned.pooler_output, native.pooler_output)
        assert handle.token_counts == schedule.tokens_after(36)
        if native is not None:
            assert torch.equal(model.get_image_features(pixel_values=x).pooler_output, native.pooler_output)


def test_llava_vision_tower_and_the_image_token_rule() -> None:
    model = dual_models()["LlavaForConditionalGeneration"]
    schedule = Schedule.preset("skip", num_layers=LAYERS, tokens_in=36, tokens_out=12)
    x = pixels(1)
    with torch.inference_mode(), apply(model, schedule) as handle:
        assert handle.encoder.vision_model is model.model.vision_tower
        features = model.model.get_image_features(pixel_values=x).pooler_output
        # Penultimate layer, CLS dropped: the pruned count after layer 4 (index -2).
        kept = schedule.tokens_after(36)[-2]
        assert features[0].shape[0] == kept
        # LLaVA needs exactly that many image tokens in input_ids.
        input_ids = torch.tensor([[1] + [999] * kept + [5, 6]])
        out = model(input_ids=input_ids, pixel_values=x, attention_mask=torch.ones_like(input_ids))
        assert out.logits.shape == (1, kept + 3, 1000)


def test_unsupported_model_lists_supported_families() -> None:
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4))
    with pytest.raises(UnsupportedModelError, match="unsupported model CLIPTextModel; supported: .*CLIPVisionModel"):
        apply(text, Schedule.none(1, 36))
    with pytest.raises(UnsupportedModelError, match="SiglipVisionModel.*LlavaForConditionalGeneration"):
        apply(torch.nn.Linear(2, 2), Schedule.none(1, 36))


def test_schedule_that_does_not_fit_is_refused() -> None:
    model = clip_vision()
    with pytest.raises(ScheduleError, match="has 4 layers but this clip encoder has 6"):
        apply(model, Schedule.preset("skip", num_layers=4, tokens_in=36, tokens_out=12))
    with pytest.raises(ScheduleError, match="expects 49 patch tokens but this clip encoder makes 36"):
        apply(model, Schedule.preset("skip", num_layers=LAYERS, tokens_in=49, tokens_out=12))
    with pytest.raises(ScheduleError, match="made for a siglip encoder"):
        apply(model, Schedule.preset("skip", num_layers=LAYERS, tokens_in=36, tokens_out=12, family="siglip"))
    with pytest.raises(ScheduleError, match="without a CLS token"):
        apply(model, Schedule.preset("skip", num_layers=LAYERS, tokens_in=36, tokens_out=12, has_cls=False))


def test_applying_twice_is_refused_and_remove_is_idempotent() -> None:
    model = clip_vision()
    schedule = Schedule.preset("skip", num_layers=LAYERS, tokens_in=36, tokens_out=12)
    handle = apply(model, schedule)
    with pytest.raises(EvoPruneError, match="already has an EvoPrune schedule"):
        apply(model, schedule)
    handle.remove()
    handle.remove()
    with apply(model, schedule):
        pass


def test_profile_times_the_merge_steps_and_changes_no_output() -> None:
    model = clip_vision()
    schedule = Schedule.preset("skip", num_layers=LAYERS, tokens_in=36, tokens_out=12)  # CTR 0.25: statistics
    with torch.inference_mode(), apply(model, schedule) as handle:
        plain = model(pixel_values=pixels(2)).last_hidden_state
        handle.profile = True
        profiled = model(pixel_values=pixels(2)).last_hidden_state
    # merge_seconds adds the explicit attention's time over sdpa *signed* (noise averages out over layers), so on a
    # busy host and a tiny model it can come out below 0; that it was recorded at all is what is checked here.
    assert handle.merge_seconds != 0.0 and handle.profile_seconds > 0
    assert torch.equal(plain, profiled)


CHUNK_MODES = {
    # [3 items, 4 heads, 37 tokens]: budgets that force each way of splitting the explicit attention.
    "one batched computation": (3 * 4 * 37 * 37, [(slice(0, 3), [slice(None)])]),
    "two items per chunk": (2 * 4 * 37 * 37, [(slice(0, 2), [slice(None)]), (slice(2, 4), [slice(None)])]),
    "one item per chunk": (4 * 37 * 37, [(slice(i, i + 1), [slice(None)]) for i in range(3)]),
    "groups of two heads": (2 * 37 * 37, [(slice(i, i + 1), [slice(0, 2), slice(2, 4)]) for i in range(3)]),
    "single heads": (1, [(slice(i, i + 1), [slice(h, h + 1) for h in range(4)]) for i in range(3)]),
}


def test_attention_chunks_modes_and_the_cpu_default() -> None:
    for budget, expected in CHUNK_MODES.values():
        assert attention_chunks(3, 4, 37, "cpu", budget) == expected
    # A CPU keeps its cache-sized chunks (2**18 logits): the default is exactly that budget.
    assert default_chunk_logits("cpu") == 1 << 18
    for shape in [(1, 12, 197), (8, 16, 577), (64, 16, 729), (3, 4, 37)]:
        assert attention_chunks(*shape, "cpu") == attention_chunks(*shape, "cpu", 1 << 18)
    # ViT-B/16 at 224 (12 heads of 197 x 197 logits): one image per chunk, heads in groups of 6.
    assert attention_chunks(2, 12, 197, "cpu") == [(slice(i, i + 1), [slice(0, 6), slice(6, 12)]) for i in range(2)]
    # ViT-L/14 at 336 (577 x 577 logits, more than 2**18): one head at a time.
    assert attention_chunks(1, 16, 577, "cpu") == [(slice(0, 1), [slice(h, h + 1) for h in range(16)])]


def test_gpu_default_budget_follows_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU needed: the budget is plain arithmetic on what the CUDA allocator reports.
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * gib)
    budget = default_chunk_logits(torch.device("cuda", 0), torch.float16)
    assert budget == int(24 * gib * 0.25) // (3 * 2 + 4)
    # SigLIP so400m on 64 frames (16 heads, 729 tokens) fits one batched computation with that much memory.
    assert len(attention_chunks(64, 16, 729, "cuda", budget)) == 1
    # float32 takes 16 bytes per logit: two chunks of items.
    assert len(attention_chunks(64, 16, 729, "cuda", default_chunk_logits("cuda", torch.float32))) == 2
    # A huge GPU: capped at 2**30 logits per chunk.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (130 * gib, 140 * gib))
    assert default_chunk_logits("cuda", torch.float16) == 1 << 30
    # With little memory free it falls back to chunks, never below the CPU's chunk size.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * gib)
    assert default_chunk_logits("cuda", torch.float16) == 1 << 18


@pytest.mark.parametrize("mode", CHUNK_MODES)
def test_every_chunking_mode_equals_the_full_softmax(mode: str) -> None:
    # Merging layers compute attention explicitly, chunk by chunk, summing the attention received on the way: in
    # every mode the output must equal sdpa and a plain full softmax, and the attention received its column sums
    # (heads averaged), with and without the size bias; every mode gives the same result as the others.
    budget, _ = CHUNK_MODES[mode]
    apply_module = importlib.import_module("tuner.evoprune.apply")
    attention = resolve_encoder(clip_vision()).layers[0].self_attn
    hidden = torch.randn(3, 37, 32, generator=torch.Generator().manual_seed(3))
    bias = torch.rand(3, 1, 1, 37, generator=torch.Generator().manual_seed(4)).log()
    for mask in (None, bias):
        with torch.inference_mode():
            output, keys, received = apply_module._attention_with_statistics(attention, hidden, mask, True, budget)
            single, _, single_received = apply_module._attention_with_statistics(
                attention, hidden, mask, True, 1 << 30
            )
            reference, reference_keys, none = apply_module._attention_with_statistics(attention, hidden, mask, False)
            shape = (3, 37, 4, 8)
            query = attention.q_proj(hidden).view(shape).transpose(1, 2)
            key = attention.k_proj(hidden).view(shape).transpose(1, 2)
            value = attention.v_proj(hidden).view(shape).transpose(1, 2)
            logits = query @ key.transpose(-1, -2) * attention.scale + (0 if mask is None else mask)
            probabilities = torch.softmax(logits, dim=-1)
            full = attention.out_proj((probabilities @ value).transpose(1, 2).reshape(3, 37, 32))
            expected_received = probabilities.sum(dim=2).mean(dim=1)
        assert none is None and received is not None
        torch.testing.assert_close(output, full, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(output, single, rtol=1e-6, atol=1e-7)
        assert torch.equal(keys, reference_keys)
        torch.testing.assert_close(received, expected_received, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(received, single_received, rtol=1e-6, atol=1e-7)
        # Normalised over the patch tokens (CLS left out) it is the importance s~, mean 1 over the patches.
        torch.testing.assert_close(patch_importance(received, 1), attention_received(probabilities, 1))
        torch.testing.assert_close(patch_importance(received, 1).mean(dim=1), torch.ones(3))


@pytest.mark.parametrize("mode", CHUNK_MODES)
def test_aligned_operands_give_the_same_attention_and_statistics(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # On a GPU, large explicit attentions pad keys to a multiple of 8 and fold the size bias into one more channel
    # (cuBLAS's aligned kernels); forced here on a CPU, for 37 tokens (padded to 40) and 36 (a multiple of 8 only
    # with the bias), in every chunking mode: the output, keys and attention received must not change.
    budget, _ = CHUNK_MODES[mode]
    apply_module = importlib.import_module("tuner.evoprune.apply")
    attention = resolve_encoder(clip_vision()).layers[0].self_attn
    for length in (37, 40):
        hidden = torch.randn(3, length, 32, generator=torch.Generator().manual_seed(3))
        bias = torch.rand(3, 1, 1, length, generator=torch.Generator().manual_seed(4)).log()
        for mask in (None, bias):
            with torch.inference_mode():
                monkeypatch.setattr(apply_module, "_ALIGN_DEVICES", ())
                plain = apply_module._attention_with_statistics(attention, hidden, mask, True, budget)
                monkeypatch.setattr(apply_module, "_ALIGN_DEVICES", ("cpu",))
                monkeypatch.setattr(apply_module, "_ALIGN_MIN_LOGITS", 0)
                query = torch.zeros(3, 4, length, 8)
                assert apply_module._aligns(query, mask) == (mask is not None or length % 8 != 0)
                aligned = apply_module._attention_with_statistics(attention, hidden, mask, True, budget)
            torch.testing.assert_close(aligned[0], plain[0], rtol=1e-5, atol=1e-6)
            assert torch.equal(aligned[1], plain[1])
            assert aligned[2] is not None and aligned[2].shape == (3, length)
            torch.testing.assert_close(aligned[2], plain[2], rtol=1e-5, atol=1e-6)


def test_aligned_operands_pad_keys_and_channels_to_multiples_of_eight() -> None:
    apply_module = importlib.import_module("tuner.evoprune.apply")
    query, key, value = (torch.randn(2, 3, 13, 6) for _ in range(3))
    bias = torch.randn(2, 1, 1, 13)
    aligned_query, aligned_key, aligned_value = apply_module._aligned_operands(query, key, value, bias)
    shapes = (aligned_query.shape, aligned_key.shape, aligned_value.shape)
    assert shapes == ((2, 3, 13, 8), (2, 3, 16, 8), (2, 3, 16, 6))
    logits = aligned_query @ aligned_key.transpose(-1, -2)
    torch.testing.assert_close(logits[..., :13], query @ key.transpose(-1, -2) + bias)
    assert torch.all(logits[..., 13:] < -1e37) and torch.equal(aligned_value[:, :, 13:], torch.zeros(2, 3, 3, 6))
    assert torch.all(torch.softmax(logits, dim=-1)[..., 13:] == 0)


@pytest.mark.parametrize("budget", [CHUNK_MODES["one batched computation"][0], 1])
def test_forced_chunking_through_the_handle_changes_no_output(budget: int) -> None:
    model = clip_vision()
    schedule = Schedule.preset("skip", num_layers=LAYERS, tokens_in=36, tokens_out=12)
    with torch.inference_mode(), apply(model, schedule) as handle:
        default = model(pixel_values=pixels(3)).last_hidden_state
        handle.attention_chunk_logits = budget
        forced = model(pixel_values=pixels(3)).last_hidden_state
    torch.testing.assert_close(forced, default, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_slice_reducer_keeps_the_first_tokens_of_each_merging_layer(family: str) -> None:
    # The timing oracle: the same plan, each merging layer running the block's own attention and keeping its first
    # tokens (CLS stays), no statistics or scoring. Compared with the block's own modules run by hand.
    make, has_cls = FAMILIES[family]
    model = make()
    cls = 1 if has_cls else 0
    schedule = Schedule.preset("skip", num_layers=LAYERS, tokens_in=36, tokens_out=12, scoring=SCORINGS[2])
    x = pixels(2)
    captured: list[torch.Tensor] = []
    first = resolve_encoder(model).layers[0]
    hook = first.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    with torch.inference_mode():
        with apply(model, schedule, reducer="slice") as handle:
            sliced = model(pixel_values=x, output_hidden_states=True).hidden_states
        hook.remove()
        hidden = captured[0]
        for index, layer in enumerate(resolve_encoder(model).layers):
            remove = schedule.remove_per_layer[index]
            if remove:
                hidden = hidden + layer.self_attn(hidden_states=layer.layer_norm1(hidden), attention_mask=None)[0]
                hidden = hidden[:, : hidden.shape[1] - remove]
                hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
            else:
                hidden = layer(hidden, None)
            torch.testing.assert_close(sliced[index + 1], hidden)
    assert handle.token_counts == schedule.tokens_after(36)
    assert handle.sizes is not None and torch.equal(handle.sizes, torch.ones(2, 12))
    assert handle.source is not None and handle.source[0].tolist() == list(range(12)) + [-1] * 24
    assert handle.ctr_reductions == {}
    assert not any("forward" in module.__dict__ for module in model.modules())
    assert hidden.shape[1] == 12 + cls


def test_unknown_reducer_is_refused() -> None:
    with pytest.raises(ValueError, match="reducer must be 'merge' or 'slice'"):
        apply(clip_vision(), Schedule.none(LAYERS, 36), reducer="drop")  # type: ignore[arg-type]


def test_ctr_reductions_are_counted_per_merging_layer() -> None:
    # Heavy steps under a high CTR: protection inside set A must shrink to |A| - r so that the step removes r.
    model = clip_vision()
    schedule = Schedule([0, 14, 0, 8, 0, 0], tokens_in=36, scoring=Scoring(ctr=0.6))
    with torch.inference_mode(), apply(model, schedule) as handle:
        assert handle.ctr_reductions == {}
        model(pixel_values=pixels(6))
        counts = handle.ctr_reductions
        assert list(counts) == [1, 3] and all(0 <= count <= 6 for count in counts.values())
        assert sum(counts.values()) > 0
    with torch.inference_mode(), apply(model, Schedule([0, 4, 0, 4, 0, 0], tokens_in=36)) as handle:
        model(pixel_values=pixels(6))
        # Light steps: N_protect = round(0.25 * T) always fits, nothing is reduced.
        assert handle.ctr_reductions == {1: 0, 3: 0}
    tome = Scoring(w_div=0.0, w_attn=0.0, ctr=0.0)
    with torch.inference_mode(), apply(model, Schedule([0, 4, 0, 4, 0, 0], tokens_in=36, scoring=tome)) as handle:
        model(pixel_values=pixels(2))
        assert handle.ctr_reductions == {1: 0, 3: 0}


def test_gradients_flow_through_a_merging_forward() -> None:
    # Fine-tuning with a schedule applied (as ToMe allows) needs autograd through a merging forward: the explicit,
    # chunked attention, the merge step's gathers and the size-weighted means.
    model = clip_vision()
    schedule = Schedule.preset("skip", num_layers=LAYERS, tokens_in=36, tokens_out=12)
    with apply(model, schedule):
        loss = model(pixel_values=pixels(2)).last_hidden_state.square().mean()
        loss.backward()
    gradient = resolve_encoder(model).layers[0].self_attn.q_proj.weight.grad
    assert gradient is not None and torch.isfinite(gradient).all() and gradient.abs().sum() > 0

