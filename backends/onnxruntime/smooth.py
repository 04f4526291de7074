"""SmoothQuant for ONNX Runtime's dynamic int8 MatMuls: move each input channel's outliers into the weights.

A transformer's activations carry a few channels with values 10-100x the rest; quantized per tensor at run time,
they take the whole int8 range. For each input tensor of the smoothed layers, with `a_j` the channel's largest
|activation| on the calibration samples and `w_j` the largest |weight| in that input row over the layers reading
it, `s_j = a_j^alpha / w_j^(1 - alpha)`: a `Mul` by `1/s` goes in front of those layers (shared by the layers
that share the input and the alpha) and their weight rows are multiplied by `s`. The float function is
unchanged. It is a per-layer spec (`int8-dyn-pc-sq0.7`), not a model-wide switch, because each Mul costs a float
pass over its input: the search smooths where the cosine gained pays for it (figures:
reports/benchmarks/smooth_quant.md). Per-tensor weights lose by it, so only `int8-dyn-pc` is smoothed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from autoq.calibrate import Calibration
from autoq.data import Dataset, batch_size
from autoq.files import written_whole
from autoq.graph import OnnxModel, probe_session, save_onnx
from autoq.quantsim import smoothing_scale

SMOOTHED, MUL = "_smoothed", "_mul"  # a smoothed input is `<tensor>_smoothed<alpha>`, made by `<that>_mul`


def smoothed(producer: onnx.NodeProto | None) -> str:
    """`-sq<alpha>` if `producer` (of a dynamic int8 kernel's float input) is a smoothing Mul, else ''."""
    if producer is None or producer.op_type != "Mul" or not producer.name.endswith(MUL) or SMOOTHED not in \
            producer.name:
        return ""
    return f"-sq{producer.name.removesuffix(MUL).rsplit(SMOOTHED, 1)[1]}"


def channel_maxima(model: OnnxModel, calibration: Calibration) -> dict[str, np.ndarray]:
    """Input tensor of every MatMul layer -> its largest |value| per channel (last axis) on the calibration
    samples; computed once per model and calibration, cached beside the calibration."""
    cache = calibration.derived("channel-max.npz")
    if cache.is_file():
        return dict(np.load(cache))
    layers = {la.name for la in model.layers if la.op_type == "MatMul"}
    tensors = sorted({n.input[0] for n in model.proto.graph.node if n.name in layers})
    session = probe_session(model.proto, tensors)
    samples = Dataset(calibration.samples())
    maxima: dict[str, np.ndarray] = {}
    for feeds in samples.batches(batch_size(model.inputs)):
        for tensor, value in zip(tensors, session.run(tensors, feeds), strict=True):
            found = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            maxima[tensor] = np.maximum(maxima.get(tensor, found), found)
    with written_whole(cache) as partial:
        np.savez(partial, **maxima)  # type: ignore[arg-type]
    return maxima


def smooth(path: Path, model: OnnxModel, alphas: dict[str, float], calibration: Calibration) -> None:
    """Smooth the inputs of the MatMul layers in `alphas` (layer -> its spec's alpha) of the model at `path` in
    place (see the module docstring); the layers that read one input with one alpha share one Mul."""
    if not alphas:
        return
    maxima = channel_maxima(model, calibration)
    original_input = {n.name: n.input[0] for n in model.proto.graph.node}
    proto = onnx.load(str(path))
    graph = proto.graph
    constants = {t.name: t for t in graph.initializer}
    groups: dict[tuple[str, float], list[onnx.NodeProto]] = {}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
        if node.name in alphas and node.op_type == "MatMul" and node.input[1] in constants:
            groups.setdefault((node.input[0], alphas[node.name]), []).append(node)
    muls: dict[str, list[onnx.NodeProto]] = {}
    for (tensor, alpha), users in groups.items():
        activations = maxima.get(original_input[users[0].name])
        if activations is None or any(readers[n.input[1]] > 1 for n in users):  # a shared weight stays as it is
            continue
        weights = [numpy_helper.to_array(constants[n.input[1]]) for n in users]
        peak = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        scale = smoothing_scale(activations, peak, alpha)
        smoothed = f"{tensor}{SMOOTHED}{alpha:g}"
        for node, weight in zip(users, weights, strict=True):
            stored = constants[node.input[1]]
            stored.CopyFrom(numpy_helper.from_array((weight * scale[:, None]).astype(np.float32), stored.name))
            node.input[0] = smoothed
        graph.initializer.append(numpy_helper.from_array((1 / scale).astype(np.float32), f"{smoothed}_divisor"))
        muls.setdefault(tensor, []).append(helper.make_node("Mul", [tensor, f"{smoothed}_divisor"], [smoothed],
                                                            name=f"{smoothed}{MUL}"))
    if not muls:
        return
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(mul for t in muls if t in {i.name for i in graph.input} for mul in muls[t])
    for node in nodes:  # each Mul right after the node that makes its input: the graph stays sorted
        graph.node.append(node)
        graph.node.extend(mul for out in node.output for mul in muls.get(out, []))
    save_onnx(proto, path)
