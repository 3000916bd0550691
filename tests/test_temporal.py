"""Temporal merging on video (docs/method.md, "Temporal merging"): frames fold tokens into the previous frame."""

from __future__ import annotations

import json
from dataclasses import replace

import optuna
import pytest
import torch
from transformers import (
    LlamaConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from search_spaces import EncoderShape, get_space
from search_spaces.base import SearchSpaceError
from tuner.evoprune import EvoPruneError, Schedule, ScheduleError, Scoring, TokenState, apply, merge_step
from tuner.evoprune.format import schedule_from_json, schedule_to_json
from tuner.evoprune.temporal import (
    TemporalChoice,
    resolve_chains,
    temporal_choice,
    temporal_merge,
    temporal_merge_step,
)
from tuner.mllm import prepare_onevision_video

PATCHES = 36  # 48 px, patch 8: a 6x6 grid
FRAMES = 4
PLAIN = Scoring(w_div=0.0, ctr=0.0)  # similarity only: ties and penalties cannot blur what a test looks at


def tiny_siglip() -> SiglipVisionModel:
    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=48, patch_size=8)  # fmt: skip
    return SiglipVisionModel(config).eval()


def static_video(videos: int = 2) -> torch.Tensor:
    """``videos`` videos of FRAMES identical frames each, as the tower gets them: ``[videos * FRAMES, 3, 48, 48]``."""
    torch.manual_seed(1)
    frames = torch.randn(videos, 1, 3, 48, 48).expand(videos, FRAMES, 3, 48, 48)
    return frames.reshape(videos * FRAMES, 3, 48, 48).contiguous()


def moving_video(videos: int = 2) -> torch.Tensor:
    """A textured object moving over a textured background: every frame shifts the whole picture by 8 px (a patch)
    and adds fresh noise, so no patch of frame t has an exact match in frame t - 1."""
    torch.manual_seed(2)
    scene = torch.randn(videos, 3, 48, 48 + 8 * FRAMES)
    frames = [scene[..., 8 * t : 8 * t + 48] + 0.5 * torch.randn(videos, 3, 48, 48) for t in range(FRAMES)]
    return torch.stack(frames, dim=1).reshape(videos * FRAMES, 3, 48, 48)


def run(model: SiglipVisionModel, schedule: Schedule, pixels: torch.Tensor, frames: int | None):
    with apply(model, schedule) as handle, torch.no_grad():
        handle.frames_per_item = frames
        output = model(pixel_values=pixels).last_hidden_state
    return output, handle


def test_weight_zero_is_bit_identical_to_the_per_frame_engine() -> None:
    model = tiny_siglip()
    pixels = moving_video()
    for scoring in (PLAIN, Scoring(), Scoring(w_div=0.3, w_attn=0.5, ctr=0.1, proportional_attention=True)):
        schedule = Schedule([12, 6, 0], PATCHES, scoring=scoring)
        assert Scoring(**{**scoring.to_dict(), "temporal_weight": 0.0}) == scoring
        images, image_handle = run(model, schedule, pixels, None)
        video, video_handle = run(model, schedule, pixels, FRAMES)
        assert torch.equal(video, images)
        assert video_handle.sizes is not None and image_handle.sizes is not None
        assert torch.equal(video_handle.sizes, image_handle.sizes)
        assert video_handle.temporal_merges == {} and video_handle.source_item is None


def test_a_tiny_weight_never_merges_temporally_and_matches_the_spatial_step() -> None:
    torch.manual_seed(3)
    x = torch.randn(2 * FRAMES, PATCHES, 16)
    importance = torch.rand(2 * FRAMES, PATCHES) + 0.5
    start = TokenState.start(2 * FRAMES, PATCHES, "cpu")
    spatial, spatial_state = merge_step(x, x, start, 10, Scoring(w_attn=0.2), importance)
    scoring = Scoring(w_attn=0.2, temporal_weight=1e-30)  # similarity term times 1e30: no temporal pair can win
    merged, state, moved = temporal_merge_step(x, x, start, 10, scoring, FRAMES, importance)
    assert moved.tolist() == [0] * (2 * FRAMES)
    torch.testing.assert_close(merged, spatial)
    assert torch.equal(state.sizes, spatial_state.sizes) and torch.equal(state.source, spatial_state.source)
    assert state.source_item is not None
    assert torch.equal(state.source_item, torch.arange(2 * FRAMES)[:, None].expand(-1, PATCHES))


