"""PyTorch eager on the CPU, per module: `fp32`, `bf16` (the module's weights and arithmetic in bfloat16, cast
at its boundary) and `int8-dyn` (torch.ao `quantize_dynamic` on that nn.Linear alone: int8 weights,
activations quantized at run time by the `quantized::linear_dynamic` kernel).

Layers are the module FQNs of the user's code (the ONNX export names them so). What ran is recorded by
forward hooks on one real inference: the module class that executed and the dtype of its weight and input.
"""

from __future__ import annotations

import copy
import io
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from autoq.backends.base import Backend, Candidate, Feeds, Outputs
from autoq.errors import AutoqError
from autoq.graph import OnnxModel
from autoq.precision import Assignment


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
        elif precision == "int8-dyn":
            if not isinstance(target, torch.nn.Linear):
                raise AutoqError(f"int8-dyn needs an nn.Linear; {fqn} is a {type(target).__name__}")
            dynamic[fqn] = torch.ao.quantization.default_dynamic_qconfig
        elif precision != "fp32":
            raise AutoqError(f"the torch backend cannot build {precision} (for {layer})")
    if dynamic:
        with warnings.catch_warnings():  # torch.ao eager quantization is deprecated in favour of torchao
            warnings.simplefilter("ignore")
            result = torch.ao.quantization.quantize_dynamic(result, qconfig_spec=dynamic, dtype=torch.qint8)
    return result


def _executed_as(module: torch.nn.Module, inputs: tuple) -> str:
    """The precision a module's kernel ran in, from what executed: its class and its tensors' dtypes."""
    if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
        return "int8-dyn"
    weight = getattr(module, "weight", None)
    dtypes = {t.dtype for t in inputs if torch.is_tensor(t)} | ({weight.dtype} if torch.is_tensor(weight) else set())
    return "bf16" if dtypes == {torch.bfloat16} else "fp32" if dtypes == {torch.float32} else "mixed"


class TorchBackend(Backend):
    name = "torch"
    default_space = "torch-cpu"

    def precisions(self) -> set[str]:
        return {"fp32", "bf16", "int8-dyn"}

    def build(self, model: OnnxModel, assignment: Assignment, calibration: Path, workdir: Path) -> Candidate:
        if model.module is None or not isinstance(model.module, torch.nn.Module):
            raise AutoqError("the torch backend needs an nn.Module: pass it to autoq.search(module, example_inputs,"
                             " data) (a .pt2 program has no modules to quantize)")
        built = apply(model.module, assignment)
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "model.pt"
        buffer = io.BytesIO()
        torch.save(built.state_dict(), buffer)
        path.write_bytes(buffer.getvalue())
        return Candidate(assignment, path, path.stat().st_size, {"module": built, "specs": model.inputs})

    def runner(self, candidate: Candidate, threads: int) -> Callable[[Feeds], Outputs]:
        module, names = candidate.extra["module"], [spec.name for spec in candidate.extra["specs"]]

        def run(feeds: Feeds) -> Outputs:
            candidate.extra["feeds"] = feeds  # what executed() re-runs to see which kernels ran
            torch.set_num_threads(threads)
            with torch.inference_mode():
                out = module(*(torch.from_numpy(feeds[n]) for n in names))
            outs = out if isinstance(out, tuple | list) else (out,)
            return [o.float().numpy() for o in outs]

        return run

    def _hooked(self, candidate: Candidate, feeds: Feeds, threads: int, runs: int) -> dict[str, tuple[str, float]]:
        """Layer -> (what ran, mean ms) over `runs` inferences, from forward hooks on each layer's module."""
        module, seen, handles = candidate.extra["module"], {}, []
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
        feeds = candidate.extra.get("feeds") or {  # not run yet: one sample of zeros shows the kernels as well
            spec.name: np.zeros([d or 1 for d in spec.shape], dtype=spec.dtype) for spec in candidate.extra["specs"]}
        ran = self._hooked(candidate, {k: v[:1] for k, v in feeds.items()}, 1, 1)
        return {layer: ran.get(layer, ("not run", 0.0))[0] for layer in candidate.assignment.layers}

    def layer_latency(self, candidate: Candidate, feeds: Feeds, threads: int, runs: int = 20) -> dict[str, float]:
        self.runner(candidate, threads)(feeds)  # warm-up
        return {layer: ms for layer, (_, ms) in self._hooked(candidate, feeds, threads, runs).items()}

    def export(self, candidate: Candidate, path: Path) -> Path:
        """The state dict (`model.pt`); `autoq.apply(module, assignment)` then `load_state_dict` rebuilds it."""
        target = path.with_suffix(".pt")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(candidate.path.read_bytes())
        return target
