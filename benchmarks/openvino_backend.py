"""autoq's OpenVINO front vs OpenVINO's own uniform answers on the demo model (all-MiniLM-L6-v2, batch 1):
the FP32 model, NNCF's `quantize` (uniform int8, calibrated on the same samples, compiled with the f32 hint and,
where native, the bf16 hint), and all-bf16 where the CPU has it; each front point compiled with its own float.
Everything is re-timed here, in one process, each against the FP32 model in alternating rounds;
quality is the cosine to the FP32 embeddings on the validation split.

    python benchmarks/openvino_backend.py --trials 40 --out reports/benchmarks/openvino.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nncf
import numpy as np
import openvino as ov
import pandas as pd

import autoq
from autoq import data as data_mod
from autoq.demo import demo_files
from autoq.measure import fingerprint, time_runner
from autoq.metrics import cosine


def _compile(model: ov.Model | Path, threads: int, precision: str = "f32"):
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
              "PERFORMANCE_HINT": "LATENCY"}
    compiled = ov.Core().compile_model(model if isinstance(model, ov.Model) else str(model), "CPU", config)
    request = compiled.create_infer_request()
    return lambda feeds: [request.infer(feeds)[compiled.output(0)].copy()]


def _outputs(run, dataset) -> list[np.ndarray]:
    return [np.concatenate([run(feeds)[0] for feeds in dataset.batches(1)])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="reports/bench-openvino")
    parser.add_argument("--out", default="reports/benchmarks/openvino.md")
    args = parser.parse_args()
    model_path, data_path = demo_files()
    started = time.perf_counter()
    result = autoq.search(model_path, data_path, space="openvino-cpu", backend="openvino", trials=args.trials,
                          threads=args.threads, out=args.work, progress=False)
    search_s = time.perf_counter() - started

    splits = data_mod.split(data_mod.load(data_path, None), seed=0)
    fp32_model = ov.convert_model(str(model_path))
    samples = [dict(f) for f in splits.calibration.batches(1)]
    nncf_model = nncf.quantize(fp32_model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                               subset_size=len(samples))
    fp32 = _compile(fp32_model, args.threads)
    floats = ["f32", "bf16"] if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else ["f32"]
    candidates = {"OpenVINO FP32": fp32}
    for floating in floats:  # each as a user could deploy it: the f32 hint, and bf16 where native
        candidates[f"NNCF quantize, transformer preset ({floating})"] = _compile(nncf_model, args.threads, floating)
    if "bf16" in floats:
        candidates["OpenVINO bf16 (all float layers)"] = _compile(fp32_model, args.threads, "bf16")
    for row in result.front.itertuples():
        floating = json.loads(row.assignment)["options"].get("inference_precision", "f32")
        candidates[f"autoq point {row.point}: {row.summary} ({floating})"] = _compile(Path(args.work) / row.model,
                                                                                    args.threads, floating)
    reference = _outputs(fp32, splits.validation)
    feeds = {k: v[:1] for k, v in splits.search.arrays.items()}
    fp32_ms = time_runner(lambda: fp32(feeds), min_runs=30, max_runs=120).median_ms
    rows = []
    for label, run in candidates.items():
        timing = time_runner(lambda run=run: run(feeds), lambda: fp32(feeds), min_runs=20, max_runs=80)
        quality = cosine(reference, _outputs(run, splits.validation))
        rows.append({"model": label, "quality (cosine, validation)": quality,
                     "latency_ms": fp32_ms * timing.median_ms / timing.ref_median_ms,
                     "latency IQR ms": timing.spread_ms, "vs FP32": timing.ref_median_ms / timing.median_ms,
                     "load": timing.load})
    table = pd.DataFrame(rows)
    Path(args.out).write_text(
        "# autoq's OpenVINO front vs OpenVINO's uniform baselines on all-MiniLM-L6-v2\n\n"
        f"autoq search: {args.trials} trials, space openvino-cpu, {search_s:.0f} s wall, "
        f"{len(result.front)} front points. Batch 1, seq 128, {args.threads} threads. Each row re-timed here "
        "against the FP32 model in alternating rounds; latency = FP32 median x the ratio.\n\n"
        f"{table.to_markdown(index=False, floatfmt='.4f')}\n\n"
        "## The run's own verdicts (recipes.csv: each recipe timed side by side with the front's points)\n\n"
        f"{result.recipes[['recipe', 'val_quality', 'size_bytes', 'verdict']].to_markdown(index=False)}\n\n"
        f"## Machine\n\n```\n{json.dumps(fingerprint(args.threads), indent=2)}\n```\n")
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
