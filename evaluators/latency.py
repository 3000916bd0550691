"""Latency: budgets, measurement, and the deterministic latency model the search optimises against.

Three jobs, one subject:

- :func:`parse_budget` turns ``50ms`` / ``0.05s`` / ``2x`` / ``60%`` into a :class:`Budget`.
- :class:`LatencyMeter` measures a call the way the field notes say good harnesses do (fixed CPU threads and
  perf_counter, or CUDA events; warm-up; medians of many runs with p90; raw samples; the environment for provenance).
- :class:`LatencyModel` predicts a schedule's latency from its FLOPs and its merge steps, after
  :func:`calibrate_latency_model` measured the unpruned model and two probe schedules once. Why a model and not a
  measurement per trial: the sampler must see deterministic values (the same seed gives the same trials, a resumed
  study predicts what it predicted before), and a shared CPU is noisy (+-15%, far more under load).
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch

from evaluators.base import Evaluator, EvaluatorError
from tuner.evoprune import Schedule, apply
from tuner.evoprune.adapters import resolve_encoder
from tuner.evoprune.flops import encoder_flops
from tuner.timing import time_interleaved

__all__ = [
    "MAX_FIXED_SHARE",
    "MAX_MERGE_SHARE",
    "MIN_CALIBRATION_ROUNDS",
    "Budget",
    "BudgetError",
    "BudgetKind",
    "LatencyMeter",
    "LatencyModel",
    "LatencyResult",
    "calibrate_latency_model",
    "merge_probe_schedule",
    "merge_work",
    "parse_budget",
    "probe_schedule",
]

# --------------------------------------------------------------------------------------------------------- budgets

BudgetKind = Literal["ms", "speedup", "share"]

_BUDGET_FORMS = "give a time (50ms, 0.05s), a speed-up over the unpruned model (2x) or a share of its latency (60%)"
_BUDGET_PATTERN = re.compile(r"^(?P<number>.*?)\s*(?P<unit>ms|s|x|×|%)$", re.IGNORECASE)


class BudgetError(EvaluatorError):
    """A latency budget that cannot be parsed or makes no sense; the message names the problem and the fix."""


@dataclass(frozen=True)
class Budget:
    """A latency budget: an absolute time, a speed-up over the unpruned model, or a share of its latency.

    Attributes:
        kind: ``"ms"`` (an absolute time), ``"speedup"`` (a factor >= 1) or ``"share"`` (a fraction in (0, 1]).
        value: milliseconds for ``"ms"``, the factor for ``"speedup"``, the fraction for ``"share"`` (60% is 0.6).
        text: the text it was parsed from, as given.

    Example:
        >>> str(parse_budget("0.05 S")), parse_budget("2x").limit_ms(80.0), parse_budget("60%").limit_ms(80.0)
        ('50ms', 40.0, 48.0)
    """

    kind: BudgetKind
    value: float
    text: str = ""

    def limit_ms(self, baseline_ms: float) -> float:
        """The latency limit in milliseconds, given the unpruned model's latency.

        Args:
            baseline_ms: the unpruned model's latency (the same scope and batch as the trials').

        Returns:
            The limit; for ``"ms"`` the value itself, whatever the baseline.

        Raises:
            BudgetError: a baseline that is not a positive finite number.
        """
        if not (isinstance(baseline_ms, (int, float)) and math.isfinite(baseline_ms) and baseline_ms > 0):
            raise BudgetError(f"the unpruned latency must be a positive number of milliseconds, got {baseline_ms!r}")
        if self.kind == "ms":
            return self.value
        if self.kind == "speedup":
            return baseline_ms / self.value
        return baseline_ms * self.value

    def __str__(self) -> str:
        if self.kind == "ms":
            return f"{self.value:g}ms"
        if self.kind == "speedup":
            return f"{self.value:g}x"
        return f"{round(self.value * 100, 10):g}%"


def parse_budget(text: str) -> Budget:
    """Parse a latency budget: ``50ms`` / ``50 ms`` / ``0.05s`` (a time), ``2x`` (a speed-up), ``60%`` (a share).

    Units are case-insensitive and may be separated from the number by spaces.

    Args:
        text: the budget as typed.

    Returns:
        The budget (a time is always held in milliseconds).

    Raises:
        BudgetError: anything else, with one line that names the problem and the fix.

    Example:
        >>> parse_budget("50 MS")
        Budget(kind='ms', value=50.0, text='50 MS')
        >>> try:
        ...     parse_budget("fast")
        ... except BudgetError as error:
        ...     print(error)  # doctest: +ELLIPSIS
        invalid budget 'fast': give a time (50ms, 0.05s), a speed-up over the unpruned model (2x) or a share of ...
    """
    if not isinstance(text, str):
        raise BudgetError(f"invalid budget {text!r}: {_BUDGET_FORMS}")
    stripped = text.strip()
    if not stripped:
        raise BudgetError(f"invalid budget {text!r}: it is empty; {_BUDGET_FORMS}")
    found = _BUDGET_PATTERN.match(stripped)
    if found is None:
        raise BudgetError(f"invalid budget {text!r}: {_BUDGET_FORMS}")
    number_text, unit = found["number"], found["unit"].lower()
    try:
        number = float(number_text)
    except ValueError:
        raise BudgetError(f"invalid budget {text!r}: {_BUDGET_FORMS}") from None
    if not math.isfinite(number):
        raise BudgetError(f"invalid budget {text!r}: the number must be finite; give e.g. 50ms, 2x or 60%")
    if unit in ("ms", "s"):
        if number <= 0:
            raise BudgetError(f"invalid budget {text!r}: a time must be greater than 0; give e.g. 50ms or 0.05s")
        return Budget("ms", number * 1000.0 if unit == "s" else number, text)
    if unit in ("x", "×"):
        if number < 1:
            raise BudgetError(
                f"invalid budget {text!r}: a speed-up must be at least 1x (1x = as fast as the unpruned model); "
                "give e.g. 2x"
            )
        return Budget("speedup", number, text)
    if not 0 < number <= 100:
        raise BudgetError(
            f"invalid budget {text!r}: a share of the unpruned latency must be in (0%, 100%]; give e.g. 60%"
        )
    return Budget("share", number / 100.0, text)


# ----------------------------------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class LatencyResult:
    """Latency of one call, with the conditions it was measured under.

    Attributes:
        median_ms: median of the timed runs (the number to report).
        p90_ms: 90th percentile of the timed runs.
        samples_ms: every timed run, in order.
        device_name: the GPU's or CPU's name.
        threads: torch CPU threads during the runs.
        torch_version: ``torch.__version__``.
        cuda_version: ``torch.version.cuda`` (None for a CPU build).
        dtype: the model's dtype, if the meter was told (provenance only).
        repeats: timed runs.
        warmup: untimed runs before them.
        timer: ``"cuda_events"`` or ``"perf_counter"``.
    """

    median_ms: float
    p90_ms: float
    samples_ms: list[float]
    device_name: str
    threads: int
    torch_version: str
    cuda_version: str | None
    dtype: str | None
    repeats: int
    warmup: int
    timer: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields."""
        return asdict(self)


