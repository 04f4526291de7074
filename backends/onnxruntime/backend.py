"""ONNX Runtime's CPU provider, per layer: static int8 as U8S8 QDQ (the integer kernels this CPU runs) with the
layer's calibration and activation symmetry; int8-dyn on MatMul (`quantize_dynamic` on those nodes alone: int8
weights per tensor or per channel, activations quantized at run time by DynamicQuantizeMatMul); weight-only int4/int8
in blocks (MatMulNBits, with its accuracy_level; embedding tables as GatherBlockQuantized, 4 bits); fp32 otherwise.
`backends/onnxruntime/quantize.py` applies ORT's quantizers per spec.

An int8 layer takes its region with it (`autoq.regions`): the glue after it runs in ORT's integer kernels
(QLinearAdd/Mul/Concat/Sigmoid/Softmax/GlobalAveragePool/MatMul...) or passes int8 through (MaxPool, Resize,
Reshape, Transpose...), and its Relu/Clip is absorbed into its output range, so consecutive int8 layers form
one integer chain. `glue_check` counts the float<->int8 conversions left in ORT's optimised graph.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from autoq.backends.base import (
    Backend,
    Candidate,
    Feeds,
    GlueCheck,
    Outputs,
    QuantizedForm,
    Recipe,
    TensorRange,
    state_of,
)
from autoq.backends.onnxruntime.bias import correct_biases
from autoq.backends.onnxruntime.graph import (
    INTEGER_OPS,
    PASS_THROUGH,
    QUANTIZE,
    attribute_profile,
    integer_chains,
    keep_float,
)
from autoq.backends.onnxruntime.learned import check_built, store_blocks
from autoq.backends.onnxruntime.quantize import (
    DYNAMIC_LAYERS,
    TABLE_ROUNDINGS,
    WEIGHT_ONLY_KERNELS,
    WEIGHT_ONLY_LAYERS,
    WEIGHT_ROUNDINGS,
    quantize_dynamic_layers,
    quantize_regions,
    quantize_weight_only,
    symmetric_inputs,
    weight_only_spec,
)
from autoq.backends.onnxruntime.smooth import smooth, smoothed
from autoq.backends.onnxruntime.tied import shares
from autoq.calibrate import Calibration
from autoq.fold import KEEP_LAYER_NAMES, constant_divisor, div_as_mul
from autoq.graph import Layer, OnnxModel, save_onnx, tied_tables
from autoq.precision import Assignment, Kind, Precision
from autoq.recovery.rounding import LEARNED, is_learned, substitute
from autoq.regions import REMOVABLE, Regions, find_regions

# Glue ORT's CPU provider runs on int8 (its QDQ selectors): integer kernels, and ops that pass int8 through.
INTEGER_GLUE = {"Add", "Mul", "Concat", "Sigmoid", "LeakyRelu", "Softmax", "AveragePool", "GlobalAveragePool",
                "MatMul", "Gemm", "Where"}
DYNAMIC_OPS = {"DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat"}  # int8-dyn when fed at run time
OPTIMIZED = "optimized.onnx"
BIAS_CORRECTION = "bias_correction"  # option
GLUE = "glue"  # option
UNFUSED = "int8-unfused"  # its value that also quantizes glue ORT would fuse into a float kernel


@dataclass
class OrtState:
    """What an ORT candidate keeps from its build: to find each layer's kernel and attribute profiled time."""

    weights: dict[str, str] = field(default_factory=dict)  # layer -> its weight initializer's name
    regions: Regions | None = None
    graph: onnx.GraphProto | None = None  # the FP32 model's graph


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    default_space = "cpu-int8"
    search_settings = "ORT sessions with thread spinning off (honest alternating rounds)"
    deployed_settings = "ORT's default sessions (thread spinning on)"
    # reduce_range: 7-bit weights (for CPUs without VNNI); bias_correction: each static int8 Conv/Gemm's bias
    # corrected for the mean shift its own rounding causes (`ort_bias.py`)
    # glue: `int8` runs each int8 layer's region in integer kernels, stopping at glue ORT fuses into a float
    # kernel (Gelu, SkipLayerNormalization, QuickGelu); `int8-unfused` goes through those fusions too (as
    # quantize_static on all op types: a CNN's SiLU as QLinearSigmoid and QLinearMul); `float` quantizes the
    # layers alone
    # (SmoothQuant is a per-layer spec, `int8-dyn-pc-sq0.7`: `ort_smooth.py`)
    option_values = {"reduce_range": (False, True), BIAS_CORRECTION: (True, False), GLUE: ("int8", UNFUSED, "float")}
    option_kinds = {"reduce_range": ("static",), BIAS_CORRECTION: ("static",), GLUE: ("static",)}

    builds = {Kind.FLOAT: (32,), Kind.STATIC: (8,), Kind.DYNAMIC: (8,), Kind.WEIGHT_ONLY: (2, 4, 8)}  # no 3-bit:
    # ORT's MatMulNBits quantizer packs 2, 4 or 8 bits
    llm_space = "llm-cpu"
    learned_roundings = LEARNED  # AdaRound, and GPTQ (autoq's, cached: ORT's own re-ran per build, measured worse)
    deployed_instances = 2  # two sessions of one file timed 2-4% apart, whichever was made second faster (MiniLM)
    unbuilt = {Kind.FLOAT: "ORT's CPU provider runs float layers in fp32 (use the openvino or torch backend for bf16)"}

    def refuses(self, precision: Precision) -> str | None:
        if precision.kind == Kind.WEIGHT_ONLY and precision.granularity != "group":
            return f"MatMulNBits quantizes in blocks: give a group size (e.g. w{precision.bits}g128)"
        if is_learned(precision, self.learned_roundings) and find_spec("torch") is None:
            return "learned rounding is fitted with torch: pip install 'autoq[torch]'"
        if precision.kind == Kind.WEIGHT_ONLY and precision.rounding not in WEIGHT_ROUNDINGS:
            offered = ", ".join(WEIGHT_ROUNDINGS)
            return f"{precision.rounding} is not offered on ORT (its weight-only roundings: {offered})"
        if precision.bits == 2 and precision.rounding != "rtn":
            return "ORT's 2-bit blocks are rounded to nearest (its HQQ, GPTQ, k-quant and learned forms are 4/8-bit)"
        if precision.rounding == "hqq" and (precision.bits != 4 or find_spec("torch") is None):
            return "ORT's HQQ quantizer is 4-bit and needs torch installed"
        return None

    def fits(self, layer: Layer, precision: Precision) -> bool:
        """No integer ConvTranspose on ORT's CPU provider (its QDQ would run as float); int8-dyn on MatMul;
        weight-only on 2-D MatMul weights (4/8 bits, any input width: SmolLM2's 576 takes blocks of 128; 4-bit
        k-quants an even number of blocks) and embedding tables (rounded without activations, in a spec a MatMul's
        weights can be gathered from: `ort_tied.shares`)."""
        if precision.kind == Kind.STATIC:
            return layer.op_type not in ("ConvTranspose", "Gather")
        if precision.kind == Kind.DYNAMIC:
            return layer.op_type in DYNAMIC_LAYERS
        if precision.kind == Kind.WEIGHT_ONLY:  # MatMulNBits pads its inputs to whole blocks (a table's columns: it
            inputs = layer.weight_shape[1 if layer.op_type == "Gather" else 0]  # is rounded as its transpose)
            blocks = -(-inputs // precision.group)
            return (len(layer.weight_shape) == 2 and precision.bits in WEIGHT_ONLY_LAYERS.get(layer.op_type, ())
                    and not (layer.op_type == "Gather" and (precision.rounding not in TABLE_ROUNDINGS
                                                            or not shares(precision, precision)))
                    # the k-quant packer stores two 4-bit zero points per byte along the blocks
                    and not (precision.rounding == "kquant" and precision.bits == 4 and blocks % 2))
        return precision.fmt == "fp32"

    def tied_tables(self, model: OnnxModel) -> dict[str, str]:
        return tied_tables(model.proto)

    def model_options(self, model: OnnxModel, options: dict[str, list]) -> dict[str, list]:
        """`glue: int8-unfused` only where ORT fuses some glue into a float kernel (else it builds as `int8`)."""
        if UNFUSED not in options.get(GLUE, ()):
            return options
        fused, layers = self._float_fusions(model), set(model.layer_names)  # a Gemm+Relu layer fuses too: not glue
        if any(node.op_type in INTEGER_GLUE and node.name in fused and node.name not in layers
               for node in model.proto.graph.node):
            return options
        return options | {GLUE: [value for value in options[GLUE] if value != UNFUSED]}

    def regions(self, model: OnnxModel, calibration: Calibration, unfused: bool = False) -> Regions:
        """The model's regions on ORT (computed once per model and calibration in each process); `unfused`:
        through the glue ORT fuses into float kernels too."""
        key = (str(model.path), str(calibration.path), unfused)
        if key not in _REGIONS:
            constants = {t.name: t for t in model.proto.graph.initializer}

            def int8_glue(node: onnx.NodeProto) -> bool:
                return (node.op_type in INTEGER_GLUE | PASS_THROUGH | set(REMOVABLE)
                        or constant_divisor(node, constants) is not None)

            _REGIONS[key] = find_regions(model.proto.graph, model.layer_names, int8_glue, calibration.resolution(),
                                         {} if unfused else self._float_fusions(model))
        return _REGIONS[key]

    def _float_fusions(self, model: OnnxModel) -> dict[str, str]:
        """Node -> the float kernel ORT fuses it into in the FP32 model (Gelu, SkipLayerNormalization...):
        the nodes missing from ORT's extended-level optimised graph, except the Relu/Clip int8 absorbs too (found
        once per model in each process: the options and the regions both read it)."""
        if str(model.path) in _FUSIONS:
            return _FUSIONS[str(model.path)]
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

        _FUSIONS[str(model.path)] = {node.name: kernel(node) for node in model.proto.graph.node
                                     if node.name not in kept and node.op_type not in REMOVABLE}
        return _FUSIONS[str(model.path)]

    def build(self, model: OnnxModel, assignment: Assignment, calibration: Calibration, workdir: Path) -> Candidate:
        workdir.mkdir(parents=True, exist_ok=True)
        out = workdir / "model.onnx"
        glue = assignment.options.get(GLUE, "int8")
        regions = self.regions(model, calibration, unfused=glue == UNFUSED)
        specs = assignment.specs()
        nodes = regions.int8_nodes(assignment, glue=glue != "float")
        learned = any(is_learned(spec, self.learned_roundings) for spec in specs.values())
        proto = model.proto
        if learned or nodes:  # a copy to change: learned weights put on their grid, Divs turned into Muls
            proto = onnx.ModelProto()
            proto.CopyFrom(model.proto)
            substitute(proto, model, specs, calibration, self.learned_roundings)
        if not nodes:  # quantize_static treats an empty node list as "all nodes"
            if learned:
                save_onnx(proto, out)
            else:
                shutil.copyfile(model.path, out)
        else:
            source = save_onnx(div_as_mul(proto, nodes), workdir / "source.onnx")
            quantize_regions(source, out, nodes, specs, calibration, bool(assignment.options.get("reduce_range")))
            source.unlink()
            keep_float(out, [name for name, spec in specs.items() if spec.kind != Kind.STATIC])
            if assignment.options.get(BIAS_CORRECTION):
                correct_biases(out, model, [n for n, s in specs.items() if s.kind == Kind.STATIC],
                               calibration.samples())
        smooth(out, model, {n: s.smooth for n, s in specs.items() if s.smooth}, calibration)
        quantize_dynamic_layers(out, specs)
        quantize_weight_only(out, specs)
        if learned:
            built = onnx.load(str(out))
            if store_blocks(built, model, specs, calibration):
                save_onnx(built, out)
            check_built(built, model, specs, calibration)
        return Candidate(assignment, out, out.stat().st_size,
                         OrtState({layer.name: layer.weight for layer in model.layers}, regions, model.proto.graph))

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

    def deployed_runner(self, candidate: Candidate, threads: int) -> Callable[[Feeds], Outputs]:
        """ORT's defaults but the thread count: spinning on, all graph optimisations."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        session = ort.InferenceSession(str(candidate.path), options, providers=["CPUExecutionProvider"])
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
        for layer, weight in state_of(candidate, OrtState).weights.items():
            names = [f"{weight}_quantized", *(f"{weight}_Q{b}" for b in (2, 4, 8)), weight, f"@{layer}",
                     *(f"@{layer}_Q{b}" for b in (2, 4, 8))]  # MatMulNBits' `_Q<bits>`; GPTQ renames weights
            found = [node for name in names for node in consumers.get(name, [])]
            result[layer] = next((n for n in found if n.op_type in INTEGER_OPS | set(WEIGHT_ONLY_KERNELS)),
                                 found[0] if found else None)
        return result

    def quantized_form(self, candidate: Candidate) -> QuantizedForm:
        """Each float tensor's QuantizeLinear in the built QDQ model, as the range quantize_static made it from
        (uint8: scale * (0 - zero, 255 - zero); symmetric where the layer's spec overrode it), and the static
        layers' biases as stored (bias correction's included: rebuilt without it, trained biases stay as trained)."""
        proto = onnx.load(str(candidate.path))
        stored = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        graph = state_of(candidate, OrtState).graph
        symmetric = symmetric_inputs(graph, candidate.assignment.specs())
        biases = {node.input[2] for node in graph.node if len(node.input) > 2 and node.input[2]}
        ranges: dict[str, TensorRange] = {}
        stored_biases: dict[str, np.ndarray] = {}
        for node in proto.graph.node:
            if node.op_type == "DequantizeLinear" and node.output[0] in biases and node.input[0] in stored:
                bias_zero = stored[node.input[2]] if len(node.input) > 2 else np.zeros(1)
                stored_biases[node.output[0]] = ((stored[node.input[0]].astype(np.float64) - bias_zero)
                                                 * stored[node.input[1]]).astype(np.float32)
            if node.op_type != "QuantizeLinear" or node.input[0] in stored or len(node.input) < 3:
                continue
            scale, zero = stored.get(node.input[1]), stored.get(node.input[2])
            if scale is None or zero is None or scale.size != 1 or zero.dtype != np.uint8:
                continue
            step, offset = float(scale), float(zero)
            tensor = node.input[0].removesuffix("_QuantizeLinear_Input")  # a graph output keeps its name after it
            if tensor in symmetric:
                ranges[tensor] = TensorRange(-127.5 * step, 127.5 * step, True)
            else:
                ranges[tensor] = TensorRange(-offset * step, (255 - offset) * step, False)
        return QuantizedForm(ranges, stored_biases, {BIAS_CORRECTION: False})

    def executed(self, candidate: Candidate) -> dict[str, str]:
        return self._executed(self._optimized(candidate), candidate)

    def _executed(self, graph: onnx.GraphProto, candidate: Candidate) -> dict[str, str]:
        # A layer ran int8 only if an integer kernel consumes its (quantized) weight or carries its name;
        # a DequantizeLinear left in front of a float op means the int8 was simulated: fp32. The calibration
        # and symmetry of a static layer are not kernel properties: its int8 kernel stands for the spec asked.
        producer = {out: node for node in graph.node for out in node.output}
        constants = {t.name: t for t in graph.initializer}
        asked = candidate.assignment.specs()
        result = {}
        for layer, node in self._kernels(graph, candidate).items():
            if node is not None and node.op_type in WEIGHT_ONLY_KERNELS:
                result[layer] = weight_only_spec(node, graph, asked.get(layer))
                continue
            if node is None or node.op_type not in INTEGER_OPS:
                result[layer] = "fp32"
                continue
            source = producer.get(node.input[0])
            at_run_time = node.op_type == "DynamicQuantizeMatMul" or (
                node.op_type in DYNAMIC_OPS and source is not None and source.op_type == "DynamicQuantizeLinear")
            if at_run_time:
                scale = constants.get(node.input[2 if node.op_type == "DynamicQuantizeMatMul" else 3])
                per_channel = scale is not None and int(np.prod(scale.dims)) > 1
                float_input = node.input[0] if node.op_type == "DynamicQuantizeMatMul" or source is None else \
                    source.input[0]
                result[layer] = ("int8-dyn-pc" if per_channel else "int8-dyn") + smoothed(producer.get(float_input))
            else:
                spec = asked.get(layer)
                result[layer] = str(spec) if spec is not None and spec.kind == Kind.STATIC else "int8"
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
        static = {layer for layer, ran in self._executed(graph, candidate).items()
                  if Precision.parse(ran).kind == Kind.STATIC}
        kernels = {layer: node for layer, node in self._kernels(graph, candidate).items() if layer in static}
        return GlueCheck(conversions, integer_chains(graph, kernels))

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
        state = state_of(candidate, OrtState)
        return attribute_profile(state.graph, state.regions, per_node, list(state.weights))

    def recipes(self, model: OnnxModel) -> list[Recipe]:
        from autoq.backends.onnxruntime.recipes import recipes

        return recipes(model)

    def export(self, candidate: Candidate, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(candidate.path, path)
        return path


_REGIONS: dict[tuple[str, str, bool], Regions] = {}
_FUSIONS: dict[str, dict[str, str]] = {}  # model path -> its float fusions
