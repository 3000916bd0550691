"""Scoring settings of one merge step (docs/method.md, section 4)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from tuner.evoprune.errors import ScheduleError

Features = Literal["keys", "hidden"]


@dataclass(frozen=True)
class Scoring:
    """How a merging layer ranks token pairs.

    ``log Score[i, j] = w_sim * log((1 + cos) / 2) - w_div * (d_i + d_j) - w_attn * (s~_i + s~_j)`` plus a hard
    mask on the ``ctr`` share of tokens that receive the most attention. A zero weight switches its term off exactly.

    Args:
        w_sim: weight of the similarity attraction (cosine of ``features``).
        w_div: weight of the diversity penalty (kNN distinctiveness ``d``, the paper's lambda_d).
        w_attn: weight of the soft attention-importance penalty (``s~`` = attention received, normalised to mean 1
            over the patch tokens; CLS neither counts nor shifts the scale).
        ctr: share of patch tokens protected from merging, by attention received (the paper's CTR, 0.25):
            ``min(round(ctr * T), T - 2 r)`` tokens, rounded half up. Where a step can only remove its r tokens by
            protecting fewer, it does, and the handle counts the items (``EvoPruneHandle.ctr_reductions``).
        features: ``"keys"`` (attention keys averaged over heads, as ToMe) or ``"hidden"`` (the hidden states).
        knn_k: K of the kNN distinctiveness.
        tau: kNN temperature; ``"auto"`` is the median kNN distance of the layer, per image.
        proportional_attention: add ``log(size)`` to later attention logits (ToMe), so a merged token weighs as many.
        temporal_weight: on video (frames as consecutive batch items, ``EvoPruneHandle.frames_per_item``), in
            [0, 1]: a *temporal* pair (a token of frame t and an unchanged token of frame t - 1) scores
            ``temporal_weight * Sim`` (log: ``w_sim * log((1 + cos) / 2) + log(temporal_weight)``), the weight in
            place of the diversity and attention factors and the CTR mask of a spatial pair; 0 (default) switches
            temporal merging off, bit-identical to the per-frame engine (docs/method.md, "Temporal merging").
            Inactive on images.

    Example:
        >>> Scoring(w_div=0.5, ctr=0.25).needs_attention
        True
        >>> Scoring(w_div=0.0, w_attn=0.0, ctr=0.0).needs_attention
        False
    """

    w_sim: float = 1.0
    w_div: float = 0.5
    w_attn: float = 0.0
    ctr: float = 0.25
    features: Features = "keys"
    knn_k: int = 8
    tau: float | Literal["auto"] = "auto"
    proportional_attention: bool = False
    temporal_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("w_sim", "w_div", "w_attn"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise ScheduleError(f"scoring.{name} must be a number >= 0, got {value!r}")
            if math.isinf(value):
                raise ScheduleError(f"scoring.{name} must be finite, got {value!r}")
        if isinstance(self.ctr, bool) or not isinstance(self.ctr, (int, float)) or not 0.0 <= self.ctr < 1.0:
            raise ScheduleError(f"scoring.ctr must be in [0, 1), got {self.ctr!r}")
        if self.features not in ("keys", "hidden"):
            raise ScheduleError(f"scoring.features must be 'keys' or 'hidden', got {self.features!r}")
        if isinstance(self.knn_k, bool) or not isinstance(self.knn_k, int) or self.knn_k < 1:
            raise ScheduleError(f"scoring.knn_k must be an integer >= 1, got {self.knn_k!r}")
        if self.tau != "auto" and (
            isinstance(self.tau, bool)
            or not isinstance(self.tau, (int, float))
            or math.isnan(self.tau)
            or not 0 < self.tau < math.inf
        ):
            raise ScheduleError(f"scoring.tau must be 'auto' or a number > 0, got {self.tau!r}")
        if not isinstance(self.proportional_attention, bool):
            raise ScheduleError(
                f"scoring.proportional_attention must be true or false, got {self.proportional_attention!r}"
            )

        weight = self.temporal_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
            raise ScheduleError(f"scoring.temporal_weight must be a number in [0, 1] (0 = off), got {weight!r}")

    @property
    def needs_attention(self) -> bool:
        """Whether a merging layer must compute the attention-received statistic."""
        return self.w_attn > 0 or self.ctr > 0

    @property
    def temporal(self) -> bool:
        """Whether temporal merging is on (it still needs a frame count to act: images never merge temporally)."""
        return self.temporal_weight > 0

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (the ``scoring`` object of the schedule JSON).

        ``temporal_weight`` appears only when temporal merging is on: a schedule without it writes the same document
        (and has the same fingerprint) as before the setting existed, and a document without it reads as 0.

        Example:
            >>> "temporal_weight" in Scoring().to_dict(), Scoring(temporal_weight=0.5).to_dict()["temporal_weight"]
            (False, 0.5)
        """
        settings = asdict(self)
        if not self.temporal:
            del settings["temporal_weight"]
        return settings
