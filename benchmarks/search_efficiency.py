"""How many measured trials does a good front take? Hypervolume after n measured trials for random sampling,
unseeded NSGA-II and autoq's default (sensitivity-seeded NSGA-II with the cost-model screen), as a fraction
of the hypervolume of every trial measured here (a long run of 200 included: the best front known), on the demo
model (all-MiniLM-L6-v2, ONNX Runtime).

    python benchmarks/search_efficiency.py --trials 100 --reference 200 --out reports/benchmarks/search_efficiency.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import optuna
import pandas as pd

import autoq
from autoq.measure import fingerprint
from autoq.pareto import normalised_hypervolume
from autoq.space import load_space

SLOWED = 1.2  # a trial's FP32 rounds this much slower than the run's median: the machine was busy

VARIANTS = {  # label -> space overrides
    "random": {"sampler": "random", "sensitivity": "none", "screen": False},
    "NSGA-II unseeded": {"sampler": "nsga2", "sensitivity": "none", "screen": False},
    "autoq default (seeded + screened)": {},
}


def _space(seed: int, **overrides) -> dict:
    base = load_space("cpu-int8")
    return {"default": list(base.default), "options": base.options, "population": base.population, "seed": seed,
            "sampler": base.sampler, "sensitivity": base.sensitivity, "screen": base.screen, **overrides}


def measured(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials that cost a real measurement, in the order they ran (duplicates and screened ones are free).
    Latency becomes the ratio to FP32 timed side by side in the same trial: runs timed hours apart on a
    shared machine differ by ~7% in absolute milliseconds, which would decide the comparison."""
    done = trials[(trials["state"] == "COMPLETE") & ~trials["duplicate"].astype(bool)].sort_values("trial")
    return done.assign(latency_ms=1.0 / done["speedup"])


def steady(frame: pd.DataFrame, slack: float = SLOWED) -> pd.DataFrame:
    """Trials whose side-by-side FP32 rounds ran within `slack` of the run's median FP32: when the machine
    slowed during a trial, its ratio is not trustworthy (two random trials read 1.59x against 1.45x for all-int8
    while their FP32 rounds took 26 and 47 ms instead of 20), and a single such point decides a hypervolume."""
    return frame[frame["fp32_latency_ms"] <= slack * frame["fp32_latency_ms"].median()]


def _search_wall(run_dir: Path) -> float:
    """Seconds from the first trial's start to the last trial's end (the search, not the sensitivity analysis)."""
    study = optuna.load_study(study_name="autoq", storage=f"sqlite:///{run_dir / 'study.db'}")
    frame = study.trials_dataframe(attrs=("datetime_start", "datetime_complete"))
    return (frame["datetime_complete"].max() - frame["datetime_start"].min()).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--reference", type=int, default=200, help="measured trials of the reference run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="reports/bench-efficiency", help="run directories (not committed)")
    parser.add_argument("--out", default="reports/benchmarks/search_efficiency.md")
    parser.add_argument("--from-runs", action="store_true", help="tabulate finished runs without resuming them")
    args = parser.parse_args()
    runs, rows = {}, []
    plan = [("reference (autoq default, long)", {}, args.reference, args.seed + 100)]
    plan += [(label, overrides, args.trials, args.seed) for label, overrides in VARIANTS.items()]
    for label, overrides, trials, seed in plan:
        run_dir = Path(args.work) / label.split(" (")[0].replace(" ", "-")
        if args.from_runs:
            table, front = pd.read_csv(run_dir / "trials.csv"), pd.read_csv(run_dir / "pareto.csv")
        else:
            result = autoq.search(space=_space(seed, **overrides), trials=trials, threads=args.threads,
                                  out=run_dir, progress=False)
            table, front = result.trials, result.front
        screened = table[table["screened"].astype("string").fillna("") != ""]
        audited = screened[screened["screened"] == "audit"]
        runs[label] = measured(table)
        rows.append({"run": label, "trials budget": trials, "measured": len(runs[label]),
                     "screened (not measured)": len(screened) - len(audited), "audited": len(audited),
                     "screen wrong": int(audited["screen_wrong"].fillna(False).astype(bool).sum()),
                     "front points": len(front), "search wall_s": _search_wall(run_dir)})
    steps = [n for n in (10, 20, 30, 40, 50, 60, 80, 100, 150, 200) if n <= args.trials]
    for row, frame in zip(rows, runs.values(), strict=True):
        row["timed while slowed (left out)"] = len(frame) - len(steady(frame))
    frames = {f"{label}|{n}": steady(frame.head(n)) for label, frame in runs.items() for n in steps}
    frames["every run|all"] = pd.concat([steady(frame) for frame in runs.values()])
    volumes = normalised_hypervolume(frames)
    full = volumes["every run|all"]
    curve = pd.DataFrame({label: [volumes[f"{label}|{n}"] / full for n in steps] for label in runs},
                         index=pd.Index(steps, name="measured trials"))
    first95 = {label: next((n for n in steps if curve.loc[n, label] >= 0.95), None) for label in runs}
    Path(args.out).write_text(
        "# Hypervolume vs measured trials on all-MiniLM-L6-v2 (ONNX Runtime)\n\n"
        f"Budget {args.trials} measured trials per variant (sampler seed {args.seed}), and a long run of autoq's "
        f"default with {args.reference} measured trials (seed {args.seed + 100}). The reference front is every "
        f"trial measured by every run here together. {args.threads} threads, batch 1, "
        "seq 128. Hypervolume of the measured trials in (quality max, latency relative to FP32 timed side by side "
        "min, size min), each objective scaled to [0, 1] by the best and worst values over every run here "
        f"(reference point 1.1), divided by the reference front's. Trials whose FP32 rounds ran over {SLOWED}x the "
        "run's median FP32 (the machine was busy: the ratio is unreliable) count as measured but add no volume. "
        "Duplicates and screened candidates "
        "cost no measurement and are not counted.\n\n"
        f"## Fraction of the reference front's hypervolume\n\n{curve.to_markdown(floatfmt='.3f')}\n\n"
        f"First step at >= 95%: {first95}\n\n"
        f"## Runs\n\n{pd.DataFrame(rows).to_markdown(index=False, floatfmt='.1f')}\n\n"
        f"## Machine\n\n```\n{json.dumps(fingerprint(args.threads), indent=2)}\n```\n")
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
