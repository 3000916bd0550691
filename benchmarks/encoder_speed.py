"""Encoder speed under EvoPrune schedules: measured speed-up, the FLOP prediction, and merging against an oracle.

Random-weight encoders of real sizes (latency does not depend on weight values). Each schedule is timed three ways in
the same interleaved rounds (medians): the native encoder, the pruned encoder (EvoPrune merging), and the *oracle*:
the same encoder and plan with merging replaced by the cheapest token reduction there is (each merging layer keeps its
first tokens: slicing, no statistics, no scoring; ``apply(..., reducer="slice")``). Columns:

- speed-up: native / pruned; predicted: the FLOP-predicted speed-up of the plan;
- efficiency vs oracle: oracle / pruned, what merging costs against free merging (1.00: merging is free);
- scoring+merging: the share of pruned encoder time spent on the attention statistics, scoring and merging (from
  separate profiled runs).

The ToMe control (``--control``) is timed against the oracle of the plan it controls (the same plan).

    python benchmarks/encoder_speed.py --device cpu                      # CLIP ViT-B/16-224 and ViT-L/14-336
    python benchmarks/encoder_speed.py --device cpu --only ViT-B         # one encoder
    python benchmarks/encoder_speed.py --device cuda --full              # fp16, plus SigLIP so400m/14-384
    python benchmarks/encoder_speed.py --device cuda --frames 32 --only frames   # SigLIP on 32 video frames
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from tuner.evoprune import Schedule, ScheduleError, Scoring, apply
from tuner.evoprune.apply import Reducer
from tuner.timing import time_interleaved

ENCODERS: dict[str, Callable[[], torch.nn.Module]] = {
    "CLIP ViT-B/16-224": lambda: CLIPVisionModel._from_config(
        CLIPVisionConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            image_size=224, patch_size=16,
        ),
        attn_implementation="sdpa",
    ),
    "CLIP ViT-L/14-336": lambda: CLIPVisionModel._from_config(
        CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=336, patch_size=14,
        ),
        attn_implementation="sdpa",
    ),
    "SigLIP so400m/14-384": lambda: SiglipVisionModel._from_config(
        SiglipVisionConfig(
            hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
            image_size=384, patch_size=14,
        ),
        attn_implementation="sdpa",
    ),
}
# ``--frames N``: this encoder on a batch of N video frames (independent batch items, merged intra-frame with one
# per-frame budget, as LLaVA-Video; docs/method.md, section 6).
VIDEO_ENCODER = "SigLIP so400m/14-384"
IMAGE_BUDGETS = (128, 64)
VIDEO_BUDGETS = (64, 32, 16)  # the paper's 64x64, 64x32 and 64x16


def schedules(
    num_layers: int, tokens_in: int, family: str, has_cls: bool, control: bool = False, video: bool = False
) -> list[tuple[str, Schedule]]:
    """The plans to time, with their labels (paper scoring unless said otherwise).

    Images: the paper's Skip schedule to 128 and 64 tokens and one aggressive Decreasing plan. Video frames: the
    paper's per-frame budgets 64, 32 and 16, with Skip where a Skip plan can reach the budget (one merge step can at
    most halve its tokens) and Decreasing otherwise. With ``control``, every plan is followed by the same plan under
    ToMe's plain matching.
    """
    paper = Scoring()  # w_sim 1, w_div 0.5, CTR 0.25
    common = dict(num_layers=num_layers, tokens_in=tokens_in, family=family, has_cls=has_cls, scoring=paper)
    plans: list[tuple[str, Schedule]] = []
    for out in VIDEO_BUDGETS if video else IMAGE_BUDGETS:
        if out >= tokens_in:
            continue
        try:
            plans.append((f"skip -> {out}", Schedule.preset("skip", tokens_out=out, **common)))  # type: ignore[arg-type]
        except ScheduleError:
            decreasing = Schedule.preset("decreasing", tokens_out=out, alpha=1.0, **common)  # type: ignore[arg-type]
            plans.append((f"decreasing -> {out}", decreasing))
    if not video:
        aggressive = max(16, tokens_in // 16)
        decreasing = Schedule.preset("decreasing", tokens_out=aggressive, alpha=1.0, **common)  # type: ignore[arg-type]
        plans.append((f"decreasing -> {aggressive}", decreasing))
    if not control:
        return plans
    # Each plan with ToMe's plain matching (no kNN term, no attention statistics, no CTR): the cheapest merge step
    # there is; the oracle shows how far even that is from free merging, and so what any merge can reach.
    tome = Scoring(w_div=0.0, w_attn=0.0, ctr=0.0)
    controlled: list[tuple[str, Schedule]] = []
    for label, plan in plans:
        controlled += [(label, plan), (f"{label}, ToMe scoring (control)", dataclasses.replace(plan, scoring=tome))]
    return controlled


def cpu_name() -> str:
    """The CPU model and core count, for the table's header."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or 'CPU'}, {os.cpu_count()} cores"


def encoder_names(args: argparse.Namespace) -> list[str]:
    """The rows to run: the CLIP encoders, SigLIP with ``--full``, the video entry with ``--frames``; ``--only``
    keeps the names that contain one of its strings (case-insensitive)."""
    names = [name for name in ENCODERS if args.full or not name.startswith("SigLIP")]
    if args.frames:
        names.append(video_name(args.frames))
    if args.only:
        names = [name for name in names if any(part.lower() in name.lower() for part in args.only)]
    return names


