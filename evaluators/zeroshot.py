"""Zero-shot image classification with a CLIP or SigLIP dual encoder, scored by top-1 accuracy.

Prompts ``"a photo of a {name}."`` for the dataset's class names are embedded once, in the constructor (the text tower
is never pruned); a trial only runs the vision path and compares image embeddings with them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from evaluators.base import Evaluator, EvaluatorError, EvaluatorOptions, Split, register_evaluator
from evaluators.calibration import empty_split, pick_split, resolve_sizes, stratified_split
from evaluators.fidelity import image_outputs
from evaluators.loading import (
    IMAGE_COLUMNS,
    LABEL_COLUMNS,
    class_names,
    dtype_name,
    find_column,
    latency_batch,
    load_image_dataset,
    load_model,
    load_processor,
    preprocess_images,
    to_batches,
)

__all__ = ["PROMPT_TEMPLATE", "ZeroShotEvaluator"]

PROMPT_TEMPLATE = "a photo of a {name}."
"""The text each class name is put in (CLIP's standard single prompt)."""

_DUAL_ENCODERS = ("CLIPModel", "SiglipModel")


@register_evaluator("zeroshot")
class ZeroShotEvaluator(Evaluator):
    """Top-1 zero-shot accuracy of a CLIP or SigLIP model on an image-classification dataset.

    Args:
        options: the shared :class:`~evaluators.base.EvaluatorOptions`. ``model`` (required): a local folder or hub
            id of a ``CLIPModel`` or ``SiglipModel``, with its processor saved beside it; ``dataset`` (required): an
            image-classification dataset (hub id, ``save_to_disk`` folder, local data folder or file) with an image
            column (``image``/``img``) and a ``ClassLabel`` label column (``label``/``labels``); ``calib`` and
            ``holdout`` default to :attr:`default_calib` and :attr:`default_holdout` (a smaller dataset is split in
            halves), ``batch_size`` to :attr:`default_batch_size`; ``seed`` seeds the stratified split.
        **settings: fields of :class:`~evaluators.base.EvaluatorOptions` that override ``options``.

    Attributes:
        class_names: the dataset's class names, index-aligned with its labels.
        text_embeddings: ``[classes, D]`` L2-normalised prompt embeddings (float32), computed once.
        calib_indices: dataset rows of the calibration images (stratified by label).
        holdout_indices: dataset rows of the held-out images.

    Raises:
        EvaluatorError: a missing or unsupported model, a dataset without the needed columns, or bad sizes.
    """

    requires: ClassVar[dict[str, str]] = {
        "model": "a CLIP or SigLIP folder or hub id",
        "dataset": "images with class labels",
    }
    default_calib: ClassVar[int] = 256
    default_holdout: ClassVar[int] = 256
    default_batch_size: ClassVar[int] = 16

    def __init__(self, options: EvaluatorOptions | None = None, /, **settings: Any) -> None:
        options = EvaluatorOptions.of(options, settings)
        self.check_required(vars(options))
        model, dataset = options.model, options.dataset
        assert model is not None and dataset is not None
        self.model_name, self.dataset_name = model, dataset
        self._set_runtime(options, self.default_batch_size)

        # The data first: a dataset without the needed columns, or too small, fails before a large model is loaded.
        data, self.dataset_split = load_image_dataset(dataset, options.dataset_split)
        self.image_column = find_column(data, IMAGE_COLUMNS, "image", dataset)
        self.label_column = find_column(data, LABEL_COLUMNS, "label", dataset)
        self.class_names = class_names(data, self.label_column, dataset)
        labels = [int(label) for label in data[self.label_column]]
        # Rows labelled -1 (unlabelled test splits) cannot be scored: sample among the labelled rows only.
        rows = [row for row, label in enumerate(labels) if 0 <= label < len(self.class_names)]
        if not rows:
            raise EvaluatorError(
                f"dataset {dataset!r} split {self.dataset_split!r} has no labelled rows; pick a labelled split "
                "with dataset_split",
                param="dataset_split",
            )
        self.calib, self.holdout = resolve_sizes(
            options.calib, options.holdout, len(rows), self.default_calib, self.default_holdout
        )
        calib_positions, holdout_positions = stratified_split(
            [labels[row] for row in rows], self.calib, self.holdout, self.seed
        )
        self.calib_indices = [rows[p] for p in calib_positions]
        self.holdout_indices = [rows[p] for p in holdout_positions]

        self.model = load_model(
            model, device=self.device, dtype=self.dtype, allowed=_DUAL_ENCODERS, purpose="a CLIP or SigLIP dual encoder"
        )
        tokenizer, image_processor = load_processor(model)
        self.text_embeddings = self._embed_prompts(tokenizer)
        config: Any = self.model.config
        image_size = int(config.vision_config.image_size)
        calib_x = preprocess_images(
            data, self.image_column, self.calib_indices, image_processor, dataset, image_size=image_size
        )
        holdout_x = preprocess_images(
            data, self.image_column, self.holdout_indices, image_processor, dataset, image_size=image_size
        )
        self._calib = (
            to_batches(calib_x, self.batch_size, self.device, self.dtype),
            to_batches(torch.tensor([labels[i] for i in self.calib_indices]), self.batch_size, self.device, None),
        )
        self._holdout = (
            to_batches(holdout_x, self.batch_size, self.device, self.dtype),
            to_batches(torch.tensor([labels[i] for i in self.holdout_indices]), self.batch_size, self.device, None),
        )
        self._latency_batch = latency_batch(calib_x, self.batch_size, self.device, self.dtype)

    def _embed_prompts(self, tokenizer: Any) -> torch.Tensor:
        prompts = [PROMPT_TEMPLATE.format(name=name) for name in self.class_names]
        model: Any = self.model
        siglip = type(model).__name__.startswith("Siglip")
        # SigLIP was trained on prompts padded to the full text length; CLIP pools at the EOS token, any padding.
        padding: dict[str, Any] = (
            {"padding": "max_length", "max_length": int(model.config.text_config.max_position_embeddings)}
            if siglip
            else {"padding": True}
        )
        try:
            tokens = tokenizer(prompts, truncation=True, return_tensors="pt", **padding)
        except Exception as error:  # noqa: BLE001 - a broken tokenizer folder: one line, not a traceback
            raise EvaluatorError(
                f"cannot tokenise the prompts with the tokenizer of {self.model_name!r}: {error}"
            ) from None
        inputs = {key: value.to(self.device) for key, value in tokens.items() if key in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            output = model.get_text_features(**inputs)
        embeddings = output if isinstance(output, torch.Tensor) else output.pooler_output
        return F.normalize(embeddings.float(), dim=-1)

    def accuracy(self, split: Split = "calib") -> float:
        """Top-1 zero-shot accuracy on the calibration subset or the held-out slice, under the applied schedule."""
        batches, labels = pick_split(split, self._calib, self._holdout)
        total = sum(len(y) for y in labels)
        if total == 0:
            raise empty_split(split)
        correct = 0
        with torch.inference_mode():
            for x, y in zip(batches, labels, strict=True):
                # Cosine ranking: CLIP's logit scale and SigLIP's bias do not change the argmax over classes.
                image = F.normalize(image_outputs(self.model, x).float(), dim=-1)
                correct += int(((image @ self.text_embeddings.T).argmax(-1) == y).sum())
        return correct / total

    def latency_call(self) -> Callable[[], Any]:
        """Image features (``get_image_features``) of one batch: the part a schedule changes."""
        model, pixel_values = self.model, self._latency_batch

        def image_features_one_batch() -> Any:
            return image_outputs(model, pixel_values)

        return image_features_one_batch

    def settings(self) -> dict[str, Any]:
        """The task's identity: model, dataset, split, columns, prompt, sizes, batch size, seed, device and dtype."""
        return {
            "evaluator": self.name,
            "model": self.model_name,
            "dataset": self.dataset_name,
            "dataset_split": self.dataset_split,
            "image_column": self.image_column,
            "label_column": self.label_column,
            "prompt": PROMPT_TEMPLATE,
            "classes": len(self.class_names),
            "calib": self.calib,
            "holdout": self.holdout,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "device": self.device.type,
            "dtype": dtype_name(self.dtype),
        }
