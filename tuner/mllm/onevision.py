"""LLaVA-OneVision / LLaVA-Video (SigLIP tower) with EvoPrune: image tiles and video frames merged one by one.

Every tower input is merged on its own to the schedule's per-input token count (``pruned_tokens``): a video's frames
and an image's tiles (its base tile, the whole image resized, then the anyres tiles) go through the tower as batch
items. The native model then arranges the features on their patch grid; a merged tile or frame is no grid, so while
prepared:

Videos. The 2x2 pooling of each frame's grid is skipped: the schedule's per-frame token count *is* the frame's budget
(pooling is the native model's own fixed reduction; the merge replaces it, and a schedule to 196 tokens matches its
count). The one newline token after the video stays, as the processor puts it in the prompt. Frames stay in time
order. The prompt's run of ``frames x pooled + 1`` video tokens becomes ``frames x per-frame tokens + 1``.

Images. An image split into a grid of ``rows x cols`` tiles is packed as: the base tile's merged tokens, then each
row of tiles, left to right, each tile's merged tokens in turn, with one ``image_newline`` after each row of tiles:
``(1 + rows x cols) x per-tile tokens + rows`` tokens. Within a tile the merged tokens keep spatial order (the engine
orders them by the first patch they cover); tiles follow the processor's row-major order. Why this packing:

- The native packing interleaves tiles patch row by patch row (a row of the packed grid crosses every tile of a tile
  row) and ends each patch row with ``image_newline``. Merged tokens have no rows, so the finest 2-D layout left is
  the tile grid: the newline moves from the end of each patch row to the end of each tile row. It still marks "end
  of a row of the image" (the meaning the language model learnt), it still ends the image (the native packing's last
  token is a newline too), and it tells the language model the tile grid's shape for ``rows`` tokens. One newline
  after the whole image would lose the grid's shape for no saving worth having (at most 6 tokens).
- The base tile comes first with no newline after it, as in the native packing.
- Unpadding is not done: the native model drops the grid's patch rows or columns that only cover the processor's
  padding, but a merged token may cover padding and image alike, and every tile already costs the same per-tile
  budget. (With LLaVA-OneVision's pinpoints, grids of 1x1 to 6x6 tiles, no tile is ever wholly padding: checked
  over 72,145 image sizes from 16 to 4,000 px, so dropping whole tiles would gain nothing.)
- The ``anyres_max_9`` downsampling is not done: it bilinearly shrinks a large grid to about 9 tiles' worth of
  patches, a reduction fixed by the model; here the schedule's per-tile budget is the reduction, so an image costs
  ``(1 + tiles) x per-tile tokens + rows``, linear in its tile count. For LLaVA-OneVision (729 tokens a tile): a
  1920x1080 image (3x5 tiles) has 7,269 native tokens and 2,051 at 128 per tile; a 2304 px square (6x6) has 7,371
  native tokens and 4,742 at 128 per tile, but 7,258 at 196 and more above that. Runs may then grow
  (:func:`tuner.mllm.tokens.rewrite_image_runs` extends them); schedules meant for large images should budget for
  it.
- An image of a several-image prompt (``batch_num_images`` above 1) is not tiled by the processor: its one base tile
  is merged and followed by one newline, as in the native model (``per-tile tokens + 1``).

The prompt's run for each image holds the processor's native count (:func:`native_image_tokens`, computed from
``image_sizes`` the way ``LlavaOnevisionProcessor`` does) and becomes the pruned count of this packing
(:meth:`OnevisionPruning.image_tokens`); images in one batch have their own tile grids, hence their own counts. The
text around the runs is untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.image_processing_utils import select_best_resolution

from tuner.evoprune import EvoPruneError, Schedule, UnsupportedModelError
from tuner.mllm.llava import TowerPruning, _pad_token_id, _with_rewritten
from tuner.mllm.tokens import PaddingSide, rewrite_image_runs, runs_hold

__all__ = [
    "OnevisionPruning",
    "OnevisionVideoPruning",
    "image_tile_grid",
    "native_image_tokens",
    "pooled_tokens_per_frame",
    "prepare_onevision",
    "prepare_onevision_video",
]

ImageSize = Sequence[int] | torch.Tensor
"""An image's ``(height, width)`` before processing, as the processor's ``image_sizes`` holds it."""


def pooled_tokens_per_frame(model: Any) -> int:
    """Video tokens per frame of the native model: the patch grid pooled 2x2 (``ceil(side / 2) ** 2``)."""
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    pooled = -(-side // 2)
    return int(pooled * pooled)


def image_tile_grid(model: Any, image_size: ImageSize) -> tuple[int, int]:
    """``(rows, cols)`` of the anyres tiles an image of ``image_size`` (height, width) is split into: the best of the
    config's ``image_grid_pinpoints`` for it, in tiles of the tower's image size (as the processor and model pick it).
    """
    height, width = _height_width(image_size)
    best_height, best_width = select_best_resolution((height, width), model.config.image_grid_pinpoints)
    tile = model.config.vision_config.image_size
    return int(best_height // tile), int(best_width // tile)


def native_image_tokens(model: Any, image_size: ImageSize, *, tiled: bool = True) -> int:
    """Image tokens the processor puts in the prompt for one image (``LlavaOnevisionProcessor``'s count).

    Args:
        model: a LLaVA-OneVision model (its config's pinpoints, tower size, ``vision_aspect_ratio`` and strategy).
        image_size: the image's ``(height, width)`` before processing (a row of the processor's ``image_sizes``).
        tiled: False for an image of a several-image prompt (the processor sends its base tile only).

    Returns:
        Base tile features, plus, for a tiled image, the unpadded grid's features (downsampled past
        ``anyres_max_N`` tiles' worth) and one newline per grid row; for an untiled one, one newline.
    """
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    base = side * side - (1 if config.vision_feature_select_strategy == "default" else 0)
    if not tiled:
        return base + 1
    height, width = _height_width(image_size)
    rows, cols = image_tile_grid(model, (height, width))
    # The processor's _get_unpadded_features: the grid of patches less the rows or columns of padding.
    grid_height, grid_width = side * rows, side * cols
    if width / height > grid_width / grid_height:
        new_height = int(round(height * (grid_width / width), 7))
        grid_height -= 2 * ((grid_height - new_height) // 2)
    else:
        new_width = int(round(width * (grid_height / height), 7))
        grid_width -= 2 * ((grid_width - new_width) // 2)
    features, newlines = grid_height * grid_width, grid_height
    max_tiles = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
    ratio = math.sqrt(grid_height * grid_width / (max_tiles * side**2))
    if ratio > 1.1:
        features = int(grid_height // ratio) * int(grid_width // ratio)
        newlines = int(grid_height // ratio)
    return base + features + newlines


class OnevisionPruning(TowerPruning):
    """A schedule applied per tile and per frame to a LLaVA-OneVision model's images and videos (see the module's
    notes). ``pruned_tokens`` is the tokens each tile or frame keeps."""

    def _prepare(self) -> None:
        self._patch(self.model.model, "apply_pooling", _no_pooling)
        self._patch(self.model.model, "pack_image_features", _pack_tiles)

    def __enter__(self) -> OnevisionPruning:
        return self

    def image_tokens(self, image_size: ImageSize, *, tiled: bool = True) -> int:
        """Image tokens one image gets while prepared: ``(1 + rows x cols) x pruned_tokens + rows`` for a tiled
        image, ``pruned_tokens + 1`` for an image of a several-image prompt (``tiled=False``)."""
        if not tiled:
            return self.pruned_tokens + 1
        rows, cols = image_tile_grid(self.model, image_size)
        return (1 + rows * cols) * self.pruned_tokens + rows

    def rewrite(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if kwargs.get("pixel_values") is not None:
            kwargs = self._rewrite_images(kwargs)
        videos = kwargs.get("pixel_values_videos")
        # Temporal merging needs the frames per video (consecutive tower items); none for images or a mixed call.
        self.engine.frames_per_item = (
            None if videos is None or kwargs.get("pixel_values") is not None else int(videos.shape[1])
        )
        if videos is None:
            return kwargs  # a decoding step, a text-only prompt or images only
        frames = int(videos.shape[1])
        native = frames * pooled_tokens_per_frame(self.model) + 1
        pruned = frames * self.pruned_tokens + 1
        return self._rewrite_runs(kwargs, self.model.config.video_token_id, int(videos.shape[0]), native, pruned)

    def _rewrite_images(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Each image's run shrunk from the processor's count to this packing's (images have their own counts)."""
        input_ids, image_sizes = kwargs.get("input_ids"), kwargs.get("image_sizes")
        if input_ids is None:
            raise EvoPruneError("a pruned LLaVA needs input_ids with its pixels (inputs_embeds cannot be rewritten)")
        if image_sizes is None:
            raise EvoPruneError(
                "a pruned LLaVA-OneVision needs image_sizes with pixel_values: pass the processor's output as it is"
            )
        tiled = _tiled(kwargs.get("batch_num_images"), len(image_sizes))
        native = [native_image_tokens(self.model, size, tiled=t) for size, t in zip(image_sizes, tiled, strict=True)]
        pruned = [self.image_tokens(size, tiled=t) for size, t in zip(image_sizes, tiled, strict=True)]
        token_id, mask = self.model.config.image_token_id, kwargs.get("attention_mask")
        if native == pruned:
            return kwargs
        if not runs_hold(input_ids, image_token_id=token_id, counts=native, attention_mask=mask) and runs_hold(
            input_ids, image_token_id=token_id, counts=pruned, attention_mask=mask
        ):
            return kwargs  # already rewritten (a prompt passed on by the prepared generate)
        try:
            rewritten = rewrite_image_runs(
                input_ids,
                image_token_id=token_id,
                native=native,
                pruned=pruned,
                pad_token_id=_pad_token_id(self.model),
                attention_mask=mask,
                labels=kwargs.get("labels"),
                padding_side=self.padding_side,
            )
        except ValueError as error:
            raise EvoPruneError(f"{error}; expected image runs of {native} tokens for these image_sizes") from error
        return _with_rewritten(kwargs, rewritten)


