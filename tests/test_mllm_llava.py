"""LLaVA-1.5 prepared with a schedule: prompts with native image-token runs work in forward, loss and generate.

A tiny random LLaVA built from configs with transformers' own classes (CLIP tower, Llama language model); the
prompts are made the way LlavaProcessor makes them (each <image> expanded to the native count).
"""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from tuner.evoprune import Schedule, ScheduleError, Scoring, UnsupportedModelError
from tuner.mllm import IGNORE_INDEX, image_runs, llava_layers_used, prepare_llava, rewrite_image_runs

IMAGE_TOKEN = 31
PAD = 0
PATCHES = 16  # 32 px, patch 8
VISION_LAYERS = 4


def tiny_llava(strategy: str = "default", feature_layer: int = -2) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=VISION_LAYERS, num_attention_heads=4, image_size=32,
        patch_size=8,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=40, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, max_position_embeddings=128,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
    )  # fmt: skip
    return LlavaForConditionalGeneration(config).eval()


def prompt(before: list[int], after: list[int], images: int = 1, native: int = PATCHES) -> list[int]:
    return before + [IMAGE_TOKEN] * (native * images) + after


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def schedule_for(model: LlavaForConditionalGeneration, tokens_out: int) -> Schedule:
    """Half the tokens at layer 0, then down to ``tokens_out`` at layer 1 (of the layers LLaVA reads)."""
    plan = [PATCHES // 2, PATCHES // 2 - tokens_out] + [0] * (llava_layers_used(model) - 2)
    return Schedule(plan, PATCHES, scoring=Scoring(ctr=0.0), family="clip", has_cls=True)


# ------------------------------------------------------------------------------------------------- token runs


def test_runs_of_each_image_shrink_and_the_text_is_untouched() -> None:
    rows = [prompt([1, 5, 6], [7, 8, 9]), prompt([1, 5], [7], images=2)]  # two prompts, one and two images
    ids, mask = left_padded(rows)
    labels = torch.where(ids == IMAGE_TOKEN, IGNORE_INDEX, ids)
    out = rewrite_image_runs(
        ids, image_token_id=IMAGE_TOKEN, native=PATCHES, pruned=4, pad_token_id=PAD, attention_mask=mask, labels=labels
    )
    assert out.images_per_row == [1, 2]
    expected = [prompt([1, 5, 6], [7, 8, 9], native=4), prompt([1, 5], [7], images=2, native=4)]
    width = max(map(len, expected))
    assert out.input_ids.shape == (2, width)
    for row, want in enumerate(expected):
        real = out.attention_mask[row].bool()
        assert out.input_ids[row][real].tolist() == want  # text order kept, runs shrunk
        assert not bool(out.attention_mask[row][: width - len(want)].any())  # padded on the left, as given
        assert out.labels[row][real].tolist() == [IGNORE_INDEX if t == IMAGE_TOKEN else t for t in want]
        assert set(out.labels[row][~real].tolist()) <= {IGNORE_INDEX}


def test_right_padding_is_kept_and_a_foreign_run_is_refused() -> None:
    ids = torch.tensor([prompt([1], [5, 6]), prompt([1], [5]) + [PAD]])
    mask = (torch.arange(ids.shape[1]) < torch.tensor([[ids.shape[1]], [ids.shape[1] - 1]])).long()
    out = rewrite_image_runs(ids, image_token_id=IMAGE_TOKEN, native=PATCHES, pruned=8, pad_token_id=PAD,
                             attention_mask=mask)  # fmt: skip
    assert out.attention_mask[1].tolist()[-1] == 0 and out.attention_mask[:, 0].all()
    assert [length for _, length in image_runs(out.input_ids[0], IMAGE_TOKEN)] == [8]
    with pytest.raises(ValueError, match="not a multiple of 16"):
        rewrite_image_runs(torch.tensor([prompt([1], [2], native=10)]), image_token_id=IMAGE_TOKEN, native=16,
                           pruned=4, pad_token_id=PAD)  # fmt: skip


# ---------------------------------------------------------------------------------------------- the LLaVA model


def test_only_the_layers_llava_reads_run_and_nothing_merged_is_the_native_model() -> None:
    model = tiny_llava()
    assert llava_layers_used(model) == VISION_LAYERS - 1  # vision_feature_layer=-2: the last layer is not read
    ids, mask = left_padded([prompt([1, 5, 6], [7, 8]), prompt([1, 5], [7])])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        native = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    last_layer_calls = []
    hook = resolve_last_mlp(model).register_forward_hook(lambda *args: last_layer_calls.append(1))
    try:
        empty = Schedule.none(VISION_LAYERS - 1, PATCHES, family="clip", has_cls=True)
        with prepare_llava(model, empty), torch.no_grad():
            kept = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels)  # removed: the last layer runs again
    finally:
        hook.remove()
    assert torch.allclose(kept, native, atol=1e-6)  # skipping the unread layer changes no output
    assert len(last_layer_calls) == 1


