"""ONNX Runtime's one-line recipes, measured beside the front: `quantize_static` (U8S8 QDQ, per-channel weights,
all op types and weight op types only) and `quantize_dynamic` on MatMul/Gemm, each on the run's normalised model
(BatchNorm folded, as `quant_pre_process` would) and calibrated on the run's cached calibration samples.

A language model's recipes are weight-only: ORT's MatMulNBits quantizer with its defaults (asymmetric, float
compute) in 8 bits and in 4 bits in blocks of 32 and 128; when the model was exported by ONNX Runtime GenAI's
builder from a folder autoq knows (`autoq.causal_lm.SOURCE` in its metadata), the builder's own int8 and int4 for
the CPU (symmetric blocks of 32, int8 compute) and its llama.cpp-style `k_quant_mixed` (int8 for the LM head and
the most sensitive layers); and NNCF's `compress_weights` on the ONNX model at int4 ratios 0.6, 0.8 and 1.0 (its
default ranking by weight error), run by ORT as the DequantizeLinear graph NNCF writes."""

from __future__ import annotations

import logging
import re
from functools import partial
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

from autoq.backends.base import Candidate, Recipe
from autoq.backends.onnxruntime.graph import QUANTIZE
from autoq.backends.onnxruntime.quantize import WEIGHT_ONLY_KERNELS, CalibrationSamples, quiet_root_logger
from autoq.calibrate import Calibration
from autoq.causal_lm import SOURCE, export_causal_lm
from autoq.decoder import block_of, is_decoder, lm_head
from autoq.graph import OnnxModel, save_onnx, stored_bytes
from autoq.precision import Assignment
from autoq.quiet import captured

WEIGHT_OPS = ("Conv", "MatMul", "Gemm")
NNCF_RATIOS = (0.6, 0.8, 1.0)  # compress_weights: the fraction of layers in int4, the rest int8
# ONNX Runtime GenAI's builder for the CPU: symmetric blocks of 32, int8 compute (accuracy level 4) by default;
# each with its layers in autoq's specs (MatMul, embedding table; k_quant_mixed's int8 layers: `_llama_cpp_mixed`)
GENAI_RECIPES: tuple[tuple[str, str, dict[str, str], tuple[str, str]], ...] = (
    ("int8 (CPU)", "int8", {}, ("w8g32-acc4", "fp32")), ("int4 (CPU)", "int4", {}, ("w4g32-acc4", "w4g32")),
    ("int4 k_quant_mixed", "int4", {"algo_config": "k_quant_mixed"}, ("w4g32-kquant-acc4", "w8g32-kquant")))
K_QUANT_UPGRADE = "w8g32-kquant-acc4"  # k_quant_mixed's LM head and "most sensitive" layers: int8 k-quant, g32


def _layers(matmul: str, table: str, model: OnnxModel) -> dict[str, str]:
    """Every MatMul layer in `matmul`, every embedding table in `table`."""
    return {layer.name: matmul if layer.op_type == "MatMul" else table for layer in model.layers
            if layer.op_type in ("MatMul", "Gather")}


def _llama_cpp_mixed(matmul: str, table: str, model: OnnxModel) -> dict[str, str]:
    """GenAI's k_quant_mixed placement (llama.cpp's Q4_K_M rule, `make_matmul_mixed_precision`): int8 for the LM
    head and, in the first and last eighth of the blocks and every third block between, for the attention's
    QKV / V projection and the MLP's down projection; the rest `matmul`."""
    layers, head = _layers(matmul, table, model), lm_head(model.layers)
    blocks = 1 + max((b for b in map(block_of, layers) if b is not None), default=-1)
    upgraded = {i for i in range(blocks) if i < blocks / 8 or i >= 7 * blocks / 8 or (i - round(blocks / 8)) % 3 == 2}
    for name in layers:
        if name == head or (block_of(name) in upgraded and re.search(r"/(qkv_proj|v_proj|down_proj)/MatMul$", name)):
            layers[name] = K_QUANT_UPGRADE
    return layers


def _static(model: OnnxModel, calibration: Calibration, workdir: Path, ops: tuple[str, ...] | None) -> Path:
    out = workdir / "model.onnx"
    with quiet_root_logger():
        quantize_static(model.path, out, CalibrationSamples(calibration.samples()), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=list(ops) if ops else None)
    return out


