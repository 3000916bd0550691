"""The tuner's own figures of a study, for the dashboard and the report (plotly figures, built from the storage alone).

- :func:`accuracy_latency_figure`: accuracy against measured latency with the budget line, the unpruned baseline,
  the feasible Pareto front, the Pareto points' held-out scores and the exported schedule;
- :func:`token_profile_figure`: patch tokens after each layer of the exported schedule, beside the paper's Skip
  schedule at the same output tokens (and the unpruned model);
- :func:`hypervolume_figure`: the hypervolume of the measured front after each trial;
- :func:`weights_figure`: calibration accuracy against each score weight of the search space;
- :func:`study_summary`: the facts a reader wants first (model, task, device, budget, baseline, best schedule, how to
  export it), as markdown (the dashboard's study note) and as fields (the report's header).

Nothing here measures anything: every latency is a stored trial measurement (or the export's re-measurement).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from search_spaces.base import SCORING_PARAMS, FloatParam
from tuner.evoprune.schedule import layer_cap_violation, preset_plan
from tuner.export import pareto_front
from tuner.plots import pareto_figure
from tuner.storage import DEFAULT_STORAGE, public_url
from tuner.study import ATTR_FINAL, StudyContext, TrialRecord, trial_records

__all__ = [
    "FIGURE_IDS",
    "StudySummary",
    "accuracy_latency_figure",
    "exported_trial",
    "hypervolume",
    "hypervolume_figure",
    "study_figures",
    "study_summary",
    "token_profile_figure",
    "weights_figure",
]

FIGURE_IDS = ("tuner-accuracy-latency", "tuner-token-profile", "tuner-hypervolume", "tuner-score-weights")
"""Stable ids of the figures (the dashboard overwrites a figure saved under the same id)."""

_FEASIBLE = "#1f77b4"
_INFEASIBLE = "#b0b0b0"
_HOLDOUT = "#9467bd"
_CHOSEN = "#2ca02c"
_SKIP = "#ff7f0e"


def exported_trial(context: StudyContext) -> int | None:
    """The trial exported for the study's own budget (the latest export), or None."""
    final = context.study.user_attrs.get(ATTR_FINAL) or {}
    if final.get("budget") != context.settings.get("budget"):
        return None
    chosen = final.get("chosen_trial")
    return int(chosen) if chosen is not None else None


def _holdout_scores(context: StudyContext, records: list[TrialRecord]) -> dict[int, float]:
    """Held-out accuracy of each record whose schedule was scored on the held-out slice (at an export)."""
    scores: dict[int, float] = {}
    for record in records:
        if record.fingerprint:
            found = context.holdout_accuracy(record.fingerprint)
            if found is not None:
                scores[record.number] = found
    return scores


