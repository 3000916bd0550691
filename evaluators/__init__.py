"""Evaluators: the tasks the tuner scores schedules on, the latency side of a trial, and calibration splits.

Importing this package registers the built-in evaluators (``demo``, ``fidelity``, ``zeroshot``).

Example:
    >>> from evaluators import available_evaluators, get_evaluator, parse_budget
    >>> available_evaluators()
    ['demo', 'fidelity', 'zeroshot']
    >>> str(parse_budget("0.05s")), get_evaluator("demo").default_calib
    ('50ms', 256)
"""

from evaluators.base import (
    Evaluator,
    EvaluatorError,
    Split,
    available_evaluators,
    get_evaluator,
    register_evaluator,
)
from evaluators.calibration import random_split, resolve_sizes, stratified_split
from evaluators.demo import DemoEvaluator
from evaluators.fidelity import FidelityEvaluator
from evaluators.latency import (
    Budget,
    BudgetError,
    LatencyMeter,
    LatencyModel,
    LatencyResult,
    calibrate_latency_model,
    parse_budget,
    probe_schedule,
)
from evaluators.zeroshot import ZeroShotEvaluator

__all__ = [
    "Budget",
    "BudgetError",
    "DemoEvaluator",
    "Evaluator",
    "EvaluatorError",
    "FidelityEvaluator",
    "LatencyMeter",
    "LatencyModel",
    "LatencyResult",
    "Split",
    "ZeroShotEvaluator",
    "available_evaluators",
    "calibrate_latency_model",
    "get_evaluator",
    "parse_budget",
    "probe_schedule",
    "random_split",
    "register_evaluator",
    "resolve_sizes",
    "stratified_split",
]
