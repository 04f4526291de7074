"""An ONNX graph run op by op in torch, so that quantization-aware training can fine-tune an ONNX model's layers:
each layer's weight and bias are parameters named by their initializers (trained values go back into the ONNX
file by name), and a hook per layer can fake-quantize its input and weight as its spec will run. Frozen at fixed
input shapes (`freeze`), it is also what litert-torch converts when an ONNX file is searched on LiteRT: each
layer's op runs as a submodule of its own (`layer_path`), so the converted weight names its layer.

Covers the ops of convolutional and MLP classifiers and of BERT-style encoders (a converter such as onnx2torch
needs torchvision, which has no build for this torch on PyPI); any other op is a one-line error naming it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from autoq.errors import AutoqError
from autoq.graph import Layer

Hook = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (input, weight) as they run


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _conv(x, w, b, a):
    spatial = w.dim() - 2
    pads = list(a.get("pads", [0] * 2 * spatial))
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise AutoqError("a Conv with auto_pad is not run in torch yet")
    padding = pads[:spatial]
    if pads[:spatial] != pads[spatial:]:  # the conv pads each side alike (one op for a converter); else pad first
        x, padding = F.pad(x, [p for i in reversed(range(spatial)) for p in (pads[i], pads[i + spatial])]), [0]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return conv(x, w, b, a.get("strides", 1), padding, a.get("dilations", 1), a.get("group", 1))


def _conv_transpose(x, w, b, a):
    """ONNX ConvTranspose (weight (C_in, C_out / group, *kernel)); its pads crop the full output."""
    spatial = w.dim() - 2
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or "output_shape" in a:
        raise AutoqError("a ConvTranspose with auto_pad or output_shape is not run in torch yet")
    conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[spatial]
    y = conv(x, w, b, a.get("strides", 1), 0, a.get("output_padding", 0), a.get("group", 1), a.get("dilations", 1))
    pads = list(a.get("pads", [0] * 2 * spatial))
    crop = [slice(None), slice(None)] + [slice(pads[i], y.shape[2 + i] - pads[i + spatial]) for i in range(spatial)]
    return y[tuple(crop)]


def _resize(i, a):
    """ONNX Resize (opset 11+) for the modes converters emit: nearest (asymmetric, floor) and linear."""
    x, mode = i[0], a.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    transform = a.get("coordinate_transformation_mode", b"half_pixel")
    transform = transform.decode() if isinstance(transform, bytes) else transform
    sizes = i[3] if len(i) > 3 and i[3] is not None and np.size(i[3]) else None
    size = [int(v) for v in sizes.tolist()[2:]] if sizes is not None else None
    scales = None if size is not None else [float(v) for v in i[2].tolist()[2:]]
    if mode == "nearest" and transform == "asymmetric" and a.get("nearest_mode", b"floor") in (b"floor", "floor"):
        return F.interpolate(x, size=size, scale_factor=scales, mode="nearest")
    if mode == "linear" and transform in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        kind = {3: "linear", 4: "bilinear", 5: "trilinear"}[x.dim()]
        return F.interpolate(x, size=size, scale_factor=scales, mode=kind, align_corners=transform == "align_corners")
    raise AutoqError(f"a Resize in mode {mode} with {transform} coordinates is not run in torch yet")


def _batch_norm(i, a):
    return F.batch_norm(i[0], i[3], i[4], i[1], i[2], False, 0.0, a.get("epsilon", 1e-5))


def _gemm(x, w, b, a):
    x = x.T if a.get("transA", 0) else x
    y = a.get("alpha", 1.0) * (x @ (w.T if a.get("transB", 0) else w))
    return y if b is None else y + a.get("beta", 1.0) * b


def _pool(kind):
    def run(x, a):
        spatial = x.dim() - 2
        pads = list(a.get("pads", [0] * 2 * spatial))
        value = -np.inf if kind == "max" else 0.0
        x = F.pad(x, [p for i in reversed(range(spatial)) for p in (pads[i], pads[i + spatial])], value=value)
        pool = F.max_pool2d if kind == "max" else F.avg_pool2d
        return pool(x, a["kernel_shape"], a.get("strides", a["kernel_shape"]), 0,
                    **({"ceil_mode": bool(a.get("ceil_mode", 0))}))
    return run


def _axes(inputs, a, default) -> list[int]:
    """An op's axes: an attribute before opset 13 (18 for reductions), an input after."""
    if "axes" in a:
        return list(a["axes"])
    return [int(v) for v in inputs[1].tolist()] if len(inputs) > 1 and inputs[1] is not None else list(default)


