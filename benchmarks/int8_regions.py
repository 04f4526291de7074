"""autoq's int8 (regions) and its ONNX Runtime front against the runtimes' one-line recipes, on real models.

Models: the text-direction classifier and the text detector that ship in the pip package `rapidocr-onnxruntime`
(PaddleOCR MobileNetV3-style CNNs: depthwise convs, HardSwish spelled as Add/Clip/Div/Mul, SE blocks, residual
Adds, Resize/Concat/ConvTranspose in the detector) on text rendered with Pillow from standard-library docstrings,
and all-MiniLM-L6-v2 (the demo). Batch 1, 2 threads. Every model is timed against its runtime's FP32 model in
alternating rounds by autoq's one harness (`autoq.measure.time_runner`); quality is measured on the validation
split (top-1 agreement with FP32 for the classifier, cosine to FP32 for the others).

    pip install -c constraints.txt -e ".[bench]" && pip install --no-deps rapidocr-onnxruntime==1.4.4  # its .onnx files
    python benchmarks/int8_regions.py --trials 16 --out reports/benchmarks/int8_regions.md
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd

import autoq
from autoq import data as data_mod
from autoq.demo import demo_files, sentences
from autoq.measure import fingerprint, time_runner
from autoq.metrics import get_metric


def ocr_models() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")  # not imported: it needs OpenCV, we need its files
    if spec is None:
        raise SystemExit("pip install --no-deps rapidocr-onnxruntime==1.4.4 (and pillow) first")
    return Path(spec.submodule_search_locations[0]) / "models"


def _render(size: tuple[int, int], lines: list[str], rng: np.random.Generator, flip: bool) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(190, 256, 3)))
    draw, y = ImageDraw.Draw(image), int(rng.integers(0, 12))
    for text in lines:
        height = int(rng.integers(14, 28))
        draw.text((int(rng.integers(0, 20)), y), text, fill=tuple(int(v) for v in rng.integers(0, 90, 3)),
                  font=ImageFont.load_default(size=height))
        y += height + int(rng.integers(6, 24))
    return np.asarray(image.rotate(180) if flip else image, np.float32) / 255.0


def text_lines(n: int = 160, seed: int = 0) -> dict[str, np.ndarray]:
    """Text-line crops 48x192, every second one upside down, normalised as PaddleOCR's classifier expects."""
    rng = np.random.default_rng(seed)
    images = [(_render((192, 48), [t], rng, i % 2 == 1) - 0.5) / 0.5 for i, t in enumerate(sentences(n, seed))]
    return {"x": np.stack(images).transpose(0, 3, 1, 2).copy()}


def text_pages(n: int = 64, size: int = 320, seed: int = 0) -> dict[str, np.ndarray]:
    """Pages of 4-8 text lines, normalised with ImageNet statistics as PaddleOCR's detector expects."""
    rng = np.random.default_rng(seed)
    texts = sentences(n * 8, seed)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    pages = [(_render((size, size), [t[:36] for t in texts[i * 8:i * 8 + int(rng.integers(4, 9))]], rng, False)
              - mean) / std for i in range(n)]
    return {"x": np.stack(pages).transpose(0, 3, 1, 2).astype(np.float32)}


def ort_session(path: Path, threads: int):
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the search times
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)


