"""Regions: a layer plus the glue ops that belong to it, so that consecutive int8 layers form one integer chain.

A layer's region is every op reachable from its output through glue alone (activations, elementwise ops,
pooling, shape ops, attention's activation MatMuls) up to the next layers, the graph outputs, or the first op
that must stay float. A glue op reached from several layers (a residual Add, a Concat) belongs to each of their
regions, and runs int8 when any of them is int8: the float side then pays one quantize, as it would at the next
layer anyway. A glue op stays float, and ends the region, when
- the backend has no integer kernel or pass-through for it (it says so per node: `int8_glue`);
- the runtime fuses it into a float kernel (a Gelu, a SkipLayerNormalization): quantizing would break the
  fusion (`fused`, found by the backend from the runtime's own optimised FP32 graph);
- a tensor it would quantize loses its values to rounding under its calibrated uint8 range (SQNR below
  MIN_SQNR_DB: the range is dominated by a sentinel such as an attention mask's float-min, or by outliers):
  decided from the calibration statistics (`autoq.calibrate.resolution`), never from a fixed op list.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import onnx

from autoq.precision import Assignment, Kind

MIN_SQNR_DB = 10.8  # the SQNR of values spread over one uint8 step (10*log10(12)): below, they are rounded away
REMOVABLE = ("Relu", "Clip")  # absorbed by the int8 output range: only their output is quantized


@dataclass(frozen=True)
class Regions:
    """Which glue runs int8 with which layers, and which glue next to a region stays float (and why)."""

    owners: Mapping[str, frozenset[str]]  # glue node -> the layers whose region holds it
    kept_float: Mapping[str, str]  # glue node at a region's edge that stays float -> the reason
    absorbed: frozenset[str] = frozenset()  # Relu/Clip right after a layer: absorbed by its int8 output range

    def int8_nodes(self, assignment: Assignment, glue: bool = True) -> set[str]:
        """The int8 layers and the glue of their regions: the nodes to quantize. Without `glue`, only the layers
        and the activations their output ranges absorb (as a one-line recipe on weight op types does)."""
        int8 = {name for name, spec in assignment.specs().items() if spec.kind == Kind.STATIC}
        return int8 | {node for node, layers in self.owners.items()
                       if layers & int8 and (glue or node in self.absorbed)}


def find_regions(graph: onnx.GraphProto, layers: list[str], int8_glue: Callable[[onnx.NodeProto], bool],
                 resolution: Mapping[str, float], fused: Mapping[str, str]) -> Regions:
    """Walk downstream from every layer through the glue that may run int8 (see the module docstring)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    nodes = {node.name: node for node in graph.node}
    constants = {t.name for t in graph.initializer}
    is_layer = set(layers)
    owners: dict[str, set[str]] = {}
    kept: dict[str, str] = {}
    verdicts: dict[str, str | None] = {}
    for layer in layers:
        stack, seen = list(nodes[layer].output), set()
        while stack:
            for node in consumers.get(stack.pop(), []):
                if node.name in is_layer or node.name in seen:
                    continue
                seen.add(node.name)
                if node.name not in verdicts:
                    verdicts[node.name] = _why_float(node, int8_glue, resolution, fused, constants)
                reason = verdicts[node.name]
                if reason:
                    kept[node.name] = reason
                    continue
                owners.setdefault(node.name, set()).add(layer)
                stack.extend(node.output)
    absorbed = {node.name for layer in layers for out in nodes[layer].output for node in consumers.get(out, [])
                if node.op_type in REMOVABLE and node.name in owners}
    return Regions({n: frozenset(v) for n, v in owners.items()}, kept, frozenset(absorbed))


def _why_float(node: onnx.NodeProto, int8_glue: Callable[[onnx.NodeProto], bool], resolution: Mapping[str, float],
               fused: Mapping[str, str], constants: set[str]) -> str | None:
    """Why this glue op must stay float, or None when it can join an int8 region."""
    if not int8_glue(node):
        return f"{node.op_type}: no int8 kernel on this backend"
    if node.name in fused:
        return f"{node.op_type}: fused into a float {fused[node.name]} kernel"
    tensors = list(node.output) if node.op_type in REMOVABLE else [*node.input, *node.output]
    for tensor in tensors:
        if not tensor or tensor in constants:
            continue
        sqnr = resolution.get(tensor)
        if sqnr is None and tensor in node.output:
            return f"{node.op_type}: output {tensor} has no calibrated range"
        if sqnr is not None and sqnr < MIN_SQNR_DB:
            return (f"{node.op_type}: {tensor} would quantize at {sqnr:.1f} dB SQNR "
                    "(a sentinel or outliers dominate its range)")
    return None
