"""Schedules: presets, keep ratios, validation, token counts, fingerprint, description and FLOPs."""

from __future__ import annotations

import doctest
import math
from typing import Any

import pytest

import tuner.evoprune.flops as flops_module
import tuner.evoprune.format as format_module
import tuner.evoprune.schedule as schedule_module
from tuner.evoprune.errors import EvoPruneError, ScheduleError
from tuner.evoprune.flops import encoder_flops, layer_macs
from tuner.evoprune.schedule import PRESET_NAMES, Schedule, keep_ratio_plan, layer_cap_violation, preset_plan
from tuner.evoprune.scoring import Scoring

# ------------------------------------------------------------------------------------------------------------ presets

# (name, num_layers, tokens_in, tokens_out, params, hand-computed plan)
PRESET_CASES: list[tuple[str, int, int, int, dict[str, Any], list[int]]] = [
    # R = 48 over layers 0, 2, 4: 16 each.
    ("skip", 6, 64, 16, {}, [16, 0, 16, 0, 16, 0]),
    # R = 10 over layers 0, 2, 4: 4, 3, 3 (remainder on the earliest).
    ("skip", 6, 64, 54, {}, [4, 0, 3, 0, 3, 0]),
    ("skip", 6, 64, 54, {"offset": 1}, [0, 4, 0, 3, 0, 3]),
    ("skip", 6, 64, 40, {"stride": 3, "offset": 1}, [0, 12, 0, 0, 12, 0]),
    # start_layer 2, stride 2, offset 1: layers 3, 5, 7.
    ("skip", 8, 64, 54, {"start_layer": 2, "offset": 1}, [0, 0, 0, 4, 0, 3, 0, 3]),
    ("skip", 4, 16, 16, {}, [0, 0, 0, 0]),
    ("skip", 3, 16, 10, {"stride": 1}, [2, 2, 2]),
    ("mean", 4, 32, 18, {}, [4, 4, 3, 3]),
    ("mean", 3, 30, 30, {}, [0, 0, 0]),
    ("first", 4, 32, 20, {"n": 2}, [6, 6, 0, 0]),
    ("first", 4, 32, 31, {"n": 4}, [1, 0, 0, 0]),
    ("last", 4, 32, 22, {"n": 3}, [0, 4, 3, 3]),
    ("last", 4, 32, 30, {"n": 1}, [0, 0, 0, 2]),
    # weights 1, 2, 3, 4 (sum 10), R = 10: exact.
    ("increasing", 4, 32, 22, {}, [1, 2, 3, 4]),
    # R = 5: quotas 0.5, 1, 1.5, 2 -> floors 0, 1, 1, 2; the tied 0.5 remainders go to the earlier layer (0).
    ("increasing", 4, 32, 27, {}, [1, 1, 1, 2]),
    # weights 4, 3, 2, 1: quotas 2, 1.5, 1, 0.5 -> floors 2, 1, 1, 0; tie between layers 1 and 3 -> layer 1.
    ("decreasing", 4, 32, 27, {}, [2, 2, 1, 0]),
    # alpha 2: weights 1, 4, 9 (sum 14), R = 14.
    ("increasing", 3, 64, 50, {"alpha": 2}, [1, 4, 9]),
    ("decreasing", 3, 64, 50, {"alpha": 2}, [9, 4, 1]),
    # alpha 0.5: weights 1, sqrt(2): quotas 4.14, 5.86 -> floors 4, 5, the leftover to the larger remainder.
    ("increasing", 2, 64, 54, {"alpha": 0.5}, [4, 6]),
    # alpha 0 is the mean preset.
    ("increasing", 4, 32, 18, {"alpha": 0}, [4, 4, 3, 3]),
    ("decreasing", 4, 32, 18, {"alpha": 0.0}, [4, 4, 3, 3]),
]


