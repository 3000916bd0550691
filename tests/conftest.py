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


# ------------------------------------------------------------------------------------------------------- PostgreSQL


def postgres_bindir() -> Path | None:
    """The folder of a PostgreSQL server's ``initdb`` and ``pg_ctl``: Debian's ``/usr/lib/postgresql/<version>/bin``
    (newest first), else wherever ``pg_ctl`` is on the PATH."""
    import shutil

    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: p.parent.name, reverse=True)
    found = shutil.which("pg_ctl")
    if found:
        candidates.append(Path(found).resolve().parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


@dataclass
class PostgresServer:
    """A throwaway PostgreSQL cluster on a loopback port; :meth:`database` makes a fresh database for one test."""

    port: int
    user: str
    root: Path
    count: int = 0

    def database(self) -> str:
        """A new, empty database; its SQLAlchemy URL."""
        import psycopg2

        self.count += 1
        name = f"tuner_test_{self.count}"
        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
        connection.close()
        url = f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{name}"
        import optuna

        optuna.storages.RDBStorage(url).engine.dispose()  # Optuna's tables, made once before processes race to
        return url


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server started for the tests (initdb and pg_ctl in a temporary folder, trust auth on
    127.0.0.1 only), stopped at the end. As root the server runs as the ``postgres`` user (PostgreSQL refuses root).
    Skipped, with the reason, only where no server binary can be had (``.ci/run`` installs Debian's postgresql)."""
    import pwd
    import shutil
    import subprocess
    import tempfile

    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl); install Debian's postgresql (.ci/run does)")
    root = Path(tempfile.mkdtemp(prefix="tuner-postgres-"))
    run_as: dict[str, int] = {}
    if os.geteuid() == 0:
        account = next((name for name in ("postgres", "nobody") if _has_user(name)), None)
        assert account is not None, "running as root needs a postgres or nobody user to run the server"
        entry = pwd.getpwnam(account)
        os.chown(root, entry.pw_uid, entry.pw_gid)
        run_as = {"user": entry.pw_uid, "group": entry.pw_gid}
    data, port = root / "data", _free_port()
    env = {**os.environ, "LC_ALL": "C"}
    subprocess.run(
        [str(bindir / "initdb"), "-D", str(data), "-U", "tuner", "--auth=trust", "--no-sync", "-E", "UTF8"],
        check=True, capture_output=True, cwd=root, env=env, **run_as,
    )  # fmt: skip
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60"
    subprocess.run(
        [str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "-t", "60", "start"],
        check=True, capture_output=True, cwd=root, env=env, **run_as,
    )  # fmt: skip
    try:
        yield PostgresServer(port=port, user="tuner", root=root)
    finally:
        subprocess.run(
            [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True, cwd=root, env=env, **run_as,
        )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(params=["fused CPU kernels", "tensor code"])
def merge_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once with the fused CPU kernels of a merge step and once with the tensor code (every device's path).

    A test module uses it for all its tests with ``pytestmark = pytest.mark.usefixtures("merge_path")``.
    """
    from tuner.evoprune import cpu_kernels

    enabled = request.param == "fused CPU kernels"
    if enabled and cpu_kernels.numba is None:
        pytest.fail("numba is a dependency of the fused CPU kernels; install the project with its dependencies")
    monkeypatch.setattr(cpu_kernels, "ENABLED", enabled)
    return str(request.param)
