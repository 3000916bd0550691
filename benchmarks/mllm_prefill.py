"""LLaVA prefill latency: native vs the paper's schedules, ratios from one run; one image (LLaVA-1.5) or a video
(LLaVA-OneVision / LLaVA-Video).

Random weights (latency does not depend on weight values) at the real sizes:

- images (default): ``LlavaForConditionalGeneration`` with LLaVA-1.5's vision tower (CLIP ViT-L/14-336, 576 patch
  tokens, features from layer -2) and projector; the language model is Vicuna-7B's shape (32 layers, 4096 wide).
  The prompt is one image and a short question as LlavaProcessor makes it (576 image tokens), ``--batch`` copies of
  it per call; the Skip schedule to 128 and 64 tokens.
- ``--video FRAMES``: ``LlavaOnevisionForConditionalGeneration`` with its SigLIP so400m/14-384 tower (26 layers, 729
  patches a frame) and a Qwen2-7B-shape language model (28 layers, 3584 wide, 4 key-value heads). The prompt holds
  one video as LlavaOnevisionProcessor makes it (196 pooled tokens a frame, one newline); the paper's per-frame
  budgets 64, 32 and 16 (Skip where one halving per merging layer reaches it, else Decreasing), which replace the
  native 2x2 pooling (docs/mllm.md).

The language model is reduced to ``--lm-layers`` layers where memory or time does not allow the full one (the default
on a CPU), and the table says so. The pruned models get the native prompt unchanged and rewrite it
(:func:`tuner.mllm.prepare_llava`, :func:`tuner.mllm.prepare_onevision`). Timed: pixels and prompt on the device to
the first token's logits, in interleaved rounds (medians), CUDA events on a GPU.

    python benchmarks/mllm_prefill.py --device cpu --lm-layers 2       # a reduced language model on a CPU
    python benchmarks/mllm_prefill.py --device cuda                    # full size, fp16
    python benchmarks/mllm_prefill.py --device cuda --batch 8          # 8 prompts of one image each per call
    python benchmarks/mllm_prefill.py --device cuda --video 32         # LLaVA-OneVision on a 32-frame video
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuner.evoprune import Schedule, ScheduleError, Scoring  # noqa: E402
from tuner.mllm import llava_layers_used, pooled_tokens_per_frame, prepare_llava, prepare_onevision  # noqa: E402
from tuner.timing import time_interleaved  # noqa: E402

IMAGE_TOKEN = 32000
VICUNA_7B_LAYERS = 32
VIDEO_TOKEN, ONEVISION_IMAGE_TOKEN = 151647, 151646
QWEN2_7B_LAYERS = 28


def build(lm_layers: int, device: torch.device, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    """LLaVA-1.5-7B's shape with ``lm_layers`` language-model layers, random weights, built on ``device``."""
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)  # fmt: skip
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=lm_layers, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")  # fmt: skip
    # Built on the device: a 7B model's random initialisation takes minutes on a CPU and seconds on a GPU.
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def build_onevision(lm_layers: int, device: torch.device, dtype: torch.dtype) -> LlavaOnevisionForConditionalGeneration:
    """LLaVA-OneVision-7B's shape (SigLIP so400m tower, Qwen2-7B) with ``lm_layers`` language-model layers."""
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                num_attention_heads=16, image_size=384, patch_size=14)  # fmt: skip
    text = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=lm_layers, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152128, max_position_embeddings=32768,
                       rope_theta=1000000.0)  # fmt: skip
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, video_token_index=VIDEO_TOKEN,
                                  image_token_index=ONEVISION_IMAGE_TOKEN, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full")  # fmt: skip
    with torch.device(device):
        model = LlavaOnevisionForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def per_frame_schedule(layers: int, tokens_in: int, tokens_out: int) -> tuple[str, Schedule]:
    """The paper's Skip schedule to ``tokens_out`` where one halving per merging layer reaches it, else Decreasing."""
    common: dict[str, Any] = dict(num_layers=layers, tokens_in=tokens_in, tokens_out=tokens_out, scoring=Scoring(),
                                  family="siglip", has_cls=False)  # fmt: skip
    try:
        return f"Skip -> {tokens_out}", Schedule.preset("skip", **common)
    except ScheduleError:
        return f"Decreasing -> {tokens_out}", Schedule.preset("decreasing", alpha=1.0, **common)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lm-layers", type=int, default=None,
                        help=f"language-model layers (default: all on cuda, {VICUNA_7B_LAYERS} for LLaVA-1.5 and "
                             f"{QWEN2_7B_LAYERS} for OneVision; 2 on cpu)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=10, help="timed interleaved rounds (default 10)")
    parser.add_argument(
        "--tokens",
        default=None,
        help="tokens the schedules keep per image or frame (default 128,64; 64,32,16 with --video)",
    )
    parser.add_argument("--batch", type=int, default=1, help="prompts of one image each per call (images only)")
    parser.add_argument("--video", type=int, default=0, metavar="FRAMES",
                        help="time LLaVA-OneVision on one video of this many frames instead")  # fmt: skip
    args = parser.parse_args()
    if args.batch < 1 or args.video < 0 or (args.video and args.batch != 1):
        parser.error("--batch must be at least 1, --video at least 1 frame, and not both")
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    full_layers = QWEN2_7B_LAYERS if args.video else VICUNA_7B_LAYERS
    lm_layers = args.lm_layers or (full_layers if device.type == "cuda" else 2)
    tokens = [int(count) for count in (args.tokens or ("64,32,16" if args.video else "128,64")).split(",")]
    torch.manual_seed(0)
    prepare: Callable[[Any, Schedule], Any]
    if args.video:
        model: Any = build_onevision(lm_layers, device, dtype)
        layers = llava_layers_used(model)
        pooled = pooled_tokens_per_frame(model)
        prompt = [151644, 872, 198] + [VIDEO_TOKEN] * (args.video * pooled + 1) + [198, 3838, 374, 419, 30, 151645]
        inputs = {
            "input_ids": torch.tensor([prompt], device=device),
            "attention_mask": torch.ones(1, len(prompt), dtype=torch.long, device=device),
            "pixel_values_videos": torch.randn(1, args.video, 3, 384, 384, device=device, dtype=dtype),
        }
        schedules = dict(per_frame_schedule(layers, 729, count) for count in tokens)
        prepare, native_tokens, unit = prepare_onevision, pooled, "tokens/frame"
        what = f"LLaVA-OneVision, one video of {args.video} frames"
        language_shape, language_width = "Qwen2-7B", 3584
    else:
        model = build(lm_layers, device, dtype)
        layers = llava_layers_used(model)
        prompt = [1, 3148, 1001, 29901, 29871] + [IMAGE_TOKEN] * 576 + [29871, 13, 5618, 338, 445, 29973, 319, 1799]
        inputs = {
            "input_ids": torch.tensor([prompt] * args.batch, device=device),
            "attention_mask": torch.ones(args.batch, len(prompt), dtype=torch.long, device=device),
            "pixel_values": torch.randn(args.batch, 3, 336, 336, device=device, dtype=dtype),
        }
        schedules = {
            f"Skip -> {count}": Schedule.preset(
                "skip",
                num_layers=layers,
                tokens_in=576,
                tokens_out=count,
                scoring=Scoring(),
                family="clip",
                has_cls=True,
            )  # fmt: skip
            for count in tokens
        }
        prepare, native_tokens, unit = prepare_llava, 576, "image tokens"
        what = f"LLaVA-1.5, {args.batch} prompt{'s' if args.batch > 1 else ''} of one image"
        language_shape, language_width = "Vicuna-7B", 4096
    if lm_layers == full_layers:
        language = f"{language_shape} shape"
    else:
        language = f"REDUCED: {lm_layers} of {full_layers} layers, {language_width} wide"

    def native() -> None:
        model(**inputs, logits_to_keep=1)

    def pruned(schedule: Schedule) -> Callable[[], None]:
        def call() -> None:
            with prepare(model, schedule):
                model(**inputs, logits_to_keep=1)

        return call

    candidates = [native, *(pruned(s) for s in schedules.values())]
    timings = time_interleaved(candidates, device, repeats=args.repeats, warmup=2, alternate=True)
    base = timings[0].median_ms
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{what}: prefill on {name}, {str(dtype).removeprefix('torch.')}, language model: {language}; prompt "
          f"{len(prompt)} tokens; {args.repeats} interleaved rounds")  # fmt: skip
    print(f"{'schedule':<18} {unit:>13} {'prefill ms':>11} {'ratio':>7} {'speed-up':>9}")
    print(f"{'native':<18} {native_tokens:>13} {base:>11.1f} {1.0:>7.3f} {1.0:>8.2f}x")
    for (label, schedule), timing in zip(schedules.items(), timings[1:], strict=True):
        ratio = timing.median_ms / base
        print(f"{label:<18} {schedule.tokens_out:>13} {timing.median_ms:>11.1f} {ratio:>7.3f} {1 / ratio:>8.2f}x")
    spread = max(statistics.pstdev(t.samples_ms) / t.median_ms for t in timings)
    print(f"largest relative spread (sd / median) of a call: {spread:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
