"""The torch backend on a real nn.Module (all-MiniLM-L6-v2): autoq's torch fronts (eager: fp32/bf16/int8-dyn;
compiled: fp32/bf16/PT2E int8) vs torch.ao `quantize_dynamic` on every nn.Linear and PT2E int8 on every
nn.Linear, timed side by side in this run; and the same call site searching ONNX Runtime, whose layers carry
the same module names.

    python benchmarks/torch_backend.py --trials 30 --compiled-trials 12 --out reports/benchmarks/torch_backend.md
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import autoq
from autoq import data as data_mod
from autoq.backends.torch import compile_assignment
from autoq.demo import demo_module
from autoq.measure import fingerprint, time_runner
from autoq.metrics import cosine
from autoq.precision import Assignment


def _runner(module: torch.nn.Module, threads: int):
    def run(feeds: dict) -> np.ndarray:
        torch.set_num_threads(threads)
        with torch.no_grad():
            return module(*(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))).float().numpy()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--compiled-trials", type=int, default=12, help="each compiled candidate takes ~a minute")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="reports/bench-torch")
    parser.add_argument("--out", default="reports/benchmarks/torch_backend.md")
    args = parser.parse_args()
    module, example, data = demo_module()
    runs, walls = {}, {}
    plan = {"torch": ("torch", "torch-cpu", args.trials), "onnxruntime": ("onnxruntime", None, args.trials),
            "torch compiled": ("torch", "torch-cpu-compiled", args.compiled_trials)}
    for label, (backend, space, trials) in plan.items():  # one call site, every backend
        started = time.perf_counter()
        runs[label] = autoq.search(module, example, data, backend=backend, space=space, trials=trials,
                                   threads=args.threads, out=Path(args.work) / label.replace(" ", "-"),
                                   progress=False)
        walls[label] = time.perf_counter() - started
    names = {b: set(json.loads(r.trials["assignment"].iloc[0])["layers"]) for b, r in runs.items()}

    splits = data_mod.split(data_mod.load(data, None), seed=0)
    validation = splits.validation.arrays
    fp32 = _runner(module, args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dynamic = torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)
    samples = splits.calibration.arrays
    linear = {layer: "int8" for layer in json.loads(runs["torch"].trials["assignment"].iloc[0])["layers"]}
    candidates = {"torch FP32": module, "quantize_dynamic (all nn.Linear int8)": dynamic,
                  "PT2E int8 on all nn.Linear, compiled": compile_assignment(module, Assignment(linear), samples)[0]}
    for row in runs["torch"].front.itertuples():
        assignment = Assignment.from_dict(json.loads(row.assignment))
        candidates[f"autoq torch point {row.point}: {row.summary}"] = autoq.apply(module, assignment)
    for row in runs["torch compiled"].front.itertuples():
        assignment = Assignment.from_dict(json.loads(row.assignment))
        candidates[f"autoq torch compiled point {row.point}: {row.summary}"] = compile_assignment(
            module, assignment, samples)[0]
    reference = np.concatenate([fp32({k: v[i:i + 8] for k, v in validation.items()})
                                for i in range(0, len(validation["input_ids"]), 8)])
    feeds = {k: v[:1] for k, v in splits.search.arrays.items()}
    fp32_ms = time_runner(lambda: fp32(feeds), min_runs=30, max_runs=120).median_ms
    rows = []
    for label, candidate in candidates.items():
        run = _runner(candidate, args.threads)
        outputs = np.concatenate([run({k: v[i:i + 8] for k, v in validation.items()})
                                  for i in range(0, len(validation["input_ids"]), 8)])
        timing = time_runner(lambda run=run: run(feeds), lambda: fp32(feeds), min_runs=20, max_runs=80)
        rows.append({"model": label, "quality (cosine, validation)": cosine([reference], [outputs]),
                     "latency_ms": fp32_ms * timing.median_ms / timing.ref_median_ms,
                     "latency IQR ms": timing.spread_ms, "vs FP32": timing.ref_median_ms / timing.median_ms,
                     "load": timing.load})
    ort_front = runs["onnxruntime"].front[["point", "summary", "val_quality", "val_latency_ms", "size_bytes"]]
    Path(args.out).write_text(
        "# Torch backend on all-MiniLM-L6-v2 (an nn.Module) vs quantize_dynamic on every nn.Linear\n\n"
        f"autoq search from one call site: {args.trials} trials on torch eager (wall {walls['torch']:.0f} s) and "
        f"on ONNX Runtime ({walls['onnxruntime']:.0f} s), {args.compiled_trials} on torch compiled "
        f"({walls['torch compiled']:.0f} s). Batch 1, seq 128, {args.threads} "
        "threads. Each row below re-timed here against the FP32 module in alternating rounds; latency = FP32 "
        "median x the ratio; quality = cosine to the FP32 embeddings on the validation split.\n\n"
        f"{pd.DataFrame(rows).to_markdown(index=False, floatfmt='.4f')}\n\n"
        f"Layer names: both runs name the same {len(names['torch'])} layers by module FQN: "
        f"{names['torch'] == names['onnxruntime']} (e.g. {sorted(names['torch'])[0]}).\n\n"
        f"## The ONNX Runtime front from the same call\n\n{ort_front.to_markdown(index=False, floatfmt='.4f')}\n\n"
        f"## Machine\n\n```\n{json.dumps(fingerprint(args.threads), indent=2)}\n```\n")
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
