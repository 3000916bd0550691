"""``tuner dashboard``: optuna-dashboard on the study storage, with the tuner's figures and a note in every study.

Three jobs:

- **Publishing** (:func:`publish_figures`, :class:`FigurePublisher`): the figures of :mod:`tuner.figures` are saved
  into each study as optuna-dashboard plotly-graph objects (``optuna_dashboard.save_plotly_graph_object``, stable ids,
  so a newer figure replaces the older one) and the study summary as its markdown note (``save_note``). ``tuner run``
  refreshes them while trials finish (at most every :data:`PUBLISH_INTERVAL_S` seconds) and after the export;
  ``tuner dashboard`` refreshes the studies whose figures are out of date when it starts.
- **Fixes** (:func:`apply_dashboard_fixes`) for what optuna-dashboard 0.21 gets wrong on Optuna 5 studies, applied
  only inside the dashboard process, nothing stored is changed: it reads constraints only from Optuna 4's
  ``constraints`` list (Optuna 5's ``set_constraint`` stores ``constraints:<name>``), so every trial looked feasible;
  and its "best trials" were the Pareto front of *all* trials, so infeasible trials were badged "Best Trial" while
  ``study.best_trials`` held none of them. Each trial's constraints are now served from Optuna's own
  ``trial.constraints`` (both formats), and the best trials are the front of the feasible trials, as
  ``study.best_trials`` is. The stored constraint keeps Optuna 5's format: writing the old list as well would give
  Optuna two constraints per trial (twice the penalty for NSGA-II, a second constraint model for the GP sampler,
  and a study whose trials disagree on their constraint keys, which the GP sampler refuses). Its trial-table page
  (``/dashboard/studies/<id>/trialTable``) is routed but draws nothing in 0.21: the tuner serves its own table of
  every trial there (:func:`with_trial_table`).
- **Serving** (:func:`start_dashboard`): the dashboard's WSGI app under a threaded server, on the host and port
  given (port 0: any free one).

Watching a study that a run is writing is safe with SQLite: the file is in WAL mode (:mod:`tuner.storage`), where
readers never block the writer nor see a half-written transaction, and the dashboard's own writes (a study note
edited in the page, the figure refresh at start) wait for the run's lock (up to the busy timeout) instead of failing.
"""

from __future__ import annotations

import contextlib
import html
import importlib.util
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna

from tuner.errors import StudyError, TunerError
from tuner.figures import study_figures, study_summary
from tuner.storage import open_storage, public_url, storage_errors
from tuner.study import ATTR_FINAL, StudyContext, trial_records
from tuner.tables import page, trial_table

__all__ = [
    "PUBLISH_INTERVAL_S",
    "Dashboard",
    "FigurePublisher",
    "apply_dashboard_fixes",
    "dashboard_installed",
    "feasible_best_trials",
    "figures_up_to_date",
    "publish_figures",
    "refresh_studies",
    "start_dashboard",
    "trial_table_page",
    "with_trial_table",
]

PUBLISH_INTERVAL_S = 20.0
"""During a run the figures are saved again at most this often (each save writes a few hundred small rows)."""

FIGURES_VERSION = 1
"""Bumped when the figures change, so that ``tuner dashboard`` saves them again for old studies."""

SYSTEM_ATTR_STATE = "tuner:dashboard_state"
"""Study system attribute: what the saved figures show (figures version, finished trials, latest export)."""

INSTALL_HINT = "install it with: pip install 'tuner[dashboard]'"


def dashboard_installed() -> bool:
    """Whether optuna-dashboard can be imported."""
    return importlib.util.find_spec("optuna_dashboard") is not None


# ------------------------------------------------------------------------------------------------------- publishing


def _state(context: StudyContext, trials: int) -> str:
    final = context.study.user_attrs.get(ATTR_FINAL) or {}
    return f"v{FIGURES_VERSION}|{trials}|{final.get('at', '')}|{final.get('budget', '')}"


def _system_attrs(study: optuna.Study) -> dict[str, Any]:
    return study._storage.get_study_system_attrs(study._study_id)


def figures_up_to_date(context: StudyContext) -> bool:
    """Whether the study's saved figures show its current trials and export."""
    trials = len(trial_records(context.study))
    return _system_attrs(context.study).get(SYSTEM_ATTR_STATE) == _state(context, trials)


