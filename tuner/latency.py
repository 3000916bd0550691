"""Latency: budgets, measurement, the one budget rule, and where a study's latencies come from.

- :func:`parse_budget` turns ``50ms`` / ``0.05s`` / ``2x`` / ``60%`` into a :class:`Budget`.
- :class:`LatencyMeter` measures calls the way good harnesses do (fixed CPU threads and perf_counter, or CUDA
  events; warm-up; medians with p90; raw samples; the environment for provenance).
- :class:`PairedLatency` is a schedule timed in rounds interleaved with the unpruned model; a study's latency is the
  median per-round ratio times its reference unpruned latency, and :func:`budget_verdict` is the one rule that says
  whether a schedule meets a budget (``docs/latency.md``).
- :class:`LatencySource`: :class:`MeasuredLatency` (the default: real timings, re-measured while noisy) or
  :class:`SyntheticLatency` (a deterministic :class:`LatencyModel`, made for tests; never a measurement).
- :func:`choose_batch_size` sizes a workload to the machine so that a budget in ms is reachable.

It sits below the evaluators and the runner: it imports the engine (FLOPs, encoder shapes), :mod:`tuner.timing` and
:mod:`tuner.errors`, nothing else of the project.
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import torch

from tuner.errors import BudgetError, LatencyError
from tuner.evoprune import Schedule
from tuner.evoprune.adapters import resolve_encoder
from tuner.evoprune.flops import encoder_flops
from tuner.timing import time_interleaved

__all__ = [
    "BASELINE_DRIFT",
    "BUDGET_RULE",
    "MAX_ATTEMPTS",
    "NOISY_SPREAD",
    "Budget",
    "BudgetError",
    "BudgetKind",
    "BudgetVerdict",
    "LatencyMeter",
    "LatencyModel",
    "LatencyResult",
    "LatencySource",
    "MeasuredLatency",
    "PairedLatency",
    "SyntheticLatency",
    "WorkloadChoice",
    "budget_verdict",
    "choose_batch_size",
    "median_upper_bound",
    "merge_work",
    "parse_budget",
    "synthetic_model",
]

# --------------------------------------------------------------------------------------------------------- budgets

BudgetKind = Literal["ms", "speedup", "share"]

_BUDGET_FORMS = "give a time (50ms, 0.05s), a speed-up over the unpruned model (2x) or a share of its latency (60%)"
_BUDGET_PATTERN = re.compile(r"^(?P<number>.*?)\s*(?P<unit>ms|s|x|×|%)$", re.IGNORECASE)


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
        raise _invalid(text, _BUDGET_FORMS)
    stripped = text.strip()
    if not stripped:
        raise _invalid(text, f"it is empty; {_BUDGET_FORMS}")
    found = _BUDGET_PATTERN.match(stripped)
    if found is None:
        raise _invalid(text, _BUDGET_FORMS)
    number_text, unit = found["number"], found["unit"].lower()
    try:
        number = float(number_text)
    except ValueError:
        raise _invalid(text, _BUDGET_FORMS) from None
    if not math.isfinite(number):
        raise _invalid(text, "the number must be finite; give e.g. 50ms, 2x or 60%")
    if unit in ("ms", "s"):
        if number <= 0:
            raise _invalid(text, "a time must be greater than 0; give e.g. 50ms or 0.05s")
        return Budget("ms", number * 1000.0 if unit == "s" else number, text)
    if unit in ("x", "×"):
        if number < 1:
            raise _invalid(text, "a speed-up must be at least 1x (1x = as fast as the unpruned model); give e.g. 2x")
        return Budget("speedup", number, text)
    if not 0 < number <= 100:
        raise _invalid(text, "a share of the unpruned latency must be in (0%, 100%]; give e.g. 60%")
    return Budget("share", number / 100.0, text)


def _invalid(text: object, reason: str) -> BudgetError:
    """The error for a budget that cannot be parsed (the message names the ``budget`` parameter)."""
    return BudgetError(f"invalid budget {text!r}: {reason}", param="budget")


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
        raise LatencyError(f"{name} must be an integer >= {minimum}, got {value!r}")
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
            raise LatencyError(f"{str(self.device)!r} is not available here (no CUDA); use device cpu", param="device")
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

    def measure_interleaved(
        self, calls: Sequence[Callable[[], object]], *, alternate: bool = False
    ) -> list[LatencyResult]:
        """Latency of several calls, timed round-robin so that a slow phase of a shared host hits them all alike.

        Args:
            calls: zero-argument callables (put the baseline among them: ratios are what transfer).
            alternate: reverse the order every other round (no call always runs right after another).

        Returns:
            One result per call, in order.
        """
        if not calls:
            raise LatencyError("measure_interleaved needs at least one call")
        self._apply_threads()
        timings = time_interleaved(
            list(calls), self.device, repeats=self.repeats, warmup=self.warmup, alternate=alternate
        )
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


# ------------------------------------------------------------------------------------------- paired measurements


def median_upper_bound(samples: Sequence[float]) -> float:
    """The median plus two standard errors of the median (the spread from the median absolute deviation).

    The one rule for "meets the budget" (:func:`budget_verdict`) compares this bound, not the bare median, with the
    limit, so that measuring the same schedule again finds its median within the budget too, not half of the time.

    Example:
        >>> round(median_upper_bound([10.0, 10.2, 9.8, 10.1, 9.9]), 3)
        10.166
    """
    ordered = sorted(samples)
    median = statistics.median(ordered)
    if len(ordered) < 2:
        return median
    mad = statistics.median(abs(sample - median) for sample in ordered)
    return median + 2.0 * 1.2533 * 1.4826 * mad / math.sqrt(len(ordered))


@dataclass(frozen=True)
class PairedLatency:
    """A schedule timed in rounds interleaved with the unpruned model: each round runs both, back to back (in
    alternating order from round to round).

    A burst of load on a shared host slows both calls of a round alike, so the per-round ratio candidate / unpruned
    is far steadier than either time; the latency a study reports is that ratio times the study's reference
    unpruned latency (:meth:`latency_ms`).

    Attributes:
        candidate_ms: the schedule's samples, in round order.
        baseline_ms: the unpruned model's samples of the same rounds.
        source: ``"measured"``, or the name of a deterministic source made for tests (never a measurement).
        attempts: measurement attempts pooled into the samples (more than 1 when the first was noisy).
        noisy: still noisy after every attempt (spread over :data:`NOISY_SPREAD` or a baseline that moved more than
            :data:`BASELINE_DRIFT` from the reference): the machine was loaded.
    """

    candidate_ms: tuple[float, ...]
    baseline_ms: tuple[float, ...]
    source: str = "measured"
    attempts: int = 1
    noisy: bool = False

    def __post_init__(self) -> None:
        if not self.candidate_ms or len(self.candidate_ms) != len(self.baseline_ms):
            raise LatencyError("a paired latency needs as many baseline as candidate samples, at least one")

    @property
    def ratios(self) -> list[float]:
        """Per-round candidate / unpruned time."""
        return [c / b for c, b in zip(self.candidate_ms, self.baseline_ms, strict=True)]

    @property
    def ratio(self) -> float:
        """Median of the per-round ratios."""
        return statistics.median(self.ratios)

    @property
    def ratio_upper(self) -> float:
        """:func:`median_upper_bound` of the per-round ratios."""
        return median_upper_bound(self.ratios)

    @property
    def spread(self) -> float:
        """Relative width of the ratio's bound: ``ratio_upper / ratio - 1``."""
        return self.ratio_upper / self.ratio - 1.0

    @property
    def candidate_median_ms(self) -> float:
        return statistics.median(self.candidate_ms)

    @property
    def baseline_median_ms(self) -> float:
        return statistics.median(self.baseline_ms)

    def latency_ms(self, reference_ms: float) -> float:
        """The schedule's latency at the reference unpruned latency: ``ratio * reference_ms``."""
        return self.ratio * reference_ms

    def upper_ms(self, reference_ms: float) -> float:
        """The bound the budget rule compares: ``ratio_upper * reference_ms``."""
        return self.ratio_upper * reference_ms

    def to_dict(self, reference_ms: float) -> dict[str, Any]:
        """JSON-serialisable record (stored with each trial and in the export)."""
        return {
            "source": self.source,
            "latency_ms": self.latency_ms(reference_ms),
            "latency_upper_ms": self.upper_ms(reference_ms),
            "reference_ms": reference_ms,
            "ratio": self.ratio,
            "ratio_upper": self.ratio_upper,
            "candidate_median_ms": self.candidate_median_ms,
            "baseline_median_ms": self.baseline_median_ms,
            "rounds": len(self.candidate_ms),
            "attempts": self.attempts,
            "noisy": self.noisy,
            "candidate_samples_ms": [round(sample, 4) for sample in self.candidate_ms],
            "baseline_samples_ms": [round(sample, 4) for sample in self.baseline_ms],
        }


