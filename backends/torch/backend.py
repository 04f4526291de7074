"""PyTorch on the CPU, per module: `fp32`, `bf16` (the module's weights and arithmetic in bfloat16, cast at its
boundary), dynamic int8 on nn.Linear (activations quantized at run time) and `int8` (static: torchao PT2E with
`X86InductorQuantizer.set_module_name_qconfig`, calibrated on the cached calibration samples).

The model-wide option `compile` decides how the model runs: eagerly, or exported and compiled by inductor
(freezing on, one compile per input shape, inductor's FX graph cache reused across candidates). Each int8 kind
is built where it has a real kernel:
- `int8` only compiled (eagerly its quantize/dequantize pairs would run in fp32);
- `int8-dyn` (per-tensor weights) only eagerly, by torch.ao `quantize_dynamic` on that module alone
  (`quantized::linear_dynamic`); its packed weights do not export;
- `int8-dyn-pc` (per-channel weights) eagerly by torch.ao, compiled by torchao PT2E's dynamic config per module
  FQN, which inductor lowers to a oneDNN int8 linear.
torchao's own eager `Int8DynamicActivationInt8WeightConfig` measured 2.5x slower than torch.ao's kernel here
(README), so eager dynamic int8 stays on torch.ao.

Layers are the module FQNs of the user's code (the ONNX export names them so). What ran: eagerly, forward hooks
on one real inference record the module class that executed and the dtypes of its weight and input; compiled,
the converted graph says which layers carry int8 weights and the profiler must count as many oneDNN int8 kernel
calls (`onednn::qlinear_pointwise` / `qconv_pointwise`), or those layers are reported as fp32.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from autoq.backends.base import Backend, Candidate, Feeds, Outputs, Recipe, state_of
from autoq.calibrate import Calibration
from autoq.errors import AutoqError
from autoq.graph import InputSpec, OnnxModel
from autoq.precision import Assignment, Kind, Precision
from autoq.quiet import native_stderr_hushed


class _Bf16(torch.nn.Module):
    """Runs the wrapped module in bfloat16; float inputs are cast in, float outputs cast back to float32."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.inner = module.to(torch.bfloat16)

    def forward(self, *args):
        cast = [a.to(torch.bfloat16) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        out = self.inner(*cast)
        return out.float() if torch.is_tensor(out) and out.is_floating_point() else out


def _split(root: torch.nn.Module, fqn: str) -> tuple[torch.nn.Module, str]:
    parent, _, name = fqn.rpartition(".")
    return (root.get_submodule(parent) if parent else root), name


def apply(module: torch.nn.Module, assignment: Assignment) -> torch.nn.Module:
    """A copy of `module` with each layer (module FQN) in its assigned precision; the module itself is untouched.
    Load a front point's exported state dict into the result to get the deployed model back."""
    result = copy.deepcopy(module).eval()
    dynamic = {}
    for layer, precision in assignment.layers.items():
        fqn = layer.split("#")[0]  # a module called twice runs in one precision
        try:
            target = result.get_submodule(fqn)
        except AttributeError as exc:
            raise AutoqError(f"the module has no submodule '{fqn}' (assignment layer {layer})") from exc
        if precision == "bf16":
            parent, name = _split(result, fqn)
            setattr(parent, name, _Bf16(target))
        elif precision in DYNAMIC_QCONFIGS:
            if not isinstance(target, torch.nn.Linear):
                raise AutoqError(f"{precision} needs an nn.Linear; {fqn} is a {type(target).__name__}")
            dynamic[fqn] = getattr(torch.ao.quantization, DYNAMIC_QCONFIGS[precision])
        elif precision == "int8":
            raise AutoqError(f"{layer} is static int8, which needs calibration and compilation: build it with "
                             "autoq.backends.torch.compile_assignment(module, assignment, samples)")
        elif precision != "fp32":
            raise AutoqError(f"the torch backend cannot build {precision} (for {layer})")
    if dynamic:
        with warnings.catch_warnings():  # torch.ao eager quantization is deprecated in favour of torchao
            warnings.simplefilter("ignore")
            result = torch.ao.quantization.quantize_dynamic(result, qconfig_spec=dynamic, dtype=torch.qint8)
    return result


COMPILE_OPTION = "compile"
MODE_ONLY = {"int8": True, "int8-dyn": False}  # precision -> the only `compile` mode it has a real kernel in
DYNAMIC_QCONFIGS = {"int8-dyn": "default_dynamic_qconfig", "int8-dyn-pc": "per_channel_dynamic_qconfig"}
PT2E = {"int8": False, "int8-dyn-pc": True}  # what PT2E quantizes when compiled -> whether it is dynamic


def compile_assignment(module: torch.nn.Module, assignment: Assignment, samples: dict[str, np.ndarray],
                       names: list[str] | None = None) -> tuple[Callable, dict[str, str]]:
    """Export, quantize the `int8` / `int8-dyn-pc` layers with PT2E (calibrated on `samples`, arrays named as the
    forward's arguments, in `names` order) and compile with inductor. Returns the compiled callable (call it under
    torch.no_grad) and layer -> the precision the converted graph gives it."""
    floating = apply(module, Assignment({n: "bf16" if p == "bf16" else "fp32" for n, p in assignment.layers.items()}))
    run, precisions, _ = _compile(floating, assignment, samples, names or list(samples))
    return run, precisions


def _compile(floating: torch.nn.Module, assignment: Assignment, samples: dict[str, np.ndarray],
             names: list[str]) -> tuple[Callable, dict[str, str], int]:
    """compile_assignment on a module already in its float precisions; also returns the bytes of the tensors
    the converted graph holds (int8 weights where quantized: the deployed size)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    example = tuple(torch.from_numpy(samples[n][:2]) for n in names)
    dynamic = tuple({0: torch.export.Dim.AUTO} for _ in names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = torch.export.export(floating, example, dynamic_shapes=dynamic).module()
        quantized = {layer.split("#")[0]: PT2E[p] for layer, p in assignment.layers.items() if p in PT2E}
        if quantized:
            quantizer = _quantizer(xiq)
            for fqn, dynamic_activations in sorted(quantized.items()):
                quantizer.set_module_name_qconfig(fqn, xiq.get_default_x86_inductor_quantization_config(
                    is_dynamic=dynamic_activations))
            graph = prepare_pt2e(graph, quantizer)
            with torch.no_grad():
                graph(*(torch.from_numpy(samples[n]) for n in names))
            graph = convert_pt2e(graph)
    compiled = torch.compile(graph, dynamic=False)

    compiled_for: set[tuple] = set()  # the call signatures inductor has compiled the graph for

    def run(*args):
        """Inductor compiles the graph again for each new signature (grad mode, thread count, each input's dtype
        and shape: dynamo's guards). At that call freezing must be on (torch.compile's options do not reach it),
        its lowering's warnings hushed (copying tensors) and dynamo allowed more than its 8 compiles per graph (past
        them it runs the graph uncompiled: every int8 layer in float). Later calls run the graph bare: the config
        patches cost ~30 us a call, a timed small model's share."""
        signature = (torch.is_grad_enabled(), torch.get_num_threads(), *((a.dtype, *a.shape) for a in args))
        if signature in compiled_for:
            return compiled(*args)
        with (torch._inductor.config.patch(freezing=True), torch._dynamo.config.patch(recompile_limit=64),
              warnings.catch_warnings()):
            warnings.simplefilter("ignore")
            out = compiled(*args)
        compiled_for.add(signature)
        return out

    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}  # not the float weights left
    size = sum(t.nbytes for name, t in graph.state_dict().items() if name in used)  # behind by convert_pt2e
    return run, _graph_precisions(graph, assignment), size


