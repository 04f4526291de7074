"""Quality recovery at the fast end: each model's all-int8 point with round-to-nearest weights and with learned
rounding (`int8-adaround`), built by ONNX Runtime (U8S8 QDQ regions, bias correction on as the default space's
first value), timed side by side with FP32 and with each other, and the one-time cost of the learned-rounding pass;
then a search's fastest point before and after `autoq finetune`.

Models: PaddleOCR's text-direction classifier and text detector (from the pip package `rapidocr-onnxruntime`, on
text lines and pages rendered from standard-library docstrings), a CNN trained here on scikit-learn's digits, and
all-MiniLM-L6-v2 (the demo).
Quality on the validation split: top-1 agreement with FP32 (the classifiers), cosine to FP32 (the detector's
probability map, MiniLM).

    pip install -c constraints.txt -e ".[bench,dev]" && pip install --no-deps rapidocr-onnxruntime==1.4.4
    python benchmarks/finetune.py --out reports/benchmarks/finetune.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from int8_regions import ocr_models, text_lines, text_pages

import autoq
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


def digits_mlp(work: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """An MLP (64 -> 128 -> 64 -> 10) trained here on digits 0-1399, its input (N, 1, 64) so that its Linears
    export as MatMul (ORT's 4-bit MatMulNBits), and the other 397 images."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32).reshape(-1, 1, 64)
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = torch.from_numpy(images[:1400]), torch.from_numpy(digits.target[:1400].astype(np.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        for start in range(0, len(x), 64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[start:start + 64])[:, 0], y[start:start + 64]).backward()
            optimizer.step()
    path = work / "digits_mlp.onnx"
    torch.onnx.export(model.eval(), (x[:1],), str(path), dynamo=False, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return path, {"image": images[1400:]}


def four_bit(threads: int, work: Path) -> dict:
    """The digits MLP with every Linear in 4-bit weights (MatMulNBits, blocks of 32): searched, then fine-tuned."""
    source, arrays = digits_mlp(work)
    space = {"default": ["fp32"], "rules": [{"op_type": ["MatMul"], "precisions": ["fp32", "w4g32"]}],
             "sensitivity": "none"}
    data = work / "digits-mlp.npz"
    np.savez(data, **arrays)
    result = autoq.search(source, data, metric="cosine", space=space, trials=2, threads=threads,
                          out=work / "digits-mlp-search", progress=False, recipes="none")
    point = int(result.front.loc[result.front["summary"].str.contains("w4g32"), "point"].iloc[0])
    started = time.perf_counter()
    tuned = autoq.finetune(work / "digits-mlp-search", point, data, epochs=20, progress=False).iloc[-1]
    return {"model": "digits MLP, every Linear w4g32 (cosine to FP32)", "its quality": tuned["quality_before"],
            "fine-tuned quality": tuned["val_quality"], "speed vs its point (95%)": tuned["speed_vs_before"],
            "executed as assigned": bool(tuned["val_executed_ok"]),
            "fine-tune s": round(time.perf_counter() - started, 1)}


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
    return row | finetuned(name, source, arrays, metric, threads, work)


def finetuned(name: str, source: Path, arrays: dict[str, np.ndarray], metric: str, threads: int, work: Path) -> dict:
    """`autoq search` (ORT, its default space, 8 trials), then `autoq finetune` of its front point with the most int8
    layers (the fastest of those): the fast end, where the quality is lost."""
    data = work / f"{name}.npz"
    np.savez(data, **arrays)
    run = work / f"{name}-search"
    result = autoq.search(source, data, metric=metric, trials=8, threads=threads, out=run, progress=False,
                          recipes="none")
    front = result.front.assign(int8=[sum(p.startswith("int8") for p in json.loads(a)["layers"].values())
                                      for a in result.front["assignment"]])
    point = int(front.sort_values(["int8", "val_latency_ms"], ascending=[False, True])["point"].iloc[0])
    row = {"most-int8 point (search)": f"{point}: {front.loc[front['point'] == point, 'summary'].iloc[0]}"}
    started = time.perf_counter()
    try:
        tuned = autoq.finetune(run, point, data, epochs=20, progress=False).iloc[-1]
    except autoq.AutoqError as exc:
        return row | {"fine-tuned": f"not run: {exc}"}
    return row | {"its quality": round(float(tuned["quality_before"]), 4),
                  "fine-tuned quality": round(float(tuned["val_quality"]), 4),
                  "fine-tuned speed vs its point (95%)": tuned["speed_vs_before"],
                  "fine-tuned executed as assigned": bool(tuned["val_executed_ok"]),
                  "fine-tune s": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="cls,det,digits,minilm")
    parser.add_argument("--work", type=Path, default=Path("reports/finetune-runs"))
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/finetune.md"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    models = {"cls": lambda: (ocr_models() / "ch_ppocr_mobile_v2.0_cls_infer.onnx", text_lines(400), "top1"),
              "det": lambda: (ocr_models() / "ch_PP-OCRv4_det_infer.onnx", text_pages(64, 256), "cosine"),
              "digits": lambda: (*digits_cnn(args.work), "top1"),
              "minilm": lambda: (demo_files()[0], dict(np.load(demo_files()[1])), "cosine")}
    rows = []
    for name in args.models.split(","):
        source, arrays, metric = models[name]()
        rows.append(bench(name, source, arrays, metric, args.threads, args.work))
        print(rows[-1], flush=True)
    weights4 = pd.DataFrame([four_bit(args.threads, args.work)])
    print(weights4, flush=True)
    write(rows, weights4, args.threads, args.out)


def write(rows: list[dict], weights4: pd.DataFrame, threads: int, out: Path) -> None:
    machine = fingerprint(threads)
    table = pd.DataFrame(rows).set_index("model").T
    lines = ["# Quality recovery at the fast end: round-to-nearest vs learned rounding (all-int8, ONNX Runtime)", "",
             f"CPU: {machine['cpu']}; flags: {' '.join(machine['cpu_flags'])}; {machine['threads']} threads, batch 1.",
             "Libraries: " + ", ".join(f"{k} {v}" for k, v in machine["libraries"].items()) + ".", "",
             "Every layer ORT runs in int8 takes static int8 (U8S8 regions, bias correction on); `RTN` rounds its",
             "weights to nearest, `learned` takes the weights `autoq.recovery.rounding` fitted for it (AdaRound on",
             "its calibration inputs, judged on a held-out fifth). Speeds are ratios timed side by side in",
             "alternating rounds against the RTN model (above 1: faster than RTN). Then `autoq search` (8 trials,",
             "the default space) and `autoq finetune` of its front point with the most int8 layers (20 epochs at",
             "most), on the same data.",
             "", table.to_markdown(), "", "## 4-bit weights: `autoq finetune` of MatMulNBits blocks", "",
             weights4.to_markdown(index=False, floatfmt=".4f"), ""]
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
