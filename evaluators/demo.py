"""The offline demo task: the shipped digit-scene classifier (:mod:`tuner.demo`), scored by top-1 accuracy.

It needs no hub and no dataset: a stratified calibration subset and a disjoint held-out slice are drawn from the
demo's eval pool (digits never used in training) and rendered into scenes deterministically from the seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from evaluators.base import Evaluator, EvaluatorError, EvaluatorOptions, Split, register_evaluator
from evaluators.calibration import empty_split, pick_split, resolve_sizes, stratified_split
from evaluators.loading import dtype_name, latency_batch, resolve_batch_size, to_batches

__all__ = ["DemoEvaluator"]


@register_evaluator("demo")
class DemoEvaluator(Evaluator):
    """Top-1 accuracy of the demo classifier on digit scenes.

    Args:
        options: the shared :class:`~evaluators.base.EvaluatorOptions`; ``model``, ``dataset`` and ``dataset_split``
            must be None (the demo ships its own model and renders its own scenes). ``calib`` and ``holdout`` count
            scenes (defaults :attr:`default_calib`, :attr:`default_holdout`; the held-out digits are disjoint from the
            calibration digits), ``batch_size`` defaults to ``tuner.demo.DEFAULT_BATCH_SIZE``, and ``seed`` seeds the
            split and the scene rendering.
        **settings: fields of :class:`~evaluators.base.EvaluatorOptions` that override ``options``.

    Attributes:
        calib_indices: digit indices (into ``sklearn.datasets.load_digits()``) of the calibration scenes.
        holdout_indices: digit indices of the held-out scenes.

    Raises:
        EvaluatorError: a model, dataset or split given, bad sizes, or the demo weights missing.

    Example:
        >>> evaluator = DemoEvaluator(calib=64, holdout=64)  # doctest: +SKIP
        >>> evaluator.accuracy("calib")  # doctest: +SKIP
        0.96875
    """

    default_calib: ClassVar[int] = 256
    default_holdout: ClassVar[int] = 256
    weights_dir: ClassVar[Path | None] = None
    """Where the weights are read from; None for the shipped ``tuner/demo/weights`` (a subclass may point elsewhere)."""

    def __init__(self, options: EvaluatorOptions | None = None, /, **settings: Any) -> None:
        from tuner.demo import DEFAULT_BATCH_SIZE, WEIGHTS_DIR, eval_pool, load_demo_model, render_scenes

        options = EvaluatorOptions.of(options, settings)
        if options.model is not None or options.dataset is not None or options.dataset_split is not None:
            raise EvaluatorError(
                "the demo evaluator takes no model, dataset or dataset_split: it ships its own network and renders "
                "its own scenes; drop them, or use the fidelity or zeroshot evaluator",
                param=("model", "dataset", "dataset_split"),
            )
        self._set_runtime(options, DEFAULT_BATCH_SIZE)
        weights = Path(self.weights_dir) if self.weights_dir is not None else WEIGHTS_DIR
        if not (weights / "model.safetensors").is_file() or not (weights / "config.json").is_file():
            raise EvaluatorError(
                f"the demo weights are missing from {weights}; train them with python -m tuner.demo.train"
            )
        self.weights_sha256 = _sha256(weights / "model.safetensors")
        classifier: nn.Module = load_demo_model(device=self.device, attn_implementation="sdpa", weights_dir=weights)
        self.model = classifier.to(dtype=self.dtype)

        digits, labels = eval_pool()
        self.calib, self.holdout = resolve_sizes(
            options.calib, options.holdout, len(labels), self.default_calib, self.default_holdout
        )
        calib_positions, holdout_positions = stratified_split(labels.tolist(), self.calib, self.holdout, self.seed)
        self.calib_indices: list[int] = digits[calib_positions].tolist()
        self.holdout_indices: list[int] = digits[holdout_positions].tolist()

        # Rendered once: a scene depends only on (seed, digit), so the same seed gives the same scenes.
        self._scenes = {
            "calib": render_scenes(self.calib_indices, seed=self.seed)[:2],
            "holdout": render_scenes(self.holdout_indices, seed=self.seed)[:2],
        }
        self.set_batch_size(self.batch_size)

    def set_batch_size(self, batch_size: int) -> None:
        """Use ``batch_size`` scenes per forward from now on (the scenes are not rendered again).

        The demo's workload can be sized to the machine (``tuner run`` does it for a budget in ms); accuracy does not
        depend on the batch size, since every scene is merged on its own.
        """
        self.batch_size = resolve_batch_size(batch_size, self.batch_size)
        (calib_x, calib_y), (holdout_x, holdout_y) = self._scenes["calib"], self._scenes["holdout"]
        self._calib = (
            to_batches(calib_x, self.batch_size, self.device, self.dtype),
            to_batches(calib_y, self.batch_size, self.device, None),
        )
        self._holdout = (
            to_batches(holdout_x, self.batch_size, self.device, self.dtype),
            to_batches(holdout_y, self.batch_size, self.device, None),
        )
        self._latency_batch = latency_batch(calib_x, self.batch_size, self.device, self.dtype)

    def accuracy(self, split: Split = "calib") -> float:
        """Top-1 accuracy on the calibration subset or the held-out slice, under the applied schedule."""
        batches, labels = pick_split(split, self._calib, self._holdout)
        total = sum(len(y) for y in labels)
        if total == 0:
            raise empty_split(split)
        correct = 0
        with torch.inference_mode():
            for x, y in zip(batches, labels, strict=True):
                correct += int((self.model(pixel_values=x).logits.argmax(-1) == y).sum())
        return correct / total

    def latency_call(self) -> Callable[[], Any]:
        """The classifier's forward on one batch of ``batch_size`` scenes."""
        model, pixel_values = self.model, self._latency_batch

        def forward_one_batch() -> Any:
            return model(pixel_values=pixel_values)

        return forward_one_batch

    def settings(self) -> dict[str, Any]:
        """The task's identity: the shipped weights (by hash), sizes, batch size, seed, device and dtype."""
        return {
            "evaluator": self.name,
            "model": "tuner.demo",
            "weights_sha256": self.weights_sha256,
            "dataset": "tuner.demo eval pool (sklearn digits in scenes)",
            "calib": self.calib,
            "holdout": self.holdout,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "device": self.device.type,
            "dtype": dtype_name(self.dtype),
        }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
