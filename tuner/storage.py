"""Where studies are stored, opened with checks and one-line errors.

- Any SQLAlchemy URL (``sqlite:///studies/tuner.db``, ``postgresql://user:pw@host/db``): an Optuna ``RDBStorage``
  with heartbeats, so the trial of a worker that died is failed and queued again (``RetryHeartbeatStaleTrialCallback``).
- ``journal:///path/to/file.log`` (three slashes and a relative path, four for an absolute one, as with SQLite): an
  Optuna ``JournalStorage`` on a file, for shared file systems without a database server.

For a file (SQLite or journal) the folder is created and must be writable; a file that is not an SQLite database is
refused and left untouched, and SQLite writes use WAL. A database server must answer within
:data:`CONNECT_TIMEOUT_S`. Every failure becomes a :class:`~tuner.errors.StorageError` naming the ``storage``
parameter, before any model is loaded.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna

from tuner.errors import StorageError

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DEFAULT_STORAGE",
    "GRACE_S",
    "HEARTBEAT_S",
    "SQLITE_BUSY_TIMEOUT_S",
    "StorageError",
    "journal_path",
    "open_storage",
    "public_url",
    "same_storage",
    "storage_errors",
    "storage_path",
]

DEFAULT_STORAGE = "sqlite:///studies/tuner.db"
"""Where studies are kept unless ``--storage`` says otherwise (relative to the current folder)."""

HEARTBEAT_S = 20
GRACE_S = 60
"""A trial whose worker sent no heartbeat for this long is failed (and its parameters retried once) on resume."""

CONNECT_TIMEOUT_S = 10
"""How long connecting to a database server may take before the storage is reported unreachable."""

SQLITE_BUSY_TIMEOUT_S = 10
"""How long an SQLite write waits for another process's lock before the run gives up with a one-line error."""

_SQLITE_HEADER = b"SQLite format 3\x00"


def public_url(url: str) -> str:
    """The storage URL without its password (for messages and provenance).

    Example:
        >>> public_url("postgresql://tuner:secret@db.example/studies")
        'postgresql://tuner:***@db.example/studies'
    """
    return re.sub(r"(?<=://)([^:/@]+):[^@/]*@", r"\1:***@", url)


def _sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (None for other URLs and in-memory SQLite)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///") :].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path)


def journal_path(url: str) -> Path | None:
    """The log file of a ``journal:///`` URL (None for other URLs).

    Example:
        >>> journal_path("journal:///studies/tuner.log"), journal_path("journal:////srv/shared/tuner.log")
        (PosixPath('studies/tuner.log'), PosixPath('/srv/shared/tuner.log'))
    """
    if not url.startswith("journal:///"):
        return None
    path = url[len("journal:///") :]
    return Path(path) if path else None


def storage_path(url: str) -> Path | None:
    """The file behind a file storage (SQLite or journal), or None for a database server."""
    return _sqlite_path(url) or journal_path(url)


def same_storage(url: str, other: str) -> bool:
    """Whether two storage URLs name the same storage (file storages compared by their absolute path)."""
    path, other_path = storage_path(url), storage_path(other)
    if path is not None and other_path is not None:
        return url.split(":", 1)[0] == other.split(":", 1)[0] and path.resolve() == other_path.resolve()
    return url == other


