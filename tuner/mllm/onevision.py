"""LLaVA-OneVision / LLaVA-Video (SigLIP tower) with EvoPrune on video: frames merged one by one, prompts rewritten.

A video's frames go through the tower as batch items, so every frame is merged on its own to the schedule's per-frame
budget. The native model then pools each frame's 27x27 grid 2x2 (bilinear) and appends one newline token after the
video; a merged frame is no grid, so while prepared:

- the 2x2 pooling is skipped: the schedule's per-frame token count *is* the frame's budget (pooling is the native
  model's own fixed reduction; the merge replaces it, and a schedule to 196 tokens matches its count);
- the one newline token after the video stays, as the processor puts it in the prompt;
- tokens stay in spatial order within a frame (merged tokens are ordered by the first patch they cover), frames in
  time order.

The prompt's run of ``frames x pooled + 1`` video tokens becomes ``frames x per-frame tokens + 1``. Images (anyres
tiles with per-row newlines) are not supported yet: a prepared model refuses ``pixel_values``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration

from tuner.evoprune import EvoPruneError, Schedule, UnsupportedModelError
from tuner.mllm.llava import TowerPruning
from tuner.mllm.tokens import PaddingSide

__all__ = ["OnevisionVideoPruning", "prepare_onevision_video", "pooled_tokens_per_frame"]


def pooled_tokens_per_frame(model: Any) -> int:
    """Video tokens per frame of the native model: the patch grid pooled 2x2 (``ceil(side / 2) ** 2``)."""
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    pooled = -(-side // 2)
    return int(pooled * pooled)


class OnevisionVideoPruning(TowerPruning):
    """A schedule applied per frame to a LLaVA-OneVision model's videos (see the module's notes)."""

    def _prepare(self) -> None:
        self._patch(self.model.model, "apply_pooling", _no_pooling)

    def rewrite(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if kwargs.get("pixel_values") is not None:
            raise EvoPruneError(
                "a LLaVA-OneVision model prepared for video takes pixel_values_videos only; images (anyres tiles) are "
                "not supported yet"
            )
        videos = kwargs.get("pixel_values_videos")
        if videos is None:
            return kwargs  # a decoding step or a text-only prompt
        frames = int(videos.shape[1])
        native = frames * pooled_tokens_per_frame(self.model) + 1
        pruned = frames * self.pruned_tokens + 1
        return self._rewrite_runs(kwargs, self.model.config.video_token_id, int(videos.shape[0]), native, pruned)


def prepare_onevision_video(
    model: LlavaOnevisionForConditionalGeneration, schedule: Schedule, *, padding_side: PaddingSide | None = None
) -> OnevisionVideoPruning:
    """Apply ``schedule`` to every frame of a LLaVA-OneVision model's videos and rewrite its prompts' video tokens.

    Args:
        model: a ``LlavaOnevisionForConditionalGeneration`` (SigLIP tower; LLaVA-Video uses the same class).
        schedule: a per-frame plan over the vision layers that run and the tower's patch tokens (729 at 384 px).
        padding_side: where to pad rows when the attention mask shows no padding; None for the left.

    Returns:
        A handle; use it as a context manager or call ``remove()``.

    Raises:
        UnsupportedModelError: not a LLaVA-OneVision model.
        ScheduleError: the schedule does not fit the layers that run or the tower's tokens.
    """
    if not isinstance(model, LlavaOnevisionForConditionalGeneration):
        raise UnsupportedModelError(
            f"prepare_onevision_video takes a LlavaOnevisionForConditionalGeneration, got {type(model).__name__}"
        )
    return OnevisionVideoPruning(model, schedule, padding_side)


def _no_pooling(self: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Merged frames are no grid: their per-frame budget replaces the native 2x2 pooling."""
    return features
