"""LLaVA-1.5 prefill latency: native vs the paper's Skip schedule to 128 and 64 image tokens, ratios from one run.

A random-weight ``LlavaForConditionalGeneration`` (latency does not depend on weight values) with LLaVA-1.5's real
vision tower (CLIP ViT-L/14-336, 576 patch tokens, features from layer -2) and its projector; the language model is
Vicuna-7B's shape (32 layers, 4096 wide) where memory allows, else reduced to ``--lm-layers`` layers, and the table
says so. The prompt is one image and a short question, made as LlavaProcessor makes it (576 image tokens); the pruned
models get it unchanged and rewrite it (:func:`tuner.mllm.prepare_llava`). Timed: pixels and prompt on the device to
the first token's logits, in interleaved rounds (medians), CUDA events on a GPU.

    python benchmarks/mllm_prefill.py --device cpu --lm-layers 2     # a reduced language model on a CPU
    python benchmarks/mllm_prefill.py --device cuda                  # full size, fp16
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuner.evoprune import Schedule, Scoring  # noqa: E402
from tuner.mllm import llava_layers_used, prepare_llava  # noqa: E402
from tuner.timing import time_interleaved  # noqa: E402

IMAGE_TOKEN = 32000
VICUNA_7B_LAYERS = 32


def build(lm_layers: int, device: torch.device, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)  # fmt: skip
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=lm_layers, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")  # fmt: skip
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lm-layers", type=int, default=None,
                        help=f"language-model layers (default: {VICUNA_7B_LAYERS} on cuda, 2 on cpu)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=10, help="timed interleaved rounds (default 10)")
    parser.add_argument("--tokens", default="128,64", help="image tokens the Skip schedules keep (default 128,64)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    lm_layers = args.lm_layers or (VICUNA_7B_LAYERS if device.type == "cuda" else 2)
    torch.manual_seed(0)
    model = build(lm_layers, device, dtype)
    layers = llava_layers_used(model)
    prompt = [1, 3148, 1001, 29901, 29871] + [IMAGE_TOKEN] * 576 + [29871, 13, 5618, 338, 445, 29973, 319, 1799]
    inputs = {
        "input_ids": torch.tensor([prompt], device=device),
        "attention_mask": torch.ones(1, len(prompt), dtype=torch.long, device=device),
        "pixel_values": torch.randn(1, 3, 336, 336, device=device, dtype=dtype),
    }
    schedules = {
        f"Skip -> {count}": Schedule.preset(
            "skip",
            num_layers=layers,
            tokens_in=576,
            tokens_out=int(count),
            scoring=Scoring(),
            family="clip",
            has_cls=True,
        )  # fmt: skip
        for count in args.tokens.split(",")
    }

    def native() -> None:
        model(**inputs, logits_to_keep=1)

    def pruned(schedule: Schedule):  # type: ignore[no-untyped-def]
        def call() -> None:
            with prepare_llava(model, schedule):
                model(**inputs, logits_to_keep=1)

        return call

    candidates = [native, *(pruned(s) for s in schedules.values())]
    timings = time_interleaved(candidates, device, repeats=args.repeats, warmup=2, alternate=True)
    base = timings[0].median_ms
    label = "Vicuna-7B shape" if lm_layers == VICUNA_7B_LAYERS else f"REDUCED: {lm_layers} of 32 layers, 4096 wide"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"LLaVA-1.5 prefill, {name}, {str(dtype).removeprefix('torch.')}, language model: {label}; prompt "
          f"{len(prompt)} tokens with 576 image tokens; {args.repeats} interleaved rounds")  # fmt: skip
    print(f"{'schedule':<16} {'image tokens':>12} {'prefill ms':>11} {'ratio':>7} {'speed-up':>9}")
    print(f"{'native':<16} {576:>12} {base:>11.1f} {1.0:>7.3f} {1.0:>8.2f}x")
    for (label_, schedule), timing in zip(schedules.items(), timings[1:], strict=True):
        ratio = timing.median_ms / base
        print(f"{label_:<16} {schedule.tokens_out:>12} {timing.median_ms:>11.1f} {ratio:>7.3f} {1 / ratio:>8.2f}x")
    spread = max(statistics.pstdev(t.samples_ms) / t.median_ms for t in timings)
    print(f"largest relative spread (sd / median) of a call: {spread:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
