"""Which of AI Edge Quantizer's whole-model formats XNNPACK runs fast on this CPU, on all-MiniLM-L6-v2 as LiteRT
converts it: what decides which formats the `litert-cpu` space offers per layer. Each format is applied to the whole
model, timed against FP32 in alternating rounds (one sample per call, the run's threads), and scored as cosine to
FP32 on the demo's validation sentences.

Takes the FP32 model and calibration samples of a finished LiteRT run of the demo (e.g. the `litert/` folder of
`benchmarks/union_front.py`'s run).

    python benchmarks/litert_formats.py --run reports/union-minilm/litert --out reports/benchmarks/litert_formats.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from autoq import data as data_mod
from autoq.backends import get_backend
from autoq.backends.base import Candidate
from autoq.backends.litert.model import quiet
from autoq.calibrate import cached_samples
from autoq.demo import demo_files
from autoq.measure import fingerprint, interval, ratio_rounds
from autoq.metrics import get_metric
from autoq.precision import Assignment

FP16 = "weight_only_wf16_afp32"  # no recipe function: float casting of every weighted op's weights
FORMATS = {  # AI Edge Quantizer recipe -> what it stores and computes
    "dynamic_wi8_afp32": "int8 weights per channel, activations quantized at run time",
    "dynamic_wi4_afp32": "int4 weights per channel, activations quantized at run time",
    "dynamic_wi4b32_afp32": "int4 weights in blocks of 32, activations quantized at run time",
    "static_wi8_ai8": "int8 weights and activations (int8 I/O)",
    "static_wi8_ai16": "int8 weights, int16 activations",
    "weight_only_wi8_afp32": "int8 weights dequantized to float",
    "weight_only_wi4_afp32": "int4 weights dequantized to float",
    FP16: "float16 weights (float casting) computed in float",
}


def quantized(source: Path, name: str, samples: dict[str, np.ndarray], out: Path) -> Path:
    """`source` quantized whole by the recipe `name` (calibrated on `samples`, one at a time, where it needs it)."""
    from ai_edge_quantizer import quantizer, recipe

    from autoq.backends.litert.backend import SIGNATURE, _ordered
    from autoq.backends.litert.model import interpreter

    made = quantizer.Quantizer(str(source))
    if name == FP16:
        from ai_edge_quantizer.algorithm_manager import AlgorithmName
        from ai_edge_quantizer.qtyping import TFLOperationName

        for op in (TFLOperationName.FULLY_CONNECTED, TFLOperationName.CONV_2D, TFLOperationName.EMBEDDING_LOOKUP):
            made.add_weight_only_config(".*", op, 16, algorithm_key=AlgorithmName.FLOAT_CASTING)
    else:
        made.load_quantization_recipe(getattr(recipe, name)())
    statistics = None
    if made.need_calibration:
        details = interpreter(source).get_signature_runner(SIGNATURE).get_input_details()
        names = list(samples)
        feeds = [{sig: samples[n][i:i + 1].astype(details[sig]["dtype"]) for sig, n in
                  zip(_ordered(list(details)), names, strict=True)} for i in range(len(samples[names[0]]))]
        statistics = made.calibrate({SIGNATURE: feeds}, num_threads=1)
    made.quantize(statistics).export_model(str(out), overwrite=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished LiteRT run of the demo")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/litert_formats.md"))
    args = parser.parse_args()
    backend = get_backend("litert")
    source = backend.reference_model(args.run)
    found = cached_samples(args.run / "cache")
    assert found is not None, f"{args.run} has no cached calibration samples"
    samples = dict(np.load(found))
    validation = data_mod.split(data_mod.load(demo_files()[1])).validation.arrays
    work = args.run / "formats"
    work.mkdir(exist_ok=True)
    files = {"FP32": source}
    with quiet():
        for name in FORMATS:
            files[name] = quantized(source, name, samples, work / f"{name}.tflite")
    runners = {label: backend.runner(Candidate(Assignment({}), path, 0), args.threads) for label, path in files.items()}
    cosine = get_metric("cosine", False)[1]
    reference = runners["FP32"](validation)
    one = {k: v[:1] for k, v in validation.items()}
    timed = ratio_rounds({label: (lambda run=run: run(one)) for label, run in runners.items()}, "FP32",
                         rounds=args.rounds)
    rows = []
    for label, path in files.items():
        ratio, low, high = interval(timed[label][1])
        rows.append({"format": label, "stores / computes": FORMATS.get(label, "float32"),
                     "cosine": round(float(cosine(reference, runners[label](validation), None)), 4),
                     "ms": round(float(np.median(timed[label][0])), 2),
                     "speed vs FP32 (95%)": f"{ratio:.2f}x ({low:.2f}-{high:.2f})",
                     "MB": round(path.stat().st_size / 1e6, 1)})
    machine = fingerprint(args.threads)
    text = "\n".join([
        "# LiteRT (XNNPACK): AI Edge Quantizer's whole-model formats on all-MiniLM-L6-v2",
        "",
        f"CPU: {machine['cpu']}; flags: {' '.join(machine['cpu_flags'])}; {args.threads} threads, batch 1.",
        "Libraries: " + ", ".join(f"{k} {v}" for k, v in machine["libraries"].items()) + ".",
        "",
        f"Each recipe on the whole converted model; {args.rounds} alternating rounds against FP32 (one sample per "
        "call); cosine to FP32 on the demo's validation sentences.",
        "",
        pd.DataFrame(rows).to_markdown(index=False),
        "",
    ])
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
