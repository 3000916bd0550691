"""Calibration subsets and held-out slices: seeded, stratified by label, disjoint, and sized with clear errors.

Taking the first N rows is not a sample (MME is ordered by category): every split
here is drawn with a fixed seed, by label where there are labels, and the held-out slice never shares an item with the
calibration subset, so it can validate what the search picked.

In both splits the calibration subset depends only on ``(labels, calib, seed)``, not on ``holdout``: changing the
held-out size does not change what a study was calibrated on.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, TypeVar

import numpy as np

from evaluators.base import EvaluatorError

__all__ = ["check_sizes", "empty_split", "pick_split", "random_split", "resolve_sizes", "stratified_split"]

T = TypeVar("T")


def check_sizes(calib: int, holdout: int, available: int) -> None:
    """Check that ``calib`` (>= 1) and ``holdout`` (>= 0) items fit in ``available``.

    Raises:
        EvaluatorError: a bad size, or more items asked for than there are; the message names the numbers.

    Example:
        >>> check_sizes(500, 300, 540)
        Traceback (most recent call last):
        ...
        tuner.errors.EvaluatorError: calib 500 and holdout 300 need 800 items; the dataset has 540; lower them
    """
    for name, value, minimum in (("calib", calib, 1), ("holdout", holdout, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise EvaluatorError(f"{name} must be an integer >= {minimum}, got {value!r}", param=name)
    if calib + holdout > available:
        raise EvaluatorError(
            f"calib {calib} and holdout {holdout} need {calib + holdout} items; the dataset has {available}; lower "
            "them",
            param=("calib", "holdout"),
        )


def resolve_sizes(
    calib: int | None, holdout: int | None, available: int, default_calib: int, default_holdout: int
) -> tuple[int, int]:
    """The calibration and held-out sizes to use: the given ones, else the defaults, shrunk to fit a small dataset.

    Only defaults shrink (an explicit size that does not fit is an error): with both defaults, a dataset smaller than
    their sum is split in two halves (the calibration subset gets the odd item); with one size given, the other
    default takes at most what is left.

    Args:
        calib: calibration items asked for, or None for the default.
        holdout: held-out items asked for, or None for the default.
        available: items in the dataset.
        default_calib: the evaluator's default calibration size.
        default_holdout: the evaluator's default held-out size.

    Returns:
        ``(calib, holdout)``.

    Raises:
        EvaluatorError: see :func:`check_sizes`.

    Example:
        >>> resolve_sizes(None, None, 1000, 256, 256), resolve_sizes(None, None, 9, 256, 256)
        ((256, 256), (5, 4))
        >>> resolve_sizes(100, None, 300, 256, 256)
        (100, 200)
    """
    if calib is None and holdout is None:
        if available < default_calib + default_holdout:
            calib = math.ceil(available / 2)
            holdout = available - calib
        else:
            calib, holdout = default_calib, default_holdout
    elif calib is None:
        calib = min(default_calib, max(1, available - holdout)) if isinstance(holdout, int) else default_calib
    elif holdout is None:
        holdout = min(default_holdout, max(0, available - calib)) if isinstance(calib, int) else default_holdout
    assert calib is not None and holdout is not None
    check_sizes(calib, holdout, available)
    return calib, holdout


def _apportion(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` split in proportion to integer ``weights`` by largest remainder (ties to the earlier group)."""
    weight_sum = sum(weights)
    if total == 0 or weight_sum == 0:
        return [0] * len(weights)
    # Integer arithmetic: quotas are exact, so the result never depends on float rounding.
    floors = [total * weight // weight_sum for weight in weights]
    remainders = [total * weight % weight_sum for weight in weights]
    leftover = total - sum(floors)
    for group in sorted(range(len(weights)), key=lambda g: (-remainders[g], g))[:leftover]:
        floors[group] += 1
    return floors


def stratified_split(labels: Sequence[Hashable], calib: int, holdout: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded, label-stratified, disjoint calibration and held-out positions.

    Each label gets its proportional share of ``calib`` (largest remainder, ties to the smaller label), drawn at random
    (seeded) from that label's items; the held-out slice is then apportioned the same way over the items left.

    Args:
        labels: one label per item (any sortable, hashable values, e.g. class ids).
        calib: calibration items (>= 1).
        holdout: held-out items (>= 0).
        seed: the random seed.

    Returns:
        ``(calib_positions, holdout_positions)``: sorted positions into ``labels``, disjoint.

    Raises:
        EvaluatorError: a bad size, or ``calib + holdout`` more than the items.

    Example:
        >>> labels = [0] * 6 + [1] * 4
        >>> calib, holdout = stratified_split(labels, calib=5, holdout=5, seed=0)
        >>> sorted(calib + holdout) == list(range(10)), [labels[p] for p in calib]
        (True, [0, 0, 0, 1, 1])
    """
    check_sizes(calib, holdout, len(labels))
    groups: dict[Hashable, list[int]] = {}
    for position, label in enumerate(labels):
        groups.setdefault(label, []).append(position)
    order: list[Any] = list(groups)
    try:
        order.sort()
    except TypeError:  # labels of mixed types: order them by their text, still deterministically
        order.sort(key=repr)
    rng = np.random.default_rng(seed)
    # One permutation per label, drawn in label order, so the draw depends only on the seed and the labels.
    shuffled = [[groups[label][i] for i in rng.permutation(len(groups[label]))] for label in order]
    sizes = [len(members) for members in shuffled]
    calib_counts = _apportion(calib, sizes)
    holdout_counts = _apportion(holdout, [size - taken for size, taken in zip(sizes, calib_counts, strict=True)])
    calib_positions: list[int] = []
    holdout_positions: list[int] = []
    for members, n_calib, n_holdout in zip(shuffled, calib_counts, holdout_counts, strict=True):
        calib_positions += members[:n_calib]
        holdout_positions += members[n_calib : n_calib + n_holdout]
    return sorted(calib_positions), sorted(holdout_positions)


def random_split(num_items: int, calib: int, holdout: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded, disjoint calibration and held-out positions for data without labels.

    Args:
        num_items: items in the dataset.
        calib: calibration items (>= 1).
        holdout: held-out items (>= 0).
        seed: the random seed.

    Returns:
        ``(calib_positions, holdout_positions)``: sorted, disjoint positions in ``range(num_items)``.

    Raises:
        EvaluatorError: a bad size, or ``calib + holdout`` more than the items.

    Example:
        >>> calib, holdout = random_split(10, 4, 3, seed=0)
        >>> len(calib), len(holdout), set(calib) & set(holdout)
        (4, 3, set())
    """
    check_sizes(calib, holdout, num_items)
    order = np.random.default_rng(seed).permutation(num_items).tolist()
    return sorted(order[:calib]), sorted(order[calib : calib + holdout])


def pick_split(split: str, calib: T, holdout: T) -> T:
    """``calib`` or ``holdout`` by split name.

    Raises:
        EvaluatorError: an unknown split name.
    """
    if split == "calib":
        return calib
    if split == "holdout":
        return holdout
    raise EvaluatorError(f"unknown split {split!r}; use 'calib' or 'holdout'")


def empty_split(split: str) -> EvaluatorError:
    """The error for a split with no items to score (the message names the size parameter to raise).

    Example:
        >>> print(empty_split("holdout"))
        no held-out items to score; give holdout 1 or more
    """
    items = "calibration" if split == "calib" else "held-out"
    return EvaluatorError(f"no {items} items to score; give {split} 1 or more", param=split)
