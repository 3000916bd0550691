"""The interface every accuracy evaluator implements, the options they share, and the registry that finds them.

Evaluators are found by name in a :class:`~tuner.registry.Registry`: the built-in ones register with
:func:`register_evaluator`, and installed packages add theirs through the ``tuner.evaluators`` entry-point group.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from tuner.errors import EvaluatorError
from tuner.evoprune import Schedule
from tuner.registry import EVALUATOR_GROUP, Registry

__all__ = [
    "EVALUATORS",
    "LATENCY_SCOPES",
    "Evaluator",
    "EvaluatorError",
    "EvaluatorOptions",
    "Split",
    "available_evaluators",
    "evaluator_class",
    "get_evaluator",
    "register_evaluator",
]

Split = Literal["calib", "holdout"]

LATENCY_SCOPES: dict[str, str] = {
    "encoder": "the vision path: pixels on the device to the visual features (the encoder, and a multimodal LLM's "
    "projector)",
    "prefill": "pixels and prompt on the device to the first new token's logits (vision tower, projector and the "
    "language model's prefill): time to first token",
    "generate": "pixels and prompt on the device to {new_tokens} new tokens, greedy (prefill and {new_tokens} decoding "
    "steps)",
}
"""What each latency scope times (``--latency-scope``); an evaluator says which it offers
(:attr:`Evaluator.latency_scopes`). The budget applies to the chosen scope."""


@dataclass(frozen=True)
class EvaluatorOptions:
    """What every evaluator is built from (``tuner run`` passes its flags of the same names).

    Attributes:
        model: a model folder or hub id; None where the evaluator ships its own (the demo).
        dataset: a dataset (hub id, ``save_to_disk`` folder, data folder or file); None where it renders its own.
        dataset_split: the dataset's split; None for test, validation or train, whichever it has first.
        calib: calibration items; None for the evaluator's default.
        holdout: held-out items, disjoint from the calibration items; None for the evaluator's default.
        batch_size: items per forward, for accuracy and latency alike; None for the evaluator's default.
        device: where the model runs.
        dtype: ``"auto"`` (fp16 on CUDA, fp32 on CPU), ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        seed: seeds the calibration/held-out split (and anything else random in the task).
        latency_scope: what is timed (:data:`LATENCY_SCOPES`); None for the evaluator's default.
        new_tokens: tokens generated per timed call with the ``generate`` scope.
        frames: frames sampled per video (a video task's ``--frames``); None for the evaluator's default. An evaluator
            without video (:attr:`Evaluator.default_frames` None) refuses any other value.

    Example:
        >>> EvaluatorOptions.of(None, {"calib": 64, "seed": 3}).calib
        64
        >>> EvaluatorOptions.of(None, {"calibration": 64})
        Traceback (most recent call last):
        ...
        tuner.errors.EvaluatorError: unknown evaluator option 'calibration'; valid: model, dataset, dataset_split, \
calib, holdout, batch_size, device, dtype, seed, latency_scope, new_tokens, frames
    """

    model: str | None = None
    dataset: str | None = None
    dataset_split: str | None = None
    calib: int | None = None
    holdout: int | None = None
    batch_size: int | None = None
    device: str | torch.device = "cpu"
    dtype: str | torch.dtype = "auto"
    seed: int = 0
    latency_scope: str | None = None
    new_tokens: int = 16
    frames: int | None = None

    @classmethod
    def of(cls, options: EvaluatorOptions | None, settings: Mapping[str, Any]) -> EvaluatorOptions:
        """``options`` (default: all defaults) with ``settings`` (keyword arguments of a constructor) applied.

        Raises:
            EvaluatorError: a setting that is not an option (the message lists the valid ones).
        """
        names = [field.name for field in dataclasses.fields(cls)]
        for name in settings:
            if name not in names:
                raise EvaluatorError(f"unknown evaluator option {name!r}; valid: {', '.join(names)}")
        return dataclasses.replace(options or cls(), **settings)


class Evaluator(ABC):
    """A task the tuner scores schedules on: a model, calibration and held-out data, and a metric.

    The constructor takes an :class:`EvaluatorOptions` and/or its fields as keywords (``DemoEvaluator(calib=64)``,
    ``DemoEvaluator(options)``, ``DemoEvaluator(options, seed=1)``). It loads the model and the data and computes
    everything that must come from the *unpruned* model (reference predictions, text embeddings): no schedule is
    applied while it runs. After that, the runner applies a schedule to ``self.model`` (``tuner.evoprune.apply``) and
    calls :meth:`accuracy` and :meth:`latency_call`.

    Attributes:
        name: the registry name.
        model: the module schedules are applied to (a model the EvoPrune adapters support).
        batch_size: items per forward, for accuracy and latency alike.
        device: where the model runs.
        dtype: the model's dtype.
        seed: seeds the calibration/held-out split (and anything else random in the task).
    """

    name: ClassVar[str]
    requires: ClassVar[dict[str, str]] = {}
    """Options this evaluator cannot run without, each with what it must be (checked by :meth:`check_required`)."""
    latency_scopes: ClassVar[tuple[str, ...]] = ("encoder",)
    """The latency scopes (:data:`LATENCY_SCOPES`) this evaluator can time; the first is its default."""
    latency_scope: str = "encoder"
    """The scope :meth:`latency_call` times (set from the options by :meth:`_set_runtime`)."""
    new_tokens: int = 16
    """Tokens generated per timed call with the ``generate`` scope."""
    frames_per_item: int = 1
    """Frames per video the encoder sees as consecutive batch items (temporal merging's unit); 1 for images."""
    default_frames: ClassVar[int | None] = None
    """Frames sampled per video when the options give none; None for an evaluator without video (it refuses
    ``frames``, see :meth:`check_frames`)."""
    model: nn.Module
    batch_size: int
    device: torch.device
    dtype: torch.dtype
    seed: int

    @abstractmethod
    def accuracy(self, split: Split = "calib") -> float:
        """The metric in [0, 1] on the calibration subset or the held-out slice, under the applied schedule."""

    @abstractmethod
    def latency_call(self) -> Callable[[], Any]:
        """A zero-argument callable that runs the timed scope (:attr:`latency_scope`) on one batch of ``batch_size``."""

    def describe_latency(self) -> str:
        """What one timed call covers, in words (the study, ``--help`` and the export say it)."""
        what = LATENCY_SCOPES[self.latency_scope].format(new_tokens=self.new_tokens)
        return f"{self.latency_scope} scope: {what}; one batch of {self.batch_size}"

    @classmethod
    def check_latency_scope(cls, scope: str | None, new_tokens: int = 16) -> str:
        """The scope this evaluator times for ``scope`` (None: its default).

        Raises:
            EvaluatorError: a scope this evaluator cannot time (the message lists those it can), or ``new_tokens``
                below 1.

        Example:
            >>> class Encoder(Evaluator):
            ...     name = "encoder-only"
            >>> Encoder.check_latency_scope(None)
            'encoder'
            >>> Encoder.check_latency_scope("prefill")
            Traceback (most recent call last):
            ...
            tuner.errors.EvaluatorError: the encoder-only evaluator cannot time the prefill scope (it has no language \
model); available: encoder
        """
        if scope is None:
            return cls.latency_scopes[0]
        if scope not in LATENCY_SCOPES:
            raise EvaluatorError(
                f"unknown latency scope {scope!r}; available: {', '.join(LATENCY_SCOPES)}", param="latency_scope"
            )
        if scope not in cls.latency_scopes:
            why = " (it has no language model)" if cls.latency_scopes == ("encoder",) else ""
            raise EvaluatorError(
                f"the {cls.name} evaluator cannot time the {scope} scope{why}; available: "
                f"{', '.join(cls.latency_scopes)}",
                param="latency_scope",
            )
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
            raise EvaluatorError(f"new_tokens must be an integer >= 1, got {new_tokens!r}", param="new_tokens")
        return scope

    @classmethod
    def check_frames(cls, frames: int | None) -> int | None:
        """The frames per video this evaluator samples for ``frames`` (None: its :attr:`default_frames`).

        Raises:
            EvaluatorError: ``frames`` given to an evaluator without video, or not an integer >= 1.

        Example:
            >>> class Images(Evaluator):
            ...     name = "images"
            >>> Images.check_frames(None) is None
            True
            >>> Images.check_frames(32)
            Traceback (most recent call last):
            ...
            tuner.errors.EvaluatorError: frames applies to video tasks (videomme); task 'images' has no video: leave \
out frames
        """
        if frames is None:
            return cls.default_frames
        if cls.default_frames is None:
            raise EvaluatorError(
                f"frames applies to video tasks ({', '.join(_video_tasks())}); task {cls.name!r} has no video: leave "
                "out frames",
                param="frames",
            )
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise EvaluatorError(f"frames must be an integer >= 1, got {frames!r}", param="frames")
        return frames

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """JSON-serialisable settings that identify the task (model, dataset, sizes, seed): a study's identity."""

    def applied(self, schedule: Schedule) -> AbstractContextManager[Any]:
        """``schedule`` applied to :attr:`model` for :meth:`accuracy` and :meth:`latency_call`; a context manager that
        removes it. The engine's :func:`tuner.evoprune.apply` by default; an evaluator whose model needs more than
        its encoder patched (a multimodal LLM's prompts) prepares it here.
        """
        from tuner.evoprune import apply

        return apply(self.model, schedule)

    @classmethod
    def check_required(cls, given: Mapping[str, Any]) -> None:
        """Refuse settings that lack an option this evaluator needs, naming only the missing ones.

        Raises:
            EvaluatorError: one line naming each missing option and what it must be.
        """
        missing = [name for name in cls.requires if given.get(name) is None]
        if missing:
            wanted = " and ".join(f"{name} ({cls.requires[name]})" for name in missing)
            raise EvaluatorError(
                f"the {cls.name} evaluator needs {wanted}; give {' and '.join(missing)}", param=tuple(missing)
            )

    def _set_runtime(self, options: EvaluatorOptions, default_batch_size: int) -> None:
        """Check and set ``device``, ``dtype``, ``batch_size`` and ``seed``: the start every constructor shares.

        Raises:
            EvaluatorError: an unknown or unavailable device, an unknown dtype, or a batch size below 1.
        """
        from evaluators.loading import resolve_batch_size, resolve_device, resolve_dtype

        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        self.batch_size = resolve_batch_size(options.batch_size, default_batch_size)
        self.seed = int(options.seed)
        self.latency_scope = self.check_latency_scope(options.latency_scope, options.new_tokens)
        self.new_tokens = int(options.new_tokens)
        self.check_frames(options.frames)


def _video_tasks() -> list[str]:
    """The registered evaluators that sample video frames (for messages); ``videomme`` where the registry cannot be
    read (a plugin that fails to load must not hide the message it is part of)."""
    try:
        return [name for name in EVALUATORS.names() if EVALUATORS.get(name).default_frames is not None] or ["videomme"]
    except Exception:  # noqa: BLE001 - any plugin failure: fall back to the built-in video task
        return ["videomme"]


def evaluator_class(name: str, loaded: Any) -> type[Evaluator]:
    """What an entry point of ``tuner.evaluators`` loads: an :class:`Evaluator` subclass, named as the entry point."""
    if not (isinstance(loaded, type) and issubclass(loaded, Evaluator)):
        raise EvaluatorError(
            f"entry point {name!r} of group {EVALUATOR_GROUP} is not an Evaluator subclass: {loaded!r}"
        )
    loaded.name = name
    return loaded


EVALUATORS: Registry[type[Evaluator]] = Registry(
    "evaluator", EVALUATOR_GROUP, error=EvaluatorError, adapt=evaluator_class
)
"""The evaluators by name: the built-in ones and those of installed packages (entry points)."""


def register_evaluator(name: str) -> Callable[[type[Evaluator]], type[Evaluator]]:
    """Class decorator: make an evaluator available under ``name`` (a name taken by another class is an error)."""

    def decorator(cls: type[Evaluator]) -> type[Evaluator]:
        cls.name = name
        return EVALUATORS.register(name, cls)

    return decorator


def available_evaluators() -> list[str]:
    """Names of the registered evaluators, sorted."""
    return EVALUATORS.names()


def get_evaluator(name: str) -> type[Evaluator]:
    """The evaluator class registered as ``name``.

    Raises:
        EvaluatorError: unknown name; the message lists the available ones.
    """
    return EVALUATORS.get(name)