@pytest.mark.parametrize(("name", "num_layers", "tokens_in", "tokens_out", "params", "expected"), PRESET_CASES)
def test_preset_matches_hand_computed_plan(
    name: str, num_layers: int, tokens_in: int, tokens_out: int, params: dict[str, Any], expected: list[int]
) -> None:
    schedule = Schedule.preset(name, num_layers=num_layers, tokens_in=tokens_in, tokens_out=tokens_out, **params)
    assert schedule.remove_per_layer == expected
    assert sum(schedule.remove_per_layer) == tokens_in - tokens_out
    assert schedule.tokens_out == tokens_out
    assert schedule.num_layers == num_layers
    assert preset_plan(name, num_layers=num_layers, tokens_in=tokens_in, tokens_out=tokens_out, **params) == expected


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("tokens_out", [576, 400, 288, 128, 64])
def test_every_preset_removes_exactly_the_budget_on_a_llava_encoder(name: str, tokens_out: int) -> None:
    params: dict[str, Any] = {"n": 12} if name in ("first", "last") else {}
    schedule = Schedule.preset(name, num_layers=24, tokens_in=576, tokens_out=tokens_out, **params)
    assert sum(schedule.remove_per_layer) == 576 - tokens_out
    assert schedule.tokens_after()[-1] == tokens_out


@pytest.mark.parametrize(
    ("name", "params", "expected_params"),
    [
        ("skip", {}, {"stride": 2, "offset": 0, "start_layer": 0}),
        ("skip", {"stride": 3}, {"stride": 3, "offset": 0, "start_layer": 0}),
        ("mean", {}, {}),
        ("first", {"n": 2}, {"n": 2}),
        ("last", {"n": 3}, {"n": 3}),
        ("increasing", {}, {"alpha": 1.0}),
        ("decreasing", {"alpha": 2}, {"alpha": 2}),
    ],
)
def test_preset_records_name_and_all_params(name: str, params: dict[str, Any], expected_params: dict[str, Any]) -> None:
    schedule = Schedule.preset(name, num_layers=6, tokens_in=64, tokens_out=60, **params)
    assert schedule.preset == {"name": name, "params": expected_params}


def test_preset_passes_scoring_family_and_cls_through() -> None:
    scoring = Scoring(w_div=1.0, ctr=0.0)
    schedule = Schedule.preset(
        "skip", num_layers=4, tokens_in=16, tokens_out=8, scoring=scoring, family="siglip", has_cls=False
    )
    assert (schedule.scoring, schedule.family, schedule.has_cls) == (scoring, "siglip", False)
    assert Schedule.from_preset("skip", num_layers=4, tokens_in=16, tokens_out=8, scoring=scoring) == Schedule(
        [4, 0, 4, 0],
        16,
        scoring=scoring,
        preset={"name": "skip", "params": {"stride": 2, "offset": 0, "start_layer": 0}},
    )


