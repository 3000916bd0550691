"""Rewrite a prompt's image-token runs to the pruned count: pure tensor functions, no model knowledge.

A multimodal LLM's processor expands each image placeholder into a run of ``native`` image tokens, and the model
checks that ``input_ids`` holds exactly as many image tokens as the vision tower returns features. After in-encoder
merging each image yields ``pruned`` features, so each run must shrink to ``pruned`` tokens; the text around it, its
order and the padding convention of the batch stay as they were.

The counts are either one pair for every image (LLaVA-1.5: every image has the same size) or one pair per image, in
the order the images appear in the batch (LLaVA-OneVision: each image's tile grid depends on its size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["IGNORE_INDEX", "RewrittenPrompt", "image_runs", "rewrite_image_runs", "runs_hold"]

IGNORE_INDEX = -100
"""Label of a position the loss ignores (the convention of transformers' causal LMs)."""

PaddingSide = Literal["left", "right"]


@dataclass(frozen=True)
class RewrittenPrompt:
    """A batch whose image runs were shrunk to the pruned count.

    Attributes:
        input_ids: ``[B, L']`` token ids, re-padded on the batch's padding side.
        attention_mask: ``[B, L']`` 1 for real tokens, 0 for padding (None when none was given).
        labels: ``[B, L']`` labels with the kept image positions' labels and ``IGNORE_INDEX`` on new padding (None
            when none were given).
        images_per_row: how many images each row holds.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor | None
    images_per_row: list[int]


def image_runs(row: torch.Tensor, image_token_id: int) -> list[tuple[int, int]]:
    """``(start, length)`` of each maximal run of ``image_token_id`` in a 1-D row of token ids.

    Example:
        >>> image_runs(torch.tensor([5, 9, 9, 9, 6, 9, 9]), 9)
        [(1, 3), (5, 2)]
    """
    is_image = (row == image_token_id).to(torch.int8)
    if not bool(is_image.any()):
        return []
    edges = torch.diff(is_image, prepend=is_image.new_zeros(1), append=is_image.new_zeros(1))
    starts = torch.nonzero(edges == 1).flatten().tolist()
    ends = torch.nonzero(edges == -1).flatten().tolist()
    return [(start, end - start) for start, end in zip(starts, ends, strict=True)]


def rewrite_image_runs(
    input_ids: torch.Tensor,
    *,
    image_token_id: int,
    native: int | Sequence[int],
    pruned: int | Sequence[int],
    pad_token_id: int,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    padding_side: PaddingSide | None = None,
) -> RewrittenPrompt:
    """Shrink every image's run of ``native`` image tokens to ``pruned`` tokens, row by row.

    With one count each, a run of ``k * native`` tokens is ``k`` adjacent images and becomes ``k * pruned`` tokens.
    With one count per image (sequences of equal length, images in the order they appear in the batch: row by row,
    left to right, as the model scatters their features), each run is the next images whose native counts add up to
    its length, and becomes the sum of their pruned counts. A run is cut to its first positions (their mask and label
    values with them), or, where the pruned count is the larger (a merge budget above a model's own pooled count),
    extended with copies of its first position. Rows are then re-padded to the longest: on the side the attention mask
    shows padding on, else ``padding_side``, else the left (what generation needs).

    Args:
        input_ids: ``[B, L]`` token ids as the processor made them.
        image_token_id: the id of the image placeholder token.
        native: image tokens per image in the prompt (the model's own feature count): one count for every image, or
            one per image.
        pruned: features per image after merging (usually fewer; more is allowed), of the same kind as ``native``.
        pad_token_id: id written on new padding positions.
        attention_mask: ``[B, L]`` or None.
        labels: ``[B, L]`` or None.
        padding_side: padding side when the mask does not tell (no row is padded); None for the left.

    Returns:
        The rewritten batch (see :class:`RewrittenPrompt`).

    Raises:
        ValueError: a run whose length is not a multiple of ``native``, or not the native counts of the next images
            (a prompt not made for this model's image sizes), per-image counts for more or fewer images than the
            prompt holds, shapes that disagree, or a count below 1.

    Example:
        >>> ids = torch.tensor([[0, 7, 9, 9, 9, 9, 8], [7, 9, 9, 9, 9, 8, 8]])
        >>> mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
        >>> out = rewrite_image_runs(ids, image_token_id=9, native=4, pruned=2, pad_token_id=0, attention_mask=mask)
        >>> out.input_ids.tolist(), out.attention_mask.tolist()
        ([[0, 7, 9, 9, 8], [7, 9, 9, 8, 8]], [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    for name, tensor in (("attention_mask", attention_mask), ("labels", labels)):
        if tensor is not None and tensor.shape != input_ids.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, input_ids {tuple(input_ids.shape)}")
    per_image = _per_image_counts(native, pruned)
    side = _padding_side(attention_mask, padding_side)
    rows_ids, rows_mask, rows_labels, images = [], [], [], []
    taken = 0  # images of the batch assigned to runs so far (per-image counts)
    for row in range(input_ids.shape[0]):
        # Only real tokens are rewritten; the row is padded again below.
        real = attention_mask[row].bool() if attention_mask is not None else torch.ones_like(input_ids[row]).bool()
        ids = input_ids[row][real]
        mask = attention_mask[row][real] if attention_mask is not None else None
        row_labels = labels[row][real] if labels is not None else None
        pieces: list[tuple[int, int, int]] = []  # (start, length, new length) of each run
        row_images = 0
        for start, length in image_runs(ids, image_token_id):
            if per_image is None:
                assert isinstance(native, int) and isinstance(pruned, int)
                if length % native:
                    raise ValueError(
                        f"row {row} has a run of {length} image tokens, not a multiple of {native} per image: the "
                        "prompt was not made by this model's processor (another image size?)"
                    )
                count, new_length = length // native, (length // native) * pruned
            else:
                found = _images_in_run(per_image[0], taken, length)
                if found is None:
                    expected = per_image[0][taken] if taken < len(per_image[0]) else None
                    raise ValueError(
                        f"row {row} has a run of {length} image tokens where image {taken} of the batch "
                        + (f"has {expected}" if expected is not None else "is missing (no images left)")
                        + ": the prompt was not made by this model's processor for these images (other sizes?)"
                    )
                count, new_length = found, sum(per_image[1][taken : taken + found])
                taken += count
            pieces.append((start, length, new_length))
            row_images += count
        images.append(row_images)
        rows_ids.append(_resize_runs(ids, pieces))
        if mask is not None:
            rows_mask.append(_resize_runs(mask, pieces))
        if row_labels is not None:
            rows_labels.append(_resize_runs(row_labels, pieces))
    if per_image is not None and taken != len(per_image[0]):
        raise ValueError(
            f"the prompts hold runs for {taken} images but {len(per_image[0])} were given: give one image per "
            "placeholder, in the order the placeholders appear"
        )
    width = max(ids.shape[0] for ids in rows_ids)
    new_ids = _pad(rows_ids, width, pad_token_id, side)
    new_mask = _pad(rows_mask, width, 0, side) if attention_mask is not None else None
    new_labels = _pad(rows_labels, width, IGNORE_INDEX, side) if labels is not None else None
    if attention_mask is None and any(ids.shape[0] < width for ids in rows_ids):
        # Rows of different image counts now differ in length: the padding must be masked.
        new_mask = _pad([torch.ones_like(ids) for ids in rows_ids], width, 0, side)
    return RewrittenPrompt(new_ids, new_mask, new_labels, images)


def runs_hold(
    input_ids: torch.Tensor,
    *,
    image_token_id: int,
    counts: Sequence[int],
    attention_mask: torch.Tensor | None = None,
) -> bool:
    """Whether the prompts' image runs are exactly ``counts`` tokens per image (images in batch order, adjacent
    images in one run), with no image left over; e.g. to tell a prompt already rewritten to the pruned counts.

    Example:
        >>> ids = torch.tensor([[7, 9, 9, 8, 9, 9, 9], [9, 9, 9, 9, 9, 8, 8]])
        >>> runs_hold(ids, image_token_id=9, counts=[2, 3, 1, 4]), runs_hold(ids, image_token_id=9, counts=[2, 3, 4])
        (True, False)
    """
    taken = 0
    for row in range(input_ids.shape[0]):
        ids = input_ids[row] if attention_mask is None else input_ids[row][attention_mask[row].bool()]
        for _, length in image_runs(ids, image_token_id):
            count = _images_in_run(counts, taken, length)
            if count is None:
                return False
            taken += count
    return taken == len(counts)


def _per_image_counts(native: int | Sequence[int], pruned: int | Sequence[int]) -> tuple[list[int], list[int]] | None:
    """Per-image ``(native, pruned)`` lists, or None for one count each; checks both are of one kind and >= 1."""
    if isinstance(native, int) and isinstance(pruned, int):
        if native < 1 or pruned < 1:
            raise ValueError(f"native and pruned counts must be 1 or more, got {native} and {pruned}")
        return None
    if isinstance(native, int) or isinstance(pruned, int):
        raise ValueError("give native and pruned counts of one kind: one count each, or one per image each")
    natives, pruneds = [int(n) for n in native], [int(p) for p in pruned]
    if len(natives) != len(pruneds):
        raise ValueError(f"{len(natives)} native counts but {len(pruneds)} pruned counts: give one pair per image")
    if any(n < 1 for n in natives + pruneds):
        raise ValueError(f"native and pruned counts must be 1 or more, got {natives} and {pruneds}")
    return natives, pruneds


def _images_in_run(counts: Sequence[int], first: int, length: int) -> int | None:
    """How many images from index ``first`` a run of ``length`` tokens holds (their counts add up to it), or None."""
    total, index = 0, first
    while total < length and index < len(counts):
        total += counts[index]
        index += 1
    return index - first if total == length else None


def _resize_runs(values: torch.Tensor, pieces: list[tuple[int, int, int]]) -> torch.Tensor:
    """``values`` with each run ``(start, length, new_length)`` cut to, or extended (its first value repeated) to,
    ``new_length`` positions; everything between runs unchanged."""
    parts, cursor = [], 0
    for start, length, new_length in pieces:
        parts.append(values[cursor:start])
        run = values[start : start + length]
        parts.append(run[:new_length] if new_length <= length else run[:1].expand(new_length))
        cursor = start + length
    parts.append(values[cursor:])
    return torch.cat(parts)


def _padding_side(attention_mask: torch.Tensor | None, fallback: PaddingSide | None) -> PaddingSide:
    if attention_mask is not None and attention_mask.numel():
        if bool((attention_mask[:, 0] == 0).any()):
            return "left"
        if bool((attention_mask[:, -1] == 0).any()):
            return "right"
    return fallback or "left"


def _pad(rows: list[torch.Tensor], width: int, value: int, side: PaddingSide) -> torch.Tensor:
    padded = []
    for row in rows:
        filler = row.new_full((width - row.shape[0],), value)
        padded.append(torch.cat([filler, row]) if side == "left" else torch.cat([row, filler]))
    return torch.stack(padded)
