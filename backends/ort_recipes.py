"""ONNX Runtime's one-line recipes, measured beside the front: `quantize_static` (U8S8 QDQ, per-channel weights,
all op types and weight op types only) and `quantize_dynamic` on MatMul/Gemm, each on the run's normalised model
(BatchNorm folded, as `quant_pre_process` would) and calibrated on the run's cached calibration samples."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

from autoq.backends.base import Candidate, Recipe
from autoq.backends.ort_graph import QUANTIZE
from autoq.backends.ort_quantize import CalibrationSamples, quiet_root_logger
from autoq.calibrate import samples_path
from autoq.graph import OnnxModel
from autoq.precision import Assignment

WEIGHT_OPS = ("Conv", "MatMul", "Gemm")


def _static(model: OnnxModel, calibration: Path, workdir: Path, ops: tuple[str, ...] | None) -> Path:
    out = workdir / "model.onnx"
    with quiet_root_logger():
        quantize_static(model.path, out, CalibrationSamples(samples_path(calibration)), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=list(ops) if ops else None)
    return out


def _dynamic(model: OnnxModel, calibration: Path, workdir: Path) -> Path:
    out = workdir / "model.onnx"
    with quiet_root_logger():
        quantize_dynamic(model.path, out, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)
    return out


def _built(make, model: OnnxModel, calibration: Path, workdir: Path) -> Candidate:
    """Run a recipe; one that quantizes nothing in this model is a failure with that reason."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = make(model, calibration, workdir)
    if not any(node.op_type in QUANTIZE for node in onnx.load(str(path), load_external_data=False).graph.node):
        msg = "it quantized nothing in this model (none of its op types has a constant weight here)"
        raise ValueError(msg)
    return Candidate(Assignment.uniform(model.layer_names, "fp32"), path, path.stat().st_size)


def recipes(model: OnnxModel) -> list[Recipe]:
    return [Recipe("ORT quantize_static U8S8, all ops", partial(_built, partial(_static, ops=None))),
            Recipe("ORT quantize_static U8S8, weight ops", partial(_built, partial(_static, ops=WEIGHT_OPS))),
            Recipe("ORT quantize_dynamic, MatMul/Gemm", partial(_built, _dynamic))]