def test_skip_default_on_llava_is_the_paper_plan() -> None:
    schedule = Schedule.preset("skip", num_layers=24, tokens_in=576, tokens_out=128)
    assert schedule.merge_layers == list(range(0, 24, 2))
    assert schedule.remove_per_layer[:8] == [38, 0, 38, 0, 38, 0, 38, 0]
    assert schedule.remove_per_layer[8:] == [37, 0] * 8


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("bogus", {}, "unknown preset 'bogus'; available: decreasing, first, increasing, last, mean, skip"),
        ("skip", {"strides": 2}, "unknown param 'strides' for preset 'skip'; allowed: offset, start_layer, stride"),
        ("mean", {"n": 2}, "unknown param 'n' for preset 'mean'; allowed: none"),
        ("first", {}, "preset 'first' needs param 'n'"),
        ("last", {}, "preset 'last' needs param 'n'"),
        ("skip", {"num_layers": 0}, "num_layers must be an integer >= 1, got 0"),
        ("skip", {"tokens_in": 0}, "tokens_in must be an integer >= 1, got 0"),
        ("skip", {"tokens_out": 0}, "tokens_out must be an integer in [1, tokens_in 576], got 0"),
        ("skip", {"tokens_out": 577}, "tokens_out must be an integer in [1, tokens_in 576], got 577"),
        ("skip", {"tokens_out": 128.0}, "tokens_out must be an integer in [1, tokens_in 576], got 128.0"),
        ("skip", {"stride": 0}, "stride must be an integer >= 1, got 0"),
        ("skip", {"stride": True}, "stride must be an integer >= 1, got True"),
        ("skip", {"offset": 2}, "offset must be an integer in [0, stride 2), got 2"),
        ("skip", {"offset": -1}, "offset must be an integer in [0, stride 2), got -1"),
        ("skip", {"start_layer": 30}, "start_layer 30 is beyond the encoder's 24 layers (0..23)"),
        ("skip", {"start_layer": -1}, "start_layer must be an integer >= 0, got -1"),
        (
            "skip",
            {"start_layer": 23, "offset": 1},
            "selects none of the encoder's 24 layers; lower start_layer or offset",
        ),
        ("first", {"n": 0}, "n must be an integer >= 1, got 0"),
        ("last", {"n": 25}, "n 25 is beyond the encoder's 24 layers (n must be in 1..24)"),
        ("increasing", {"alpha": -1.0}, "alpha must be a number in [0, 100], got -1.0"),
        ("decreasing", {"alpha": math.nan}, "alpha must be a number in [0, 100], got nan"),
        ("decreasing", {"alpha": math.inf}, "alpha must be a number in [0, 100], got inf"),
        ("increasing", {"alpha": "1"}, "alpha must be a number in [0, 100], got '1'"),
    ],
)
def test_preset_errors_name_the_field(name: str, kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"num_layers": 24, "tokens_in": 576, "tokens_out": 128}
    arguments.update(kwargs)
    with pytest.raises(ScheduleError) as caught:
        Schedule.preset(name, **arguments)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        # first 1 layer must remove 448 of 576: at most 288.
        ("first", {"n": 1}, "layer 0 removes 448 patch tokens but can remove at most 288 (it receives 576;"),
        # decreasing alpha 40 piles 368 of the 448 on layer 0.
        ("decreasing", {"alpha": 40}, "layer 0 removes 368 patch tokens but can remove at most 288"),
        # last 2 layers: layer 22 removes 224 of 576 (fine), layer 23 removes 224 of 352: at most 176.
        ("last", {"n": 2}, "layer 23 removes 224 patch tokens but can remove at most 176 (it receives 352;"),
    ],
)
def test_preset_over_a_layer_maximum_names_the_layer(name: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(ScheduleError, match="one merge step can at most halve them") as caught:
        Schedule.preset(name, num_layers=24, tokens_in=576, tokens_out=128, **params)
    assert message in str(caught.value)


# -------------------------------------------------------------------------------------------------------- keep ratios


@pytest.mark.parametrize(
    ("keep_ratios", "tokens_in", "expected"),
    [
        ([1.0, 0.75, 1, 0.5], 64, [0, 16, 0, 24]),
        ([0.5, 0.5, 0.5], 576, [288, 144, 72]),
        # 0.65 of 10 is 6.5 as written: half up keeps 7 (binary floats would give 6.4999... or banker's 6).
        ([0.65], 10, [3]),
        ([0.85], 10, [1]),
        # 0.999 of 576 = 575.424 -> 575.
        ([0.999, 1.0], 576, [1, 0]),
    ],
)
def test_from_keep_ratios(keep_ratios: list[float], tokens_in: int, expected: list[int]) -> None:
    schedule = Schedule.from_keep_ratios(keep_ratios, tokens_in=tokens_in, family="clip", has_cls=True)
    assert schedule.remove_per_layer == expected
    assert keep_ratio_plan(keep_ratios, tokens_in) == expected
    assert schedule.preset == {"name": "keep_ratios", "params": {"keep_ratios": keep_ratios}}
    assert (schedule.family, schedule.has_cls) == ("clip", True)


@pytest.mark.parametrize(
    ("keep_ratios", "message"),
    [
        ([1.0, 1.0, 1.0, 1.5], "keep_ratios[3] must be in (0, 1], got 1.5"),
        ([0.0], "keep_ratios[0] must be in (0, 1], got 0.0"),
        ([1.0, math.nan], "keep_ratios[1] must be in (0, 1], got nan"),
        ([True], "keep_ratios[0] must be in (0, 1], got True"),
        ([], "keep_ratios must be a non-empty list of numbers in (0, 1], got []"),
        ([1.0, 0.25], "layer 1 removes 432 patch tokens but can remove at most 288"),
    ],
)
def test_from_keep_ratios_errors(keep_ratios: list[float], message: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        Schedule.from_keep_ratios(keep_ratios, tokens_in=576)
    assert message in str(caught.value)


# --------------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"remove_per_layer": []}, "remove_per_layer must be a non-empty list of integers >= 0, one per encoder layer"),
        ({"remove_per_layer": "0,1"}, "remove_per_layer must be a non-empty list of integers >= 0"),
        ({"remove_per_layer": [0, -1]}, "remove_per_layer[1] must be an integer >= 0, got -1"),
        ({"remove_per_layer": [0, True]}, "remove_per_layer[1] must be an integer >= 0, got True"),
        ({"remove_per_layer": [0, 1.0]}, "remove_per_layer[1] must be an integer >= 0, got 1.0"),
        ({"tokens_in": 0}, "tokens_in must be an integer >= 1, got 0"),
        ({"tokens_in": 16.0}, "tokens_in must be an integer >= 1, got 16.0"),
        ({"tokens_in": True}, "tokens_in must be an integer >= 1, got True"),
        ({"remove_per_layer": [9, 0]}, "layer 0 removes 9 patch tokens but can remove at most 8 (it receives 16;"),
        (
            {"remove_per_layer": [0, 0, 0, 300], "tokens_in": 576},
            "layer 3 removes 300 patch tokens but can remove at most 288 (it receives 576; one merge step can at most "
            "halve them)",
        ),
        (
            {"remove_per_layer": [8, 4, 2, 1, 1]},
            "layer 4 removes 1 patch tokens but can remove at most 0 (it receives 1;",
        ),
        ({"scoring": {"w_div": 1}}, "scoring must be a Scoring, got dict"),
        ({"family": ""}, "family must be a non-empty string (e.g. 'clip') or None, got ''"),
        ({"family": 3}, "family must be a non-empty string (e.g. 'clip') or None, got 3"),
        ({"has_cls": 1}, "has_cls must be True, False or None, got 1"),
        ({"metrics": []}, "metrics must be a dict, got list"),
        ({"provenance": None}, "provenance must be a dict, got NoneType"),
        ({"preset": "skip"}, "preset must be None or {'name': str, 'params': dict}, got 'skip'"),
        ({"preset": {"name": "skip"}}, "preset must be None or {'name': str, 'params': dict}"),
        ({"preset": {"name": "nope", "params": {}}}, "unknown preset 'nope'; available: decreasing, first, increasing"),
        ({"preset": {"name": "skip", "params": {"stride": 0}}}, "stride must be an integer >= 1, got 0"),
        (
            {"preset": {"name": "mean", "params": {}}},
            "preset mean() does not give this plan: it removes 2 at layer 0, the plan 4; record no preset (None)",
        ),
        (
            {"preset": {"name": "keep_ratios", "params": {"keep_ratios": [0.75]}}},
            "keep_ratios has 1 entries but the plan has 2 layers",
        ),
        (
            {"preset": {"name": "keep_ratios", "params": {"ratios": [0.75, 1.0]}}},
            "preset 'keep_ratios' takes exactly the param 'keep_ratios', got ['ratios']",
        ),
    ],
)
def test_validation_errors_name_the_field(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"remove_per_layer": [4, 0], "tokens_in": 16}
    arguments.update(kwargs)
    with pytest.raises(ScheduleError) as caught:
        Schedule(**arguments)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_validation_messages_are_distinct() -> None:
    messages = set()
    for kwargs in ({"tokens_in": 0}, {"remove_per_layer": [-1, 0]}, {"remove_per_layer": [9, 0]}, {"family": ""}):
        arguments: dict[str, Any] = {"remove_per_layer": [4, 0], "tokens_in": 16, **kwargs}
        with pytest.raises(ScheduleError) as caught:
            Schedule(**arguments)
        messages.add(str(caught.value))
    assert len(messages) == 4


