"""Search spaces: the registry, and the map from one trial's parameters to exactly one valid Schedule."""

from __future__ import annotations

import optuna
import pytest

from search_spaces import (
    DEFAULT_SPACE,
    EncoderShape,
    SearchSpaceError,
    available_spaces,
    get_space,
)
from search_spaces.family import FAMILIES
from tuner.evoprune import Schedule, Scoring

SHAPES = [
    EncoderShape(6, 64, "clip", True),  # the demo
    EncoderShape(24, 576, "clip", True),  # LLaVA-1.5's CLIP ViT-L/14-336
    EncoderShape(26, 729, "siglip", False),  # SigLIP so400m/14-384
    EncoderShape(2, 16, "clip", True),  # shallower than a skip seed can reach 12%
    EncoderShape(1, 4),
]


def test_registry_lists_spaces_and_names_the_default() -> None:
    assert available_spaces() == ["family", "keep_ratios"]
    assert DEFAULT_SPACE == "family"
    assert get_space("family").name == "family"


def test_unknown_space_is_one_line_naming_the_available_ones() -> None:
    with pytest.raises(SearchSpaceError) as caught:
        get_space("nope")
    message = str(caught.value)
    assert "unknown search space 'nope'" in message and "family, keep_ratios" in message and "\n" not in message


