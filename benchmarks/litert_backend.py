"""LiteRT (XNNPACK) as autoq's fourth backend: `autoq.search(module, example_inputs, data, backend="litert")` on
all-MiniLM-L6-v2 (the demo's torch module) and a CNN trained here on scikit-learn's digits, against AI Edge
Quantizer's one-line recipes (static_wi8_ai8, dynamic_wi8_afp32, weight_only_wi8_afp32), which every run measures
and times beside its front in alternating rounds (the verdicts are the run's own).

Quality on the validation split: cosine to FP32 (MiniLM), top-1 agreement with FP32 (the CNN).

    pip install -c constraints.txt -e ".[bench,dev,litert]"
    python benchmarks/litert_backend.py --out reports/benchmarks/litert.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import autoq
from autoq.demo import demo_module
from autoq.measure import fingerprint


def digits_cnn() -> tuple[torch.nn.Module, tuple, dict[str, np.ndarray]]:
    """A CNN (two convs, two linears) trained on digits 0-1399; the other 397 images are the run's data."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))
    x, y = torch.from_numpy(images[:1400]), torch.from_numpy(digits.target[:1400].astype(np.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(10):
        for start in range(0, len(x), 64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[start:start + 64]), y[start:start + 64]).backward()
            optimizer.step()
    return model.eval(), (x[:1],), {"input": images[1400:]}


def run(name: str, module: torch.nn.Module, example: tuple, data: dict, metric: str, trials: int, threads: int,
        work: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    out = work / name
    result = autoq.search(module, example, data, backend="litert", metric=metric, trials=trials, threads=threads,
                          out=out, progress=False)
    front = result.front.sort_values("val_latency_ms")
    fp32 = json.loads((out / "run.json").read_text()).get("fp32_latency_ms")
    table = pd.DataFrame({
        "point": front["point"], "quality": front["val_quality"].round(4),
        "latency ms": front["val_latency_ms"].round(3), "size MB": (front["size_bytes"] / 1e6).round(2),
        "executed as assigned": front["val_executed_ok"], "precisions": front["summary"]})
    recipes = pd.read_csv(out / "recipes.csv", keep_default_na=False)
    kept = [c for c in ("recipe", "val_quality", "val_latency_ms", "size_bytes", "verdict") if c in recipes]
    recipes = recipes[kept].rename(columns={"val_quality": "quality", "val_latency_ms": "latency ms",
                                            "size_bytes": "size"})
    print(name, "fp32 ms", fp32, "\n", table.to_string(index=False), "\n", recipes.to_string(index=False), flush=True)
    return table, recipes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--work", type=Path, default=Path("reports/litert-runs"))
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/litert.md"))
    args = parser.parse_args()
    module, example, arrays = demo_module()
    cnn, cnn_example, cnn_data = digits_cnn()
    runs = {"MiniLM (cosine to FP32)": run("minilm", module, example, arrays, "cosine", args.trials, args.threads,
                                           args.work),
            "digits CNN (top-1 agreement with FP32)": run("digits", cnn, cnn_example, cnn_data, "top1", args.trials,
                                                          args.threads, args.work)}
    machine = fingerprint(args.threads)
    lines = ["# LiteRT (XNNPACK): autoq's per-layer front against AI Edge Quantizer's recipes", "",
             f"CPU: {machine['cpu']}; flags: {' '.join(machine['cpu_flags'])}; {machine['threads']} threads, batch 1.",
             "Libraries: " + ", ".join(f"{k} {v}" for k, v in machine["libraries"].items()) + ".", "",
             f"`autoq.search(module, example_inputs, data, backend='litert', trials={args.trials})` with the",
             "`litert-cpu` space; the recipes are built from the run's calibration samples and timed beside the",
             "front in alternating rounds by the run itself (verdicts as on the other backends).", ""]
    for title, (front, recipes) in runs.items():
        lines += [f"## {title}", "", front.to_markdown(index=False), "", recipes.to_markdown(index=False), ""]
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
