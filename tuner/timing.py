"""Wall-clock timing of model calls: CUDA events on a GPU, perf_counter on a CPU, interleaved candidates.

Shared by the latency evaluator and the benchmarks so both measure the same way (docs/latency.md).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Timing:
    """Latency samples of one candidate, in milliseconds."""

    samples_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def p90_ms(self) -> float:
        ordered = sorted(self.samples_ms)
        return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def time_once(fn: Callable[[], object], device: torch.device | str) -> float:
    """Milliseconds of one call of ``fn``: CUDA events on a GPU (device time), perf_counter elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000.0


def time_interleaved(
    candidates: Sequence[Callable[[], object]],
    device: torch.device | str,
    repeats: int = 10,
    warmup: int = 2,
) -> list[Timing]:
    """Time several candidates round-robin, so that a slow phase of a shared host hits them all alike.

    Args:
        candidates: zero-argument callables (a baseline among them).
        device: where they run; CUDA is synchronised before the first timed call.
        repeats: timed rounds (the median of these is reported).
        warmup: untimed rounds first (allocator, kernels, caches).

    Returns:
        One :class:`Timing` per candidate, in order.

    Example:
        >>> a, b = time_interleaved([lambda: sum(range(100)), lambda: sum(range(10))], "cpu", repeats=3, warmup=1)
        >>> len(a.samples_ms), len(b.samples_ms)
        (3, 3)
    """
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in candidates:
                fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        timings = [Timing() for _ in candidates]
        for _ in range(repeats):
            for fn, timing in zip(candidates, timings, strict=True):
                timing.samples_ms.append(time_once(fn, device))
    return timings
