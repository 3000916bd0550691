"""Where a pruned encoder forward's time goes on a device: operator calls, kernel time against wall time, host syncs.

For each of native, the oracle (slicing) and EvoPrune (paper scoring and ToMe's plain matching) on one encoder and
plan, one profiled forward (``torch.profiler``, after warm-up) gives:

- ``ops``: operator calls (aten) issued by the host; ``kernels``: device kernels launched (CUDA only);
- ``wall ms``: the forward's wall time (synchronised), ``kernel ms``: the summed device time of its kernels, and
  ``busy``: kernel ms / wall ms. Far below 1, the device waits for the host (launch-bound): fewer tokens then buy
  little, and every extra operator of a merge step costs its host time;
- ``syncs`` (CUDA only): host-device synchronisations inside the forward, counted with
  ``torch.cuda.set_sync_debug_mode("warn")`` (each stalls the host until the device drains its queue).

    python benchmarks/merge_profile.py --device cuda --encoder ViT-B --batch 1
    python benchmarks/merge_profile.py --device cuda --encoder so400m --batch 32
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import CLIPVisionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from encoder_speed import ENCODERS  # noqa: E402

from tuner.evoprune import Schedule, Scoring, apply  # noqa: E402

# The module, not the function ``tuner.evoprune.apply`` that the package exports under the same name.
apply_module = importlib.import_module("tuner.evoprune.apply")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--encoder", default="ViT-B", help="a name part of benchmarks/encoder_speed.py's encoders")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens-out", type=int, default=64, help="the Skip plan's output tokens (default 64)")
    parser.add_argument("--top", type=int, default=0,
                        help="also list the N costliest operators of the paper scoring forward")  # fmt: skip
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    names = [name for name in ENCODERS if args.encoder.lower() in name.lower()]
    if not names:
        parser.error(f"unknown encoder {args.encoder!r}; available: {', '.join(ENCODERS)}")
    torch.manual_seed(0)
    with torch.device(device):
        model = ENCODERS[names[0]]().to(dtype=dtype).eval()
    config = model.config
    has_cls = isinstance(model, CLIPVisionModel)  # as benchmarks/encoder_speed.py tells the families apart
    tokens_in = (config.image_size // config.patch_size) ** 2
    plan = Schedule.preset("skip", num_layers=config.num_hidden_layers, tokens_in=tokens_in,
                           tokens_out=args.tokens_out, scoring=Scoring(), family="clip" if has_cls else "siglip",
                           has_cls=has_cls)  # fmt: skip
    tome = dataclasses.replace(plan, scoring=Scoring(w_div=0.0, w_attn=0.0, ctr=0.0))
    x = torch.randn(args.batch, 3, config.image_size, config.image_size, device=device, dtype=dtype)

    def run(schedule: Schedule | None, reducer: str = "merge") -> Callable[[], None]:
        def call() -> None:
            if schedule is None:
                model(pixel_values=x)
            else:
                with apply(model, schedule, reducer=reducer):  # type: ignore[arg-type]
                    model(pixel_values=x)

        return call

    def unaligned(call: Callable[[], None]) -> Callable[[], None]:
        """``call`` with the explicit attention's aligned operands turned off (tuner.evoprune.apply._aligns)."""

        def without() -> None:
            devices, apply_module._ALIGN_DEVICES = apply_module._ALIGN_DEVICES, ()
            try:
                call()
            finally:
                apply_module._ALIGN_DEVICES = devices

        return without

    rows = {
        "native": run(None),
        f"oracle (slice) -> {args.tokens_out}": run(plan, "slice"),
        f"ToMe matching -> {args.tokens_out}": run(tome),
        f"paper scoring, unaligned attention -> {args.tokens_out}": unaligned(run(plan)),
        f"paper scoring -> {args.tokens_out}": run(plan),
    }
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {names[0]}, batch {args.batch}, {str(dtype).removeprefix('torch.')}, {name}, torch {torch.__version__}")
    print("| forward | ops | kernels | wall ms | kernel ms | busy | syncs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        for label, call in rows.items():
            for _ in range(3):
                call()
            synchronize(device)
            with profile(activities=activities) as prof:
                started = time.perf_counter()
                call()
                synchronize(device)
                wall_ms = (time.perf_counter() - started) * 1e3
            events = prof.key_averages()
            ops = sum(event.count for event in events if event.key.startswith("aten::"))
            on_device = [event for event in events if str(getattr(event, "device_type", "")).endswith("CUDA")]
            kernels = sum(event.count for event in on_device)
            kernel_ms = sum(event.self_device_time_total for event in on_device) / 1e3
            syncs = count_syncs(call) if device.type == "cuda" else "-"
            busy = f"{kernel_ms / wall_ms:.2f}" if device.type == "cuda" else "-"
            print(f"| {label} | {ops} | {kernels if device.type == 'cuda' else '-'} | {wall_ms:.2f} | "
                  f"{kernel_ms:.2f} | {busy} | {syncs} |", flush=True)  # fmt: skip
            last = prof
    if args.top:
        # The last profile is the paper scoring's; aten rows carry their kernels' device time and their own host time.
        rows_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(last.key_averages().table(sort_by=rows_by, row_limit=args.top, max_name_column_width=60))
        if device.type == "cuda":
            print(last.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top,
                                            max_name_column_width=60))  # fmt: skip
    return 0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_syncs(call: Callable[[], None]) -> int:
    """Host-device synchronisations during one call (CUDA's sync debug mode turns each into a warning)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message).lower() for warning in caught)


if __name__ == "__main__":
    raise SystemExit(main())
