"""Shared fixtures of the tuner tests (runner and CLI): a working folder, the CLI entry point."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class TunerCliResult:
    """Exit code and captured output of one ``tuner`` invocation."""

    code: int
    out: str
    err: str


@pytest.fixture
def tuner_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh current folder (``studies/`` lands here)."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.fixture
def tuner_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., TunerCliResult]:
    """Invoke the real entry point (``tuner.cli.main``, what ``python -m tuner`` runs) in this process."""
    from tuner.cli import main

    def invoke(*args: str) -> TunerCliResult:
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        captured = capsys.readouterr()
        return TunerCliResult(code, captured.out, captured.err)

    return invoke


@pytest.fixture
def tuner_subprocess_env() -> dict[str, str]:
    """Environment for ``python -m tuner`` in a subprocess: the repo importable."""
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("COLUMNS", "160")
    return env
