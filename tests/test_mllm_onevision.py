"""LLaVA-OneVision (SigLIP tower) prepared with a schedule: image tiles and video frames merged one by one, each
image's and video's run rewritten to its pruned count, no pooling, tiles packed as documented in tuner.mllm.onevision.

Tiny random models built from configs with transformers' own classes; images go through transformers' own
LLaVA-OneVision image processor (its PIL backend), and prompts hold the counts LlavaOnevisionProcessor writes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    BatchFeature,
    LlamaConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from search_spaces import EncoderShape
from tuner.evoprune import EvoPruneError, Schedule, Scoring
from tuner.mllm import (
    OnevisionVideoPruning,
    image_runs,
    image_tile_grid,
    native_image_tokens,
    pooled_tokens_per_frame,
    prepare_onevision,
    prepare_onevision_video,
)

VIDEO_TOKEN, IMAGE_TOKEN, PAD = 38, 39, 0
PATCHES = 36  # 48 px, patch 8: a 6x6 grid, pooled 2x2 to 3x3 = 9 tokens per frame
FRAMES = 3
TILE = 48
PINPOINTS = [[48, 48], [48, 96], [96, 48], [96, 96]]  # tile grids 1x1, 1x2, 2x1, 2x2
# Image sizes (height, width) and their tile grids: a wide image in 1x2 tiles, a near-square one in 2x2.
WIDE, SQUARE = (40, 90), (90, 85)


def tiny_onevision(aspect_ratio: str = "anyres_max_9") -> LlavaOnevisionForConditionalGeneration:
    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=TILE, patch_size=8)  # fmt: skip
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=40, pad_token_id=PAD, max_position_embeddings=512)  # fmt: skip
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, video_token_index=VIDEO_TOKEN, image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio=aspect_ratio,
    )  # fmt: skip
    return LlavaOnevisionForConditionalGeneration(config).eval()


def processed(sizes: list[tuple[int, int]], *, one_prompt: bool = False) -> BatchFeature:
    """Random images of these (height, width) through transformers' OneVision image processor (PIL backend): one
    image per prompt (tiled), or all in one prompt (``one_prompt``: the processor sends base tiles only)."""
    generator = np.random.default_rng(0)
    pictures = [Image.fromarray(generator.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    processor = LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)
    if one_prompt:
        return processor([pictures], return_tensors="pt")  # type: ignore[arg-type]  # a list per prompt is valid
    return processor(pictures, return_tensors="pt")


def processor_counts(inputs: BatchFeature, aspect_ratio: str = "anyres_max_9") -> list[int]:
    """Image tokens per image as LlavaOnevisionProcessor expands ``<image>`` (its own replace_image_token). Built
    without __init__: its video processor needs torchvision, which is not installed; only these fields are read."""
    processor = object.__new__(LlavaOnevisionProcessor)
    processor.image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS
    )
    processor.num_image_tokens, processor.vision_feature_select_strategy = PATCHES, "full"
    processor.vision_aspect_ratio, processor.image_token = aspect_ratio, "<image>"
    expansions = [processor.replace_image_token(dict(inputs), i) for i in range(len(inputs.image_sizes))]
    return [len(expansion) // len("<image>") for expansion in expansions]


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def per_tile(tokens_out: int) -> Schedule:
    """18 patches at layer 0, then down to ``tokens_out`` at layer 1; layer 2 merges nothing."""
    return Schedule([18, 18 - tokens_out, 0], PATCHES, scoring=Scoring(ctr=0.0), family="siglip", has_cls=False)


def text_of(row: torch.Tensor, mask: torch.Tensor) -> list[int]:
    """The real tokens of a row that are no image or video token: the text, in order."""
    real = row[mask.bool()]
    return real[(real != IMAGE_TOKEN) & (real != VIDEO_TOKEN)].tolist()


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


# ------------------------------------------------------------------------------------------------- images


def test_native_counts_are_the_processors_and_the_models() -> None:
    sizes = [WIDE, SQUARE, (48, 48), (30, 100), (100, 30), (200, 150)]
    inputs = processed(sizes)
    model = tiny_onevision()
    assert [image_tile_grid(model, size) for size in sizes] == [(1, 2), (2, 2), (1, 1), (1, 2), (2, 1), (2, 2)]
    assert [native_image_tokens(model, size) for size in inputs.image_sizes] == processor_counts(inputs)
    # anyres_max_1: grids above one tile's worth of patches are downsampled; the count follows.
    small = tiny_onevision("anyres_max_1")
    counts = [native_image_tokens(small, size) for size in inputs.image_sizes]
    assert counts == processor_counts(inputs, "anyres_max_1") and counts[1] < native_image_tokens(model, SQUARE)
    # Images sharing a prompt are not tiled: one base tile and a newline each.
    together = processed([WIDE, SQUARE], one_prompt=True)
    assert together.batch_num_images.tolist() == [2]
    assert [native_image_tokens(model, s, tiled=False) for s in together.image_sizes] == processor_counts(together)
    assert processor_counts(together) == [PATCHES + 1] * 2
    # The native model agrees: it accepts prompts of these counts (it checks tokens against features).
    ids, mask = left_padded([[1, 5] + [IMAGE_TOKEN] * n + [7] for n in processor_counts(inputs)[:2]])
    pixels = {"pixel_values": inputs.pixel_values[:2], "image_sizes": inputs.image_sizes[:2]}
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **pixels)


def test_images_of_different_tile_grids_merge_per_tile_and_each_run_gets_its_own_count() -> None:
    model = tiny_onevision()
    inputs = processed([WIDE, SQUARE])  # 1 + 2 and 1 + 4 tiles
    natives = processor_counts(inputs)
    rows = [[1, 5, 6] + [IMAGE_TOKEN] * natives[0] + [7, 8], [1, 5] + [IMAGE_TOKEN] * natives[1] + [7]]
    ids, mask = left_padded(rows)
    pixels = {"pixel_values": inputs.pixel_values, "image_sizes": inputs.image_sizes}
    with torch.no_grad():
        native = model(input_ids=ids, attention_mask=mask, **pixels).logits
    with prepare_onevision(model, per_tile(12)) as pruning, torch.no_grad():
        # (1 + tiles) x 12 tokens, one newline per row of tiles.
        assert [pruning.image_tokens(size) for size in inputs.image_sizes] == [3 * 12 + 1, 5 * 12 + 2]
        rewritten = pruning.rewrite({"input_ids": ids, "attention_mask": mask, **pixels})
        new_ids, new_mask = rewritten["input_ids"], rewritten["attention_mask"]
        runs = [
            [n for _, n in image_runs(row[m.bool()], IMAGE_TOKEN)] for row, m in zip(new_ids, new_mask, strict=True)
        ]
        assert runs == [[37], [62]]
        texts = [text_of(r, m) for r, m in zip(new_ids, new_mask, strict=True)]
        assert texts == [text_of(r, m) for r, m in zip(ids, mask, strict=True)] == [[1, 5, 6, 7, 8], [1, 5, 7]]
        assert bool((new_mask[:, -1] == 1).all())  # still left-padded
        logits = model(input_ids=ids, attention_mask=mask, **pixels).logits
        assert pruning.engine.token_counts == [18, 12, 12]
        assert pruning.engine.sizes is not None and pruning.engine.sizes.shape == (3 + 5, 12)  # one item a tile
        generated = model.generate(input_ids=ids, attention_mask=mask, **pixels, max_new_tokens=2, do_sample=False)
    assert logits.shape[1] == new_ids.shape[1] == max(len(rows[0]) - natives[0] + 37, len(rows[1]) - natives[1] + 62)
    assert generated.shape == (2, new_ids.shape[1] + 2)
    assert torch.equal(generated[:, : new_ids.shape[1]], new_ids)  # generate continues the rewritten prompt
    with torch.no_grad():
        again = model(input_ids=ids, attention_mask=mask, **pixels).logits
    assert torch.equal(again, native)  # removed: the native packing and the full tower again


@pytest.mark.parametrize("tokens_out", [PATCHES, 12])
def test_tiles_are_packed_base_first_then_row_by_row_with_a_newline_per_row(tokens_out: int) -> None:
    model = tiny_onevision()
    inputs = processed([SQUARE, WIDE])  # 2x2 tiles, then 1x2
    tiles = torch.cat([inputs.pixel_values[0, :5], inputs.pixel_values[1, :3]])
    newline = model.model.image_newline.detach()
    schedule = per_tile(tokens_out) if tokens_out < PATCHES else Schedule.preset(
        "skip", num_layers=3, tokens_in=PATCHES, tokens_out=PATCHES, scoring=Scoring(ctr=0.0), family="siglip",
        has_cls=False,
    )  # fmt: skip
    assert schedule.tokens_out == tokens_out
    with torch.no_grad():
        native_hidden = model.model.vision_tower(tiles, output_hidden_states=True).hidden_states[-1]
        native_tower = model.model.multi_modal_projector(native_hidden)
    with prepare_onevision(model, schedule) as pruning, torch.no_grad():
        packed = model.model.get_image_features(inputs.pixel_values, inputs.image_sizes).pooler_output
        # The tower's own output for each tile, a batch item each, projected: what the packing must lay out.
        hidden = model.model.vision_tower(tiles, output_hidden_states=True).hidden_states[-1]
        per_tile_features = model.model.multi_modal_projector(hidden)
        source = pruning.engine.source
    square, wide = per_tile_features[:5], per_tile_features[5:]
    expected_square = torch.cat([square[0], square[1], square[2], newline[None], square[3], square[4], newline[None]])
    expected_wide = torch.cat([wide[0], wide[1], wide[2], newline[None]])
    assert [p.shape[0] for p in packed] == [5 * tokens_out + 2, 3 * tokens_out + 1]
    torch.testing.assert_close(packed[0], expected_square)
    torch.testing.assert_close(packed[1], expected_wide)
    if tokens_out == PATCHES:  # nothing merged: the tower's own tokens, in their grid order
        torch.testing.assert_close(per_tile_features, native_tower)
        return
    # Within each merged tile the tokens are in spatial order: ordered by the first patch they cover.
    assert source is not None and source.shape == (8, PATCHES)
    for covers in source:
        first = [int(torch.nonzero(covers == token)[0]) for token in range(tokens_out)]
        assert first == sorted(first)


def test_images_sharing_a_prompt_are_merged_untiled_with_one_newline_each() -> None:
    model = tiny_onevision()
    inputs = processed([WIDE, SQUARE], one_prompt=True)
    natives = processor_counts(inputs)
    ids = torch.tensor([[1, 5] + [IMAGE_TOKEN] * natives[0] + [6] + [IMAGE_TOKEN] * natives[1] + [7]])
    pixels = {k: inputs[k] for k in ("pixel_values", "image_sizes", "batch_num_images")}
    with prepare_onevision(model, per_tile(12)) as pruning, torch.no_grad():
        rewritten = pruning.rewrite({"input_ids": ids, **pixels})
        logits = model(input_ids=ids, **pixels).logits
        assert pruning.engine.sizes is not None and pruning.engine.sizes.shape == (2, 12)  # base tiles only
    assert [n for _, n in image_runs(rewritten["input_ids"][0], IMAGE_TOKEN)] == [13, 13]
    assert text_of(rewritten["input_ids"][0], torch.ones(rewritten["input_ids"].shape[1])) == [1, 5, 6, 7]
    assert logits.shape[1] == ids.shape[1] - sum(natives) + 26


def test_an_image_and_a_video_in_one_batch_of_one_prepared_model() -> None:
    model = tiny_onevision()
    inputs = processed([SQUARE])
    natives = processor_counts(inputs)
    ids, mask = left_padded([[1, 5] + [IMAGE_TOKEN] * natives[0] + [7], video_prompt([1, 6], [8], 9)])
    videos = torch.randn(1, FRAMES, 3, TILE, TILE)
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": inputs.pixel_values,
             "image_sizes": inputs.image_sizes, "pixel_values_videos": videos}  # fmt: skip
    with torch.no_grad():
        native = model(**batch).logits
    with prepare_onevision_video(model, per_tile(12)) as pruning, torch.no_grad():
        assert isinstance(pruning, OnevisionVideoPruning)  # the former entry and name still work
        rewritten = pruning.rewrite(dict(batch))
        logits = model(**batch).logits
        generated = model.generate(**batch, max_new_tokens=2, do_sample=False)
    new_ids, new_mask = rewritten["input_ids"], rewritten["attention_mask"]
    assert [n for _, n in image_runs(new_ids[0][new_mask[0].bool()], IMAGE_TOKEN)] == [5 * 12 + 2]
    assert [n for _, n in image_runs(new_ids[1][new_mask[1].bool()], VIDEO_TOKEN)] == [FRAMES * 12 + 1]
    assert [text_of(r, m) for r, m in zip(new_ids, new_mask, strict=True)] == [[1, 5, 7], [1, 6, 8]]
    assert logits.shape[1] == generated.shape[1] - 2 == new_ids.shape[1]
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, native)


def test_image_prompts_that_do_not_fit_are_refused_with_the_fix() -> None:
    model = tiny_onevision()
    inputs = processed([WIDE])
    natives = processor_counts(inputs)
    with prepare_onevision(model, per_tile(12)), torch.no_grad():
        with pytest.raises(EvoPruneError, match="needs image_sizes"):
            model(input_ids=torch.tensor([[1] + [IMAGE_TOKEN] * natives[0]]), pixel_values=inputs.pixel_values)
        with pytest.raises(EvoPruneError, match=r"run of 50 image tokens .*expected image runs of \[114\]"):
            model(input_ids=torch.tensor([[1] + [IMAGE_TOKEN] * 50]), **inputs)