@dataclass(frozen=True)
class BudgetVerdict:
    """Whether a paired latency meets a budget: the one rule ``run``, ``export``, ``apply`` and ``studies`` share.

    Attributes:
        met: ``upper_ms <= limit_ms``.
        latency_ms: ``ratio * reference_ms``.
        upper_ms: ``ratio_upper * reference_ms``.
        limit_ms: the budget's limit against ``reference_ms``.
        reference_ms: the unpruned latency the ratio is scaled by.
    """

    met: bool
    latency_ms: float
    upper_ms: float
    limit_ms: float
    reference_ms: float

    def describe(self) -> str:
        sign = "<=" if self.met else ">"
        return (
            f"{'met' if self.met else 'NOT met'} ({self.latency_ms:.2f} ms, bound {self.upper_ms:.2f} ms {sign} "
            f"{self.limit_ms:.2f} ms)"
        )


BUDGET_RULE = "median ratio to the unpruned model + 2 standard errors, times the reference unpruned latency <= limit"
"""The rule of :func:`budget_verdict`, in words (printed with verdicts and stored in exports)."""


def budget_verdict(paired: PairedLatency, budget: Budget, reference_ms: float) -> BudgetVerdict:
    """Judge ``paired`` against ``budget``: met when ``ratio_upper * reference_ms <= budget.limit_ms(reference_ms)``.

    Args:
        paired: the schedule measured interleaved with the unpruned model.
        budget: the budget.
        reference_ms: the unpruned latency to scale by: a study's reference (measured when it was created), or the
            unpruned model measured in the same rounds (``tuner apply``).

    Example:
        >>> paired = PairedLatency((40.0, 41.0, 39.0), (80.0, 80.0, 80.0))
        >>> budget_verdict(paired, parse_budget("50ms"), 80.0).met, budget_verdict(paired, parse_budget("2x"), 80.0).met
        (True, False)
    """
    limit = budget.limit_ms(reference_ms)
    upper = paired.upper_ms(reference_ms)
    return BudgetVerdict(upper <= limit + 1e-9, paired.latency_ms(reference_ms), upper, limit, reference_ms)


