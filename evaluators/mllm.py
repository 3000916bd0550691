"""Visual question answering with a LLaVA model: yes/no and multiple-choice tasks scored by option log-likelihood.

Each item is an image, a question and its options (``Yes``/``No``, or lettered choices). The prompt (LLaVA-1.5's
``USER: <image>\\n... ASSISTANT:``) is built once, identically for the unpruned model and every trial; one forward
gives the next-token distribution after it, and the option whose token is most likely is the answer (no generation,
so no decoding settings enter the score). Schedules are applied with :func:`tuner.mllm.prepare_llava`, so the prompts'
image tokens follow the pruned count. The timed scope is the prefill by default (pixels and prompt to the first
token's logits: time to first token); ``latency_scope`` picks ``encoder`` (vision tower and projector) or ``generate``
(``new_tokens`` greedy tokens) instead, and the budget applies to it.

Tasks (``--evaluator``), with their datasets (lmms-eval's, under the ids they moved to; any local dataset in the same
schema works with ``--dataset PATH``):

- ``pope``: ``lmms-lab-encoder/POPE`` (test): ``image``, ``question``, ``answer`` (yes/no).
- ``mme``: ``lmms-lab-encoder/MME`` (test): ``image``, ``question``, ``answer`` (Yes/No), ``question_id`` (the
  image's two questions are sampled together: ``calib`` and ``holdout`` count question pairs).
- ``scienceqa``: ``lmms-lab-encoder/ScienceQA``, config ``ScienceQA-IMG`` (test): ``image``, ``question``, ``choices``
  (list), ``answer`` (index), optional ``hint``.
- ``mmbench``: ``lmms-lab-encoder/MMBench``, config ``en`` (dev): ``image``, ``question``, ``A``..``E``, ``answer``
  (letter), optional ``hint``.
- ``mllm``: a local dataset with ``image``, ``question``, ``answer`` and optional ``choices``: yes/no without choices,
  multiple choice with them (``answer`` an index or the choice's text).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from evaluators.base import Evaluator, EvaluatorError, EvaluatorOptions, Split, register_evaluator
from evaluators.calibration import pick_split, resolve_sizes, stratified_split
from evaluators.loading import dtype_name, find_column, load_image_dataset, load_model, load_rgb_images
from tuner.evoprune import Schedule

__all__ = [
    "LETTERS",
    "MllmEvaluator",
    "MllmItem",
    "TaskSpec",
    "build_prompt",
    "option_log_likelihoods",
    "task_items",
]

LETTERS = string.ascii_uppercase[:5]
"""Option letters of multiple-choice prompts."""

YES_NO = ("Yes", "No")


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's data lives and how it is scored.

    Attributes:
        name: the evaluator name.
        dataset: the hub id (``--dataset`` default).
        config: the dataset's config name, or None.
        split: the split (``--dataset-split`` default).
        kind: ``"yesno"`` or ``"choice"``.
        group_column: items sharing this column's value are sampled together (MME's question pairs), or None.
    """

    name: str
    dataset: str | None
    config: str | None
    split: str | None
    kind: str
    group_column: str | None = None


TASKS: dict[str, TaskSpec] = {
    "pope": TaskSpec("pope", "lmms-lab-encoder/POPE", None, "test", "yesno"),
    "mme": TaskSpec("mme", "lmms-lab-encoder/MME", None, "test", "yesno", group_column="question_id"),
    "scienceqa": TaskSpec("scienceqa", "lmms-lab-encoder/ScienceQA", "ScienceQA-IMG", "test", "choice"),
    "mmbench": TaskSpec("mmbench", "lmms-lab-encoder/MMBench", "en", "dev", "choice"),
    "mllm": TaskSpec("mllm", None, None, None, "any"),
}


@dataclass(frozen=True)
class MllmItem:
    """One question: its dataset row, its text, its options and the index of the right one."""

    row: int
    question: str
    options: tuple[str, ...]
    answer: int
    group: str


