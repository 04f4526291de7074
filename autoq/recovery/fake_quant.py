"""Fake quantization in torch, as each spec will run on the backend: the layer's input and weight rounded in the
forward pass, gradients passing straight through the rounding (STE). Static int8 inputs round on their calibrated
uint8 range, or on a learned one (`ActivationRanges`, LSQ-style: the range's ends get gradients from the values
they clip and from the step they set) where the backend builds from the calibration's ranges; int8-dyn on each
sample's own range; weights per channel on 127 levels, or in their bits and groups for weight-only specs; bf16 by
rounding both."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from autoq.backends.base import TensorRange
from autoq.calibrate import Calibration
from autoq.graph import OnnxModel
from autoq.precision import Assignment, Kind, Precision
from autoq.quantsim import round_weight, smoothing_scale
from autoq.recovery.rounding import input_range


def _ste(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """`rounded` forward, the identity backward (straight-through)."""
    return x + (rounded - x).detach()


def _round(x: torch.Tensor) -> torch.Tensor:
    return _ste(x, torch.round(x))


def _activation(x: torch.Tensor, bounds: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    """`x` on the uint8 grid of the range `bounds` (low, high; widened to hold 0), as a static int8 kernel reads it.
    Differentiable in `bounds`: values outside pull the clipping end, values inside the step."""
    low, high = bounds[0].clamp(max=0.0), bounds[1].clamp(min=0.0)
    if symmetric:
        high = torch.maximum(-low, high)
        low = -high
    step = (high - low).clamp_min(1e-12) / 255
    zero = torch.round(-low / step).detach()
    return (torch.clamp(_round(x / step) + zero, 0, 255) - zero) * step


class ActivationRanges(torch.nn.Module):
    """The (low, high) range of each quantized activation tensor, as trainable parameters (one per tensor: its
    consumers share its quantizer, as in the built model). `on_tensors`: they are every tensor the built model
    quantizes (the glue's too), applied where each is produced; otherwise the static layers' inputs, from the
    calibration, applied by the layers."""

    def __init__(self, ranges: dict[str, TensorRange], learned: bool, on_tensors: bool) -> None:
        super().__init__()
        self.learned, self.on_tensors = learned, on_tensors
        self.names = sorted(ranges)
        self._index = {name: i for i, name in enumerate(self.names)}  # every forward looks each tensor up
        self.symmetric = {n for n in self.names if ranges[n].symmetric}
        self.bounds = torch.nn.ParameterList(
            torch.nn.Parameter(torch.tensor([ranges[n].low, ranges[n].high], dtype=torch.float32),
                               requires_grad=learned) for n in self.names)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.bounds[self._index[name]]

    def quantize(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return _activation(x, self[name], name in self.symmetric)

    def tensor_hooks(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Tensor -> its fake quantization, where the ranges are the built model's tensors."""
        if not self.on_tensors:
            return {}
        return {name: partial(self.quantize, name) for name in self.names}

    def values(self) -> dict[str, tuple[float, float]]:
        """Tensor -> the range it is quantized on, as `_activation` uses it (widened to hold 0, symmetric where
        the tensor is): what a build from these ranges makes."""
        found = {}
        for name, bounds in zip(self.names, self.bounds, strict=True):
            low, high = min(float(bounds[0].detach()), 0.0), max(float(bounds[1].detach()), 0.0)
            if name in self.symmetric:
                high = max(-low, high)
                low = -high
            found[name] = (low, high)
        return found


def _dynamic(x: torch.Tensor) -> torch.Tensor:
    """`x` quantized as a dynamic int8 kernel does at run time: uint8 on each sample's own range (a deployed
    model runs one sample per call)."""
    dims = tuple(range(1, x.dim()))
    low = x.detach().amin(dim=dims, keepdim=True).clamp(max=0)
    high = x.detach().amax(dim=dims, keepdim=True).clamp(min=0)
    step = (high - low).clamp_min(1e-12) / 255
    zero = torch.round(-low / step)
    return _ste(x, (torch.clamp(torch.round(x / step) + zero, 0, 255) - zero) * step)


def _weight(w: torch.Tensor, axis: int, spec: Precision) -> torch.Tensor:
    """`w` as `spec` stores it: symmetric per channel (or per tensor, or in groups along the inputs of a 2-D
    weight), asymmetric where the spec says so; a non-uniform format (NF4, codebook, float8/4) as its numpy simulation
    rounds it."""
    if spec.element != "int":
        return _ste(w, torch.from_numpy(round_weight(w.detach().numpy(), axis, spec)).to(w.dtype))
    levels = 2 ** (spec.bits - 1) - 1
    moved = w.movedim(axis, 0).reshape(w.shape[axis], -1) if spec.granularity != "tensor" else w.reshape(1, -1)
    width = moved.shape[1]
    group = spec.group or width
    blocks = torch.nn.functional.pad(moved, (0, -width % group)).reshape(moved.shape[0], -1, group)
    with torch.no_grad():
        if spec.kind != Kind.WEIGHT_ONLY:  # int8 weights: +-127 per channel (ORT's and NNCF's)
            scale = blocks.abs().amax(2, keepdim=True).clamp_min(1e-12) / levels
            zero = torch.zeros_like(scale)
            low, high = -levels, levels
        elif spec.symmetric:  # MatMulNBits' signed scale: a block's largest weight lands on -2^(bits-1) exactly
            extreme = blocks.gather(2, blocks.abs().argmax(2, keepdim=True))
            scale = torch.where(extreme.abs() < 1e-12, torch.full_like(extreme, 1e-12), extreme / -(levels + 1))
            zero, low, high = torch.zeros_like(scale), -(levels + 1), levels
        else:
            lo, hi = blocks.amin(2, keepdim=True).clamp(max=0), blocks.amax(2, keepdim=True).clamp(min=0)
            scale = (hi - lo).clamp_min(1e-12) / (2 ** spec.bits - 1)
            zero, low, high = torch.round(-lo / scale), 0, 2 ** spec.bits - 1
    rounded = (torch.clamp(torch.round(blocks / scale) + zero, low, high) - zero) * scale
    rounded = rounded.reshape(moved.shape[0], -1)[:, :width]
    if spec.granularity == "tensor":
        return _ste(w, rounded.reshape(w.shape))
    return _ste(w, rounded.reshape(w.movedim(axis, 0).shape).movedim(0, axis))


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return _ste(x, x.to(torch.bfloat16).float())


def activation_ranges(model: OnnxModel, assignment: Assignment, calibration: Calibration,
                      built: dict[str, TensorRange] | None, learned: bool) -> ActivationRanges:
    """The ranges of the tensors the built model quantizes (`built`, as the backend read them from its build; those
    of the float graph) where the backend gives them, trainable if `learned`; otherwise every static int8 layer's
    calibrated input range (under its spec's calibration), fixed."""
    graph = model.proto.graph
    if built is not None:
        tensors = {i.name for i in graph.input} | {o for node in graph.node for o in node.output}
        return ActivationRanges({n: r for n, r in built.items() if n in tensors}, learned, True)
    nodes = {node.name: node for node in graph.node}
    ranges = {nodes[name].input[0]: TensorRange(*input_range(calibration, nodes[name], spec), spec.symmetric)
              for name, spec in assignment.specs().items() if spec.kind == Kind.STATIC and name in nodes}
    return ActivationRanges(ranges, False, False)


def hooks(model: OnnxModel, assignment: Assignment, calibration: Calibration, ranges: ActivationRanges
          ) -> dict[str, Callable]:
    """Layer -> what its kernel computes with, (input, weight) fake-quantized as its spec says; static inputs on
    `ranges` (already quantized where they are produced if `ranges.on_tensors`)."""
    nodes = {node.name: node for node in model.proto.graph.node}
    made: dict[str, Callable] = {}
    for layer in model.layers:
        spec = assignment.specs().get(layer.name)
        if spec is None or layer.name not in nodes or spec.fmt == "fp32":
            continue
        axis = layer.channel_axis
        if spec.kind == Kind.STATIC:
            tensor = nodes[layer.name].input[0]

            def static(x, w, tensor=tensor, spec=spec, axis=axis):
                return x if ranges.on_tensors else ranges.quantize(tensor, x), _weight(w, axis, spec)
            made[layer.name] = static
        elif spec.kind == Kind.DYNAMIC:
            peaks = _input_peaks(model, calibration, nodes[layer.name].input[0]) if spec.smooth else None

            def dynamic(x, w, spec=spec, axis=axis, peaks=peaks):
                if peaks is not None:  # smoothed as the backend builds it: the input / s, the weight rows * s
                    scale = torch.from_numpy(smoothing_scale(peaks, w.detach().abs().amax(1).numpy(), spec.smooth))
                    x, w = x / scale, w * scale[:, None]
                return _dynamic(x), _weight(w, axis, spec)
            made[layer.name] = dynamic
        elif spec.kind == Kind.WEIGHT_ONLY:
            made[layer.name] = lambda x, w, spec=spec, axis=axis: (x, _weight(w, axis, spec))
        else:
            made[layer.name] = lambda x, w: (_bf16(x), _bf16(w))
    return made


def _input_peaks(model: OnnxModel, calibration: Calibration, tensor: str) -> np.ndarray:
    """The largest |value| per channel of `tensor` on the calibration samples (what smoothing divides by)."""
    from autoq.backends.onnxruntime.smooth import channel_maxima  # smoothed specs are ORT's

    return channel_maxima(model, calibration)[tensor]
