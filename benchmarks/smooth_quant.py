"""SmoothQuant per layer on ONNX Runtime's dynamic int8: what each group of MiniLM's MatMuls gains in cosine and
costs in latency when its input is smoothed (`int8-dyn-pc-sq0.7`), against ORT's own `quantize_dynamic` as a user
runs it (its defaults), all timed side by side in alternating rounds in one process.

Model: all-MiniLM-L6-v2 (the demo), batch 1, quality on the validation split (cosine to FP32). Every row but the
recipe: all 36 MatMuls int8-dyn-pc, the named groups smoothed; the executed check confirms each layer ran as asked.

    pip install -c constraints.txt -e ".[demo,dev]"
    python benchmarks/smooth_quant.py --out reports/benchmarks/smooth_quant.md
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from int8_regions import ort_session

from autoq import data as data_mod
from autoq import graph
from autoq.backends import get_backend
from autoq.calibrate import calibrate
from autoq.demo import demo_files
from autoq.evaluate import Evaluator
from autoq.measure import fingerprint, interval, ratio_rounds
from autoq.metrics import get_metric
from autoq.precision import Assignment
from autoq.quiet import captured, hush

GROUPS = {"q/k/v": r"self/(query|key|value)", "attention out": r"attention/output/dense",
          "FFN up": r"intermediate/dense", "FFN down": r"layer\.\d+/output/dense"}
ROWS = {"none": [], "q/k/v": ["q/k/v"], "attention out": ["attention out"], "FFN up": ["FFN up"],
        "FFN down": ["FFN down"], "q/k/v + FFN up": ["q/k/v", "FFN up"], "all": list(GROUPS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/smooth_quant.md"))
    args = parser.parse_args()
    hush()
    work = Path(tempfile.mkdtemp(prefix="autoq-sq-"))
    source, data = demo_files()
    model = graph.prepare(source, work)
    splits = data_mod.split(data_mod.load(dict(np.load(data))))
    calibration = calibrate(model, splits.calibration, work / "cache")
    backend = get_backend("onnxruntime")
    evaluator = Evaluator(backend, model, calibration, splits, get_metric("cosine", False)[1], args.threads)
    matmuls = [la.name for la in model.layers if la.op_type == "MatMul"]
    feeds = evaluator.latency_feeds
    rows, runs = [], {}
    recipe = work / "quantize_dynamic.onnx"
    from onnxruntime.quantization import quantize_dynamic

    with captured():
        quantize_dynamic(str(source), str(recipe))
    session = ort_session(recipe, args.threads)
    want = evaluator.reference("validation")
    got = evaluator.outputs(session, splits.validation)
    rows.append({"row": "ORT quantize_dynamic (defaults)", "smoothed layers": 0,
                 "cosine": float(evaluator.metric(want, got, splits.validation.labels)), "executed as asked": "-"})
    runs["ORT quantize_dynamic (defaults)"] = lambda: session(feeds)
    for label, groups in ROWS.items():
        layers = {name: "int8-dyn-pc-sq0.7" if any(re.search(GROUPS[g], name) for g in groups) else "int8-dyn-pc"
                  for name in matmuls}
        layers |= {la.name: "fp32" for la in model.layers if la.name not in layers}
        candidate = evaluator.build(Assignment(layers), work / re.sub(r"\W+", "-", label))
        run = ort_session(candidate.path, args.threads)
        rows.append({"row": f"int8-dyn-pc, smoothed: {label}",
                     "smoothed layers": sum(p.endswith("sq0.7") for p in layers.values()),
                     "cosine": evaluator.score(candidate, "validation")[0],
                     "executed as asked": backend.executed(candidate) == backend.expected(Assignment(layers))})
        runs[rows[-1]["row"]] = lambda run=run: run(feeds)
    rounds = ratio_rounds(runs, "ORT quantize_dynamic (defaults)", rounds=args.rounds)
    for row in rows:
        median, low, high = interval(rounds[row["row"]][1])
        row["ms"] = round(float(np.median(rounds[row["row"]][0])), 3)
        row["speed vs quantize_dynamic (95%)"] = f"{median:.3f} ({low:.3f}-{high:.3f})"
    evaluator.close()
    table = pd.DataFrame(rows).round({"cosine": 5})
    machine = fingerprint(args.threads)
    lines = ["# SmoothQuant per layer (`int8-dyn-pc-sq0.7`) on MiniLM against `quantize_dynamic`", "",
             f"CPU: {machine['cpu']}; flags: {' '.join(machine['cpu_flags'])}; {args.threads} threads, batch 1.",
             "Libraries: " + ", ".join(f"{k} {v}" for k, v in machine["libraries"].items()) + ".", "",
             "Speeds are ratios to `quantize_dynamic` timed in alternating rounds (above 1: faster), every session "
             "with thread spinning off (as the search times: spinning sessions slow the next one).", "",
             table.to_markdown(index=False), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