def accuracy_latency_figure(context: StudyContext, records: list[TrialRecord] | None = None) -> go.Figure:
    """Accuracy against measured latency (the Pareto plot of :mod:`tuner.plots`) plus the Pareto points' held-out
    scores and the unpruned model's held-out score.

    Args:
        context: the study.
        records: its finished trials (read from the study when None).

    Returns:
        The figure.
    """
    records = trial_records(context.study) if records is None else records
    budget_ms = context.budget_ms()
    front = pareto_front(records, budget_ms)
    figure = pareto_figure(context, {r.number for r in front}, exported_trial(context))
    scores = _holdout_scores(context, front)
    scored = [r for r in front if r.number in scores]
    if scored:
        figure.add_trace(
            go.Scatter(
                x=[r.latency_ms for r in scored],
                y=[scores[r.number] for r in scored],
                mode="markers",
                name="held-out accuracy (Pareto points)",
                marker={"color": _HOLDOUT, "symbol": "circle-open", "size": 12, "line": {"width": 2}},
                text=[
                    f"<b>trial {r.number}</b> on the held-out slice<br>{html.escape(r.summary)}<br>"
                    f"held-out {scores[r.number]:.4f} (calibration {r.accuracy:.4f})"
                    for r in scored
                ],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    final = context.study.user_attrs.get(ATTR_FINAL) or {}
    unpruned_holdout = final.get("accuracy_holdout_unpruned")
    if unpruned_holdout is not None:
        figure.add_trace(
            go.Scatter(
                x=[context.reference_ms],
                y=[float(unpruned_holdout)],
                mode="markers",
                name="unpruned model, held-out",
                marker={"color": "#000000", "symbol": "diamond-open", "size": 12, "line": {"width": 2}},
                text=[f"<b>unpruned model</b> on the held-out slice: {float(unpruned_holdout):.4f}"],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    measured = "measured" if context.latency_source == "measured" else "synthetic (NOT measured)"
    figure.update_layout(
        xaxis_title=f"{measured} latency per batch (ms; unpruned {context.reference_ms:.1f} ms)",
        legend={"orientation": "h", "y": -0.22, "font": {"size": 10}},
        margin={"t": 50, "b": 40, "l": 60, "r": 20},
    )
    return figure


def _tokens_after(tokens_in: int, plan: list[int]) -> list[int]:
    counts, tokens = [tokens_in], tokens_in
    for remove in plan:
        tokens -= remove
        counts.append(tokens)
    return counts


def _profile_subject(context: StudyContext, records: list[TrialRecord]) -> tuple[TrialRecord | None, str]:
    """The schedule the token profile shows: the exported one, else the most accurate feasible trial."""
    chosen = exported_trial(context)
    by_number = {r.number: r for r in records}
    if chosen is not None and chosen in by_number:
        return by_number[chosen], f"exported (trial {chosen})"
    feasible = [r for r in records if r.feasible]
    if feasible:
        best = min(feasible, key=lambda r: (-r.accuracy, r.latency_ms, r.number))
        return best, f"best that meets the budget (trial {best.number}; not exported yet)"
    return None, ""


def token_profile_figure(context: StudyContext, records: list[TrialRecord] | None = None) -> go.Figure:
    """Patch tokens after each layer: the exported schedule, the paper's Skip schedule at the same output tokens,
    and the unpruned model.

    Args:
        context: the study.
        records: its finished trials (read from the study when None).

    Returns:
        The figure (with a message instead of lines when no trial meets the budget yet).
    """
    records = trial_records(context.study) if records is None else records
    shape = context.shape
    layers = ["input", *(str(layer) for layer in range(shape.num_layers))]
    figure = go.Figure()
    figure.add_trace(
        go.Scatter(
            x=layers,
            y=[shape.tokens_in] * len(layers),
            mode="lines",
            name="unpruned",
            line={"color": "#000000", "dash": "dot", "width": 1},
        )
    )
    record, label = _profile_subject(context, records)
    title = f"{context.name}: patch tokens after each layer"
    if record is None:
        figure.add_annotation(
            text="no trial meets the budget yet", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5
        )
    else:
        schedule = context.schedule_of(record.trial)
        figure.add_trace(
            go.Scatter(
                x=layers,
                y=_tokens_after(shape.tokens_in, list(schedule.remove_per_layer)),
                mode="lines+markers",
                name=label,
                line={"color": _CHOSEN, "width": 3},
                text=[html.escape(schedule.describe())] * len(layers),
                hovertemplate="layer %{x}: %{y} tokens<br>%{text}<extra></extra>",
            )
        )
        skip = preset_plan(
            "skip", num_layers=shape.num_layers, tokens_in=shape.tokens_in, tokens_out=schedule.tokens_out
        )
        over = layer_cap_violation(skip, shape.tokens_in)
        figure.add_trace(
            go.Scatter(
                x=layers,
                y=_tokens_after(shape.tokens_in, skip),
                mode="lines+markers",
                name=f"paper's Skip to {schedule.tokens_out} tokens" + (" (over a layer's cap)" if over else ""),
                line={"color": _SKIP, "dash": "dash", "width": 2},
                hovertemplate="layer %{x}: %{y} tokens<extra>Skip</extra>",
            )
        )
        title += f" ({schedule.tokens_out} of {shape.tokens_in} left)"
    figure.update_layout(
        title=title,
        xaxis_title="encoder layer (tokens leaving it)",
        yaxis_title="patch tokens",
        yaxis={"rangemode": "tozero"},
        template="plotly_white",
        legend={"orientation": "h", "y": -0.2},
    )
    return figure


def hypervolume(points: list[tuple[float, float]]) -> float:
    """Area dominated by ``(accuracy, latency ratio)`` points (maximise accuracy, minimise the ratio to the unpruned
    latency) within the box accuracy >= 0, ratio <= 1 (the measure of ``benchmarks/search_quality.py``).

    Example:
        >>> hypervolume([(0.9, 0.5), (0.5, 0.25), (1.0, 1.2)])  # the last point is slower than unpruned: no area
        0.575
    """
    inside = sorted((ratio, accuracy) for accuracy, ratio in points if ratio < 1.0 and accuracy > 0.0)
    if not inside:
        return 0.0
    edges = [ratio for ratio, _ in inside[1:]] + [1.0]
    area, best = 0.0, 0.0
    for (ratio, accuracy), edge in zip(inside, edges, strict=True):
        best = max(best, accuracy)
        area += best * (edge - ratio)
    return area


def hypervolume_figure(context: StudyContext, records: list[TrialRecord] | None = None) -> go.Figure:
    """The hypervolume of the measured front after each trial: all trials, and those that meet the budget.

    Args:
        context: the study.
        records: its finished trials (read from the study when None).

    Returns:
        The figure.
    """
    records = trial_records(context.study) if records is None else records
    reference = context.reference_ms
    every: list[tuple[float, float]] = []
    feasible: list[tuple[float, float]] = []
    curve_all, curve_feasible = [], []
    for record in records:
        point = (record.accuracy, record.latency_ms / reference)
        every.append(point)
        if record.feasible:
            feasible.append(point)
        curve_all.append(hypervolume(every))
        curve_feasible.append(hypervolume(feasible))
    numbers = [r.number for r in records]
    figure = go.Figure()
    figure.add_trace(
        go.Scatter(
            x=numbers, y=curve_feasible, mode="lines", name="trials that meet the budget", line={"color": _FEASIBLE}
        )
    )
    figure.add_trace(
        go.Scatter(x=numbers, y=curve_all, mode="lines", name="all trials", line={"color": _INFEASIBLE, "dash": "dash"})
    )
    figure.update_layout(
        title=f"{context.name}: hypervolume of the measured front after each trial",
        xaxis_title="trial",
        yaxis_title="accuracy x share of the unpruned latency saved",
        yaxis={"rangemode": "tozero"},
        template="plotly_white",
        legend={"orientation": "h", "y": -0.2},
    )
    return figure


def weights_figure(context: StudyContext, records: list[TrialRecord] | None = None) -> go.Figure:
    """Calibration accuracy against each score weight the space searches (``w_div``, ``w_attn``, ``ctr``).

    Args:
        context: the study.
        records: its finished trials (read from the study when None).

    Returns:
        One panel per weight, trials that meet the budget in colour.
    """
    records = trial_records(context.study) if records is None else records
    names = [p.name for p in SCORING_PARAMS if isinstance(p, FloatParam)]
    names = [name for name in names if any(name in r.trial.params for r in records)] or names
    figure = make_subplots(rows=1, cols=len(names), shared_yaxes=True, subplot_titles=names)
    for column, name in enumerate(names, start=1):
        for feasible, color, label in ((False, _INFEASIBLE, "over budget"), (True, _FEASIBLE, "meets the budget")):
            chosen = [r for r in records if r.feasible == feasible and name in r.trial.params]
            figure.add_trace(
                go.Scatter(
                    x=[float(r.trial.params[name]) for r in chosen],
                    y=[r.accuracy for r in chosen],
                    mode="markers",
                    name=label,
                    legendgroup=label,
                    showlegend=column == 1,
                    marker={"color": color, "size": 7},
                    text=[f"trial {r.number}: {html.escape(r.summary)}" for r in chosen],
                    hovertemplate=f"{name} %{{x}}<br>accuracy %{{y:.4f}}<br>%{{text}}<extra></extra>",
                ),
                row=1,
                col=column,
            )
    figure.update_yaxes(title_text="accuracy (calibration)", row=1, col=1)
    figure.update_layout(
        title=f"{context.name}: accuracy against each score weight",
        template="plotly_white",
        legend={"orientation": "h", "y": -0.2},
    )
    return figure


def study_figures(context: StudyContext, records: list[TrialRecord] | None = None) -> dict[str, go.Figure]:
    """Every figure of the study by its id in :data:`FIGURE_IDS` (the trials read once when not given)."""
    records = trial_records(context.study) if records is None else records
    builders = (accuracy_latency_figure, token_profile_figure, hypervolume_figure, weights_figure)
    return {key: build(context, records) for key, build in zip(FIGURE_IDS, builders, strict=True)}


@dataclass(frozen=True)
class StudySummary:
    """The facts a reader wants first about a study.

    Attributes:
        fields: label -> value, in reading order (model, task, device, budget, baseline, trials, best, ...).
        export_command: the command that exports the study's schedule.
        report_command: the command that writes its report.
    """

    fields: dict[str, str]
    export_command: str
    report_command: str

    def markdown(self, title: str) -> str:
        """The summary as a markdown note (the dashboard shows it on the study's page)."""
        lines = [f"## {title}", ""]
        lines += [f"- **{label}**: {value}" for label, value in self.fields.items()]
        lines += [
            "",
            "Export the schedule (held-out check and a fresh interleaved measurement first):",
            "",
            f"    {self.export_command}",
            "",
            "A self-contained report with these figures:",
            "",
            f"    {self.report_command}",
            "",
            "Every trial in one table (measured latency, bound, whether it meets the budget, schedule): "
            "[trial table](trialTable). The tuner's figures are on the study's main page, below Optuna's Pareto "
            "front, history and importance plots; they refresh as trials finish.",
        ]
        return "\n".join(lines)


def _storage_flag(context: StudyContext) -> str:
    url = public_url(context.storage_url)
    return "" if url == DEFAULT_STORAGE else f" --storage '{url}'"


def study_summary(context: StudyContext, records: list[TrialRecord] | None = None) -> StudySummary:
    """The study's summary (see :class:`StudySummary`)."""
    records = trial_records(context.study) if records is None else records
    settings, meta, baseline = context.settings, context.meta, context.baseline
    arguments = meta.get("evaluator_args") or {}
    environment = baseline.get("environment") or {}
    source = context.latency_source
    latency_word = "measured" if source == "measured" else f"{source}, NOT measured"
    task = str(meta.get("evaluator"))
    if arguments.get("dataset"):
        task += f" on {arguments['dataset']}"
    fields = {
        "model": str(arguments.get("model") or "the offline demo model (tuner.demo)"),
        "task": task + f" (calibration {settings.get('calib')} items, held-out {settings.get('holdout')})",
        "device": f"{settings.get('device')}"
        + (
            f" ({environment['device_name']}, {environment.get('threads', '?')} threads)"
            if environment.get("device_name")
            else ""
        )
        + f", batch {settings.get('batch_size')}",
        "budget": f"{settings.get('budget')} = {context.budget_ms():.2f} ms per batch ({latency_word} latency)",
        "baseline": f"unpruned {context.reference_ms:.2f} ms, calibration accuracy "
        + (f"{baseline['accuracy_calib']:.4f}" if baseline.get("accuracy_calib") is not None else "?"),
        "trials": f"{len(records)} finished, {sum(r.feasible for r in records)} meet the budget",
    }
    final = context.study.user_attrs.get(ATTR_FINAL) or {}
    chosen = exported_trial(context)
    by_number = {r.number: r for r in records}
    if chosen is not None and chosen in by_number:
        record = by_number[chosen]
        fields["best schedule"] = (
            f"trial {chosen}, exported: {record.summary}; held-out accuracy {final.get('accuracy_holdout', 0.0):.4f} "
            f"(unpruned {final.get('accuracy_holdout_unpruned') or 0.0:.4f}), {final.get('latency_ms', 0.0):.2f} ms "
            f"measured again (limit {final.get('limit_ms', 0.0):.2f} ms)"
        )
    else:
        feasible = [r for r in records if r.feasible]
        if feasible:
            best = min(feasible, key=lambda r: (-r.accuracy, r.latency_ms, r.number))
            fields["best schedule"] = (
                f"trial {best.number} (not exported yet): {best.summary}; calibration accuracy {best.accuracy:.4f} at "
                f"{best.latency_ms:.2f} ms"
            )
        else:
            fields["best schedule"] = "none meets the budget yet"
    storage = _storage_flag(context)
    return StudySummary(
        fields=fields,
        export_command=f"python -m tuner export --study {context.name}{storage}",
        report_command=f"python -m tuner report --study {context.name}{storage} -o {context.name}-report.html",
    )
