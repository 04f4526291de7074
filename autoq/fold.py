"""Function-preserving graph simplifications that let glue between layers run in integer kernels.

`simplify` is the standard pre-processing a quantizer needs (onnxruntime's `quant_pre_process` does the same):
ONNX Runtime's basic, hardware-independent optimisations fold BatchNormalization and constant Mul/Add into the
preceding Conv and fold constant subgraphs. Fusing a MatMul and its bias Add into a Gemm is left out: it would
rename layers. `div_as_mul` turns chosen divisions by a constant into multiplications by the reciprocal, for
the glue a backend runs in int8 (ORT has QLinearMul, no QLinearDiv: the `x * clip(x + 3, 0, 6) / 6` HardSwish
of exported MobileNets would otherwise leave a float op in every block). It is not applied model-wide, since
it would hide the `x / sqrt(2)` that ORT's float Gelu fusion looks for.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

KEEP_LAYER_NAMES = ["MatMulAddFusion"]  # ORT basic-level fusions that would replace a layer node


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold BatchNorm/constants (ORT basic level); names of layers kept."""
    return _ort_basic(model)


def _ort_basic(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxruntime as ort

    if model.ByteSize() > 1_800_000_000:  # a session on a >2 GB proto needs external data: leave it as it is
        return model
    with tempfile.TemporaryDirectory(prefix="autoq-fold-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(tmp) / "basic.onnx")
        options.log_severity_level = 3
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=KEEP_LAYER_NAMES)
        except Exception:  # a model ORT cannot load is reported later, by the checks that need it
            return model
        return onnx.load(options.optimized_model_filepath)


def constant_divisor(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """The divisor of a Div by a finite, non-zero float constant, else None."""
    divisor = constants.get(node.input[1]) if node.op_type == "Div" and len(node.input) == 2 else None
    if divisor is None or divisor.data_type != onnx.TensorProto.FLOAT:
        return None
    value = numpy_helper.to_array(divisor)
    return value if np.all(np.isfinite(value)) and not np.any(value == 0) else None


def div_as_mul(model: onnx.ModelProto, nodes: set[str]) -> onnx.ModelProto:
    """Rewrite the Div nodes named in `nodes` (each by a constant) as Mul by the reciprocal, in place."""
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        value = constant_divisor(node, constants) if node.name in nodes else None
        if value is None:
            continue
        divisor = constants[node.input[1]]
        reciprocal = numpy_helper.from_array((1.0 / value).astype(np.float32), f"{divisor.name}_reciprocal")
        if reciprocal.name not in constants:
            graph.initializer.append(reciprocal)
            constants[reciprocal.name] = reciprocal
        node.op_type = "Mul"
        node.input[1] = reciprocal.name
    return model
