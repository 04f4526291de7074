"""OpenVINO on the CPU: per-layer static int8 through `nncf.quantize` with every float layer in its ignored scope
(NNCF places quantizers by region for OpenVINO's CPU plugin; its transformer preset where the model has attention
MatMuls), the other layers in the model-wide float precision.

Why NNCF and not the region graph the ONNX Runtime backend builds: measured on an AVX512-VNNI/BF16 EPYC with the
PaddleOCR detector, all layers int8, each timed against OpenVINO f32 in alternating rounds, OpenVINO ran ORT's U8S8
region QDQ graph at 1.55x (cosine 0.921) and NNCF's at 1.99x (cosine 0.984) in one run, 0.77x (0.964) against
1.94x (0.984) in another. The price: NNCF collects its own statistics on the run's cached calibration samples at
every build (about 6 s for that model).

OpenVINO honours no per-node float precision: the `inference_precision` option (`f32` or `bf16`) applies to
every float layer. bf16 is offered only where the CPU has native bf16 (OPTIMIZATION_CAPABILITIES lists BF16);
elsewhere the plugin would silently run f32. What each layer really ran in is read from the compiled model's
runtime graph (`runtimePrecision` of the kernels that carry the layer's name).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import openvino as ov

from autoq.backends.base import Backend, Candidate, Feeds, GlueCheck, Outputs, Recipe, state_of
from autoq.backends.openvino.nncf_build import (
    MODES,
    PRESET,
    SMOOTH_QUANT,
    WEIGHT_LABELS,
    WEIGHT_ROUNDINGS,
    compress_layers,
    has_attention,
    owns,
    quantize_int8,
    stored_weight_type,
)
from autoq.backends.openvino.runtime import FUSED_KERNELS, INTEGER, layer_kernels, table_type
from autoq.calibrate import Calibration
from autoq.graph import Layer, OnnxModel, save_onnx, tied_tables, weight_array
from autoq.precision import Assignment, Kind, Precision
from autoq.quantsim import kmeans_codebook
from autoq.recovery.rounding import is_learned, substitute

FLOAT_OPTION = "inference_precision"
FOLDED = ("Mul", "Add", "BatchNormalization")  # per-channel ops with constants OpenVINO folds into a kernel
MODEL_KERNELS_ONNX = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # the ONNX layers OpenVINO runs as kernels
SHAPES = "shapes"  # option: `static` compiles for the data's sample shape at batch 1 (larger batches run sample by
# sample), `dynamic` keeps the model's symbolic dimensions

@dataclass
class OpenVinoState:
    """What an OpenVINO candidate keeps: each layer's op names, its tables, and its compilations."""

    names: dict[str, set[str]] = field(default_factory=dict)  # layer -> the ONNX names its kernel may carry
    tables: list[str] = field(default_factory=list)  # embedding Gathers: no weighted kernel to read
    compiled: dict[tuple[int, bool], ov.CompiledModel] = field(default_factory=dict)  # by (threads, profiled)
    feeding: dict[str, set[str]] = field(default_factory=dict)  # layer -> the layers feeding it through glue alone