OnevisionVideoPruning = OnevisionPruning
"""The former name of :class:`OnevisionPruning` (it took videos only)."""


def prepare_onevision(
    model: LlavaOnevisionForConditionalGeneration, schedule: Schedule, *, padding_side: PaddingSide | None = None
) -> OnevisionPruning:
    """Apply ``schedule`` to every image tile and video frame of a LLaVA-OneVision model and rewrite its prompts.

    Args:
        model: a ``LlavaOnevisionForConditionalGeneration`` (SigLIP tower; LLaVA-Video uses the same class).
        schedule: a per-tile (and per-frame) plan over the vision layers that run and the tower's patch tokens (729 at
            384 px).
        padding_side: where to pad rows when the attention mask shows no padding; None for the left.

    Returns:
        A handle; use it as a context manager or call ``remove()``. While it holds, ``model(**inputs)`` and
        ``model.generate(**inputs)`` take the processor's outputs unchanged (``pixel_values`` with ``image_sizes``
        and ``batch_num_images``, ``pixel_values_videos``, or both).

    Raises:
        UnsupportedModelError: not a LLaVA-OneVision model, or several feature layers.
        ScheduleError: the schedule does not fit the layers that run or the tower's tokens.
        EvoPruneError: a schedule is already applied to this model.

    Usage (``processor`` is the model's ``LlavaOnevisionProcessor``)::

        with prepare_onevision(model, schedule):
            output = model.generate(**processor(images=image, text=prompt, return_tensors="pt"))
    """
    if not isinstance(model, LlavaOnevisionForConditionalGeneration):
        raise UnsupportedModelError(
            f"prepare_onevision takes a LlavaOnevisionForConditionalGeneration, got {type(model).__name__}"
        )
    return OnevisionPruning(model, schedule, padding_side)


