"""The interface every accuracy evaluator implements, and the registry that finds them by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from torch import nn

Split = Literal["calib", "holdout"]


class EvaluatorError(ValueError):
    """Bad evaluator input (unknown name, unknown model, a dataset without the needed columns, ...).

    The message is one line that names the problem and the fix; the CLI prints it and exits with code 2.
    """


class Evaluator(ABC):
    """A task the tuner scores schedules on: a model, calibration and held-out data, and a metric.

    The constructor loads the model and the data and computes everything that must come from the *unpruned* model
    (reference predictions, text embeddings): no schedule is applied while it runs. After that, the runner applies a
    schedule to ``self.model`` (``tuner.evoprune.apply``) and calls :meth:`accuracy` and :meth:`latency_call`.

    Attributes:
        name: the registry name.
        model: the module schedules are applied to (a model the EvoPrune adapters support).
        batch_size: items per forward, for accuracy and latency alike.
        device: where the model runs.
        dtype: the model's dtype.
        seed: seeds the calibration/held-out split (and anything else random in the task).
    """

    name: ClassVar[str]
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
        """A zero-argument callable that runs the timed scope (the encoder path) on one batch of ``batch_size``."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """JSON-serialisable settings that identify the task (model, dataset, sizes, seed): a study's identity."""

    def describe(self) -> str:
        """One line for progress output."""
        return f"{self.name}: {self.settings()}"

    def _set_runtime(
        self,
        device: str | torch.device,
        dtype: str | torch.dtype,
        batch_size: int | None,
        default_batch_size: int,
        seed: int,
    ) -> None:
        """Check and set ``device``, ``dtype``, ``batch_size`` and ``seed``: the start every constructor shares.

        Raises:
            EvaluatorError: an unknown or unavailable device, an unknown dtype, or a batch size below 1.
        """
        from evaluators.loading import resolve_batch_size, resolve_device, resolve_dtype

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = resolve_batch_size(batch_size, default_batch_size)
        self.seed = int(seed)


_REGISTRY: dict[str, type[Evaluator]] = {}


def register_evaluator(name: str) -> Callable[[type[Evaluator]], type[Evaluator]]:
    """Class decorator: make an evaluator available under ``name``."""

    def decorator(cls: type[Evaluator]) -> type[Evaluator]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_evaluators() -> list[str]:
    """Names of the registered evaluators, sorted."""
    return sorted(_REGISTRY)


def get_evaluator(name: str) -> type[Evaluator]:
    """The evaluator class registered as ``name``.

    Raises:
        EvaluatorError: unknown name; the message lists the available ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise EvaluatorError(f"unknown evaluator {name!r}; available: {', '.join(available_evaluators())}") from None