def build_prompt(item: MllmItem, image_token: str = "<image>") -> str:
    """LLaVA-1.5's single-turn prompt for an item; the answer is the next token after it.

    Example:
        >>> build_prompt(MllmItem(0, "Is there a cat?", YES_NO, 0, "0"))
        'USER: <image>\\nIs there a cat?\\nAnswer the question using a single word or phrase. ASSISTANT:'
        >>> print(build_prompt(MllmItem(0, "Which digit?", ("three", "seven"), 1, "0")))
        USER: <image>
        Which digit?
        A. three
        B. seven
        Answer with the option's letter from the given choices directly. ASSISTANT:
    """
    if item.options == YES_NO:
        body = f"{item.question}\nAnswer the question using a single word or phrase."
    else:
        lines = [f"{LETTERS[i]}. {option}" for i, option in enumerate(item.options)]
        body = "\n".join([item.question, *lines, "Answer with the option's letter from the given choices directly."])
    return f"USER: {image_token}\n{body} ASSISTANT:"


def option_tokens(item: MllmItem) -> tuple[str, ...]:
    """The answer tokens an item's options are scored by: ``Yes``/``No``, or the option letters."""
    return item.options if item.options == YES_NO else tuple(LETTERS[: len(item.options)])


def option_log_likelihoods(next_token_logits: torch.Tensor, option_ids: Sequence[Sequence[int]]) -> list[list[float]]:
    """Log-likelihood of each item's options as the next token: one forward, no generation.

    Args:
        next_token_logits: ``[B, V]`` logits of the token after each prompt.
        option_ids: per item, the token id of each option (items may have different option counts).

    Returns:
        Per item, the log-probability of each option's token under the full next-token distribution.

    Example:
        >>> logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
        >>> [[round(v, 4) for v in row] for row in option_log_likelihoods(logits, [[0, 1], [0, 1, 2]])]
        [[-0.6931, -1.204], [-2.3026, -2.3026, -0.2231]]
    """
    log_probs = torch.log_softmax(next_token_logits.float(), dim=-1)
    return [[float(log_probs[i, token]) for token in ids] for i, ids in enumerate(option_ids)]


def task_items(dataset: Any, spec: TaskSpec, name: str) -> list[MllmItem]:
    """The dataset's rows as items of a task, checked for the columns the task needs.

    Raises:
        EvaluatorError: a missing column or an answer that is not one of the options (the message names both).
    """
    columns = set(dataset.column_names)
    find_column(dataset, ("question",), "question", name)
    find_column(dataset, ("answer",), "answer", name)
    kind = spec.kind
    if kind == "any":
        kind = "choice" if "choices" in columns else "yesno"
    letters = [letter for letter in LETTERS if letter in columns]
    if kind == "choice" and "choices" not in columns and not letters:
        raise EvaluatorError(
            f"dataset {name!r} has no options for a multiple-choice task: give a 'choices' column (a list) or "
            f"columns A, B, ...; it has: {', '.join(sorted(columns))}"
        )
    group_column = spec.group_column if spec.group_column in columns else None
    items = []
    table = dataset.remove_columns([c for c in ("image",) if c in columns])
    for row, record in enumerate(table):
        hint = str(record.get("hint") or "").strip()
        question = f"{hint}\n{record['question']}".strip() if hint else str(record["question"]).strip()
        if kind == "yesno":
            options: tuple[str, ...] = YES_NO
            answer_text = str(record["answer"]).strip().lower()
            if answer_text not in ("yes", "no"):
                raise EvaluatorError(f"dataset {name!r} row {row}: answer {record['answer']!r} is not yes or no")
            answer = 0 if answer_text == "yes" else 1
        else:
            if "choices" in columns:
                options = tuple(str(choice) for choice in record["choices"])
            else:
                options = tuple(str(record[letter]) for letter in letters if record[letter] not in (None, "", "nan"))
            answer = _answer_index(record["answer"], options, row, name)
        group = str(record[group_column]) if group_column else str(row)
        items.append(MllmItem(row, question, options, answer, group))
    return items


