"""GQA with LLaVA-1.5: short answers by greedy generation, scored by exact match after GQA's normalisation.

Each question is asked with LLaVA-1.5's GQA prompt (``USER: <image>\\n{question}\\nAnswer the question using a single
word or phrase. ASSISTANT:``), identical for the unpruned model and every trial; the model answers by greedy decoding
(``do_sample=False``, at most :attr:`GqaEvaluator.max_new_tokens` tokens, lmms-eval's 16), and an answer is right
when it equals the reference after :func:`normalize_answer`. That is lmms-eval's ``gqa`` metric (``exact_match`` with
``ignore_case`` and ``ignore_punctuation``): lower case, every ASCII punctuation character deleted, the model's output
stripped of surrounding white space. Unlike VQAv2's rule, GQA's keeps articles and number words (``a cat`` is not
``cat``, ``two`` is not ``2``): its answers are single words or short phrases from a closed vocabulary.

Data: lmms-eval's ``lmms-lab-encoder/GQA`` (the old id ``lmms-lab/GQA`` redirects there), split ``testdev``, in two
configs joined by image id: ``testdev_balanced_instructions`` (``question``, ``answer``, ``imageId``, ``types``) and
``testdev_balanced_images`` (``id``, ``image``). ``--dataset PATH`` takes a folder holding both configs as subfolders
of those names (a hub snapshot of parquet files, or ``save_to_disk`` output each), or any local dataset with
``image``, ``question`` and ``answer`` columns.

Calibration and held-out slices are stratified by GQA's structural question type (``types.structural``: verify,
query, choose, logical, compare) where the data has it, else by yes/no versus open answers: pruning costs open
``query`` questions (naming an object or attribute) more than yes/no ones, so the slices keep the benchmark's mix.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from evaluators.base import EvaluatorError, EvaluatorOptions, Split, register_evaluator
from evaluators.calibration import pick_split, resolve_sizes, stratified_split
from evaluators.loading import IMAGE_COLUMNS, find_column, load_image_dataset, load_model, load_rgb_images
from evaluators.mllm import MllmEvaluator, TaskSpec, _load_llava_processor

__all__ = ["GQA_IMAGES_CONFIG", "GqaEvaluator", "GqaItem", "gqa_items", "gqa_prompt", "normalize_answer"]

GQA_IMAGES_CONFIG = "testdev_balanced_images"
"""The config of ``lmms-lab-encoder/GQA`` that holds the images (``id``, ``image``)."""

GQA_POST_PROMPT = "Answer the question using a single word or phrase."
"""LLaVA-1.5's (and lmms-eval's default) instruction after a GQA question."""

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """GQA's normalisation as lmms-eval scores it: white space at the ends stripped, lower case, punctuation deleted.

    Example:
        >>> normalize_answer(" Yes."), normalize_answer("T-shirt"), normalize_answer("the man's")
        ('yes', 'tshirt', 'the mans')
        >>> normalize_answer("a cat") == normalize_answer("cat"), normalize_answer("two") == normalize_answer("2")
        (False, False)
    """
    return text.strip().lower().translate(_PUNCTUATION)


def gqa_prompt(question: str, image_token: str = "<image>") -> str:
    """LLaVA-1.5's single-turn GQA prompt; the answer is generated after it.

    Example:
        >>> print(gqa_prompt("What color is the car?"))
        USER: <image>
        What color is the car?
        Answer the question using a single word or phrase. ASSISTANT:
    """
    return f"USER: {image_token}\n{question.strip()}\n{GQA_POST_PROMPT} ASSISTANT:"


@dataclass(frozen=True)
class GqaItem:
    """One GQA question.

    Attributes:
        row: the question's row in the questions table.
        image_row: the row of its image in the image table (the questions table itself for a single-table dataset).
        question: the question text.
        answer: the reference answer.
        stratum: what the slices are stratified by: the structural type, or ``yes/no`` / ``open``.
    """

    row: int
    image_row: int
    question: str
    answer: str
    stratum: str


def _stratum(types: Any, answer: str) -> str:
    if isinstance(types, dict) and types.get("structural"):
        return str(types["structural"])
    return "yes/no" if normalize_answer(answer) in ("yes", "no") else "open"


def gqa_items(questions: Any, images: Any | None, name: str) -> list[GqaItem]:
    """The questions as items, each joined to its image: by ``imageId`` to the image table's ``id`` (GQA's two
    configs), or to its own row when ``images`` is None (a single table with an image column).

    Raises:
        EvaluatorError: a missing column, or a question whose image the image table lacks (one line each).
    """
    find_column(questions, ("question",), "question", name)
    find_column(questions, ("answer",), "answer", name)
    texts = [str(value) for value in questions["question"]]
    answers = [str(value) for value in questions["answer"]]
    types = list(questions["types"]) if "types" in questions.column_names else [None] * len(texts)
    if images is None:
        if not any(column in questions.column_names for column in IMAGE_COLUMNS):
            wanted = "an image column" if "imageId" not in questions.column_names else "the images beside it"
            raise EvaluatorError(
                f"dataset {name!r} has questions but no images; give {wanted} (GQA: a folder with the subfolders "
                f"testdev_balanced_instructions/ and {GQA_IMAGES_CONFIG}/, or columns image, question, answer)"
            )
        image_rows = list(range(len(texts)))
    else:
        id_column = find_column(images, ("id",), "image id", f"{name} ({GQA_IMAGES_CONFIG})")
        find_column(questions, ("imageId",), "image id (imageId)", name)
        position = {str(image_id): row for row, image_id in enumerate(images[id_column])}
        image_ids = [str(value) for value in questions["imageId"]]
        missing = sorted({image_id for image_id in image_ids if image_id not in position})
        if missing:
            raise EvaluatorError(
                f"dataset {name!r}: {len(missing)} image ids of the questions are not in {GQA_IMAGES_CONFIG} (first: "
                f"{missing[0]!r}); give the images config of the same split"
            )
        image_rows = [position[image_id] for image_id in image_ids]
    return [
        GqaItem(row, image_rows[row], texts[row], answers[row], _stratum(types[row], answers[row]))
        for row in range(len(texts))
    ]


@register_evaluator("gqa")
class GqaEvaluator(MllmEvaluator):
    """Exact-match accuracy of a LLaVA-1.5 model on GQA, answers by greedy generation (see the module's notes).

    Args:
        options: the shared :class:`~evaluators.base.EvaluatorOptions`. ``model`` (required): a
            ``LlavaForConditionalGeneration`` with its processor saved beside it; ``dataset``: ``lmms-lab-encoder/GQA``
            by default, or a local folder in its layout, or a local dataset with image, question and answer columns;
            ``calib``/``holdout`` count questions, stratified by question type; ``batch_size`` prompts per generate.
        **settings: fields of :class:`~evaluators.base.EvaluatorOptions` that override ``options``.

    Attributes:
        calib_items: the calibration items (:class:`GqaItem`); ``holdout_items`` the held-out ones.
        max_new_tokens: the longest answer generated, in tokens (lmms-eval's 16).

    Raises:
        EvaluatorError: a missing or non-LLaVA model, a processor that cannot be loaded, a dataset without the
            needed columns or images, or bad sizes.
    """

    spec: ClassVar[TaskSpec] = TaskSpec("gqa", "lmms-lab-encoder/GQA", "testdev_balanced_instructions", "testdev",
                                        "generate")  # fmt: skip
    max_new_tokens: ClassVar[int] = 16

    def __init__(self, options: EvaluatorOptions | None = None, /, **settings: Any) -> None:
        options = EvaluatorOptions.of(options, settings)
        self.task = self.spec
        if options.model is None:
            raise EvaluatorError("the gqa evaluator needs a LLaVA model; give model", param="model")
        dataset_name = options.dataset or str(self.spec.dataset)
        self._set_runtime(options, self.default_batch_size)
        self.model_name, self.dataset_name = options.model, dataset_name
        # The data first: a dataset without the needed columns or images fails before a large model is loaded.
        questions, images, self.dataset_split = self._load_gqa(dataset_name, options.dataset_split)
        items = gqa_items(questions, images, dataset_name)
        self.calib, self.holdout = resolve_sizes(options.calib, options.holdout, len(items), self.default_calib,
                                                 self.default_holdout)  # fmt: skip
        calib_rows, holdout_rows = stratified_split([item.stratum for item in items], self.calib, self.holdout,
                                                    self.seed)  # fmt: skip
        self.calib_items: list[GqaItem] = [items[i] for i in calib_rows]  # type: ignore[assignment]
        self.holdout_items: list[GqaItem] = [items[i] for i in holdout_rows]  # type: ignore[assignment]
        image_table = questions if images is None else images
        self._image_column = find_column(image_table, IMAGE_COLUMNS, "image", dataset_name)
        self.model = load_model(
            options.model, device=self.device, dtype=self.dtype, allowed=("LlavaForConditionalGeneration",),
            purpose="a LLaVA model (LlavaForConditionalGeneration)",
        )  # fmt: skip
        self.processor = _load_llava_processor(options.model)
        self._batches = {
            "calib": self._prepare_gqa(image_table, self.calib_items, dataset_name),
            "holdout": self._prepare_gqa(image_table, self.holdout_items, dataset_name),
        }

    # ------------------------------------------------------------------------------------------------ interface

    def accuracy(self, split: Split = "calib") -> float:
        """Share of questions whose generated answer equals the reference after :func:`normalize_answer`."""
        items = pick_split(split, self.calib_items, self.holdout_items)
        if not items:
            raise EvaluatorError(f"the {split} split is empty; give {split} 1 or more", param=split)
        predictions = self.predictions(split)
        correct = sum(
            normalize_answer(prediction) == normalize_answer(item.answer)
            for prediction, item in zip(predictions, items, strict=True)
        )
        return correct / len(items)

    def predictions(self, split: Split = "calib") -> list[str]:
        """The model's answer to each question of the split: greedy generation, decoded, stripped."""
        batches = pick_split(split, self._batches["calib"], self._batches["holdout"])
        tokenizer = self.processor.tokenizer
        answers: list[str] = []
        with torch.inference_mode():
            for inputs, _, _ in batches:
                # generate derives positions from the mask and its cache; given ones would cover the prompt only.
                prompt = {key: value for key, value in inputs.items() if key != "position_ids"}
                output = self.model.generate(  # type: ignore[operator]
                    **prompt, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                    pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True, output_scores=True,
                )  # fmt: skip
                # The new tokens are the last len(scores) positions: a pruned prompt is shorter than the native one.
                steps = len(output.scores)
                new_tokens = output.sequences[:, output.sequences.shape[1] - steps :]
                answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        return answers

    def option_scores(self, split: Split = "calib") -> list[list[float]]:
        """Not defined for GQA: its answers are generated, not chosen among options (see :meth:`predictions`)."""
        raise EvaluatorError("gqa answers are generated, not scored among options; use predictions()")

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "max_new_tokens": self.max_new_tokens}

    # ------------------------------------------------------------------------------------------------- building

    def _load_gqa(self, name: str, split: str | None) -> tuple[Any, Any | None, str | None]:
        """``(questions, images or None, split)``: GQA's two configs (hub or a local folder of both), or one table."""
        instructions = str(self.spec.config)
        local = Path(name).expanduser()
        if local.is_dir() and (local / instructions).is_dir():
            if not (local / GQA_IMAGES_CONFIG).is_dir():
                raise EvaluatorError(
                    f"dataset {name!r} has {instructions}/ but no {GQA_IMAGES_CONFIG}/; download both configs"
                )
            questions, question_split = self._load_config_folder(local / instructions, split, name)
            images, _ = self._load_config_folder(local / GQA_IMAGES_CONFIG, question_split, name)
            return questions, images, question_split
        if local.exists() or name != self.spec.dataset:
            table, table_split = load_image_dataset(name, split)
            return table, None, table_split
        import datasets

        wanted = split or self.spec.split
        try:
            questions = datasets.load_dataset(name, instructions, split=wanted)
            images = datasets.load_dataset(name, GQA_IMAGES_CONFIG, split=wanted)
        except Exception as error:  # noqa: BLE001 - offline, missing, gated: one line either way
            raise EvaluatorError(
                f"cannot load dataset {name!r} (configs {instructions} and {GQA_IMAGES_CONFIG}, split {wanted}): "
                f"{type(error).__name__}; give a local copy with dataset",
                param="dataset",
            ) from None
        return questions, images, wanted

    def _load_config_folder(self, folder: Path, split: str | None, name: str) -> tuple[Any, str | None]:
        """One config's folder: parquet files named ``<split>-NNNNN-of-NNNNN.parquet`` (a hub snapshot), or anything
        :func:`load_image_dataset` reads (a ``save_to_disk`` folder)."""
        files = sorted(folder.glob("*.parquet"))
        if not files:
            return load_image_dataset(str(folder), split)
        by_split: dict[str, list[str]] = {}
        for file in files:
            by_split.setdefault(file.name.split("-")[0], []).append(str(file))
        wanted = split or (self.spec.split if self.spec.split in by_split else None)
        if wanted is None and len(by_split) == 1:
            wanted = next(iter(by_split))
        if wanted not in by_split:
            raise EvaluatorError(
                f"dataset {name!r}: {folder.name}/ has the splits {', '.join(sorted(by_split))}, not "
                f"{wanted or 'one to pick'}; pick one with dataset_split",
                param="dataset_split",
            )
        import datasets

        return datasets.load_dataset("parquet", data_files={wanted: by_split[wanted]}, split=wanted), wanted

    def _prepare_gqa(self, images: Any, items: list[GqaItem], name: str) -> list[tuple[dict[str, Any], Any, Any]]:
        """Processor outputs per batch (on the device), in the shape MllmEvaluator's timing reads:
        ``(inputs, None, answers)`` (no option ids: the answers are generated)."""
        image_token = getattr(self.processor, "image_token", "<image>")
        batches = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            pictures = load_rgb_images(images, self._image_column, [item.image_row for item in chunk], name)
            prompts = [gqa_prompt(item.question, image_token) for item in chunk]
            encoded = self.processor(images=pictures, text=prompts, return_tensors="pt", padding=True)
            inputs = self._device_inputs(encoded)  # as MllmEvaluator's batches, so the scopes time the same call
            batches.append((inputs, None, [item.answer for item in chunk]))
        return batches