def test_a_tiny_weight_through_the_model_gives_the_per_frame_tokens() -> None:
    # Every layer after the first sees merged tokens (sizes above 1): the temporal path must weigh them as the
    # spatial one does, and leave its input alone.
    model = tiny_siglip()
    pixels = moving_video()
    spatial, spatial_handle = run(model, Schedule([12, 6, 3], PATCHES), pixels, FRAMES)
    tiny = Schedule([12, 6, 3], PATCHES, scoring=Scoring(temporal_weight=1e-30))
    temporal, temporal_handle = run(model, tiny, pixels, FRAMES)
    assert temporal_handle.temporal_merges == {0: 0, 1: 0, 2: 0}
    assert temporal_handle.sizes is not None and spatial_handle.sizes is not None
    assert torch.equal(temporal_handle.sizes, spatial_handle.sizes)
    torch.testing.assert_close(temporal, spatial)
    torch.manual_seed(5)
    x = torch.randn(FRAMES, PATCHES, 8)
    state = TokenState.start(FRAMES, PATCHES, "cpu")
    state.sizes = torch.rand(FRAMES, PATCHES) + 1.0
    kept = x.clone()
    temporal_merge_step(x, x, state, 6, Scoring(temporal_weight=1.0), FRAMES, torch.ones(FRAMES, PATCHES))
    assert torch.equal(x, kept)


def test_a_static_video_folds_every_later_frame_into_the_previous_one() -> None:
    model = tiny_siglip()
    pixels = static_video()
    schedule = Schedule([12, 6, 0], PATCHES, scoring=Scoring(w_div=0.0, ctr=0.0, temporal_weight=1.0))
    output, handle = run(model, schedule, pixels, FRAMES)
    # Counts as specified: every frame keeps the plan's count, the batch stays one tensor.
    assert handle.token_counts == [24, 18, 18] and output.shape == (2 * FRAMES, 18, 32)
    # At the first merging layer the frames are identical: frames 1..3 remove all their 12 tokens temporally.
    assert handle.temporal_merges[0] == 2 * (FRAMES - 1) * 12
    assert handle.temporal_merges[1] > 0
    # Sizes conserved per video (every patch of every frame counted once), not per frame: frame 0 holds more.
    assert handle.sizes is not None and handle.source is not None and handle.source_item is not None
    per_frame = handle.sizes.sum(dim=1).view(2, FRAMES)
    assert per_frame.sum(dim=1).tolist() == [FRAMES * PATCHES] * 2
    assert (per_frame[:, 0] > PATCHES).all()
    # The source map agrees with the sizes: each output token covers as many patches as its size says.
    covered = torch.zeros(2 * FRAMES, 18).index_put_(
        (handle.source_item.flatten(), handle.source.flatten()), torch.ones(2 * FRAMES * PATCHES), accumulate=True
    )
    assert torch.equal(covered, handle.sizes)
    # Temporal merging never crosses a video: frame 0 of each video receives only from its own frames.
    video_of_patch = torch.arange(2 * FRAMES)[:, None].expand(-1, PATCHES) // FRAMES
    assert torch.equal(handle.source_item // FRAMES, video_of_patch)


def test_moving_content_merges_fewer_tokens_temporally() -> None:
    model = tiny_siglip()
    # The paper's scoring (spatial pairs carry their diversity factor) and similarity alone, each at a weight where
    # temporal and spatial pairs compete.
    for scoring in (Scoring(temporal_weight=0.5), Scoring(w_div=0.0, ctr=0.0, temporal_weight=0.9)):
        schedule = Schedule([12, 6, 0], PATCHES, scoring=scoring)
        _, static = run(model, schedule, static_video(), FRAMES)
        _, moving = run(model, schedule, moving_video(), FRAMES)
        assert 0 < sum(moving.temporal_merges.values()) < sum(static.temporal_merges.values())
        # A lower weight asks temporal pairs to be more similar than the spatial ones: fewer temporal merges.
        lower = Schedule([12, 6, 0], PATCHES, scoring=replace(scoring, temporal_weight=scoring.temporal_weight - 0.1))
        _, static_lower = run(model, lower, static_video(), FRAMES)
        assert sum(static_lower.temporal_merges.values()) < sum(static.temporal_merges.values())


def test_a_chain_within_a_frame_ends_in_the_previous_frame() -> None:
    # One video of 2 frames, 4 tokens each (A = 0, 2; B = 1, 3), decisions by hand: frame 0 folds token 0 into
    # token 1 (spatial); frame 1 folds its A token 6 into its B token 7 (spatial) and token 7 into frame 0's kept
    # token 3 (temporal): token 6 ends in token 3 too.
    target = torch.arange(8)
    target[0], target[6], target[7] = 1, 7, 3
    removed = torch.zeros(2, 4, dtype=torch.bool)
    removed[0, 0] = removed[1, 2] = removed[1, 3] = True
    temporal = torch.zeros(2, 4, dtype=torch.bool)
    temporal[1, 3] = True
    choice = TemporalChoice(target, removed[:, :], temporal, None, 1)
    assert resolve_chains(target).tolist() == [1, 1, 2, 3, 4, 5, 3, 3]
    hidden = torch.arange(8, dtype=torch.float32).view(2, 4, 1)
    # Frame 1 removes two tokens here (a hand-made choice): merge with r = 2 for both frames' shapes to hold.
    removed[0, 2] = True
    target[2] = 3
    choice = TemporalChoice(target, removed, temporal, None, 2)
    merged, state = temporal_merge(hidden, TokenState.start(2, 4, "cpu"), choice)
    # Token 1 = mean(0, 1); token 3 = mean(2, 3, 6, 7) (sizes 1); frame 1 keeps 4 and 5.
    assert merged[:, :, 0].tolist() == [[0.5, 4.5], [4.0, 5.0]]
    assert state.sizes.tolist() == [[2.0, 4.0], [1.0, 1.0]]
    assert state.source_item is not None
    assert state.source_item.tolist() == [[0, 0, 0, 0], [1, 1, 0, 0]]
    assert state.source.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]


