"""``tuner report``: one self-contained HTML file about a study (plotly.js inlined once, so it opens offline).

What it holds: the study summary (model, task, device, budget, baseline, best schedule, how to export it), the
figures of :mod:`tuner.figures`, the Pareto table (the feasible front: accuracy on the calibration subset and on the
held-out slice, measured latency with its spread and bound, tokens, the export's re-measurement), the exported
schedule's JSON, and the machine and versions the latencies were measured on. Everything is read from the storage.
"""

from __future__ import annotations

import html
import json
import platform
from pathlib import Path
from typing import Any

import optuna
import plotly

from tuner import __version__
from tuner.errors import TunerError
from tuner.figures import FIGURE_IDS, exported_trial, study_figures, study_summary
from tuner.options import output_dir
from tuner.storage import public_url
from tuner.study import ATTR_FINAL, StudyContext, TrialRecord, trial_records
from tuner.tables import STYLE, pareto_table

__all__ = ["export_file", "render_report", "write_report"]


def _definition_list(items: dict[str, Any]) -> str:
    return (
        "<dl>"
        + "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in items.items())
        + "</dl>"
    )


def _exported_section(context: StudyContext, records: list[TrialRecord]) -> str:
    chosen = exported_trial(context)
    by_number = {r.number: r for r in records}
    final = context.study.user_attrs.get(ATTR_FINAL) or {}
    summary = study_summary(context, records)
    if chosen is None or chosen not in by_number:
        reason = (
            f"no schedule met {final.get('budget')} when measured again at the last export"
            if final
            else "the study has not been exported yet"
        )
        return f"<p>None: {html.escape(reason)}. Export with <code>{html.escape(summary.export_command)}</code>.</p>"
    schedule = context.schedule_of(by_number[chosen].trial)
    facts = {
        "trial": chosen,
        "schedule": schedule.describe(),
        "budget": final.get("budget"),
        "measured again": f"{final.get('latency_ms', 0.0):.2f} ms (bound {final.get('latency_upper_ms', 0.0):.2f} ms, "
        f"limit {final.get('limit_ms', 0.0):.2f} ms)",
        "held-out accuracy": f"{final.get('accuracy_holdout', 0.0):.4f} (unpruned "
        f"{final.get('accuracy_holdout_unpruned') or 0.0:.4f})",
        "exported at": final.get("at"),
        "write its JSON": summary.export_command,
    }
    found = export_file(context, chosen)
    if found is not None:
        path, text = found
        facts["its JSON"] = f"{path} (with its metrics and provenance: open it below)"
        return (
            _definition_list(facts)
            + f"<details><summary>{html.escape(str(path))}</summary><pre>{html.escape(text)}</pre></details>"
        )
    facts["its JSON"] = (
        "not found here: the schedule alone is below; `tuner export` writes it with metrics and provenance"
    )
    return (
        _definition_list(facts)
        + f"<details open><summary>the schedule</summary><pre>{html.escape(schedule.to_json())}</pre></details>"
    )


def export_file(context: StudyContext, trial: int | None = None) -> tuple[Path, str] | None:
    """The study's exported ``best.json`` (where ``tuner run``/``export`` writes it, from the current folder) and its
    text, when it exists and holds the study's ``trial`` (any trial when None); else None."""
    path = output_dir(context.name, storage=context.storage_url) / "best.json"
    try:
        text = path.read_text(encoding="utf-8")
        provenance = json.loads(text).get("provenance") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if provenance.get("study") != context.name or (trial is not None and provenance.get("trial") != trial):
        return None
    return path, text


def _machine_section(context: StudyContext) -> str:
    baseline = context.baseline
    environment = dict(baseline.get("environment") or {})
    measured = {
        "latency source": context.latency_source
        + ("" if context.latency_source == "measured" else " (a deterministic model, NOT measured)"),
        **{key.replace("_", " "): value for key, value in environment.items()},
        "reference measured": baseline.get("measured"),
        "tuner version when the study was made": context.meta.get("tool_version"),
        "study created": context.meta.get("created"),
        "storage": public_url(context.storage_url),
    }
    workload = context.meta.get("workload")
    if isinstance(workload, dict) and workload.get("reason"):
        measured["workload"] = workload["reason"]
    found = export_file(context, exported_trial(context))
    versions = (json.loads(found[1]).get("provenance") or {}).get("versions") if found else None
    if isinstance(versions, dict):
        measured["versions at the export"] = ", ".join(f"{name} {version}" for name, version in versions.items())
    now = {
        "tuner": __version__,
        "optuna": optuna.__version__,
        "plotly": plotly.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
    }
    return (
        "<h3>Where the latencies were measured</h3>"
        + _definition_list(measured)
        + "<h3>This report was written with</h3>"
        + _definition_list(now)
    )


def render_report(context: StudyContext) -> str:
    """The report of a study, as one self-contained HTML document."""
    records = trial_records(context.study)
    summary = study_summary(context, records)
    figures = study_figures(context, records)
    parts = []
    for index, key in enumerate(FIGURE_IDS):
        div = figures[key].to_html(
            full_html=False,
            include_plotlyjs=index == 0,
            div_id=key,
            config={"displaylogo": False, "responsive": True},
        )
        parts.append(f'<div class="figure">{div}</div>')
    title = f"{context.name}: tuner report"
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        + _definition_list(summary.fields)
        + "<h2>Figures</h2>"
        + "".join(parts)
        + "<h2>Pareto-optimal schedules that meet the budget</h2>"
        + pareto_table(context, records)
        + "<h2>Exported schedule</h2>"
        + _exported_section(context, records)
        + "<h2>Machine and versions</h2>"
        + _machine_section(context)
        + "</body></html>\n"
    )


def write_report(context: StudyContext, path: str | Path) -> Path:
    """Write the study's report (atomically, creating the folder).

    Returns:
        The path.

    Raises:
        TunerError: the file cannot be written (names ``output``).
    """
    target = Path(path)
    document = render_report(context)
    temporary = target.with_name(f".{target.name}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(document, encoding="utf-8")
        temporary.replace(target)
    except OSError as error:
        raise TunerError(
            f"cannot write the report to {str(target)!r}: {error.strerror or error}; give a writable output path",
            param="output",
        ) from None
    return target
