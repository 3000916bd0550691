"""Evaluators: the tasks the tuner scores schedules on, budgets and latency measurement, and calibration splits.

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
    BudgetVerdict,
    LatencyMeter,
    LatencyModel,
    LatencyResult,
    LatencySource,
    MeasuredLatency,
    PairedLatency,
    SyntheticLatency,
    budget_verdict,
    parse_budget,
)
from evaluators.zeroshot import ZeroShotEvaluator

__all__ = [
    "Budget",
    "BudgetError",
    "BudgetVerdict",
    "DemoEvaluator",
    "Evaluator",
    "EvaluatorError",
    "FidelityEvaluator",
    "LatencyMeter",
    "LatencyModel",
    "LatencyResult",
    "LatencySource",
    "MeasuredLatency",
    "PairedLatency",
    "SyntheticLatency",
    "budget_verdict",
    "Split",
    "ZeroShotEvaluator",
    "available_evaluators",
    "get_evaluator",
    "parse_budget",
    "random_split",
    "register_evaluator",
    "resolve_sizes",
    "stratified_split",
]
