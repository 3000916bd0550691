"""The Pareto plot of a study: accuracy vs latency, budget line, unpruned baseline, feasible/infeasible, the front.

A self-contained HTML file (plotly.js embedded, so it opens offline). The x axis is each trial's *measured* median
latency; feasibility (and the front) come from the *predicted* latency the search optimised, shown in the hover.
"""

from __future__ import annotations

import html
from pathlib import Path

import plotly.graph_objects as go

from tuner.study import StudyContext, TrialRecord, trial_records

__all__ = ["pareto_figure", "write_pareto_html"]

_FEASIBLE = "#1f77b4"
_INFEASIBLE = "#b0b0b0"
_FRONT = "#d62728"
_CHOSEN = "#2ca02c"
_BASELINE = "#000000"


def _x(record: TrialRecord) -> float:
    measured = record.measured_ms
    return measured if measured is not None else record.latency_ms


def _hover(record: TrialRecord, label: str) -> str:
    measured = record.measured_ms
    lines = [
        f"<b>trial {record.number}</b> ({label})",
        html.escape(record.summary),
        f"tokens out: {record.tokens_out}",
        f"accuracy (calib): {record.accuracy:.4f}",
        f"latency predicted: {record.latency_ms:.2f} ms",
        f"latency measured: {measured:.2f} ms" if measured is not None else "latency measured: (reused)",
    ]
    duplicate = record.evaluation.get("duplicate_of")
    if duplicate is not None:
        lines.append(f"same schedule as trial {duplicate}")
    return "<br>".join(lines)


def _scatter(records: list[TrialRecord], name: str, label: str, **marker: object) -> go.Scatter:
    return go.Scatter(
        x=[_x(r) for r in records],
        y=[r.accuracy for r in records],
        mode="markers",
        name=name,
        marker=marker,
        text=[_hover(r, label) for r in records],
        hovertemplate="%{text}<extra></extra>",
    )


def pareto_figure(context: StudyContext, front_numbers: set[int], chosen_number: int | None = None) -> go.Figure:
    """The study's accuracy-vs-latency figure.

    Args:
        context: the study.
        front_numbers: trial numbers on the feasible Pareto front (highlighted and joined by a line).
        chosen_number: the exported trial, marked with a star, if any.

    Returns:
        The figure.
    """
    records = trial_records(context.study)
    budget_ms = context.budget_ms()
    figure = go.Figure()
    infeasible = [r for r in records if not r.feasible]
    feasible = [r for r in records if r.feasible and r.number not in front_numbers]
    front = sorted((r for r in records if r.number in front_numbers), key=_x)
    if infeasible:
        figure.add_trace(_scatter(infeasible, "over budget", "infeasible", color=_INFEASIBLE, symbol="x", size=8))
    if feasible:
        figure.add_trace(_scatter(feasible, "within budget", "feasible", color=_FEASIBLE, symbol="circle", size=8))
    if front:
        trace = _scatter(front, "Pareto front (feasible)", "feasible, Pareto-optimal", color=_FRONT, size=11)
        trace.update(mode="lines+markers", line={"color": _FRONT, "width": 1, "dash": "dot"})
        figure.add_trace(trace)
    chosen = [r for r in records if r.number == chosen_number]
    if chosen:
        figure.add_trace(
            _scatter(chosen, f"chosen (trial {chosen[0].number})", "exported", color=_CHOSEN, symbol="star", size=18)
        )
    baseline = context.baseline
    if baseline.get("accuracy_calib") is not None:
        figure.add_trace(
            go.Scatter(
                x=[baseline["latency_ms"]],
                y=[baseline["accuracy_calib"]],
                mode="markers",
                name="unpruned model",
                marker={"color": _BASELINE, "symbol": "diamond", "size": 12},
                text=[
                    f"<b>unpruned model</b><br>accuracy (calib): {baseline['accuracy_calib']:.4f}<br>"
                    f"latency: {baseline['latency_ms']:.2f} ms (calibration)"
                ],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    figure.add_vline(
        x=budget_ms,
        line={"color": _FRONT, "dash": "dash"},
        annotation_text=f"budget {context.settings['budget']} = {budget_ms:.1f} ms",
        annotation_position="top right",
    )
    figure.update_layout(
        title=(
            f"{context.name}: accuracy vs latency ({len(records)} trials; "
            f"feasibility by predicted latency, x = measured median)"
        ),
        xaxis_title="latency per batch, measured median (ms)",
        yaxis_title="accuracy on the calibration subset",
        template="plotly_white",
        hovermode="closest",
        legend={"orientation": "h", "y": -0.18},
    )
    return figure


def write_pareto_html(figure: go.Figure, path: str | Path) -> Path:
    """Write the figure as one self-contained HTML file (plotly.js embedded; works offline). Returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    figure.write_html(temporary, include_plotlyjs=True, full_html=True)
    temporary.replace(target)
    return target