def _answer_index(answer: Any, options: tuple[str, ...], row: int, name: str) -> int:
    if not 2 <= len(options) <= len(LETTERS):
        raise EvaluatorError(f"dataset {name!r} row {row}: {len(options)} options; 2 to {len(LETTERS)} are scored")
    if isinstance(answer, int) and 0 <= answer < len(options):
        return answer
    text = str(answer).strip()
    if text in LETTERS[: len(options)]:
        return LETTERS.index(text)
    if text in options:
        return options.index(text)
    raise EvaluatorError(f"dataset {name!r} row {row}: answer {answer!r} is none of the {len(options)} options")


class MllmEvaluator(Evaluator):
    """Accuracy of a LLaVA model on a yes/no or multiple-choice task, scored by option log-likelihood.

    Args:
        options: the shared :class:`~evaluators.base.EvaluatorOptions`. ``model`` (required): a local folder or hub
            id of a ``LlavaForConditionalGeneration`` with its processor saved beside it; ``dataset``: the task's hub
            id by default, or a local dataset in its schema; ``calib``/``holdout`` count items (question pairs for
            MME), stratified by answer; ``batch_size`` prompts per forward.
        **settings: fields of :class:`~evaluators.base.EvaluatorOptions` that override ``options``.

    Attributes:
        task: the task's :class:`TaskSpec`.
        processor: the model's processor (tokenizer padding on the left).
        calib_items: the calibration items; ``holdout_items`` the held-out ones.
        latency_scope: what :meth:`latency_call` times: ``prefill`` (default; pixels and prompt to the first
            token's logits), ``encoder`` (vision tower and projector) or ``generate`` (``new_tokens`` greedy tokens).

    Raises:
        EvaluatorError: a missing or non-LLaVA model, a processor that cannot be loaded, a dataset without the
            task's columns, options whose answer tokens collide, or bad sizes.
    """

    spec: ClassVar[TaskSpec] = TASKS["mllm"]
    default_calib: ClassVar[int] = 200
    default_holdout: ClassVar[int] = 200
    default_batch_size: ClassVar[int] = 8
    requires: ClassVar[dict[str, str]] = {"model": "a LLaVA model folder or hub id"}
    latency_scopes: ClassVar[tuple[str, ...]] = ("prefill", "encoder", "generate")

    def __init__(self, options: EvaluatorOptions | None = None, /, **settings: Any) -> None:
        options = EvaluatorOptions.of(options, settings)
        self.task = self.spec
        if options.model is None:
            raise EvaluatorError(f"the {self.task.name} evaluator needs a LLaVA model; give model", param="model")
        dataset_name = options.dataset or self.task.dataset
        if dataset_name is None:
            raise EvaluatorError(
                f"the {self.task.name} evaluator needs a dataset (image, question, answer, optional choices); give "
                "dataset",
                param="dataset",
            )
        self._set_runtime(options, self.default_batch_size)
        self.model_name, self.dataset_name = options.model, dataset_name
        self.model = load_model(
            options.model, device=self.device, dtype=self.dtype, allowed=("LlavaForConditionalGeneration",),
            purpose="a LLaVA model (LlavaForConditionalGeneration)",
        )  # fmt: skip
        self.processor = _load_llava_processor(options.model)
        dataset, self.dataset_split = self._load_dataset(dataset_name, options.dataset_split)
        items = task_items(dataset, self.task, dataset_name)
        self.calib, self.holdout, calib_rows, holdout_rows = self._split(items, options)
        self.calib_items = [items[i] for i in calib_rows]
        self.holdout_items = [items[i] for i in holdout_rows]
        self._option_ids: dict[tuple[str, ...], list[int]] = {}
        self._batches = {
            "calib": self._prepare(dataset, self.calib_items, dataset_name),
            "holdout": self._prepare(dataset, self.holdout_items, dataset_name),
        }

    # ------------------------------------------------------------------------------------------------ interface

    def applied(self, schedule: Schedule) -> Any:
        """The schedule in the vision tower and the prompts' image tokens rewritten (:func:`prepare_llava`)."""
        from transformers import LlavaForConditionalGeneration

        from tuner.mllm import prepare_llava

        assert isinstance(self.model, LlavaForConditionalGeneration)  # load_model allowed no other class
        return prepare_llava(self.model, schedule)

    def accuracy(self, split: Split = "calib") -> float:
        """Share of items whose most likely option is the right one."""
        items = pick_split(split, self.calib_items, self.holdout_items)
        if not items:
            raise EvaluatorError(f"the {split} split is empty; give {split} 1 or more", param=split)
        scores = self.option_scores(split)
        correct = sum(
            max(range(len(s)), key=s.__getitem__) == item.answer for s, item in zip(scores, items, strict=True)
        )
        return correct / len(items)

    def option_scores(self, split: Split = "calib") -> list[list[float]]:
        """Per item of the split, the log-likelihood of each option (see :func:`option_log_likelihoods`)."""
        batches = pick_split(split, self._batches["calib"], self._batches["holdout"])
        scores: list[list[float]] = []
        with torch.inference_mode():
            for inputs, option_ids, _ in batches:
                logits = self.model(**inputs, logits_to_keep=1).logits[:, -1, :]
                scores += option_log_likelihoods(logits, option_ids)
        return scores

    def latency_call(self) -> Callable[[], Any]:
        """The timed scope on the first calibration batch (:attr:`latency_scope`, see :meth:`describe_latency`):

        - ``encoder``: the vision tower and the projector on the batch's pixels (:meth:`_encoder_call`);
        - ``prefill`` (the default): pixels and prompts to the first new token's logits: time to first token;
        - ``generate``: greedy generation of exactly :attr:`new_tokens` tokens (end-of-sequence ignored, so every
          schedule generates as many).
        """
        inputs = self._batches["calib"][0][0]
        model: Any = self.model
        if self.latency_scope == "encoder":
            return self._encoder_call(inputs)
        if self.latency_scope == "generate":
            # generate derives positions from the mask and its cache; given ones would cover the prompt only.
            prompt = {key: value for key, value in inputs.items() if key != "position_ids"}
            new_tokens = self.new_tokens

            def generate() -> None:
                model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

            return generate

        def prefill() -> None:
            model(**inputs, logits_to_keep=1)

        return prefill

    def _encoder_call(self, inputs: dict[str, Any]) -> Callable[[], Any]:
        """The ``encoder`` scope: the vision tower (the layers that run) and the projector on the batch's pixels."""
        model: Any = self.model
        inner, config = model.model, model.config
        pixel_values = inputs["pixel_values"]

        def encode() -> None:
            inner.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            )

        return encode

    def settings(self) -> dict[str, Any]:
        return {
            "evaluator": self.name, "model": self.model_name, "dataset": self.dataset_name,
            "dataset_split": self.dataset_split, "calib": self.calib, "holdout": self.holdout,
            "batch_size": self.batch_size, "device": str(self.device), "dtype": dtype_name(self.dtype),
            "seed": self.seed, "latency_scope": self.latency_scope,
            **({"new_tokens": self.new_tokens} if self.latency_scope == "generate" else {}),
        }  # fmt: skip

    # ------------------------------------------------------------------------------------------------- building

    def _load_dataset(self, name: str, split: str | None) -> tuple[Any, str | None]:
        spec = self.task
        if Path(name).expanduser().exists() or name != spec.dataset or spec.config is None:
            return load_image_dataset(name, split or (spec.split if name == spec.dataset else None))
        import datasets

        wanted = split or spec.split
        try:
            return datasets.load_dataset(name, spec.config, split=wanted), wanted
        except Exception as error:  # noqa: BLE001 - offline, missing, gated: one line either way
            raise EvaluatorError(
                f"cannot load dataset {name!r} (config {spec.config}, split {wanted}): {type(error).__name__}; give "
                "a local copy with dataset",
                param="dataset",
            ) from None

    def _split(self, items: list[MllmItem], options: EvaluatorOptions) -> tuple[int, int, list[int], list[int]]:
        """Stratified by answer; grouped items (MME's pairs) are drawn together, sizes counting groups."""
        groups: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault(item.group, []).append(index)
        keys = list(groups)
        labels = [tuple(items[i].answer for i in groups[key]) for key in keys]
        calib, holdout = resolve_sizes(options.calib, options.holdout, len(keys), self.default_calib,
                                       self.default_holdout)  # fmt: skip
        calib_groups, holdout_groups = stratified_split(labels, calib, holdout, self.seed)
        calib_rows = [i for g in calib_groups for i in groups[keys[g]]]
        holdout_rows = [i for g in holdout_groups for i in groups[keys[g]]]
        return calib, holdout, calib_rows, holdout_rows

    def _ids_of(self, options: tuple[str, ...], name: str) -> list[int]:
        if options not in self._option_ids:
            tokenizer = self.processor.tokenizer
            ids = [tokenizer.encode(token, add_special_tokens=False)[:1] for token in options]
            flat = [found[0] if found else -1 for found in ids]
            if -1 in flat or len(set(flat)) != len(flat):
                raise EvaluatorError(
                    f"the tokenizer of {self.model_name!r} does not give the answers {', '.join(options)} distinct "
                    f"first tokens, so they cannot be scored by likelihood (dataset {name!r})"
                )
            self._option_ids[options] = flat
        return self._option_ids[options]

    def _prepare(self, dataset: Any, items: list[MllmItem], name: str) -> list[tuple[dict[str, Any], Any, Any]]:
        """Processor outputs per batch (on the device), with each item's option token ids and answer."""
        image_column = find_column(dataset, ("image", "img"), "image", name)
        image_token = getattr(self.processor, "image_token", "<image>")
        batches = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            images = load_rgb_images(dataset, image_column, [item.row for item in chunk], name)
            prompts = [build_prompt(item, image_token) for item in chunk]
            inputs = self._device_inputs(self.processor(images=images, text=prompts, return_tensors="pt", padding=True))
            option_ids = [self._ids_of(option_tokens(item), name) for item in chunk]
            batches.append((inputs, option_ids, [item.answer for item in chunk]))
        return batches


    def _device_inputs(self, encoded: Any) -> dict[str, Any]:
        """The processor's ids, mask and pixels on the device (pixels in the model's dtype), with positions counted
        from the mask, so a left-padded prompt scores as it would alone."""
        inputs = {
            key: value.to(self.device, dtype=self.dtype) if key == "pixel_values" else value.to(self.device)
            for key, value in encoded.items()
            if key in ("input_ids", "attention_mask", "pixel_values")
        }
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return inputs


def _load_llava_processor(name: str) -> Any:
    from transformers import AutoProcessor

    local = Path(name).expanduser()
    try:
        processor = AutoProcessor.from_pretrained(str(local) if local.exists() else name)
    except Exception as error:  # noqa: BLE001
        raise EvaluatorError(
            f"cannot load the processor of {name!r} ({type(error).__name__}); save the LlavaProcessor beside the "
            "model (processor.save_pretrained)",
            param="model",
        ) from None
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise EvaluatorError(f"the processor of {name!r} is not a LLaVA processor (tokenizer + image processor)")
    tokenizer.padding_side = "left"  # the next token after every prompt is then at the last position
    return processor


def _task_class(spec: TaskSpec) -> type[MllmEvaluator]:
    doc = f"{MllmEvaluator.__doc__}\n    Task: {spec.name} ({spec.dataset or 'a local dataset'})."
    return type(f"{spec.name.capitalize()}Evaluator", (MllmEvaluator,), {"spec": spec, "__doc__": doc})


for _spec in TASKS.values():
    register_evaluator(_spec.name)(_task_class(_spec))