def _recipes(source: Path, calibration: dict[str, np.ndarray], out: Path) -> dict[str, Path]:
    """ORT's one-line recipes on the user's original file."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    class Reader:
        def __init__(self) -> None:
            self.it = iter([{k: v[i:i + 1] for k, v in calibration.items()} for i in range(len(next(iter(
                calibration.values()))))])

        def get_next(self):
            return next(self.it, None)

    logging.getLogger().setLevel(logging.ERROR)
    built = {}
    for label, op_types in (("ORT quantize_static U8S8, all ops", None),
                            ("ORT quantize_static U8S8, weight ops", ["Conv", "MatMul", "Gemm"])):
        path = out / f"{len(built)}.onnx"
        quantize_static(str(source), str(path), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        built[label] = path
    path = out / "dynamic.onnx"
    quantize_dynamic(str(source), str(path), op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)
    built["ORT quantize_dynamic (MatMul/Gemm)"] = path
    return built


def _openvino(source: Path, calibration: dict[str, np.ndarray], threads: int, front: pd.DataFrame, run: Path,
              transformer: bool):
    """OpenVINO f32 (the reference), bf16 where native, nncf.quantize (its transformer preset where autoq uses it
    too), and the points of autoq's OpenVINO front."""
    import nncf
    import openvino as ov

    core = ov.Core()

    def compiled(model, precision: str = "f32"):
        request = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision, "NUM_STREAMS": 1,
                                                    "INFERENCE_NUM_THREADS": threads,
                                                    "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
        return lambda feeds: [np.array(request.infer(feeds)[0])]

    model = ov.convert_model(str(source))
    runs = {"OpenVINO f32": compiled(model)}
    if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        runs["OpenVINO bf16 (native)"] = compiled(model, "bf16")
    samples = [{k: v[i:i + 1] for k, v in calibration.items()} for i in range(len(next(iter(calibration.values()))))]
    logging.getLogger("nncf").setLevel(logging.ERROR)
    runs["nncf.quantize (OpenVINO int8)"] = compiled(nncf.quantize(model, nncf.Dataset(samples),
                                                                   subset_size=len(samples)))
    if transformer:
        runs["nncf.quantize, transformer preset"] = compiled(nncf.quantize(
            model, nncf.Dataset(samples), subset_size=len(samples), model_type=nncf.ModelType.TRANSFORMER))
    for _, row in front.iterrows():
        precision = json.loads(row["assignment"])["options"].get("inference_precision", "f32")
        runs[f"autoq OpenVINO point {int(row['point'])}: {row['summary']} ({precision})"] = compiled(
            str(run / row["model"]), precision)
    return runs


def bench(name: str, source: Path, data: dict[str, np.ndarray], metric: str, trials: int, threads: int,
          work: Path, transformer: bool = False) -> pd.DataFrame:
    dataset = data_mod.load(data)
    splits = data_mod.split(dataset, seed=0)
    started = time.perf_counter()
    result = autoq.search(source, data, metric=metric, trials=trials, threads=threads, out=work / name,
                          progress=False)
    wall = time.perf_counter() - started
    ov_result = autoq.search(source, data, metric=metric, trials=trials, threads=threads, backend="openvino",
                             out=work / f"{name}-openvino", progress=False)
    ov_wall = time.perf_counter() - started - wall
    ort_runs = {"ORT FP32": ort_session(source, threads)}
    ort_runs |= {label: ort_session(path, threads) for label, path in
                 _recipes(source, splits.calibration.arrays, work / name).items()}
    front = result.front.dropna(subset=["model"]).reset_index(drop=True)
    for _, row in front.iterrows():
        ort_runs[f"autoq ORT point {int(row['point'])}: {row['summary']}"] = ort_session(work / name / row["model"],
                                                                                      threads)
    ov_front = ov_result.front.dropna(subset=["model"]).reset_index(drop=True)
    ov_runs = _openvino(source, splits.calibration.arrays, threads, ov_front, work / f"{name}-openvino",
                        transformer)
    score = get_metric(metric, False)[1]
    validation, feeds = splits.validation, {k: v[:1] for k, v in splits.validation.arrays.items()}
    rows = []
    for runs, reference in ((ort_runs, "ORT FP32"), (ov_runs, "OpenVINO f32")):
        outputs = {k: [np.concatenate([run(f)[0] for f in validation.batches(1)])] for k, run in runs.items()}
        ref = runs[reference]
        for label, run in runs.items():
            timing = time_runner(lambda run=run: run(feeds), lambda ref=ref: ref(feeds), min_runs=30, max_runs=90)
            rows.append({"model": name, "what": label, "quality": float(score(outputs[reference], outputs[label],
                                                                               None)),
                         "ms": timing.median_ms, f"speedup vs {reference.split()[0]} FP32": timing.speedup,
                         "load": timing.load})
    print(f"{name}: ORT search {wall:.0f} s, {len(front)} front points; OpenVINO {ov_wall:.0f} s, {len(ov_front)}")
    frame = _verdicts(pd.DataFrame(rows))
    frame.attrs["glue"] = _kept_float(work / name)
    frame.attrs["wall"] = f"{frame['model'].iloc[0]} ORT {wall:.0f} s, OpenVINO {ov_wall:.0f} s"
    return frame


