"""What temporal merging buys on video: feature fidelity and latency, temporal weight 0 against > 0, same budget.

A OneVision-like SigLIP tower (random weights; frames of one video as consecutive batch items, as LLaVA-OneVision
feeds them) runs synthesised videos of three kinds:

- ``static``: a textured background, identical in every frame but for a little sensor noise;
- ``object``: the same background with a textured square moving across it (most of the frame static);
- ``panning``: the whole textured scene shifts by several pixels per frame (every patch moves; fully moving).

Every frame is merged to the same per-frame budget with the same schedule (the paper's Skip family and scoring),
once with ``temporal_weight = 0`` (the paper: each frame on its own) and once per weight given (``--weights``).
Columns, all from the same run:

- ``patch cos``: fidelity per original patch: each patch of each frame takes the output token that now covers it
  (through the engine's source map, across frames for temporal merges) and is compared (cosine) with the unpruned
  tower's output for that patch; mean over patches and frames. It asks "how well does what is left stand for every
  patch of every frame", which is what merging trades away.
- ``frame cos``: the same reconstruction pooled per frame (mean over its patches) against the unpruned frame's pooled
  output, mean over frames: the per-frame summary a video model relies on.
- ``coverage``: each unpruned patch output against its best match among *all* output tokens of its video (max
  cosine), mean over patches: what the video's token set still holds, wherever it sits (a language model attends
  to every token of the video). It rewards frames that keep complementary tokens of static content.
- ``temporal``: share of removed tokens that folded into the previous frame (all merging layers).
- ``time``: median forward latency relative to the unpruned tower, and ``vs w=0`` relative to weight 0 (the cost
  of the temporal scoring), timed interleaved in the same run.

Random weights keep the timing honest (latency does not depend on weight values) but the fidelity numbers only say
how the merge preserves a random SigLIP's features, not a trained one's; the comparison between weights is the point.

    python benchmarks/temporal_merge.py                  # reduced tower (a minute or two on a small CPU), labelled
    python benchmarks/temporal_merge.py --full --device cuda --frames 32   # SigLIP so400m/14-384, 26 layers, fp16
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import SiglipVisionConfig, SiglipVisionModel

from tuner.evoprune import Schedule, Scoring, apply
from tuner.timing import time_interleaved

REDUCED: dict[str, Any] = {
    "hidden_size": 384,
    "intermediate_size": 1536,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "image_size": 196,
    "patch_size": 14,
}
"""The default tower: SigLIP's shape at a size a small CPU runs in seconds (14 x 14 = 196 patches per frame)."""

FULL: dict[str, Any] = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 26,  # LLaVA-OneVision reads layer 26 of so400m's 27
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
}
"""SigLIP so400m/14-384 as LLaVA-OneVision runs it (729 patches per frame)."""

CONTENTS = ("static", "object", "panning")


