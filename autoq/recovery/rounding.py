"""Learned rounding: each weight of a layer rounded up or down so that the layer's output matches FP32's on the
calibration inputs (a static int8 layer's input fake-quantized with its calibrated uint8 range, as the int8 kernel
will see it; a weight-only layer's input as it is). Two methods: AdaRound (Nagel et al. 2020: a learned soft mask
per weight, `-adaround`) and, for weight-only MatMuls, GPTQ (`-gptq`, `autoq.recovery.gptq`: no gradient steps,
several times faster and lower in output error on SmolLM2's Linears). Fitted once per (layer, spec) and cached in
the run directory, so a trial that picks one costs what round-to-nearest costs.

The learned weights are cached as float weights that lie exactly on the layer's grid, the grid's largest weight
kept where it was: static int8, one scale per output channel, max|w| / 127 (the symmetric per-channel weights
ONNX Runtime and NNCF make); symmetric weight-only (`w4g32-adaround`), one signed scale per block of inputs, the
block's largest-magnitude weight over -2^(bits-1) (ONNX Runtime's MatMulNBits grid). A backend's own
round-to-nearest quantizer then reproduces the learned integers exactly from them: `substitute` puts them in the
float model before the backend quantizes, the backend confirms the built integers, and the kernels, the executed
check and the deployed files are those of round-to-nearest. Asymmetric weight-only (`w4g32-asym-adaround`, the
learned twin of the `kquant` recipe) learns on k-quant's zero-pointed blocks (each block's scale and minimum
searched to fit its weights), which no min-max quantizer finds again: ORT's build writes its integers, scales and
zero points into the MatMulNBits node (`autoq.backends.onnxruntime.learned`). Torch's PT2E observer spreads
weights over 127.5 levels and NNCF's int4 grid is not MatMulNBits', so those backends do not offer them (a
backend lists the roundings it takes from here: `Backend.learned_roundings`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from autoq.calibrate import Calibration
from autoq.data import Dataset, batch_size
from autoq.errors import AutoqError
from autoq.files import written_whole
from autoq.graph import Layer, OnnxModel, probe_session, weight_array
from autoq.precision import Kind, Precision
from autoq.quantsim import round_activation, signed_scales
from autoq.recovery import gptq

if TYPE_CHECKING:
    import torch

VERSION = 3  # 3: FP32 inputs, a held-out share judging the fit
ZERO_POINTED_VERSION = 3  # 2: zero-pointed blocks on k-quant's grid (1: min-max blocks); 3: the blocks kept
LEARNED = ("adaround", "gptq")  # the roundings fitted here (Precision.rounding); a backend offers some
LEVELS = 127  # symmetric static int8 weights: [-127, 127]
ITERATIONS, BATCH, MAX_SAMPLES, LR = 500, 16, 256, 1e-2  # AdaRound's
HELD_OUT = 5  # one sample in HELD_OUT is kept out of the fit to judge it
KEEP = 0.95  # the learned weights are kept where they lower the held-out error by 5% or more
ZETA, GAMMA, REG, WARMUP, BETA = 1.1, -0.1, 0.01, 0.2, (20.0, 2.0)  # AdaRound's stretch, regulariser, annealing
FITTED_OPS = ("Conv", "Gemm", "MatMul")


def is_learned(spec: Precision, roundings: tuple[str, ...] = LEARNED) -> bool:
    """Whether `spec`'s weights are fitted here: `roundings`, a backend's `learned_roundings` (OpenVINO's `gptq`
    is NNCF's own, run at its build)."""
    return spec.rounding in roundings


@dataclass(frozen=True)
class Fitted:
    """One layer's learned weights (float, on its int8 grid) and its output error before and after."""

    weight: np.ndarray
    rtn_error: float  # relative output MSE of round-to-nearest against FP32, on held-out calibration samples
    learned_error: float
    seconds: float
    block_scale: np.ndarray | None = None  # zero-pointed blocks: (outputs, blocks) scales and zero points, as
    block_zero: np.ndarray | None = None  # k-quant searched them at the fit (a build writes them, not searches)


def cache_file(calibration: Calibration, layer: str, spec: Precision) -> Path:
    """Where the learned weights of (`layer`, `spec`) are kept: beside the calibration they were fitted on."""
    key = json.dumps([VERSION, calibration.name, layer, str(spec)]
                     + ([ZERO_POINTED_VERSION] if spec.kind == Kind.WEIGHT_ONLY and not spec.symmetric else []))
    return calibration.folder / "rounding" / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.npz"


def load(calibration: Calibration, layer: str, spec: Precision) -> Fitted | None:
    path = cache_file(calibration, layer, spec)
    if not path.is_file():
        return None
    with np.load(path) as stored:
        return Fitted(stored["weight"], float(stored["rtn_error"]), float(stored["learned_error"]),
                      float(stored["seconds"]), stored.get("block_scale"), stored.get("block_zero"))


def _save(path: Path, fitted: Fitted) -> None:
    fields = {name: value for name, value in vars(fitted).items() if value is not None}
    with written_whole(path) as partial:  # workers may fit the same layer at once
        np.savez(partial, **fields)  # type: ignore[arg-type]


def missing(calibration: Calibration, pairs: list[tuple[Layer, Precision]],
            roundings: tuple[str, ...] = LEARNED) -> list[tuple[Layer, Precision]]:
    return [(layer, spec) for layer, spec in pairs
            if is_learned(spec, roundings) and not cache_file(calibration, layer.name, spec).is_file()]


def prepare(model: OnnxModel, calibration: Calibration, pairs: list[tuple[Layer, Precision]],
            report: Callable[[int, int], None] | None = None) -> dict[tuple[str, str], Fitted]:
    """Fit every learned (layer, spec) of `pairs` not cached yet, a few layers' inputs in memory at a time.

    Each layer is fitted on its FP32 input, fake-quantized with the uint8 range its spec's calibration gives that
    input (what its int8 kernel will see, but for the other layers' errors): a fit that does not depend on the
    other layers' specs, so one cache entry serves every assignment. (Fitting on the all-int8 model's inputs, with
    the earlier layers' errors in them, measured worse end to end on PaddleOCR's classifier once every layer
    took its learned weights: each had learned to undo errors the others no longer made.)"""
    todo = missing(calibration, pairs)
    if not todo:
        return {}
    samples = Dataset(calibration.samples())
    samples = samples.subset(np.arange(min(MAX_SAMPLES, len(samples))))
    nodes = {node.name: node for node in model.proto.graph.node}
    done: dict[tuple[str, str], Fitted] = {}
    for start in range(0, len(todo), 8):
        chunk = todo[start:start + 8]
        tensors = sorted({nodes[layer.name].input[0] for layer, _ in chunk})
        session = probe_session(model.proto, tensors)
        parts = [session.run(tensors, feeds) for feeds in samples.batches(batch_size(model.inputs))]
        inputs = {t: np.concatenate([p[i] for p in parts]) for i, t in enumerate(tensors)}
        for index, (layer, spec) in enumerate(chunk):
            node = nodes[layer.name]
            x = inputs[node.input[0]]
            seen = x
            if spec.kind == Kind.STATIC:
                low, high = input_range(calibration, node, spec)
                seen = round_activation(x, low, high, spec.symmetric).astype(np.float32)
            fitted = fit(node, model.proto, layer, x, seen, spec)
            _save(cache_file(calibration, layer.name, spec), fitted)
            done[(layer.name, str(spec))] = fitted
            if report:
                report(start + index + 1, len(todo))
    return done


def input_range(calibration: Calibration, node: onnx.NodeProto, spec: Precision) -> tuple[float, float]:
    """The calibrated range of the layer's input under its spec's calibration."""

    known = calibration.ranges(spec.calibration_key).get(node.input[0])
    return known if known is not None else calibration.ranges()[node.input[0]]


def substitute(proto: onnx.ModelProto, model: OnnxModel, specs: dict[str, Precision], calibration: Calibration,
               roundings: tuple[str, ...] = LEARNED) -> int:
    """Put the learned weights of the layers whose spec is learned (one of `roundings`) into `proto` (a copy of
    `model`'s), in place; fits what is not cached yet. Returns how many layers were substituted."""
    layers = [layer for layer in model.layers if layer.name in specs and is_learned(specs[layer.name], roundings)]
    if not layers:
        return 0
    pairs = [(layer, specs[layer.name]) for layer in layers]
    prepare(model, calibration, pairs)
    stored = {t.name: t for t in proto.graph.initializer}
    for layer, spec in pairs:
        fitted = load(calibration, layer.name, spec)
        if fitted is None or layer.weight not in stored:
            raise AutoqError(f"no learned weights for {layer.name} ({spec})")
        stored[layer.weight].CopyFrom(numpy_helper.from_array(fitted.weight.astype(np.float32), layer.weight))
    return len(pairs)


@dataclass(frozen=True)
class Grid:
    """Where a layer's weights may land: `scale` (the shape of the weight), the integer range, and the weights
    that set the scales (kept on their grid point, so the backend's quantizer finds the same scales)."""

    scale: np.ndarray
    low: int | np.ndarray  # per weight where the grid has zero points
    high: int | np.ndarray
    keep: np.ndarray


def grid(w: np.ndarray, layer: Layer, spec: Precision) -> Grid:
    """The grid `spec` stores `w` on (see the module docstring)."""
    if spec.kind == Kind.STATIC:
        reduce = tuple(i for i in range(w.ndim) if i != layer.channel_axis)
        scale = np.maximum(np.abs(w).max(axis=reduce, keepdims=True), 1e-12) / LEVELS
        return Grid(np.broadcast_to(scale, w.shape).astype(np.float32), -LEVELS, LEVELS,
                    _largest(w, layer.channel_axis))
    if spec.kind != Kind.WEIGHT_ONLY or spec.group == 0 or w.ndim != 2 or spec.element != "int":
        raise AutoqError(f"learned rounding fits static int8 and integer weight-only blocks, not {spec}")
    inputs, group = w.shape[0], spec.group  # a MatMul weight: (inputs, outputs), blocks along the inputs
    blocks = np.pad(w, ((0, -inputs % group), (0, 0))).reshape(-1, group, w.shape[1])
    keep = np.zeros(blocks.shape, dtype=bool)

    def full(values: np.ndarray) -> np.ndarray:  # one value per block -> the weight's shape
        return np.broadcast_to(values, blocks.shape).reshape(-1, w.shape[1])[:inputs]

    if spec.symmetric:
        scale, at = signed_scales(blocks, 1, spec.bits)
        levels = 2 ** (spec.bits - 1)
        np.put_along_axis(keep, at[:, None, :], True, 1)
        return Grid(full(scale).astype(np.float32), -levels, levels - 1, keep.reshape(-1, w.shape[1])[:inputs])
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor_k_quant_cpu

    # zero-pointed blocks as k-quant searches them (each block's scale and minimum fitted to its weights, llama.cpp's
    # make_qkx2, in ORT's own code): the grid of the `kquant` recipe this spec is the learned twin of
    padded = np.ascontiguousarray(np.pad(w, ((0, -inputs % group), (0, 0))).T)  # (outputs, inputs) in blocks
    _, scale, zero = quant_tensor_k_quant_cpu(padded, spec.bits, group)
    scale, zero = (a.astype(np.float32).reshape(w.shape[1], -1).T[:, None, :] for a in (scale, zero))
    return Grid(full(scale), full(-zero), full(2 ** spec.bits - 1 - zero), keep.reshape(-1, w.shape[1])[:inputs])


def _forward(node: onnx.NodeProto, bias: np.ndarray | None, rank: int) -> Callable:
    """The layer as a torch function of (input, weight): the interpreter's own layer ops (`onnx_torch.LAYERS`)."""
    import torch

    from autoq.recovery.onnx_torch import LAYERS

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0):
        raise AutoqError(f"learned rounding: {node.name} transposes its input (transA), which it does not fit")
    b = None if bias is None else torch.from_numpy(bias.astype(np.float32))
    return lambda x, w: LAYERS[node.op_type](x, w, b, attrs)