NOISY_SPREAD = 0.05
"""A paired measurement whose ratio bound is more than 5% above its median is measured again."""

BASELINE_DRIFT = 0.25
"""A paired measurement whose unpruned median is more than 25% off the study's reference is measured again."""

MAX_ATTEMPTS = 3
"""Attempts (pooled) before a noisy measurement is kept and flagged."""


class LatencySource(ABC):
    """Where a study's latencies come from: timed forward passes, or a deterministic source made for tests.

    Attributes:
        name: ``"measured"`` or the deterministic source's name (stored with the study and every export).
    """

    name: ClassVar[str]

    @abstractmethod
    def reference(self, baseline: Callable[[], object], rounds: int) -> LatencyResult:
        """The unpruned latency (one batch): a study's reference, measured when the study is created."""

    @abstractmethod
    def paired(
        self,
        baseline: Callable[[], object],
        candidate: Callable[[], object],
        schedule: Schedule,
        rounds: int,
        reference_ms: float | None = None,
    ) -> PairedLatency:
        """``candidate`` (``baseline`` under ``schedule``) and ``baseline`` timed in interleaved rounds."""

    def environment(self) -> dict[str, Any]:
        """What the latencies depend on besides the model (provenance)."""
        return {"source": self.name}


class MeasuredLatency(LatencySource):
    """Real timings by a :class:`LatencyMeter`, interleaved with the unpruned model, re-measured while noisy.

    A paired measurement is taken again (up to :data:`MAX_ATTEMPTS`, samples pooled) when the ratio's bound is
    over :data:`NOISY_SPREAD` above its median, or when the unpruned median is more than :data:`BASELINE_DRIFT` off
    ``reference_ms``; if it is still so, the result is kept and flagged ``noisy``.

    Example:
        >>> from tuner.evoprune import Schedule
        >>> source = MeasuredLatency(LatencyMeter("cpu", threads=1, warmup=0))
        >>> paired = source.paired(lambda: sum(range(2000)), lambda: sum(range(1000)), Schedule.none(1, 4), rounds=5)
        >>> len(paired.ratios) % 5, paired.source  # 5 rounds per attempt (tiny calls are noisy: often 2 or 3 attempts)
        (0, 'measured')
    """

    name = "measured"

    def __init__(self, meter: LatencyMeter) -> None:
        self.meter = meter

    def reference(self, baseline: Callable[[], object], rounds: int) -> LatencyResult:
        return self._meter(rounds).measure(baseline)

    def paired(
        self,
        baseline: Callable[[], object],
        candidate: Callable[[], object],
        schedule: Schedule,
        rounds: int,
        reference_ms: float | None = None,
    ) -> PairedLatency:
        meter = self._meter(rounds)
        candidate_ms: list[float] = []
        baseline_ms: list[float] = []
        attempts = 0
        noisy = True
        while attempts < MAX_ATTEMPTS and noisy:
            base, cand = meter.measure_interleaved([baseline, candidate], alternate=True)
            baseline_ms += base.samples_ms
            candidate_ms += cand.samples_ms
            attempts += 1
            result = PairedLatency(tuple(candidate_ms), tuple(baseline_ms), self.name, attempts)
            drift = 0.0 if reference_ms is None else abs(result.baseline_median_ms / reference_ms - 1.0)
            noisy = result.spread > NOISY_SPREAD or drift > BASELINE_DRIFT
        return PairedLatency(tuple(candidate_ms), tuple(baseline_ms), self.name, attempts, noisy)

    def environment(self) -> dict[str, Any]:
        return {"source": self.name, **self.meter.environment()}

    def _meter(self, rounds: int) -> LatencyMeter:
        meter = self.meter
        return LatencyMeter(meter.device, meter.threads, rounds, meter.warmup, dtype=meter.dtype)