def _unsqueeze(x, axes):
    for axis in sorted(axis % (x.dim() + len(axes)) for axis in axes):
        x = x.unsqueeze(axis)
    return x


def _gather(x, indices, axis):
    axis %= x.dim()
    indices = torch.as_tensor(indices)
    taken = torch.index_select(x, axis, indices.reshape(-1).long() % x.shape[axis])
    return taken.reshape([*x.shape[:axis], *indices.shape, *x.shape[axis + 1:]])


_DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.INT64: torch.int64,
           onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.BOOL: torch.bool}


def _divide(a, b):
    """ONNX Div: integer division truncates."""
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _slice(x, starts, ends, axes=None, steps=None):
    axes = list(range(len(starts))) if axes is None else [int(a) % x.dim() for a in axes.tolist()]
    steps = [1] * len(axes) if steps is None else steps.tolist()
    index = [slice(None)] * x.dim()
    for axis, start, end, step in zip(axes, starts.tolist(), ends.tolist(), steps, strict=True):
        if step < 0:
            raise AutoqError("a Slice with a negative step is not run in torch yet")
        index[axis] = slice(start, end, step)
    return x[tuple(index)]


def _layer_norm(i, a):
    axis = a.get("axis", -1) % i[0].dim()
    return F.layer_norm(i[0], i[0].shape[axis:], i[1], i[2] if len(i) > 2 else None, a.get("epsilon", 1e-5))


def _constant_of_shape(shape, a):
    value = torch.from_numpy(numpy_helper.to_array(a["value"]).copy()) if "value" in a else torch.zeros(1)
    return torch.full([int(s) for s in shape.tolist()], value.item(), dtype=value.dtype)


def _gather_elements(x, index, axis):
    index = index.long()
    return torch.gather(x, axis, torch.where(index < 0, index + x.shape[axis], index))


def _reshape(x, shape):
    shape = [int(s) for s in shape.tolist()]
    shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


