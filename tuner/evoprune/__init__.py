"""EvoPrune: score-guided token merging inside a ViT encoder, with per-layer schedules.

Example:
    >>> from tuner.evoprune import Schedule, Scoring
    >>> s = Schedule.preset("skip", num_layers=24, tokens_in=576, tokens_out=128,
    ...                     scoring=Scoring(w_div=0.5, w_attn=0.0, ctr=0.25))
    >>> s.tokens_after(576)[-1]
    128
"""

from tuner.evoprune.apply import EvoPruneHandle, apply
from tuner.evoprune.errors import EvoPruneError, ScheduleError, UnsupportedModelError
from tuner.evoprune.format import schedule_schema
from tuner.evoprune.merge import TokenState, attention_received, knn_distinctiveness, match, merge, merge_step
from tuner.evoprune.schedule import Schedule
from tuner.evoprune.scoring import Scoring
from tuner.evoprune.temporal import temporal_merge_step

__all__ = [
    "EvoPruneError",
    "EvoPruneHandle",
    "Schedule",
    "ScheduleError",
    "Scoring",
    "TokenState",
    "UnsupportedModelError",
    "apply",
    "attention_received",
    "knn_distinctiveness",
    "match",
    "merge",
    "merge_step",
    "schedule_schema",
    "temporal_merge_step",
]
