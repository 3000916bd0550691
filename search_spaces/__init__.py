"""Search spaces: declared parameters and a deterministic map from one trial's parameters to one Schedule.

Example:
    >>> from search_spaces import get_space, EncoderShape
    >>> space = get_space("family")
    >>> shape = EncoderShape(num_layers=6, tokens_in=64)
    >>> space.to_schedule(space.seed_points(shape)[2].params, shape).tokens_out
    16
"""

from search_spaces.base import (
    EncoderShape,
    SearchSpace,
    SearchSpaceError,
    SeedPoint,
    available_spaces,
    get_space,
    register_space,
)
from search_spaces.family import FamilySpace
from search_spaces.keep_ratios import KeepRatiosSpace

DEFAULT_SPACE = FamilySpace.name
"""The space ``tuner run`` searches unless told otherwise."""

__all__ = [
    "DEFAULT_SPACE",
    "EncoderShape",
    "FamilySpace",
    "KeepRatiosSpace",
    "SearchSpace",
    "SearchSpaceError",
    "SeedPoint",
    "available_spaces",
    "get_space",
    "register_space",
]