def test_frames_fold_only_into_tokens_the_previous_frame_keeps() -> None:
    torch.manual_seed(6)
    x = torch.randn(1, PATCHES, 8).expand(FRAMES, PATCHES, 8) + 0.01 * torch.randn(FRAMES, PATCHES, 8)
    for scoring in (Scoring(w_div=0.0, ctr=0.0, temporal_weight=1.0), Scoring(ctr=0.25, temporal_weight=0.7)):
        choice = temporal_choice(x, 10, scoring, FRAMES, torch.ones(FRAMES, PATCHES))
        assert choice.removed.sum(dim=1).tolist() == [10] * FRAMES
        goes_back = choice.temporal.flatten().nonzero().flatten()
        assert len(goes_back) > 0 and not choice.temporal[0].any()
        destinations = choice.target[goes_back]
        assert not choice.removed.flatten()[destinations].any()  # every receiver stays...
        spatial_receivers = choice.target[(choice.removed & ~choice.temporal).flatten()]
        assert not torch.isin(destinations, spatial_receivers).any()  # ...unchanged by its own frame's merges
        assert torch.equal(destinations // PATCHES, goes_back // PATCHES - 1)  # in the frame just before
        # Static content: the next frame folds the tokens whose match was kept and keeps those whose match went.
        match_removed = choice.removed[:-1].flatten()[goes_back - PATCHES]
        assert match_removed.float().mean() < 0.5


def test_the_step_is_deterministic_and_moves_nothing_across_videos() -> None:
    torch.manual_seed(4)
    x = torch.randn(3 * FRAMES, PATCHES, 8)
    scoring = Scoring(w_div=0.5, ctr=0.25, temporal_weight=0.8)
    importance = torch.rand(3 * FRAMES, PATCHES) + 0.5
    runs = [temporal_merge_step(x, x, TokenState.start(3 * FRAMES, PATCHES, "cpu"), 12, scoring, FRAMES, importance)
            for _ in range(2)]  # fmt: skip
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1].source, runs[1][1].source)
    # One video alone gives the same tokens as that video in a batch of three.
    alone = temporal_merge_step(
        x[FRAMES : 2 * FRAMES],
        x[FRAMES : 2 * FRAMES],
        TokenState.start(FRAMES, PATCHES, "cpu"),
        12,
        scoring,
        FRAMES,
        importance[FRAMES : 2 * FRAMES],
    )
    assert torch.equal(alone[0], runs[0][0][FRAMES : 2 * FRAMES])
    with pytest.raises(ValueError, match="not a whole number of videos"):
        temporal_merge_step(x[:5], x[:5], TokenState.start(5, PATCHES, "cpu"), 12, scoring, FRAMES, importance[:5])


def test_frames_per_item_is_checked() -> None:
    model = tiny_siglip()
    schedule = Schedule([12, 6, 0], PATCHES, scoring=Scoring(temporal_weight=1.0))
    with apply(model, schedule) as handle:
        with pytest.raises(EvoPruneError, match="frames_per_item must be None"):
            handle.frames_per_item = 0
        handle.frames_per_item = 3
        with pytest.raises(EvoPruneError, match="not a whole number of videos of frames_per_item=3"):
            model(pixel_values=torch.randn(4, 3, 48, 48))
        handle.frames_per_item = None  # images: temporal merging inactive
        model(pixel_values=torch.randn(4, 3, 48, 48))
        assert handle.temporal_merges == {} and handle.source_item is None