def _dynamic(model: OnnxModel, calibration: Calibration, workdir: Path) -> Path:
    out = workdir / "model.onnx"
    with quiet_root_logger():
        quantize_dynamic(model.path, out, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)
    return out


def _weight_only(model: OnnxModel, calibration: Calibration, workdir: Path, bits: int, block: int) -> Path:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer  # it needs onnx_ir

    out = workdir / "model.onnx"
    with quiet_root_logger():
        quantizer = MatMulNBitsQuantizer(onnx.load(str(model.path)), bits=bits, block_size=block)
        quantizer.process()
    return save_onnx(quantizer.model.model, out)


def _nncf_weights(model: OnnxModel, calibration: Calibration, workdir: Path, ratio: float) -> Path:
    """NNCF's `compress_weights` on the ONNX model with its defaults (int4 symmetric in groups of 128, the rest and
    the embedding / LM head in int8) at `ratio` of the layers in int4, by its own weight-error ranking, written as
    blockwise DequantizeLinear in front of each MatMul. A layer whose inputs 128 does not divide takes the
    largest group that does (NNCF's `ADJUST` fallback, which its error message recommends)."""
    import nncf  # the openvino extra's; missing, the recipe fails with that reason

    logging.getLogger("nncf").setLevel(logging.ERROR)  # NNCF resets its logger on import; it logs a table per call
    fallback = nncf.AdvancedCompressionParameters(group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST)
    with captured():
        compressed = nncf.compress_weights(onnx.load(str(model.path)), mode=nncf.CompressWeightsMode.INT4_SYM,
                                           ratio=ratio, advanced_parameters=fallback)
    return save_onnx(compressed, workdir / "model.onnx")


def _genai_builder(model: OnnxModel, calibration: Calibration, workdir: Path, precision: str, options: dict) -> Path:
    source = next((p.value for p in model.proto.metadata_props if p.key == SOURCE), None)
    if source is None or not Path(source).is_dir():
        msg = "the Hugging Face folder the model was exported from is unknown (export it with autoq.causal_lm)"
        raise ValueError(msg)
    return export_causal_lm(Path(source), workdir, workdir / "cache", precision, options)


def _built(make, model: OnnxModel, calibration: Calibration, workdir: Path) -> Candidate:
    """Run a recipe; one that quantizes nothing in this model is a failure with that reason."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = make(model, calibration, workdir)
    kernels = QUANTIZE | set(WEIGHT_ONLY_KERNELS) | {"DequantizeLinear"}
    if not any(node.op_type in kernels for node in onnx.load(str(path), load_external_data=False).graph.node):
        msg = "it quantized nothing in this model (none of its op types has a constant weight here)"
        raise ValueError(msg)
    return Candidate(Assignment.uniform(model.layer_names, "fp32"), path, stored_bytes(path))


def recipes(model: OnnxModel) -> list[Recipe]:
    if is_decoder(model.inputs):
        return [Recipe(f"ORT MatMulNBits int{bits}{f', block {block}' if bits == 4 else ''}",
                       partial(_built, partial(_weight_only, bits=bits, block=block)),
                       partial(_layers, f"w{bits}g{block}-asym", "fp32"))
                for bits, block in ((8, 128), (4, 32), (4, 128))] + [
                Recipe(f"GenAI builder {label}", partial(_built, partial(_genai_builder, precision=precision,
                                                                           options=options)),
                       partial(_llama_cpp_mixed if "mixed" in label else _layers, *specs))
                for label, precision, options, specs in GENAI_RECIPES] + [
                Recipe(f"NNCF compress_weights int4, ratio {ratio:g}", partial(_built, partial(_nncf_weights,
                                                                                        ratio=ratio)))
                for ratio in NNCF_RATIOS]
    return [Recipe("ORT quantize_static U8S8, all ops", partial(_built, partial(_static, ops=None))),
            Recipe("ORT quantize_static U8S8, weight ops", partial(_built, partial(_static, ops=WEIGHT_OPS))),
            Recipe("ORT quantize_dynamic, MatMul/Gemm", partial(_built, _dynamic))]