@pytest.mark.parametrize("space_name", ["family", "keep_ratios"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s.num_layers}x{s.tokens_in}")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_sampled_schedule_is_valid_and_reproducible(space_name: str, shape: EncoderShape, seed: int) -> None:
    space = get_space(space_name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(40):
        trial = study.ask()
        schedule = space.sample(trial, shape)
        study.tell(trial, 0.0)
        # Valid: the Schedule constructor checks the halving limit; re-reading it from JSON checks it again.
        assert schedule.num_layers == shape.num_layers and schedule.tokens_in == shape.tokens_in
        assert Schedule.from_json(schedule.to_json()) == schedule
        assert schedule.family == shape.family and schedule.has_cls == shape.has_cls
        assert schedule.scoring.w_sim == 1.0
        # Deterministic: the stored parameters give the same schedule, directly and through a FixedTrial.
        again = space.to_schedule(trial.params, shape)
        replayed = space.sample(optuna.trial.FixedTrial(trial.params), shape)
        assert again == schedule and replayed == schedule
        assert again.fingerprint() == schedule.fingerprint()


@pytest.mark.parametrize("space_name", ["family", "keep_ratios"])
def test_seed_points_are_no_pruning_the_paper_skip_default_then_front_loaded(space_name: str) -> None:
    space = get_space(space_name)
    shape = EncoderShape(24, 576, "clip", True)
    points = space.distinct_seed_points(shape)
    schedules = [space.to_schedule(point.params, shape) for point in points]
    assert [point.label for point in points] == [
        "no pruning",
        "paper skip default, 50% tokens",
        "paper skip default, 25% tokens",
        "paper skip default, 12% tokens",
        "front-loaded, no attention statistics, 25% tokens",
        "front-loaded, no attention statistics, 12% tokens",
    ]
    assert schedules[0].is_empty
    assert [s.tokens_out for s in schedules[1:]] == [288, 144, 69, 144, 69]
    for schedule in schedules[1:4]:
        assert schedule.scoring == Scoring()
        assert schedule.merge_layers == list(range(0, 24, 2))
        assert (
            schedule.remove_per_layer
            == Schedule.preset("skip", num_layers=24, tokens_in=576, tokens_out=schedule.tokens_out).remove_per_layer
        )
    for schedule in schedules[4:]:
        # The paper's scoring without CTR (no attention statistics); Decreasing alpha 3.5 puts most merging first.
        assert schedule.scoring == Scoring(ctr=0.0)
        expected = Schedule.preset(
            "decreasing", num_layers=24, tokens_in=576, tokens_out=schedule.tokens_out, alpha=3.5
        )
        assert schedule.remove_per_layer == expected.remove_per_layer
        assert schedule.remove_per_layer[0] == max(schedule.remove_per_layer)


def test_seed_points_that_coincide_on_a_shallow_encoder_are_enqueued_once() -> None:
    space = get_space("family")
    shape = EncoderShape(6, 64, "clip", True)  # skip over 3 layers cannot go below 16 of 64 tokens
    tokens = [space.to_schedule(p.params, shape).tokens_out for p in space.distinct_seed_points(shape)]
    assert tokens == [64, 32, 16, 16, 8]  # skip to 12% is skip to 25% here; front-loaded 25% merges differently


def test_family_clamps_to_the_smallest_reachable_token_count() -> None:
    space = get_space("family")
    shape = EncoderShape(6, 64, "clip", True)
    base = {"w_div": 0.5, "w_attn": 0.0, "ctr": 0.25, "proportional_attention": False, "features": "keys"}
    first = space.to_schedule({**base, "family": "first", "keep": 0.03, "n": 1}, shape)
    assert first.remove_per_layer == [32, 0, 0, 0, 0, 0]  # one layer can at most halve its tokens
    late = space.to_schedule({**base, "family": "skip", "keep": 0.5, "stride": 4, "offset": 3, "start_layer": 5}, shape)
    assert late.merge_layers == [5] and late.preset == {
        "name": "skip",
        "params": {"stride": 4, "offset": 3, "start_layer": 2},  # start_layer moved back so the last layer merges
    }


def test_family_covers_every_paper_family() -> None:
    space = get_space("family")
    shape = EncoderShape(6, 64, "clip", True)
    base = {"w_div": 0.5, "w_attn": 0.0, "ctr": 0.25, "proportional_attention": False, "features": "keys"}
    shape_params = {"skip": {"stride": 2, "offset": 1, "start_layer": 0}, "first": {"n": 3}, "last": {"n": 3}}
    for family in FAMILIES:
        params = {**base, "family": family, "keep": 0.5, **shape_params.get(family, {})}
        if family in ("increasing", "decreasing"):
            params["alpha"] = 1.0
        schedule = space.to_schedule(params, shape)
        assert schedule.tokens_out == 32 and schedule.preset is not None and schedule.preset["name"] == family


def test_keep_ratios_clamp_below_half_and_at_or_above_one() -> None:
    space = get_space("keep_ratios")
    shape = EncoderShape(4, 64, "clip", True)
    base = {"w_div": 0.5, "w_attn": 0.0, "ctr": 0.25, "proportional_attention": False, "features": "keys"}
    schedule = space.to_schedule({**base, "keep_0": 0.2, "keep_1": 1.07, "keep_2": 0.75, "keep_3": 1.0}, shape)
    assert schedule.remove_per_layer == [32, 0, 8, 0]


def test_no_pruning_has_one_fingerprint_whatever_the_score_settings() -> None:
    space = get_space("family")
    shape = EncoderShape(6, 64, "clip", True)
    a = {"family": "mean", "keep": 1.0, "w_div": 1.5, "w_attn": 2.0, "ctr": 0.0, "proportional_attention": True}
    b = {
        "family": "first",
        "keep": 1.0,
        "n": 2,
        "w_div": 0.0,
        "w_attn": 0.0,
        "ctr": 0.5,
        "proportional_attention": False,
    }
    sa = space.to_schedule({**a, "features": "hidden"}, shape)
    sb = space.to_schedule({**b, "features": "keys"}, shape)
    assert sa.is_empty and sa.fingerprint() == sb.fingerprint() == Schedule.none(6, 64).fingerprint()


def test_step_noise_is_rounded_away() -> None:
    space = get_space("family")
    shape = EncoderShape(6, 64, "clip", True)
    params = {"family": "mean", "keep": 0.5, "w_div": 0.30000000000000004, "w_attn": 0.1, "ctr": 0.15000000000000002}
    schedule = space.to_schedule({**params, "proportional_attention": False, "features": "keys"}, shape)
    assert (schedule.scoring.w_div, schedule.scoring.ctr) == (0.3, 0.15)


def test_parameters_of_another_space_are_refused() -> None:
    shape = EncoderShape(6, 64, "clip", True)
    family_params = get_space("family").seed_points(shape)[1].params
    with pytest.raises(SearchSpaceError, match="keep_0"):
        get_space("keep_ratios").to_schedule(family_params, shape)


def test_listing_describes_every_parameter() -> None:
    lines = get_space("family").describe()
    text = "\n".join(lines)
    for name in ("family", "keep", "stride", "offset", "start_layer", "n", "alpha", "w_div", "w_attn", "ctr"):
        assert f"{name}:" in text
    assert "when family in skip" in text
    assert any(line.startswith("keep_<layer>:") for line in get_space("keep_ratios").describe())