class SyntheticLatency(LatencySource):
    """A deterministic latency source made for tests and reproducible experiments: never a measurement.

    Every "sample" of a schedule is :meth:`LatencyModel.predict_ms`, so the same seed gives the same trials and the
    same export. Studies, exports and plots made with it say ``latency source: synthetic``.

    Args:
        model: the latency model that stands in for timings.
    """

    name = "synthetic"

    def __init__(self, model: LatencyModel) -> None:
        self.model = model

    def reference(self, baseline: Callable[[], object], rounds: int) -> LatencyResult:
        value = self.model.baseline_ms
        return LatencyResult(value, value, [value] * rounds, "synthetic", 0, torch.__version__, None, None, rounds, 0,
                             "synthetic")  # fmt: skip

    def paired(
        self,
        baseline: Callable[[], object],
        candidate: Callable[[], object],
        schedule: Schedule,
        rounds: int,
        reference_ms: float | None = None,
    ) -> PairedLatency:
        value = self.model.predict_ms(schedule)
        return PairedLatency((value,) * rounds, (self.model.baseline_ms,) * rounds, self.name)

    def environment(self) -> dict[str, Any]:
        return {"source": self.name, "model": self.model.to_dict()}


# -------------------------------------------------------------------------------------------------- latency model

MAX_FIXED_SHARE = 0.95
"""Upper bound of :attr:`LatencyModel.fixed_share`: some latency always scales with FLOPs."""

