"""LLaVA-OneVision (SigLIP tower) prepared for video: frames merged one by one, the video run rewritten, no pooling."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

from search_spaces import EncoderShape
from tuner.evoprune import EvoPruneError, Schedule, Scoring
from tuner.mllm import pooled_tokens_per_frame, prepare_onevision_video

VIDEO_TOKEN, IMAGE_TOKEN, PAD = 38, 39, 0
PATCHES = 36  # 48 px, patch 8: a 6x6 grid, pooled 2x2 to 3x3 = 9 tokens per frame
FRAMES = 3


def tiny_onevision() -> LlavaOnevisionForConditionalGeneration:
    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=48, patch_size=8)  # fmt: skip
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=40, pad_token_id=PAD, max_position_embeddings=256)  # fmt: skip
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, video_token_id=VIDEO_TOKEN, image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    )  # fmt: skip
    return LlavaOnevisionForConditionalGeneration(config).eval()


def video_prompt(before: list[int], after: list[int], per_frame: int) -> list[int]:
    return before + [VIDEO_TOKEN] * (FRAMES * per_frame + 1) + after


def test_frames_merge_one_by_one_and_the_video_run_shrinks() -> None:
    model = tiny_onevision()
    assert pooled_tokens_per_frame(model) == 9
    shape = EncoderShape.of_model(model)
    assert (shape.num_layers, shape.tokens_in, shape.has_cls) == (3, PATCHES, False)
    rows = [video_prompt([1, 5, 6], [7, 8], 9), video_prompt([1, 5], [7], 9)]
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    videos = torch.randn(2, FRAMES, 3, 48, 48)
    with torch.no_grad():
        native = model(input_ids=ids, attention_mask=mask, pixel_values_videos=videos).logits
    schedule = Schedule([18, 6, 0], PATCHES, scoring=Scoring(ctr=0.0), family="siglip", has_cls=False)  # 12 per frame
    with prepare_onevision_video(model, schedule) as pruning, torch.no_grad():
        assert pruning.pruned_tokens == 12
        logits = model(input_ids=ids, attention_mask=mask, pixel_values_videos=videos).logits
        assert pruning.engine.token_counts == [18, 12, 12]
        assert pruning.engine.sizes is not None and pruning.engine.sizes.shape == (2 * FRAMES, 12)  # one item a frame
        generated = model.generate(input_ids=ids, attention_mask=mask, pixel_values_videos=videos, max_new_tokens=2,
                                   do_sample=False)  # fmt: skip
        with pytest.raises(EvoPruneError, match="images .* not supported yet"):
            model(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 48, 48))
    # 9 pooled tokens per frame become 12 merged ones: the run grows by 3 per frame (a merge budget, not pooling).
    assert logits.shape[1] == width + FRAMES * (12 - 9)
    assert generated.shape == (2, width + FRAMES * 3 + 2)
    with torch.no_grad():
        again = model(input_ids=ids, attention_mask=mask, pixel_values_videos=videos).logits
    assert torch.equal(again, native)  # removed: pooling and the full tower again


def test_a_schedule_to_the_pooled_count_gives_the_native_prompt_length() -> None:
    model = tiny_onevision()
    ids = torch.tensor([video_prompt([1, 5], [7], 9)])
    schedule = Schedule([18, 9, 0], PATCHES, scoring=Scoring(ctr=0.0), family="siglip", has_cls=False)  # 9 per frame
    with prepare_onevision_video(model, schedule), torch.no_grad():
        logits = model(input_ids=ids, pixel_values_videos=torch.randn(1, FRAMES, 3, 48, 48)).logits
    assert logits.shape[1] == ids.shape[1]  # same count as the native pooling: no rewrite needed