def _default_threads() -> int:
    # The cores this process may use (a container's CPU set), not the host's count.
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _positive_int(name: str, value: int | None, default: int, minimum: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EvaluatorError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class LatencyMeter:
    """Measures calls on one device under fixed conditions.

    CPU: ``torch.set_num_threads(threads)`` (default: every core this process may use), perf_counter, 2 warm-up runs,
    median of 10. CUDA: CUDA events, 10 warm-up runs, median of 30 with p90 (see :mod:`tuner.timing`). The thread count
    is process-wide: accuracy passes run with it too.

    Where other processes compete for the cores, fewer threads can be far faster (oversubscribed OpenMP threads wait
    on each other): on the 2-core development machine, with a training job running, the demo's 256-scene accuracy
    pass took 0.7 s with 1 thread and 7 s with 2.

    Args:
        device: where the calls run.
        threads: torch CPU threads; None for every available core on a CPU (left as is on CUDA).
        repeats: timed runs; None for the device's default.
        warmup: untimed runs first; None for the device's default.
        dtype: the model's dtype, recorded in results and :meth:`environment` (provenance only).

    Example:
        >>> meter = LatencyMeter("cpu", threads=1, repeats=3, warmup=1)
        >>> result = meter.measure(lambda: sum(range(1000)))
        >>> len(result.samples_ms), result.threads
        (3, 1)
    """

    CPU_REPEATS, CPU_WARMUP = 10, 2
    CUDA_REPEATS, CUDA_WARMUP = 30, 10

    def __init__(
        self,
        device: str | torch.device = "cpu",
        threads: int | None = None,
        repeats: int | None = None,
        warmup: int | None = None,
        *,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        if cuda and not torch.cuda.is_available():
            raise EvaluatorError(f"device {str(self.device)!r} is not available here (no CUDA); use --device cpu")
        self.repeats = _positive_int("repeats", repeats, self.CUDA_REPEATS if cuda else self.CPU_REPEATS, 1)
        self.warmup = _positive_int("warmup", warmup, self.CUDA_WARMUP if cuda else self.CPU_WARMUP, 0)
        # On a CPU the thread count decides the latency: fix it. On CUDA, only when asked.
        self.threads: int | None = _positive_int("threads", threads, _default_threads(), 1)
        if cuda and threads is None:
            self.threads = None
        self.dtype = None if dtype is None else str(dtype).removeprefix("torch.")
        self._apply_threads()

    def _apply_threads(self) -> None:
        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    @property
    def timer(self) -> str:
        """``"cuda_events"`` on a GPU, ``"perf_counter"`` elsewhere."""
        return "cuda_events" if self.device.type == "cuda" else "perf_counter"

    def device_name(self) -> str:
        """The GPU's name, or the CPU's model name."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return _cpu_name()

    def environment(self) -> dict[str, Any]:
        """What a latency number depends on besides the model: for provenance (JSON-serialisable)."""
        return {
            "device": str(self.device),
            "device_name": self.device_name(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "threads": torch.get_num_threads(),
            "dtype": self.dtype,
            "repeats": self.repeats,
            "warmup": self.warmup,
            "timer": self.timer,
            "python": platform.python_version(),
        }

    def measure(self, call: Callable[[], object]) -> LatencyResult:
        """Latency of one zero-argument call (run under ``torch.inference_mode``)."""
        return self.measure_interleaved([call])[0]

    def measure_interleaved(self, calls: Sequence[Callable[[], object]]) -> list[LatencyResult]:
        """Latency of several calls, timed round-robin so that a slow phase of a shared host hits them all alike.

        Args:
            calls: zero-argument callables (put the baseline among them: ratios are what transfer).

        Returns:
            One result per call, in order.
        """
        if not calls:
            raise EvaluatorError("measure_interleaved needs at least one call")
        self._apply_threads()
        timings = time_interleaved(list(calls), self.device, repeats=self.repeats, warmup=self.warmup)
        name, threads = self.device_name(), torch.get_num_threads()
        return [
            LatencyResult(
                median_ms=timing.median_ms,
                p90_ms=timing.p90_ms,
                samples_ms=list(timing.samples_ms),
                device_name=name,
                threads=threads,
                torch_version=torch.__version__,
                cuda_version=torch.version.cuda,
                dtype=self.dtype,
                repeats=self.repeats,
                warmup=self.warmup,
                timer=self.timer,
            )
            for timing in timings
        ]


# -------------------------------------------------------------------------------------------------- latency model

MAX_FIXED_SHARE = 0.95
"""Upper clamp of :attr:`LatencyModel.fixed_share`: some latency always scales with FLOPs, so FLOP order survives."""

MIN_CALIBRATION_ROUNDS = 10
"""Fewest interleaved rounds a calibration measures: every prediction of a study inherits its noise."""

MAX_MERGE_SHARE = 1.0
"""Upper bound of :attr:`LatencyModel.merge_share` (one merge step costing more than the whole encoder is a bad fit)."""

Point = tuple[float, float, float]
"""A probe's (measured ratio y, FLOP ratio f, merge work m)."""


_REQUIRED_FIELDS = (
    "baseline_ms",
    "fixed_share",
    "flops_native",
    "hidden_size",
    "intermediate_size",
    "has_cls",
    "num_layers",
    "tokens_in",
)
_OPTIONAL_FIELDS = ("merge_share", "calibration")


def merge_work(schedule: Schedule) -> float:
    """Merge steps of ``schedule``, each weighted by the share of ``tokens_in`` its layer receives.

    A merge step's cost (scoring pairs, matching, gathering) grows with the tokens it sees; measured on the demo
    encoder (CPU, 1 thread), a cost linear in those tokens fitted ten schedules within 3%, where a constant cost per
    step missed by up to 24% and a quadratic one by up to 10%.

    Example:
        >>> merge_work(Schedule([32, 16, 0, 0], tokens_in=64))  # 64/64 + 32/64
        1.5
    """
    return sum(
        tokens / schedule.tokens_in
        for tokens, remove in zip(schedule.tokens_before(), schedule.remove_per_layer, strict=True)
        if remove > 0
    )


@dataclass(frozen=True)
class LatencyModel:
    """Deterministic latency of a schedule: a fixed part, a part proportional to FLOPs, and the merge steps' own cost.

    ``predict_ms(s) = baseline_ms * (fixed_share + (1 - fixed_share) * flops(s) / flops_native
    + merge_share * merge_work(s))``. The fixed part stands for what merging does not shrink (patch embedding, the
    head, launch costs); ``merge_share`` is what one merge step over all ``tokens_in`` tokens costs, as a share of
    ``baseline_ms`` (:func:`merge_work` weighs each step by the tokens it sees). With ``merge_share = 0`` this is the
    pure FLOP line. The merge term lets a schedule that merges little at many layers come out slower than native,
    as it is measured to be (the paper's own encoder was 6-10% slower than native).

    Attributes:
        baseline_ms: measured latency of the unpruned model (one batch, the evaluator's timed scope).
        fixed_share: share of ``baseline_ms`` that does not scale with FLOPs, in [0, :data:`MAX_FIXED_SHARE`].
        flops_native: FLOPs of the unpruned encoder layers.
        hidden_size: encoder width.
        intermediate_size: encoder MLP width.
        has_cls: whether the encoder has a CLS token (counted in every layer's FLOPs).
        num_layers: encoder depth (schedules must match it).
        tokens_in: patch tokens per image (schedules must match it).
        merge_share: cost of one merge step over ``tokens_in`` tokens, as a share of ``baseline_ms``, in
            [0, :data:`MAX_MERGE_SHARE`].
        calibration: how it was calibrated (probe schedules, measured times, meter environment, ...).

    Example:
        >>> native = encoder_flops([16] * 4, [16] * 4, 32, 64, extra_tokens=1)
        >>> m = LatencyModel(80.0, 0.2, native, 32, 64, True, 4, 16)
        >>> m.predict_ms(Schedule.none(4, 16)), round(m.predict_ms(Schedule([8, 4, 0, 0], 16)), 2)
        (80.0, 43.65)
        >>> LatencyModel.from_dict(m.to_dict()) == m
        True
    """

    baseline_ms: float
    fixed_share: float
    flops_native: int
    hidden_size: int
    intermediate_size: int
    has_cls: bool
    num_layers: int
    tokens_in: int
    merge_share: float = 0.0
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.baseline_ms) and self.baseline_ms > 0):
            raise EvaluatorError(f"latency model: baseline_ms must be a positive number, got {self.baseline_ms!r}")
        if not 0.0 <= self.fixed_share <= MAX_FIXED_SHARE:
            raise EvaluatorError(
                f"latency model: fixed_share must be in [0, {MAX_FIXED_SHARE}], got {self.fixed_share!r}"
            )
        if not 0.0 <= self.merge_share <= MAX_MERGE_SHARE:
            raise EvaluatorError(
                f"latency model: merge_share must be in [0, {MAX_MERGE_SHARE}], got {self.merge_share!r}"
            )
        for name in ("flops_native", "hidden_size", "intermediate_size", "num_layers", "tokens_in"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EvaluatorError(f"latency model: {name} must be an integer >= 1, got {value!r}")
        # flops_native is stored for readers of the study; it must be what the dimensions give.
        expected = self.flops(Schedule.none(self.num_layers, self.tokens_in))
        if self.flops_native != expected:
            raise EvaluatorError(
                f"latency model: flops_native {self.flops_native} does not match the encoder's dimensions ({expected})"
            )

    def flops(self, schedule: Schedule) -> int:
        """FLOPs of the encoder layers under ``schedule`` (CLS counted from the model, not the schedule)."""
        if schedule.num_layers != self.num_layers or schedule.tokens_in != self.tokens_in:
            raise EvaluatorError(
                f"the schedule is for {schedule.num_layers} layers x {schedule.tokens_in} tokens but the latency "
                f"model for {self.num_layers} x {self.tokens_in}; calibrate a latency model for this encoder"
            )
        return encoder_flops(
            schedule.tokens_before(),
            schedule.tokens_after(),
            self.hidden_size,
            self.intermediate_size,
            1 if self.has_cls else 0,
        )

    def predict_ms(self, schedule: Schedule) -> float:
        """Predicted latency of ``schedule`` in milliseconds; exactly ``baseline_ms`` for the empty schedule."""
        flop_ratio = self.flops(schedule) / self.flops_native
        # 1 - (1 - c)(1 - r) is c + (1 - c) r, written so that it is exactly 1 when r == 1 (no float round-off).
        ratio = 1.0 - (1.0 - self.fixed_share) * (1.0 - flop_ratio)
        if self.merge_share:
            ratio += self.merge_share * merge_work(schedule)
        return self.baseline_ms * ratio

    def predict_speedup(self, schedule: Schedule) -> float:
        """``baseline_ms / predict_ms(schedule)`` (below 1 where merging costs more than it saves)."""
        return self.baseline_ms / self.predict_ms(schedule)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields (for a study's user attributes)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, document: Any) -> LatencyModel:
        """Rebuild a model from :meth:`to_dict` output (``merge_share`` and ``calibration`` may be absent).

        Raises:
            EvaluatorError: not a dict, or a missing, unknown or mistyped field.
        """
        if not isinstance(document, dict):
            raise EvaluatorError(f"a latency model must be a JSON object, got {type(document).__name__}")
        missing = [name for name in _REQUIRED_FIELDS if name not in document]
        unknown = sorted(set(document) - set(_REQUIRED_FIELDS) - set(_OPTIONAL_FIELDS))
        if missing or unknown:
            raise EvaluatorError(f"latency model: missing fields {missing}, unknown fields {unknown}")
        try:
            return cls(
                baseline_ms=_as_float(document["baseline_ms"]),
                fixed_share=_as_float(document["fixed_share"]),
                flops_native=_as_int(document["flops_native"]),
                hidden_size=_as_int(document["hidden_size"]),
                intermediate_size=_as_int(document["intermediate_size"]),
                has_cls=_as_bool(document["has_cls"]),
                num_layers=_as_int(document["num_layers"]),
                tokens_in=_as_int(document["tokens_in"]),
                merge_share=_as_float(document.get("merge_share", 0.0)),
                calibration=dict(document.get("calibration") or {}),
            )
        except TypeError as error:
            raise EvaluatorError(f"latency model: {error}") from None


def _as_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _as_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value


def probe_schedule(
    num_layers: int, tokens_in: int, *, family: str | None = None, has_cls: bool | None = None
) -> Schedule:
    """The heavy probe: halve the tokens at layers 0 and 1 (about 1/4 left), so FLOPs fall far below native.

    It fixes the FLOP line (a FLOP ratio far from 1 conditions the fixed share well); every layer respects the
    one-step cap (at most half of what it receives).

    Example:
        >>> probe_schedule(6, 64).tokens_after()
        [32, 16, 16, 16, 16, 16]
    """
    ratios = [0.5 if layer < 2 else 1.0 for layer in range(num_layers)]
    return Schedule.from_keep_ratios(ratios, tokens_in=tokens_in, family=family, has_cls=has_cls)


def merge_probe_schedule(
    num_layers: int, tokens_in: int, *, family: str | None = None, has_cls: bool | None = None
) -> Schedule:
    """The merge probe: remove one token at every layer, so FLOPs stay near native and the merge steps' cost shows.

    On an encoder with fewer tokens than layers, only the first ``tokens_in - 1`` layers merge (none for one token).

    Example:
        >>> merge_probe_schedule(4, 64).remove_per_layer, merge_probe_schedule(4, 3).remove_per_layer
        ([1, 1, 1, 1], [1, 1, 0, 0])
    """
    # Layer l receives tokens_in - l tokens and may remove one while it receives at least two.
    steps = max(0, min(num_layers, tokens_in - 1))
    plan = [1 if layer < steps else 0 for layer in range(num_layers)]
    return Schedule(plan, tokens_in, family=family, has_cls=has_cls)


def calibrate_latency_model(evaluator: Evaluator, meter: LatencyMeter, *, merge_term: bool = True) -> LatencyModel:
    """Measure the unpruned model and two probes (interleaved), and fit a :class:`LatencyModel`.

    With ``y = measured / baseline``, ``f`` the FLOP ratio and ``m`` the :func:`merge_work` of a probe, the fixed share
    ``c`` and the merge share ``k`` solve ``y - f = c (1 - f) + k m`` for the heavy probe (:func:`probe_schedule`) and
    the merge probe (:func:`merge_probe_schedule`). Then ``k < 0`` (noise) is set to 0 and ``c`` refitted on the heavy
    probe alone; ``c`` is clamped to ``[0, MAX_FIXED_SHARE]``, and ``k`` refitted on the merge probe if it was.

    Each probe's ``y`` is the median over rounds of its time divided by the unpruned time *of the same round* (a burst
    of load on a shared host hits both alike), over at least :data:`MIN_CALIBRATION_ROUNDS` rounds whatever the
    meter's ``repeats``.

    Why the merge term: on the demo encoder (CPU, 1 thread) the pure FLOP line missed measured latencies by up to 28%
    (mean 15%) over ten schedules, and called schedules that merge a little at many layers faster than native when
    they were 16-34% slower; with the merge term the same schedules came within 3%.

    Args:
        evaluator: gives the model and the timed call (:meth:`Evaluator.latency_call`, one batch); no schedule may be
            applied to its model.
        meter: how to measure (device, threads, warm-up; its repeats are raised to the calibration minimum).
        merge_term: False fits the pure FLOP line (``merge_share = 0``) from the heavy probe alone.

    Returns:
        The fitted model; ``calibration`` records the probes, the measurements and the meter's environment.
    """
    encoder = resolve_encoder(evaluator.model)
    num_layers, tokens_in = encoder.num_layers, encoder.num_patches
    family, has_cls = encoder.family, encoder.has_cls
    probes = {"heavy": probe_schedule(num_layers, tokens_in, family=family, has_cls=has_cls)}
    if merge_term:
        probes["merge"] = merge_probe_schedule(num_layers, tokens_in, family=family, has_cls=has_cls)
    native_call = evaluator.latency_call()
    model = evaluator.model

    def pruned(schedule: Schedule) -> Callable[[], None]:
        def call() -> None:
            # Applying and removing costs microseconds (a few attribute writes) against a forward pass of milliseconds.
            with apply(model, schedule):
                native_call()

        return call

    if meter.repeats < MIN_CALIBRATION_ROUNDS:
        meter = LatencyMeter(meter.device, meter.threads, MIN_CALIBRATION_ROUNDS, meter.warmup, dtype=meter.dtype)
    native, *measured = meter.measure_interleaved([native_call] + [pruned(s) for s in probes.values()])
    flat = LatencyModel(
        baseline_ms=native.median_ms,
        fixed_share=0.0,
        flops_native=encoder_flops(
            [tokens_in] * num_layers,
            [tokens_in] * num_layers,
            encoder.hidden_size,
            encoder.intermediate_size,
            1 if encoder.has_cls else 0,
        ),
        hidden_size=encoder.hidden_size,
        intermediate_size=encoder.intermediate_size,
        has_cls=encoder.has_cls,
        num_layers=num_layers,
        tokens_in=tokens_in,
    )
    points = {
        name: (_paired_ratio(result, native), flat.flops(schedule) / flat.flops_native, merge_work(schedule))
        for (name, schedule), result in zip(probes.items(), measured, strict=True)
    }
    no_merge_probe: Point = (1.0, 1.0, 0.0)  # says nothing about merge cost: the fit falls back to the FLOP line
    merge_point = points.get("merge", no_merge_probe)
    raw_fixed, raw_merge = _fit_shares(points["heavy"], merge_point)
    fixed_share, merge_share = _clamp_shares(raw_fixed, raw_merge, points["heavy"], merge_point)
    return replace(
        flat,
        fixed_share=fixed_share,
        merge_share=merge_share,
        calibration={
            "method": (
                "unpruned and two probes interleaved; y = median of per-round time ratios; "
                "c and k from y - f = c (1 - f) + k m"
                if merge_term
                else "unpruned and the heavy probe interleaved; y = median of per-round time ratios; "
                "c from y = c + (1 - c) f (no merge term)"
            ),
            "rounds": meter.repeats,
            "baseline_p90_ms": native.p90_ms,
            "probes": {
                name: {
                    "schedule": schedule.describe(),
                    "remove_per_layer": schedule.remove_per_layer,
                    "median_ms": result.median_ms,
                    "p90_ms": result.p90_ms,
                    "measured_ratio": points[name][0],
                    "flop_ratio": points[name][1],
                    "merge_work": points[name][2],
                }
                for (name, schedule), result in zip(probes.items(), measured, strict=True)
            },
            "raw_fixed_share": raw_fixed,
            "raw_merge_share": raw_merge,
            "evaluator": evaluator.name,
            "batch_size": evaluator.batch_size,
            "environment": meter.environment(),
        },
    )


def _paired_ratio(candidate: LatencyResult, baseline: LatencyResult) -> float:
    """Median over rounds of candidate / baseline time within each round (samples are in round order)."""
    ratios = [c / b for c, b in zip(candidate.samples_ms, baseline.samples_ms, strict=True)]
    return statistics.median(ratios)


def _fit_shares(heavy: Point, merge: Point) -> tuple[float, float]:
    """Solve ``y - f = c (1 - f) + k m`` for (c, k) on the two probes; k = 0 where the merge probe says nothing."""
    (y1, f1, m1), (y2, f2, m2) = heavy, merge
    determinant = (1 - f1) * m2 - (1 - f2) * m1
    if m2 == 0 or abs(determinant) < 1e-12:
        return ((y1 - f1) / (1 - f1) if f1 < 1 else 0.0), 0.0
    fixed = ((y1 - f1) * m2 - (y2 - f2) * m1) / determinant
    merge_share = ((1 - f1) * (y2 - f2) - (1 - f2) * (y1 - f1)) / determinant
    return fixed, merge_share


def _clamp_shares(fixed: float, merge_share: float, heavy: Point, merge: Point) -> tuple[float, float]:
    """Bring a noisy fit into range: k >= 0, c in [0, MAX_FIXED_SHARE], refitting the other where one moved."""
    (y1, f1, _), (y2, f2, m2) = heavy, merge
    if merge_share < 0:
        merge_share = 0.0
        fixed = (y1 - f1) / (1 - f1) if f1 < 1 else 0.0
    clamped = min(MAX_FIXED_SHARE, max(0.0, fixed))
    if clamped != fixed and m2 > 0:
        merge_share = max(0.0, (y2 - f2 - clamped * (1 - f2)) / m2)
    return clamped, min(MAX_MERGE_SHARE, merge_share)
