"""Deterministic digit scenes for the offline demo task.

Real handwritten digits from scikit-learn's bundled ``load_digits()`` (1797 images of 8x8 pixels, 10 classes) are
upscaled and placed at a random position and scale into a larger noisy scene, so that most patch tokens of the vision
encoder see only background: the high-resolution case that token merging is for.

The 1797 digits are split once, stratified by label with a fixed seed, into a disjoint ``train`` pool (about 70%) and
``eval`` pool (about 30%). Training only ever sees train-pool digits; every accuracy reported for the demo model is
measured on eval-pool digits.

Rendering is deterministic: :func:`render_scenes` draws each scene's layout and noise from a generator seeded by
``(seed, digit_index)``, so a digit renders the same way whatever subset it is rendered with. This lets an evaluator
draw a stratified calibration subset and a disjoint held-out slice from :func:`eval_pool` and render each reproducibly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DIGIT_SCALE_RANGE",
    "EVAL_FRACTION",
    "NUM_CLASSES",
    "SCENE_SIZE",
    "SPLIT_SEED",
    "SceneLayout",
    "digit_images",
    "eval_pool",
    "make_scenes",
    "pool",
    "render_scenes",
    "render_scenes_with_layouts",
    "train_pool",
]

SCENE_SIZE: int = 64
"""Height and width of a scene in pixels."""

DIGIT_SCALE_RANGE: tuple[int, int] = (16, 24)
"""Inclusive range of the side length, in pixels, that an 8x8 digit is upscaled to."""

NUM_CLASSES: int = 10
SPLIT_SEED: int = 0
EVAL_FRACTION: float = 0.3

PoolName = Literal["train", "eval"]


@dataclass(frozen=True)
class SceneLayout:
    """Where a digit was placed in a scene.

    Attributes:
        top: Row of the digit's top-left pixel.
        left: Column of the digit's top-left pixel.
        size: Side length of the upscaled digit in pixels.
    """

    top: int
    left: int
    size: int


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (np.asarray(data.images, dtype=np.float32) / 16.0).clip(0.0, 1.0)
    labels = np.asarray(data.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """Return all 1797 digits of ``sklearn.datasets.load_digits()``.

    Returns:
        ``(images, labels)``: float32 ``[1797, 8, 8]`` in ``[0, 1]`` and int64 ``[1797]`` (read-only arrays).
    """
    return _digits()


@lru_cache(maxsize=1)
def _split() -> tuple[np.ndarray, np.ndarray]:
    _, labels = _digits()
    rng = np.random.default_rng(SPLIT_SEED)
    train_parts: list[np.ndarray] = []
    eval_parts: list[np.ndarray] = []
    for label in range(NUM_CLASSES):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        n_eval = int(round(EVAL_FRACTION * len(members)))
        eval_parts.append(members[:n_eval])
        train_parts.append(members[n_eval:])
    train = np.sort(np.concatenate(train_parts)).astype(np.int64)
    evaluation = np.sort(np.concatenate(eval_parts)).astype(np.int64)
    train.setflags(write=False)
    evaluation.setflags(write=False)
    return train, evaluation


def pool(name: PoolName) -> tuple[np.ndarray, np.ndarray]:
    """Return the digit indices and labels of one pool.

    Args:
        name: ``"train"`` or ``"eval"``. The two pools are disjoint and stratified by label (fixed seed).

    Returns:
        ``(indices, labels)``: sorted int64 indices into ``load_digits()`` and their int64 labels.

    Raises:
        ValueError: If ``name`` is not a known pool.
    """
    train, evaluation = _split()
    if name == "train":
        indices = train
    elif name == "eval":
        indices = evaluation
    else:
        raise ValueError(f"unknown pool {name!r}; expected 'train' or 'eval'")
    _, labels = _digits()
    return indices.copy(), labels[indices].copy()


def train_pool() -> tuple[np.ndarray, np.ndarray]:
    """Return ``(indices, labels)`` of the training pool (about 70% of the digits)."""
    return pool("train")


def eval_pool() -> tuple[np.ndarray, np.ndarray]:
    """Return ``(indices, labels)`` of the evaluation pool (about 30% of the digits, never used in training)."""
    return pool("eval")


@cache
def _resize_matrix(size: int) -> np.ndarray:
    """Matrix ``[size, 8]`` that bilinearly upscales one axis of an 8x8 digit (same as ``F.interpolate``)."""
    eye = torch.eye(8, dtype=torch.float32)[:, None, :]  # [8, 1, 8]: each basis vector as a 1-D signal
    columns = F.interpolate(eye, size=size, mode="linear")[:, 0, :]  # [8, size]
    matrix = columns.T.contiguous().numpy()
    matrix.setflags(write=False)
    return matrix


def _render_one(digit: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, SceneLayout]:
    """Render one scene as float32 ``[3, H, W]`` in ``[0, 1]``."""
    h = w = SCENE_SIZE
    lo, hi = DIGIT_SCALE_RANGE
    size = int(rng.integers(lo, hi + 1))
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))

    # Background: a dim base level, a gentle linear gradient and per-channel pixel noise.
    base = rng.uniform(0.05, 0.3)
    gy, gx = rng.uniform(-0.1, 0.1, size=2)
    ys = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
    xs = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]
    background = base + gy * ys + gx * xs
    noise_sigma = rng.uniform(0.03, 0.1)
    scene = background[None, :, :] + rng.normal(0.0, noise_sigma, size=(3, h, w)).astype(np.float32)

    # Digit: bilinear upscale, alpha-blended with a random ink brightness and a slight tint per channel.
    resize = _resize_matrix(size)
    alpha = np.clip(resize @ digit @ resize.T, 0.0, 1.0)
    ink = rng.uniform(0.75, 1.0) * rng.uniform(0.85, 1.0, size=3).astype(np.float32)
    patch = scene[:, top : top + size, left : left + size]
    scene[:, top : top + size, left : left + size] = patch * (1.0 - alpha) + ink[:, None, None] * alpha
    return np.clip(scene, 0.0, 1.0).astype(np.float32), SceneLayout(top=top, left=left, size=size)


def _render(digit_indices: np.ndarray, rngs: list[np.random.Generator]) -> tuple[torch.Tensor, list[SceneLayout]]:
    images, _ = _digits()
    out = np.empty((len(digit_indices), 3, SCENE_SIZE, SCENE_SIZE), dtype=np.float32)
    layouts: list[SceneLayout] = []
    for k, (index, rng) in enumerate(zip(digit_indices, rngs, strict=True)):
        out[k], layout = _render_one(images[int(index)], rng)
        layouts.append(layout)
    # Normalise to [-1, 1] (mean 0.5, std 0.5 per channel), the usual ViT preprocessing.
    pixel_values = torch.from_numpy(out).sub_(0.5).div_(0.5)
    return pixel_values, layouts


def _as_indices(digit_indices: np.ndarray | list[int] | torch.Tensor) -> np.ndarray:
    indices = np.asarray(digit_indices, dtype=np.int64).reshape(-1)
    n_digits = len(_digits()[1])
    if indices.size and (indices.min() < 0 or indices.max() >= n_digits):
        raise ValueError(f"digit indices must lie in [0, {n_digits})")
    return indices


def render_scenes_with_layouts(
    digit_indices: np.ndarray | list[int] | torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[SceneLayout]]:
    """Render one scene per digit index and also return where each digit was placed.

    Same as :func:`render_scenes`, plus the layouts.

    Args:
        digit_indices: Indices into ``load_digits()``.
        seed: Rendering seed.

    Returns:
        ``(pixel_values, labels, digit_index, layouts)``.
    """
    indices = _as_indices(digit_indices)
    rngs = [np.random.default_rng([int(seed), int(index)]) for index in indices]
    pixel_values, layouts = _render(indices, rngs)
    labels = torch.from_numpy(_digits()[1][indices].copy())
    return pixel_values, labels, torch.from_numpy(indices.copy()), layouts


def render_scenes(
    digit_indices: np.ndarray | list[int] | torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render one scene per digit index, deterministically.

    Each scene depends only on ``(seed, digit_index)``: the same digit renders identically whatever other digits are
    rendered with it (and a digit listed twice renders twice the same way).

    Args:
        digit_indices: Indices into ``load_digits()`` (e.g. a subset of :func:`eval_pool`'s indices).
        seed: Rendering seed.

    Returns:
        ``(pixel_values, labels, digit_index)``: float32 ``[n, 3, SCENE_SIZE, SCENE_SIZE]`` normalised to ``[-1, 1]``,
        int64 ``[n]`` labels and int64 ``[n]`` digit indices.

    Raises:
        ValueError: If an index is outside ``[0, 1797)``.
    """
    pixel_values, labels, index, _ = render_scenes_with_layouts(digit_indices, seed)
    return pixel_values, labels, index