def test_the_weight_round_trips_through_json_and_old_files_still_load() -> None:
    schedule = Schedule([12, 6, 0], PATCHES, scoring=Scoring(temporal_weight=0.35), family="siglip", has_cls=False)
    text = schedule_to_json(schedule)
    assert json.loads(text)["scoring"]["temporal_weight"] == 0.35
    assert schedule_from_json(text) == schedule and schedule_to_json(schedule_from_json(text)) == text
    assert "temporal=0.35" in schedule.describe()
    # Off: the document (and so the fingerprint) is the one written before the setting existed.
    plain = Schedule([12, 6, 0], PATCHES)
    assert "temporal_weight" not in plain.to_dict()["scoring"]
    assert schedule_from_json(plain.to_json()).scoring.temporal_weight == 0.0
    assert plain.fingerprint() != schedule.fingerprint()
    document = schedule.to_dict()
    document["scoring"]["temporal_weight"] = 1.5
    with pytest.raises(ScheduleError, match=r"^\$\.scoring\.temporal_weight: must be <= 1, got 1.5$"):
        Schedule.from_dict(document)
    with pytest.raises(ScheduleError, match=r"temporal_weight must be a number in \[0, 1\]"):
        Scoring(temporal_weight=-0.1)


def tiny_onevision() -> LlavaOnevisionForConditionalGeneration:
    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=48, patch_size=8)  # fmt: skip
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=40, pad_token_id=0, max_position_embeddings=256)  # fmt: skip
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, video_token_index=38, image_token_index=39,
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    )  # fmt: skip
    return LlavaOnevisionForConditionalGeneration(config).eval()


def test_a_onevision_video_runs_forward_and_generate_with_temporal_merging() -> None:
    model = tiny_onevision()
    videos = static_video(videos=1).view(1, FRAMES, 3, 48, 48)
    ids = torch.tensor([[1, 5] + [38] * (FRAMES * 9 + 1) + [7]])  # 9 pooled tokens per frame in the native prompt
    schedule = Schedule([18, 6, 0], PATCHES, scoring=Scoring(ctr=0.0, temporal_weight=1.0), family="siglip")
    with prepare_onevision_video(model, schedule) as pruning, torch.no_grad():
        logits = model(input_ids=ids, pixel_values_videos=videos).logits
        assert pruning.engine.frames_per_item == FRAMES
        assert pruning.engine.temporal_merges[0] > 0
        assert pruning.engine.sizes is not None and pruning.engine.sizes.sum().item() == FRAMES * PATCHES
        generated = model.generate(input_ids=ids, pixel_values_videos=videos, max_new_tokens=2, do_sample=False)
    assert logits.shape[1] == ids.shape[1] + FRAMES * (12 - 9) and torch.isfinite(logits).all()
    assert generated.shape == (1, ids.shape[1] + FRAMES * 3 + 2)


def test_the_search_proposes_the_weight_only_for_video() -> None:
    images = EncoderShape(num_layers=6, tokens_in=64)
    video = EncoderShape(num_layers=6, tokens_in=64, frames_per_item=8)
    for name in ("family", "keep_ratios"):
        space = get_space(name)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        image_params = space.suggest(study.ask(), images)
        video_params = space.suggest(study.ask(), video)
        assert "temporal_weight" not in image_params and "temporal_weight" in video_params
        assert space.to_schedule(image_params, images).scoring.temporal_weight == 0.0
        schedule = space.to_schedule({**video_params, "temporal_weight": 0.45}, video)
        assert schedule.is_empty or schedule.scoring.temporal_weight == 0.45
        # Seeds: frame by frame as the paper on video too, plus (family space) one with temporal merging on.
        video_seeds = [space.to_schedule(point.params, video) for point in space.seed_points(video)]
        image_seeds = [space.to_schedule(point.params, images) for point in space.seed_points(images)]
        assert all(seed.scoring.temporal_weight == 0.0 for seed in image_seeds)
        assert len(video_seeds) == len(image_seeds) + 1
        assert video_seeds[-1].scoring.temporal_weight == 1.0
        assert [s.fingerprint() for s in video_seeds[:-1]] == [s.fingerprint() for s in image_seeds]
    assert any("temporal_weight" in line and "video only" in line for line in get_space("family").describe())
    with pytest.raises(SearchSpaceError, match="frames_per_item must be an integer >= 1"):
        EncoderShape(num_layers=6, tokens_in=64, frames_per_item=0)
