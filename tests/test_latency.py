"""Latency budgets, the meter, paired measurements, the budget rule, the synthetic model and workload sizing."""

from __future__ import annotations

import dataclasses
import json
import math
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

import tuner.timing
from tuner.errors import LatencyError, TunerError
from tuner.evoprune import Schedule, Scoring
from tuner.evoprune.flops import encoder_flops
from tuner.latency import (
    MAX_ATTEMPTS,
    MAX_FIXED_SHARE,
    SYNTHETIC_BASELINE_MS,
    Budget,
    BudgetError,
    LatencyMeter,
    LatencyModel,
    MeasuredLatency,
    PairedLatency,
    SyntheticLatency,
    budget_verdict,
    choose_batch_size,
    median_upper_bound,
    merge_work,
    parse_budget,
    synthetic_model,
)

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
    assert isinstance(caught.value, TunerError) and caught.value.params == ("budget",)


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
        with pytest.raises(LatencyError, match="not available here"):
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
    with pytest.raises(LatencyError, match=message):
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
    with pytest.raises(LatencyError):
        LatencyMeter("cpu").measure_interleaved([])


# ------------------------------------------------------------------------------------------------ latency model


def native_flops(has_cls: bool = True) -> int:
    tokens = (IMAGE // PATCH) ** 2
    return encoder_flops([tokens] * LAYERS, [tokens] * LAYERS, WIDTH, 4 * WIDTH, 1 if has_cls else 0)


def tiny_latency_model(fixed_share: float = 0.3, merge_share: float = 0.0, **shares: float) -> LatencyModel:
    return LatencyModel.for_encoder(
        40.0, LAYERS, (IMAGE // PATCH) ** 2, WIDTH, 4 * WIDTH, True, fixed_share=fixed_share, merge_share=merge_share,
        **shares,
    )  # fmt: skip


def one_token_per_layer(layers: int, tokens: int) -> Schedule:
    return Schedule([1] * layers, tokens)


def test_latency_model_round_trips_through_json() -> None:
    model = tiny_latency_model(merge_share=0.04, attention_share=0.01, knn_share=0.02)
    assert model.flops_native == native_flops()
    document = json.loads(json.dumps(model.to_dict()))
    again = LatencyModel.from_dict(document)
    assert again == model
    schedule = Schedule.preset("mean", num_layers=LAYERS, tokens_in=64, tokens_out=16)
    assert again.predict_ms(schedule) == model.predict_ms(schedule)
    # A document without the optional shares is the pure FLOP line.
    for name in ("merge_share", "attention_share", "knn_share"):
        del document[name]
    assert LatencyModel.from_dict(document) == dataclasses.replace(
        model, merge_share=0.0, attention_share=0.0, knn_share=0.0
    )


def test_latency_model_is_the_baseline_for_the_empty_schedule() -> None:
    for share in (0.0, 0.1, 0.3, 0.7, MAX_FIXED_SHARE):
        model = tiny_latency_model(share, merge_share=share / 10, attention_share=0.1)
        assert model.predict_ms(Schedule.none(LAYERS, 64)) == model.baseline_ms
        assert model.predict_ms(Schedule.none(LAYERS, 64, has_cls=False)) == model.baseline_ms


@pytest.mark.parametrize("merge_share", [0.0, 0.05])
def test_latency_model_prediction_falls_with_pruning(merge_share: float) -> None:
    model = tiny_latency_model(0.25, merge_share)
    predictions = [
        model.predict_ms(Schedule.preset("mean", num_layers=LAYERS, tokens_in=64, tokens_out=out))
        for out in (60, 56, 48, 32, 24, 16)
    ]
    assert predictions == sorted(predictions, reverse=True) and len(set(predictions)) == len(predictions)
    early = Schedule.preset("first", num_layers=LAYERS, tokens_in=64, tokens_out=32, n=1)
    late = Schedule.preset("last", num_layers=LAYERS, tokens_in=64, tokens_out=32, n=1)
    assert model.predict_ms(early) < model.predict_ms(late) < model.baseline_ms
    ratio = model.flops(early) / model.flops_native
    assert merge_work(early) == merge_work(late) == 1.0  # one step over all 64 tokens each
    assert model.predict_ms(early) == pytest.approx(40.0 * (0.25 + 0.75 * ratio + merge_share))
    assert all(p > 0.25 * 40.0 for p in predictions)


def test_latency_model_accounts_for_every_costly_scoring_setting() -> None:
    model = tiny_latency_model(0.2, merge_share=0.01, attention_share=0.03, knn_share=0.02)
    plan = [16, 8, 0, 0]
    cost = {
        name: model.predict_ms(Schedule(plan, 64, scoring=scoring))
        for name, scoring in {
            "plain": Scoring(w_div=0.0, w_attn=0.0, ctr=0.0),
            "knn": Scoring(w_div=0.5, w_attn=0.0, ctr=0.0),
            "ctr": Scoring(w_div=0.0, w_attn=0.0, ctr=0.25),
            "w_attn": Scoring(w_div=0.0, w_attn=0.5, ctr=0.0),
            "paper": Scoring(),
        }.items()
    }
    work = merge_work(Schedule(plan, 64))
    assert cost["knn"] - cost["plain"] == pytest.approx(40.0 * 0.02 * work)
    assert (
        cost["ctr"] - cost["plain"]
        == pytest.approx(40.0 * 0.03 * work)
        == pytest.approx(cost["w_attn"] - cost["plain"])
    )
    assert cost["paper"] - cost["plain"] == pytest.approx(40.0 * 0.05 * work)


def test_merge_overhead_can_make_a_light_schedule_slower_than_native() -> None:
    model = tiny_latency_model(0.1, merge_share=0.05)
    light = one_token_per_layer(LAYERS, 64)  # one token off every layer: 4 merge steps, almost native FLOPs
    assert model.predict_ms(light) > model.baseline_ms
    assert tiny_latency_model(0.1).predict_ms(light) < model.baseline_ms  # without the merge term it cannot be


def test_latency_model_rejects_foreign_schedules_and_bad_documents() -> None:
    model = tiny_latency_model()
    with pytest.raises(LatencyError, match="the schedule is for 5 layers"):
        model.predict_ms(Schedule.none(LAYERS + 1, 64))
    with pytest.raises(LatencyError, match="missing fields"):
        LatencyModel.from_dict({"baseline_ms": 1.0})
    with pytest.raises(LatencyError, match="unknown fields"):
        LatencyModel.from_dict({**model.to_dict(), "extra": 1})
    with pytest.raises(LatencyError, match="must be a JSON object"):
        LatencyModel.from_dict([1, 2])
    with pytest.raises(LatencyError, match="fixed_share"):
        LatencyModel.from_dict({**model.to_dict(), "fixed_share": 0.99})
    with pytest.raises(LatencyError, match="does not match"):
        LatencyModel.from_dict({**model.to_dict(), "flops_native": 123})
    with pytest.raises(LatencyError, match="expected an integer"):
        LatencyModel.from_dict({**model.to_dict(), "num_layers": 4.0})
    with pytest.raises(LatencyError, match="expected a number"):
        LatencyModel.from_dict({**model.to_dict(), "baseline_ms": "40"})
    with pytest.raises(LatencyError, match="merge_share must be in"):
        LatencyModel.from_dict({**model.to_dict(), "merge_share": -0.1})


def test_synthetic_latency_is_deterministic_and_labelled() -> None:
    model = tiny_clip_vision()
    source = SyntheticLatency(synthetic_model(model))
    schedule = Schedule.preset("skip", num_layers=LAYERS, tokens_in=64, tokens_out=32)
    first = source.paired(lambda: None, lambda: None, schedule, rounds=5)
    again = source.paired(lambda: None, lambda: None, schedule, rounds=5)
    assert first == again and first.source == "synthetic" and first.spread == 0.0
    assert first.ratio == pytest.approx(source.model.predict_ms(schedule) / SYNTHETIC_BASELINE_MS)
    assert source.reference(lambda: None, 4).median_ms == SYNTHETIC_BASELINE_MS
    assert source.environment()["source"] == "synthetic"


# --------------------------------------------------------------------------------------- paired measurement, verdict


def test_paired_latency_is_the_median_ratio_times_the_reference() -> None:
    # A load burst in round 3 slows both calls alike: the ratio does not move.
    paired = PairedLatency((40.0, 42.0, 80.0, 38.0, 41.0), (80.0, 80.0, 160.0, 80.0, 80.0))
    assert paired.ratio == 0.5 and paired.candidate_median_ms == 41.0 and paired.baseline_median_ms == 80.0
    assert paired.latency_ms(100.0) == 50.0
    assert paired.upper_ms(100.0) == pytest.approx(100.0 * median_upper_bound(paired.ratios))
    assert paired.upper_ms(100.0) > paired.latency_ms(100.0)
    record = paired.to_dict(100.0)
    assert record["latency_ms"] == 50.0 and record["rounds"] == 5 and record["baseline_samples_ms"][2] == 160.0
    with pytest.raises(LatencyError, match="as many baseline as candidate samples"):
        PairedLatency((1.0,), (1.0, 2.0))


def test_one_budget_rule_for_every_kind_of_budget() -> None:
    steady = PairedLatency((30.0,) * 9, (60.0,) * 9)  # ratio exactly 0.5, no spread
    assert budget_verdict(steady, parse_budget("2x"), 60.0).met
    assert budget_verdict(steady, parse_budget("50%"), 60.0).met
    assert not budget_verdict(steady, parse_budget("2.01x"), 60.0).met
    assert budget_verdict(steady, parse_budget("30ms"), 60.0).met
    assert not budget_verdict(steady, parse_budget("29.9ms"), 60.0).met
    # The study's reference decides an absolute budget: the same ratio on a reference of 80 ms is 40 ms.
    assert not budget_verdict(steady, parse_budget("30ms"), 80.0).met
    # A noisy measurement whose median meets the limit but whose bound does not is not "met".
    noisy = PairedLatency((28.0, 33.0, 26.0, 34.0, 29.0), (60.0,) * 5)
    verdict = budget_verdict(noisy, parse_budget("30ms"), 60.0)
    assert verdict.latency_ms <= 30.0 < verdict.upper_ms and not verdict.met
    assert "NOT met" in verdict.describe() and "bound" in verdict.describe()


class ScriptedCalls:
    """Two zero-argument calls whose durations follow a script, on a fake clock: deterministic on a loaded machine.

    Sleeping for the scripted time would not be: on a busy 2-core CI runner a 10 ms sleep overshoots by several
    percent, the steady script then reads as noisy and is measured again past its end.
    """

    def __init__(self, baseline_ms: list[float], candidate_ms: list[float]) -> None:
        self.baseline_ms, self.candidate_ms = iter(baseline_ms), iter(candidate_ms)
        self.now_s = 0.0

    def perf_counter(self) -> float:
        return self.now_s

    def baseline(self) -> None:
        self.now_s += next(self.baseline_ms) / 1000.0

    def candidate(self) -> None:
        self.now_s += next(self.candidate_ms) / 1000.0

    def installed(self, monkeypatch: pytest.MonkeyPatch) -> ScriptedCalls:
        """Make tuner.timing read this script's clock (only there: pytest keeps its own)."""
        monkeypatch.setattr(tuner.timing, "time", types.SimpleNamespace(perf_counter=self.perf_counter))
        return self


def test_a_noisy_measurement_is_measured_again_and_flagged(monkeypatch: pytest.MonkeyPatch) -> None:
    meter = LatencyMeter("cpu", threads=1, warmup=0)
    schedule = Schedule.none(LAYERS, 64)
    steady = ScriptedCalls([20.0] * 4, [10.0] * 4).installed(monkeypatch)
    paired = MeasuredLatency(meter).paired(steady.baseline, steady.candidate, schedule, rounds=4, reference_ms=20.0)
    assert paired.attempts == 1 and not paired.noisy and paired.ratio == pytest.approx(0.5)
    # Every attempt swings the candidate between 5 and 20 ms: re-measured up to MAX_ATTEMPTS, samples pooled, flagged.
    swinging = ScriptedCalls([20.0] * 12, [5.0, 20.0, 5.0, 20.0] * 3).installed(monkeypatch)
    paired = MeasuredLatency(meter).paired(swinging.baseline, swinging.candidate, schedule, rounds=4)
    assert paired.attempts == MAX_ATTEMPTS and paired.noisy and len(paired.ratios) == 4 * MAX_ATTEMPTS
    # A baseline far from the study's reference (a loaded machine) is measured again too.
    moved = ScriptedCalls([20.0] * 12, [10.0] * 12).installed(monkeypatch)
    paired = MeasuredLatency(meter).paired(moved.baseline, moved.candidate, schedule, rounds=4, reference_ms=10.0)
    assert paired.attempts == MAX_ATTEMPTS and paired.noisy


# ------------------------------------------------------------------------------------------------ workload sizing


def simulated_machine(per_item_ms: float, fixed_ms: float = 3.0, pruned_share: float = 0.62):
    """A machine whose unpruned forward costs fixed + per_item x batch, and a strong pruning probe a share of that."""

    def measure(batch: int) -> tuple[float, float]:
        unpruned = fixed_ms + per_item_ms * batch
        return unpruned, fixed_ms + pruned_share * per_item_ms * batch

    return measure


@pytest.mark.parametrize(("name", "per_item_ms"), [("2x slower", 2.4), ("today's", 1.2), ("2x faster", 0.6)])
def test_workload_sizing_puts_the_budget_between_pruned_and_unpruned(name: str, per_item_ms: float) -> None:
    measure = simulated_machine(per_item_ms)
    choice = choose_batch_size(measure, 50.0)
    unpruned, pruned = measure(choice.batch_size)
    assert (choice.unpruned_ms, choice.pruned_ms) == (unpruned, pruned)
    assert unpruned > 50.0 >= pruned, name
    assert unpruned >= 1.2 * 50.0  # clearly over the budget, so the search must prune
    assert "batch" in choice.reason and "this machine" in choice.reason


def test_workload_sizing_on_a_machine_with_a_large_fixed_cost_keeps_the_budget_reachable() -> None:
    # Half the budget is fixed cost: aiming the unpruned model at 1.3x the budget would leave the probe over it.
    measure = simulated_machine(1.0, fixed_ms=25.0, pruned_share=0.5)
    choice = choose_batch_size(measure, 50.0)
    unpruned, pruned = measure(choice.batch_size)
    assert unpruned > 50.0 >= pruned


def test_workload_sizing_corrects_a_line_the_probes_got_wrong() -> None:
    calls: list[int] = []

    def measure(batch: int) -> tuple[float, float]:
        calls.append(batch)
        slow = 3.0 if len(calls) <= 2 else 1.0  # the probes ran during a slow phase
        return slow * (1.0 + 1.0 * batch), slow * (1.0 + 0.6 * batch)

    choice = choose_batch_size(measure, 50.0)
    assert choice.unpruned_ms > 50.0 >= choice.pruned_ms
    assert len(calls) == 4  # two probes, one check, one corrected check
