"""Encoder speed under EvoPrune schedules: measured speed-up against the FLOP prediction, and merge overhead.

Random-weight encoders of real sizes (latency does not depend on weight values). For each schedule it prints the
native and pruned latency (medians of interleaved runs, the native baseline re-measured in the same run), the
speed-up, the FLOP-predicted speed-up, the efficiency (speed-up / predicted) and the share of pruned encoder time
spent scoring and merging (from separate profiled runs).

    python benchmarks/encoder_speed.py --device cpu            # CLIP ViT-B/16-224 and ViT-L/14-336
    python benchmarks/encoder_speed.py --device cuda --full    # fp16, plus SigLIP so400m/14-384
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from tuner.evoprune import Schedule, Scoring, apply
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


def schedules(
    num_layers: int, tokens_in: int, family: str, has_cls: bool, control: bool = False
) -> list[tuple[str, Schedule]]:
    """The paper's Skip schedule to 128 and 64 tokens (paper scoring), one aggressive schedule, and with ``control``
    the aggressive plan under ToMe's plain matching."""
    paper = Scoring()  # w_sim 1, w_div 0.5, CTR 0.25
    common = dict(num_layers=num_layers, tokens_in=tokens_in, family=family, has_cls=has_cls)
    plans = [
        (f"skip -> {out}", Schedule.preset("skip", tokens_out=out, scoring=paper, **common))  # type: ignore[arg-type]
        for out in (128, 64)
        if out < tokens_in
    ]
    aggressive = max(16, tokens_in // 16)
    plans.append(
        (
            f"decreasing -> {aggressive}",
            Schedule.preset("decreasing", tokens_out=aggressive, scoring=paper, alpha=1.0, **common),  # type: ignore[arg-type]
        )
    )
    if control:
        # The same plan with ToMe's plain matching (no kNN term, no attention statistics, no CTR): the cheapest
        # merge step there is, so its efficiency is about the ceiling the encoder itself allows for this plan.
        tome = Scoring(w_div=0.0, w_attn=0.0, ctr=0.0)
        control_plan = dataclasses.replace(plans[-1][1], scoring=tome)
        plans.append((f"decreasing -> {aggressive}, ToMe scoring (control)", control_plan))
    return plans


def cpu_name() -> str:
    """The CPU model and core count, for the table's header."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or 'CPU'}, {os.cpu_count()} cores"


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.set_num_threads(args.threads)
    names = list(ENCODERS) if args.full else [n for n in ENCODERS if not n.startswith("SigLIP")]
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"# machine: {machine}; {args.threads} CPU threads; torch {torch.__version__}; {args.dtype}; batch "
        f"{args.batch}; {args.repeats} interleaved rounds, medians"
    )
    header = (
        "| encoder | schedule | native ms | pruned ms | speed-up | predicted | efficiency | scoring+merging |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|"
    )
    print(header)
    for name in names:
        bench_encoder(name, args, device, dtype)


def bench_encoder(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """Time one encoder natively and under each schedule; print one table row per schedule."""
    torch.manual_seed(0)
    model = ENCODERS[name]().to(device=device, dtype=dtype).eval()
    config = model.config
    has_cls = isinstance(model, CLIPVisionModel)
    family = "clip" if has_cls else "siglip"
    tokens_in = (config.image_size // config.patch_size) ** 2
    x = torch.randn(args.batch, 3, config.image_size, config.image_size, device=device, dtype=dtype)
    plans = schedules(config.num_hidden_layers, tokens_in, family, has_cls, control=args.control)

    def native() -> None:
        model(pixel_values=x)

    def pruned_call(schedule: Schedule) -> Callable[[], None]:
        def call() -> None:
            with apply(model, schedule):
                model(pixel_values=x)

        return call

    started = time.perf_counter()
    timings = time_interleaved(
        [native] + [pruned_call(s) for _, s in plans], device, repeats=args.repeats, warmup=args.warmup
    )
    native_ms = timings[0].median_ms
    for (label, schedule), timing in zip(plans, timings[1:], strict=True):
        share = merge_share(model, schedule, x, rounds=max(3, args.repeats // 3))
        speedup = native_ms / timing.median_ms
        predicted = schedule.predicted_speedup(config.hidden_size, config.intermediate_size)
        print(
            f"| {name} | {label} | {native_ms:.1f} | {timing.median_ms:.1f} | {speedup:.2f}x | "
            f"{predicted:.2f}x | {speedup / predicted:.2f} | {100 * share:.1f}% |",
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
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10, help="interleaved timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--full", action="store_true", help="also SigLIP so400m/14-384")
    parser.add_argument(
        "--control",
        action="store_true",
        help="also time the aggressive plan with ToMe's plain matching (the encoder's own efficiency ceiling)",
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if args.dtype is None:
        args.dtype = "fp16" if args.device == "cuda" else "fp32"
    if args.repeats < 10:
        parser.error("--repeats must be at least 10 (medians of at least 10 runs)")
    run(args)


if __name__ == "__main__":
    main()