_REQUIRED_FIELDS = ("baseline_ms", "fixed_share", "flops_native", "hidden_size", "intermediate_size", "has_cls",
                    "num_layers", "tokens_in")  # fmt: skip
_OPTIONAL_FIELDS = ("merge_share", "attention_share", "knn_share")


def merge_work(schedule: Schedule) -> float:
    """Merge steps of ``schedule``, each weighted by the share of ``tokens_in`` its layer receives.

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
    """Deterministic latency of a schedule from its FLOPs, its merge steps and its scoring settings.

    ``predict_ms(s) = baseline_ms * (fixed_share + (1 - fixed_share) * flops(s) / flops_native
    + merge_work(s) * (merge_share + attention_share [attention statistics] + knn_share [w_div > 0]))``, where the
    attention term counts when the scoring needs the attention received (``ctr > 0`` or ``w_attn > 0``: the merging
    layer computes its attention explicitly instead of the fused kernel) and the kNN term when ``w_div > 0``.

    It backs :class:`SyntheticLatency` (tests, reproducible experiments); it decides nothing in a measured study.

    Example:
        >>> from tuner.evoprune import Scoring
        >>> m = LatencyModel.for_encoder(80.0, 4, 16, 32, 64, True, fixed_share=0.2, merge_share=0.02, knn_share=0.01)
        >>> m.predict_ms(Schedule.none(4, 16)), round(m.predict_ms(Schedule([8, 4, 0, 0], 16)), 2)
        (80.0, 47.25)
        >>> plain = Schedule([8, 4, 0, 0], 16, scoring=Scoring(w_div=0.0, ctr=0.0))
        >>> m.predict_ms(plain) < m.predict_ms(Schedule([8, 4, 0, 0], 16))
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
    attention_share: float = 0.0
    knn_share: float = 0.0

    @classmethod
    def for_encoder(
        cls,
        baseline_ms: float,
        num_layers: int,
        tokens_in: int,
        hidden_size: int,
        intermediate_size: int,
        has_cls: bool,
        **shares: float,
    ) -> LatencyModel:
        """A model for an encoder's dimensions (``flops_native`` computed), with the given shares."""
        native = encoder_flops(
            [tokens_in] * num_layers, [tokens_in] * num_layers, hidden_size, intermediate_size, 1 if has_cls else 0
        )
        return cls(baseline_ms, shares.pop("fixed_share", 0.2), native, hidden_size, intermediate_size, has_cls,
                   num_layers, tokens_in, **shares)  # fmt: skip

    def __post_init__(self) -> None:
        if not (math.isfinite(self.baseline_ms) and self.baseline_ms > 0):
            raise LatencyError(f"latency model: baseline_ms must be a positive number, got {self.baseline_ms!r}")
        if not 0.0 <= self.fixed_share <= MAX_FIXED_SHARE:
            raise LatencyError(
                f"latency model: fixed_share must be in [0, {MAX_FIXED_SHARE}], got {self.fixed_share!r}"
            )
        for name in ("merge_share", "attention_share", "knn_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise LatencyError(f"latency model: {name} must be in [0, 1], got {value!r}")
        for name in ("flops_native", "hidden_size", "intermediate_size", "num_layers", "tokens_in"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LatencyError(f"latency model: {name} must be an integer >= 1, got {value!r}")
        expected = self.flops(Schedule.none(self.num_layers, self.tokens_in))
        if self.flops_native != expected:
            raise LatencyError(
                f"latency model: flops_native {self.flops_native} does not match the encoder's dimensions ({expected})"
            )

    def flops(self, schedule: Schedule) -> int:
        """FLOPs of the encoder layers under ``schedule`` (CLS counted from the model, not the schedule)."""
        if schedule.num_layers != self.num_layers or schedule.tokens_in != self.tokens_in:
            raise LatencyError(
                f"the schedule is for {schedule.num_layers} layers x {schedule.tokens_in} tokens but the latency "
                f"model for {self.num_layers} x {self.tokens_in}"
            )
        return encoder_flops(
            schedule.tokens_before(),
            schedule.tokens_after(),
            self.hidden_size,
            self.intermediate_size,
            1 if self.has_cls else 0,
        )

    def step_share(self, schedule: Schedule) -> float:
        """Cost of one merge step over ``tokens_in`` tokens under the schedule's scoring, as a share of baseline."""
        scoring = schedule.scoring
        share = self.merge_share
        if scoring.ctr > 0 or scoring.w_attn > 0:
            share += self.attention_share
        if scoring.w_div > 0:
            share += self.knn_share
        return share

    def predict_ms(self, schedule: Schedule) -> float:
        """Latency of ``schedule`` in milliseconds; exactly ``baseline_ms`` for the empty schedule."""
        flop_ratio = self.flops(schedule) / self.flops_native
        # 1 - (1 - c)(1 - r) is c + (1 - c) r, written so that it is exactly 1 when r == 1 (no float round-off).
        ratio = 1.0 - (1.0 - self.fixed_share) * (1.0 - flop_ratio)
        ratio += self.step_share(schedule) * merge_work(schedule)
        return self.baseline_ms * ratio

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, document: Any) -> LatencyModel:
        """Rebuild a model from :meth:`to_dict` output (the shares may be absent).

        Raises:
            LatencyError: not a dict, or a missing, unknown or mistyped field.
        """
        if not isinstance(document, dict):
            raise LatencyError(f"a latency model must be a JSON object, got {type(document).__name__}")
        missing = [name for name in _REQUIRED_FIELDS if name not in document]
        unknown = sorted(set(document) - set(_REQUIRED_FIELDS) - set(_OPTIONAL_FIELDS))
        if missing or unknown:
            raise LatencyError(f"latency model: missing fields {missing}, unknown fields {unknown}")
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
                **{name: _as_float(document.get(name, 0.0)) for name in _OPTIONAL_FIELDS},
            )
        except TypeError as error:
            raise LatencyError(f"latency model: {error}") from None


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