def prepare_onevision_video(
    model: LlavaOnevisionForConditionalGeneration, schedule: Schedule, *, padding_side: PaddingSide | None = None
) -> OnevisionPruning:
    """:func:`prepare_onevision` under its former name (it took videos only; the prepared model takes both)."""
    return prepare_onevision(model, schedule, padding_side=padding_side)


def _height_width(image_size: ImageSize) -> tuple[int, int]:
    values = image_size.tolist() if isinstance(image_size, torch.Tensor) else list(image_size)
    height, width = (int(value) for value in values)
    return height, width


def _tiled(batch_num_images: Any, images: int) -> list[bool]:
    """Per image, whether the processor tiled it: only images alone in their prompt are (the model's rule)."""
    if batch_num_images is None:
        return [True] * images
    counts = [int(n) for n in batch_num_images]
    tiled = [n == 1 for n in counts for _ in range(n)]
    if len(tiled) != images:
        raise EvoPruneError(
            f"batch_num_images {counts} adds up to {len(tiled)} images but image_sizes has {images}: pass the "
            "processor's output as it is"
        )
    return tiled


def _no_pooling(self: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Merged frames are no grid: their per-frame budget replaces the native 2x2 pooling."""
    return features


def _pack_tiles(
    self: nn.Module,
    image_features: Sequence[torch.Tensor],
    image_sizes: torch.Tensor,
    image_newline: torch.Tensor | None = None,
    vision_aspect_ratio: str = "anyres_max_9",
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``LlavaOnevisionModel.pack_image_features`` for merged tiles (the module's notes): per image, its base tile's
    tokens, then each row of tiles left to right followed by ``image_newline``; an untiled image, then a newline.
    ``vision_aspect_ratio`` is taken and unused: the per-tile budget replaces the anyres_max downsampling."""
    packed, lengths = [], []
    for features, size in zip(image_features, image_sizes, strict=True):
        newline = None if image_newline is None else image_newline.to(features.device, features.dtype)
        tokens, dim = features.shape[1:]
        if features.shape[0] > 1:
            rows, cols = image_tile_grid(self, size)
            if features.shape[0] != 1 + rows * cols:
                raise EvoPruneError(
                    f"an image of size {_height_width(size)} came with {features.shape[0] - 1} tiles, but the model's "
                    f"image_grid_pinpoints split it into {rows}x{cols}: use the processor made for this model"
                )
            grid = features[1:].reshape(rows, cols * tokens, dim)  # tile row by tile row, tiles left to right
            if newline is not None:
                grid = torch.cat([grid, newline.expand(rows, 1, dim)], dim=1)
            image = torch.cat([features[0], grid.flatten(0, 1)])
        else:
            image = features[0] if newline is None else torch.cat([features[0], newline[None]])
        packed.append(image)
        lengths.append(image.shape[0])
    device = image_features[0].device if len(image_features) else None
    return packed, torch.tensor(lengths, dtype=torch.long, device=device)