def fit(node: onnx.NodeProto, proto: onnx.ModelProto, layer: Layer, x: np.ndarray, x_seen: np.ndarray,
        spec: Precision) -> Fitted:
    """One layer's learned rounding on `spec`'s grid (AdaRound, or GPTQ for `gptq` specs), fitted so that, on the
    input its kernel sees (`x_seen`), it computes what FP32 computes on the FP32 input `x` (both over all calibration
    samples but a held-out share, which judges the fit against round-to-nearest)."""
    import torch

    if layer.op_type not in FITTED_OPS:
        raise AutoqError(f"learned rounding fits {', '.join(FITTED_OPS)} layers, not {layer.op_type} ({layer.name})")
    started = time.perf_counter()
    w = weight_array(proto, layer.weight).astype(np.float32)
    bias = weight_array(proto, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    forward = _forward(node, bias, x.ndim)
    lattice = grid(w, layer, spec)
    scale, low, high = lattice.scale, lattice.low, lattice.high
    floor = np.floor(w / scale)
    rest = np.clip(w / scale - floor, 1e-4, 1 - 1e-4)
    x_t, x_q = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (x, x_seen))
    if x.ndim >= 3 and node.op_type == "MatMul":  # tokens are samples too
        x_t, x_q = x_t.reshape(-1, x.shape[-1]), x_q.reshape(-1, x.shape[-1])
    w_t, s_t, floor_t = (torch.from_numpy(a.astype(np.float32)) for a in (w, scale, floor))
    keep_t = torch.from_numpy(lattice.keep)  # the weights that set the scales stay on their grid point
    rtn = torch.from_numpy(np.clip(np.round(w / scale), low, high).astype(np.float32))
    low_t, high_t = (torch.as_tensor(np.asarray(bound, dtype=np.float32)) for bound in (low, high))
    with torch.no_grad():
        target = forward(x_t, w_t)

    def weight(h: torch.Tensor) -> torch.Tensor:
        return torch.where(keep_t, rtn, torch.clamp(floor_t + h, low_t, high_t)) * s_t

    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(x_t.shape[0], generator=generator)
    held = order[:len(order) // HELD_OUT] if len(order) >= 2 * HELD_OUT else order  # judges the fit, unseen by it
    fitted_on = order[len(held):] if len(held) < len(order) else order

    def error(q_weight: torch.Tensor) -> float:
        with torch.no_grad():
            out, wanted = forward(x_q[held], q_weight), target[held]
            return float(((out - wanted) ** 2).sum() / (wanted ** 2).sum().clamp_min(1e-20))

    if spec.rounding == "gptq":
        if node.op_type != "MatMul" or w.ndim != 2:
            raise AutoqError(f"GPTQ rounds MatMul weights, not {layer.op_type} ({layer.name})")
        learned = torch.from_numpy(gptq.solve(w, x_q[fitted_on].numpy(), scale, low, high, lattice.keep,
                                              rtn.numpy()).astype(np.float32)) * s_t
    else:
        learned = _adaround(forward, weight, rest, x_q[fitted_on], target[fitted_on], generator,
                            BATCH if x.ndim > 2 or node.op_type != "MatMul" else 256)
    rtn_error, learned_error = error(rtn * s_t), error(learned)
    if learned_error >= KEEP * rtn_error:  # overfitted (few samples for many weights): round-to-nearest stays
        learned, learned_error = rtn * s_t, rtn_error
    blocks: tuple[np.ndarray | None, np.ndarray | None] = (None, None)
    if spec.kind == Kind.WEIGHT_ONLY and not spec.symmetric:  # the zero-pointed blocks, one value per block
        blocks = (lattice.scale[::spec.group].T, -np.asarray(lattice.low)[::spec.group].T)
    return Fitted(learned.numpy().astype(np.float32), rtn_error, learned_error, time.perf_counter() - started,
                  *blocks)


def _adaround(forward: Callable, weight: Callable, rest: np.ndarray, x: torch.Tensor, target: torch.Tensor,
              generator: torch.Generator, batch: int) -> torch.Tensor:
    """AdaRound's optimisation: a soft mask per weight (starting at where the weight lies between its two grid
    points), annealed to 0 or 1 by the regulariser while the layer's output error on `x` is minimised."""
    import torch

    rest_t = torch.from_numpy(rest.astype(np.float32))
    alpha = torch.log((rest_t - GAMMA) / (ZETA - rest_t)).requires_grad_(True)  # the soft mask starts at `rest`

    def soft() -> torch.Tensor:
        return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    optimizer = torch.optim.Adam([alpha], lr=LR)
    batch = min(len(x), batch)
    for step_index in range(ITERATIONS):
        index = torch.randint(0, len(x), (batch,), generator=generator)
        h = soft()
        loss = ((forward(x[index], weight(h)) - target[index]) ** 2).sum(1).mean()  # AdaRound's: summed over
        progress = (step_index / ITERATIONS - WARMUP) / (1 - WARMUP)  # channels, averaged over the rest
        if progress > 0:
            beta = BETA[1] + (BETA[0] - BETA[1]) * (1 - progress)
            loss = loss + REG * (1 - (2 * h - 1).abs().pow(beta)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return weight((soft() >= 0.5).float())


def _largest(w: np.ndarray, axis: int) -> np.ndarray:
    """A mask of each output channel's largest-magnitude weight."""
    moved = np.moveaxis(np.abs(w), axis, 0).reshape(w.shape[axis], -1)
    mask = np.zeros_like(moved, dtype=bool)
    mask[np.arange(moved.shape[0]), moved.argmax(1)] = True
    return np.moveaxis(mask.reshape(np.moveaxis(w, axis, 0).shape), 0, axis)