def _quantizer(xiq):
    """X86InductorQuantizer whose linear+activation fusion annotation is skipped where torchao 0.18 fails on
    it (an IndexError on MiniLM's Linear+GELU partitions): those linears are then annotated alone."""

    class Quantizer(xiq.X86InductorQuantizer):
        def _annotate_linear_unary(self, model, config, filter_fn=None) -> None:
            with contextlib.suppress(IndexError):
                super()._annotate_linear_unary(model, config, filter_fn)

    return Quantizer()


WEIGHT_OPS = (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default)


def _graph_precisions(graph: torch.fx.GraphModule, assignment: Assignment) -> dict[str, str]:
    """Layer -> `int8` (`int8-dyn-pc` with run-time activation scales) where its linear/conv node takes a
    dequantized int8 weight, else the node's dtype."""
    found: dict[str, str] = {}
    for node in graph.graph.nodes:
        if node.target not in (*WEIGHT_OPS, torch.ops.aten.embedding.default):
            continue
        stack = list(node.meta.get("nn_module_stack", {}).values())
        if not stack:
            continue
        fqn = stack[-1][0].removesuffix(".inner")
        layer = fqn if fqn not in found else next(f"{fqn}#{k}" for k in range(2, 99) if f"{fqn}#{k}" not in found)
        weight, activation = node.args[1], node.args[0]
        if node.target == torch.ops.aten.embedding.default:  # (table, indices): the table is float, never PT2E's
            weight, activation = node.args[0], None
        quantized = getattr(weight, "target", None) == torch.ops.quantized_decomposed.dequantize_per_channel.default
        # dynamic: the activation's scale is a tensor computed at run time (choose_qparams), not a constant
        dynamic = getattr(activation, "target", None) == torch.ops.quantized_decomposed.dequantize_per_tensor.tensor
        dtype = node.meta["val"].dtype
        found[layer] = (("int8-dyn-pc" if dynamic else "int8") if quantized else
                        "bf16" if dtype == torch.bfloat16 else "fp32")
    return {layer: found.get(layer, "not run") for layer in assignment.layers}


