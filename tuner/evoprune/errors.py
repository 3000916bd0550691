"""Errors raised by the EvoPrune engine.

Every error carries a one-line message that names the problem and, where there is one, the fix; the CLI prints it
as is and exits with code 2.
"""

from __future__ import annotations


class EvoPruneError(ValueError):
    """Base class of every error the engine raises on bad input."""


class ScheduleError(EvoPruneError):
    """A schedule (plan, scoring settings or JSON document) is invalid."""


class UnsupportedModelError(EvoPruneError):
    """A model that no adapter knows."""
