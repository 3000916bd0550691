"""The tuner's errors: one root, :class:`TunerError`, for every bad input outside the engine.

Every error is one line that names the problem and the fix. A message names the parameters it is about by their
library names (``batch_size``, ``storage``, ``budget``: the fields of ``tuner.options.RunOptions`` and the evaluators'
constructor arguments), and the error lists them in :attr:`TunerError.params`. The command line prints the same
message with each of those names as its flag (``batch_size`` -> ``--batch-size``, see :func:`render`), so the library
and the CLI say the same thing in their own words.

The engine (``tuner.evoprune``) sits below the rest and imports nothing of it, so its root
:class:`~tuner.evoprune.errors.EvoPruneError` cannot subclass :class:`TunerError`. Both are ``ValueError`` subclasses,
and :data:`BAD_INPUT_ERRORS` is the pair to catch for "any bad input to the tuner" (the CLI catches it, prints the
line and exits with code 2):

    >>> try:
    ...     raise BudgetError("budget must be positive, got -1", param="budget")
    ... except BAD_INPUT_ERRORS as error:
    ...     print(render(error, lambda name: "--" + name))
    --budget must be positive, got -1
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from tuner.evoprune.errors import EvoPruneError

__all__ = [
    "BAD_INPUT_ERRORS",
    "BudgetError",
    "EvaluatorError",
    "LatencyError",
    "SearchSpaceError",
    "StorageError",
    "StudyError",
    "TunerError",
    "render",
]


class TunerError(ValueError):
    """Root of the tuner's bad-input errors (a ``ValueError``, as the errors it replaces were).

    Args:
        message: one line: the problem and the fix, naming the parameters in ``param`` by their library names. In a
            message with parameters, every whole-word occurrence of such a name stands for the parameter (the CLI
            shows it as a flag), so a message uses other words for anything else.
        param: the parameter (or parameters) the message is about, if any.

    Attributes:
        params: the parameters the message is about, in order.
    """

    def __init__(self, message: str, *, param: str | Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.params: tuple[str, ...] = (param,) if isinstance(param, str) else tuple(param or ())

    @property
    def param(self) -> str | None:
        """The first parameter the message is about, or None."""
        return self.params[0] if self.params else None


class EvaluatorError(TunerError):
    """Bad evaluator input: an unknown name, model or device, a dataset without the needed columns, bad sizes."""


class SearchSpaceError(TunerError):
    """Bad search-space input: an unknown name, parameters that do not belong to the space."""


class BudgetError(TunerError):
    """A latency budget that cannot be parsed or makes no sense."""


class LatencyError(TunerError):
    """Bad latency-measurement input: an unavailable device, a bad latency model, mismatched samples."""


class StorageError(TunerError):
    """The storage cannot be opened or used: a bad URL, a locked, corrupt or missing file, a missing driver."""


class StudyError(TunerError):
    """A study that cannot be created, resumed or read: other settings, not a tuner study, no such study."""


BAD_INPUT_ERRORS: tuple[type[ValueError], ...] = (TunerError, EvoPruneError)
"""Every bad-input error of the tuner and its engine: what a caller catches to report one line and go on."""


def render(error: BaseException, flag: Callable[[str], str]) -> str:
    """The error's message on one line, each of its parameters' names written as ``flag(name)``.

    Only whole words are replaced, never part of a path, URL, quoted value or longer name (``storage`` in
    ``sqlite:///studies/storage.db`` or in ``storage_url`` stays).

    Example:
        >>> error = EvaluatorError("batch_size must be an integer >= 1, got 0", param="batch_size")
        >>> render(error, lambda name: "--" + name.replace("_", "-"))
        '--batch-size must be an integer >= 1, got 0'
    """
    text = " ".join(str(error).split())
    for name in getattr(error, "params", ()):
        pattern = re.compile(rf"(?<![\w./:@'\"-]){re.escape(name)}(?![\w/'\"-]|\.\w)")
        text = pattern.sub(flag(name).replace("\\", r"\\"), text)
    return text