def publish_figures(context: StudyContext) -> bool:
    """Save the study's figures (plotly-graph objects) and its summary (the study note) for optuna-dashboard.

    Args:
        context: the study.

    Returns:
        False when optuna-dashboard is not installed (nothing saved), else True.
    """
    if not dashboard_installed():
        return False
    from optuna_dashboard import get_note, save_note, save_plotly_graph_object

    study = context.study
    records = trial_records(study)
    for key, figure in study_figures(context, records).items():
        save_plotly_graph_object(study, figure, graph_object_id=key)
    note = study_summary(context, records).markdown(f"{context.name}: tuner study")
    if get_note(study) != note:
        save_note(study, note)
    study._storage.set_study_system_attr(study._study_id, SYSTEM_ATTR_STATE, _state(context, len(records)))
    return True


@dataclass
class FigurePublisher:
    """Saves a running study's figures now and then, and never lets a failure to do so touch the run.

    Args:
        context: the study.
        interval_s: the least time between two saves while trials finish.
        note: receives one line if saving fails (saving then stops for this run).
        clock: seconds, monotonic.
    """

    context: StudyContext
    interval_s: float = PUBLISH_INTERVAL_S
    note: Callable[[str], None] = lambda message: None
    clock: Callable[[], float] = time.monotonic
    enabled: bool = field(default_factory=dashboard_installed)
    saves: int = field(default=0, init=False)
    _last: float | None = field(default=None, init=False)
    _cost: float = field(default=0.0, init=False)

    def trial_finished(self) -> None:
        """A trial finished: save when the last save is old enough (and at least ten times its own cost ago)."""
        if not self.enabled:
            return
        now = self.clock()
        if self._last is None or now - self._last >= max(self.interval_s, 10 * self._cost):
            self.publish()

    def publish(self) -> None:
        """Save now (after the export, at the end of a run)."""
        if not self.enabled:
            return
        started = self.clock()
        try:
            publish_figures(self.context)
        except Exception as error:  # noqa: BLE001 - the figures are optional; the run's trials are not
            self.enabled = False
            first = str(error).strip().splitlines()
            self.note(
                "could not save the dashboard figures into the study "
                f"({type(error).__name__}: {first[0] if first else ''}); `tuner dashboard` saves them when it starts"
            )
            return
        self._last = self.clock()
        self._cost = self._last - started
        self.saves += 1


def refresh_studies(
    storage: optuna.storages.BaseStorage, storage_url: str, note: Callable[[str], None] = lambda message: None
) -> list[str]:
    """Save the figures of every tuner study whose saved figures are out of date.

    Returns:
        The names of the tuner studies in the storage.
    """
    names = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        try:
            context = StudyContext.load(study, storage_url)
        except StudyError:
            continue
        names.append(context.name)
        if not figures_up_to_date(context):
            note(f"saving the tuner's figures into study {context.name!r}")
            publish_figures(context)
    return sorted(names)


# ------------------------------------------------------------------------------------------------------------- fixes


def _feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return all(value <= 0 for value in trial.constraints.values())


def feasible_best_trials(
    front: Callable[..., list[optuna.trial.FrozenTrial]],
) -> Callable[..., list[optuna.trial.FrozenTrial]]:
    """Wrap optuna-dashboard's Pareto-front function: in a constrained study, the front of the feasible trials only
    (Optuna 5's ``study.best_trials``; empty when no trial is feasible)."""

    def best_trials(trials: list[optuna.trial.FrozenTrial], directions: Any) -> list[optuna.trial.FrozenTrial]:
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        if any(t.constraints for t in complete):
            complete = [t for t in complete if _feasible(t)]
        return front(trials=complete, directions=directions)

    best_trials.tuner_fix = True  # type: ignore[attr-defined]
    return best_trials


