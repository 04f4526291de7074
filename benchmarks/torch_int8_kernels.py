"""Which int8 kernels PyTorch really has on this CPU, on every nn.Linear of all-MiniLM-L6-v2 (an nn.Module):
torch.ao `quantize_dynamic` (per tensor, per channel), torchao's `Int8DynamicActivationInt8WeightConfig` (eager and
compiled), and the PT2E configs autoq builds compiled (dynamic `int8-dyn-pc`, static `int8`), each timed against
its own FP32 (eager or compiled) in alternating rounds. This is why the torch backend keeps eager dynamic int8 on
torch.ao and builds compiled int8 through PT2E.

    python benchmarks/torch_int8_kernels.py --out reports/benchmarks/torch_int8_kernels.md
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from autoq import data as data_mod
from autoq.backends.torch import apply, compile_assignment
from autoq.demo import demo_module
from autoq.measure import fingerprint, time_runner
from autoq.metrics import cosine
from autoq.precision import Assignment

NAMES = ("input_ids", "attention_mask")


def _call(model: Callable, threads: int) -> Callable[[dict], np.ndarray]:
    def run(feeds: dict) -> np.ndarray:
        torch.set_num_threads(threads)
        with torch.no_grad():
            return model(*(torch.from_numpy(feeds[k]) for k in NAMES)).float().numpy()

    return run


def _torchao(module: torch.nn.Module, compiled: bool) -> Callable:
    import copy

    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantized = copy.deepcopy(module)
    quantize_(quantized, Int8DynamicActivationInt8WeightConfig())
    return torch.compile(quantized) if compiled else quantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="reports/benchmarks/torch_int8_kernels.md")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    module, _, data = demo_module()
    module.eval()
    splits = data_mod.split(data_mod.load(data, None), seed=0)
    samples = splits.calibration.arrays
    linear = [name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)]

    def everywhere(spec: str, compiled: bool) -> Assignment:
        return Assignment({name: spec for name in linear}, {"compile": compiled})

    def pt2e(spec: str) -> Callable:
        return compile_assignment(module, everywhere(spec, True), samples, list(NAMES))[0]

    eager = {"FP32": module,
             "torch.ao quantize_dynamic, per-tensor weights (autoq int8-dyn)": apply(
                 module, everywhere("int8-dyn", False)),
             "torch.ao quantize_dynamic, per-channel weights (autoq int8-dyn-pc)": apply(
                 module, everywhere("int8-dyn-pc", False)),
             "torchao Int8DynamicActivationInt8WeightConfig": _torchao(module, False)}
    compiled = {"FP32": pt2e("fp32"),
                "PT2E dynamic, per-channel weights (autoq int8-dyn-pc)": pt2e("int8-dyn-pc"),
                "PT2E static (autoq int8)": pt2e("int8"),
                "torchao Int8DynamicActivationInt8WeightConfig": _torchao(module, True)}
    validation = splits.validation.arrays
    feeds = {k: v[:1] for k, v in splits.search.arrays.items()}
    reference = _call(module, args.threads)
    expected = np.concatenate([reference({k: v[i:i + 8] for k, v in validation.items()})
                               for i in range(0, len(validation[NAMES[0]]), 8)])
    rows = []
    for mode, models in (("eager", eager), ("compiled", compiled)):
        fp32 = _call(models["FP32"], args.threads)
        for label, model in models.items():
            run = _call(model, args.threads)
            outputs = np.concatenate([run({k: v[i:i + 8] for k, v in validation.items()})
                                      for i in range(0, len(validation[NAMES[0]]), 8)])
            timing = time_runner(lambda run=run: run(feeds), lambda fp32=fp32: fp32(feeds), min_runs=30, max_runs=90)
            rows.append({"mode": mode, "every nn.Linear in": label, "ms": timing.median_ms,
                         "vs FP32 of its mode": timing.speedup,
                         "+-": timing.spread_ms / timing.median_ms * timing.speedup,
                         "cosine": cosine([expected], [outputs]), "load": timing.load})
    machine = fingerprint(args.threads)
    Path(args.out).write_text(
        "# PyTorch int8 kernels on every nn.Linear of all-MiniLM-L6-v2\n\n"
        f"CPU: {machine['cpu']}; flags: {' '.join(machine['cpu_flags'])}; {args.threads} threads; batch 1, "
        "sequence 128. Each row is timed against the FP32 model of its mode (eager or compiled with inductor) in "
        "alternating rounds (ratio = FP32 ms / its ms, +- the spread of that ratio); cosine to the eager FP32 "
        "embeddings on the validation split.\n\n"
        f"{pd.DataFrame(rows).to_markdown(index=False, floatfmt='.3f')}\n\n"
        f"## Machine\n\n```\n{json.dumps(machine, indent=2)}\n```\n")
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