def test_preset_record_is_completed_with_defaults_and_checked() -> None:
    schedule = Schedule([4, 0, 4, 0], 16, preset={"name": "skip", "params": {}})
    assert schedule.preset == {"name": "skip", "params": {"stride": 2, "offset": 0, "start_layer": 0}}
    assert Schedule([4, 0], 16, preset=None).preset is None


def test_halving_is_allowed_and_one_token_always_survives() -> None:
    schedule = Schedule([8, 4, 2, 1], 16)
    assert schedule.tokens_after() == [8, 4, 2, 1]
    assert schedule.tokens_out == 1
    odd = Schedule([3, 2, 1], 7)  # 7 -> 4 -> 2 -> 1: each step at most floor(T / 2)
    assert odd.tokens_after() == [4, 2, 1]
    assert layer_cap_violation([4, 2, 1], 7) == (
        0,
        "layer 0 removes 4 patch tokens but can remove at most 3 (it receives 7; one merge step can at most "
        "halve them)",
    )


def test_remove_per_layer_is_copied_into_a_list() -> None:
    plan = (4, 0)
    schedule = Schedule(plan, 16)  # type: ignore[arg-type]
    assert schedule.remove_per_layer == [4, 0]
    assert isinstance(schedule.remove_per_layer, list)


# ------------------------------------------------------------------------------------------------------- token counts


