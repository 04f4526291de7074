"""How autoq drives NNCF on an `ov.Model`: static int8 with the float layers in its ignored scope, and weight-only
compression of chosen layers in one spec, each layer found by the names OpenVINO gives its ops."""

from __future__ import annotations

import io
import logging
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import replace
from functools import cache

import nncf
import numpy as np
import openvino as ov

from autoq.graph import OnnxModel
from autoq.precision import Precision
from autoq.quantsim import kmeans_codebook

KERNELS = {"FullyConnected", "MatMul", "Convolution", "GroupConvolution", "Deconvolution", "Gemm"}
COMPRESSIBLE = KERNELS | {"Gather"}  # ov.Model ops NNCF compresses weights of (an embedding table: Gather)
MODEL_KERNELS = KERNELS | {"ConvolutionBackpropData", "GroupConvolutionBackpropData"}  # their ov.Model types
PRESET = "activations"  # option: NNCF's int8 activations, `asym` (its MIXED preset) or `sym` (PERFORMANCE)
SMOOTH_QUANT = "smooth_quant"  # option: NNCF's SmoothQuant on (its default alpha for the model type) or off

# a weight-only spec's (element, bits) -> NNCF's mode beyond its int4/int8 (symmetric or not); `runs_compressed`
# says which of these the CPU plugin's kernels read as stored
MODES = {("int", 3): "INT3_SYM", ("int", 2): "INT2_SYM", ("nf", 4): "NF4", ("cb", 4): "CB4", ("km", 4): "CODEBOOK",
         ("fp", 8): "FP8_E4M3", ("fp", 4): "FP4"}  # CODEBOOK: the layer's own k-means codebook (one call per layer)
# the runtime element type of a kernel's weight input -> the weight label of the spec that stores it
WEIGHT_LABELS = {"u8": "w8", "i8": "w8", "u4": "w4", "i4": "w4", "u3": "w3", "u2": "w2", "nf4": "nf4",
                 "f4e2m1": "fp4", "f8e4m3": "fp8"}

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
                    samples: dict[str, np.ndarray] | None, codebooks: dict[str, np.ndarray] | None = None) -> ov.Model:
    """NNCF weight-only compression of the `chosen` layers' weights alone (every other weighted op ignored) at
    `spec`'s bits, symmetry and group size; AWQ / scale estimation / GPTQ on the calibration `samples`; a
    codebook spec one layer at a time, each with its own of `codebooks`."""
    if spec.element == "km":
        for layer, names in chosen.items():
            ov_model = compress_layers(ov_model, {layer: names}, replace(spec, element="cb"), samples,
                                       {"": (codebooks or {})[layer]})
        return ov_model
    weighted = [op.get_friendly_name() for op in ov_model.get_ordered_ops() if op.get_type_name() in COMPRESSIBLE]
    targets = {name for name in weighted for layer, names in chosen.items() if owns(layer, names, {name})}
    missing = [layer for layer, names in chosen.items() if not any(owns(layer, names, {t}) for t in targets)]
    if missing:
        msg = f"OpenVINO has no weighted op for layer {missing[0]} to compress"
        raise ValueError(msg)
    logging.getLogger("nncf").setLevel(logging.ERROR)  # NNCF prints a statistics table per call
    ignored = nncf.IgnoredScope(names=[n for n in weighted if n not in targets])
    arguments = _mode_arguments(spec, next(iter(codebooks.values())) if codebooks else None) | WEIGHT_ROUNDINGS[
        spec.rounding]
    if samples is not None:
        count = len(next(iter(samples.values())))
        arguments["dataset"] = nncf.Dataset([{k: v[i:i + 1] for k, v in samples.items()} for i in range(count)])
        arguments["subset_size"] = count
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):  # NNCF's progress bars
        return nncf.compress_weights(ov_model, ignored_scope=ignored, **arguments)


def _mode_arguments(spec: Precision, codebook: np.ndarray | None = None) -> dict:
    """nncf.compress_weights' mode and group arguments for `spec` (8-bit integers are per channel, all else in
    `spec`'s groups or per channel, every chosen layer in that mode: no backup precision); with a `codebook`, NNCF's
    CODEBOOK mode with it (`km4`, or `cb4` given one)."""
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters

    name = MODES.get((spec.element, spec.bits), f"INT{spec.bits}_{'SYM' if spec.symmetric else 'ASYM'}")
    arguments: dict = {"mode": getattr(nncf.CompressWeightsMode, name)}
    if codebook is not None:
        arguments = {"mode": nncf.CompressWeightsMode.CODEBOOK,
                     "advanced_parameters": AdvancedCompressionParameters(codebook=codebook.astype(np.float32))}
    if name not in ("INT8_SYM", "INT8_ASYM"):
        arguments |= {"group_size": spec.group or -1, "ratio": 1.0, "all_layers": True,
                      "backup_mode": nncf.BackupMode.NONE}
    return arguments


@cache
def stored_weight_type(spec: Precision) -> str:
    """The element type the CPU plugin's matmul reads for `spec`'s weights on this machine (a probe: a 128x64
    MatMul compressed by NNCF and compiled once per spec and process). Formats its kernels do not read are
    decompressed to the float type at compile time (the file is smaller, the run is not)."""
    from openvino import opset13 as ops

    x = ops.parameter([1, 4, 128], np.float32, name="x")
    weight = np.random.default_rng(0).normal(0, 0.1, (128, 64)).astype(np.float32)
    model = ov.Model([ops.matmul(x, ops.constant(weight), False, False)], [x])
    logging.getLogger("nncf").setLevel(logging.ERROR)
    probe = replace(spec, group=32 if spec.group else 0)
    codebook = kmeans_codebook(weight, 1, probe.group) if spec.element == "km" else None
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        compressed = nncf.compress_weights(model, **_mode_arguments(probe, codebook))
    compiled = ov.Core().compile_model(compressed, "CPU")
    kernel = next(op for op in compiled.get_runtime_model().get_ordered_ops()
                  if str(op.get_rt_info()["layerType"].astype(str)) in KERNELS)
    return kernel.input(1).get_source_output().get_element_type().get_type_name()


def owns(layer: str, names: set[str], original: set[str]) -> bool:
    """Whether a kernel whose original ONNX names are `original` computes `layer` (OpenVINO also derives names
    such as '<layer>/WithoutBiases/DequantizationMultiply')."""
    return bool(original & names) or any(o.startswith(layer + "/") for o in original)
