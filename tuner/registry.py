"""One small registry of named things (evaluators, search spaces), open to plugins through entry points.

A registry holds what the project registers itself (a class decorator at import) and, on the first lookup, what
installed distributions declare in its entry-point group (``tuner.evaluators``, ``tuner.search_spaces``). A plugin
needs no code of the tuner to run for it to be found: a distribution with, in its ``pyproject.toml``::

    [project.entry-points."tuner.evaluators"]
    mytask = "my_package.tasks:MyTaskEvaluator"

    [project.entry-points."tuner.search_spaces"]
    myspace = "my_package.spaces:MySpace"

makes ``tuner run --evaluator mytask --space myspace`` work once installed. The entry point's name is the name it is
registered under; what it points to is passed through the registry's ``adapt`` function (an evaluator class gets
its ``name`` set; a search space class is instantiated, and its ``name`` must be the entry point's). A name
registered twice is an error, as is an entry point that cannot be loaded.

Example:
    >>> colours = Registry[str]("colour")
    >>> colours.register("red", "#f00")
    '#f00'
    >>> colours.get("blue")
    Traceback (most recent call last):
    ...
    tuner.errors.TunerError: unknown colour 'blue'; available: red
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any, Generic, TypeVar

from tuner.errors import TunerError

__all__ = ["ADAPTER_GROUP", "EVALUATOR_GROUP", "SEARCH_SPACE_GROUP", "Registry"]

EVALUATOR_GROUP = "tuner.evaluators"
"""Entry-point group of evaluator classes (``evaluators.Evaluator`` subclasses)."""

SEARCH_SPACE_GROUP = "tuner.search_spaces"
"""Entry-point group of search spaces (``search_spaces.SearchSpace`` subclasses or instances)."""

ADAPTER_GROUP = "tuner.adapters"
"""Entry-point group of encoder adapters (modules that call ``tuner.evoprune.adapters.register_adapter``)."""

T = TypeVar("T")


class Registry(Generic[T]):
    """Named items of one kind, with the entry points of one group loaded on the first lookup.

    Args:
        kind: what the items are, for messages (``"evaluator"``, ``"search space"``).
        group: the entry-point group whose entry points are loaded on the first lookup; None for none.
        error: the error raised for an unknown or duplicate name (a :class:`~tuner.errors.TunerError`).
        adapt: turns what an entry point loads into an item, given its name (default: as loaded).
        hint: appended to the unknown-name message (e.g. ``"see `tuner spaces`"``).
    """

    def __init__(
        self,
        kind: str,
        group: str | None = None,
        *,
        error: type[TunerError] = TunerError,
        adapt: Callable[[str, Any], T] | None = None,
        hint: str = "",
    ) -> None:
        self.kind = kind
        self.group = group
        self.error = error
        self.adapt = adapt
        self.hint = hint
        self._items: dict[str, T] = {}
        self._loaded = group is None

    def register(self, name: str, item: T) -> T:
        """Register ``item`` as ``name`` (the same item again is a no-op).

        Returns:
            The item (so that a decorator can return it).

        Raises:
            TunerError: the registry's error: another item already has that name.
        """
        found = self._items.get(name)
        if found is not None and found is not item:
            raise self.error(
                f"{self.kind} {name!r} is registered twice ({_origin(found)} and {_origin(item)}); rename one"
            )
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        """The item registered as ``name``.

        Raises:
            TunerError: the registry's error: an unknown name (the message lists the known ones), or a plugin's
                entry point that cannot be loaded.
        """
        self._load_entry_points()
        try:
            return self._items[name]
        except KeyError:
            hint = f" ({self.hint})" if self.hint else ""
            raise self.error(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}{hint}") from None

    def names(self) -> list[str]:
        """The registered names, sorted (entry points included)."""
        self._load_entry_points()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _load_entry_points(self) -> None:
        """Register every entry point of the group, once (again after a failure, which is raised each time)."""
        if self._loaded or self.group is None:
            return
        for entry_point in metadata.entry_points(group=self.group):
            try:
                loaded = entry_point.load()
            except Exception as error:  # noqa: BLE001 - a broken plugin: one line naming it, not a traceback
                raise self.error(
                    f"cannot load {self.kind} {entry_point.name!r} ({entry_point.value}, entry point of "
                    f"{_distribution(entry_point)} in group {self.group}): {type(error).__name__}: {error}; fix or "
                    "uninstall that package"
                ) from None
            item = self.adapt(entry_point.name, loaded) if self.adapt is not None else loaded
            self.register(entry_point.name, item)
        self._loaded = True


def _origin(item: object) -> str:
    kind = item if isinstance(item, type) else type(item)
    return f"{kind.__module__}.{kind.__qualname__}"


def _distribution(entry_point: metadata.EntryPoint) -> str:
    found = getattr(entry_point, "dist", None)
    return f"{found.name} {found.version}" if found is not None else "an installed package"
