"""Learned rounding on ONNX Runtime's MatMulNBits and QDQ weights: a built model's weights read back against the
cached learned ones (`check_built`), and learned zero-pointed blocks written in (`store_blocks`): k-quant's
searched scales and zero points are not the min-max blocks ORT's quantizer finds in the learned weights."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from autoq.calibrate import Calibration
from autoq.errors import AutoqError
from autoq.graph import Layer, OnnxModel
from autoq.precision import Kind, Precision
from autoq.recovery.rounding import is_learned, load


def check_built(proto: onnx.ModelProto, model: OnnxModel, specs: dict[str, Precision],
                calibration: Calibration) -> None:
    """Raise unless each learned layer of a built ONNX Runtime model stores the learned integers (its weights
    times scales equal the cached grid weights): a quantizer that picked other scales would otherwise run
    round-to-nearest of the learned weights under the learned spec's name."""
    for layer in model.layers:
        spec = specs.get(layer.name)
        if spec is None or not is_learned(spec):
            continue
        fitted = load(calibration, layer.name, spec)
        built = _built_weight(proto, layer, spec)
        if fitted is None or built is None:
            raise AutoqError(f"{layer.name} ({spec}): its quantized weights are not in the built model")
        if not np.allclose(built, fitted.weight, rtol=1e-5, atol=1e-7):
            raise AutoqError(f"{layer.name} ({spec}): the quantizer did not keep the learned integers")


def store_blocks(proto: onnx.ModelProto, model: OnnxModel, specs: dict[str, Precision],
                 calibration: Calibration) -> int:
    """Write each learned zero-pointed layer's integers, scales and zero points into its MatMulNBits node (built
    by round-to-nearest of the learned weights), in place: k-quant's searched blocks are not the min-max blocks
    ORT's quantizer would find in them. Returns how many layers were written."""
    stored = {t.name: t for t in proto.graph.initializer}
    nodes = {node.name: node for node in proto.graph.node}
    written = 0
    for layer in model.layers:
        spec = specs.get(layer.name)
        if spec is None or not is_learned(spec) or spec.kind != Kind.WEIGHT_ONLY or spec.symmetric:
            continue
        node, fitted = nodes.get(f"{layer.name}_Q{spec.bits}"), load(calibration, layer.name, spec)
        if node is None or fitted is None or fitted.block_scale is None or fitted.block_zero is None \
                or len(node.input) < 4:
            raise AutoqError(f"{layer.name} ({spec}): no zero-pointed MatMulNBits to write its learned blocks into")
        group, inputs = spec.group, layer.weight_shape[0]
        scale, zero = fitted.block_scale, fitted.block_zero  # (outputs, blocks)
        q = np.round(fitted.weight / scale.T.repeat(group, 0)[:inputs]) + zero.T.repeat(group, 0)[:inputs]
        q = np.concatenate([q, np.repeat(zero[:, -1:].T, -inputs % group, 0)])  # padding dequantizes to 0
        values = {node.input[1]: _pack(q.T.reshape(zero.shape[0], zero.shape[1], group), spec.bits),
                  node.input[2]: scale}
        points = _unpack(numpy_helper.to_array(stored[node.input[3]]), spec.bits).reshape(zero.shape[0], -1)
        points[:, :zero.shape[1]] = zero
        values[node.input[3]] = _pack(points, spec.bits)
        for name, value in values.items():
            old = numpy_helper.to_array(stored[name])
            stored[name].CopyFrom(numpy_helper.from_array(value.astype(old.dtype).reshape(old.shape), name))
        written += 1
    return written


def _built_weight(proto: onnx.ModelProto, layer: Layer, spec: Precision) -> np.ndarray | None:
    """The weight a built model computes `layer` with, de-quantized: a static layer's DequantizeLinear (integers
    times per-channel scales), a weight-only layer's MatMulNBits (`<layer>_Q<bits>`: unsigned blocks packed low
    bits first, one scale per output and block, the zero points packed alike, or 2^(bits-1) when symmetric)."""
    stored = {t.name: t for t in proto.graph.initializer}
    if spec.kind == Kind.WEIGHT_ONLY:
        node = next((n for n in proto.graph.node if n.name == f"{layer.name}_Q{spec.bits}"), None)
        if node is None or node.input[1] not in stored or node.input[2] not in stored:
            return None
        packed, scales = (numpy_helper.to_array(stored[name]) for name in node.input[1:3])
        outputs, blocks = packed.shape[:2]
        zero: np.ndarray | float = 2 ** (spec.bits - 1)
        if len(node.input) > 3 and node.input[3] in stored:
            zero = _unpack(numpy_helper.to_array(stored[node.input[3]]), spec.bits).reshape(outputs, -1)[:, :blocks]
            zero = zero[:, :, None]
        q = _unpack(packed, spec.bits).reshape(outputs, blocks, -1) - zero
        weight = (q * scales.reshape(outputs, blocks, 1)).reshape(outputs, -1)
        return weight[:, :layer.weight_shape[0]].T  # (outputs, padded inputs) -> the MatMul's (inputs, outputs)
    producer = {out: node for node in proto.graph.node for out in node.output}
    node = next((n for n in proto.graph.node if n.name == layer.name), None)
    dequantize = producer.get(node.input[1]) if node is not None else None
    if dequantize is None or dequantize.input[0] not in stored:
        return None
    q, scale = (numpy_helper.to_array(stored[name]) for name in dequantize.input[:2])
    shape = [1] * q.ndim
    shape[layer.channel_axis] = -1
    return q.astype(np.float32) * scale.reshape(shape)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' unsigned `bits`-bit values, packed low bits first in each byte, as float (last axis widened)."""
    values = np.stack([(packed >> (bits * i)) & (2 ** bits - 1) for i in range(8 // bits)], -1)
    return values.reshape(*packed.shape[:-1], -1).astype(np.float32)


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """`_unpack`'s inverse: unsigned `bits`-bit values packed low bits first, 8 // bits to a byte (last axis)."""
    grouped = values.astype(np.uint8).reshape(*values.shape[:-1], -1, 8 // bits)
    packed = np.zeros(grouped.shape[:-1], dtype=np.uint8)
    for i in range(8 // bits):
        packed |= grouped[..., i] << (bits * i)
    return packed
