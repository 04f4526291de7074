"""Graph work on ONNX Runtime models: guarding float layers against ORT's own quantization passes, grouping int8
layers into integer chains, and attributing per-node profile times to layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from autoq.backends.onnxruntime.smooth import MUL, SMOOTHED
from autoq.graph import save_onnx
from autoq.regions import Regions

# Ops that run integer kernels after ORT fuses QDQ groups; any other op on a layer computes in float.
INTEGER_OPS = {"QLinearMatMul", "QLinearConv", "QLinearConvTranspose", "MatMulInteger", "MatMulIntegerToFloat",
               "ConvInteger", "QGemm", "DynamicQuantizeMatMul", "QAttention"}
QUANTIZE = {"QuantizeLinear", "DynamicQuantizeLinear"}
PASS_THROUGH = {"MaxPool", "Resize", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice",
                "Expand", "Tile", "Gather", "GatherElements", "Split"}
WEIGHT_BIAS_QUANTIZED = ("Conv", "ConvTranspose", "Gemm")  # ORT int8s these between a DQ and a Q by itself


def keep_float(path: Path, float_layers: list[str]) -> None:
    """Keep float layers float under ORT's default optimisations. ORT's WeightBiasQuantization quantizes the
    weight of a Conv/Gemm whose input is dequantized and whose output (through Relu/Clip) is only quantized
    again: a float layer between two int8 regions would silently run int8. A Max with -FLT_MAX (the identity,
    which no ORT pass removes) after such a layer breaks that pattern."""
    proto = onnx.load(str(path))
    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    wanted = set(float_layers)
    guarded = set()
    for node in graph.node:
        source = producer.get(node.input[0]) if node.input else None
        if node.name in wanted and node.op_type in WEIGHT_BIAS_QUANTIZED and source is not None \
                and source.op_type == "DequantizeLinear":
            guarded.add(node.name)
    if not guarded:
        return
    lowest = onnx.numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "autoq_float_lowest")
    graph.initializer.append(lowest)
    nodes = []
    for node in graph.node:
        nodes.append(node)
        if node.name in guarded:
            output, kept = node.output[0], f"{node.output[0]}_autoq_float"
            node.output[0] = kept
            nodes.append(onnx.helper.make_node("Max", [kept, lowest.name], [output], f"{node.name}_keep_float"))
    del graph.node[:]
    graph.node.extend(nodes)
    save_onnx(proto, path)


def integer_chains(graph: onnx.GraphProto, kernels: dict[str, onnx.NodeProto | None]) -> list[list[str]]:
    """Int8 layers grouped by the integer chain they run in: nodes joined by int8 tensors (from a Quantize, an
    integer kernel, or int8 passed through), with no DequantizeLinear between them."""
    producer = {out: node for node in graph.node for out in node.output}
    integer: set[str] = set()
    for node in graph.node:  # graph order is topological
        data = producer.get(node.input[0]) if node.input else None
        if (node.op_type in QUANTIZE or node.op_type.startswith("QLinear") or node.op_type == "QGemm"
                or (node.op_type in PASS_THROUGH and data is not None and data.output[0] in integer)):
            integer.update(node.output[:1])
    parent = {node.name: node.name for node in graph.node}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for node in graph.node:
        for tensor in node.input:
            if tensor in integer and node.op_type != "DequantizeLinear":
                parent[root(node.name)] = root(producer[tensor].name)
    groups: dict[str, list[str]] = {}
    for layer, node in kernels.items():
        if node is not None and node.op_type in INTEGER_OPS:
            groups.setdefault(root(node.name), []).append(layer)
    return list(groups.values())


def attribute_profile(model: onnx.GraphProto, regions: Regions, per_node: dict[str, float],
               layers: list[str]) -> dict[str, float]:
    """Per-layer ms from ORT's per-node profile: each event is traced back to a node of the model (ORT names
    fused kernels `<node>_token_<n>`, `fused <node>`, `<node>_quant`, weight-only `<node>_Q<bits>`, NCHWc
    kernels `<output tensor>_nchwc`, quantize/dequantize nodes `<tensor>_QuantizeLinear`) and its time goes to the
    layers whose region holds that node, in equal shares; a quantize/dequantize goes with the tensor's producer
    (or its consumers' layers), a smoothing Mul with the layers it feeds."""
    producer = {out: node.name for node in model.node for out in node.output}
    consumers: dict[str, list[str]] = {}
    for node in model.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
    owners: dict[str, set[str]] = {layer: {layer} for layer in layers}
    layer_names = set(layers)
    for node, held in regions.owners.items():
        owners[node] = set(held)

    def holders(event: str) -> set[str]:
        name = event.removeprefix("fused ").split("_token_")[0].removesuffix("_quant")
        name = name.removesuffix("_Q2").removesuffix("_Q4").removesuffix("_Q8")  # MatMulNBits, GatherBlockQuantized
        if name in owners:
            return owners[name]
        if name.endswith(MUL) and SMOOTHED in name:  # a smoothing Mul: the layers reading the tensor it smooths
            tensor = name.removesuffix(MUL).rsplit(SMOOTHED, 1)[0]
            return {c for c in consumers.get(tensor, []) if c in layer_names}
        for suffix in ("_nchwc", "_QuantizeLinear", "_DequantizeLinear"):
            if name.endswith(suffix):
                tensor = name.removesuffix(suffix)
                found = owners.get(producer.get(tensor, ""), set())
                return found or set().union(*(owners.get(c, set()) for c in consumers.get(tensor, [])))
        return set()

    result = dict.fromkeys(layers, 0.0)
    for event, ms in per_node.items():
        shared = holders(event)
        for layer in shared:
            result[layer] += ms / len(shared)
    return result