def resolve_last_mlp(model: LlavaForConditionalGeneration) -> torch.nn.Module:
    return model.model.vision_tower.encoder.layers[-1].mlp


def test_forward_loss_and_generate_take_native_prompts_and_remove_restores() -> None:
    model = tiny_llava()
    ids, mask = left_padded([prompt([1, 5, 6], [7, 8, 9]), prompt([1, 5], [7])])  # different prompts in one batch
    labels = torch.where((ids == IMAGE_TOKEN) | (mask == 0), IGNORE_INDEX, ids)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    schedule = schedule_for(model, 4)
    with prepare_llava(model, schedule) as pruning, torch.no_grad():
        assert (pruning.native_tokens, pruning.pruned_tokens) == (PATCHES, 4)
        output = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
        assert pruning.engine.token_counts == [*schedule.tokens_after(), 4]  # the pass-through layer keeps 4
        generated = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3,
                                   do_sample=False)  # fmt: skip
    assert output.logits.shape[:2] == (2, ids.shape[1] - (PATCHES - 4))  # one image per row: 12 tokens fewer
    assert torch.isfinite(output.loss)
    assert generated.shape == (2, ids.shape[1] - (PATCHES - 4) + 3)  # the rewritten prompt, then 3 new tokens
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert torch.equal(after, before)  # removed: the native model again


def test_the_full_strategy_keeps_cls_among_the_features() -> None:
    model = tiny_llava(strategy="full", feature_layer=-1)
    assert llava_layers_used(model) == VISION_LAYERS
    schedule = Schedule.preset("first", num_layers=VISION_LAYERS, tokens_in=PATCHES, tokens_out=8, n=1,
                               family="clip", has_cls=True)  # fmt: skip
    ids, mask = left_padded([prompt([1, 5], [7], native=PATCHES + 1)])
    with prepare_llava(model, schedule) as pruning, torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(1, 3, 32, 32)).logits
    assert (pruning.native_tokens, pruning.pruned_tokens) == (PATCHES + 1, 9)
    assert logits.shape[1] == ids.shape[1] - 8


def test_a_schedule_for_the_whole_tower_and_a_non_llava_are_refused() -> None:
    model = tiny_llava()
    whole = Schedule.none(VISION_LAYERS, PATCHES)
    with pytest.raises(ScheduleError, match="make a schedule for the 3 layers that run"):
        prepare_llava(model, whole)
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):
        prepare_llava(model.model, schedule_for(model, 8))  # type: ignore[arg-type]
    # A failed preparation leaves nothing behind: the model can be prepared again.
    with prepare_llava(model, schedule_for(model, 8)):
        pass


def test_a_run_grows_when_the_budget_is_above_the_models_own_count() -> None:
    # LLaVA-OneVision pools a frame to 9 tokens; a merge budget of 12 per frame makes the run longer.
    ids = torch.tensor([[1, 5] + [IMAGE_TOKEN] * 9 + [7]])
    labels = torch.tensor([[1, 5] + [IGNORE_INDEX] * 9 + [7]])
    out = rewrite_image_runs(ids, image_token_id=IMAGE_TOKEN, native=9, pruned=12, pad_token_id=PAD, labels=labels)
    assert out.input_ids.tolist() == [[1, 5] + [IMAGE_TOKEN] * 12 + [7]]
    assert out.labels is not None and out.labels.tolist() == [[1, 5] + [IGNORE_INDEX] * 12 + [7]]