def video_name(frames: int) -> str:
    return f"{VIDEO_ENCODER} x {frames} frames"


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.set_num_threads(args.threads)
    names = encoder_names(args)
    if not names:
        raise SystemExit(f"--only {' '.join(args.only)} selects no encoder")
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"# machine: {machine}; {args.threads} CPU threads; torch {torch.__version__}; {args.dtype}; batch "
        f"{args.batch}{f' (video: {args.frames} frames)' if args.frames else ''}; {args.repeats} interleaved rounds, "
        "medians; oracle: the same plan with merging replaced by slicing (free merging)"
    )
    header = (
        "| encoder | schedule | native ms | pruned ms | oracle ms | speed-up | predicted (FLOPs) "
        "| efficiency vs oracle | scoring+merging |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    print(header)
    for name in names:
        bench_encoder(name, args, device, dtype)


def bench_encoder(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """Time one encoder natively, under each schedule and under each schedule's oracle; print a row per schedule."""
    torch.manual_seed(0)
    video = args.frames > 0 and name == video_name(args.frames)
    with torch.device(device):  # initialised where it runs (fast on a GPU)
        model = ENCODERS[VIDEO_ENCODER if video else name]().to(dtype=dtype).eval()
    config: Any = model.config
    has_cls = isinstance(model, CLIPVisionModel)
    family = "clip" if has_cls else "siglip"
    tokens_in = (config.image_size // config.patch_size) ** 2
    batch = args.frames if video else args.batch
    x = torch.randn(batch, 3, config.image_size, config.image_size, device=device, dtype=dtype)
    plans = schedules(config.num_hidden_layers, tokens_in, family, has_cls, control=args.control, video=video)

    def native() -> None:
        model(pixel_values=x)

    def reduced_call(schedule: Schedule, reducer: Reducer) -> Callable[[], None]:
        def call() -> None:
            with apply(model, schedule, reducer=reducer):
                model(pixel_values=x)

        return call

    # One oracle per distinct plan (the ToMe control shares its plan's oracle), all in the same interleaved rounds.
    oracle_of: dict[tuple[int, ...], int] = {}
    candidates: list[Callable[[], None]] = [native]
    slots: list[tuple[int, int]] = []
    for _, schedule in plans:
        candidates.append(reduced_call(schedule, "merge"))
        pruned_slot = len(candidates) - 1
        plan_key = tuple(schedule.remove_per_layer)
        if plan_key not in oracle_of:
            candidates.append(reduced_call(schedule, "slice"))
            oracle_of[plan_key] = len(candidates) - 1
        slots.append((pruned_slot, oracle_of[plan_key]))

    started = time.perf_counter()
    timings = time_interleaved(candidates, device, repeats=args.repeats, warmup=args.warmup)
    native_ms = timings[0].median_ms
    for (label, schedule), (pruned_slot, oracle_slot) in zip(plans, slots, strict=True):
        pruned_ms, oracle_ms = timings[pruned_slot].median_ms, timings[oracle_slot].median_ms
        share = merge_share(model, schedule, x, rounds=max(3, args.repeats // 3))
        predicted = schedule.predicted_speedup(config.hidden_size, config.intermediate_size)
        print(
            f"| {name} | {label} | {native_ms:.2f} | {pruned_ms:.2f} | {oracle_ms:.2f} | {native_ms / pruned_ms:.2f}x "
            f"| {predicted:.2f}x | {oracle_ms / pruned_ms:.2f} | {100 * share:.1f}% |",
            flush=True,
        )
    if args.verbose:
        print(f"#   {name}: {time.perf_counter() - started:.0f} s")


def merge_share(model: torch.nn.Module, schedule: Schedule, x: torch.Tensor, rounds: int) -> float:
    """Median share of the pruned forward spent scoring and merging (profiled runs, timed separately).

    Scoring includes the attention statistics: the explicit attention of a merging layer that needs them, less the
    time the model's own attention (sdpa) takes on the same input.
    """
    shares = []
    with torch.inference_mode():
        for _ in range(rounds):
            with apply(model, schedule) as handle:
                handle.profile = True
                if x.is_cuda:
                    torch.cuda.synchronize(x.device)
                started = time.perf_counter()
                model(pixel_values=x)
                if x.is_cuda:
                    torch.cuda.synchronize(x.device)
                total = time.perf_counter() - started
            shares.append(handle.merge_seconds / (total - handle.profile_seconds))
    return statistics.median(shares)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                        help="default: fp16 on cuda, fp32 on cpu")
    parser.add_argument("--batch", type=int, default=1, help="images per forward (the image encoders)")
    parser.add_argument(
        "--frames",
        type=int,
        default=0,
        help="also time SigLIP so400m/14-384 on a batch of this many video frames (per-frame budgets 64/32/16)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="run only the encoders whose name contains TEXT (repeatable), e.g. ViT-B, so400m, frames",
    )
    parser.add_argument("--repeats", type=int, default=10, help="interleaved timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--full", action="store_true", help="also SigLIP so400m/14-384")
    parser.add_argument(
        "--control",
        action="store_true",
        help="also time every plan with ToMe's plain matching (against the same oracle)",
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if args.dtype is None:
        args.dtype = "fp16" if args.device == "cuda" else "fp32"
    if args.repeats < 10:
        parser.error("--repeats must be at least 10 (medians of at least 10 runs)")
    if args.frames < 0 or args.batch < 1:
        parser.error("--batch must be >= 1 and --frames >= 0")
    run(args)


if __name__ == "__main__":
    main()
