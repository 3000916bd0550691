"""Worker processes of one study, and the trials that dead workers left behind.

Optuna's storage is the only coordination: every worker loads the study by name and asks it for trials (the sampler
sees the others' running trials; TPE uses a constant liar), so workers may run on one machine or on many.

- Ownership: each running trial records which process runs it (:data:`ATTR_WORKER`: host, process id and its start
  time), so a trial left RUNNING by a process that no longer exists on this host is found at once
  (:func:`reap_dead_trials`): it is marked failed and its parameters are queued again, once, as a new trial (Optuna's
  ``RetryHeartbeatStaleTrialCallback``, the same as for a trial whose database heartbeat stopped). On an RDB storage a
  worker that died on another machine is found by Optuna's heartbeat after its grace period; on a journal file
  (Optuna's journal storage has no heartbeat) by the tuner's own (:class:`TrialHeartbeat`).
- Local workers: :func:`worker_environments` gives each worker one GPU (``CUDA_VISIBLE_DEVICES``) where there are
  GPUs; on a CPU-only machine workers share the cores, which distorts measured latency, and
  :func:`sharing_warning` says so. :class:`WorkerPool` starts ``python -m tuner worker`` processes, forwards signals
  to them and tells how each one ended.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

__all__ = [
    "ATTR_HEARTBEAT",
    "ATTR_WORKER",
    "DeadTrial",
    "TrialHeartbeat",
    "WorkerEnd",
    "WorkerPool",
    "describe_dead",
    "owner_record",
    "process_alive",
    "reap_dead_trials",
    "sharing_warning",
    "split_trials",
    "worker_environments",
]

ATTR_WORKER = "tuner.worker"
"""Trial user attr: ``{"trial": number, "host": ..., "pid": ..., "start": ...}`` of the process running it."""

ATTR_HEARTBEAT = "tuner.heartbeat"
"""Trial user attr: when the process running it last said it is alive (Unix time), on storages without Optuna's own
heartbeat (the journal file)."""

HEARTBEAT_S = 20.0
GRACE_S = 60.0
"""On a journal storage, a running trial whose process (on another host) sent no heartbeat for this long is dead."""


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (Linux), or None where there is no such file."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _process_start(pid: int) -> str | None:
    """The start time of a process (Linux ``/proc``: clock ticks since boot), so a reused pid is not taken for it."""
    fields = _proc_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def owner_record(trial_number: int) -> dict[str, Any]:
    """What a trial stores about the process running it (:data:`ATTR_WORKER`)."""
    pid = os.getpid()
    return {"trial": trial_number, "host": socket.gethostname(), "pid": pid, "start": _process_start(pid)}


def process_alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` runs on this host (and, when ``start`` is given, is the same process that had it); a
    zombie (killed, not yet waited for) does not run."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    fields = _proc_stat(pid)
    if fields is not None and fields[0] in ("Z", "X"):
        return False  # killed, not yet waited for by its parent
    if start is not None and fields is not None and len(fields) > 19:
        return fields[19] == start
    return True


@dataclass(frozen=True)
class DeadTrial:
    """A trial left RUNNING by a process that is gone, and what was done with it.

    Attributes:
        number: the trial.
        pid: the process that ran it.
        host: where it ran.
        retried_as: the number of the trial that runs its parameters again, or None (retried once already).
        reason: how it was found dead: ``"process gone"`` (same host) or ``"no heartbeat"`` (RDB heartbeat).
    """

    number: int
    pid: int
    host: str
    retried_as: int | None
    reason: str = "process gone"


def _owner(trial: FrozenTrial) -> Mapping[str, Any] | None:
    owner = trial.user_attrs.get(ATTR_WORKER)
    # A retried trial carries its predecessor's record until its own process writes one: only a record naming this
    # very trial counts.
    if isinstance(owner, Mapping) and owner.get("trial") == trial.number:
        return owner
    return None


def _retry_of(study: optuna.Study, number: int) -> int | None:
    """The trial that retries trial ``number`` (Optuna's retry callback records the history), if any."""
    for trial in study.get_trials(deepcopy=False):
        if trial.system_attrs.get("retry_history", [])[-1:] == [number]:
            return trial.number
    return None


def _reap_stale_heartbeats(study: optuna.Study) -> list[DeadTrial]:
    """Optuna's own check on an RDB storage with heartbeats: trials whose heartbeat stopped a grace period ago (a
    worker that died on another machine) are failed and retried by the storage's callback; this says which."""
    from optuna.storages import fail_stale_trials
    from optuna.storages._heartbeat import is_heartbeat_enabled

    if not is_heartbeat_enabled(study._storage):
        return []
    running = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if not running:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fail_stale_trials(study)
    failed = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    found = []
    for number in sorted(set(running) & failed):
        owner = _owner(running[number]) or {}
        found.append(
            DeadTrial(number, int(owner.get("pid", -1)), str(owner.get("host", "?")), _retry_of(study, number),
                      "no heartbeat")
        )  # fmt: skip
    return found


def _has_optuna_heartbeat(study: optuna.Study) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return bool(is_heartbeat_enabled(study._storage))


class TrialHeartbeat:
    """While a trial runs, record :data:`ATTR_HEARTBEAT` every ``interval_s`` in a background thread, on storages
    without Optuna's own heartbeat (an RDB storage has it: then this does nothing).

    Args:
        study: the study.
        trial_id: the running trial's storage id.
        interval_s: seconds between heartbeats.
    """

    def __init__(self, study: optuna.Study, trial_id: int, interval_s: float = HEARTBEAT_S) -> None:
        import threading

        self.storage = study._storage
        self.trial_id = trial_id
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = None if _has_optuna_heartbeat(study) else threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            try:
                self.storage.set_trial_user_attr(self.trial_id, ATTR_HEARTBEAT, time.time())
            except Exception:  # noqa: BLE001 - the trial finished, or the storage is gone: the beat ends
                return
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> TrialHeartbeat:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _reap_silent(study: optuna.Study, host: str, grace_s: float) -> list[DeadTrial]:
    """On a storage without Optuna's heartbeat: trials of other hosts' processes whose :data:`ATTR_HEARTBEAT` (or
    start) is older than ``grace_s`` (a worker that died on another machine) are failed and queued again."""
    if _has_optuna_heartbeat(study):
        return []
    found = []
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = _owner(trial)
        if owner is None or owner.get("host") == host:
            continue  # same host: the process check decides
        last = trial.user_attrs.get(ATTR_HEARTBEAT)
        if not isinstance(last, (int, float)):
            last = trial.datetime_start.timestamp() if trial.datetime_start is not None else now
        if now - float(last) > grace_s and _fail_and_retry(study, trial):
            found.append(
                DeadTrial(trial.number, int(owner.get("pid", -1)), str(owner.get("host")),
                          _retry_of(study, trial.number), "no heartbeat")
            )  # fmt: skip
    return found


def _fail_and_retry(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Mark a RUNNING trial failed and queue its parameters again once; False when another process got there first."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    storage = study._storage
    try:
        if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return False
    except (UpdateFinishedTrialError, KeyError, RuntimeError):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=1)(study, copy.deepcopy(storage.get_trial(trial._trial_id)))
    return True


def reap_dead_trials(study: optuna.Study, grace_s: float = GRACE_S) -> list[DeadTrial]:
    """Fail the RUNNING trials whose process is gone, and queue each one's parameters again (once).

    A trial whose process on this host no longer exists is found at once. One whose process ran on another machine
    is found by its heartbeat: on an RDB storage Optuna's (after the storage's grace period), on a journal file the
    tuner's own (:class:`TrialHeartbeat`, after ``grace_s``). Safe with several workers doing the same at once: a
    trial is failed by one of them only (the storage refuses a second state change), and only that one queues the
    retry.

    Args:
        study: the study.
        grace_s: on a journal storage, seconds without a heartbeat after which another host's trial is dead.

    Returns:
        What was found, in trial order.
    """
    host = socket.gethostname()
    found: list[DeadTrial] = _reap_stale_heartbeats(study) + _reap_silent(study, host, grace_s)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = _owner(trial)
        if owner is None or owner.get("host") != host:
            continue
        pid = int(owner.get("pid", -1))
        if pid == os.getpid() or process_alive(pid, owner.get("start")):
            continue
        if _fail_and_retry(study, trial):
            found.append(DeadTrial(trial.number, pid, host, _retry_of(study, trial.number)))
    return sorted(found, key=lambda dead: dead.number)


def describe_dead(dead: Sequence[DeadTrial]) -> str:
    """One line on the dead trials found (for the run's output).

    Example:
        >>> print(describe_dead([DeadTrial(7, 4242, "box", 12)]).replace(": ", ":\\n"))
        found trial 7 RUNNING, left by process 4242 on box that is gone:
        marked failed, its parameters queued again as trial 12
    """
    parts = []
    for trial in dead:
        done = (
            f"marked failed, its parameters queued again as trial {trial.retried_as}"
            if trial.retried_as is not None
            else "marked failed (already retried once: not queued again)"
        )
        why = "that is gone" if trial.reason == "process gone" else "that sent no heartbeat for the grace period"
        parts.append(f"trial {trial.number} RUNNING, left by process {trial.pid} on {trial.host} {why}: {done}")
    return "found " + "; ".join(parts)


# ------------------------------------------------------------------------------------------------- local workers


def split_trials(missing: int, workers: int) -> list[int]:
    """``missing`` trials shared among ``workers`` (the first ones take the remainder); workers with none left out.

    Example:
        >>> split_trials(100, 4), split_trials(10, 4), split_trials(2, 4)
        ([25, 25, 25, 25], [3, 3, 2, 2], [1, 1])
    """
    shares = [missing // workers + (1 if index < missing % workers else 0) for index in range(workers)]
    return [share for share in shares if share > 0]


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_environments(workers: int, device: str, base: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """The environment of each local worker: one GPU each (``CUDA_VISIBLE_DEVICES``, round robin over the GPUs this
    process may use) on a CUDA device; on a CPU device the environment as it is.

    Example:
        >>> [env["CUDA_VISIBLE_DEVICES"] for env in worker_environments(3, "cuda", {"CUDA_VISIBLE_DEVICES": "3,5"})]
        ['3', '5', '3']
        >>> worker_environments(2, "cpu", {"HOME": "/root"})
        [{'HOME': '/root'}, {'HOME': '/root'}]

    Args:
        workers: how many.
        device: the study's device (``cpu``, ``cuda``, ``cuda:N``).
        base: the environment to start from (default: this process's).
    """
    environment = dict(os.environ if base is None else base)
    pool: list[str] = []
    if device.startswith("cuda"):
        visible = [part.strip() for part in environment.get("CUDA_VISIBLE_DEVICES", "").split(",") if part.strip()]
        pool = visible or [str(index) for index in range(_gpu_count())]
    result = []
    for index in range(workers):
        own = dict(environment)
        if pool:
            own["CUDA_VISIBLE_DEVICES"] = pool[index % len(pool)]
        result.append(own)
    return result


def sharing_warning(workers: int, device: str) -> str | None:
    """A warning when local workers share devices (cores or GPUs): their measured latencies disturb each other."""
    if workers <= 1:
        return None
    gpus = _gpu_count() if device.startswith("cuda") else 0
    if gpus == 0:
        cores = os.cpu_count() or 1
        return (
            f"warning: {workers} workers share this machine's {cores} CPU cores: each one's measured latency is "
            "distorted by the others (fine with --latency-source synthetic; for measured studies use one worker per "
            "machine or per GPU)"
        )
    if workers > gpus:
        return f"warning: {workers} workers share {gpus} GPUs: their measured latencies disturb each other"
    return None


@dataclass
class WorkerEnd:
    """How one local worker ended.

    Attributes:
        index: the worker's index (0-based).
        pid: its process id.
        returncode: its exit code (negative: killed by that signal).
    """

    index: int
    pid: int
    returncode: int

    @property
    def killed_by(self) -> str | None:
        """The signal that killed it (``"SIGKILL"``), or None when it exited."""
        if self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"


@dataclass
class WorkerPool:
    """Local ``python -m tuner worker`` processes on one study.

    Each worker runs in its own session, so a Ctrl-C at the terminal reaches only the parent, which forwards every
    SIGINT and SIGTERM it gets once (:meth:`forward`).

    Attributes:
        storage: the storage URL.
        study: the study name.
        shares: trials each worker runs.
        environments: each worker's environment.
        extra: more ``worker`` options (e.g. ``--timeout``).
    """

    storage: str
    study: str
    shares: list[int]
    environments: list[dict[str, str]]
    extra: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def command(self, index: int) -> list[str]:
        """The command line of worker ``index``."""
        return [
            sys.executable, "-m", "tuner", "worker", "--study", self.study, "--storage", self.storage,
            "--trials", str(self.shares[index]), "--worker-index", str(index + 1), *self.extra,
        ]  # fmt: skip

    def start(self) -> None:
        """Start every worker (their output goes to this process's stdout and stderr)."""
        for index in range(len(self.shares)):
            self.processes.append(
                subprocess.Popen(self.command(index), env=self.environments[index], start_new_session=True)
            )

    def forward(self, signum: int) -> None:
        """Send a signal to every worker still running."""
        for process in self.processes:
            if process.poll() is None:
                try:
                    process.send_signal(signum)
                except ProcessLookupError:  # pragma: no cover - it ended between poll and send
                    pass

    def running(self) -> bool:
        """Whether any worker still runs."""
        return any(process.poll() is None for process in self.processes)

    def wait(self, poll_s: float = 0.2) -> list[WorkerEnd]:
        """Wait for every worker (signals to this process still reach their handlers while it waits)."""
        while self.running():
            time.sleep(poll_s)
        return [WorkerEnd(index, process.pid, int(process.returncode)) for index, process in enumerate(self.processes)]