def _int8_kernel_calls(run: Callable[[], object]) -> int:
    """oneDNN int8 linear/conv kernel calls during one inference, from the torch profiler."""
    with native_stderr_hushed(), torch.profiler.profile() as prof:
        run()
    return sum(e.count for e in prof.key_averages() if e.key.startswith(("onednn::qlinear", "onednn::qconv")))


def _executed_as(module: torch.nn.Module, inputs: tuple) -> str:
    """The precision a module's kernel ran in, from what executed: its class and its tensors' dtypes."""
    if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
        return "int8-dyn-pc" if module.weight().qscheme() == torch.per_channel_affine else "int8-dyn"
    weight = getattr(module, "weight", None)
    floating = {t.dtype for t in inputs if torch.is_tensor(t) and t.is_floating_point()}  # not a table's indices
    dtypes = floating | ({weight.dtype} if torch.is_tensor(weight) else set())
    return "bf16" if dtypes == {torch.bfloat16} else "fp32" if dtypes == {torch.float32} else "mixed"


@dataclass
class TorchState:
    """What a torch candidate keeps: the module in its precisions, and its compiled form where compiled."""

    inputs: list[InputSpec] = field(default_factory=list)  # the model's inputs, in call order
    module: torch.nn.Module | None = None
    compiled: Callable | None = None  # the PT2E/inductor graph (compile: true)
    graph_precisions: dict[str, str] = field(default_factory=dict)  # layer -> its precision in the compiled graph
    feeds: Feeds | None = None  # the last batch run: what executed() re-runs to see which kernels ran


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would call (`$CXX`, else g++ or clang++), or None: without one nothing compiles."""
    return next(filter(None, (shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++") if c)), None)


class TorchBackend(Backend):
    name = "torch"
    option_values = {COMPILE_OPTION: (False, True)}  # torch.compile (inductor, freezing) or eager
    option_kinds = {COMPILE_OPTION: ("float",)}

    @property
    def default_space(self) -> str:  # type: ignore[override]
        """Compiled where inductor can compile: static int8 (PT2E) has a real kernel only there."""
        return "torch-cpu-compiled" if cxx_compiler() else "torch-cpu"

    @property
    def default_space_note(self) -> str | None:  # type: ignore[override]
        return None if cxx_compiler() else ("no C++ compiler (g++, clang++ or $CXX) for torch.compile: searching "
                                            "eager PyTorch only, without static int8 (apt-get install g++)")

    builds = {Kind.FLOAT: (32, 16), Kind.STATIC: (8,), Kind.DYNAMIC: (8,)}
    takes_module = True
    verify_refusal = ("autoq verify re-times model files; a torch run's points are state dicts of your module: "
                      "rebuild them with autoq.apply(module, assignment) and time them in your code")
    unbuilt = {Kind.WEIGHT_ONLY: "torchao's weight-only int4 has no CPU kernel here (the torch backend builds fp32, "
                                 "bf16, int8-dyn, int8-dyn-pc and int8)"}

    def refuses(self, precision: Precision) -> str | None:
        if str(precision) in ("fp32", "bf16", "int8", *DYNAMIC_QCONFIGS):
            return None
        return ("the torch backend builds fp32, bf16, int8-dyn (torch.ao, eager), int8-dyn-pc (torch.ao eager, "
                "PT2E compiled) and int8 (PT2E, compiled); torchao's weight-only int4 has no CPU kernel here")

    def build(self, model: OnnxModel, assignment: Assignment, calibration: Calibration, workdir: Path) -> Candidate:
        if model.module is None or not isinstance(model.module, torch.nn.Module):
            raise AutoqError("the torch backend needs an nn.Module: pass it to autoq.search(module, example_inputs,"
                             " data) (a .pt2 program has no modules to quantize)")
        compiled = bool(assignment.options.get(COMPILE_OPTION, False))
        for layer, precision in assignment.layers.items():
            if MODE_ONLY.get(precision, compiled) != compiled:
                mode = "compiled (`compile: [true]`)" if MODE_ONLY[precision] else "eager (`compile: [false]`)"
                raise AutoqError(f"{precision} (layer {layer}) has a real kernel only {mode} in the torch backend")
        built = apply(model.module, Assignment({n: p for n, p in assignment.layers.items()
                                                if p not in (PT2E if compiled else ("int8",))}))
        state = TorchState(model.inputs, built)
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "model.pt"  # static int8 is re-created by compile_assignment, not stored quantized
        buffer = io.BytesIO()
        torch.save(built.state_dict(), buffer)
        path.write_bytes(buffer.getvalue())
        size = path.stat().st_size
        if compiled:
            samples = calibration.samples()
            state.compiled, state.graph_precisions, size = _compile(
                built, assignment, samples, [spec.name for spec in model.inputs])
        return Candidate(assignment, path, size, state)

    def runner(self, candidate: Candidate, threads: int) -> Callable[[Feeds], Outputs]:
        state = state_of(candidate, TorchState)
        module = state.compiled or state.module
        names = [spec.name for spec in state.inputs]

        def run(feeds: Feeds) -> Outputs:
            state.feeds = feeds  # what executed() re-runs to see which kernels ran
            torch.set_num_threads(threads)
            with torch.no_grad():  # not inference_mode: compiled graphs with frozen weights reject it
                out = module(*(torch.from_numpy(feeds[n]) for n in names))
            outs = out if isinstance(out, tuple | list) else (out,)
            return [o.float().numpy() for o in outs]

        return run

    def _hooked(self, candidate: Candidate, feeds: Feeds, threads: int, runs: int) -> dict[str, tuple[str, float]]:
        """Layer -> (what ran, mean ms) over `runs` inferences, from forward hooks on each layer's module."""
        module, handles = state_of(candidate, TorchState).module, []
        seen: dict[str, list] = {}
        for layer in candidate.assignment.layers:
            target = module.get_submodule(layer.split("#")[0])
            inner = target.inner if isinstance(target, _Bf16) else target

            def before(mod, args, layer=layer, inner=inner):
                seen.setdefault(layer, ["", 0.0])[0] = _executed_as(inner, tuple(a for a in args))
                seen[layer].append(time.perf_counter())

            def after(mod, args, out, layer=layer):
                seen[layer][1] += (time.perf_counter() - seen[layer].pop()) * 1e3

            handles += [inner.register_forward_pre_hook(before), inner.register_forward_hook(after)]
        run = self.runner(candidate, threads)
        try:
            for _ in range(runs):
                run(feeds)
        finally:
            for handle in handles:
                handle.remove()
        return {layer: (kind, total / runs) for layer, (kind, total, *_) in seen.items()}

    def executed(self, candidate: Candidate) -> dict[str, str]:
        state = state_of(candidate, TorchState)
        feeds = state.feeds or {  # not run yet: one sample of zeros shows the kernels as well
            spec.name: np.zeros([d or 1 for d in spec.shape], dtype=spec.dtype) for spec in state.inputs}
        feeds = {k: v[:1] for k, v in feeds.items()}
        if state.compiled is not None:
            graph = state.graph_precisions
            run = self.runner(candidate, 1)
            run(feeds)  # compiled for this shape before the profiled call
            quantized = sum(p in PT2E for p in graph.values())
            fused = _int8_kernel_calls(lambda: run(feeds)) == quantized
            return {layer: "fp32" if p in PT2E and not fused else p for layer, p in graph.items()}
        ran = self._hooked(candidate, feeds, 1, 1)
        return {layer: ran.get(layer, ("not run", 0.0))[0] for layer in candidate.assignment.layers}

    def layer_latency(self, candidate: Candidate, feeds: Feeds, threads: int,
                      runs: int = 20) -> dict[str, float] | None:
        if state_of(candidate, TorchState).compiled is not None:  # inductor fuses across modules: no per-module time
            return None
        self.runner(candidate, threads)(feeds)  # warm-up
        return {layer: ms for layer, (_, ms) in self._hooked(candidate, feeds, threads, runs).items()}

    def recipes(self, model: OnnxModel) -> list[Recipe]:
        """torch.ao `quantize_dynamic` on every nn.Linear (eager), PT2E int8 on every layer (compiled)."""
        linear = {layer.name for layer in model.layers if layer.op_type in ("Gemm", "MatMul")}

        def uniform(spec: str, compiled: bool, only: set[str] | None = None) -> Callable:
            layers = {n: spec if only is None or n in only else "fp32" for n in model.layer_names}
            return lambda m, calibration, workdir: self.build(m, Assignment(layers, {COMPILE_OPTION: compiled}),
                                                              calibration, workdir)

        return ([Recipe("torch quantize_dynamic, every nn.Linear", uniform("int8-dyn", False, linear))]
                if linear else []) + [Recipe("PT2E int8, every layer, compiled", uniform("int8", True))]

    def export(self, candidate: Candidate, path: Path) -> Path:
        """The state dict (`model.pt`); `autoq.apply(module, assignment)` then `load_state_dict` rebuilds it."""
        target = path.with_suffix(".pt")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(candidate.path.read_bytes())
        return target
