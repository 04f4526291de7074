"""ONNX Runtime: per-layer static int8 as U8S8 QDQ (the integer kernels this CPU runs), fp32 otherwise."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from autoq.backends.base import Backend, Candidate, Feeds, Outputs
from autoq.graph import LAYER_OPS, OnnxModel
from autoq.precision import Assignment

# Ops that run integer kernels after ORT fuses QDQ groups; any other op on a layer computes in float.
INTEGER_OPS = {"QLinearMatMul", "QLinearConv", "QLinearConvTranspose", "MatMulInteger", "MatMulIntegerToFloat",
               "ConvInteger", "QGemm", "DynamicQuantizeMatMul", "QAttention"}
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
        return {"fp32", "int8"}

    def build(self, model: OnnxModel, assignment: Assignment, calibration: Path, workdir: Path) -> Candidate:
        workdir.mkdir(parents=True, exist_ok=True)
        out = workdir / "model.onnx"
        int8 = [name for name, precision in assignment.layers.items() if precision == "int8"]
        if not int8:  # quantize_static treats an empty node list as "all nodes"
            shutil.copyfile(model.path, out)
        else:
            with _quiet_root_logger():
                quantize_static(
                    model.path, out, None, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(LAYER_OPS),
                    per_channel=True, reduce_range=bool(assignment.options.get("reduce_range", False)),
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=int8,
                    calibration_cache_path=calibration)
        return Candidate(assignment, out, out.stat().st_size, {"layers": {layer.name: layer.weight
                                                                            for layer in model.layers}})

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

    def executed(self, candidate: Candidate) -> dict[str, str]:
        optimized = candidate.path.with_name(OPTIMIZED)
        if not optimized.is_file():
            self._session(candidate, 1)
        graph = onnx.load(str(optimized), load_external_data=False).graph
        consumers: dict[str, set[str]] = {}
        for node in graph.node:
            for name in [*node.input, f"@{node.name}"]:
                consumers.setdefault(name, set()).add(node.op_type)
        # A layer ran int8 only if an integer kernel consumes its (quantized) weight or carries its name;
        # a DequantizeLinear left in front of a float op means the int8 was simulated: fp32.
        result = {}
        for layer, weight in candidate.extra["layers"].items():
            ops = consumers.get(f"{weight}_quantized", set()) | consumers.get(weight, set()) | consumers.get(
                f"@{layer}", set())
            result[layer] = "int8" if ops & INTEGER_OPS else "fp32"
        return result

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
        return _attribute(onnx.load(str(candidate.path), load_external_data=False).graph, per_node,
                          list(candidate.extra["layers"]))

    def export(self, candidate: Candidate, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(candidate.path, path)
        return path


def _attribute(graph: onnx.GraphProto, per_node: dict[str, float], layers: list[str]) -> dict[str, float]:
    """Per-layer ms from per-node ms: the layer's node (as ORT renamed it), the quantize/dequantize of its
    output, and an equal share of the quantize of its input (shared by layers reading the same tensor)."""
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    nodes = {node.name: node for node in graph.node}
    result = {}
    for layer in layers:
        node = nodes[layer]
        own = [layer, f"fused {layer}", f"{node.output[0]}_QuantizeLinear", f"{node.output[0]}_DequantizeLinear"]
        total = sum(per_node.get(n, 0.0) for n in own)
        total += sum(v for n, v in per_node.items() if n.startswith(f"{layer}_token_"))
        dequantize = producer.get(node.input[0])
        if dequantize is not None and dequantize.op_type == "DequantizeLinear":
            quantize = producer.get(dequantize.input[0])
            if quantize is not None and quantize.op_type == "QuantizeLinear":
                total += per_node.get(quantize.name, 0.0) / max(1, consumers.get(quantize.output[0], 1))
        result[layer] = total
    return result
