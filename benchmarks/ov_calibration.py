"""How much calibration data NNCF's int8 needs: `nncf.quantize` of PaddleOCR's text-direction classifier (from the
pip package `rapidocr-onnxruntime`) on autoq's calibration split (a quarter of the data, what the search's int8
points are calibrated on), on the calibration and search splits together (three quarters), and on 64 samples (a
user's typical `subset_size`), with fast or full bias correction, compiled with the f32 and the bf16 hint; quality
is top-1 agreement with FP32 on the validation split, which none of them sees.

    pip install -c constraints.txt -e ".[openvino,bench]" && pip install --no-deps rapidocr-onnxruntime==1.4.4
    python benchmarks/ov_calibration.py --out reports/benchmarks/ov_calibration.md
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from int8_regions import ocr_models, text_lines

from autoq import data as data_mod
from autoq.measure import fingerprint
from autoq.quiet import captured, hush


def main() -> None:
    import nncf
    import openvino as ov

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/ov_calibration.md"))
    args = parser.parse_args()
    hush()
    logging.getLogger("nncf").setLevel(logging.ERROR)
    path = next(ocr_models().rglob("*cls*.onnx"))
    splits = data_mod.split(data_mod.Dataset(text_lines(args.samples, seed=0)))
    core, model = ov.Core(), ov.convert_model(str(path))

    def top1(compiled_model, hint: str, x: np.ndarray) -> np.ndarray:
        config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": args.threads}
        request = core.compile_model(compiled_model, "CPU", config).create_infer_request()
        return np.concatenate([np.array(request.infer({0: x[i:i + 1]})[0]) for i in range(len(x))]).argmax(1)

    validation = splits.validation.arrays["x"]
    reference = top1(model, "f32", validation)
    calibration, search = splits.calibration.arrays["x"], splits.search.arrays["x"]
    sets = {"calibration split": calibration, "calibration + search splits": np.concatenate([calibration, search]),
            "64 samples of the calibration split": calibration[:64]}
    rows = []
    for label, x in sets.items():
        for correction, extra in (("fast (default)", {}), ("full", {"fast_bias_correction": False})):
            with captured():
                quantized = nncf.quantize(model, nncf.Dataset([x[i:i + 1] for i in range(len(x))]),
                                          subset_size=len(x), **extra)
            row = {"calibration data": label, "samples": len(x), "bias correction": correction}
            for hint in ("f32", "bf16"):
                row[f"agreement, {hint} hint"] = float((top1(quantized, hint, validation) == reference).mean())
            rows.append(row)
    machine = fingerprint(args.threads)
    lines = ["# NNCF int8 against the amount of calibration data (PaddleOCR text-direction classifier, OpenVINO)", "",
             f"CPU: {machine['cpu']}; {args.threads} threads. Libraries: "
             + ", ".join(f"{k} {v}" for k, v in machine["libraries"].items()) + ".",
             f"{args.samples} rendered text lines, split 1/4 calibration, 1/2 search, 1/4 validation "
             f"({len(validation)} validation images: one image is 0.01 of agreement).", "",
             pd.DataFrame(rows).to_markdown(index=False), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
