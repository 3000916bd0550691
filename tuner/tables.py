"""HTML tables of a study, for the report and the dashboard: the Pareto table and the table of every trial.

Every value is read from the storage and escaped; latency is the stored measurement of each trial (median per-round
ratio to the unpruned model timed in the same rounds, times the study's reference).
"""

from __future__ import annotations

import html
import statistics
from typing import Any

from tuner.export import pareto_front
from tuner.figures import exported_trial
from tuner.study import ATTR_FINAL, ATTR_SEED_POINT, StudyContext, TrialRecord, trial_records

__all__ = ["STYLE", "cell", "latency_spread", "page", "pareto_table", "trial_table"]

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       color: #222; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { border-bottom: 1px solid #e4e4e4; padding: 0.3rem 0.6rem; text-align: right; vertical-align: top; }
th { background: #f5f5f5; } td.text, th.text { text-align: left; }
tr.chosen td { background: #eaf6ea; font-weight: 600; }
tr.over td { color: #888; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2rem 1rem; }
dt { font-weight: 600; } dd { margin: 0; }
pre { background: #f7f7f7; padding: 0.8rem; overflow-x: auto; font-size: 0.8rem; }
.figure { margin: 1rem 0 2rem; min-height: 450px; }
.warning { color: #a33; font-weight: 600; }
"""


def latency_spread(record: TrialRecord) -> tuple[float, float] | None:
    """The interquartile range, in ms, of a trial's per-round latency (per-round ratio to the unpruned model timed
    in the same round, times the study's reference); None when the trial stores no samples."""
    latency = record.latency
    candidate, baseline = latency.get("candidate_samples_ms") or [], latency.get("baseline_samples_ms") or []
    reference = latency.get("reference_ms")
    if not candidate or len(candidate) != len(baseline) or reference is None:
        return None
    ratios = sorted(c / b for c, b in zip(candidate, baseline, strict=True) if b > 0)
    if len(ratios) < 2:
        return None
    quartiles = statistics.quantiles(ratios, n=4, method="inclusive")
    return quartiles[0] * float(reference), quartiles[2] * float(reference)


def cell(value: Any, css: str = "") -> str:
    attribute = f' class="{css}"' if css else ""
    return f"<td{attribute}>{html.escape(str(value))}</td>"


def pareto_table(context: StudyContext, records: list[TrialRecord]) -> str:
    front = pareto_front(records, context.budget_ms())
    if not front:
        return "<p class='warning'>No trial meets the budget: the feasible Pareto front is empty.</p>"
    final = context.study.user_attrs.get(ATTR_FINAL) or {}
    finalists = final.get("finalists") or {}
    chosen = exported_trial(context)
    headers = (
        ("trial", ""), ("schedule", "text"), ("tokens", ""), ("accuracy calib", ""), ("accuracy held-out", ""),
        ("latency ms (median)", ""), ("spread ms (p25-p75)", ""), ("bound ms", ""), ("rounds", ""),
        ("measured again ms", ""), ("status", "text"),
    )  # fmt: skip
    rows = ["<tr>" + "".join(f'<th class="{css}">{html.escape(name)}</th>' for name, css in headers) + "</tr>"]
    for record in front:
        holdout = context.holdout_accuracy(record.fingerprint) if record.fingerprint else None
        spread = latency_spread(record)
        again = (finalists.get(str(record.number)) or {}).get("latency_ms")
        met = (finalists.get(str(record.number)) or {}).get("met")
        status = "exported" if record.number == chosen else (
            "over when measured again" if met is False else ("meets" if met else "meets (search)"))  # fmt: skip
        cells = [
            cell(record.number),
            cell(record.summary, "text"),
            cell(record.tokens_out if record.tokens_out is not None else "-"),
            cell(f"{record.accuracy:.4f}"),
            cell(f"{holdout:.4f}" if holdout is not None else "not scored"),
            cell(f"{record.latency_ms:.2f}"),
            cell(f"{spread[0]:.2f}-{spread[1]:.2f}" if spread else "-"),
            cell(f"{record.upper_ms:.2f}"),
            cell(record.latency.get("rounds", "-")),
            cell(f"{again:.2f}" if again is not None else "-"),
            cell(status, "text"),
        ]
        css = ' class="chosen"' if record.number == chosen else ""
        rows.append(f"<tr{css}>" + "".join(cells) + "</tr>")
    return (
        f"<p>The trials that meet the budget {html.escape(str(context.settings.get('budget')))} "
        f"({context.budget_ms():.2f} ms) and that no other such trial beats on both accuracy and latency. Latency: the "
        "median per-round ratio to the unpruned model timed in the same rounds, times the study's reference; the "
        "spread is the interquartile range of the per-round values; the bound (median + 2 standard errors) is what "
        "the budget rule compares. Held-out accuracy is scored at an export, for the front's best schedules.</p>"
        "<table>" + "".join(rows) + "</table>"
    )


def trial_table(context: StudyContext) -> str:
    """Every trial of the study, one row each: state, accuracy, measured latency and its bound, whether it meets the
    budget, tokens, the schedule and where it came from (the table optuna-dashboard 0.21 leaves blank)."""
    by_number = {record.number: record for record in trial_records(context.study)}
    budget_ms = context.budget_ms()
    headers = (
        ("trial", ""), ("state", "text"), ("accuracy calib", ""), ("latency ms (measured)", ""), ("bound ms", ""),
        ("meets the budget", "text"), ("tokens", ""), ("schedule", "text"), ("from", "text"), ("seconds", ""),
    )  # fmt: skip
    rows = ["<tr>" + "".join(f'<th class="{css}">{html.escape(name)}</th>' for name, css in headers) + "</tr>"]
    for trial in context.study.get_trials(deepcopy=False):
        record = by_number.get(trial.number)
        seconds = (
            f"{(trial.datetime_complete - trial.datetime_start).total_seconds():.1f}"
            if trial.datetime_complete and trial.datetime_start
            else "-"
        )
        seed = trial.user_attrs.get(ATTR_SEED_POINT)
        origin = f"seed point: {seed}" if seed else "sampler"
        if record is None:
            cells = [cell(trial.number), cell(trial.state.name.lower(), "text"), *[cell("-")] * 5]
            cells += [cell(trial.user_attrs.get("schedule", ""), "text"), cell(origin, "text"), cell(seconds)]
            css = ""
        else:
            meets = record.meets(budget_ms)
            cells = [
                cell(record.number),
                cell("complete", "text"),
                cell(f"{record.accuracy:.4f}"),
                cell(f"{record.latency_ms:.2f}"),
                cell(f"{record.upper_ms:.2f}"),
                cell("yes" if meets else "no, over", "text"),
                cell(record.tokens_out if record.tokens_out is not None else "-"),
                cell(record.summary, "text"),
                cell(origin, "text"),
                cell(seconds),
            ]
            css = "" if meets else ' class="over"'
        rows.append(f"<tr{css}>" + "".join(cells) + "</tr>")
    return (
        f"<p>Budget {html.escape(str(context.settings.get('budget')))} = {budget_ms:.2f} ms per batch: a trial meets "
        "it when its bound (median + 2 standard errors) is within it.</p><table>" + "".join(rows) + "</table>"
    )


def page(title: str, body: str) -> str:
    """A whole HTML document with the tables' style."""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )
