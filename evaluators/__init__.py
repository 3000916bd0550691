"""Evaluators: the accuracy tasks the tuner scores schedules on, and their calibration splits.

Importing this package registers the built-in evaluators (``demo``, ``fidelity``, ``zeroshot``, and the LLaVA tasks
``pope``, ``mme``, ``scienceqa``, ``mmbench``, ``gqa``, ``videomme``, ``mllm``); installed packages add theirs through
the ``tuner.evaluators`` entry-point group. Budgets and latency live in :mod:`tuner.latency`.

Example:
    >>> from evaluators import available_evaluators, get_evaluator
    >>> available_evaluators()
    ['demo', 'digits-vqa', 'fidelity', 'gqa', 'mllm', 'mmbench', 'mme', 'pope', 'scienceqa', 'videomme', 'zeroshot']
    >>> get_evaluator("demo").default_calib
    256
"""

from evaluators.base import (
    Evaluator,
    EvaluatorError,
    EvaluatorOptions,
    Split,
    available_evaluators,
    get_evaluator,
    register_evaluator,
)
from evaluators.calibration import random_split, resolve_sizes, stratified_split
from evaluators.demo import DemoEvaluator
from evaluators.digits_vqa import DigitsVqaEvaluator
from evaluators.fidelity import FidelityEvaluator
from evaluators.gqa import GqaEvaluator  # noqa: F401 - registers gqa
from evaluators.mllm import MllmEvaluator
from evaluators.video_mme import VideoMmeEvaluator  # noqa: F401 - registers videomme
from evaluators.zeroshot import ZeroShotEvaluator

__all__ = [
    "DemoEvaluator",
    "DigitsVqaEvaluator",
    "Evaluator",
    "EvaluatorError",
    "EvaluatorOptions",
    "FidelityEvaluator",
    "MllmEvaluator",
    "Split",
    "ZeroShotEvaluator",
    "available_evaluators",
    "get_evaluator",
    "random_split",
    "register_evaluator",
    "resolve_sizes",
    "stratified_split",
]