OPS: dict[str, Callable] = {  # op -> f(inputs, attributes) for the non-layer ops
    "Relu": lambda i, a: F.relu(i[0]),
    "Clip": lambda i, a: torch.clamp(i[0], *(float(v) if v is not None else None for v in (
        i[1] if len(i) > 1 else a.get("min"), i[2] if len(i) > 2 else a.get("max")))),
    "Add": lambda i, a: i[0] + i[1], "Sub": lambda i, a: i[0] - i[1], "Mul": lambda i, a: i[0] * i[1],
    "Div": lambda i, a: _divide(i[0], i[1]), "Pow": lambda i, a: torch.pow(i[0], i[1]),
    "Sqrt": lambda i, a: torch.sqrt(i[0]),
    "Sigmoid": lambda i, a: torch.sigmoid(i[0]), "Tanh": lambda i, a: torch.tanh(i[0]),
    "Erf": lambda i, a: torch.erf(i[0]), "Identity": lambda i, a: i[0],
    "HardSigmoid": lambda i, a: F.relu6(6 * a.get("alpha", 0.2) * i[0] + 6 * a.get("beta", 0.5)) / 6,  # XNNPACK
    # runs RELU6; a clamp to [0, 1] becomes RELU_0_TO_1, which it does not (the graph then splits around it)
    "HardSwish": lambda i, a: F.hardswish(i[0]), "LeakyRelu": lambda i, a: F.leaky_relu(i[0], a.get("alpha", 0.01)),
    "GlobalAveragePool": lambda i, a: F.adaptive_avg_pool2d(i[0], 1) if i[0].dim() == 4 else i[0].mean(
        dim=tuple(range(2, i[0].dim())), keepdim=True),
    "MaxPool": lambda i, a: _pool("max")(i[0], a), "AveragePool": lambda i, a: _pool("avg")(i[0], a),
    "Flatten": lambda i, a: i[0].reshape(int(np.prod(i[0].shape[:a.get("axis", 1)])), -1),
    "Reshape": lambda i, a: _reshape(i[0], i[1]), "Shape": lambda i, a: torch.tensor(i[0].shape, dtype=torch.int64),
    "Softmax": lambda i, a: torch.softmax(i[0], a.get("axis", -1)),
    "Transpose": lambda i, a: i[0].permute(a["perm"]) if "perm" in a else i[0].T,
    "Concat": lambda i, a: torch.cat(i, a["axis"]),
    "ReduceMean": lambda i, a: i[0].mean(dim=tuple(_axes(i, a, range(i[0].dim()))), keepdim=bool(a.get("keepdims", 1))),
    "Squeeze": lambda i, a: i[0].squeeze(tuple(_axes(i, a, []))),
    "Gather": lambda i, a: _gather(i[0], i[1], a.get("axis", 0)),
    "ReduceSum": lambda i, a: i[0].sum(dim=tuple(_axes(i, a, range(i[0].dim()))), keepdim=bool(a.get("keepdims", 1))),
    "Cast": lambda i, a: i[0].to(_DTYPES.get(a["to"], i[0].dtype)),
    "Unsqueeze": lambda i, a: _unsqueeze(i[0], _axes(i, a, [])),
    "LayerNormalization": _layer_norm, "ConstantOfShape": lambda i, a: _constant_of_shape(i[0], a),
    "Where": lambda i, a: torch.where(torch.as_tensor(i[0]).bool(), i[1], i[2]),
    "Expand": lambda i, a: i[0].expand(torch.broadcast_shapes(i[0].shape, tuple(int(s) for s in i[1].tolist()))),
    "Equal": lambda i, a: torch.eq(i[0], i[1]), "And": lambda i, a: torch.logical_and(i[0], i[1]),
    "GreaterOrEqual": lambda i, a: torch.ge(i[0], i[1]), "Greater": lambda i, a: torch.gt(i[0], i[1]),
    "Less": lambda i, a: torch.lt(i[0], i[1]), "Not": lambda i, a: torch.logical_not(i[0]),
    "Range": lambda i, a: torch.arange(i[0].item(), i[1].item(), i[2].item(), dtype=i[0].dtype),
    "Slice": lambda i, a: _slice(*i), "Resize": _resize, "BatchNormalization": _batch_norm,
    "GatherElements": lambda i, a: _gather_elements(i[0], i[1], a.get("axis", 0)),
    "ReduceL2": lambda i, a: i[0].pow(2).sum(dim=tuple(_axes(i, a, range(i[0].dim()))),
                                             keepdim=bool(a.get("keepdims", 1))).sqrt(),
    "Neg": lambda i, a: -i[0], "Exp": lambda i, a: torch.exp(i[0]), "Log": lambda i, a: torch.log(i[0]),
    "ReduceMax": lambda i, a: i[0].amax(dim=tuple(_axes(i, a, range(i[0].dim()))), keepdim=bool(a.get("keepdims", 1))),
    "Gelu": lambda i, a: F.gelu(i[0], approximate="tanh" if a.get("approximate", b"none") in (b"tanh", "tanh")
                                else "none"),
}
LAYERS = {"Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": lambda x, w, b, a: x @ w}


def _key(name: str) -> str:
    return name.replace(".", "_")


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


