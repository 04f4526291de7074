"""How autoq drives NNCF on an `ov.Model`: static int8 with the float layers in its ignored scope, and weight-only
compression of chosen layers in one spec, each layer found by the names OpenVINO gives its ops."""

from __future__ import annotations

import io
import logging
from contextlib import redirect_stderr, redirect_stdout

import nncf
import numpy as np
import openvino as ov

from autoq.graph import OnnxModel
from autoq.precision import Precision

KERNELS = {"FullyConnected", "MatMul", "Convolution", "GroupConvolution", "Deconvolution", "Gemm"}
COMPRESSIBLE = KERNELS | {"Gather"}  # ov.Model ops NNCF compresses weights of (an embedding table: Gather)
MODEL_KERNELS = KERNELS | {"ConvolutionBackpropData", "GroupConvolutionBackpropData"}  # their ov.Model types
PRESET = "activations"  # option: NNCF's int8 activations, `asym` (its MIXED preset) or `sym` (PERFORMANCE)
SMOOTH_QUANT = "smooth_quant"  # option: NNCF's SmoothQuant on (its default alpha for the model type) or off

# weight-only rounding -> the nncf.compress_weights arguments that select it; the backend offers these
WEIGHT_ROUNDINGS: dict[str, dict[str, bool]] = {"rtn": {}, "awq": {"awq": True}, "se": {"scale_estimation": True},
                                                "gptq": {"gptq": True}}


def has_attention(model: OnnxModel) -> bool:
    """Whether the model multiplies two activations (attention): NNCF's transformer preset then fits."""
    constants = {t.name for t in model.proto.graph.initializer}
    return any(n.op_type == "MatMul" and not set(n.input) & constants for n in model.proto.graph.node)


def quantize_int8(ov_model: ov.Model, floating: dict[str, set[str]], samples: dict[str, np.ndarray],
                  transformer: bool, options: dict) -> ov.Model:
    """NNCF static int8 of every weighted op but the `floating` layers' (ignored: no quantizer on their inputs),
    calibrated on the run's cached calibration samples, with the options' activation symmetry and SmoothQuant."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    weighted = [op.get_friendly_name() for op in ov_model.get_ordered_ops()  # tables too: NNCF would quantize an
                if op.get_type_name() in MODEL_KERNELS | COMPRESSIBLE]  # embedding's weights (seen on a Gather)
    ignored = [name for name in weighted if any(owns(layer, names, {name}) for layer, names in floating.items())]
    count = len(next(iter(samples.values())))
    dataset = nncf.Dataset([{k: v[i:i + 1] for k, v in samples.items()} for i in range(count)])
    logging.getLogger("nncf").setLevel(logging.ERROR)
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):  # NNCF's progress bars
        preset = {"sym": nncf.QuantizationPreset.PERFORMANCE, "asym": nncf.QuantizationPreset.MIXED}.get(
            str(options.get(PRESET)))
        smooth = options.get(SMOOTH_QUANT)
        advanced = None if smooth in (None, "default") else AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=0.95 if smooth in (True, "on") else -1))
        return nncf.quantize(ov_model, dataset, subset_size=count, ignored_scope=nncf.IgnoredScope(names=ignored),
                             model_type=nncf.ModelType.TRANSFORMER if transformer else None, preset=preset,
                             advanced_parameters=advanced)


def compress_layers(ov_model: ov.Model, chosen: dict[str, set[str]], spec: Precision,
                    samples: dict[str, np.ndarray] | None) -> ov.Model:
    """NNCF weight-only compression of the `chosen` layers' weights alone (every other weighted op ignored) at
    `spec`'s bits, symmetry and group size; AWQ / scale estimation / GPTQ on the calibration `samples`."""
    weighted = [op.get_friendly_name() for op in ov_model.get_ordered_ops() if op.get_type_name() in COMPRESSIBLE]
    targets = {name for name in weighted for layer, names in chosen.items() if owns(layer, names, {name})}
    missing = [layer for layer, names in chosen.items() if not any(owns(layer, names, {t}) for t in targets)]
    if missing:
        msg = f"OpenVINO has no weighted op for layer {missing[0]} to compress"
        raise ValueError(msg)
    logging.getLogger("nncf").setLevel(logging.ERROR)  # NNCF prints a statistics table per call
    ignored = nncf.IgnoredScope(names=[n for n in weighted if n not in targets])
    mode = getattr(nncf.CompressWeightsMode, f"INT{spec.bits}_{'SYM' if spec.symmetric else 'ASYM'}")
    arguments: dict = {"mode": mode}
    if spec.bits == 4:
        arguments |= {"group_size": spec.group or -1, "ratio": 1.0, "all_layers": True,
                      "backup_mode": nncf.BackupMode.NONE, **WEIGHT_ROUNDINGS[spec.rounding]}
    if samples is not None:
        count = len(next(iter(samples.values())))
        arguments["dataset"] = nncf.Dataset([{k: v[i:i + 1] for k, v in samples.items()} for i in range(count)])
        arguments["subset_size"] = count
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):  # NNCF's progress bars
        return nncf.compress_weights(ov_model, ignored_scope=ignored, **arguments)


def owns(layer: str, names: set[str], original: set[str]) -> bool:
    """Whether a kernel whose original ONNX names are `original` computes `layer` (OpenVINO also derives names
    such as '<layer>/WithoutBiases/DequantizationMultiply')."""
    return bool(original & names) or any(o.startswith(layer + "/") for o in original)
