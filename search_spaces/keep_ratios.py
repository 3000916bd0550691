"""Per-layer keep ratios (the most general plan: it covers every family) plus score settings.

Parameters: ``keep_<layer>`` for every encoder layer, the share of its incoming patch tokens the layer keeps, and the
score settings of :data:`~search_spaces.base.SCORING_PARAMS`.

Deterministic clamps: a ratio at or above 1 means the layer does not merge (the range reaches past 1 so that "this
layer does not merge" has real probability mass), a ratio below 0.5 counts as 0.5 (one merge step can at most halve
its tokens), and ratios are rounded to 4 decimals.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from search_spaces.base import (
    SCORING_PARAMS,
    EncoderShape,
    FloatParam,
    SearchSpace,
    SeedPoint,
    default_scoring_params,
    register_space,
    scoring_from_params,
)
from search_spaces.family import FamilySpace
from tuner.evoprune import Schedule

__all__ = ["KEEP_RATIO_HIGH", "KEEP_RATIO_LOW", "KeepRatiosSpace", "clamp_keep_ratio"]

KEEP_RATIO_LOW = 0.5
"""Smallest ratio: one merge step can at most halve a layer's tokens."""

KEEP_RATIO_HIGH = 1.1
"""Largest ratio of the search range; everything from 1 up means "no merging in this layer"."""

_DECIMALS = 4


def clamp_keep_ratio(value: float) -> float:
    """A searched ratio as the schedule uses it: in ``[0.5, 1]``, rounded to 4 decimals."""
    return round(min(1.0, max(KEEP_RATIO_LOW, float(value))), _DECIMALS)


@register_space
class KeepRatiosSpace(SearchSpace):
    """One keep ratio per encoder layer + score settings."""

    name = "keep_ratios"
    summary = "one keep ratio per encoder layer (generalises every family; more parameters) + score settings"
    params = (
        FloatParam(
            "keep",
            "share of its incoming patch tokens layer <layer> keeps (>= 1: the layer does not merge)",
            per_layer=True,
            low=KEEP_RATIO_LOW,
            high=KEEP_RATIO_HIGH,
        ),
        *SCORING_PARAMS,
    )

    def build(self, params: Mapping[str, Any], shape: EncoderShape) -> Schedule:
        ratios = [clamp_keep_ratio(params[f"keep_{layer}"]) for layer in range(shape.num_layers)]
        if all(ratio == 1.0 for ratio in ratios):
            return Schedule.none(shape.num_layers, shape.tokens_in, family=shape.family, has_cls=shape.has_cls)
        return Schedule.from_keep_ratios(
            ratios,
            tokens_in=shape.tokens_in,
            scoring=scoring_from_params(params),
            family=shape.family,
            has_cls=shape.has_cls,
        )

    def seed_points(self, shape: EncoderShape) -> list[SeedPoint]:
        points = []
        for point in FamilySpace().seed_points(shape):
            schedule = FamilySpace().to_schedule(point.params, shape)
            before, after = schedule.tokens_before(), schedule.tokens_after()
            ratios = [round(out / count, _DECIMALS) for count, out in zip(before, after, strict=True)]
            keep = {f"keep_{layer}": ratio for layer, ratio in enumerate(ratios)}
            scoring = {name: point.params[name] for name in default_scoring_params(shape)}
            points.append(SeedPoint(point.label, {**keep, **scoring}))
        return points
