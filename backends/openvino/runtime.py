"""What OpenVINO's compiled model really runs: each layer kernel's executed precision (int8 activations, a compressed
weight's format, else its float type) and the ONNX names it computes, read from the runtime model."""

from __future__ import annotations

import openvino as ov

from autoq.backends.openvino.nncf_build import KERNELS, WEIGHT_LABELS, owns

RUNTIME_PRECISION = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
INTEGER = {"u8", "i8"}
FUSED_KERNELS = {"LLMMLP"}  # one kernel for a whole gated MLP (the CPU plugin on AMX, bf16)


def layer_kernels(compiled: ov.CompiledModel) -> list[tuple[str, str, set[str]]]:
    """(runtime op name, executed precision, original ONNX node names) of every layer kernel: int8 when
    its activations arrive as integers, the weight's label (`w4`, `nf4`, ...) when only its weights are compressed,
    else its float type."""
    kernels = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if str(info["layerType"].astype(str)) in KERNELS | FUSED_KERNELS:
            original = original_names(op)
            types = [i.get_source_output().get_element_type().get_type_name() for i in op.inputs()]
            if types[0] in INTEGER:
                precision = "int8"
            elif len(types) > 1 and types[1] in WEIGHT_LABELS:  # the weight as stored: read as the layer's own
                precision = WEIGHT_LABELS[types[1]]  # spec when its label matches (see `executed`)
            else:
                runtime = info["runtimePrecision"].astype(str)
                precision = RUNTIME_PRECISION.get(runtime, runtime)
            kernels.append((op.get_friendly_name(), precision, original))
    return kernels


def original_names(op: ov.Node) -> set[str]:
    """The ONNX names a runtime op computes: its `originalLayersNames`, and its own name, which that list can lack
    (with static shapes the CPU plugin lists the LayerNorm it fused into a FullyConnected, not the MatMul itself)."""
    return set(op.get_rt_info()["originalLayersNames"].astype(str).split(",")) | {op.get_friendly_name()}


def table_type(compiled: ov.CompiledModel, layer: str, names: set[str]) -> str | None:
    """The weight label (`w8`, `w4`) where the runtime Gather of table `layer` reads compressed weights, else None."""
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if str(info["layerType"].astype(str)) == "Gather" and owns(layer, names, original_names(op)):
            weights = op.input(0).get_source_output().get_element_type().get_type_name()
            return WEIGHT_LABELS.get(weights)
    return None