@pytest.mark.parametrize(
    ("plan", "tokens_in", "after", "before"),
    [
        ([16, 0, 16, 0, 16, 0], 64, [48, 48, 32, 32, 16, 16], [64, 48, 48, 32, 32, 16]),
        ([0, 0, 0], 5, [5, 5, 5], [5, 5, 5]),
        ([2], 4, [2], [4]),
        ([1, 2, 3], 20, [19, 17, 14], [20, 19, 17]),
    ],
)
def test_tokens_after_and_before(plan: list[int], tokens_in: int, after: list[int], before: list[int]) -> None:
    schedule = Schedule(plan, tokens_in)
    assert schedule.tokens_after() == after
    assert schedule.tokens_after(tokens_in) == after
    assert schedule.tokens_before() == before
    assert schedule.tokens_out == after[-1]


def test_tokens_after_for_another_input_size() -> None:
    schedule = Schedule([4, 0, 2], 16)
    assert schedule.tokens_after(20) == [16, 16, 14]
    assert schedule.tokens_before(20) == [20, 16, 16]
    with pytest.raises(ScheduleError, match=r"^with tokens_in 8: layer 0 removes 5 .* at most 4") as caught:
        Schedule([5, 0], 16).tokens_after(8)
    assert "it receives 8" in str(caught.value)
    with pytest.raises(ScheduleError, match="tokens_in must be an integer >= 1, got 0"):
        schedule.tokens_after(0)


def test_merge_layers_and_emptiness() -> None:
    schedule = Schedule([0, 3, 0, 1], 16)
    assert schedule.merge_layers == [1, 3]
    assert schedule.tokens_removed == 4
    assert not schedule.is_empty
    empty = Schedule.none(4, 16, family="clip", has_cls=True)
    assert empty.is_empty
    assert empty.merge_layers == []
    assert empty.remove_per_layer == [0, 0, 0, 0]
    assert empty.tokens_out == 16
    assert (empty.family, empty.has_cls, empty.preset) == ("clip", True, None)
    with pytest.raises(ScheduleError, match="num_layers must be an integer >= 1, got 0"):
        Schedule.none(0, 16)


