"""The offline LLaVA task: the demo's tiny LLaVA answering questions about digit scenes, scored like the LLaVA tasks.

It needs no hub: the model is the shipped :data:`tuner.demo.mllm.MLLM_WEIGHTS_DIR` (loaded with ``from_pretrained``,
model and processor), and the dataset is generated offline from eval-pool digits (never seen in training) as a
``datasets.Dataset`` in the ``mllm`` schema (``image``, ``question``, ``choices``, ``answer``; :mod:`tuner.demo.vqa`):
a third each of position ("What digit is in the top left?", 4 options), count (4 options) and presence ("Is there a
7?", yes/no) questions, balanced by answer. Scoring, splits, schedules and latency scopes are
:class:`~evaluators.mllm.MllmEvaluator`'s; ``model`` and ``dataset`` may still point elsewhere.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

from evaluators.base import EvaluatorOptions, Split, register_evaluator
from evaluators.calibration import pick_split
from evaluators.demo import _sha256
from evaluators.mllm import MllmEvaluator, TaskSpec

__all__ = ["DATASET_ITEMS", "DEFAULT_DATASET", "DigitsVqaEvaluator"]

DEFAULT_DATASET = "tuner.demo.vqa eval pool"
"""The dataset name that stands for the generated eval-pool questions (``--dataset`` default)."""

DATASET_ITEMS: int = 900
"""Eval-pool items generated (300 of each kind); calib and holdout are drawn from them."""


@register_evaluator("digits-vqa")
class DigitsVqaEvaluator(MllmEvaluator):
    """Accuracy of the demo LLaVA on generated digit-scene questions, scored by option log-likelihood.

    Args:
        options: the shared :class:`~evaluators.base.EvaluatorOptions`. ``model`` defaults to the shipped demo LLaVA
            and ``dataset`` to :data:`DEFAULT_DATASET` (generated from the eval pool, rendered with ``seed``);
            ``calib``/``holdout`` count questions, stratified by answer.
        **settings: fields of :class:`~evaluators.base.EvaluatorOptions` that override ``options``.

    Attributes:
        dataset: the questions the splits were drawn from (a ``datasets.Dataset``).

    Raises:
        EvaluatorError: as :class:`~evaluators.mllm.MllmEvaluator` (a bad model, dataset or sizes), or the shipped
            weights missing.
    """

    spec: ClassVar[TaskSpec] = TaskSpec("digits-vqa", DEFAULT_DATASET, None, None, "any")
    default_calib: ClassVar[int] = 144
    default_holdout: ClassVar[int] = 288
    default_batch_size: ClassVar[int] = 24
    requires: ClassVar[dict[str, str]] = {}

    def __init__(self, options: EvaluatorOptions | None = None, /, **settings: Any) -> None:
        from tuner.demo.mllm import MLLM_WEIGHTS_DIR

        options = EvaluatorOptions.of(options, settings)
        self.shipped_model = options.model is None
        if self.shipped_model:
            if not (MLLM_WEIGHTS_DIR / "model.safetensors").is_file():
                from evaluators.base import EvaluatorError

                raise EvaluatorError(
                    f"the demo LLaVA weights are missing from {MLLM_WEIGHTS_DIR}; train them with python -m "
                    "tuner.demo.train_mllm, or give model"
                )
            options = dataclasses.replace(options, model=str(MLLM_WEIGHTS_DIR))
        super().__init__(options)

    def _load_dataset(self, name: str, split: str | None) -> tuple[Any, str | None]:
        if name == DEFAULT_DATASET and not Path(name).exists():
            from tuner.demo.vqa import vqa_dataset

            self.dataset = vqa_dataset("eval", DATASET_ITEMS, seed=self.seed)
            return self.dataset, None
        self.dataset, used = super()._load_dataset(name, split)
        return self.dataset, used

    def accuracy_by_kind(self, split: Split | None = None) -> dict[str, float]:
        """Accuracy per question kind (the dataset's ``kind`` column) and ``"all"``, under the applied schedule.

        Args:
            split: ``"calib"``, ``"holdout"``, or None for both together.
        """
        splits: list[Split] = ["calib", "holdout"] if split is None else [split]
        kinds = self.dataset["kind"] if "kind" in self.dataset.column_names else None
        right: dict[str, list[bool]] = {}
        for name in splits:
            items = pick_split(name, self.calib_items, self.holdout_items)
            for item, scores in zip(items, self.option_scores(name), strict=True):
                correct = max(range(len(scores)), key=scores.__getitem__) == item.answer
                right.setdefault(kinds[item.row] if kinds is not None else "all", []).append(correct)
                if kinds is not None:
                    right.setdefault("all", []).append(correct)
        return {kind: sum(values) / len(values) for kind, values in sorted(right.items())}

    def settings(self) -> dict[str, Any]:
        """:meth:`MllmEvaluator.settings`, the shipped model named by its weights' hash (not the install path)."""
        settings = super().settings()
        if self.shipped_model:
            from tuner.demo.mllm import MLLM_WEIGHTS_DIR

            settings["model"] = "tuner.demo.mllm"
            settings["weights_sha256"] = _sha256(MLLM_WEIGHTS_DIR / "model.safetensors")
        return settings
