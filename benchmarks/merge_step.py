"""Where a merge step's time goes at batch 1: operators per step, and time per step warm and after a layer's GEMM.

At batch 1 on a CPU a merge step works on tensors of a few hundred kilobytes at most, so its cost is mostly the
fixed price of each operator call (Python, dispatch, allocation), and in a real forward every merge step follows a
layer's large matrix products, which leave the caches cold. This benchmark isolates that: for each scoring it runs
the merge steps of one plan (the token counts and removals of each merging layer) on random tokens of the encoder's
width and reports

- ``ops/step``: operator calls per step (top-level aten operators, counted with torch.profiler, mean over the plan);
- ``warm ms``: the plan's steps summed, each timed in a tight loop (median), caches warm;
- ``after GEMM ms``: the same, each step timed right after the layer's MLP matrix product of its size (median):
  closer to what a step costs inside a forward;
- ``vs ToMe``: ``after GEMM`` relative to ToMe's plain matching (the cheapest merge step), same run.

The encoder-level yardstick stays ``benchmarks/encoder_speed.py`` (efficiency against free merging); this one says
which part of the step to shrink.

    python benchmarks/merge_step.py                 # CLIP ViT-B/16-224 width, the aggressive plan of encoder_speed
    python benchmarks/merge_step.py --encoder ViT-L
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from tuner.evoprune import Schedule, Scoring
from tuner.evoprune.merge import TokenState, merge_step

ENCODERS = {
    # name: (layers, patches, width, heads, MLP width)
    "ViT-B": (12, 196, 768, 12, 3072),
    "ViT-L": (24, 576, 1024, 16, 4096),
}
SCORINGS = {
    "paper (w_div 0.5, CTR 0.25)": Scoring(),
    "paper + w_attn 0.3": Scoring(w_attn=0.3),
    "ToMe (plain matching)": Scoring(w_div=0.0, w_attn=0.0, ctr=0.0),
}


def plan_steps(encoder: str) -> list[tuple[int, int]]:
    """``(tokens, remove)`` of every merging layer of the aggressive Decreasing plan of encoder_speed.py."""
    layers, patches, *_ = ENCODERS[encoder]
    plan = Schedule.preset(
        "decreasing",
        num_layers=layers,
        tokens_in=patches,
        tokens_out=max(16, patches // 16),
        alpha=1.0,
        family="clip",
        has_cls=True,
    )
    steps, tokens = [], patches
    for remove in plan.remove_per_layer:
        if remove:
            steps.append((tokens, remove))
        tokens -= remove
    return steps


def operators(step: Callable[[], object]) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for event in prof.events() if event.cpu_parent is None)


def median_us(step: Callable[[], object], before: Callable[[], object] | None, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        if before is not None:
            before()
        started = time.perf_counter()
        step()
        samples.append(time.perf_counter() - started)
    return 1e6 * statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", choices=sorted(ENCODERS), default="ViT-B")
    parser.add_argument("--rounds", type=int, default=100, help="timed calls per step and condition (median)")
    args = parser.parse_args()
    torch.manual_seed(0)
    _, _, width, heads, mlp_width = ENCODERS[args.encoder]
    steps = plan_steps(args.encoder)
    print(
        f"# {args.encoder} width {width}, {len(steps)} merging layers (tokens {steps[0][0]} -> "
        f"{steps[-1][0] - steps[-1][1]}); {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, fp32, batch 1"
    )
    print("| scoring | ops/step | warm ms | after GEMM ms | vs ToMe |")
    print("|---|---:|---:|---:|---:|")
    weight = torch.randn(mlp_width, width)
    rows = []
    with torch.inference_mode():
        for label, scoring in SCORINGS.items():
            ops, warm, cold = 0, 0.0, 0.0
            for tokens, remove in steps:
                hidden = torch.randn(1, tokens, width)
                keys = torch.randn(1, tokens, width // heads)
                importance = torch.rand(1, tokens) + 0.5
                importance /= importance.mean()
                state = TokenState.start(1, tokens, "cpu")

                def step() -> object:
                    return merge_step(hidden, keys, state, remove, scoring, importance)  # noqa: B023

                def gemm() -> object:
                    return F.linear(hidden[0], weight)  # noqa: B023

                for _ in range(5):
                    step()
                ops += operators(step)
                warm += median_us(step, None, args.rounds)
                cold += median_us(step, gemm, args.rounds)
            rows.append((label, ops / len(steps), warm / 1e3, cold / 1e3))
    tome_cold = rows[-1][3]
    for label, ops_per_step, warm_ms, cold_ms in rows:
        print(f"| {label} | {ops_per_step:.0f} | {warm_ms:.2f} | {cold_ms:.2f} | {cold_ms / tome_cold:.2f}x |")


if __name__ == "__main__":
    main()
