"""One front across runtimes on all-MiniLM-L6-v2 (the demo): `autoq search --backend onnxruntime,openvino,litert`,
the trial budget split between the three, then every backend's front points, FP32 and one-line recipes timed
together in alternating rounds against ONNX Runtime's FP32 (`autoq/union.py`). Writes the union front, each
backend's best point, and every recipe's verdict against the union, with the CPU and versions.

Quality on the validation split: cosine of the sentence embedding to that backend's FP32 build.

    pip install -c constraints.txt -e ".[bench,dev,openvino,litert]"
    python benchmarks/union_front.py --trials 30 --out reports/benchmarks/union.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

import autoq
from autoq import union
from autoq.measure import fingerprint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="onnxruntime,openvino,litert")
    parser.add_argument("--trials", type=int, default=30, help="the whole budget, split between the backends")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run", type=Path, default=Path("reports/union-minilm"), help="run directory (resumes)")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/union.md"))
    parser.add_argument("--retime", action="store_true", help="re-time the finished union in --run (`autoq "
                        "verify`) instead of searching, and write the report from it")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.retime:
        autoq.verify(args.run, progress=False)
        front, recipes = pd.read_csv(args.run / "pareto.csv"), pd.read_csv(args.run / "recipes.csv")
    else:
        result = autoq.search(backend=args.backends, trials=args.trials, threads=args.threads, out=args.run,
                              progress=False)
        front, recipes = result.front, result.recipes if result.recipes is not None else pd.DataFrame()
    wall = time.perf_counter() - started
    timed = pd.read_csv(args.run / union.TIMED)
    candidates = pd.read_csv(args.run / union.CANDIDATES)
    machine = fingerprint(args.threads)

    def interval(row) -> str:
        return f"{row['speedup']:.2f}x ({row['speedup_low']:.2f}-{row['speedup_high']:.2f})"

    union_table = pd.DataFrame({
        "point": front["point"], "backend": front["backend"], "cosine": front["val_quality"].round(4),
        "ms": front["latency_ms"].round(2), "vs ORT FP32 (95%)": [interval(r) for _, r in front.iterrows()],
        "MB": (front["size_bytes"] / 1e6).round(1), "executed": front["val_executed_ok"],
        "precisions": front["summary"].str.split(": ", n=1).str[1]})
    best = []
    for name in union.searched(args.run):
        own = candidates[candidates["backend"] == name]
        for floor in (0.99, 0.995):
            good = own[own["val_quality"] >= floor]
            if good.empty:
                best.append({"backend": name, "cosine floor": floor, "fastest point": "none"})
                continue
            row = good.loc[good["latency_ms"].idxmin()]
            best.append({"backend": name, "cosine floor": floor, "fastest point": f"its point {row['from_point']}",
                         "cosine": round(row["val_quality"], 4), "ms": round(row["latency_ms"], 2),
                         "vs ORT FP32 (95%)": interval(row), "in the union front": row["timed_as"] in
                         set(front["timed_as"])})
    fp32 = timed[timed["model"].str.endswith(" FP32")]
    lines = [
        "# One front across runtimes: all-MiniLM-L6-v2 on ONNX Runtime, OpenVINO and LiteRT",
        "",
        f"CPU: {machine['cpu']}; flags: {' '.join(machine['cpu_flags'])}; {args.threads} threads, batch 1.",
        "Libraries: " + ", ".join(f"{k} {v}" for k, v in machine["libraries"].items()) + ".",
        "",
        f"`autoq search --backend {args.backends} --trials {args.trials}` ({args.trials // 3} trials per backend"
        + (f", re-timed by `autoq verify` in {wall / 60:.0f} min)." if args.retime else f", {wall / 60:.0f} min wall).")
        + " Every backend's front points, FP32 model and recipes timed together: "
        "15 alternating rounds in 3 passes against ONNX Runtime's FP32, each with its backend's deployed settings; "
        "latency is that median, the interval the 95% bootstrap of the per-round ratios.",
        "",
        "## The union front (validation split)",
        "",
        union_table.to_markdown(index=False),
        "",
        "## Each backend's FP32, timed in the same rounds",
        "",
        fp32.round(3).to_markdown(index=False),
        "",
        "## Each backend's fastest point at a cosine floor (from the same rounds)",
        "",
        pd.DataFrame(best).to_markdown(index=False),
        "",
        "## Every runtime's one-line recipes against the union front",
        "",
        recipes[["recipe", "val_quality", "val_latency_ms", "size_bytes", "verdict"]].round(4).to_markdown(
            index=False) if not recipes.empty else "(none measured)",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
