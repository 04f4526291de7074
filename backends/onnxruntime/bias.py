"""Bias correction of static int8 layers in an ONNX Runtime QDQ model (NNCF's "fast bias correction").

Rounding a layer's input to its int8 range and its weights to int8 shifts the mean of each output channel; in a
MobileNet-style CNN that shift is large (a depthwise conv after an int8 HardSwish of the PaddleOCR detector: mean
|shift| 0.96 on channel means of 0.72). For every static int8 Conv/Gemm with a bias, one pass over the
calibration samples runs the layer twice on its FP32 input, once as FP32 and once as int8 (its input quantized
with the candidate's own scale and zero point, its int8 weights), and the mean difference per output channel is
added to the int8 bias. Each layer is corrected for its own rounding, from FP32 inputs, so the corrections do not
depend on each other: one pass for all layers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from autoq.data import Dataset, batch_size
from autoq.graph import OnnxModel, probe_session, save_onnx

CORRECTED = ("Conv", "Gemm")  # layers with a bias input (a MatMul's bias is a separate Add)


def correct_biases(path: Path, model: OnnxModel, layers: list[str], samples: dict[str, np.ndarray]) -> None:
    """Correct the biases of the static int8 `layers` of the QDQ model at `path` in place, from the FP32 `model`
    run on `samples`."""
    proto = onnx.load(str(path))
    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    constants = {t.name: t for t in graph.initializer}
    found = {}
    for node in graph.node:
        if node.name not in layers or node.op_type not in CORRECTED or len(node.input) < 3:
            continue
        x, w, b = (producer.get(name) for name in node.input[:3])
        if x is None or w is None or x.op_type != "DequantizeLinear" or w.op_type != "DequantizeLinear":
            continue
        quantize = producer.get(x.input[0])
        if quantize is None or quantize.op_type != "QuantizeLinear":
            continue
        found[node.name] = (node, quantize, w, b)
    if not found:
        return
    deltas = _mean_shifts(model, found, constants, samples)
    for name, (node, _, _, b) in found.items():
        if b is not None and b.op_type == "DequantizeLinear":  # int32 bias, scale = input scale x weight scale
            stored, scale = constants[b.input[0]], numpy_helper.to_array(constants[b.input[1]])
            shifted = numpy_helper.to_array(stored).astype(np.int64) + np.round(deltas[name] / scale).astype(np.int64)
            limit = np.iinfo(np.int32)
            stored.CopyFrom(numpy_helper.from_array(np.clip(shifted, limit.min, limit.max).astype(np.int32),
                                                    stored.name))
        elif node.input[2] in constants:
            stored = constants[node.input[2]]
            stored.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(stored) + deltas[name]).astype(np.float32),
                                                    stored.name))
    save_onnx(proto, path)


def _mean_shifts(model: OnnxModel, found: dict, constants: dict,
                 samples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Layer -> mean per output channel of (FP32 output - int8 output), both computed from the FP32 input."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model.proto)
    graph = probe.graph
    originals = {node.name: node for node in model.proto.graph.node}
    copied: set[str] = set()
    tags: list[str] = []
    axes_as_input = any(o.domain in ("", "ai.onnx") and o.version >= 18 for o in probe.opset_import)
    for name, (_, quantize, weight, _) in found.items():
        original = originals[name]
        for tensor in [*quantize.input[1:], *weight.input]:  # the candidate's input scale/zero point, int8 weights
            if tensor in constants and tensor not in copied:
                graph.initializer.append(constants[tensor])
                copied.add(tensor)
        tag = f"autoq_bias_{len(tags)}"
        tags.append(tag)
        rank = len(constants[weight.input[0]].dims) if original.op_type == "Conv" else 2  # of the output
        axes = [0, *range(2, rank)]  # all but the channels
        if axes_as_input:  # ReduceMean takes its axes as an input from opset 18
            graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), f"{tag}_axes"))
        mean = (helper.make_node("ReduceMean", [f"{tag}_d", f"{tag}_axes"], [tag], keepdims=0) if axes_as_input
                else helper.make_node("ReduceMean", [f"{tag}_d"], [tag], keepdims=0, axes=axes))
        graph.node.extend([
            helper.make_node("QuantizeLinear", [original.input[0], *quantize.input[1:]], [f"{tag}_q"],
                             **_attributes(quantize)),
            helper.make_node("DequantizeLinear", [f"{tag}_q", *quantize.input[1:]], [f"{tag}_x"],
                             **_attributes(quantize)),
            helper.make_node("DequantizeLinear", list(weight.input), [f"{tag}_w"], **_attributes(weight)),
            helper.make_node(original.op_type, [f"{tag}_x", f"{tag}_w", original.input[2]], [f"{tag}_y"],
                             **_attributes(original)),
            helper.make_node("Sub", [original.output[0], f"{tag}_y"], [f"{tag}_d"]),
            mean,
        ])
    session = probe_session(probe, tags)
    batches = list(Dataset(samples).batches(batch_size(model.inputs)))
    runs = [session.run(tags, feeds) for feeds in batches]  # each a batch mean: weight it by the batch's size
    weights = [len(next(iter(feeds.values()))) for feeds in batches]
    return {name: np.average([r[i] for r in runs], axis=0, weights=weights) for i, name in enumerate(found)}


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}
