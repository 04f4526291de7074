"""OpenVINO's one-line recipes, measured beside the front, each compiled with every float precision a user could
pick on this CPU (f32, and bf16 where native): the model in that float, `nncf.quantize` with its defaults (and its
transformer preset where the model has attention MatMuls) calibrated on the run's cached samples; for a language
model with a KV cache, NNCF's `compress_weights` instead: its default (int8), int4 in groups of 128 and of 32, and
int4 at ratios 0.8 and 0.6 of the layers by its own data-free ranking (the rest and, as always, the embedding and
the LM head in int8), and its non-uniform 4-bit formats NF4 and CB4 (a codebook) at their defaults; a group that
does not divide a layer's inputs is adjusted (NNCF's ADJUST fallback)."""

from __future__ import annotations

import io
import logging
from contextlib import redirect_stderr, redirect_stdout
from functools import partial
from pathlib import Path

import nncf
import openvino as ov

from autoq.backends.base import Backend, Candidate, Recipe
from autoq.backends.openvino.backend import FLOAT_OPTION
from autoq.backends.openvino.nncf_build import has_attention
from autoq.calibrate import Calibration
from autoq.decoder import is_decoder, lm_head
from autoq.graph import OnnxModel
from autoq.precision import Assignment


def _float(backend: Backend, precision: str, model: OnnxModel, calibration: Calibration, workdir: Path) -> Candidate:
    return backend.build(model, Assignment.uniform(model.layer_names, "fp32", {FLOAT_OPTION: precision}),
                         calibration, workdir)


def _nncf(default_float: str, model_type, model: OnnxModel, calibration: Calibration, workdir: Path) -> Candidate:
    samples = calibration.samples()
    count = len(next(iter(samples.values())))
    dataset = nncf.Dataset([{k: v[i:i + 1] for k, v in samples.items()} for i in range(count)])
    logging.getLogger("nncf").setLevel(logging.ERROR)
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):  # NNCF's progress bars
        quantized = nncf.quantize(ov.convert_model(str(model.path)), dataset, subset_size=count,
                                  model_type=model_type)
    return _saved(quantized, model, default_float, workdir)


def _compressed(default_float: str, arguments: dict, model: OnnxModel, calibration: Calibration,
                workdir: Path) -> Candidate:
    fallback = nncf.AdvancedCompressionParameters(group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST)
    logging.getLogger("nncf").setLevel(logging.ERROR)
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):  # NNCF's progress bars and tables
        compressed = nncf.compress_weights(ov.convert_model(str(model.path)), advanced_parameters=fallback,
                                           **arguments)
    return _saved(compressed, model, default_float, workdir)


def _saved(ov_model: ov.Model, model: OnnxModel, default_float: str, workdir: Path) -> Candidate:
    workdir.mkdir(parents=True, exist_ok=True)
    xml = workdir / "model.xml"
    ov.save_model(ov_model, str(xml), compress_to_fp16=False)
    return Candidate(Assignment.uniform(model.layer_names, "fp32", {FLOAT_OPTION: default_float}), xml,
                     xml.stat().st_size + xml.with_suffix(".bin").stat().st_size)


def _compressed_layers(group: int | None, model: OnnxModel, label: str = "w4") -> dict[str, str]:
    """A `compress_weights` recipe in autoq's specs: int8 asymmetric per channel everywhere (`group` None), or 4-bit
    (`label`: int4 symmetric, nf4, cb4) in groups of `group` (0: per channel; halved until it divides a layer's
    inputs: the ADJUST fallback) but the embedding table and the LM head in int8 asymmetric."""
    head = lm_head(model.layers)

    def int4(inputs: int) -> str:
        size = group or 0
        while size > 16 and inputs % size:
            size //= 2
        return f"{label}g{size}" if size else label

    return {layer.name: "w8-asym" if group is None or layer.op_type != "MatMul" or layer.name == head else
            int4(layer.weight_shape[0]) for layer in model.layers if layer.op_type in ("MatMul", "Gather")}


INT4 = nncf.CompressWeightsMode.INT4_SYM  # its defaults: groups of 128, every layer but the first and last
DECODER_RECIPES = [("int8, its default", {}, partial(_compressed_layers, None)),
                   ("int4, group 128", {"mode": INT4}, partial(_compressed_layers, 128)),
                   ("int4, group 32", {"mode": INT4, "group_size": 32}, partial(_compressed_layers, 32)),
                   ("int4, ratio 0.8", {"mode": INT4, "ratio": 0.8}, None),  # its own ranking of the layers
                   ("int4, ratio 0.6", {"mode": INT4, "ratio": 0.6}, None),
                   ("NF4, group 128", {"mode": nncf.CompressWeightsMode.NF4},
                    partial(_compressed_layers, 128, label="nf4")),
                   ("CB4, per channel", {"mode": nncf.CompressWeightsMode.CB4},
                    partial(_compressed_layers, 0, label="cb4"))]


def recipes(backend: Backend, model: OnnxModel, native_bf16: bool) -> list[Recipe]:
    """Each recipe under every float precision a user could deploy it with on this CPU (f32, and bf16 where native:
    an int8 model's float glue runs in it), each its own row: timing NNCF only with the CPU's default float can
    flatter the front or hide a faster deployment."""
    floats = ["f32", "bf16"] if native_bf16 else ["f32"]
    made = [Recipe(f"OpenVINO {floating}", partial(_float, backend, floating)) for floating in floats]
    if is_decoder(model.inputs):
        return made + [Recipe(f"NNCF compress_weights {label} ({floating})",
                              partial(_compressed, floating, arguments), layers)
                       for label, arguments, layers in DECODER_RECIPES for floating in floats]
    attention = has_attention(model)  # autoq's int8 is NNCF's with its transformer preset where there is attention
    presets = [("nncf.quantize", None, None if attention else _int8_layers)] + (
        [("nncf.quantize, transformer preset", nncf.ModelType.TRANSFORMER, _int8_layers)] if attention else [])
    return made + [Recipe(f"{label} ({floating})", partial(_nncf, floating, model_type), layers)
                   for label, model_type, layers in presets for floating in floats]


def _int8_layers(model: OnnxModel) -> dict[str, str]:
    """`nncf.quantize` in autoq's specs: every weighted layer int8, an embedding table's weights in 8 bits
    (asymmetric, NNCF's choice for embeddings): the search starts from the recipe's layout and size."""
    return {layer.name: "w8-asym" if layer.op_type == "Gather" else "int8" for layer in model.layers}