class LayerCall(torch.nn.Module):
    """One layer's op, called as a submodule of its own so that a converter tracing the model (litert-torch) names
    the layer's weight by that submodule."""

    def __init__(self, node: onnx.NodeProto) -> None:
        super().__init__()
        self.op_type, self.attributes = node.op_type, _attrs(node)

    def forward(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return LAYERS[self.op_type](x, w, bias, self.attributes)


def _static(proto: onnx.ModelProto) -> set[str]:
    """The tensors whose values do not depend on the inputs' values once the inputs' shapes are fixed."""
    known = {t.name for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type in ("Constant", "Shape") or all(not i or i in known for i in node.input):
            known.update(node.output)
    return known


class OnnxModule(torch.nn.Module):
    """`proto` (a float model whose layers are `layers`) as a torch module: the layers' weights and biases are
    parameters, every other initializer a constant; `hooks[layer]` changes what a layer computes with."""

    def __init__(self, proto: onnx.ModelProto, layers: list[Layer]) -> None:
        super().__init__()
        self.nodes = list(proto.graph.node)
        self.static = _static(proto)
        for node in self.nodes:
            if node.op_type not in OPS and node.op_type not in LAYERS and node.op_type != "Constant":
                raise AutoqError(f"autoq runs an ONNX model in torch (to fine-tune it or convert it to LiteRT) and "
                                 f"does not run its {node.op_type} op ({node.name}) yet")
        layer_nodes = {layer.name for layer in layers}
        stored = {tensor.name for tensor in proto.graph.initializer}
        trained = {name for node in self.nodes if node.name in layer_nodes and node.op_type in LAYERS
                   for name in node.input[1:3] if name in stored}  # weights and biases; tables stay as they are
        self.params = torch.nn.ParameterDict()
        self.constants: dict[str, torch.Tensor] = {}
        for tensor in proto.graph.initializer:
            value = torch.from_numpy(numpy_helper.to_array(tensor).copy())
            if tensor.name in trained:
                self.params[_key(tensor.name)] = torch.nn.Parameter(value.float())
            else:
                self.constants[tensor.name] = value
        self.trained = sorted(trained)
        self.layer_nodes = layer_nodes
        self.inputs = [i.name for i in proto.graph.input if i.name not in self.constants and _key(i.name)
                       not in self.params]
        self.outputs = [o.name for o in proto.graph.output]
        self.hooks: dict[str, Hook] = {}
        self.tensor_hooks: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}  # applied where a tensor is made
        self.calls = torch.nn.ModuleDict({f"layer{i}": LayerCall(node) for i, node in enumerate(self.nodes)
                                          if node.op_type in LAYERS})
        self.call_of = {node.name: f"layer{i}" for i, node in enumerate(self.nodes) if node.op_type in LAYERS}
        self.folded: dict[str, np.ndarray] = {}  # tensor -> its value, fixed for fixed input shapes (`freeze`)

    def freeze(self, *example: torch.Tensor) -> OnnxModule:
        """Fix the tensors computed from shapes and constants (shapes, indices, masks, scalars) at their values for
        the shapes of `example`, so that tracing (torch.export) sees a graph of float ops on the inputs only: what a
        converter to a fixed-shape runtime needs."""
        values: dict[str, np.ndarray] = {}
        original = self.tensor_hooks
        self.tensor_hooks = {}
        with torch.no_grad():
            self._run(example, values)
        self.tensor_hooks = original
        values.update((name, value.numpy()) for name, value in self.constants.items())
        self.folded = {name: value for name, value in values.items() if name in self.static and _key(name) not in
                       self.params and (not np.issubdtype(value.dtype, np.floating) or value.size == 1)}
        return self

    def layer_path(self, layer: str) -> str:
        """The submodule path (`calls.layerN`) that runs `layer`'s op."""
        return f"calls.{self.call_of[layer]}"

    def parameter(self, name: str) -> torch.nn.Parameter:
        """The trained parameter of ONNX initializer `name`."""
        return self.params[_key(name)]

    def weights(self) -> dict[str, np.ndarray]:
        """The trained initializers by their ONNX names."""
        return {name: self.params[_key(name)].detach().numpy().copy() for name in self.trained}

    def forward(self, *args: torch.Tensor) -> list[torch.Tensor]:
        return self._run(args, None)

    def _run(self, args: tuple[torch.Tensor, ...], record: dict[str, np.ndarray] | None) -> list[torch.Tensor]:
        """The graph on `args`; `record` (when given) receives every tensor made, as numpy."""
        values: dict[str, torch.Tensor] = {name: self.tensor_hooks.get(name, _same)(value)
                                           for name, value in zip(self.inputs, args, strict=True)}

        def get(name: str) -> torch.Tensor:
            if name in values:
                return values[name]
            if name in self.folded:  # shapes and indices stay numpy, constant scalars Python floats, when traced
                value = self.folded[name]  # (a tensor constant would keep a converter's layout pass in NCHW)
                return float(value.reshape(-1)[0]) if value.dtype.kind == "f" else value  # type: ignore[return-value]
            return self.params[_key(name)] if _key(name) in self.params else self.constants[name]

        for node in self.nodes:
            if node.output and all(name in self.folded for name in node.output):
                continue
            a = _attrs(node)
            if node.op_type == "Constant":
                outputs = [torch.from_numpy(numpy_helper.to_array(a["value"]).copy())]
            elif node.op_type in LAYERS:
                x, w = get(node.input[0]), get(node.input[1])
                if node.name in self.hooks:
                    x, w = self.hooks[node.name](x, w)
                bias = get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
                outputs = [self.calls[self.call_of[node.name]](x, w, bias)]
            else:
                outputs = [OPS[node.op_type]([get(i) if i else None for i in node.input], a)]
            values.update((name, self.tensor_hooks.get(name, _same)(value))
                          for name, value in zip(node.output, outputs, strict=False))
            if record is not None:
                record.update((name, value.detach().numpy()) for name, value in zip(node.output, outputs,
                                                                                    strict=False))
        return [values[name] for name in self.outputs]
