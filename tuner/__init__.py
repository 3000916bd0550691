"""tuner: search, per model, task and latency budget, for the best EvoPrune token-merging schedule, and export it."""

from importlib import metadata as _metadata

try:
    __version__: str = _metadata.version("tuner")
except _metadata.PackageNotFoundError:  # running from a source checkout that is not installed
    __version__ = "0.1.0"

__all__ = ["__version__"]