def _sqlite_fast_writes(storage: optuna.storages.RDBStorage) -> None:
    """WAL journal and ``synchronous=NORMAL`` on every SQLite connection.

    A commit then costs about a millisecond instead of tens (one fsync per checkpoint, not per commit). A killed
    process still loses nothing it committed; only a power cut may lose the last commits, never corrupt the file.
    """
    from sqlalchemy import event

    def on_connect(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # connections opened before the listener reconnect with it


def _error(message: str) -> StorageError:
    return StorageError(message, param="storage")


def _storage_error(url: str, error: BaseException) -> StorageError:
    # Optuna wraps driver errors (StorageInternalError "... during the commit"): read the whole chain.
    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = " ".join(str(part) for part in chain).lower()
    shown = public_url(url)
    if "locked" in text or "busy" in text:
        return _error(
            f"{shown} is locked by another process (a run or a dashboard writing it); wait for it to finish, or use "
            "another storage"
        )
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return _error(
            f"{shown} is not a readable SQLite database (corrupt or another kind of file); it was left untouched: "
            "move it away or use another storage"
        )
    if "no module named" in text or isinstance(error, ModuleNotFoundError):
        return _error(
            f"{shown} needs a database driver that is not installed ({error}); install it (PostgreSQL: pip install "
            "'tuner[postgres]') or use another storage"
        )
    if "unable to open database file" in text or "readonly database" in text or "read-only" in text:
        return _error(f"cannot open {shown}: the folder is missing or not writable; fix the storage path")
    if "could not connect" in text or "connection refused" in text or "timeout expired" in text:
        return _error(
            f"cannot reach the database server of {shown} ({_first_line(chain[-1])}); start it, or fix the host, port, "
            "user or password in the storage URL"
        )
    if "does not exist" in text and "database" in text:
        return _error(f"{shown}: {_first_line(chain[-1])}; create the database (createdb) or fix the storage URL")
    if "compatible" in text and "schema" in text:
        return StorageError(
            f"{shown} was written by another Optuna version ({_first_line(error)}); "
            f"run `optuna storage upgrade --storage {shown}`"
        )
    return _error(f"cannot use {shown}: {_first_line(chain[-1])}; check the storage URL")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn database errors raised inside the block into one-line :class:`StorageError`."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
        raise _storage_error(url, error) from None


def _retry_stale() -> dict[str, Any]:
    """The RDBStorage argument that re-enqueues (once) a trial whose worker died (Optuna >= 4.9 names it anew)."""
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
        return {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
    return {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=1)}  # pragma: no cover


def _check_sqlite_file(url: str, path: Path, create: bool) -> None:
    """An existing file must be an SQLite database (never modified otherwise); a missing one is made or refused."""
    if path.exists():
        if path.is_dir():
            raise _error(f"{url} is a folder, not a database file; point storage at a file")
        with open(path, "rb") as stream:
            header = stream.read(len(_SQLITE_HEADER))
        if header and header != _SQLITE_HEADER:
            raise _error(
                f"{url} is not an SQLite database (corrupt or another kind of file); it was left untouched: move it "
                "away or use another storage"
            )
    elif not create:
        raise _error(f"{url} does not exist; run `tuner run` first or check the storage URL")
    else:
        _make_folder(url, path)
    if create and path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise _error(f"{url} is not readable and writable; give a writable storage path")


def _make_folder(url: str, path: Path) -> None:
    """Create the folder of a storage file (refused with one line when it cannot be made or written)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _error(
            f"cannot create the folder of {url}: {error.strerror or error}; give a writable storage path"
        ) from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise _error(f"cannot write in the folder of {url}; give a writable storage path")


def _looks_like_journal(path: Path) -> bool:
    """An empty file, or one whose first line is an Optuna journal entry (a JSON object with an ``op_code``).

    Optuna skips an unreadable last line (a write cut short), so a file of one foreign line would be taken for an
    empty journal and written after: checked here, so such a file is refused and left as it is.
    """
    import json

    with open(path, "rb") as stream:
        first = stream.readline(1 << 20)
    if not first:
        return True
    try:
        entry = json.loads(first)
    except ValueError:
        return False
    return isinstance(entry, dict) and "op_code" in entry


def _open_journal(url: str, path: Path, create: bool) -> optuna.storages.BaseStorage:
    """A ``JournalStorage`` on the log file ``path`` (its folder made when ``create``)."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if path.is_dir():
        raise _error(f"{url} is a folder, not a journal file; point storage at a file")
    if not path.exists():
        if not create:
            raise _error(f"{url} does not exist; run `tuner run` first or check the storage URL")
        _make_folder(url, path)
    elif not os.access(path, os.R_OK | os.W_OK):
        raise _error(f"{url} is not readable and writable; give a writable storage path")
    elif not _looks_like_journal(path):
        raise _error(
            f"{url} is not a readable Optuna journal (its first line is not a journal entry); it was left untouched: "
            "move it away or use another storage"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = JournalStorage(JournalFileBackend(str(path)))
        storage.get_all_studies()  # reads the whole log now, so a damaged file fails here and not mid-run
    except Exception as error:  # noqa: BLE001 - the journal raises JSON, OS and Optuna errors for a bad file
        raise _error(
            f"{url} is not a readable Optuna journal ({_first_line(error)}); it was left untouched: move it away or "
            "use another storage"
        ) from None
    return storage


def _engine_kwargs(url: str, sqlite: bool) -> dict[str, Any] | None:
    """Connection arguments: SQLite's busy timeout, or a server's connect timeout (a dead host fails fast)."""
    if sqlite:
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    if url.startswith(("postgresql", "postgres", "mysql")):
        return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    return None


def open_storage(url: str, *, create: bool = True) -> optuna.storages.BaseStorage:
    """Open an Optuna storage, with heartbeats where the storage has them, so dead workers' trials get retried.

    For a ``sqlite:///`` file: its folder is created when missing (``create``), an existing file must be an SQLite
    database (it is never modified otherwise), and writes use WAL (:func:`_sqlite_fast_writes`). For a
    ``journal:///`` file: an Optuna ``JournalStorage`` (the trials of its dead workers are found by
    :mod:`tuner.workers`). Any other URL is an SQLAlchemy database URL (PostgreSQL needs ``tuner[postgres]``), whose
    server must answer within :data:`CONNECT_TIMEOUT_S`.

    Args:
        url: the storage URL, e.g. ``sqlite:///studies/tuner.db``, ``postgresql://user:pw@host/db`` or
            ``journal:///studies/tuner.log``.
        create: create a missing file (False: a missing file is an error, for read-only commands).

    Returns:
        The storage.

    Raises:
        StorageError: a bad URL, a missing, locked, corrupt or unwritable file, an unreachable server, a missing
            driver; one line with the fix.
    """
    journal = journal_path(url)
    if journal is not None:
        return _open_journal(url, journal, create)
    if url.startswith("journal:"):
        raise _error(f"invalid storage {url!r}: give a journal file such as journal:///studies/tuner.log")
    path = _sqlite_path(url)
    if path is not None:
        _check_sqlite_file(url, path, create)
    elif "://" not in url:
        raise _error(f"invalid storage {url!r}: give a database URL such as {DEFAULT_STORAGE}")
    engine_kwargs = _engine_kwargs(url, path is not None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S, **_retry_stale()
            )
        if path is not None:
            _sqlite_fast_writes(storage)
            storage.get_all_studies()  # touches the file now, so a corrupt body fails here and not mid-run
    except StorageError:
        raise
    except Exception as error:  # noqa: BLE001 - SQLAlchemy, drivers and Optuna raise many kinds for a bad storage
        raise _storage_error(url, error) from None
    return storage
