"""The demo's tiny LLaVA: the demo's CLIP vision tower, a projector and a small Llama, with a word-level processor.

Everything is transformers' own: a :class:`~transformers.LlavaForConditionalGeneration` (LLaVA-1.5's layout: visual
features read at ``vision_feature_layer=-2`` with the CLS token dropped, a two-layer GELU projector) whose vision tower
is the tower of :mod:`tuner.demo.model`'s classifier (6 layers, 128 wide, 64 patch tokens + CLS; fine-tuned by
:mod:`tuner.demo.train_mllm` so that each grid cell's tokens name its digit) and whose language model is a 4-layer,
128-wide Llama; and a :class:`~transformers.LlavaProcessor` made of a :class:`~transformers.CLIPImageProcessor` for
the 64 px scenes (mean and std 0.5, as the tower was trained; a 64 px image is neither resized nor cropped) and a
word-level :class:`~transformers.PreTrainedTokenizerFast` whose vocabulary is every word of the prompts
:func:`evaluators.mllm.build_prompt` makes of :mod:`tuner.demo.vqa`'s questions. The processor expands ``<image>`` to
64 image tokens (8x8 patches + CLS - CLS), as the model's features.

The trained model and its processor ship in :data:`MLLM_WEIGHTS_DIR` and load with ``from_pretrained``
(:func:`load_demo_mllm`); :mod:`tuner.demo.train_mllm` makes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from tuner.demo.model import PATCH_SIZE, WEIGHTS_DIR, load_demo_model, num_patch_tokens
from tuner.demo.scenes import NUM_CLASSES, SCENE_SIZE
from tuner.demo.vqa import CELLS, COUNT_CHOICES, YES_NO

__all__ = [
    "IMAGE_TOKEN",
    "MLLM_WEIGHTS_DIR",
    "SPECIAL_TOKENS",
    "build_demo_mllm",
    "build_processor",
    "build_tokenizer",
    "image_tokens_per_scene",
    "load_demo_mllm",
    "prompt_vocabulary",
]

MLLM_WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "mllm_weights"
"""Folder of the shipped LLaVA: ``config.json``, ``model.safetensors`` and the processor's files."""

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS: dict[str, str] = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def image_tokens_per_scene() -> int:
    """Image tokens per scene in a prompt: the tower's 64 patch tokens (its CLS token is dropped)."""
    return num_patch_tokens(SCENE_SIZE, PATCH_SIZE)


def _pre_tokenizer() -> Any:
    from tokenizers import pre_tokenizers

    # Words and punctuation apart ("left?" -> "left", "?"): the answer letters and digits are words of their own.
    return pre_tokenizers.Whitespace()


def prompt_vocabulary() -> list[str]:
    """Every word of every prompt the demo's questions make (:func:`evaluators.mllm.build_prompt`), in order of
    first appearance, plus the answers and the option letters, special tokens excluded."""
    from evaluators.mllm import LETTERS, MllmItem, build_prompt

    digits = tuple(str(d) for d in range(NUM_CLASSES))
    items = [MllmItem(0, f"What digit is in the {cell}?", digits[:4], 0, "0") for cell in CELLS]
    items += [MllmItem(0, "How many digits are there?", COUNT_CHOICES, 0, "0")]
    items += [MllmItem(0, f"Is there a {d}?", YES_NO, 0, "0") for d in digits]
    texts = [build_prompt(item, image_token=" ") for item in items] + [" ".join([*YES_NO, *LETTERS, *digits])]
    pre_tokenizer = _pre_tokenizer()
    words: dict[str, None] = {}
    for text in texts:
        for word, _ in pre_tokenizer.pre_tokenize_str(text):
            words.setdefault(word, None)
    return list(words)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :func:`prompt_vocabulary`: special tokens first, then ``<image>``, then the words.

    It adds no BOS/EOS to a prompt (the model was trained on prompts as the processor encodes them).
    """
    from tokenizers import Tokenizer, models

    words = [*SPECIAL_TOKENS.values(), IMAGE_TOKEN, *prompt_vocabulary()]
    vocab = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = _pre_tokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, extra_special_tokens={"image_token": IMAGE_TOKEN}, **SPECIAL_TOKENS
    )


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    """The demo's :class:`~transformers.LlavaProcessor`: 64 px images, ``<image>`` expanded to 64 tokens.

    The image processor keeps a 64 px scene as it is (resize to 64 and centre-crop 64 are no-ops on it), scales by
    1/255 and normalises with mean and std 0.5, the tower's training normalisation; another size is resized.
    """
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": SCENE_SIZE},
        crop_size={"height": SCENE_SIZE, "width": SCENE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the tower's CLS token, which the "default" strategy drops
    )


def build_demo_mllm(
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    intermediate_size: int = 384,
    initializer_range: float = 0.08,
    tower_dir: str | Path | None = None,
    seed: int = 0,
) -> LlavaForConditionalGeneration:
    """A LLaVA with the demo's trained vision tower, a fresh projector and a fresh Llama.

    Args:
        tokenizer: its vocabulary sizes the language model (default :func:`build_tokenizer`).
        hidden_size: width of the language model (and the projector's output).
        num_hidden_layers: layers of the language model.
        num_attention_heads: attention heads of the language model.
        intermediate_size: MLP width of the language model.
        initializer_range: standard deviation of the fresh weights (projector and language model). Not Llama's
            0.02: from that a 128-wide model trained from scratch sat at chance on "Is there a 7?" for 600 steps,
            even with the scene given as words, where 0.08 answered it after 250 (``tuner.demo.train_mllm``).
        tower_dir: the demo classifier's weights (default the shipped ``tuner/demo/weights``).
        seed: seeds the fresh weights.

    Returns:
        The model in training mode, fp32, sdpa attention.
    """
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    classifier = load_demo_model(weights_dir=tower_dir if tower_dir is not None else WEIGHTS_DIR)
    vision = CLIPVisionConfig.from_dict(classifier.config.to_dict()["vision_config"])
    vision.attention_dropout = 0.0  # the tower is used frozen, in eval mode
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=initializer_range,  # LlavaConfig has none: its fresh projector is drawn with this too
    )
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert isinstance(image_token_id, int)  # one token in, one id out
    config = LlavaConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_index=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=image_tokens_per_scene(),
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    missing, unexpected = model.model.vision_tower.load_state_dict(classifier.vision_model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"the demo tower does not fit LLaVA's: missing {missing}, unexpected {unexpected}")
    model.train()
    return model


def load_demo_mllm(
    weights_dir: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load the shipped demo LLaVA and its processor with ``from_pretrained``.

    Args:
        weights_dir: the folder (default :data:`MLLM_WEIGHTS_DIR`).
        device: where to put the model.

    Returns:
        ``(model, processor)``: the model in eval mode, fp32; the processor's tokenizer pads on the left.
    """
    path = str(MLLM_WEIGHTS_DIR if weights_dir is None else Path(weights_dir))
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model.to(device)  # type: ignore[arg-type]  # transformers types `to` through a decorator mypy misreads
    model.eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return model, processor
