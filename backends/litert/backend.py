"""LiteRT (TensorFlow Lite) on the CPU through XNNPACK, per layer, from the user's torch module.

The module is converted once by `litert-torch` (`model.float_model`); each assignment is built by AI Edge
Quantizer from a per-op recipe, one rule per layer naming that layer's op by its output tensor: `int8` (static:
int8 activations calibrated on the run's samples, int8 weights per channel), `int8-dyn` / `int8-dyn-pc` (int8
weights per tensor / channel, activations quantized at run time; `int4-dyn-pc` with int4 weights per channel, XNNPACK's
qd8-f32-qc4w, on fully connected ops), `w8` / `w4` (weights stored in int8 / int4 and
dequantized to float; `w4` on fully connected ops; `w8` on an embedding table: int8 rows the lookup reads). The
model-wide option `glue` decides the ops between the layers:
`int8` quantizes every other op the quantizer supports statically too (as its `static_wi8_ai8` recipe does), so a
chain of int8 layers runs without float round trips, except the ops XNNPACK does not run in int8 (`FLOAT_GLUE`);
`float` leaves them in fp32. Inputs and outputs stay float.
What each layer ran in is read from the built flatbuffer (`model.layer_ops`). Timing runs the interpreter with
XNNPACK and the run's threads, one sample per call; it has no per-op profiler from Python, so per-layer latency
is not measured (the cost model estimates it from the whole-model timings).
"""

from __future__ import annotations

import hashlib
import pickle
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from autoq.backends.base import Backend, Candidate, Feeds, Outputs, Recipe, state_of
from autoq.backends.litert import learned
from autoq.backends.litert.model import (
    LOOKUP,
    SIGNATURE,
    Op,
    float_model,
    interpreter,
    layer_ops,
    pt2e_model,
    quiet,
    ran_as,
    scope,
    torch_module,
    weight_sizes,
)
from autoq.calibrate import Calibration
from autoq.errors import AutoqError
from autoq.graph import InputSpec, Layer, OnnxModel
from autoq.precision import Assignment, Kind, Precision

GLUE = "glue"
# glue XNNPACK leaves to TFLite's reference kernels in int8, splitting the delegated graph: kept float. Measured on
# PaddleOCR's text-direction classifier (18 HARD_SWISH), all layers int8, side by side with FP32 (AMD EPYC, 2
# threads): int8 HARD_SWISH 0.25x FP32's speed (20 delegate partitions), float HARD_SWISH 1.09x.
FLOAT_GLUE = ("HARD_SWISH",)
SPECS = ("fp32", "int8", "int8-adaround", "int8-dyn", "int8-dyn-pc", "int4-dyn-pc", "w8", "w4")
_QSVS: dict[tuple[str, str], dict] = {}  # (float model, calibration) -> the quantizer's tensor statistics
_SOURCE_OPS: dict[tuple[str, int], dict[str, Op]] = {}  # (float model, its mtime) -> layer -> op


@dataclass
class LiteRtState:
    """An interpreter-ready build: the inputs in model order (none known: a file `autoq verify` times, fed in the
    order of its feeds) and the layers' scopes."""

    inputs: list[InputSpec] = field(default_factory=list)
    scopes: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # layer -> its weight's element count


def _ordered(names: list[str]) -> list[str]:
    """Signature names (`args_0`, `args_1`, ..., `output_0`, ...) in their numeric order."""
    return sorted(names, key=lambda n: (len(n), n))


def _quantizer_of(detail: dict) -> Callable[[np.ndarray, bool], np.ndarray]:
    """How to feed (True) or read (False) a signature tensor: cast to its type; a quantized one (AI Edge
    Quantizer's static recipe makes int8 I/O) quantized in, dequantized out with its scale and zero point."""
    scales, zeros = detail["quantization_parameters"]["scales"], detail["quantization_parameters"]["zero_points"]
    dtype = np.dtype(detail["dtype"])
    if len(scales) != 1:  # not quantized: fed in its type (token ids as int32), read as float
        return lambda x, feeding: x.astype(dtype) if feeding else x.astype(np.float32)
    scale, zero, info = float(scales[0]), int(zeros[0]), np.iinfo(dtype)

    def convert(x: np.ndarray, feeding: bool) -> np.ndarray:
        if feeding:
            return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)
        return ((x.astype(np.float32) - zero) * scale).astype(np.float32)
    return convert


