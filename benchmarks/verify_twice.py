"""Does `autoq verify` reproduce a run's result? Two invocations of `autoq.verify` on each finished run (FP32,
every front point, the run's recipes; deployment session settings, alternating rounds), side by side: each row's
speed-up over FP32 with its 95% interval from both, whether the second median falls inside the first interval,
and the verdicts the search itself gave the recipes (`recipes.csv`).

    python benchmarks/verify_twice.py reports/precision-menu-runs4/minilm reports/precision-menu-runs4/det-openvino \
        --out reports/benchmarks/verify.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

import autoq
from autoq.measure import fingerprint


def _verdicts(run: Path) -> list[str]:
    recipes = run / "recipes.csv"
    if not recipes.is_file():
        return []
    table = pd.read_csv(recipes, keep_default_na=False)
    rows = table[["recipe", "val_quality", "speedup", "size_bytes", "verdict"]].assign(
        MB=lambda t: pd.to_numeric(t["size_bytes"], errors="coerce") / 1e6).drop(columns="size_bytes")
    return ["The search's own verdicts on the recipes (`recipes.csv`):", "", rows.to_markdown(index=False,
                                                                                             floatfmt=".4g"), ""]


def compare(run: Path, rounds: int, passes: int, gap_s: float) -> list[str]:
    """Two invocations `gap_s` apart, the first one recorded afresh (verify.json), the second read against it."""
    (run / "verify.json").unlink(missing_ok=True)
    first = autoq.verify(run, rounds=rounds, passes=passes)
    time.sleep(gap_s)
    second = autoq.verify(run, rounds=rounds, passes=passes)
    table = first.merge(second.drop(columns=["first"]), on="model", suffixes=(" 1st", " 2nd"))
    table["2nd inside 1st interval"] = table["inside first"]
    table["model"] = table["model"].str.slice(0, 90)
    columns = ["model", "vs FP32 1st", "95% low 1st", "95% high 1st", "vs FP32 2nd", "95% low 2nd", "95% high 2nd",
               "2nd inside 1st interval"]
    meta = json.loads((run / "meta.json").read_text())
    inside = int(table["2nd inside 1st interval"].sum())
    drift = "; ".join(f"{which}: FP32 {t.attrs['fp32_ms_start_end'][0]:.2f} ms in the first third of the rounds, "
                      f"{t.attrs['fp32_ms_start_end'][1]:.2f} ms in the last" + (" (drifted)" * t.attrs["drifted"])
                      for which, t in (("1st", first), ("2nd", second)))
    drift += (f"; FP32 at the run's first verify {second.attrs['fp32_ms_first_verify']:.2f} ms"
              + (", the 2nd differs by more than 15% (host changed)" * second.attrs["host_changed"]))
    overlap = int(((table["95% low 2nd"] <= table["95% high 1st"])
                   & (table["95% low 1st"] <= table["95% high 2nd"])).sum())
    return [f"## {run.name} ({meta.get('backend', '?')})", "",
            f"{inside} of {len(table)} second medians fall inside the first invocation's 95% interval; the two "
            f"intervals overlap for {overlap}. {drift}.", "",
            table[columns].to_markdown(index=False, floatfmt=".3f"), "", *_verdicts(run)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--gap", type=float, default=120.0, help="seconds between the two invocations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/verify.md"))
    args = parser.parse_args()
    machine = fingerprint(args.threads)
    lines = ["# `autoq verify`, twice: do a run's ratios reproduce?", "",
             f"CPU: {machine['cpu']}; flags: {' '.join(machine['cpu_flags'])}; {args.threads} threads, batch 1.",
             "Libraries: " + ", ".join(f"{k} {v}" for k, v in machine["libraries"].items()) + ".",
             f"Each invocation: {args.rounds} alternating rounds of every model against FP32 in {args.passes} passes "
             "20 s apart, deployment session settings (ONNX Runtime's defaults, thread spinning on; OpenVINO's "
             "LATENCY hint); the speed-up is the median of the per-round ratios, the interval its 95% bootstrap "
             f"interval resampling passes first. The second invocation starts {args.gap:.0f} s after the first "
             "ends.", ""]
    for run in args.runs:
        lines += compare(run, args.rounds, args.passes, args.gap)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
