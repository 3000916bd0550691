"""Prompt rewriting with one native and pruned count per image (LLaVA-OneVision: each image has its own tile grid)."""

from __future__ import annotations

import pytest
import torch

from tuner.mllm import IGNORE_INDEX, image_runs, rewrite_image_runs, runs_hold

IMAGE, PAD = 9, 0


def runs_of(ids: torch.Tensor, mask: torch.Tensor | None = None) -> list[list[int]]:
    rows = ids if mask is None else [row[m.bool()] for row, m in zip(ids, mask, strict=True)]
    return [[length for _, length in image_runs(row, IMAGE)] for row in rows]


def test_each_image_gets_its_own_count_text_labels_and_padding_kept() -> None:
    # Row 0: one image of 6 tokens; row 1: images of 4 and 3 tokens with text between; left padding.
    ids = torch.tensor([[PAD, PAD, PAD, 1] + [IMAGE] * 6 + [2], [1] + [IMAGE] * 4 + [3] + [IMAGE] * 3 + [4, 5]])
    mask = (ids != PAD).long()
    labels = torch.where(ids == IMAGE, IGNORE_INDEX, ids)
    labels[1, 1] = 77  # a labelled image position: kept when its position is kept
    out = rewrite_image_runs(
        ids, image_token_id=IMAGE, native=[6, 4, 3], pruned=[2, 1, 5], pad_token_id=PAD, attention_mask=mask,
        labels=labels,
    )  # fmt: skip
    assert out.attention_mask is not None and out.labels is not None
    assert runs_of(out.input_ids, out.attention_mask) == [[2], [1, 5]]
    assert out.input_ids.tolist() == [
        [PAD] * 6 + [1, IMAGE, IMAGE, 2],
        [1, IMAGE, 3] + [IMAGE] * 5 + [4, 5],
    ]
    assert out.attention_mask.tolist() == [[0] * 6 + [1] * 4, [1] * 10]
    # Cut runs keep their first labels; a run that grew repeats its first label; new padding is ignored.
    assert out.labels.tolist() == [
        [IGNORE_INDEX] * 6 + [1, IGNORE_INDEX, IGNORE_INDEX, 2],
        [1, 77, 3] + [IGNORE_INDEX] * 5 + [4, 5],
    ]
    assert out.images_per_row == [1, 2]


def test_adjacent_images_share_a_run_and_right_padding_stays_right() -> None:
    ids = torch.tensor([[1] + [IMAGE] * 10 + [2, PAD], [1, 2] + [IMAGE] * 3 + [3] * 8])
    mask = torch.tensor([[1] * 12 + [0], [1] * 13])
    out = rewrite_image_runs(ids, image_token_id=IMAGE, native=[4, 6, 3], pruned=[2, 3, 1], pad_token_id=PAD,
                             attention_mask=mask)  # fmt: skip
    assert out.attention_mask is not None
    assert runs_of(out.input_ids, out.attention_mask) == [[5], [1]]  # 4 + 6 -> 2 + 3 in one run
    assert out.attention_mask[:, 0].tolist() == [1, 1] and out.attention_mask[0, -1] == 0
    assert out.images_per_row == [2, 1]


def test_the_single_count_call_is_unchanged() -> None:
    ids = torch.tensor([[7] + [IMAGE] * 8 + [8]])
    one = rewrite_image_runs(ids, image_token_id=IMAGE, native=4, pruned=1, pad_token_id=PAD)
    each = rewrite_image_runs(ids, image_token_id=IMAGE, native=[4, 4], pruned=[1, 1], pad_token_id=PAD)
    assert one.input_ids.tolist() == each.input_ids.tolist() == [[7, IMAGE, IMAGE, 8]]


def test_runs_hold_tells_native_from_rewritten_prompts() -> None:
    ids = torch.tensor([[1] + [IMAGE] * 6 + [2, 2], [1] + [IMAGE] * 4 + [3] + [IMAGE] * 3])
    assert runs_hold(ids, image_token_id=IMAGE, counts=[6, 4, 3])
    assert not runs_hold(ids, image_token_id=IMAGE, counts=[6, 4])  # an image too few
    assert not runs_hold(ids, image_token_id=IMAGE, counts=[6, 4, 3, 1])  # an image too many
    assert not runs_hold(ids, image_token_id=IMAGE, counts=[2, 1, 5])
    rewritten = rewrite_image_runs(ids, image_token_id=IMAGE, native=[6, 4, 3], pruned=[2, 1, 5], pad_token_id=PAD)
    assert runs_hold(
        rewritten.input_ids, image_token_id=IMAGE, counts=[2, 1, 5], attention_mask=rewritten.attention_mask
    )
    # Padding is not read as image tokens even when the pad id is the image id.
    padded = torch.tensor([[IMAGE, 1, IMAGE, IMAGE]])
    assert runs_hold(padded, image_token_id=IMAGE, counts=[2], attention_mask=torch.tensor([[0, 1, 1, 1]]))


@pytest.mark.parametrize(
    ("native", "pruned", "message"),
    [
        ([5, 4, 3], [1, 1, 1], "run of 6 image tokens where image 0 of the batch has 5"),
        ([6, 4], [1, 1], "run of 3 image tokens where image 2 of the batch is missing"),
        ([6, 4, 3, 2], [1, 1, 1, 1], "runs for 3 images but 4 were given"),
        ([6, 4, 3], [1, 1], "3 native counts but 2 pruned counts"),
        ([6, 4, 3], 1, "of one kind"),
        ([6, 4, 3], [1, 0, 1], "1 or more"),
    ],
)
def test_counts_that_do_not_fit_the_prompt_are_refused(native: list[int], pruned: object, message: str) -> None:
    ids = torch.tensor([[1] + [IMAGE] * 6 + [2, 2], [1] + [IMAGE] * 4 + [3] + [IMAGE] * 3])
    with pytest.raises(ValueError, match=message):
        rewrite_image_runs(ids, image_token_id=IMAGE, native=native, pruned=pruned, pad_token_id=PAD)  # type: ignore[arg-type]
