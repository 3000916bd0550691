"""Tuner overhead: the share of a trial's wall time spent outside model forward passes, on the offline demo.

Runs a small demo study through the same code as ``tuner run`` (real SQLite storage in a temporary folder, the real
sampler, the demo evaluator) and reports, per trial, the wall time (from one trial's end to the next: the sampler,
storage writes, schedule building, applying the schedule, and the forward passes) against the time inside forward
passes (the accuracy pass over the calibration subset and the latency measurement, interleaved with the unpruned
model). Target: overhead <= 5%.

    python benchmarks/tuner_overhead.py                  # the run defaults (tpe, demo calib/batch)
    python benchmarks/tuner_overhead.py --trials 60 --sampler nsga2 --per-trial
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluators import get_evaluator  # noqa: E402
from tuner.latency import parse_budget  # noqa: E402
from tuner.measure import latency_source_for  # noqa: E402
from tuner.options import RunOptions  # noqa: E402
from tuner.storage import open_storage  # noqa: E402
from tuner.study import StudyRunner, TrialOutcome, create_or_resume  # noqa: E402
from tuner.timing import tune_allocator  # noqa: E402

TARGET = 0.05


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=40, help="trials to run (default 40)")
    parser.add_argument("--sampler", default="tpe", help="tpe, nsga2, gp or random (default tpe)")
    parser.add_argument("--space", default="family", help="search space (default family)")
    parser.add_argument("--budget", default="50ms", help="latency budget (default 50ms)")
    parser.add_argument("--calib", type=int, default=None, help="calibration scenes (default: the demo's)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default: the demo's)")
    parser.add_argument("--repeats", type=int, default=8, help="interleaved rounds per trial (default 8, as run)")
    parser.add_argument("--per-trial", action="store_true", help="print every trial")
    args = parser.parse_args()

    tune_allocator()  # as tuner run does
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    stamps: list[float] = []
    outcomes: list[TrialOutcome] = []

    def on_trial(outcome: TrialOutcome) -> None:
        stamps.append(time.perf_counter())
        outcomes.append(outcome)

    with tempfile.TemporaryDirectory() as folder:
        options = RunOptions(
            budget=args.budget,
            trials=args.trials,
            sampler=args.sampler,
            space=args.space,
            storage=f"sqlite:///{folder}/tuner.db",
            calib=args.calib,
            batch_size=args.batch_size,
            device="cpu",
            repeats=args.repeats,
        )
        evaluator = get_evaluator("demo")(calib=args.calib, batch_size=args.batch_size, device="cpu")
        storage = open_storage(options.storage)
        context, _ = create_or_resume(
            storage, options.storage, "overhead", options, evaluator, parse_budget(args.budget), lambda _: None
        )
        source = latency_source_for("measured", evaluator)
        runner = StudyRunner(context, evaluator, source, args.sampler, 0, args.repeats, on_trial=on_trial)
        started = time.perf_counter()
        runner.run(args.trials, None)
        ended = time.perf_counter()

    # Wall time of trial i: from the end of trial i-1 (the start of the loop for the first) to the end of trial i.
    # The last trial's tell is not inside any interval; it is added from the total.
    walls = [b - a for a, b in zip([started, *stamps[:-1]], stamps, strict=True)]
    walls[-1] += ended - stamps[-1]
    forwards = [o.forward_s for o in outcomes]
    inside = [o.objective_s - o.forward_s for o in outcomes]
    if args.per_trial:
        print(f"{'trial':>5} {'wall ms':>9} {'forward ms':>10} {'overhead':>8}  schedule")
        for outcome, wall, forward in zip(outcomes, walls, forwards, strict=True):
            share = (wall - forward) / wall
            note = f" (= trial {outcome.duplicate_of}, not re-evaluated)" if outcome.duplicate_of is not None else ""
            print(
                f"{outcome.number:>5} {wall * 1e3:>9.1f} {forward * 1e3:>10.1f} {share:>8.1%}  {outcome.summary}{note}"
            )
    total_wall, total_forward = sum(walls), sum(forwards)
    overhead = (total_wall - total_forward) / total_wall
    evaluated = [i for i, o in enumerate(outcomes) if o.duplicate_of is None]
    per_trial = [(walls[i] - forwards[i]) * 1e3 for i in evaluated]
    print(
        f"demo, {args.sampler} sampler, {args.space} space, {len(outcomes)} trials ({len(evaluated)} evaluated, "
        f"{len(outcomes) - len(evaluated)} reused), calib {evaluator.settings()['calib']}, "
        f"batch {evaluator.batch_size}, latency rounds {args.repeats} (schedule + unpruned)"
    )
    print(f"wall {total_wall:.2f} s, inside forward passes {total_forward:.2f} s")
    print(
        f"overhead per evaluated trial: median {statistics.median(per_trial):.1f} ms "
        f"(inside the objective {statistics.median(inside[i] * 1e3 for i in evaluated):.1f} ms: parameters, "
        "schedule, storage writes; the rest: sampler and trial bookkeeping)"
    )
    verdict = "OK" if overhead <= TARGET else "OVER TARGET"
    print(f"overhead share of wall time: {overhead:.2%} (target <= {TARGET:.0%}): {verdict}")
    return 0 if overhead <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
