"""Label-free fidelity: how close the pruned model's outputs stay to the unpruned model's, on any supported model.

For image classifiers, the share of images whose top-1 prediction is unchanged; for every other model, the mean
cosine between pruned and unpruned pooled image features (``pooler_output`` / image embeds; LLaVA's projected tokens
mean-pooled), each clamped to [0, 1]. The unpruned references are computed once, in the constructor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from evaluators.base import Evaluator, EvaluatorError, EvaluatorOptions, Split, register_evaluator
from evaluators.calibration import empty_split, pick_split, random_split, resolve_sizes
from evaluators.loading import (
    IMAGE_COLUMNS,
    dtype_name,
    find_column,
    latency_batch,
    load_image_dataset,
    load_image_processor,
    load_model,
    preprocess_images,
    to_batches,
)
from tuner.evoprune.adapters import resolve_encoder

__all__ = ["FidelityEvaluator", "image_outputs", "is_classifier"]


def is_classifier(model: nn.Module) -> bool:
    """Whether the model ends in class logits (``...ForImageClassification``)."""
    return type(model).__name__.endswith("ForImageClassification")


def image_outputs(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """What fidelity compares, ``[B, D]``: class logits of a classifier, else pooled image features.

    The vision path only: ``get_image_features`` where the model has it (dual encoders, LLaVA), else the vision
    model's own forward.
    """
    if is_classifier(model):
        return model(pixel_values=pixel_values).logits
    get_image_features = getattr(model, "get_image_features", None)
    output = (
        get_image_features(pixel_values=pixel_values)
        if callable(get_image_features)
        else model(pixel_values=pixel_values)
    )
    return _pooled(output)


def _pooled(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    embeds = getattr(output, "image_embeds", None)
    pooled = embeds if embeds is not None else getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    if isinstance(pooled, (list, tuple)) and pooled and all(isinstance(p, torch.Tensor) for p in pooled):
        # One [tokens, D] tensor per image (LLaVA's projected features): mean-pool, as the token count varies.
        return torch.stack([tokens.mean(dim=0) for tokens in pooled])
    raise EvaluatorError(f"cannot find pooled image features in a {type(output).__name__}")


@register_evaluator("fidelity")
class FidelityEvaluator(Evaluator):
    """Agreement (classifiers) or feature cosine (other models) of the pruned with the unpruned model, in [0, 1].

    Args:
        options: the shared :class:`~evaluators.base.EvaluatorOptions`. ``model`` (required): a local folder or hub
            id of a model the EvoPrune adapters support; ``dataset`` (required): images (a hub id, a ``save_to_disk``
            folder, or a local data folder or file) with an ``image`` or ``img`` column; ``calib`` and ``holdout``
            default to :attr:`default_calib` and :attr:`default_holdout` (a smaller dataset is split in halves),
            ``batch_size`` to :attr:`default_batch_size`; ``seed`` seeds the split.
        **settings: fields of :class:`~evaluators.base.EvaluatorOptions` that override ``options``.

    Attributes:
        calib_indices: dataset rows of the calibration images.
        holdout_indices: dataset rows of the held-out images.
        metric: ``"top1_agreement"`` or ``"feature_cosine"``.

    Raises:
        EvaluatorError: a missing model or dataset, one that cannot be loaded, no image column, or bad sizes.
    """

    requires: ClassVar[dict[str, str]] = {"model": "a local folder or hub id", "dataset": "images"}
    default_calib: ClassVar[int] = 128
    default_holdout: ClassVar[int] = 128
    default_batch_size: ClassVar[int] = 16

    def __init__(self, options: EvaluatorOptions | None = None, /, **settings: Any) -> None:
        options = EvaluatorOptions.of(options, settings)
        self.check_required(vars(options))
        model, dataset = options.model, options.dataset
        assert model is not None and dataset is not None
        self.model_name, self.dataset_name = model, dataset
        self._set_runtime(options, self.default_batch_size)
        # The data first: a dataset without images, or too small, fails before a large model is loaded.
        data, self.dataset_split = load_image_dataset(dataset, options.dataset_split)
        self.image_column = find_column(data, IMAGE_COLUMNS, "image", dataset)
        self.calib, self.holdout = resolve_sizes(
            options.calib, options.holdout, len(data), self.default_calib, self.default_holdout
        )
        self.calib_indices, self.holdout_indices = random_split(len(data), self.calib, self.holdout, self.seed)

        self.model = load_model(model, device=self.device, dtype=self.dtype)
        image_size = _image_size(self.model)
        image_processor = load_image_processor(model)
        calib_x = preprocess_images(
            data, self.image_column, self.calib_indices, image_processor, dataset, image_size=image_size
        )
        holdout_x = preprocess_images(
            data, self.image_column, self.holdout_indices, image_processor, dataset, image_size=image_size
        )
        self._calib_batches = to_batches(calib_x, self.batch_size, self.device, self.dtype)
        self._holdout_batches = to_batches(holdout_x, self.batch_size, self.device, self.dtype)
        self._latency_batch = latency_batch(calib_x, self.batch_size, self.device, self.dtype)

        self.metric = "top1_agreement" if is_classifier(self.model) else "feature_cosine"
        # References from the unpruned model, batch by batch as accuracy() runs them (same shapes, same kernels).
        self._calib_references = self._outputs(self._calib_batches)
        self._holdout_references = self._outputs(self._holdout_batches)

    def _outputs(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            outputs = [image_outputs(self.model, batch) for batch in batches]
        if self.metric == "top1_agreement":
            return [output.argmax(-1) for output in outputs]
        return [output.float() for output in outputs]

    def accuracy(self, split: Split = "calib") -> float:
        """Fidelity to the unpruned model on the calibration subset or the held-out slice, in [0, 1]."""
        batches, references = pick_split(
            split, (self._calib_batches, self._calib_references), (self._holdout_batches, self._holdout_references)
        )
        total = sum(len(reference) for reference in references)
        if total == 0:
            raise empty_split(split)
        score = 0.0
        for output, reference in zip(self._outputs(batches), references, strict=True):
            if self.metric == "top1_agreement":
                score += float((output == reference).sum())
            else:
                cosine = F.cosine_similarity(output, reference, dim=-1)
                # Bit-identical features score exactly 1 (the cosine of a vector with itself can round to 0.99999).
                cosine = torch.where((output == reference).all(dim=-1), torch.ones_like(cosine), cosine)
                score += float(cosine.clamp(0.0, 1.0).sum())
        return score / total

    def latency_call(self) -> Callable[[], Any]:
        """The vision path (``get_image_features``, the vision model, or the classifier) on one batch."""
        model, pixel_values = self.model, self._latency_batch

        def vision_path_one_batch() -> Any:
            return image_outputs(model, pixel_values)

        return vision_path_one_batch

    def settings(self) -> dict[str, Any]:
        """The task's identity: model, dataset, split, column, sizes, metric, batch size, seed, device and dtype."""
        return {
            "evaluator": self.name,
            "model": self.model_name,
            "dataset": self.dataset_name,
            "dataset_split": self.dataset_split,
            "image_column": self.image_column,
            "metric": self.metric,
            "calib": self.calib,
            "holdout": self.holdout,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "device": self.device.type,
            "dtype": dtype_name(self.dtype),
        }


def _image_size(model: nn.Module) -> int | None:
    """The side length the vision encoder expects (from its config), or None if it does not say."""
    size = getattr(resolve_encoder(model).vision_model.config, "image_size", None)
    return int(size) if isinstance(size, int) else None