class OpenVinoBackend(Backend):
    name = "openvino"
    probed_kinds = (Kind.STATIC,)  # NNCF leaves the layers of its ignored patterns (SE blocks) float
    default_space = "openvino-cpu"
    search_settings = deployed_settings = "one stream, the LATENCY hint"
    deployed_instances = 3  # two compilations of one model can time several percent apart: verify times three
    # the float precision and the shapes change every build: the glue between int8 or compressed layers runs in the
    # model-wide float too (an int8 CNN can run faster with the f32 hint than with bf16), and static shapes
    # plan every kernel
    option_kinds = {FLOAT_OPTION: ("float", "static", "weight-only"), SHAPES: ("float", "static", "weight-only"),
                    PRESET: ("static",), SMOOTH_QUANT: ("static",)}
    option_values = {FLOAT_OPTION: ("bf16", "f32"), PRESET: ("asym", "sym"),
                     SMOOTH_QUANT: ("default", True, False, "on", "off"), SHAPES: ("static", "dynamic")}

    def __init__(self) -> None:
        self.core = ov.Core()
        self.native_bf16 = "BF16" in self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        self._converted: tuple[tuple, ov.Model] | None = None  # the last model read: (file stamp, its graph)

    def converted(self, path: Path) -> ov.Model:
        """`path` converted to an OpenVINO model: a copy of the one read last (its constants shared, never
        changed: NNCF replaces them), so a trial does not convert SmolLM2 again (3 s of a 15 s build)."""
        stat = path.stat()
        stamp = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        if self._converted is None or self._converted[0] != stamp:
            self._converted = stamp, ov.convert_model(str(path))
        return self._converted[1].clone()

    builds = {Kind.FLOAT: (32,), Kind.STATIC: (8,), Kind.WEIGHT_ONLY: (2, 3, 4, 8)}
    elements = ("int", "nf", "cb", "km", "fp")
    llm_space, llm_exporter = "llm-openvino", "torch"  # standard ONNX ops: OpenVINO reads no GenAI contrib op
    unbuilt = {Kind.FLOAT: "OpenVINO's float precision is model-wide (per-node marks are not honoured): use the "
                           f"`{FLOAT_OPTION}` option",
               Kind.DYNAMIC: "OpenVINO's CPU plugin has no dynamic int8 layer"}

    def refuses(self, precision: Precision) -> str | None:
        if precision.kind == Kind.FLOAT:
            return None
        if precision.kind == Kind.STATIC:
            return None if str(replace(precision, rounding="rtn")) == "int8" else (
                "NNCF calibrates and sets activation symmetry per model: use the `activations` option (asym | sym)")
        if precision.rounding not in WEIGHT_ROUNDINGS or precision.accuracy_level:
            return (f"NNCF weight compression rounds {', '.join(WEIGHT_ROUNDINGS)} (se: scale estimation); accuracy "
                    "levels are ORT's")
        if precision.rounding != "rtn" and precision.bits != 4:
            return "NNCF's AWQ, scale estimation and GPTQ are for 4-bit weights"
        if precision.element == "int" and precision.bits == 8 and precision.granularity != "channel":
            return "NNCF compresses 8-bit weights per channel (w8, w8-asym)"
        if precision.element == "int" and precision.bits < 4 and not precision.symmetric:
            return "NNCF's 3- and 2-bit weights are symmetric"
        return None

    def lacks(self, precision: Precision) -> str | None:
        """A weight format (beyond int4/int8) whose weights this machine's CPU plugin decompresses when it compiles
        (probed once per format: `stored_weight_type`): the file is smaller, the run is the float model's."""
        if precision.kind != Kind.WEIGHT_ONLY or (precision.element, precision.bits) not in MODES:
            return None
        found = stored_weight_type(replace(precision, rounding="rtn"))
        if WEIGHT_LABELS.get(found) == precision.weight_label:
            return None
        return (f"OpenVINO's CPU plugin here decompresses {precision.weight_label} weights when it compiles (its "
                f"matmul reads {found}): no {precision.weight_label} kernel would run")

    def options(self, requested: dict[str, list]) -> dict[str, list]:
        requested = super().options(requested)
        floats = requested.get(FLOAT_OPTION)
        if not floats or "bf16" not in floats or self.native_bf16:
            return requested
        kept = [f for f in floats if f != "bf16"] or ["f32"]
        print("autoq: this CPU has no native bf16 (OpenVINO would run it as f32): the float precision is f32",
              file=sys.stderr)
        return {**requested, FLOAT_OPTION: kept}

    def fits(self, layer: Layer, precision: Precision) -> bool:
        """Weight-only on 2-D MatMul/Gemm weights and embedding tables, its groups dividing the input channels (a
        Gemm's may be either dimension, a table's are its columns); int8 on every weighted op but tables."""
        if precision.kind != Kind.WEIGHT_ONLY:
            return super().fits(layer, precision)
        if layer.op_type == "Gather" and (precision.element != "int" or precision.bits < 4):
            return False  # tables: 4- and 8-bit integers (what the plugin's Gather is known to read)
        inputs = {"MatMul": layer.weight_shape[:1], "Gather": layer.weight_shape[1:]}.get(layer.op_type,
                                                                                            layer.weight_shape)
        return layer.op_type in ("MatMul", "Gemm", "Gather") and len(layer.weight_shape) == 2 and all(
            d % (precision.group or 1) == 0 for d in inputs)

    def tied_tables(self, model: OnnxModel) -> dict[str, str]:
        """A table tied to the LM head: OpenVINO keeps one constant for the two (SmolLM2's IR holds 135M weights,
        not the ONNX file's 163M with the transposed copy) and NNCF compresses it once where both take the same
        spec; in different specs each is stored (SmolLM2: 28 MB more)."""
        return tied_tables(model.proto)

    def expected(self, assignment: Assignment) -> dict[str, str]:
        floating = "bf16" if assignment.options.get(FLOAT_OPTION) == "bf16" else "fp32"
        return {n: floating if p == "fp32" else p for n, p in assignment.layers.items()}

    def build(self, model: OnnxModel, assignment: Assignment, calibration: Calibration, workdir: Path) -> Candidate:
        specs = assignment.specs()
        if any(is_learned(spec, self.learned_roundings) for spec in specs.values()):  # weights already on their grid
            proto = onnx.ModelProto()
            proto.CopyFrom(model.proto)
            substitute(proto, model, specs, calibration, self.learned_roundings)
            workdir.mkdir(parents=True, exist_ok=True)
            ov_model = ov.convert_model(str(save_onnx(proto, workdir / "learned.onnx")))
        else:
            ov_model = self.converted(model.path)
        if assignment.options.get(SHAPES) == "static":
            ov_model.reshape(_sample_shapes(ov_model, calibration.samples()))
        names = _layer_names(model)
        if any(spec.kind == Kind.STATIC for spec in specs.values()):
            floating = {n: names[n] for n, spec in specs.items() if spec.kind != Kind.STATIC}
            ov_model = quantize_int8(ov_model, floating, calibration.samples(),
                                     has_attention(model), assignment.options)
        for spec in dict.fromkeys(s for s in assignment.specs().values() if s.kind == Kind.WEIGHT_ONLY):
            chosen = [n for n, s in assignment.specs().items() if s == spec]
            dataset = calibration.samples() if spec.rounding != "rtn" else None
            codebooks = {layer.name: kmeans_codebook(weight_array(model.proto, layer.weight), layer.channel_axis,
                                                     spec.group) for layer in model.layers
                         if layer.name in chosen and spec.element == "km"}
            ov_model = compress_layers(ov_model, {n: names[n] for n in chosen}, spec, dataset, codebooks)
        xml = workdir / "model.xml"
        workdir.mkdir(parents=True, exist_ok=True)
        ov.save_model(ov_model, str(xml), compress_to_fp16=False)
        size = xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
        tables = [la.name for la in model.layers if la.op_type not in MODEL_KERNELS_ONNX]
        return Candidate(assignment, xml, size, OpenVinoState(_layer_names(model), tables,
                                                              feeding=_feeding_layers(model)))

    def _compile(self, candidate: Candidate, threads: int, profile: bool = False) -> ov.CompiledModel:
        compiled = state_of(candidate, OpenVinoState).compiled
        if (threads, profile) not in compiled:
            config = {"INFERENCE_PRECISION_HINT": str(candidate.assignment.options.get(FLOAT_OPTION, "f32")),
                      "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                      "PERF_COUNT": profile}
            compiled[threads, profile] = self.core.compile_model(str(candidate.path), "CPU", config)
        return compiled[threads, profile]

    def _any_compiled(self, candidate: Candidate) -> ov.CompiledModel:
        """One compilation of the candidate (the runtime graph is the same at any thread count)."""
        return next(iter(state_of(candidate, OpenVinoState).compiled.values()), None) or self._compile(candidate, 1)

    def runner(self, candidate: Candidate, threads: int) -> Callable[[Feeds], Outputs]:
        compiled = self._compile(candidate, threads)
        request = compiled.create_infer_request()
        outputs = len(request.model_outputs)
        one_by_one = all(i.get_partial_shape().is_static and i.get_shape()[0] == 1 for i in compiled.inputs)

        def run(feeds: Feeds) -> Outputs:
            count = len(next(iter(feeds.values())))
            if one_by_one and count > 1:  # compiled for one sample (`shapes: static`): run the batch sample by sample
                parts = [run({k: v[i:i + 1] for k, v in feeds.items()}) for i in range(count)]
                return [np.concatenate([p[o] for p in parts]) for o in range(outputs)]
            request.infer(feeds)
            return [request.get_output_tensor(i).data.copy() for i in range(outputs)]

        return run

    def executed(self, candidate: Candidate) -> dict[str, str]:
        kernels = layer_kernels(self._any_compiled(candidate))
        fused = {op.get_friendly_name() for op in self._any_compiled(candidate).get_runtime_model().get_ordered_ops()
                 if str(op.get_rt_info()["layerType"].astype(str)) in FUSED_KERNELS}
        asked = candidate.assignment.specs()
        result = {}
        state = state_of(candidate, OpenVinoState)
        for layer, names in state.names.items():
            ran = {precision for _, precision, original in kernels if owns(layer, names, original)}
            if not ran:  # an MLP fused into one kernel (AMX's LLMMLP) named after its down projection alone
                ran = {precision for op, precision, original in kernels if op in fused and any(
                    layer in state.feeding.get(other, ()) and owns(other, state.names[other], original)
                    for other in state.names)}
            found = ran.pop() if len(ran) == 1 else ("/".join(sorted(ran)) or "not found")
            spec = asked.get(layer)
            if layer in state.tables:  # an embedding Gather: its weight's type, else the model's float
                found = table_type(self._any_compiled(candidate), layer, names) or self.expected(
                    candidate.assignment)[layer]
            same_kernel = spec is not None and found == ("int8" if spec.kind == Kind.STATIC else spec.weight_label)
            result[layer] = str(spec) if same_kernel else found  # groups and rounding are not kernel properties
        return result

    def glue_check(self, candidate: Candidate) -> GlueCheck:
        """From the runtime model: quantize kernels fed by a float op (float -> int8), float kernels fed by an
        int8 tensor (int8 -> float), and the int8 layers grouped by the integer chain they run in."""
        compiled = self._any_compiled(candidate)
        ops = compiled.get_runtime_model().get_ordered_ops()
        info = {op.get_friendly_name(): op.get_rt_info() for op in ops}

        def kind(name: str) -> str:
            return str(info[name]["layerType"].astype(str))

        def integer_out(name: str) -> bool:
            return set(str(info[name]["outputPrecisions"].astype(str)).split(",")) <= INTEGER

        conversions, parent = [], {name: name for name in info}

        def root(name: str) -> str:
            while parent[name] != name:
                parent[name] = parent[parent[name]]
                name = parent[name]
            return name

        for op in ops:
            name = op.get_friendly_name()
            sources = [i.get_source_output().get_node().get_friendly_name() for i in op.inputs()]
            data = [s for s in sources if kind(s) != "Const"]
            if kind(name) == "FakeQuantize" and integer_out(name) and data and kind(data[0]) != "Input" \
                    and not integer_out(data[0]):
                conversions.append(f"{data[0]} -> int8")
            elif kind(name) not in ("Output", "Reorder", "Reshape") and not integer_out(name) and any(
                    integer_out(s) for s in data):
                conversions.append(f"{name} <- float")
            for source in data:
                if integer_out(source):
                    parent[root(name)] = root(source)
        groups: dict[str, list[str]] = {}
        int8_kernels = [(op, original) for op, precision, original in layer_kernels(compiled) if precision == "int8"]
        for layer, names in state_of(candidate, OpenVinoState).names.items():
            kernels = [op for op, original in int8_kernels if owns(layer, names, original)]
            if kernels:
                groups.setdefault(root(kernels[0]), []).append(layer)
        return GlueCheck(conversions, list(groups.values()))

    def layer_latency(self, candidate: Candidate, feeds: Feeds, threads: int, runs: int = 20) -> dict[str, float]:
        compiled = self._compile(candidate, threads, profile=True)
        request = compiled.create_infer_request()
        for _ in range(5):
            request.infer(feeds)
        totals: dict[str, float] = {}
        for _ in range(runs):
            request.infer(feeds)
            for info in request.profiling_info:
                totals[info.node_name] = totals.get(info.node_name, 0.0) + info.real_time.total_seconds() * 1e3 / runs
        kernels = layer_kernels(compiled)
        return {layer: float(np.sum([totals.get(op, 0.0) for op, _, original in kernels
                                     if owns(layer, names, original)]))
                for layer, names in state_of(candidate, OpenVinoState).names.items()}

    def recipes(self, model: OnnxModel) -> list[Recipe]:
        from autoq.backends.openvino.recipes import recipes

        return recipes(self, model, self.native_bf16)

    def export(self, candidate: Candidate, path: Path) -> Path:
        """OpenVINO IR (.xml + .bin) beside `path`, ready for `ov.Core().compile_model`."""
        xml = path.with_suffix(".xml")
        xml.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(candidate.path, xml)
        shutil.copyfile(candidate.path.with_suffix(".bin"), xml.with_suffix(".bin"))
        return xml


def _layer_names(model: OnnxModel) -> dict[str, set[str]]:
    """Layer -> the names OpenVINO may give its kernel: the ONNX node's, its output tensor's (a graph output
    keeps the tensor's name), and those of the bias Add and of the per-channel Mul/Add/BatchNormalization with
    constants it folds into the kernel (a Paddle-exported BatchNorm: the fused kernel then keeps only their names)."""
    consumers: dict[str, list] = {}
    for node in model.proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    nodes = {node.name: node for node in model.proto.graph.node}
    constants = {t.name for t in model.proto.graph.initializer}
    names = {}
    for layer in model.layers:
        output = nodes[layer.name].output[0]
        found = {layer.name, output}
        found |= {a.name for a in consumers.get(output, []) if a.op_type == "Add"}
        for _ in range(3):  # e.g. bias, scale, shift
            folded = [c for c in consumers.get(output, []) if c.op_type in FOLDED
                      and sum(i not in constants for i in c.input) == 1]
            if len(folded) != 1:
                break
            output = folded[0].output[0]
            found |= {folded[0].name, output}
        names[layer.name] = found
    return names


def _sample_shapes(ov_model: ov.Model, arrays: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """Input -> its static shape: the model's own fixed dimensions, the others from one calibration sample."""
    shapes = {}
    for port in ov_model.inputs:
        name = port.get_any_name()
        sample = [1, *arrays[name].shape[1:]]
        shapes[name] = [d.get_length() if d.is_static else s for d, s in
                        zip(port.get_partial_shape(), sample, strict=True)]
    return shapes






def _feeding_layers(model: OnnxModel) -> dict[str, set[str]]:
    """Layer -> the layers whose outputs reach its input through at most four glue ops (an MLP's gate and up
    projections for its down projection), the layers a fused MLP kernel named after it also computes."""
    producer = {out: node for node in model.proto.graph.node for out in node.output}
    layers = set(model.layer_names)
    feeding: dict[str, set[str]] = {}
    for node in model.proto.graph.node:
        if node.name not in layers:
            continue
        found, frontier = set(), [(node.input[0], 0)]
        while frontier:
            tensor, hops = frontier.pop()
            source = producer.get(tensor)
            if source is None or hops > 4:
                continue
            if source.name in layers:
                found.add(source.name)
            else:
                frontier += [(name, hops + 1) for name in source.input if name]
        feeding[node.name] = found
    return feeding
