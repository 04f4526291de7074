"""Learned rounding on LiteRT: the cached learned weights (`autoq.recovery.rounding`) written into a copy of the
float flatbuffer in place of the layers' float weights, before AI Edge Quantizer quantizes it.

Its static int8 weights are symmetric per output channel over [-127, 127] with scale max|w| / 127, the grid the
weights were learned on, so it stores the learned integers; `check` reads them back from the built file. A
layer's weight is found by its op's output tensor (`Op.output`) and laid out as the flatbuffer has it (a
convolution's OHWI, a depthwise's 1HWO, a fully connected's (out, in)): the permutation of the ONNX weight that
gives the stored float weight, times the constant the converter may fold into it (`_layout`).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from autoq.backends.litert.model import Op
from autoq.calibrate import Calibration
from autoq.errors import AutoqError
from autoq.graph import OnnxModel, weight_array
from autoq.precision import Precision
from autoq.recovery import rounding

_Weight = tuple[np.ndarray, int]  # the stored weight's bytes (a view into the file) and its tensor index
Layout = tuple[tuple[int, ...], float]  # the permutation of the ONNX weight, and the factor folded into it


def _weights(data: bytearray, outputs: dict[str, str]) -> dict[str, _Weight]:
    """Layer -> its op's weight (input 1) in the flatbuffer `data`, for the layers whose op writes `outputs[layer]`."""
    from ai_edge_litert import schema_py_generated as schema

    flat = schema.Model.GetRootAsModel(data, 0)
    graph = flat.Subgraphs(0)
    by_output = {graph.Tensors(op.Outputs(0)).Name().decode(): op for op in
                 (graph.Operators(i) for i in range(graph.OperatorsLength())) if op.OutputsLength()}
    found = {}
    for layer, output in outputs.items():
        op = by_output.get(output)
        if op is None or op.InputsLength() < 2:
            raise AutoqError(f"learned rounding: no op writes {output} ({layer}) in the float LiteRT model")
        index = int(op.Inputs(1))
        buffer = flat.Buffers(graph.Tensors(index).Buffer())
        if buffer.Offset() > 1:  # stored after the flatbuffer (large models)
            raw = np.frombuffer(memoryview(data)[buffer.Offset():buffer.Offset() + buffer.Size()], np.uint8)
        else:
            raw = buffer.DataAsNumpy()
        found[layer] = (raw, index)
    return found


def _shape(data: bytearray, index: int) -> tuple[int, ...]:
    from ai_edge_litert import schema_py_generated as schema

    return tuple(int(d) for d in schema.Model.GetRootAsModel(data, 0).Subgraphs(0).Tensors(index).ShapeAsNumpy())


def _layout(weight: np.ndarray, stored: np.ndarray, shape: tuple[int, ...]) -> Layout:
    """The axes permutation of the ONNX `weight`, and the factor, that give the flatbuffer's float weight `stored`
    (of `shape`): the converter folds a constant scaling of the output into the weight (HardSigmoid's 0.2 after a
    squeeze-and-excitation convolution, written as relu6(1.2 x + 3) / 6), which leaves the per-channel grid's
    integers as they were."""
    for order in itertools.permutations(range(weight.ndim)):
        moved = weight.transpose(order)
        if moved.size != stored.size:
            continue
        moved, found = moved.reshape(shape), stored.reshape(shape)
        nonzero = np.abs(moved) > 1e-12
        factor = float(np.median(found[nonzero] / moved[nonzero])) if nonzero.any() else 1.0
        if factor > 0 and np.allclose(factor * moved, found, rtol=1e-4, atol=1e-6):
            return order, factor
    raise AutoqError("learned rounding: a layer's weight is laid out in the LiteRT model in no way autoq can match")


def substitute(source: Path, out: Path, model: OnnxModel, specs: dict[str, Precision], calibration: Calibration,
               ops: dict[str, Op]) -> dict[str, Layout]:
    """Write `source` to `out` with the learned weights of the layers whose spec is learned (fitting what is not
    cached yet); returns each such layer's layout (`_layout`)."""
    learned = {layer: spec for layer, spec in specs.items() if rounding.is_learned(spec)}
    if not learned:
        return {}
    layers = {layer.name: layer for layer in model.layers}
    rounding.prepare(model, calibration, [(layers[name], spec) for name, spec in learned.items()])
    data = bytearray(source.read_bytes())
    layouts = {}
    for name, (raw, index) in _weights(data, {name: ops[name].output for name in learned}).items():
        fitted = rounding.load(calibration, name, learned[name])
        if fitted is None:
            raise AutoqError(f"no learned weights for {name} ({learned[name]})")
        stored, shape = raw.view(np.float32), _shape(data, index)
        layouts[name] = order, factor = _layout(weight_array(model.proto, layers[name].weight), stored, shape)
        stored[:] = factor * fitted.weight.transpose(order).reshape(-1)
    out.write_bytes(bytes(data))
    return layouts


def check(built: Path, layouts: dict[str, Layout], specs: dict[str, Precision], calibration: Calibration,
          ops: dict[str, Op]) -> None:
    """Raise unless each learned layer's int8 weight in `built`, times its per-channel scales, is its cached grid
    weight laid out as `layouts` says (the quantizer kept the learned integers)."""
    from ai_edge_litert import schema_py_generated as schema

    if not layouts:
        return
    data = bytearray(built.read_bytes())
    graph = schema.Model.GetRootAsModel(data, 0).Subgraphs(0)
    for name, (raw, index) in _weights(data, {name: ops[name].output for name in layouts}).items():
        quantization = graph.Tensors(index).Quantization()
        fitted = rounding.load(calibration, name, specs[name])
        if quantization is None or quantization.ScaleLength() == 0 or fitted is None:
            raise AutoqError(f"{name} ({specs[name]}): its int8 weights are not in the built LiteRT model")
        shape = _shape(data, index)
        along = [1] * len(shape)
        along[int(quantization.QuantizedDimension())] = -1
        stored = raw.view(np.int8).reshape(shape) * quantization.ScaleAsNumpy().astype(np.float32).reshape(along)
        order, factor = layouts[name]
        if not np.allclose(stored, factor * fitted.weight.transpose(order).reshape(shape), rtol=1e-5, atol=1e-7):
            raise AutoqError(f"{name} ({specs[name]}): the LiteRT quantizer did not keep the learned integers")