SYNTHETIC_BASELINE_MS = 100.0
"""Unpruned latency of :func:`synthetic_model` (any value works: only ratios to it matter to relative budgets)."""


def synthetic_model(model: Any, baseline_ms: float = SYNTHETIC_BASELINE_MS) -> LatencyModel:
    """The fixed latency model behind ``--latency-source synthetic`` for a model's vision encoder.

    Fixed shares (20% fixed cost; a merge step over all tokens 1% of the baseline, the attention statistics another
    1%, the kNN term 0.5%), so that the same schedule always gets the same latency, on any machine.
    """
    from tuner.mllm import vision_layers_that_run

    encoder = resolve_encoder(model)
    return LatencyModel.for_encoder(
        baseline_ms, vision_layers_that_run(model), encoder.num_patches, encoder.hidden_size, encoder.intermediate_size,
        encoder.has_cls, fixed_share=0.2, merge_share=0.01, attention_share=0.01, knn_share=0.005,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- workload sizing


@dataclass(frozen=True)
class WorkloadChoice:
    """The batch a study's timed call runs, sized to this machine so that the budget is over the unpruned latency
    and within reach of pruning.

    Attributes:
        batch_size: items per timed forward.
        unpruned_ms: the unpruned latency measured at that batch.
        pruned_ms: the probe schedule's latency measured at that batch.
        reason: one line: what was measured and why this batch.
    """

    batch_size: int
    unpruned_ms: float
    pruned_ms: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


OVER_BUDGET = 1.3
"""Workload sizing aims the unpruned latency at this multiple of the budget."""

REACH_MARGIN = 0.85
"""... and keeps the probe schedule at or under this share of the budget (so pruning can meet it with room)."""

MIN_OVER_BUDGET = 1.1
"""A chosen batch whose unpruned latency is under this multiple of the budget is reported as tight."""


def choose_batch_size(
    measure: Callable[[int], tuple[float, float]],
    budget_ms: float,
    *,
    probe_batches: tuple[int, int] = (8, 32),
    low: int = 1,
    high: int = 4096,
) -> WorkloadChoice:
    """Size a workload to this machine: the batch at which the unpruned model takes about :data:`OVER_BUDGET` times
    the budget, while a strong pruning probe stays within :data:`REACH_MARGIN` of it.

    Both latencies are taken as lines in the batch size (a fixed cost plus a cost per item), fitted from two probe
    batches, and the choice is checked by one more measurement at the chosen batch (and corrected once if the line
    was off).

    Args:
        measure: ``batch -> (unpruned_ms, probe_ms)`` at that batch (interleaved, medians).
        budget_ms: the budget in ms.
        probe_batches: the two batches the lines are fitted from.
        low: smallest batch.
        high: largest batch.

    Returns:
        The choice, with the latencies measured at it and a one-line reason.

    Example:
        >>> fake = lambda n: (2.0 + 1.0 * n, 2.0 + 0.6 * n)  # 1 ms per item unpruned, 0.6 pruned
        >>> choice = choose_batch_size(fake, 50.0)
        >>> choice.batch_size, choice.unpruned_ms > 50.0 > choice.pruned_ms
        (63, True)
    """
    small, large = probe_batches
    (u1, p1), (u2, p2) = measure(small), measure(large)
    per_item_u = max(1e-9, (u2 - u1) / (large - small))
    per_item_p = max(1e-9, (p2 - p1) / (large - small))
    fixed_u, fixed_p = u1 - per_item_u * small, p1 - per_item_p * small

    def pick(fixed_u: float, per_u: float, fixed_p: float, per_p: float) -> int:
        batch = math.ceil((OVER_BUDGET * budget_ms - fixed_u) / per_u)
        # Where the probe would not fit under the margin at that batch, take the largest batch where it does.
        if fixed_p + per_p * batch > REACH_MARGIN * budget_ms:
            batch = math.floor((REACH_MARGIN * budget_ms - fixed_p) / per_p)
        return min(high, max(low, batch))

    batch = pick(fixed_u, per_item_u, fixed_p, per_item_p)
    unpruned, pruned = measure(batch)
    if not (unpruned > budget_ms and pruned <= budget_ms):
        # The lines were off (a slow phase during the probes): rescale them through the measured point, once.
        scale_u = unpruned / max(1e-9, fixed_u + per_item_u * batch)
        scale_p = pruned / max(1e-9, fixed_p + per_item_p * batch)
        batch = pick(fixed_u * scale_u, per_item_u * scale_u, fixed_p * scale_p, per_item_p * scale_p)
        unpruned, pruned = measure(batch)
    reason = (
        f"batch {batch}: unpruned {unpruned:.1f} ms, a strong pruning probe {pruned:.1f} ms against the budget "
        f"{budget_ms:.1f} ms (aimed at {OVER_BUDGET:g}x the budget unpruned, the probe within {REACH_MARGIN:.0%} of "
        f"it; fitted from batches {small} and {large} measured on this machine)"
    )
    if unpruned < MIN_OVER_BUDGET * budget_ms or pruned > budget_ms:
        reason += (
            "; on this machine pruning cannot put much room between the unpruned model and the budget at any batch: "
            "expect few schedules to meet it"
        )
    return WorkloadChoice(batch, unpruned, pruned, reason)