def make_scenes(pool: PoolName, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``n`` scenes from one pool, deterministically.

    Digits are drawn by cycling through shuffled passes over the pool (so every digit appears about equally often),
    and each scene gets its own random placement, scale, background and noise.

    Args:
        pool: ``"train"`` or ``"eval"``.
        n: Number of scenes.
        seed: Seed for the digit draw and the rendering.

    Returns:
        ``(pixel_values, labels, digit_index)``: float32 ``[n, 3, SCENE_SIZE, SCENE_SIZE]`` normalised to ``[-1, 1]``,
        int64 ``[n]`` labels and int64 ``[n]`` digit indices.

    Raises:
        ValueError: If ``pool`` is unknown or ``n`` is negative.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    indices_pool, _ = _pool_checked(pool)
    rng = np.random.default_rng([int(seed), 7919])
    passes = -(-n // len(indices_pool)) if n else 0
    drawn = np.concatenate([rng.permutation(indices_pool) for _ in range(passes)])[:n] if passes else np.empty(0, int)
    drawn = drawn.astype(np.int64)
    child_seeds = rng.integers(0, 2**63 - 1, size=n)
    rngs = [np.random.default_rng(int(s)) for s in child_seeds]
    pixel_values, _ = _render(drawn, rngs)
    labels = torch.from_numpy(_digits()[1][drawn].copy())
    return pixel_values, labels, torch.from_numpy(drawn.copy())


def _pool_checked(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name not in ("train", "eval"):
        raise ValueError(f"unknown pool {name!r}; expected 'train' or 'eval'")
    return pool(name)  # type: ignore[arg-type]