# -------------------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_ignores_metadata() -> None:
    preset = Schedule.preset("skip", num_layers=4, tokens_in=16, tokens_out=8)
    hand_made = Schedule(
        [4, 0, 4, 0],
        16,
        family="clip",
        has_cls=True,
        metrics={"accuracy": 0.9},
        provenance={"trial": 3},
    )
    assert preset.fingerprint() == hand_made.fingerprint()
    assert len(preset.fingerprint()) == 64
    assert int(preset.fingerprint(), 16) >= 0


def test_fingerprint_compares_numbers_by_value() -> None:
    assert (
        Schedule([4, 0], 16, scoring=Scoring(w_div=1, ctr=0)).fingerprint()
        == Schedule([4, 0], 16, scoring=Scoring(w_div=1.0, ctr=0.0)).fingerprint()
    )


@pytest.mark.parametrize(
    "other",
    [
        Schedule([4, 0, 4, 1], 16),
        Schedule([4, 0, 4, 0], 17),
        Schedule([4, 4, 0, 0], 16),
        Schedule([4, 0, 4, 0], 16, scoring=Scoring(w_div=0.6)),
        Schedule([4, 0, 4, 0], 16, scoring=Scoring(tau=0.5)),
        Schedule([4, 0, 4, 0], 16, scoring=Scoring(proportional_attention=True)),
        Schedule([4, 0, 4, 0, 0], 16),
    ],
)
def test_fingerprint_differs_for_different_plans(other: Schedule) -> None:
    assert Schedule([4, 0, 4, 0], 16).fingerprint() != other.fingerprint()


# ----------------------------------------------------------------------------------------------------------- describe


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (
            Schedule.preset("skip", num_layers=24, tokens_in=576, tokens_out=128),
            "skip s2o0 576->128 @L0,2,..,22 div=0.5 attn=0 ctr=0.25",
        ),
        (
            Schedule.preset("skip", num_layers=24, tokens_in=576, tokens_out=128, start_layer=4, offset=1),
            "skip s2o1 start4 576->128 @L5,7,..,23 div=0.5 attn=0 ctr=0.25",
        ),
        (
            Schedule.preset("last", num_layers=6, tokens_in=64, tokens_out=48, n=2),
            "last2 64->48 @L4,5 div=0.5 attn=0 ctr=0.25",
        ),
        (
            # weights 1, 2.83, 5.20, 8 -> quotas 0.59, 1.66, 3.05, 4.70 -> [0, 2, 3, 5]
            Schedule.preset("increasing", num_layers=4, tokens_in=32, tokens_out=22, alpha=1.5),
            "inc a1.5 32->22 @L1,2,3 div=0.5 attn=0 ctr=0.25",
        ),
        (Schedule.from_keep_ratios([1.0, 0.5], tokens_in=8), "keep 8->4 @L1 div=0.5 attn=0 ctr=0.25"),
        (Schedule.none(3, 16), "none 16->16 div=0.5 attn=0 ctr=0.25"),
        (
            Schedule(
                [3, 0, 1, 0, 1],
                16,
                scoring=Scoring(
                    w_sim=2,
                    w_div=0,
                    w_attn=1.5,
                    ctr=0,
                    features="hidden",
                    knn_k=4,
                    tau=0.3,
                    proportional_attention=True,
                ),
            ),
            "custom 16->11 @L0,2,4 sim=2 div=0 attn=1.5 ctr=0 feat=hidden k=4 tau=0.3 prop",
        ),
    ],
)
def test_describe(schedule: Schedule, expected: str) -> None:
    assert schedule.describe() == expected


# -------------------------------------------------------------------------------------------------------------- FLOPs


def test_layer_macs_hand_computed() -> None:
    # n = 4, m = 2, C = 8, I = 16: 4*4*64 + 2*16*8 + 2*2*8*16 = 1024 + 256 + 512
    assert layer_macs(4, 2, hidden_size=8, intermediate_size=16) == 1792