class LiteRtBackend(Backend):
    name = "litert"
    default_space = "litert-cpu"
    search_settings = deployed_settings = "LiteRT interpreter, XNNPACK, the run's threads, batch 1"
    option_values = {GLUE: ("int8", "float")}
    option_kinds = {GLUE: ("static",)}
    builds = {Kind.FLOAT: (32,), Kind.STATIC: (8,), Kind.DYNAMIC: (8, 4), Kind.WEIGHT_ONLY: (8, 4)}
    unbuilt = {Kind.FLOAT: "the litert backend builds fp32 floats (XNNPACK computes fp16/bf16 weights in fp32 on "
                           "x86: no faster; w8 is smaller)"}
    takes_module = True

    def refuses(self, precision: Precision) -> str | None:
        if str(precision) in SPECS:
            return None
        return f"the litert backend builds {', '.join(SPECS)} (AI Edge Quantizer's per-op configs)"

    def fits(self, layer: Layer, precision: Precision) -> bool:
        if layer.op_type == "Gather":  # an embedding table: int8 rows read by EMBEDDING_LOOKUP, unless the
            # conversion folds the lookup into a constant (positions), which leaves no op to quantize
            return precision.kind == Kind.FLOAT or (str(precision) == "w8" and not layer.constant_lookup)
        if precision.bits == 4:
            return layer.op_type in ("Gemm", "MatMul")  # no int4 depthwise or conv kernels
        return layer.op_type in ("Conv", "Gemm", "MatMul") or precision.kind == Kind.FLOAT

    def _scopes(self, model: OnnxModel) -> dict[str, str]:
        module, paths = torch_module(model)
        return {layer: scope(module, path) for layer, path in paths.items()}

    def _qsvs(self, source: Path, calibration: Calibration, inputs: list[InputSpec]) -> dict:
        """Every tensor's statistics on the calibration samples (one sample per call, as deployed; `inputs` in the
        model's order, as the signature numbers them), computed once per model and calibration and cached beside
        the calibration."""
        key = (str(source), str(calibration.path))
        if key not in _QSVS:
            cached = calibration.derived(f"litert-{source.stem}.pkl")
            if cached.is_file():
                _QSVS[key] = pickle.loads(cached.read_bytes())
            else:
                from ai_edge_quantizer import quantizer, recipe

                made = quantizer.Quantizer(str(source))
                made.load_quantization_recipe(recipe.static_wi8_ai8())
                samples = calibration.samples()
                details = interpreter(source).get_signature_runner(SIGNATURE).get_input_details()
                names = _ordered(list(details))
                count = len(next(iter(samples.values())))
                feeds = [{signature: samples[spec.name][i:i + 1].astype(details[signature]["dtype"])
                          for signature, spec in zip(names, inputs, strict=True)} for i in range(count)]
                with quiet():
                    _QSVS[key] = made.calibrate({SIGNATURE: feeds}, num_threads=1)
                cached.write_bytes(pickle.dumps(_QSVS[key]))
        return _QSVS[key]

    def build(self, model: OnnxModel, assignment: Assignment, calibration: Calibration, workdir: Path) -> Candidate:
        from ai_edge_quantizer import algorithm_manager, quantizer, recipe
        from ai_edge_quantizer.qtyping import QuantGranularity, TFLOperationName

        source = float_model(model, calibration.samples(), calibration.folder)
        scopes = self._scopes(model)
        key = (str(source), source.stat().st_mtime_ns)
        if key not in _SOURCE_OPS:  # the float model's op map, read once per process
            _SOURCE_OPS[key] = layer_ops(source, scopes, weight_sizes(model))
        ops = _SOURCE_OPS[key]
        specs = {name: spec for name, spec in assignment.specs().items() if spec.fmt != "fp32"}
        missing = sorted(set(specs) - set(ops))
        if missing:
            raise AutoqError(f"no TFLite op carries the weights of {', '.join(missing[:3])} in litert-torch's "
                             "conversion: leave those layers fp32")
        workdir.mkdir(parents=True, exist_ok=True)
        out = workdir / "model.tflite"
        state = LiteRtState(list(model.inputs), scopes, weight_sizes(model))
        if not specs:
            shutil.copyfile(source, out)
            return Candidate(assignment, out, out.stat().st_size, state)
        fitted = workdir / "learned-fp32.tflite"  # the float model with the learned weights, for the quantizer
        layouts = learned.substitute(source, fitted, model, specs, calibration, ops)
        made = quantizer.Quantizer(str(fitted if layouts else source))
        static = any(spec.kind == Kind.STATIC for spec in specs.values())
        if static and assignment.options.get(GLUE, "int8") == "int8":
            made.load_quantization_recipe(recipe.static_wi8_ai8())
            kept = [TFLOperationName.INPUT, TFLOperationName.OUTPUT, *map(TFLOperationName, FLOAT_GLUE)]
            for op_name in kept:  # float I/O, and the glue XNNPACK runs only in float
                made.update_quantization_recipe(".*", op_name, None, algorithm_manager.AlgorithmName.NO_QUANTIZE)
        for layer, op in ops.items():
            spec, regex, kind = specs.get(layer), f"^{re.escape(op.output)};$", TFLOperationName(op.kind)
            if spec is None:
                made.update_quantization_recipe(regex, kind, None, algorithm_manager.AlgorithmName.NO_QUANTIZE)
            elif spec.kind == Kind.STATIC:
                made.add_static_config(regex, kind, 8, 8)
            elif spec.kind == Kind.DYNAMIC:
                made.add_dynamic_config(regex, kind, spec.bits, QuantGranularity.CHANNELWISE
                                        if spec.granularity == "channel" else QuantGranularity.TENSORWISE)
            elif op.kind == LOOKUP:  # the hybrid lookup reads int8 rows (one scale each): no float table made
                made.add_dynamic_config(regex, kind, 8, QuantGranularity.CHANNELWISE)
            else:
                made.add_weight_only_config(regex, kind, spec.bits)
        statistics = self._qsvs(source, calibration, list(model.inputs)) if made.need_calibration else None
        with quiet():
            result = made.quantize(statistics)
            result.export_model(str(out), overwrite=True)
        if layouts:
            fitted.unlink()
            learned.check(out, layouts, specs, calibration, ops)
        return Candidate(assignment, out, out.stat().st_size, state)

    def runner(self, candidate: Candidate, threads: int) -> Callable[[Feeds], Outputs]:
        state = state_of(candidate, LiteRtState)
        made = interpreter(candidate.path, threads)
        signature = made.get_signature_list()[SIGNATURE]  # type: ignore[attr-defined]
        inputs, outputs = _ordered(list(signature["inputs"])), _ordered(list(signature["outputs"]))
        run_one = made.get_signature_runner(SIGNATURE)  # type: ignore[attr-defined]
        known = [spec.name for spec in state.inputs]

        details = run_one.get_input_details()
        given = {sig: _quantizer_of(details[sig]) for sig in inputs}  # an int8 input is fed quantized
        taken = {sig: _quantizer_of(d) for sig, d in run_one.get_output_details().items()}

        def run(feeds: Feeds) -> Outputs:
            names = known or list(feeds)
            count = len(feeds[names[0]])
            results = [run_one(**{sig: given[sig](feeds[name][i:i + 1], True)
                                  for sig, name in zip(inputs, names, strict=True)}) for i in range(count)]
            return [taken[o](np.concatenate([r[o] for r in results]), False) for o in outputs]

        return run

    def executed(self, candidate: Candidate) -> dict[str, str]:
        """Each layer's spec as its op runs it; a learned spec where its kernel is its round-to-nearest form's (the
        build checked the learned integers)."""
        state = state_of(candidate, LiteRtState)
        ops = layer_ops(candidate.path, state.scopes, state.sizes)
        found = {layer: ran_as(ops[layer]) if layer in ops else "fp32" for layer in candidate.assignment.layers}
        for layer, spec in candidate.assignment.specs().items():
            if spec.rounding == "adaround" and found[layer] == str(replace(spec, rounding="rtn")):
                found[layer] = str(spec)
        return found

    def reference_model(self, run_dir: Path) -> Path:
        digest = hashlib.sha1((run_dir / "model.onnx").read_bytes()).hexdigest()[:12]
        found = sorted((run_dir / "cache").rglob(f"litert-fp32-{digest}.tflite"))
        if not found:
            raise AutoqError(f"{run_dir}/cache has no converted FP32 model: run the search there again")
        return found[0]

    def export(self, candidate: Candidate, path: Path) -> Path:
        target = path.with_suffix(".tflite")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(candidate.path, target)
        return target

    def recipes(self, model: OnnxModel) -> list[Recipe]:
        """AI Edge Quantizer's one-line recipes on the whole converted model: static int8 (its `static_wi8_ai8`,
        int8 I/O), dynamic int8 (`dynamic_wi8_afp32`) and weight-only int8 (`weight_only_wi8_afp32`); and
        litert-torch's own PT2E quantizer (symmetric, per-channel weights, int8 I/O)."""

        def whole(name: str) -> Callable[[OnnxModel, Calibration, Path], Candidate]:
            def build(m: OnnxModel, calibration: Calibration, workdir: Path) -> Candidate:
                from ai_edge_quantizer import quantizer, recipe

                source = float_model(m, calibration.samples(), calibration.folder)
                made = quantizer.Quantizer(str(source))
                made.load_quantization_recipe(getattr(recipe, name)())
                workdir.mkdir(parents=True, exist_ok=True)
                out = workdir / "model.tflite"
                with quiet():
                    result = made.quantize(self._qsvs(source, calibration, list(m.inputs)) if made.need_calibration
                                         else None)
                    result.export_model(str(out), overwrite=True)
                layers = {layer.name: "fp32" for layer in m.layers}
                return Candidate(Assignment(layers), out, out.stat().st_size, LiteRtState(list(m.inputs),
                                                                                         self._scopes(m),
                                                                                         weight_sizes(m)))
            return build

        def pt2e(m: OnnxModel, calibration: Calibration, workdir: Path) -> Candidate:
            workdir.mkdir(parents=True, exist_ok=True)
            out = pt2e_model(m, calibration.samples(), workdir / "model.tflite")
            return Candidate(Assignment({layer.name: "fp32" for layer in m.layers}), out, out.stat().st_size,
                             LiteRtState(list(m.inputs), self._scopes(m), weight_sizes(m)))

        def layout(linear: str) -> Callable[[OnnxModel], dict[str, str]]:
            """A whole-model recipe in autoq's specs, for the search to start from: `linear` on every Conv,
            Gemm and MatMul, a table the lookup reads int8 (a seed the space cannot express is skipped). autoq
            builds the dynamic layout to the recipe's own model; in the weight-only one autoq's lookup reads the
            table's int8 rows where the recipe dequantizes the table."""
            def layers(m: OnnxModel) -> dict[str, str]:
                return {la.name: "fp32" if la.op_type == "Gather" and la.constant_lookup else
                        "w8" if la.op_type == "Gather" else linear for la in m.layers}
            return layers

        return [Recipe("AI Edge Quantizer static_wi8_ai8", whole("static_wi8_ai8")),
                Recipe("AI Edge Quantizer dynamic_wi8_afp32", whole("dynamic_wi8_afp32"), layout("int8-dyn-pc")),
                Recipe("AI Edge Quantizer weight_only_wi8_afp32", whole("weight_only_wi8_afp32"), layout("w8")),
                Recipe("litert-torch PT2E int8 (per channel)", pt2e)]
