"""The default space: a token budget, one of the paper's schedule families with its shape parameter, score settings.

Parameters: ``family`` (skip, mean, first, last, increasing, decreasing), ``keep`` (share of patch tokens left after
the encoder), the family's shape (skip: ``stride``, ``offset``, ``start_layer``; first/last: ``n``;
increasing/decreasing: ``alpha``) and the score settings of :data:`~search_spaces.base.SCORING_PARAMS`.

Deterministic clamps, so that every parameter set gives one valid schedule:

- ``offset`` is taken modulo ``stride``; when ``start_layer + offset`` is past the last layer, ``start_layer`` moves
  back so that the last layer merges;
- ``keep`` gives ``tokens_out = round_half_up(keep * tokens_in)`` (at least 1); when the family cannot remove that
  many tokens without a layer losing more than half of its tokens, ``tokens_out`` rises to the smallest count it can;
- a plan that removes nothing is "no pruning", whatever the family.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from search_spaces.base import (
    SCORING_PARAMS,
    SEED_KEEP_SHARES,
    ChoiceParam,
    EncoderShape,
    FloatParam,
    IntParam,
    SearchSpace,
    SeedPoint,
    default_scoring_params,
    on_grid,
    register_space,
    scoring_from_params,
    tokens_for_share,
)
from tuner.evoprune import Schedule
from tuner.evoprune.schedule import layer_cap_violation, preset_plan

__all__ = [
    "FAMILIES",
    "FAST_SEED_ALPHA",
    "FAST_SEED_KEEP_SHARES",
    "FamilySpace",
    "TEMPORAL_SEED_KEEP_SHARE",
    "family_shape_params",
    "smallest_valid_tokens_out",
]

FAST_SEED_KEEP_SHARES: tuple[float, ...] = (0.25, 0.12)
"""Token shares of the front-loaded seed points (Decreasing, CTR off), which anchor the fast end of the front."""

TEMPORAL_SEED_KEEP_SHARE = 0.25
"""Token share of the video-only seed point with temporal merging on."""

FAST_SEED_ALPHA = 3.5
"""Depth exponent of the front-loaded seed points: most merging in the first layers, where it saves the most."""

FAMILIES: tuple[str, ...] = ("skip", "mean", "first", "last", "increasing", "decreasing")
"""Schedule families of the paper (appendix A); skip is its default."""

_SKIP = ("skip",)
_LAYER_COUNT = ("first", "last")
_DEPTH = ("increasing", "decreasing")
_ALPHA_STEP = 0.25


def family_shape_params(family: str, params: Mapping[str, Any], shape: EncoderShape) -> dict[str, Any]:
    """The preset parameters of ``family`` from the space's parameters, clamped to valid values.

    Args:
        family: one of :data:`FAMILIES`.
        params: the space's parameters.
        shape: the encoder.

    Returns:
        Keyword arguments for :meth:`Schedule.preset`.
    """
    last_layer = shape.num_layers - 1
    if family == "skip":
        stride = max(1, int(params["stride"]))
        offset = int(params["offset"]) % stride
        start_layer = min(max(0, int(params["start_layer"])), last_layer)
        if start_layer + offset > last_layer:
            start_layer = max(0, last_layer - offset)
            offset = min(offset, last_layer - start_layer)
        return {"stride": stride, "offset": offset, "start_layer": start_layer}
    if family in _LAYER_COUNT:
        return {"n": min(max(1, int(params["n"])), shape.num_layers)}
    if family in _DEPTH:
        return {"alpha": min(max(0.0, on_grid(params["alpha"], _ALPHA_STEP)), 100.0)}
    return {}


def smallest_valid_tokens_out(family: str, shape: EncoderShape, tokens_out: int, preset_params: dict[str, Any]) -> int:
    """The smallest count ``>= tokens_out`` that ``family`` reaches without a layer removing over half its tokens.

    Args:
        family: one of :data:`FAMILIES`.
        shape: the encoder.
        tokens_out: the wanted patch tokens after the encoder.
        preset_params: the family's parameters (see :func:`family_shape_params`).

    Returns:
        A count in ``[tokens_out, tokens_in]`` (``tokens_in``, no pruning, is always valid).
    """
    for candidate in range(tokens_out, shape.tokens_in):
        plan = preset_plan(
            family, num_layers=shape.num_layers, tokens_in=shape.tokens_in, tokens_out=candidate, **preset_params
        )
        if layer_cap_violation(plan, shape.tokens_in) is None:
            return candidate
    return shape.tokens_in


@register_space
class FamilySpace(SearchSpace):
    """Token budget + schedule family + its shape parameter + score settings (the default space)."""

    name = "family"
    summary = (
        "token budget + one of the paper's schedule families (skip, mean, first, last, increasing, decreasing) "
        "with its shape parameter + score settings; the default"
    )
    params = (
        ChoiceParam("family", "schedule family of the paper (skip is its default)", choices=FAMILIES),
        FloatParam(
            "keep",
            "share of patch tokens left after the encoder (the token budget; 1 = no pruning)",
            low=0.03,
            high=1.0,
            step=0.01,
        ),
        IntParam("stride", "distance between merging layers", when=("family", _SKIP), low=1, high=4),
        IntParam(
            "offset",
            "first merging layer after start_layer (taken modulo stride)",
            when=("family", _SKIP),
            low=0,
            high=3,
        ),
        IntParam(
            "start_layer",
            "first layer that may merge",
            when=("family", _SKIP),
            low=0,
            high=lambda shape: shape.num_layers - 1,
            high_text="num_layers-1",
        ),
        IntParam(
            "n",
            "number of merging layers",
            when=("family", _LAYER_COUNT),
            low=1,
            high=lambda shape: shape.num_layers,
            high_text="num_layers",
        ),
        FloatParam(
            "alpha",
            "depth exponent of the per-layer share (0 = mean)",
            when=("family", _DEPTH),
            low=0.0,
            high=4.0,
            step=_ALPHA_STEP,
        ),
        *SCORING_PARAMS,
    )

    def build(self, params: Mapping[str, Any], shape: EncoderShape) -> Schedule:
        family = str(params["family"])
        scoring = scoring_from_params(params)
        preset_params = family_shape_params(family, params, shape)
        wanted = tokens_for_share(on_grid(params["keep"], 0.01), shape.tokens_in)
        tokens_out = smallest_valid_tokens_out(family, shape, wanted, preset_params)
        if tokens_out == shape.tokens_in:
            return Schedule.none(shape.num_layers, shape.tokens_in, family=shape.family, has_cls=shape.has_cls)
        return Schedule.preset(
            family,
            num_layers=shape.num_layers,
            tokens_in=shape.tokens_in,
            tokens_out=tokens_out,
            scoring=scoring,
            family=shape.family,
            has_cls=shape.has_cls,
            **preset_params,
        )

    def seed_points(self, shape: EncoderShape) -> list[SeedPoint]:
        scoring = default_scoring_params(shape)
        skip = {"family": "skip", "stride": 2, "offset": 0, "start_layer": 0, **scoring}
        points = [SeedPoint("no pruning", {**skip, "keep": 1.0})]
        for share in SEED_KEEP_SHARES:
            points.append(SeedPoint(f"paper skip default, {share:.0%} tokens", {**skip, "keep": share}))
        # The paper's default merges evenly and pays for attention statistics: on small encoders it runs at 0.75-0.95
        # of the unpruned time whatever the token count, so the fast end of the front would be left to chance.
        fast = {"family": "decreasing", "alpha": FAST_SEED_ALPHA, **scoring, "ctr": 0.0}
        for share in FAST_SEED_KEEP_SHARES:
            points.append(
                SeedPoint(f"front-loaded, no attention statistics, {share:.0%} tokens", {**fast, "keep": share})
            )
        if shape.is_video:
            # Temporal merging at equal terms on the paper's default: the search starts with one point that uses it.
            points.append(
                SeedPoint(
                    f"paper skip default + temporal merging, {TEMPORAL_SEED_KEEP_SHARE:.0%} tokens",
                    {**skip, "keep": TEMPORAL_SEED_KEEP_SHARE, "temporal_weight": 1.0},
                )
            )
        return points
