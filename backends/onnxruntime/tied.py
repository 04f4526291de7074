"""Tied embeddings on ONNX Runtime: a language model whose embedding table is its LM head's weight transposed
(`tie_word_embeddings`: SmolLM2, Llama 3.2, Gemma) stores it once when both layers take the same weight-only spec
(the head's accuracy level aside). The table becomes a GatherBlockQuantized reading the head's MatMulNBits
weights and scales, as ONNX Runtime GenAI's builder writes it: the same rounding, so the same values, stored once
(SmolLM2-135M: 28M parameters, 16 MB in int4, 113 MB in fp32 where the untied export keeps a transposed copy).
A table quantized on its own is gathered the same way from a stand-in MatMul of its transpose, so a table takes
every bit width and rounding ORT's MatMul quantizer has, rounded exactly as a head in that spec would be."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from autoq.graph import tied_tables
from autoq.precision import Kind, Precision


def shares(table: Precision, head: Precision) -> bool:
    """Whether a table in spec `table` can read the weights of a tied head in spec `head`: the same weight spec
    (the head's accuracy level is a runtime knob of its matrix product), zero points (if any) whole bytes."""
    return (table.kind == Kind.WEIGHT_ONLY and head.weight_format() == table
            and (table.symmetric or table.bits == 8))


def tied_pairs(proto: onnx.ModelProto, specs: dict[str, Precision]) -> dict[str, str]:
    """The tied tables of `proto` whose spec the head's shares (`shares`): table layer -> head layer."""
    return {table: head for table, head in tied_tables(proto).items()
            if table in specs and head in specs and shares(specs[table], specs[head])}


def add_stand_in(proto: onnx.ModelProto, table: str) -> str:
    """Add a MatMul whose weight is the table of Gather `table` transposed, computing nothing anyone reads: ORT's
    MatMul quantizer rounds it and `share_tables` gathers from its weights, then drops it. Its name."""
    graph = proto.graph
    gather = next(n for n in graph.node if n.name == table)
    weight = next(t for t in graph.initializer if t.name == gather.input[0])
    name = f"{table}/stand_in"
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(weight).T),
                                                     f"{name}_weight"))
    graph.node.append(helper.make_node("MatMul", [f"{name}_input", f"{name}_weight"], [f"{name}_output"], name=name))
    return name


def share_tables(proto: onnx.ModelProto, pairs: dict[str, str], specs: dict[str, Precision]) -> None:
    """Replace each tied embedding's Gather by a GatherBlockQuantized of its head's MatMulNBits weights, in place
    (sliced to the table's width where the last block is padded); the float table goes."""
    graph = proto.graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    for name, head_name in pairs.items():
        head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.name.rsplit("_Q", 1)[0] == head_name)
        index, gather = next((i, n) for i, n in enumerate(graph.node) if n.name == name)
        rows, blocks, blob = shapes[head.input[1]]
        spec = specs[name]
        flat = {"data": (head.input[1], [rows, blocks * blob]), "scales": (head.input[2], [rows, blocks])}
        if len(head.input) > 3 and head.input[3]:
            flat["zero_points"] = (head.input[3], [rows, blocks])
        nodes = []
        for role, (source, shape) in flat.items():
            target = helper.make_tensor(f"{name}/tied_{role}_shape", onnx.TensorProto.INT64, [2], shape)
            graph.initializer.append(target)
            nodes.append(helper.make_node("Reshape", [source, target.name], [f"{name}/tied_{role}"],
                                          name=f"{name}/tied_{role}"))
        inputs = [f"{name}/tied_data", gather.input[1], f"{name}/tied_scales"] + (
            [f"{name}/tied_zero_points"] if "zero_points" in flat else [])
        table = gather.input[0]
        width = shapes[table][1]
        padded = blocks * spec.group != width  # MatMulNBits padded the last block: gather it whole, slice the rows
        outputs = [f"{name}/padded"] if padded else list(gather.output)
        nodes.append(helper.make_node("GatherBlockQuantized", inputs, outputs, name=f"{name}_Q{spec.bits}",
                                      domain="com.microsoft", bits=spec.bits, block_size=spec.group, gather_axis=0,
                                      quantize_axis=1))
        if padded:
            bounds = [helper.make_tensor(f"{name}/slice_{k}", onnx.TensorProto.INT64, [1], [v])
                      for k, v in (("starts", 0), ("ends", width), ("axes", -1))]
            graph.initializer.extend(bounds)
            nodes.append(helper.make_node("Slice", [outputs[0], *(b.name for b in bounds)], list(gather.output),
                                          name=f"{name}/slice"))
        del graph.node[index]
        for offset, node in enumerate(nodes):
            graph.node.insert(index + offset, node)
        if not any(table in n.input for n in graph.node):
            graph.initializer.remove(next(t for t in graph.initializer if t.name == table))
    for node in [n for n in graph.node if n.name.rsplit("_Q", 1)[0].endswith("/stand_in")]:
        graph.node.remove(node)
