"""The per-layer precision menu (specs) against the runtimes' one-line recipes, timed side by side.

ONNX Runtime: `autoq search --space cpu-menu` (static int8 with three calibrations, int8-dyn per tensor or channel,
MatMulNBits w8/w4, int4 embeddings) against `quantize_static` (all ops; weight ops) and `quantize_dynamic` (its
defaults; MatMul/Gemm). OpenVINO: `autoq search --backend openvino` (int8, weight-only w8/w4, float precision and
activation symmetry as options) against f32, bf16 and `nncf.quantize` (default and transformer presets), each
compiled with OpenVINO's default float precision for this CPU and with f32. Models: all-MiniLM-L6-v2 (the demo)
and the PaddleOCR text detector from the pip package `rapidocr-onnxruntime`. Batch 1; every row is timed against
its runtime's FP32 model in alternating rounds by autoq's harness; quality on the validation split.

    pip install -c constraints.txt -e ".[bench]" && pip install --no-deps rapidocr-onnxruntime==1.4.4
    python benchmarks/precision_menu.py --trials 40 --out reports/benchmarks/precision_menu.md
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
from int8_regions import ocr_models, ort_session, text_pages

import autoq
from autoq import data as data_mod
from autoq.demo import demo_files
from autoq.measure import fingerprint, time_runner
from autoq.metrics import get_metric

Run = tuple  # (callable on feeds, size in bytes)


def _ort_recipes(source: Path, calibration: dict[str, np.ndarray], out: Path, threads: int) -> dict[str, Run]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    samples = [{k: v[i:i + 1] for k, v in calibration.items()} for i in range(len(next(iter(calibration.values()))))]

    class Reader:
        def __init__(self) -> None:
            self.it = iter(samples)

        def get_next(self):
            return next(self.it, None)

    logging.getLogger().setLevel(logging.ERROR)
    paths: dict[str, Path | str] = {"ORT FP32": source}
    recipes = {"ORT quantize_static U8S8, all ops": lambda path: quantize_static(
                   str(source), str(path), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                   weight_type=QuantType.QInt8),
               "ORT quantize_static U8S8, weight ops": lambda path: quantize_static(
                   str(source), str(path), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                   weight_type=QuantType.QInt8, op_types_to_quantize=["Conv", "MatMul", "Gemm"]),
               "ORT quantize_dynamic (defaults)": lambda path: quantize_dynamic(str(source), str(path)),
               "ORT quantize_dynamic (MatMul/Gemm)": lambda path: quantize_dynamic(
                   str(source), str(path), op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)}
    for label, recipe in recipes.items():
        path = out / f"recipe-{len(paths)}.onnx"
        try:
            recipe(path)
            paths[label] = path
        except Exception as exc:  # a recipe that fails on this model is a row with its reason
            paths[label] = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
    return {label: (ort_session(path, threads), path.stat().st_size) if isinstance(path, Path) else (path, 0)
            for label, path in paths.items()}


def _ov_recipes(source: Path, calibration: dict[str, np.ndarray], threads: int, transformer: bool) -> dict[str, Run]:
    import nncf
    import openvino as ov

    core = ov.Core()
    default = core.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()

    def compiled(model, precision: str | None):
        config = {"NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        request = core.compile_model(model, "CPU", config | ({"INFERENCE_PRECISION_HINT": precision}
                                                             if precision else {})).create_infer_request()
        return lambda feeds: [np.array(request.infer(feeds)[0])]

    def size(model) -> int:
        path = Path("/tmp/autoq-bench-ov.xml")
        ov.save_model(model, str(path), compress_to_fp16=False)
        return path.stat().st_size + path.with_suffix(".bin").stat().st_size

    model = ov.convert_model(str(source))
    runs = {"OpenVINO f32": (compiled(model, "f32"), size(model))}
    if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        runs["OpenVINO bf16 (native)"] = (compiled(model, "bf16"), size(model))
    samples = [{k: v[i:i + 1] for k, v in calibration.items()} for i in range(len(next(iter(calibration.values()))))]
    logging.getLogger("nncf").setLevel(logging.ERROR)
    presets = {"nncf.quantize": {}} | ({"nncf.quantize, transformer preset": {"model_type": nncf.ModelType.TRANSFORMER}}
                                       if transformer else {})
    for label, extra in presets.items():
        quantized = nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples), **extra)
        runs[f"{label} (OpenVINO default float: {default})"] = (compiled(quantized, None), size(quantized))
        runs[f"{label} (f32)"] = (compiled(quantized, "f32"), size(quantized))
    return runs


def _front_runs(result, run: Path, backend: str, threads: int) -> dict[str, Run]:
    import openvino as ov

    front = result.front.dropna(subset=["model"]).reset_index(drop=True)
    runs = {}
    for _, row in front.iterrows():
        path = run / row["model"]
        options = json.loads(row["assignment"])["options"]
        label = f"autoq {backend} point {int(row['point'])}: {row['summary']}"
        if options:
            label += " (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")"
        if backend == "ORT":
            runs[label] = (ort_session(path, threads), path.stat().st_size)
            continue
        precision = options.get("inference_precision", "f32")
        request = ov.Core().compile_model(str(path), "CPU", {
            "INFERENCE_PRECISION_HINT": precision, "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
        runs[label] = (
            lambda feeds, r=request: [np.array(r.infer(feeds)[0])], int(row["size_bytes"]))
    return runs


def _specs_taken(result) -> list[str]:
    """Per ORT front point: which layers took which spec (layer names shortened to their module path)."""
    lines = []
    for _, row in result.front.iterrows():
        groups: dict[str, list[str]] = defaultdict(list)
        for layer, spec in json.loads(row["assignment"])["layers"].items():
            groups[spec].append(layer.replace("/encoder/encoder/", "").replace("/MatMul", "").replace("/Gather", ""))
        parts = [f"`{spec}` x{len(names)}" + (f" ({', '.join(names)})" if len(names) <= 8 else "")
                 for spec, names in sorted(groups.items(), key=lambda kv: len(kv[1]))]
        lines.append(f"- point {int(row['point'])} (quality {row['val_quality']:.4f}): " + "; ".join(parts))
    return ["Which layers took which spec (ORT front):", "", *lines]


def _verdicts(frame: pd.DataFrame, runs: dict[str, Run], feeds: dict, candidates: int = 3) -> pd.DataFrame:
    """Per recipe: the autoq points of the same runtime with at least its quality and at most its size (1% slack
    for the normalised file), the `candidates` fastest against FP32 each timed directly against the recipe in
    alternating rounds: the verdict is the best side-by-side ratio (recipe ms / point ms). The table's FP32
    ratios come from different rounds, so they only nominate the points."""
    verdicts = []
    for _, row in frame.iterrows():
        same = frame[(frame["runtime"] == row["runtime"]) & frame["what"].str.startswith("autoq")]
        ours = same[(same["quality"] >= row["quality"] - 1e-4) & (same["MB"] <= row["MB"] * 1.01)]
        if row["what"].startswith("autoq") or pd.isna(row["quality"]):
            verdicts.append("")
        elif ours.empty:
            verdicts.append("**not dominated**")
        else:
            timed = []
            for what in ours.nlargest(candidates, "speedup")["what"]:
                point, recipe = runs[what][0], runs[row["what"]][0]
                timing = time_runner(lambda p=point: p(feeds), lambda r=recipe: r(feeds), min_runs=40, max_runs=120)
                timed.append((timing.speedup, timing.spread_ms / timing.median_ms * timing.speedup, what))
            ratio, spread, what = max(timed)
            verdicts.append(f"{what.split(':')[0].removeprefix('autoq ')}: {ratio:.2f}x (+-{spread:.2f})"
                            + (f", best of {len(timed)}" if len(timed) > 1 else ""))
    return frame.assign(**{"autoq point at >= its quality, <= its size: speed ratio timed side by side": verdicts})


def _targets(frame: pd.DataFrame, runs: dict[str, Run], feeds: dict, targets: list[tuple[float, str]]) -> list[str]:
    """Per (quality, recipe): the autoq point with at least that quality that was fastest against FP32, timed
    directly against the recipe in alternating rounds (ratio > 1: the point is faster)."""
    lines = []
    for quality, against in targets:
        runtime = frame.loc[frame["what"] == against, "runtime"].iloc[0]
        ours = frame[(frame["runtime"] == runtime) & frame["what"].str.startswith("autoq")
                     & (frame["quality"] >= quality)]
        if ours.empty:
            lines.append(f"- quality >= {quality}: no autoq point")
            continue
        best = ours.loc[ours["speedup"].idxmax()]
        point, recipe = runs[best["what"]][0], runs[against][0]
        timing = time_runner(lambda p=point: p(feeds), lambda r=recipe: r(feeds), min_runs=60, max_runs=180)
        lines.append(f"- quality >= {quality}: {best['what'].removeprefix('autoq ')} (quality {best['quality']:.4f}, "
                     f"{best['MB']:.1f} MB) against {against}: {timing.speedup:.2f}x "
                     f"(+-{timing.spread_ms / timing.median_ms * timing.speedup:.2f})")
    return lines


def _own_verdicts(*results) -> list[str]:
    """What `autoq search` itself said of the recipes it measured in the same run (recipes.csv)."""
    lines = ["What each `autoq search` run said of the recipes it measured itself (`recipes.csv`; speed-up over FP32 "
             "in the same rounds, validation split):", ""]
    for result in results:
        table = result.recipes.assign(MB=result.recipes["size_bytes"] / 1e6)
        columns = ["recipe", "val_quality", "speedup", "MB", "verdict"]
        lines += [table[columns].to_markdown(index=False, floatfmt=".4g"), ""]
    return lines


def bench(name: str, source: Path, data: dict[str, np.ndarray], metric: str, transformer: bool, trials: int,
          threads: int, work: Path, targets: list[tuple[float, str]]) -> tuple[pd.DataFrame, list[str], str]:
    splits = data_mod.split(data_mod.load(data), seed=0)
    started = time.perf_counter()
    ort_result = autoq.search(source, data, metric=metric, trials=trials, threads=threads, space="cpu-menu",
                              out=work / name, progress=False)
    ort_wall = time.perf_counter() - started
    ov_result = autoq.search(source, data, metric=metric, trials=trials, threads=threads, backend="openvino",
                             out=work / f"{name}-openvino", progress=False)
    ov_wall = time.perf_counter() - started - ort_wall
    groups = {"ORT": (_ort_recipes(source, splits.calibration.arrays, work / name, threads)
                      | _front_runs(ort_result, work / name, "ORT", threads), "ORT FP32"),
              "OpenVINO": (_ov_recipes(source, splits.calibration.arrays, threads, transformer)
                           | _front_runs(ov_result, work / f"{name}-openvino", "OpenVINO", threads), "OpenVINO f32")}
    score = get_metric(metric, False)[1]
    validation, feeds = splits.validation, {k: v[:1] for k, v in splits.validation.arrays.items()}
    rows = []
    for runtime, (runs, reference) in groups.items():
        failed = {k: run for k, (run, _) in runs.items() if isinstance(run, str)}
        rows += [{"runtime": runtime, "what": f"{label} ({reason})"} for label, reason in failed.items()]
        runs = {k: v for k, v in runs.items() if k not in failed}
        outputs = {k: [np.concatenate([run(f)[0] for f in validation.batches(1)])] for k, (run, _) in runs.items()}
        ref = runs[reference][0]
        for label, (run, size) in runs.items():
            timing = time_runner(lambda run=run: run(feeds), lambda ref=ref: ref(feeds), min_runs=30, max_runs=90)
            rows.append({"runtime": runtime, "what": label, "quality": float(score(outputs[reference],
                                                                                   outputs[label], None)),
                         "ms": timing.median_ms, "speedup": timing.speedup, "MB": size / 1e6, "load": timing.load})
    wall = f"{name}: ORT search {ort_wall:.0f} s ({len(ort_result.front)} front points), OpenVINO {ov_wall:.0f} s"
    print(wall)
    every = {label: run for runs, _ in groups.values() for label, run in runs.items()}
    frame = pd.DataFrame(rows)
    notes = [*_targets(frame, every, feeds, targets), "", *_own_verdicts(ort_result, ov_result),
             *_specs_taken(ort_result)]
    return _verdicts(frame, every, feeds), notes, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="minilm,det")
    parser.add_argument("--work", type=Path, default=Path("reports/precision-menu-runs"))
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/precision_menu.md"))
    args = parser.parse_args()
    models = {"minilm": lambda: (demo_files()[0], dict(np.load(demo_files()[1])), "cosine", True),
              "det": lambda: (ocr_models() / "ch_PP-OCRv4_det_infer.onnx", text_pages(), "cosine", False)}
    targets = {"minilm": [(0.99, "ORT quantize_dynamic (MatMul/Gemm)"), (0.99, "ORT quantize_dynamic (defaults)"),
                          (0.999, "ORT FP32")],
               "det": [(0.99, "nncf.quantize (OpenVINO default float: bf16)")]}
    results = [(name, *bench(name, *models[name](), args.trials, args.threads, args.work, targets[name]))
               for name in args.models.split(",")]
    machine = fingerprint(args.threads)
    lines = ["# The precision menu: autoq's fronts vs the runtimes' one-line recipes", "",
             f"CPU: {machine['cpu']}; flags: {' '.join(machine['cpu_flags'])}; {machine['threads']} threads, batch 1.",
             "Libraries: " + ", ".join(f"{k} {v}" for k, v in machine["libraries"].items()) + ".",
             f"Search: {args.trials} trials per model and backend (ORT space `cpu-menu`, OpenVINO `openvino-cpu`); "
             "walls: " + "; ".join(r[3] for r in results) + ".", "",
             "Each row is timed against its runtime's FP32 model in alternating rounds (speedup = FP32 / it; ms is the",
             "median of its own rounds, which drift with the shared host); quality on the validation split (cosine to",
             "FP32); MB is the model file. The verdict takes the autoq points of the same runtime with at least the",
             "recipe's quality and at most its size that were fastest against FP32 (up to three), times each directly",
             "against the recipe in alternating rounds, and gives the best: recipe ms / point ms (+- the spread of",
             "that ratio).", ""]
    for name, frame, specs, _ in results:
        lines += [f"## {name}", "", frame.to_markdown(index=False, floatfmt=".4g"), "",
                  "The targets, each timed directly against its recipe (ratio = recipe ms / point ms):", "",
                  *specs, ""]
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
