"""Wall-clock timing of model calls: CUDA events on a GPU, perf_counter on a CPU, interleaved candidates; and the
process conditions timings depend on (:func:`tune_allocator`).

Shared by :mod:`tuner.latency` and the benchmarks so both measure the same way (docs/latency.md). Imports nothing of
the project.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import sys
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
    alternate: bool = False,
) -> list[Timing]:
    """Time several candidates round-robin, so that a slow phase of a shared host hits them all alike.

    Args:
        candidates: zero-argument callables (a baseline among them).
        device: where they run; CUDA is synchronised before the first timed call.
        repeats: timed rounds (the median of these is reported).
        warmup: untimed rounds first (allocator, kernels, caches).
        alternate: run the candidates in reverse order every other round, so that no candidate always runs right
            after another (a call measured a few percent faster or slower for its place in the round, on the demo).

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
        order = list(zip(candidates, timings, strict=True))
        for round_index in range(repeats):
            for fn, timing in reversed(order) if alternate and round_index % 2 else order:
                timing.samples_ms.append(time_once(fn, device))
    return timings


# ------------------------------------------------------------------------------------------------------- allocator

_ALLOCATOR = {"tuned": False}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def tune_allocator() -> bool:
    """Keep freed tensor memory in the process (glibc ``mallopt``), so latency does not depend on the process's past.

    With glibc's defaults, large CPU tensors are mapped and unmapped on every forward (page faults), and the dynamic
    thresholds change as a process runs: the same forward measured 25-35% slower in a fresh process than after a
    calibration (demo, 2 cores). Raising the mmap threshold to 32 MiB and the trim threshold to 1 GiB removes that
    history dependence (and the slowdown), so ``tuner run`` and ``tuner apply`` measure alike. The cost: up to about
    1 GiB of freed memory stays with the process. Does nothing off glibc, or when ``MALLOC_MMAP_THRESHOLD_`` is set.

    Returns:
        Whether the allocator is tuned.
    """
    if _ALLOCATOR["tuned"] or not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return _ALLOCATOR["tuned"]
    try:
        libc = ctypes.CDLL("libc.so.6")
        tuned = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        tuned = False
    _ALLOCATOR["tuned"] = tuned
    return tuned