def test_encoder_flops_hand_computed() -> None:
    # layer 0: n=4, m=2 -> 1792 MACs; layer 1: n=m=2 -> 512 + 64 + 512 = 1088 MACs; FLOPs = 2 * 2880.
    assert encoder_flops([4, 2], [2, 2], hidden_size=8, intermediate_size=16) == 5760
    # with a CLS token: layer 0 n=5, m=3 -> 1280 + 400 + 768 = 2448; layer 1 n=m=3 -> 768 + 144 + 768 = 1680.
    assert encoder_flops([4, 2], [2, 2], hidden_size=8, intermediate_size=16, extra_tokens=1) == 2 * (2448 + 1680)
    assert encoder_flops([], [], hidden_size=8, intermediate_size=16) == 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (([4], [4, 4], 8, 16), "tokens_in_per_layer has 1 entries but tokens_mlp_per_layer has 2"),
        (([4], [5], 8, 16), "layer 0: its MLP sees 5 tokens but must see between 0 and the 4 entering it"),
        (([4], [4], 0, 16), "hidden_size must be an integer >= 1, got 0"),
        (([4], [4], 8, 2.5), "intermediate_size must be an integer >= 1, got 2.5"),
        (([4], [4], 8, 16, -1), "extra_tokens must be an integer >= 0, got -1"),
    ],
)
def test_encoder_flops_errors(arguments: tuple[Any, ...], message: str) -> None:
    with pytest.raises(EvoPruneError) as caught:
        encoder_flops(*arguments)
    assert message in str(caught.value)


def test_schedule_flops_and_speedup_hand_computed() -> None:
    schedule = Schedule([2, 0], tokens_in=4)
    assert schedule.flops(hidden_size=8, intermediate_size=16) == 5760
    # native: two layers with n = m = 4: 2 * (1024 + 256 + 1024) MACs each -> 9216 FLOPs.
    assert Schedule.none(2, 4).flops(hidden_size=8, intermediate_size=16) == 9216
    assert schedule.predicted_speedup(hidden_size=8, intermediate_size=16) == pytest.approx(9216 / 5760)
    with_cls = Schedule([2, 0], tokens_in=4, has_cls=True)
    assert with_cls.flops(hidden_size=8, intermediate_size=16) == 8256
    # has_cls None counts no CLS, like False.
    assert Schedule([2, 0], tokens_in=4, has_cls=False).flops(8, 16) == schedule.flops(8, 16)


@pytest.mark.parametrize("has_cls", [None, True, False])
def test_predicted_speedup(has_cls: bool | None) -> None:
    pruned = Schedule.preset("skip", num_layers=24, tokens_in=576, tokens_out=128, has_cls=has_cls)
    assert pruned.predicted_speedup(hidden_size=1024, intermediate_size=4096) > 1
    fewer = Schedule.preset("skip", num_layers=24, tokens_in=576, tokens_out=64, has_cls=has_cls)
    assert fewer.predicted_speedup(1024, 4096) > pruned.predicted_speedup(1024, 4096)
    assert Schedule.none(24, 576, has_cls=has_cls).predicted_speedup(hidden_size=1024, intermediate_size=4096) == 1.0


# ------------------------------------------------------------------------------------------------ class vs instance


def test_preset_is_the_constructor_on_the_class_and_the_record_on_an_instance() -> None:
    schedule = Schedule.preset("mean", num_layers=2, tokens_in=8, tokens_out=4)
    assert schedule.preset == {"name": "mean", "params": {}}
    assert Schedule([2, 2], 8).preset is None
    assert callable(Schedule.preset)
    assert "preset=" in repr(schedule)


# ----------------------------------------------------------------------------------------------------------- doctests


@pytest.mark.parametrize("module", [schedule_module, flops_module, format_module], ids=lambda module: module.__name__)
def test_docstring_examples_run(module: Any) -> None:
    results = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0
    assert results.failed == 0