def _verdicts(frame: pd.DataFrame) -> pd.DataFrame:
    """Per recipe: the fastest autoq point of the same runtime with at least its quality, and how much faster."""
    verdicts = []
    for _, row in frame.iterrows():
        speed = next(c for c in frame.columns if c.startswith("speedup") and pd.notna(row[c]))
        ours = frame[frame["what"].str.startswith("autoq") & frame[speed].notna()
                     & (frame["quality"] >= row["quality"] - 1e-4)]
        if row["what"].startswith("autoq") or ours.empty:
            verdicts.append("" if row["what"].startswith("autoq") else "not dominated")
            continue
        best = ours.loc[ours[speed].idxmax()]
        verdicts.append(f"{best['what'].split(':')[0].removeprefix('autoq ')}: {best[speed] / row[speed]:.2f}x")
    return frame.assign(**{"fastest autoq point at >= its quality": verdicts})


def _kept_float(run: Path) -> str:
    """Which glue next to an int8 region ONNX Runtime keeps float in this run, by reason."""
    from collections import Counter

    from autoq.backends import get_backend
    from autoq.calibrate import cached_calibration
    from autoq.graph import opened

    calibration = cached_calibration(run / "cache")
    regions = get_backend("onnxruntime").regions(opened(run / "model.onnx"), calibration)
    reasons = Counter(reason.split(" (")[0].split(" would")[0] + (" (sentinel or outliers: SQNR)" if "SQNR" in reason
                                                                  else "") for reason in regions.kept_float.values())
    return "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="cls,det,minilm")
    parser.add_argument("--work", type=Path, default=Path("reports/int8-regions-runs"))
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/int8_regions.md"))
    args = parser.parse_args()
    models = {"cls": lambda: (ocr_models() / "ch_ppocr_mobile_v2.0_cls_infer.onnx", text_lines(), "top1"),
              "det": lambda: (ocr_models() / "ch_PP-OCRv4_det_infer.onnx", text_pages(), "cosine"),
              "minilm": lambda: (demo_files()[0], dict(np.load(demo_files()[1])), "cosine", True)}
    frames = []
    for name in args.models.split(","):
        source, data, metric, *transformer = models[name]()
        frames.append(bench(name, source, data, metric, args.trials, args.threads, args.work, *transformer))
    machine = fingerprint(args.threads)
    lines = ["# int8 regions: autoq vs the runtimes' one-line recipes", "",
             f"CPU: {machine['cpu']}; flags: {' '.join(machine['cpu_flags'])}; {machine['threads']} threads, batch 1.",
             "Libraries: " + ", ".join(f"{k} {v}" for k, v in machine["libraries"].items()) + ".",
             f"Search: {args.trials} trials per model and backend; walls: "
             + ", ".join(f.attrs["wall"] for f in frames) + ".", "",
             "Each row is timed against its runtime's FP32 model in alternating rounds (speedup = FP32 / it);",
             "quality on the validation split (top-1 agreement with FP32 for cls, cosine to FP32 otherwise).", ""]
    for frame in frames:
        lines += [f"## {frame['model'].iloc[0]}", "", f"Glue ONNX Runtime keeps float next to int8 regions: "
                  f"{frame.attrs['glue'] or 'none'}.", "",
                  frame.drop(columns="model").to_markdown(index=False, floatfmt=".4g"), ""]
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
