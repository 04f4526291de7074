"""ONNX Runtime: per-layer static int8 as U8S8 QDQ (the integer kernels this CPU runs), dynamic int8 on
MatMul (`int8-dyn`: ORT's `quantize_dynamic` on those nodes alone: int8 weights, activations quantized at
run time by DynamicQuantizeMatMul), fp32 otherwise.

An int8 layer takes its region with it (`autoq.regions`): the glue after it runs in ORT's integer kernels
(QLinearAdd/Mul/Concat/Sigmoid/Softmax/GlobalAveragePool/MatMul...) or passes int8 through (MaxPool, Resize,
Reshape, Transpose...), and its Relu/Clip is absorbed into its output range, so consecutive int8 layers form
one integer chain. `glue_check` counts the float<->int8 conversions left in ORT's optimised graph.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

from autoq.backends.base import Backend, Candidate, Feeds, GlueCheck, Outputs
from autoq.calibrate import resolution
from autoq.fold import KEEP_LAYER_NAMES, constant_divisor, div_as_mul
from autoq.graph import Layer, OnnxModel, save_onnx
from autoq.precision import Assignment
from autoq.regions import REMOVABLE, Regions, find_regions

# Ops that run integer kernels after ORT fuses QDQ groups; any other op on a layer computes in float.
INTEGER_OPS = {"QLinearMatMul", "QLinearConv", "QLinearConvTranspose", "MatMulInteger", "MatMulIntegerToFloat",
               "ConvInteger", "QGemm", "DynamicQuantizeMatMul", "QAttention"}
# Glue ORT's CPU provider runs on int8 (its QDQ selectors): integer kernels, and ops that pass int8 through.
INTEGER_GLUE = {"Add", "Mul", "Concat", "Sigmoid", "LeakyRelu", "Softmax", "AveragePool", "GlobalAveragePool",
                "MatMul", "Gemm", "Where"}
PASS_THROUGH = {"MaxPool", "Resize", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice",
                "Expand", "Tile", "Gather", "GatherElements", "Split"}
QUANTIZE = {"QuantizeLinear", "DynamicQuantizeLinear"}
DYNAMIC_OPS = {"DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat"}  # int8-dyn when fed at run time
DYNAMIC_LAYERS = ("MatMul",)  # ORT's dynamic quantizer has no Gemm
OPTIMIZED = "optimized.onnx"


@contextmanager
def _quiet_root_logger():
    """ORT's quantizer logs advice on the root logger for every build; keep the user's console clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    default_space = "cpu-int8"

    def precisions(self) -> set[str]:
        return {"fp32", "int8", "int8-dyn"}

    def layer_precisions(self, layer: Layer, allowed: list[str]) -> list[str]:
        """ORT's CPU provider has no integer ConvTranspose (its QDQ would run as float); int8-dyn is MatMul only."""
        return [p for p in allowed if not (p == "int8" and layer.op_type == "ConvTranspose")
                and not (p == "int8-dyn" and layer.op_type not in DYNAMIC_LAYERS)]

    def regions(self, model: OnnxModel, calibration: Path) -> Regions:
        """The model's regions on ORT (computed once per model and calibration in each process)."""
        key = (str(model.path), str(calibration))
        if key not in _REGIONS:
            constants = {t.name: t for t in model.proto.graph.initializer}

            def int8_glue(node: onnx.NodeProto) -> bool:
                return (node.op_type in INTEGER_GLUE | PASS_THROUGH | set(REMOVABLE)
                        or constant_divisor(node, constants) is not None)

            _REGIONS[key] = find_regions(model.proto.graph, model.layer_names, int8_glue, resolution(calibration),
                                         self._float_fusions(model))
        return _REGIONS[key]

    def _float_fusions(self, model: OnnxModel) -> dict[str, str]:
        """Node -> the float kernel ORT fuses it into in the FP32 model (Gelu, SkipLayerNormalization...):
        the nodes missing from ORT's extended-level optimised graph, except the Relu/Clip int8 absorbs too."""
        with tempfile.TemporaryDirectory(prefix="autoq-fusions-") as tmp:
            options = self._options(1)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            options.optimized_model_filepath = f"{tmp}/extended.onnx"
            ort.InferenceSession(str(model.path), options, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=KEEP_LAYER_NAMES)  # layers stay layers: not glue fusions
            optimized = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
        original = {node.name for node in model.proto.graph.node}
        kept = {node.name for node in optimized.node}
        made = {out: node.op_type for node in optimized.node if node.name not in original for out in node.output}
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.proto.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)

        def kernel(node: onnx.NodeProto) -> str:  # the fused kernel that now produces what the node fed
            tensors, seen = list(node.output), set()
            while tensors:
                tensor = tensors.pop(0)
                if tensor in made:
                    return made[tensor]
                seen.add(tensor)
                tensors += [o for c in consumers.get(tensor, []) for o in c.output if o not in seen]
            return "fused"

        return {node.name: kernel(node) for node in model.proto.graph.node
                if node.name not in kept and node.op_type not in REMOVABLE}

    def build(self, model: OnnxModel, assignment: Assignment, calibration: Path, workdir: Path) -> Candidate:
        workdir.mkdir(parents=True, exist_ok=True)
        out = workdir / "model.onnx"
        regions = self.regions(model, calibration)
        nodes = regions.int8_nodes(assignment)
        if not nodes:  # quantize_static treats an empty node list as "all nodes"
            shutil.copyfile(model.path, out)
        else:
            proto = onnx.ModelProto()
            proto.CopyFrom(model.proto)
            source = save_onnx(div_as_mul(proto, nodes), workdir / "source.onnx")
            op_types = sorted({node.op_type for node in proto.graph.node if node.name in nodes})
            with _quiet_root_logger():
                quantize_static(
                    source, out, None, quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                    per_channel=True, reduce_range=bool(assignment.options.get("reduce_range", False)),
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=sorted(nodes),
                    calibration_cache_path=calibration)
            source.unlink()
            _keep_float(out, [name for name, p in assignment.layers.items() if p != "int8"])
        dynamic = sorted(name for name, precision in assignment.layers.items() if precision == "int8-dyn")
        if dynamic:
            with _quiet_root_logger():
                quantize_dynamic(out, out, op_types_to_quantize=list(DYNAMIC_LAYERS), nodes_to_quantize=dynamic,
                                 weight_type=QuantType.QInt8)
        return Candidate(assignment, out, out.stat().st_size, {
            "layers": {layer.name: layer.weight for layer in model.layers}, "regions": regions,
            "graph": model.proto.graph})

    @staticmethod
    def _options(threads: int) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Measured here: with spinning, a session's idle threads spin on after its run and slow the next
        # session by up to 2x for 2-3 runs, so alternating timing rounds lie; without, medians match.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def _session(self, candidate: Candidate, threads: int) -> ort.InferenceSession:
        options = self._options(threads)
        options.optimized_model_filepath = str(candidate.path.with_name(OPTIMIZED))
        return ort.InferenceSession(str(candidate.path), options, providers=["CPUExecutionProvider"])

    def runner(self, candidate: Candidate, threads: int) -> Callable[[Feeds], Outputs]:
        session = self._session(candidate, threads)
        return lambda feeds: session.run(None, feeds)

    def _optimized(self, candidate: Candidate) -> onnx.GraphProto:
        optimized = candidate.path.with_name(OPTIMIZED)
        if not optimized.is_file():
            self._session(candidate, 1)
        return onnx.load(str(optimized), load_external_data=False).graph

    def _kernels(self, graph: onnx.GraphProto, candidate: Candidate) -> dict[str, onnx.NodeProto | None]:
        """Layer -> the node of the optimised graph that computes it: the one that consumes its (quantized)
        weight or carries its name."""
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in [*node.input, f"@{node.name}"]:
                consumers.setdefault(name, []).append(node)
        result = {}
        for layer, weight in candidate.extra["layers"].items():
            found = [*consumers.get(f"{weight}_quantized", []), *consumers.get(weight, []),
                     *consumers.get(f"@{layer}", [])]
            result[layer] = next((n for n in found if n.op_type in INTEGER_OPS), found[0] if found else None)
        return result

    def executed(self, candidate: Candidate) -> dict[str, str]:
        return self._executed(self._optimized(candidate), candidate)

    def _executed(self, graph: onnx.GraphProto, candidate: Candidate) -> dict[str, str]:
        # A layer ran int8 only if an integer kernel consumes its (quantized) weight or carries its name;
        # a DequantizeLinear left in front of a float op means the int8 was simulated: fp32.
        producer = {out: node for node in graph.node for out in node.output}
        result = {}
        for layer, node in self._kernels(graph, candidate).items():
            if node is None or node.op_type not in INTEGER_OPS:
                result[layer] = "fp32"
                continue
            source = producer.get(node.input[0])
            at_run_time = node.op_type == "DynamicQuantizeMatMul" or (
                node.op_type in DYNAMIC_OPS and source is not None and source.op_type == "DynamicQuantizeLinear")
            result[layer] = "int8-dyn" if at_run_time else "int8"
        return result

    def glue_check(self, candidate: Candidate) -> GlueCheck:
        """The float<->int8 conversions left inside ORT's optimised graph, and the int8 chains of layers."""
        graph = self._optimized(candidate)
        inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}
        constants = {t.name for t in graph.initializer}
        conversions = [f"{n.input[0]} -> int8" for n in graph.node
                       if n.op_type in QUANTIZE and n.input[0] not in inputs]
        conversions += [f"{n.name.removesuffix('_DequantizeLinear')} -> float" for n in graph.node
                        if n.op_type == "DequantizeLinear" and n.input[0] not in constants
                        and n.output[0] not in outputs]
        static = {layer for layer, ran in self._executed(graph, candidate).items() if ran == "int8"}
        kernels = {layer: node for layer, node in self._kernels(graph, candidate).items() if layer in static}
        return GlueCheck(conversions, _chains(graph, kernels))

    def layer_latency(self, candidate: Candidate, feeds: Feeds, threads: int, runs: int = 20) -> dict[str, float]:
        options = self._options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(candidate.path.with_name("profile"))
        session = ort.InferenceSession(str(candidate.path), options, providers=["CPUExecutionProvider"])
        warmup = 5
        for _ in range(warmup + runs):
            session.run(None, feeds)
        durations: dict[str, list[tuple[int, int]]] = {}
        for event in json.loads(Path(session.end_profiling()).read_text()):
            name = event.get("name", "")
            if event.get("cat") == "Node" and name.endswith("_kernel_time"):
                durations.setdefault(name[: -len("_kernel_time")], []).append((event["ts"], event["dur"]))
        per_node = {n: float(np.mean([d for _, d in sorted(v)[warmup:]])) / 1e3 for n, v in durations.items()}
        return _attribute(candidate.extra["graph"], candidate.extra["regions"], per_node,
                          list(candidate.extra["layers"]))

    def export(self, candidate: Candidate, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(candidate.path, path)
        return path


_REGIONS: dict[tuple[str, str], Regions] = {}
WEIGHT_BIAS_QUANTIZED = ("Conv", "ConvTranspose", "Gemm")  # ORT int8s these between a DQ and a Q by itself


def _keep_float(path: Path, float_layers: list[str]) -> None:
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


def _chains(graph: onnx.GraphProto, kernels: dict[str, onnx.NodeProto | None]) -> list[list[str]]:
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


def _attribute(model: onnx.GraphProto, regions: Regions, per_node: dict[str, float],
               layers: list[str]) -> dict[str, float]:
    """Per-layer ms from ORT's per-node profile: each event is traced back to a node of the model (ORT names
    fused kernels `<node>_token_<n>`, `fused <node>`, `<node>_quant`, NCHWc kernels `<output tensor>_nchwc`,
    quantize/dequantize nodes `<tensor>_QuantizeLinear`) and its time goes to the layers whose region holds that
    node, in equal shares; a quantize/dequantize goes with the tensor's producer (or its consumers' layers)."""
    producer = {out: node.name for node in model.node for out in node.output}
    consumers: dict[str, list[str]] = {}
    for node in model.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
    owners: dict[str, set[str]] = {layer: {layer} for layer in layers}
    for node, holders in regions.owners.items():
        owners[node] = set(holders)

    def holders(event: str) -> set[str]:
        name = event.removeprefix("fused ").split("_token_")[0].removesuffix("_quant")
        if name in owners:
            return owners[name]
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