def _with_constraints(serialize: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    def serialize_trial(*args: Any, **kwargs: Any) -> Any:
        serialized = serialize(*args, **kwargs)
        trial = next((a for a in (*args, *kwargs.values()) if isinstance(a, optuna.trial.FrozenTrial)), None)
        if trial is not None and isinstance(serialized, dict):
            serialized["constraints"] = [float(value) for value in trial.constraints.values()]
        return serialized

    serialize_trial.tuner_fix = True  # type: ignore[attr-defined]
    return serialize_trial


def apply_dashboard_fixes() -> list[str]:
    """Make optuna-dashboard read Optuna 5's constraints (see the module docstring); idempotent.

    Returns:
        What was fixed, in words (empty when this optuna-dashboard has nothing to fix or is not one we know).
    """
    from optuna_dashboard import _app, _serializer

    fixed = []
    front = getattr(_app, "get_pareto_front_trials", None)
    if front is not None and not getattr(front, "tuner_fix", False):
        _app.get_pareto_front_trials = feasible_best_trials(front)
        fixed.append("best trials: the Pareto front of the feasible trials")
    serialize = getattr(_serializer, "serialize_frozen_trial", None)
    if serialize is not None and not getattr(serialize, "tuner_fix", False):
        _serializer.serialize_frozen_trial = _with_constraints(serialize)
        fixed.append("trial constraints: read in Optuna 5's format too")
    return fixed


# ------------------------------------------------------------------------------------------------------ trial table

TRIAL_TABLE_PATH = re.compile(r"^/dashboard/studies/(\d+)/trialTable/?$")
"""optuna-dashboard 0.21 routes this page but draws nothing on it; the tuner serves its table of trials there."""


def trial_table_page(storage: optuna.storages.BaseStorage, storage_url: str, study_id: int) -> tuple[str, str]:
    """The trial table page of a study: ``(HTTP status, HTML)``."""
    try:
        name = storage.get_study_name_from_id(study_id)
    except KeyError:
        return "404 Not Found", page("no such study", f"<p>No study with id {study_id}.</p>")
    links = f'<p><a href="/dashboard/studies/{study_id}">the study</a> · <a href="/csv/{study_id}">CSV</a></p>'
    study = optuna.load_study(study_name=name, storage=storage)
    try:
        context = StudyContext.load(study, storage_url)
    except StudyError as error:
        return "200 OK", page(f"{name}: trials", links + f"<p>{html.escape(str(error))}</p>")
    return "200 OK", page(f"{name}: every trial", links + trial_table(context))


def with_trial_table(app: Any, storage: optuna.storages.BaseStorage, storage_url: str) -> Any:
    """The dashboard's WSGI app, with the tuner's trial table at ``/dashboard/studies/<id>/trialTable``."""

    def application(environ: dict[str, Any], start_response: Any) -> Any:
        found = TRIAL_TABLE_PATH.match(environ.get("PATH_INFO", ""))
        if found is None:
            return app(environ, start_response)
        with storage_errors(storage_url):
            status, document = trial_table_page(storage, storage_url, int(found.group(1)))
        body = document.encode("utf-8")
        start_response(status, [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body)))])
        return [body]

    return application


# ----------------------------------------------------------------------------------------------------------- serving


class _QuietHandler(WSGIRequestHandler):
    """No line on stderr for every request."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """A page's requests (the app, its bundle, the API polls) are served side by side."""

    daemon_threads = True


@dataclass
class Dashboard:
    """A started dashboard server (call :meth:`serve_forever`, then :meth:`close`).

    Attributes:
        url: the address to open.
        storage_url: the storage it shows (password hidden).
        studies: the tuner studies in it.
        server: the WSGI server.
    """

    url: str
    storage_url: str
    studies: list[str]
    server: WSGIServer

    def serve_forever(self) -> None:
        """Serve until interrupted (Ctrl-C) or :meth:`shutdown` from another thread."""
        self.server.serve_forever(poll_interval=0.2)

    def shutdown(self) -> None:
        """Stop :meth:`serve_forever` (from another thread)."""
        self.server.shutdown()

    def close(self) -> None:
        """Release the port."""
        with contextlib.suppress(OSError):
            self.server.server_close()


def start_dashboard(
    storage_url: str, host: str = "127.0.0.1", port: int = 8080, note: Callable[[str], None] = lambda m: None
) -> Dashboard:
    """Open the storage, bring every tuner study's figures up to date, and bind optuna-dashboard to ``host:port``.

    Args:
        storage_url: the study storage (an existing SQLite file or any SQLAlchemy URL).
        host: the address to listen on (``127.0.0.1``: this machine only).
        port: the port (0: any free one).
        note: receives progress lines.

    Returns:
        The bound server, not yet serving.

    Raises:
        TunerError: optuna-dashboard is not installed, the storage cannot be read, the port cannot be bound.
    """
    if not dashboard_installed():
        raise TunerError(f"optuna-dashboard is not installed; {INSTALL_HINT}")
    import optuna_dashboard

    storage = open_storage(storage_url, create=False)
    with storage_errors(storage_url):
        studies = refresh_studies(storage, storage_url, note)
    apply_dashboard_fixes()
    app = with_trial_table(optuna_dashboard.wsgi(storage), storage, storage_url)
    try:
        server = make_server(host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler)
    except (OSError, OverflowError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise TunerError(
            f"cannot serve on {host}:{port}: {reason}; give another port (0 picks a free one) or host",
            param=("port", "host"),
        ) from None
    shown = host if host not in ("0.0.0.0", "::", "") else socket.gethostname()
    if ":" in shown:
        shown = f"[{shown}]"
    return Dashboard(
        url=f"http://{shown}:{server.server_port}/dashboard",
        storage_url=public_url(storage_url),
        studies=studies,
        server=server,
    )
