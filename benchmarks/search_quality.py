"""Does the search beat hand-picked schedules? TPE vs random search vs the paper's families, on the demo, measured.

Everything is measured on this machine in one run: every trial's latency is its schedule timed in rounds interleaved
with the unpruned model (the ratio times the study's reference), exactly as ``tuner run`` does.

- TPE (the default sampler) and random search, each over ``--seeds`` seeds with ``--trials`` trials (seed points
  included in both), on a study whose budget is the loosest one below; the hypervolume of the measured front
  (accuracy vs latency / unpruned latency, reference point: accuracy 0 at the unpruned latency) after every trial,
  mean and spread over seeds; the trials TPE needs to reach random search's final mean hypervolume.
- The paper's hand-picked families (Skip stride 2, Mean, Decreasing alpha 2; the paper's scoring) at several output
  token counts, each measured the same way: the schedule a user would pick for a budget is the most accurate on the
  calibration subset among those that meet it.
- At each budget (share of the unpruned latency): held-out accuracy of the tuner's exported schedule (``tuner
  export`` for that budget: re-measured, held-out scored) against the paper-family pick.

Targets: TPE reaches random's final hypervolume in at most half the trials; the tuned schedule's held-out accuracy is
at least the paper-family pick's at every budget.

    python benchmarks/search_quality.py                       # 3 seeds x 80 trials, budgets 60% and 80%
    python benchmarks/search_quality.py --seeds 1 --trials 20 # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from evaluators.demo import DemoEvaluator  # noqa: E402
from search_spaces import EncoderShape  # noqa: E402
from tuner.evoprune import Schedule, Scoring, apply  # noqa: E402
from tuner.export import select_schedule  # noqa: E402
from tuner.figures import hypervolume  # noqa: E402
from tuner.latency import LatencySource, parse_budget  # noqa: E402
from tuner.measure import latency_source_for, measure_schedule  # noqa: E402
from tuner.options import RunOptions  # noqa: E402
from tuner.storage import open_storage  # noqa: E402
from tuner.study import StudyContext, StudyRunner, create_or_resume, trial_records  # noqa: E402
from tuner.timing import tune_allocator  # noqa: E402

FAMILIES: dict[str, dict[str, Any]] = {
    "skip": {"stride": 2, "offset": 0, "start_layer": 0},
    "mean": {},
    "decreasing": {"alpha": 2.0},
}
KEEP_SHARES = (0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.12, 0.1)


@dataclass
class FamilyPoint:
    label: str
    schedule: Schedule
    accuracy_calib: float
    accuracy_holdout: float
    ratio: float
    ratio_upper: float


def family_grid(evaluator: DemoEvaluator, source: LatencySource, shape: EncoderShape, rounds: int) -> list[FamilyPoint]:
    points = []
    for family, params in FAMILIES.items():
        for share in KEEP_SHARES:
            tokens_out = max(1, round(share * shape.tokens_in))
            try:
                schedule = Schedule.preset(
                    family,
                    num_layers=shape.num_layers,
                    tokens_in=shape.tokens_in,
                    tokens_out=tokens_out,
                    scoring=Scoring(),
                    family=shape.family,
                    has_cls=shape.has_cls,
                    **params,
                )
            except ValueError:
                continue  # the family cannot reach that count on this depth (a layer would lose over half)
            with apply(evaluator.model, schedule):
                calib, holdout = evaluator.accuracy("calib"), evaluator.accuracy("holdout")
            paired = measure_schedule(evaluator, source, schedule, rounds)
            points.append(FamilyPoint(schedule.describe(), schedule, calib, holdout, paired.ratio, paired.ratio_upper))
            print(f"  {schedule.describe():55s} calib {calib:.4f} holdout {holdout:.4f} ratio {paired.ratio:.3f}")
    return points


def run_study(
    folder: Path, evaluator: DemoEvaluator, sampler: str, seed: int, trials: int, budget: str, rounds: int
) -> StudyContext:
    options = RunOptions(
        budget=budget,
        trials=trials,
        sampler=sampler,
        seed=seed,
        storage=f"sqlite:///{folder}/{sampler}-{seed}.db",
        device="cpu",
        repeats=rounds,
        final_repeats=20,
    )
    storage = open_storage(options.storage)
    context, _ = create_or_resume(
        storage, options.storage, f"{sampler}-{seed}", options, evaluator, parse_budget(budget), lambda _: None
    )
    runner = StudyRunner(context, evaluator, latency_source_for("measured", evaluator), sampler, seed, rounds)
    started = time.perf_counter()
    runner.run(trials, None)
    print(f"  {sampler} seed {seed}: {trials} trials in {time.perf_counter() - started:.0f} s")
    return context


def hypervolume_curve(context: StudyContext) -> list[float]:
    records = trial_records(context.study)
    reference = context.reference_ms
    points: list[tuple[float, float]] = []
    curve = []
    for record in records:
        points.append((record.accuracy, record.latency_ms / reference))
        curve.append(hypervolume(points))
    return curve


def summary(values: list[float]) -> tuple[float, float]:
    found = [v for v in values if v == v]  # NaN: the seed exported nothing for that budget
    if not found:
        return float("nan"), 0.0
    return statistics.mean(found), (statistics.stdev(found) if len(found) > 1 else 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=80, help="trials per study (default 80)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per sampler (default 3)")
    parser.add_argument("--samplers", default="tpe,random", help="samplers to run now (default tpe,random)")
    parser.add_argument("--budgets", default="60%,80%", help="budgets (default 60%%,80%%)")
    parser.add_argument("--batch-size", type=int, default=32, help="demo scenes per timed forward (default 32)")
    parser.add_argument("--calib", type=int, default=None, help="calibration scenes (default: the demo's 256)")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds per latency measurement (default 8)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"), help="folder for JSON and HTML")
    parser.add_argument(
        "--fresh", action="store_true", help="start a new results file (default: add to one with the same settings)"
    )
    args = parser.parse_args()

    tune_allocator()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    budgets = [parse_budget(text.strip()) for text in args.budgets.split(",")]
    loosest = max(budgets, key=lambda b: b.limit_ms(1.0))
    started = time.perf_counter()
    evaluator = DemoEvaluator(batch_size=args.batch_size, calib=args.calib, device="cpu")
    shape = EncoderShape.of_model(evaluator.model)
    source = latency_source_for("measured", evaluator)
    environment = source.environment()
    settings = {
        "trials": args.trials, "batch_size": args.batch_size, "calib": evaluator.calib, "rounds": args.rounds,
        "budgets": [str(b) for b in budgets], "device": environment.get("device_name"),
        "threads": environment.get("threads"),
    }  # fmt: skip
    print(f"demo: calib {evaluator.calib}, held-out {evaluator.holdout}, batch {evaluator.batch_size}, CPU threads "
          f"{settings['threads']} on {settings['device']}")  # fmt: skip
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / "search_quality.json"
    results: dict[str, Any] = {"settings": settings, "studies": {}, "paper_grid": None}
    if path.is_file() and not args.fresh:
        stored = json.loads(path.read_text())
        if stored.get("settings") == settings:
            results = stored
            print(f"adding to {path} ({len(results['studies'])} studies in it)")

    def save() -> None:
        path.write_text(json.dumps(results, indent=1))

    if results["paper_grid"] is None:
        print("paper families (paper scoring):")
        results["paper_grid"] = [
            {"schedule": p.label, "accuracy_calib": p.accuracy_calib, "accuracy_holdout": p.accuracy_holdout,
             "ratio": p.ratio, "ratio_upper": p.ratio_upper}
            for p in family_grid(evaluator, source, shape, args.rounds)
        ]  # fmt: skip
        save()
    with tempfile.TemporaryDirectory() as folder:
        for sampler in [name.strip() for name in args.samplers.split(",")]:
            for seed in range(args.seeds):
                key = f"{sampler}-{seed}"
                if key in results["studies"]:
                    continue
                context = run_study(Path(folder), evaluator, sampler, seed, args.trials, str(loosest), args.rounds)
                record: dict[str, Any] = {"curve": hypervolume_curve(context), "exports": {}}
                export_source = latency_source_for("measured", evaluator, rounds_warmup=3)
                for budget in budgets:
                    selection = select_schedule(context, evaluator, export_source, budget=budget, rounds=20)
                    chosen = selection.chosen
                    record["exports"][str(budget)] = (
                        {"trial": chosen.record.number, "schedule": chosen.record.summary,
                         "accuracy_holdout": chosen.accuracy_holdout,
                         "latency_ms": chosen.verdict.latency_ms if chosen.verdict else None}
                        if chosen else None
                    )  # fmt: skip
                    print(f"    export {budget}: "
                          + (f"trial {chosen.record.number} {chosen.record.summary}: held-out "
                             f"{chosen.accuracy_holdout:.4f}" if chosen else "nothing meets it"))  # fmt: skip
                record["noisy_trials"] = sum(r.noisy for r in trial_records(context.study))
                results["studies"][key] = record
                save()
    elapsed = time.perf_counter() - started
    return report(results, args.seeds, budgets, args.output, elapsed)


def report(results: dict[str, Any], seeds: int, budgets: list[Any], output: Path, elapsed: float) -> int:
    """Print the tables and write the figure from whatever studies the results file holds."""
    studies = results["studies"]
    curves = {
        sampler: [studies[f"{sampler}-{seed}"]["curve"] for seed in range(seeds) if f"{sampler}-{seed}" in studies]
        for sampler in ("tpe", "random")
    }
    if not curves["tpe"] or not curves["random"]:
        print(f"not all studies are there yet ({sorted(studies)}); run again with the other --samplers")
        return 1
    trials = min(len(curve) for runs in curves.values() for curve in runs)
    mean_curve = {s: [statistics.mean(c[i] for c in curves[s]) for i in range(trials)] for s in curves}
    spread = {
        s: [statistics.stdev(c[i] for c in curves[s]) if len(curves[s]) > 1 else 0.0 for i in range(trials)]
        for s in curves
    }
    target_hv = mean_curve["random"][-1]
    reached = next((i + 1 for i, value in enumerate(mean_curve["tpe"]) if value >= target_hv), None)
    print()
    print(f"hypervolume (accuracy x share of the unpruned latency saved), mean +- sd over "
          f"{len(curves['tpe'])} / {len(curves['random'])} seeds:")  # fmt: skip
    print(f"{'after trials':>12} {'tpe':>16} {'random':>16}")
    for index in sorted({9, 19, 39, trials // 2 - 1, trials - 1}):
        if 0 <= index < trials:
            print(f"{index + 1:>12} {mean_curve['tpe'][index]:>9.4f} +-{spread['tpe'][index]:.4f} "
                  f"{mean_curve['random'][index]:>9.4f} +-{spread['random'][index]:.4f}")  # fmt: skip
    half = trials // 2
    hv_ok = reached is not None and reached <= half
    print(f"TPE reaches random's final mean hypervolume {target_hv:.4f} after {reached} trials "
          f"(target <= {half}): {'OK' if hv_ok else 'MISSED'}")  # fmt: skip

    held_ok = True
    rows = []
    print()
    for budget in budgets:
        limit = budget.limit_ms(1.0)
        grid = results["paper_grid"]
        feasible = [p for p in grid if p["ratio_upper"] <= limit + 1e-9]
        pick = max(feasible, key=lambda p: (p["accuracy_calib"], -p["ratio"])) if feasible else None
        best_holdout = max((p["accuracy_holdout"] for p in feasible), default=float("nan"))
        exported = {
            s: [
                (studies[f"{s}-{seed}"]["exports"].get(str(budget)) or {}).get("accuracy_holdout", float("nan"))
                for seed in range(seeds)
                if f"{s}-{seed}" in studies
            ]
            for s in ("tpe", "random")
        }
        tpe_mean, tpe_sd = summary(exported["tpe"])
        random_mean, random_sd = summary(exported["random"])
        pick_holdout = pick["accuracy_holdout"] if pick else float("nan")
        found = sum(v == v for v in exported["tpe"])
        ok = found > 0 and (pick is None or tpe_mean >= pick_holdout)
        held_ok = held_ok and ok
        print(f"budget {budget}: paper pick {pick['schedule'] if pick else '(no paper-family schedule meets it)'} "
              f"held-out {pick_holdout:.4f} (best paper-family held-out {best_holdout:.4f}); tuned (TPE) held-out "
              f"{tpe_mean:.4f} +-{tpe_sd:.4f} ({found}/{len(exported['tpe'])} seeds exported); random "
              f"{random_mean:.4f} +-{random_sd:.4f}: {'OK' if ok else 'MISSED'}")  # fmt: skip
        rows.append({"budget": str(budget), "paper_pick": pick, "paper_best_holdout": best_holdout,
                     "tpe_holdout": exported["tpe"], "random_holdout": exported["random"]})  # fmt: skip
    print(f"\nthis invocation: {elapsed / 60:.1f} min on {results['settings']['device']}")
    results["summary"] = {"tpe_reaches_random_final_after": reached, "trials": trials, "budgets": rows}
    (output / "search_quality.json").write_text(json.dumps(results, indent=1))
    _figure(mean_curve, spread, output / "search_quality.html")
    print(f"results: {output / 'search_quality.json'}, figure: {output / 'search_quality.html'}")
    return 0 if hv_ok and held_ok else 1


def _figure(mean_curve: dict[str, list[float]], spread: dict[str, list[float]], path: Path) -> None:
    import plotly.graph_objects as go

    figure = go.Figure()
    colours = {"tpe": "#d62728", "random": "#1f77b4"}
    for sampler, curve in mean_curve.items():
        x = list(range(1, len(curve) + 1))
        upper = [m + s for m, s in zip(curve, spread[sampler], strict=True)]
        lower = [m - s for m, s in zip(curve, spread[sampler], strict=True)]
        figure.add_trace(
            go.Scatter(
                x=x + x[::-1],
                y=upper + lower[::-1],
                fill="toself",
                line={"width": 0},
                fillcolor=colours[sampler],
                opacity=0.15,
                showlegend=False,
                hoverinfo="skip",
            )
        )
        figure.add_trace(
            go.Scatter(
                x=x, y=curve, name=f"{sampler} (mean, band: +-1 sd over seeds)", line={"color": colours[sampler]}
            )
        )
    figure.update_layout(
        title="Hypervolume of the measured front after each trial (demo; reference: accuracy 0, unpruned latency)",
        xaxis_title="trials",
        yaxis_title="hypervolume (accuracy x share of unpruned latency saved)",
        template="plotly_white",
    )
    figure.write_html(path, include_plotlyjs=True, full_html=True)


if __name__ == "__main__":
    sys.exit(main())
