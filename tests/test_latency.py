"""Latency budgets, the meter, and the deterministic latency model (tiny random CLIP encoders, CPU, seconds)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from evaluators.base import Evaluator, EvaluatorError, Split
from evaluators.latency import (
    MAX_FIXED_SHARE,
    Budget,
    BudgetError,
    LatencyMeter,
    LatencyModel,
    calibrate_latency_model,
    merge_probe_schedule,
    merge_work,
    parse_budget,
    probe_schedule,
)
from tuner.evoprune import Schedule, apply
from tuner.evoprune.flops import encoder_flops

# ------------------------------------------------------------------------------------------------------- budgets


@pytest.mark.parametrize(
    ("text", "kind", "value", "normalised"),
    [
        ("50ms", "ms", 50.0, "50ms"),
        ("50 ms", "ms", 50.0, "50ms"),
        ("  12.5MS ", "ms", 12.5, "12.5ms"),
        ("0.05s", "ms", 50.0, "50ms"),
        ("0.05 S", "ms", 50.0, "50ms"),
        ("2x", "speedup", 2.0, "2x"),
        ("1.5 X", "speedup", 1.5, "1.5x"),
        ("1x", "speedup", 1.0, "1x"),
        ("60%", "share", 0.6, "60%"),
        ("100 %", "share", 1.0, "100%"),
        ("33.3%", "share", 0.333, "33.3%"),
    ],
)
def test_budget_forms(text: str, kind: str, value: float, normalised: str) -> None:
    budget = parse_budget(text)
    assert budget.kind == kind
    assert budget.value == pytest.approx(value)
    assert budget.text == text
    assert str(budget) == normalised
    assert parse_budget(str(budget)) == Budget(kind, budget.value, normalised)  # type: ignore[arg-type]


FORMS = "give a time (50ms, 0.05s), a speed-up over the unpruned model (2x) or a share of its latency (60%)"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("fast", FORMS),
        ("50", FORMS),  # a number without a unit
        ("ms", FORMS),  # a unit without a number
        ("5 0ms", FORMS),
        ("", "it is empty; " + FORMS),
        ("   ", "it is empty; " + FORMS),
        ("-5ms", "a time must be greater than 0; give e.g. 50ms or 0.05s"),
        ("0ms", "a time must be greater than 0; give e.g. 50ms or 0.05s"),
        ("0s", "a time must be greater than 0; give e.g. 50ms or 0.05s"),
        ("0x", "a speed-up must be at least 1x (1x = as fast as the unpruned model); give e.g. 2x"),
        ("0.5x", "a speed-up must be at least 1x (1x = as fast as the unpruned model); give e.g. 2x"),
        ("150%", "a share of the unpruned latency must be in (0%, 100%]; give e.g. 60%"),
        ("0%", "a share of the unpruned latency must be in (0%, 100%]; give e.g. 60%"),
        ("nan ms", "the number must be finite; give e.g. 50ms, 2x or 60%"),
        ("inf x", "the number must be finite; give e.g. 50ms, 2x or 60%"),
    ],
)
def test_bad_budgets_say_what_is_wrong_and_how_to_fix_it(text: str, problem: str) -> None:
    with pytest.raises(BudgetError) as caught:
        parse_budget(text)
    message = str(caught.value)
    assert message == f"invalid budget {text!r}: {problem}"
    assert "\n" not in message
    assert isinstance(caught.value, EvaluatorError)


def test_budget_limit_ms() -> None:
    assert parse_budget("50ms").limit_ms(80.0) == 50.0
    assert parse_budget("0.02s").limit_ms(80.0) == pytest.approx(20.0)
    assert parse_budget("2x").limit_ms(80.0) == 40.0
    assert parse_budget("60%").limit_ms(80.0) == pytest.approx(48.0)
    assert parse_budget("1x").limit_ms(80.0) == parse_budget("100%").limit_ms(80.0) == 80.0
    for baseline in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(BudgetError, match="unpruned latency must be a positive number"):
            parse_budget("2x").limit_ms(baseline)


# ------------------------------------------------------------------------------------------------------- meter

IMAGE, PATCH, LAYERS, WIDTH = 64, 8, 4, 64  # 64 patch tokens + CLS


def tiny_clip_vision() -> CLIPVisionModel:
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=PATCH,
    )
    return CLIPVisionModel._from_config(config, attn_implementation="sdpa").eval()


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    # The meter fixes the process-wide thread count; give other tests back what they had.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_meter_defaults_follow_the_device() -> None:
    meter = LatencyMeter("cpu")
    assert (meter.repeats, meter.warmup) == (10, 2)
    assert meter.threads is not None and meter.threads >= 1
    assert torch.get_num_threads() == meter.threads
    assert meter.timer == "perf_counter"
    if torch.cuda.is_available():
        gpu = LatencyMeter("cuda")
        assert (gpu.repeats, gpu.warmup, gpu.timer) == (30, 10, "cuda_events")
    else:
        with pytest.raises(EvaluatorError, match="not available here"):
            LatencyMeter("cuda")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threads": 0}, "threads must be an integer >= 1"),
        ({"repeats": 0}, "repeats must be an integer >= 1"),
        ({"warmup": -1}, "warmup must be an integer >= 0"),
        ({"repeats": 2.5}, "repeats must be an integer >= 1"),
    ],
)
def test_meter_rejects_bad_settings(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(EvaluatorError, match=message):
        LatencyMeter("cpu", **kwargs)


def test_meter_measures_a_tiny_model() -> None:
    model = tiny_clip_vision()
    x = torch.randn(4, 3, IMAGE, IMAGE)
    calls = 0

    def forward() -> None:
        nonlocal calls
        calls += 1
        model(pixel_values=x)

    meter = LatencyMeter("cpu", threads=1, repeats=6, warmup=2, dtype=torch.float32)
    result = meter.measure(forward)
    assert calls == 8  # warm-up runs are not timed, but they run
    assert len(result.samples_ms) == 6 and all(0 < s < 10_000 for s in result.samples_ms)
    assert min(result.samples_ms) <= result.median_ms <= max(result.samples_ms)
    assert result.median_ms <= result.p90_ms <= max(result.samples_ms)
    assert result.threads == 1 and torch.get_num_threads() == 1
    assert result.torch_version == torch.__version__ and result.dtype == "float32"
    assert result.timer == "perf_counter" and result.device_name
    json.dumps(result.to_dict())
    environment = meter.environment()
    assert {"device", "device_name", "torch", "cuda", "threads", "dtype", "repeats", "warmup"} <= set(environment)
    assert environment["threads"] == 1 and environment["dtype"] == "float32"
    json.dumps(environment)


def test_meter_interleaves_and_orders_results() -> None:
    model = tiny_clip_vision()
    small, large = torch.randn(1, 3, IMAGE, IMAGE), torch.randn(24, 3, IMAGE, IMAGE)
    order: list[str] = []

    def run_small() -> None:
        order.append("small")
        model(pixel_values=small)

    def run_large() -> None:
        order.append("large")
        model(pixel_values=large)

    fast, slow = LatencyMeter("cpu", repeats=5, warmup=1).measure_interleaved([run_small, run_large])
    assert order == ["small", "large"] * 6  # round-robin, warm-up included
    assert len(fast.samples_ms) == len(slow.samples_ms) == 5
    assert fast.median_ms < slow.median_ms  # 24 images cost more than 1, well beyond the noise
    with pytest.raises(EvaluatorError):
        LatencyMeter("cpu").measure_interleaved([])


# ------------------------------------------------------------------------------------------------ latency model


def native_flops(has_cls: bool = True) -> int:
    tokens = (IMAGE // PATCH) ** 2
    return encoder_flops([tokens] * LAYERS, [tokens] * LAYERS, WIDTH, 4 * WIDTH, 1 if has_cls else 0)


def tiny_latency_model(fixed_share: float = 0.3, merge_share: float = 0.0) -> LatencyModel:
    return LatencyModel(
        baseline_ms=40.0,
        fixed_share=fixed_share,
        flops_native=native_flops(),
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        has_cls=True,
        num_layers=LAYERS,
        tokens_in=(IMAGE // PATCH) ** 2,
        merge_share=merge_share,
        calibration={"probe": "keep 0.5, 0.5", "environment": {"threads": 2}},
    )


def test_latency_model_round_trips_through_json() -> None:
    model = tiny_latency_model(merge_share=0.04)
    document = json.loads(json.dumps(model.to_dict()))
    again = LatencyModel.from_dict(document)
    assert again == model
    schedule = Schedule.preset("mean", num_layers=LAYERS, tokens_in=64, tokens_out=16)
    assert again.predict_ms(schedule) == model.predict_ms(schedule)
    # A document without the optional fields is the pure FLOP line.
    del document["merge_share"], document["calibration"]
    assert LatencyModel.from_dict(document) == dataclasses.replace(model, merge_share=0.0, calibration={})


def test_latency_model_is_the_baseline_for_the_empty_schedule() -> None:
    for share in (0.0, 0.1, 0.3, 0.7, MAX_FIXED_SHARE):
        model = tiny_latency_model(share, merge_share=share / 10)
        assert model.predict_ms(Schedule.none(LAYERS, 64)) == model.baseline_ms
        assert model.predict_ms(Schedule.none(LAYERS, 64, has_cls=False)) == model.baseline_ms


@pytest.mark.parametrize("merge_share", [0.0, 0.05])
def test_latency_model_prediction_falls_with_pruning(merge_share: float) -> None:
    model = tiny_latency_model(0.25, merge_share)
    # The same merging layers, more tokens removed: strictly faster.
    predictions = [
        model.predict_ms(Schedule.preset("mean", num_layers=LAYERS, tokens_in=64, tokens_out=out))
        for out in (60, 56, 48, 32, 24, 16)
    ]
    assert predictions == sorted(predictions, reverse=True) and len(set(predictions)) == len(predictions)
    assert predictions[-1] < model.baseline_ms
    # Earlier merging saves more than the same merging later.
    early = Schedule.preset("first", num_layers=LAYERS, tokens_in=64, tokens_out=32, n=1)
    late = Schedule.preset("last", num_layers=LAYERS, tokens_in=64, tokens_out=32, n=1)
    assert model.predict_ms(early) < model.predict_ms(late) < model.baseline_ms
    # The formula itself.
    ratio = model.flops(early) / model.flops_native
    assert merge_work(early) == merge_work(late) == 1.0  # one step over all 64 tokens each
    assert model.predict_ms(early) == pytest.approx(40.0 * (0.25 + 0.75 * ratio + merge_share))
    assert model.predict_speedup(early) == pytest.approx(40.0 / model.predict_ms(early))
    # The fixed share is never merged away.
    assert all(p > 0.25 * 40.0 for p in predictions)


def test_merge_overhead_can_make_a_light_schedule_slower_than_native() -> None:
    model = tiny_latency_model(0.1, merge_share=0.05)
    light = merge_probe_schedule(LAYERS, 64)  # one token off every layer: 4 merge steps, almost native FLOPs
    assert light.remove_per_layer == [1, 1, 1, 1]
    assert model.predict_ms(light) > model.baseline_ms and model.predict_speedup(light) < 1
    assert tiny_latency_model(0.1).predict_ms(light) < model.baseline_ms  # without the merge term it cannot be


def test_latency_model_rejects_foreign_schedules_and_bad_documents() -> None:
    model = tiny_latency_model()
    with pytest.raises(EvaluatorError, match="calibrate a latency model for this encoder"):
        model.predict_ms(Schedule.none(LAYERS + 1, 64))
    with pytest.raises(EvaluatorError, match="missing fields"):
        LatencyModel.from_dict({"baseline_ms": 1.0})
    with pytest.raises(EvaluatorError, match="unknown fields"):
        LatencyModel.from_dict({**model.to_dict(), "extra": 1})
    with pytest.raises(EvaluatorError, match="must be a JSON object"):
        LatencyModel.from_dict([1, 2])
    with pytest.raises(EvaluatorError, match="fixed_share"):
        LatencyModel.from_dict({**model.to_dict(), "fixed_share": 0.99})
    with pytest.raises(EvaluatorError, match="does not match"):
        LatencyModel.from_dict({**model.to_dict(), "flops_native": 123})
    with pytest.raises(EvaluatorError, match="expected an integer"):
        LatencyModel.from_dict({**model.to_dict(), "num_layers": 4.0})
    with pytest.raises(EvaluatorError, match="expected a number"):
        LatencyModel.from_dict({**model.to_dict(), "baseline_ms": "40"})
    with pytest.raises(EvaluatorError, match="merge_share must be in"):
        LatencyModel.from_dict({**model.to_dict(), "merge_share": -0.1})


def test_probe_schedules_respect_every_layer_cap() -> None:
    for layers, tokens in [(1, 1), (1, 7), (4, 3), (2, 35), (6, 64), (24, 576), (27, 729)]:
        light = merge_probe_schedule(layers, tokens)  # the Schedule constructor checks every cap
        assert light.remove_per_layer == [1 if layer < min(layers, tokens - 1) else 0 for layer in range(layers)]
        probe = probe_schedule(layers, tokens)
        assert probe.num_layers == layers and probe.tokens_in == tokens
        expected = tokens
        for _ in range(min(2, layers)):  # the first two layers keep half (rounded up) of what they receive
            expected = math.ceil(expected / 2)
        assert probe.tokens_out == expected


class TinyVisionEvaluator(Evaluator):
    """A real evaluator around a tiny random CLIP encoder (not registered: it is for these tests only)."""

    name = "tiny-vision"

    def __init__(self, batch_size: int = 8) -> None:
        self.model = tiny_clip_vision()
        self.batch_size = batch_size
        self.device = torch.device("cpu")
        self.x = torch.randn(batch_size, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))

    def accuracy(self, split: Split = "calib") -> float:
        return 1.0

    def latency_call(self) -> Callable[[], Any]:
        return lambda: self.model(pixel_values=self.x)

    def settings(self) -> dict[str, Any]:
        return {"evaluator": self.name, "batch_size": self.batch_size}


def test_calibrate_on_a_tiny_clip_encoder() -> None:
    evaluator = TinyVisionEvaluator()
    meter = LatencyMeter("cpu", repeats=5, warmup=1)
    model = calibrate_latency_model(evaluator, meter)
    assert model.baseline_ms > 0 and 0.0 <= model.fixed_share <= MAX_FIXED_SHARE
    assert (model.num_layers, model.tokens_in, model.has_cls) == (LAYERS, 64, True)
    assert (model.hidden_size, model.intermediate_size) == (WIDTH, 4 * WIDTH)
    assert model.flops_native == native_flops()
    assert 0.0 <= model.merge_share <= 1.0
    calibration = model.calibration
    heavy, light = calibration["probes"]["heavy"], calibration["probes"]["merge"]
    assert heavy["remove_per_layer"] == [32, 16, 0, 0] and light["remove_per_layer"] == [1, 1, 1, 1]
    assert 0 < heavy["flop_ratio"] < light["flop_ratio"] < 1
    assert heavy["measured_ratio"] > 0 and light["measured_ratio"] > 0
    assert calibration["evaluator"] == "tiny-vision" and calibration["batch_size"] == 8
    assert calibration["environment"]["threads"] == torch.get_num_threads()
    # The fit passes through both probes' measurements where nothing was clamped.
    probe = probe_schedule(LAYERS, 64)
    if 0.0 < calibration["raw_fixed_share"] < MAX_FIXED_SHARE and calibration["raw_merge_share"] > 0:
        assert model.predict_ms(probe) / model.baseline_ms == pytest.approx(heavy["measured_ratio"], rel=1e-9)
        light_ratio = model.predict_ms(merge_probe_schedule(LAYERS, 64)) / model.baseline_ms
        assert light_ratio == pytest.approx(light["measured_ratio"], rel=1e-9)
    # Five rounds asked for, the calibration minimum measured.
    assert calibration["rounds"] == 10 and calibration["environment"]["repeats"] == 10
    assert model.predict_ms(Schedule.none(LAYERS, 64)) == model.baseline_ms
    assert LatencyModel.from_dict(json.loads(json.dumps(model.to_dict()))) == model
    # The probe was removed: the model is untouched and accepts a schedule again.
    with apply(evaluator.model, probe) as handle:
        evaluator.model(pixel_values=evaluator.x)
    assert handle.token_counts == [32, 16, 16, 16]


def test_calibrate_without_the_merge_term_is_the_flop_line() -> None:
    evaluator = TinyVisionEvaluator(batch_size=4)
    model = calibrate_latency_model(evaluator, LatencyMeter("cpu", repeats=10, warmup=1), merge_term=False)
    assert model.merge_share == 0.0 and list(model.calibration["probes"]) == ["heavy"]
    heavy = model.calibration["probes"]["heavy"]
    y, f = heavy["measured_ratio"], heavy["flop_ratio"]
    assert model.fixed_share == pytest.approx(min(MAX_FIXED_SHARE, max(0.0, (y - f) / (1 - f))))
    light = merge_probe_schedule(LAYERS, 64)
    assert model.predict_ms(light) < model.baseline_ms  # the FLOP line never predicts a slowdown
