"""Quality recovery at the fast end: each model's all-int8 point with round-to-nearest weights and with learned
rounding (`int8-adaround`), built by ONNX Runtime (U8S8 QDQ regions, bias correction on as the default space's
first value), timed side by side with FP32 and with each other, and the one-time cost of the learned-rounding pass.

Models: PaddleOCR's text-direction classifier (from the pip package `rapidocr-onnxruntime`, on text lines rendered
from standard-library docstrings), a CNN trained here on scikit-learn's digits, and all-MiniLM-L6-v2 (the demo).
Quality on the validation split: top-1 agreement with FP32 (the classifiers), cosine to FP32 (MiniLM).

    pip install -c constraints.txt -e ".[bench,dev]" && pip install --no-deps rapidocr-onnxruntime==1.4.4
    python benchmarks/finetune.py --out reports/benchmarks/finetune.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from int8_regions import ocr_models, text_lines

from autoq import data as data_mod
from autoq import graph
from autoq.backends import get_backend
from autoq.calibrate import calibrate
from autoq.demo import demo_files
from autoq.evaluate import Evaluator
from autoq.measure import fingerprint, interval, ratio_rounds
from autoq.metrics import get_metric
from autoq.precision import Assignment, Precision
from autoq.recovery import rounding


def digits_cnn(work: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A 4-layer CNN trained here on digits 0-1399 (about 97% accurate on the rest), and the other 397 images."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = torch.from_numpy(images[:1400]), torch.from_numpy(digits.target[:1400].astype(np.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(12):
        for start in range(0, len(x), 64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[start:start + 64]), y[start:start + 64]).backward()
            optimizer.step()
    path = work / "digits_cnn.onnx"
    torch.onnx.export(model.eval(), (x[:1],), str(path), dynamo=False, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return path, {"image": images[1400:]}


def bench(name: str, source: Path, arrays: dict[str, np.ndarray], metric: str, threads: int, work: Path) -> dict:
    model = graph.prepare(source, work / name)
    splits = data_mod.split(data_mod.load(arrays))
    calibration = calibrate(model, splits.calibration, work / name / "cache")
    backend = get_backend("onnxruntime")
    evaluator = Evaluator(backend, model, calibration, splits, get_metric(metric, False)[1], threads)
    spec = Precision.parse("int8-adaround")
    static = [la for la in model.layers if backend.fits(la, spec)]
    started = time.perf_counter()
    rounding.prepare(model, calibration, [(la, spec) for la in static])
    fit_s = time.perf_counter() - started
    fitted = [rounding.load(calibration, la.name, spec) for la in static]
    row: dict = {"model": name, "int8 layers": len(static), "learned rounding pass s": round(fit_s, 1),
                 "layers improved": sum(f.learned_error < f.rtn_error for f in fitted if f is not None),
                 "median layer error ratio (RTN / learned)": float(np.median(
                     [f.rtn_error / max(f.learned_error, 1e-20) for f in fitted if f is not None]))}
    runs = {}
    for label, precision in (("fp32", "fp32"), ("RTN", "int8"), ("learned", "int8-adaround")):
        layers = {la.name: precision if la in static or precision == "fp32" else "fp32" for la in model.layers}
        candidate = evaluator.build(Assignment(layers, {"bias_correction": True}))
        row[f"{label} quality"] = round(evaluator.score(candidate, "validation")[0], 4)
        run = backend.runner(candidate, threads)
        feeds = {k: v[:1] for k, v in splits.validation.arrays.items()}
        runs[label] = lambda run=run, feeds=feeds: run(feeds)
    rounds = ratio_rounds(runs, "RTN", rounds=15)
    for label in ("fp32", "learned"):
        median, low, high = interval(rounds[label][1])
        row[f"{label} speed vs RTN (95%)"] = f"{median:.3f} ({low:.3f}-{high:.3f})"
    row["RTN ms"] = round(float(np.median(rounds["RTN"][0])), 3)
    evaluator.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="cls,digits,minilm")
    parser.add_argument("--work", type=Path, default=Path("reports/finetune-runs"))
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/finetune.md"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    models = {"cls": lambda: (ocr_models() / "ch_ppocr_mobile_v2.0_cls_infer.onnx", text_lines(400), "top1"),
              "digits": lambda: (*digits_cnn(args.work), "top1"),
              "minilm": lambda: (demo_files()[0], dict(np.load(demo_files()[1])), "cosine")}
    rows = []
    for name in args.models.split(","):
        source, arrays, metric = models[name]()
        rows.append(bench(name, source, arrays, metric, args.threads, args.work))
        print(rows[-1], flush=True)
    machine = fingerprint(args.threads)
    table = pd.DataFrame(rows).set_index("model").T
    lines = ["# Quality recovery at the fast end: round-to-nearest vs learned rounding (all-int8, ONNX Runtime)", "",
             f"CPU: {machine['cpu']}; flags: {' '.join(machine['cpu_flags'])}; {machine['threads']} threads, batch 1.",
             "Libraries: " + ", ".join(f"{k} {v}" for k, v in machine["libraries"].items()) + ".", "",
             "Every layer ORT runs in int8 takes static int8 (U8S8 regions, bias correction on); `RTN` rounds its",
             "weights to nearest, `learned` takes the weights `autoq.recovery.rounding` fitted for it (AdaRound on",
             "its calibration inputs, judged on a held-out fifth). Speeds are ratios timed side by side in",
             "alternating rounds against the RTN model (above 1: faster than RTN). `autoq finetune` (QAT) is not",
             "built yet: no fine-tuned column.", "", table.to_markdown(), ""]
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