def texture(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """A smooth random colour texture ``[3, H, W]`` in about [-1, 1]: noise at a few scales, upsampled."""
    image = torch.zeros(1, 3, height, width)
    for cells in (4, 12, 36):
        noise = torch.randn(1, 3, cells, cells * width // height + 1, generator=generator)
        image += F.interpolate(noise, size=(height, width), mode="bilinear", align_corners=False) / cells**0.25
    return (image / image.abs().amax()).squeeze(0)


def synthesise(kind: str, frames: int, size: int, seed: int = 0) -> torch.Tensor:
    """One video ``[frames, 3, size, size]`` of the given kind (see the module's notes)."""
    generator = torch.Generator().manual_seed(seed)
    shift = max(2, size // 24)  # pixels per frame for the moving kinds
    scene = texture(size, size + shift * frames, generator)
    background = scene[:, :, :size]
    video = []
    if kind == "object":
        side = size // 4
        patch = texture(side, side, generator) * 0.5 + 0.5
    for frame in range(frames):
        if kind == "panning":
            picture = scene[:, :, shift * frame : shift * frame + size].clone()
        else:
            picture = background.clone()
        if kind == "object":
            left = (shift * 2 * frame) % (size - side)
            top = size // 3
            picture[:, top : top + side, left : left + side] = patch
        picture += 0.02 * torch.randn(picture.shape, generator=generator)  # sensor noise: no two frames identical
        video.append(picture)
    return torch.stack(video)


def reconstruct(output: torch.Tensor, source: torch.Tensor, source_item: torch.Tensor | None) -> torch.Tensor:
    """Every original patch's covering output token: ``[B, N0, C]`` from ``[B, N, C]`` and the source map."""
    batch, patches = source.shape
    items = torch.arange(batch, device=source.device)[:, None].expand(batch, patches)
    if source_item is not None:
        items = source_item
    return output[items, source]


def fidelity(native: torch.Tensor, output: torch.Tensor, handle: Any, frames: int) -> tuple[float, float, float]:
    """``(patch cos, frame cos, coverage)`` of a pruned output against the unpruned one (see the module's notes)."""
    rebuilt = reconstruct(output.float(), handle.source, handle.source_item)
    native = native.float()
    patch = F.cosine_similarity(rebuilt, native, dim=-1).mean().item()
    frame = F.cosine_similarity(rebuilt.mean(dim=1), native.mean(dim=1), dim=-1).mean().item()
    # Coverage: each unpruned patch output against its best match among all output tokens of its video.
    videos = native.shape[0] // frames
    wanted = F.normalize(native.reshape(videos, -1, native.shape[-1]), dim=-1)
    kept = F.normalize(output.float().reshape(videos, -1, output.shape[-1]), dim=-1)
    coverage = (wanted @ kept.transpose(1, 2)).amax(dim=-1).mean().item()
    return patch, frame, coverage


def bench(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    sizes = FULL if args.full else REDUCED
    torch.manual_seed(0)
    model = SiglipVisionModel._from_config(SiglipVisionConfig(**sizes), attn_implementation="sdpa")
    model = model.to(device=device, dtype=dtype).eval()
    side = sizes["image_size"] // sizes["patch_size"]
    patches = side * side
    layers = sizes["num_hidden_layers"]
    tokens_out = max(1, round(args.keep * patches))
    label = "SigLIP so400m/14-384 (26 layers)" if args.full else "reduced SigLIP (384 wide, 12 layers, 196 px)"
    print(
        f"# {label}, random weights, {args.frames} frames per video, {patches} -> {tokens_out} tokens per frame "
        f"(skip preset, paper scoring), {args.device} {dtype}, torch {torch.__version__}, {platform.processor() or '?'}"
    )
    schedules = {
        weight: Schedule.preset(
            "skip",
            num_layers=layers,
            tokens_in=patches,
            tokens_out=tokens_out,
            scoring=Scoring(temporal_weight=weight),
            family="siglip",
            has_cls=False,
        )
        for weight in (0.0, *args.weights)
    }
    print(f"# plan: {schedules[0.0].describe()}")
    header = (
        f"{'content':<8} {'weight':>6} {'patch cos':>9} {'frame cos':>9} {'coverage':>8} {'temporal':>8} {'time':>6} "
        f"{'vs w=0':>6}"
    )
    print(header)
    rows = []
    for kind in CONTENTS:
        started = time.perf_counter()
        pixels = synthesise(kind, args.frames, sizes["image_size"]).to(device=device, dtype=dtype)
        with torch.inference_mode():
            native = model(pixel_values=pixels).last_hidden_state
        results: dict[float, tuple[float, float, float, float]] = {}
        calls: list[Callable[[], object]] = [_timed_call(model, None, pixels, args.frames)]
        for weight, schedule in schedules.items():
            with apply(model, schedule) as handle, torch.inference_mode():
                handle.frames_per_item = args.frames
                output = model(pixel_values=pixels).last_hidden_state
                patch, frame, coverage = fidelity(native, output, handle, args.frames)
                moved = sum(handle.temporal_merges.values())
            results[weight] = (patch, frame, coverage, moved / (schedule.tokens_removed * args.frames))
        # Timing: the unpruned tower and each weight, interleaved (each call applies and removes its schedule: the
        # same few microseconds for all, and no two handles on one model).
        for schedule in schedules.values():
            calls.append(_timed_call(model, schedule, pixels, args.frames))
        timings = time_interleaved(calls, device, repeats=args.repeats, warmup=1, alternate=True)
        native_ms = timings[0].median_ms
        base_ms = timings[1].median_ms
        for (weight, (patch, frame, coverage, share)), timing in zip(results.items(), timings[1:], strict=True):
            row = {
                "content": kind,
                "temporal_weight": weight,
                "patch_cos": patch,
                "frame_cos": frame,
                "coverage": coverage,
                "temporal_share": share,
                "time_vs_native": timing.median_ms / native_ms,
                "time_vs_weight0": timing.median_ms / base_ms,
                "ms": timing.median_ms,
                "native_ms": native_ms,
            }
            rows.append(row)
            print(
                f"{kind:<8} {weight:>6g} {patch:>9.4f} {frame:>9.4f} {coverage:>8.4f} {share:>8.1%} "
                f"{row['time_vs_native']:>6.3f} "
                f"{row['time_vs_weight0']:>6.3f}"
            )
        print(f"#   {kind}: native {native_ms:.0f} ms, {time.perf_counter() - started:.0f} s")
    return {
        "tower": label,
        "sizes": sizes,
        "frames": args.frames,
        "tokens_per_frame": [patches, tokens_out],
        "device": args.device,
        "dtype": str(dtype),
        "repeats": args.repeats,
        "rows": rows,
    }


def _timed_call(
    model: torch.nn.Module, schedule: Schedule | None, pixels: torch.Tensor, frames: int
) -> Callable[[], object]:
    """A forward of ``model`` on ``pixels`` under ``schedule`` (None: the unpruned tower)."""

    def call() -> object:
        if schedule is None:
            return model(pixel_values=pixels)
        with apply(model, schedule) as handle:
            handle.frames_per_item = frames
            return model(pixel_values=pixels)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="SigLIP so400m/14-384 sizes (26 layers, 729 patches)")
    parser.add_argument("--frames", type=int, default=8, help="frames per video (default 8)")
    parser.add_argument("--keep", type=float, default=0.25, help="share of patch tokens each frame keeps (0.25)")
    parser.add_argument(
        "--weights", type=float, nargs="+", default=[0.6, 1.0], help="temporal weights > 0 to compare (0.6 1.0)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = bench(args)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
