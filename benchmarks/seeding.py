"""Does sensitivity seeding help? Same budget, same seeds: autoq's default (seeded from per-layer sensitivity)
vs the unseeded NSGA-II, on the demo model (all-MiniLM-L6-v2). Hypervolume of (quality, latency, size) over
all completed trials, normalised over every run of the benchmark, so the numbers compare.

    python benchmarks/seeding.py --trials 40 --seeds 0 1 2 --out reports/benchmarks/seeding.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

import autoq
from autoq.measure import fingerprint
from autoq.pareto import normalised_hypervolume
from autoq.space import load_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="reports/bench-seeding", help="run directories (not committed)")
    parser.add_argument("--out", default="reports/benchmarks/seeding.md")
    args = parser.parse_args()
    base = load_space("cpu-int8")
    variants = {"seeded (sqnr, default)": "sqnr", "unseeded": "none"}
    frames, rows = {}, []
    for seed in args.seeds:
        for label, method in variants.items():  # alternate variants so machine drift hits both alike
            space = {"default": list(base.default), "options": base.options, "population": base.population,
                     "sensitivity": method, "seed": seed}
            started = time.perf_counter()
            result = autoq.search(space=space, trials=args.trials, threads=args.threads,
                                  out=Path(args.work) / f"{method}-seed{seed}", progress=False)
            frames[label, seed] = result.trials
            rows.append({"variant": label, "seed": seed, "wall_s": time.perf_counter() - started,
                         "front_points": len(result.front),
                         "best_quality_under_int8_latency": _best_under(result.trials)})
    volumes = normalised_hypervolume({f"{k[0]}|{k[1]}": v for k, v in frames.items()})
    table = pd.DataFrame(rows)
    table["hypervolume"] = [volumes[f"{r.variant}|{r.seed}"] for r in table.itertuples()]
    summary = table.groupby("variant")[["hypervolume", "best_quality_under_int8_latency", "wall_s"]].agg(
        ["mean", "std"])
    machine = fingerprint(args.threads)
    Path(args.out).write_text(
        f"# Sensitivity seeding vs unseeded NSGA-II on all-MiniLM-L6-v2 (ONNX Runtime)\n\n"
        f"{args.trials} trials per run, sampler seeds {args.seeds}, {args.threads} threads, batch 1, seq 128.\n"
        "Hypervolume of all completed trials in (quality max, latency min, size min), each objective scaled "
        "to [0, 1] by the best and worst values over every run here, reference point 1.1.\n"
        "`best_quality_under_int8_latency`: the best quality among trials no slower than 1.05x uniform int8 "
        "(measured in the same run).\n\n"
        f"## Per run\n\n{table.to_markdown(index=False, floatfmt='.4f')}\n\n"
        f"## Mean and standard deviation over seeds\n\n{summary.to_markdown(floatfmt='.4f')}\n\n"
        f"## Machine\n\n```\n{json.dumps(machine, indent=2)}\n```\n")
    print(Path(args.out).read_text())


def _best_under(trials: pd.DataFrame) -> float:
    done = trials[trials["state"] == "COMPLETE"]
    limit = 1.05 * done.loc[done["baseline"] == "uniform-int8", "latency_ms"].iloc[0]
    return float(done.loc[done["latency_ms"] <= limit, "quality"].max())


if __name__ == "__main__":
    main()
