"""The Pareto plot of a study: accuracy vs measured latency, budget line, unpruned baseline, the front, the choice.

A self-contained HTML file (plotly.js embedded, so it opens offline). Everything on it comes from measured latency:
the x axis is each trial's ``latency_ms`` (median ratio to the unpruned model measured in the same rounds, times the
study's reference), colours and the front follow the budget rule on that measurement, and the exported schedule sits
at its re-measured value. Outliers far to the right are clipped to the edge of the axis (the title says how many).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from tuner.study import ATTR_FINAL, StudyContext, TrialRecord, trial_records

__all__ = ["CLIP_FACTOR", "pareto_figure", "write_pareto_html"]

_FEASIBLE = "#1f77b4"
_INFEASIBLE = "#b0b0b0"
_FRONT = "#d62728"
_CHOSEN = "#2ca02c"
_BASELINE = "#000000"

CLIP_FACTOR = 1.6
"""The x axis ends at this multiple of max(budget, reference unpruned latency); slower trials sit on its edge."""


def _hover(record: TrialRecord, label: str) -> str:
    latency = record.latency
    lines = [
        f"<b>trial {record.number}</b> ({label})",
        html.escape(record.summary),
        f"tokens out: {record.tokens_out}",
        f"accuracy (calib): {record.accuracy:.4f}",
        f"latency measured: {record.latency_ms:.2f} ms (bound {record.upper_ms:.2f} ms)",
    ]
    if "ratio" in latency:
        lines.append(
            f"ratio to unpruned: {latency['ratio']:.3f} over {latency.get('rounds')} rounds"
            + (" (noisy)" if latency.get("noisy") else "")
        )
    duplicate = record.evaluation.get("duplicate_of")
    if duplicate is not None:
        lines.append(f"same schedule as trial {duplicate}")
    return "<br>".join(lines)


def _scatter(records: list[TrialRecord], x_max: float, name: str, label: str, **marker: Any) -> go.Scatter:
    return go.Scatter(
        x=[min(r.latency_ms, x_max) for r in records],
        y=[r.accuracy for r in records],
        mode="markers",
        name=name,
        marker=marker,
        text=[_hover(r, label) for r in records],
        hovertemplate="%{text}<extra></extra>",
    )


def pareto_figure(context: StudyContext, front_numbers: set[int], chosen_number: int | None = None) -> go.Figure:
    """The study's accuracy-vs-measured-latency figure.

    Args:
        context: the study.
        front_numbers: trial numbers on the feasible Pareto front (highlighted and joined by a line).
        chosen_number: the exported trial, marked with a star at its re-measured latency, if any.

    Returns:
        The figure.
    """
    records = trial_records(context.study)
    budget_ms = context.budget_ms()
    reference = context.reference_ms
    x_max = CLIP_FACTOR * max(budget_ms, reference)
    clipped = sum(r.latency_ms > x_max for r in records)
    figure = go.Figure()
    infeasible = [r for r in records if not r.feasible]
    feasible = [r for r in records if r.feasible and r.number not in front_numbers]
    front = sorted((r for r in records if r.number in front_numbers), key=lambda r: r.latency_ms)
    if infeasible:
        figure.add_trace(
            _scatter(infeasible, x_max, "over budget", "infeasible", color=_INFEASIBLE, symbol="x", size=8)
        )
    if feasible:
        figure.add_trace(
            _scatter(feasible, x_max, "meets the budget", "feasible", color=_FEASIBLE, symbol="circle", size=8)
        )
    if front:
        trace = _scatter(front, x_max, "Pareto front (feasible)", "feasible, Pareto-optimal", color=_FRONT, size=11)
        trace.update(mode="lines+markers", line={"color": _FRONT, "width": 1, "dash": "dot"})
        figure.add_trace(trace)
    chosen = [r for r in records if r.number == chosen_number]
    final = context.study.user_attrs.get(ATTR_FINAL) or {}
    if chosen:
        remeasured = final.get("latency_ms") if final.get("chosen_trial") == chosen_number else None
        x = float(remeasured) if remeasured is not None else chosen[0].latency_ms
        figure.add_trace(
            go.Scatter(
                x=[min(x, x_max)],
                y=[chosen[0].accuracy],
                mode="markers",
                name=f"exported (trial {chosen_number})",
                marker={"color": _CHOSEN, "symbol": "star", "size": 18},
                text=[f"{_hover(chosen[0], 'exported')}<br>measured again at export: {x:.2f} ms"],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    baseline = context.baseline
    if baseline.get("accuracy_calib") is not None:
        figure.add_trace(
            go.Scatter(
                x=[reference],
                y=[baseline["accuracy_calib"]],
                mode="markers",
                name="unpruned model",
                marker={"color": _BASELINE, "symbol": "diamond", "size": 12},
                text=[
                    f"<b>unpruned model</b><br>accuracy (calib): {baseline['accuracy_calib']:.4f}<br>"
                    f"latency: {reference:.2f} ms (the study's reference)"
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
    source = context.latency_source
    clipped_text = f"; {clipped} slower trials clipped to the right edge" if clipped else ""
    figure.update_layout(
        title=(
            f"{context.name}: accuracy vs {'synthetic (not measured) ' if source != 'measured' else 'measured '}"
            f"latency ({len(records)} trials{clipped_text})"
        ),
        xaxis_title=(
            "latency per batch (ms): median ratio to the unpruned model in the same rounds x its reference "
            f"{reference:.1f} ms"
        ),
        xaxis={"range": [0, x_max * 1.02]},
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
