"""Deterministic multi-digit scenes and questions about them: the offline visual-question-answering demo task.

A scene is a 64x64 image (the demo's :data:`~tuner.demo.scenes.SCENE_SIZE`, so 64 patch tokens of 8 px) split into a
2x2 grid of cells; 1 to 4 digits with distinct labels, real handwritten digits from one pool of
:func:`tuner.demo.scenes.pool`, sit in distinct cells at a random offset and scale, on the demo's noisy background.

Three kinds of question, each in the schema of the LLaVA evaluators (``question``, ``choices``, ``answer``):

- ``position``: "What digit is in the top left?" with 4 digit options (the other digits of the scene are always among
  the wrong ones, so the answer needs the digit's place, not just its presence);
- ``count``: "How many digits are there?" with the options 1, 2, 3, 4;
- ``presence``: "Is there a 7?" answered Yes or No.

Item ``index`` of a pool depends only on ``(pool, index, seed)``: the same index renders the same scene and asks the
same question whatever subset it is drawn with. The kind cycles with the index (``index % 3``) and the answer is
balanced over consecutive items of a kind (the right letter, the count and yes/no cycle), so any run of indices is
balanced by kind and by answer. Training uses train-pool digits only, evaluation eval-pool digits only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from tuner.demo.scenes import DIGIT_SCALE_RANGE, NUM_CLASSES, SCENE_SIZE, digit_images, pool

__all__ = [
    "CELLS",
    "COUNT_CHOICES",
    "GRID",
    "KINDS",
    "POSITION_OPTIONS",
    "VqaItem",
    "VqaScene",
    "ask",
    "make_scene",
    "render_scene",
    "scene_pixels",
    "vqa_dataset",
    "vqa_item",
    "vqa_items",
]

Kind = Literal["position", "count", "presence"]
PoolName = Literal["train", "eval"]

KINDS: tuple[Kind, ...] = ("position", "count", "presence")
"""Question kinds; item ``index`` asks ``KINDS[index % 3]``."""

GRID: int = 2
"""Cells per side: a 2x2 grid of 32 px cells (a digit of 16-24 px fits in one)."""

CELLS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
"""Cell names in raster order (cell ``r * GRID + c``)."""

COUNT_CHOICES: tuple[str, ...] = ("1", "2", "3", "4")
"""Options of a count question, in this order."""

POSITION_OPTIONS: int = 4
"""Options of a position question (the right digit and 3 others)."""

YES_NO: tuple[str, str] = ("Yes", "No")

_POOL_TAG = {"train": 1, "eval": 2}
_RENDER_TAG = 3
_QUESTION_TAG = 5


@dataclass(frozen=True)
class VqaScene:
    """What a scene holds.

    Attributes:
        labels: the digits' labels (distinct), one per occupied cell.
        cells: the occupied cells (indices into :data:`CELLS`), aligned with ``labels``.
        digit_indices: the digits' indices into ``load_digits()``, aligned with ``labels``.
        key: the rendering key ``(seed, pool tag, index)``: the same key renders the same pixels.
    """

    labels: tuple[int, ...]
    cells: tuple[int, ...]
    digit_indices: tuple[int, ...]
    key: tuple[int, int, int]


@dataclass(frozen=True)
class VqaItem:
    """A question about a scene.

    Attributes:
        scene: the scene.
        kind: ``"position"``, ``"count"`` or ``"presence"``.
        question: the question's text.
        choices: the options, in order (``("Yes", "No")`` for presence).
        answer: index of the right option in ``choices``.
    """

    scene: VqaScene
    kind: Kind
    question: str
    choices: tuple[str, ...]
    answer: int


@cache
def _pool_by_label(name: PoolName) -> tuple[np.ndarray, ...]:
    indices, labels = pool(name)
    return tuple(indices[labels == label] for label in range(NUM_CLASSES))


def make_scene(
    name: PoolName, index: int, seed: int, count: int | None = None, rng: np.random.Generator | None = None
) -> VqaScene:
    """Draw a scene's digits and cells.

    Args:
        name: the pool its digits come from (``"train"`` or ``"eval"``).
        index: the item's index (any integer >= 0).
        seed: the seed.
        count: digits in the scene (1-4); None draws it.
        rng: where the draw comes from; None for a generator seeded by ``(seed, pool, index)``.

    Returns:
        The scene.

    Raises:
        ValueError: an unknown pool or a count outside 1-4.
    """
    if name not in _POOL_TAG:
        raise ValueError(f"unknown pool {name!r}; expected 'train' or 'eval'")
    if count is not None and not 1 <= count <= GRID * GRID:
        raise ValueError(f"count must be 1 to {GRID * GRID}, got {count}")
    key = (int(seed), _POOL_TAG[name], int(index))
    rng = np.random.default_rng(key) if rng is None else rng
    n = int(rng.integers(1, GRID * GRID + 1)) if count is None else count
    labels = tuple(int(label) for label in rng.choice(NUM_CLASSES, size=n, replace=False))
    cells = tuple(int(cell) for cell in rng.choice(GRID * GRID, size=n, replace=False))
    by_label = _pool_by_label(name)
    digits = tuple(int(rng.choice(by_label[label])) for label in labels)
    return VqaScene(labels, cells, digits, key)


@cache
def _resize_matrix(size: int) -> np.ndarray:
    """``[size, 8]``: bilinear upscaling of one axis of an 8x8 digit (as ``F.interpolate`` does)."""
    eye = torch.eye(8, dtype=torch.float32)[:, None, :]
    return F.interpolate(eye, size=size, mode="linear")[:, 0, :].T.contiguous().numpy()


def render_scene(scene: VqaScene) -> np.ndarray:
    """Render a scene as uint8 RGB ``[SCENE_SIZE, SCENE_SIZE, 3]`` (what an image file of it holds).

    The background is the demo's (a dim level, a gentle gradient, pixel noise); each digit is upscaled to 16-24 px
    and alpha-blended at a random offset inside its cell with a random ink. The pixels depend only on ``scene.key``
    and the scene's digits.
    """
    rng = np.random.default_rng([*scene.key, _RENDER_TAG])
    h = w = SCENE_SIZE
    base = rng.uniform(0.05, 0.3)
    gy, gx = rng.uniform(-0.1, 0.1, size=2)
    ys = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
    xs = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]
    noise_sigma = rng.uniform(0.03, 0.1)
    image = (base + gy * ys + gx * xs)[None] + rng.normal(0.0, noise_sigma, size=(3, h, w)).astype(np.float32)
    images, _ = digit_images()
    cell_size = SCENE_SIZE // GRID
    lo, hi = DIGIT_SCALE_RANGE
    for digit, cell in zip(scene.digit_indices, scene.cells, strict=True):
        size = int(rng.integers(lo, hi + 1))
        top = (cell // GRID) * cell_size + int(rng.integers(0, cell_size - size + 1))
        left = (cell % GRID) * cell_size + int(rng.integers(0, cell_size - size + 1))
        resize = _resize_matrix(size)
        alpha = np.clip(resize @ images[digit] @ resize.T, 0.0, 1.0)
        ink = rng.uniform(0.75, 1.0) * rng.uniform(0.85, 1.0, size=3).astype(np.float32)
        patch = image[:, top : top + size, left : left + size]
        image[:, top : top + size, left : left + size] = patch * (1.0 - alpha) + ink[:, None, None] * alpha
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)


def scene_pixels(scenes: list[VqaScene]) -> torch.Tensor:
    """Pixel values ``[n, 3, 64, 64]`` of rendered scenes, normalised as the demo's processor does (mean 0.5, std
    0.5 per channel after scaling by 1/255): what the model sees of an image file of the scene."""
    stacked = np.stack([render_scene(scene) for scene in scenes]).transpose(0, 3, 1, 2)
    return torch.from_numpy(stacked.astype(np.float32)).div_(255.0).sub_(0.5).div_(0.5)


def ask(scene: VqaScene, kind: Kind, rng: np.random.Generator, slot: int | None = None) -> VqaItem:
    """Ask a question of ``kind`` about ``scene``.

    Args:
        scene: the scene.
        kind: the question kind.
        rng: where the question's random parts come from (cell asked about, digit asked for, wrong options).
        slot: the answer to give, for balance: the right option's letter index for ``position``, yes (0) or no (1)
            for ``presence``; ignored for ``count`` (the scene's count decides); None draws it.

    Returns:
        The item.
    """
    if kind == "count":
        return VqaItem(scene, kind, "How many digits are there?", COUNT_CHOICES, len(scene.labels) - 1)
    if kind == "presence":
        yes = bool(rng.integers(0, 2) == 0) if slot is None else slot % 2 == 0
        present = list(scene.labels)
        absent = [label for label in range(NUM_CLASSES) if label not in present]
        digit = int(rng.choice(present if yes else absent))
        return VqaItem(scene, kind, f"Is there a {digit}?", YES_NO, 0 if yes else 1)
    which = int(rng.integers(0, len(scene.labels)))
    right = scene.labels[which]
    # The scene's other digits are always wrong options: naming the digit at a place needs the place.
    others = [label for label in scene.labels if label != right]
    rest = [label for label in range(NUM_CLASSES) if label not in scene.labels]
    wrong = others + [int(label) for label in rng.choice(rest, size=POSITION_OPTIONS - 1 - len(others), replace=False)]
    wrong = [wrong[i] for i in rng.permutation(len(wrong))]
    letter = int(rng.integers(0, POSITION_OPTIONS)) if slot is None else slot % POSITION_OPTIONS
    options = [*wrong[:letter], right, *wrong[letter:]]
    question = f"What digit is in the {CELLS[scene.cells[which]]}?"
    return VqaItem(scene, kind, question, tuple(str(option) for option in options), letter)


def vqa_item(name: PoolName, index: int, seed: int) -> VqaItem:
    """Item ``index`` of a pool: kind ``KINDS[index % 3]``, its answer balanced by ``index // 3``.

    Args:
        name: ``"train"`` or ``"eval"``.
        index: the item's index (>= 0).
        seed: the seed.

    Returns:
        The item; it depends only on ``(name, index, seed)``.

    Raises:
        ValueError: an unknown pool or a negative index.
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    kind = KINDS[index % len(KINDS)]
    slot = index // len(KINDS)
    count = slot % len(COUNT_CHOICES) + 1 if kind == "count" else None
    scene = make_scene(name, index, seed, count=count)
    return ask(scene, kind, np.random.default_rng([*scene.key, _QUESTION_TAG]), slot=slot)


def vqa_items(name: PoolName, count: int, seed: int, start: int = 0) -> list[VqaItem]:
    """Items ``start`` .. ``start + count - 1`` of a pool (see :func:`vqa_item`)."""
    return [vqa_item(name, index, seed) for index in range(start, start + count)]


def vqa_dataset(name: PoolName, count: int, seed: int) -> Any:
    """Items ``0 .. count - 1`` of a pool as a ``datasets.Dataset`` in the LLaVA evaluators' schema.

    Columns: ``image`` (a PNG-encoded 64x64 RGB image), ``question``, ``choices`` (a list: the digits, the counts, or
    Yes/No), ``answer`` (the right choice's text), ``kind`` and ``index``.

    Args:
        name: ``"train"`` or ``"eval"``.
        count: number of items.
        seed: the seed.

    Returns:
        A ``datasets.Dataset`` (in memory).
    """
    import datasets
    from PIL import Image

    items = vqa_items(name, count, seed)
    columns = {
        "image": [Image.fromarray(render_scene(item.scene)) for item in items],
        "question": [item.question for item in items],
        "choices": [list(item.choices) for item in items],
        "answer": [item.choices[item.answer] for item in items],
        "kind": [item.kind for item in items],
        "index": list(range(count)),
    }
    text = datasets.Value("string")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": text,
            "choices": datasets.Sequence(text),
            "answer": text,
            "kind": text,
            "index": datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_dict(columns, features=features)
