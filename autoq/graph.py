"""ONNX model loading, validation and normalisation; quantizable layer discovery (params, MACs)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from autoq.errors import AutoqError
from autoq.fold import simplify

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
TABLE_OPS = ("Gather",)  # embedding tables: a constant 2-D table (input 0) indexed by the activation
MIN_OPSET = 13  # per-channel QDQ needs opset >= 13
MAX_PROTO_BYTES = 1_800_000_000  # above this, save weights as external data


@dataclass(frozen=True)
class Layer:
    """A quantizable op with a constant weight (an embedding table for a Gather), named by its ONNX node name."""

    name: str
    op_type: str
    weight: str
    weight_shape: tuple[int, ...]
    params: int
    macs: int
    channel_axis: int = 0  # the weight's output-channel axis (a table's rows), what per-channel scales follow
    constant_lookup: bool = False  # a table read at indices no input's values decide (positions): a converter
    # with static shapes folds the lookup into a constant, leaving no op to quantize (LiteRT)


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int | None, ...]  # None for a symbolic dimension
    dtype: np.dtype


@dataclass
class OnnxModel:
    """A normalised model saved at `path`, with its layers and input signature."""

    path: Path
    proto: onnx.ModelProto
    layers: list[Layer]
    inputs: list[InputSpec]
    outputs: list[str]
    module: object | None = None  # the torch nn.Module it was exported from, for the torch backend

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load and check an ONNX file (external data beside it is loaded too)."""
    path = Path(path)
    if not path.is_file():
        msg = f"model file not found: {path}"
        raise AutoqError(msg)
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises several unrelated types for a corrupt file
        msg = f"{path} is not a readable ONNX model ({type(exc).__name__}): re-export it"
        raise AutoqError(msg) from exc
    if not model.graph.node:
        msg = f"{path} is not a valid ONNX model: its graph has no nodes"
        raise AutoqError(msg)
    try:
        onnx.checker.check_model(model if model.ByteSize() < MAX_PROTO_BYTES else str(path))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        if not (first.startswith("No Op registered") and _runtime_loads(path)):  # ONNX Runtime's own ops
            msg = f"{path} fails the ONNX checker: {first}"
            raise AutoqError(msg) from exc
    return model


def _runtime_loads(path: Path) -> bool:
    """Whether ONNX Runtime's CPU provider loads the model (its contrib ops, e.g. SimplifiedLayerNormalization in
    exported language models, are unknown to the ONNX checker)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception:  # any refusal means: report the checker's finding
        return False
    return True


def normalise(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make a model quantizer-ready: opset >= 13, weights as initializers, BatchNorm folded (`autoq.fold`),
    unique node names, shapes."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:
            msg = f"cannot upgrade the model from opset {opset} to {MIN_OPSET}: {exc}; re-export with opset >= 13"
            raise AutoqError(msg) from exc
    graph = model.graph
    kept = []
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value" and a.type == a.TENSOR), None)
        if node.op_type == "Constant" and value is not None:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    del graph.input[:]
    graph.input.extend(inputs)
    model = simplify(model)
    graph = model.graph
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{index}"
        while name in seen:
            name = f"{name}_{index}"
        node.name = name
        seen.add(name)
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is a help for MACs, not a requirement
        return model


def _dims(value_info: onnx.ValueInfoProto) -> tuple[int | None, ...]:
    shape = value_info.type.tensor_type.shape
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in shape.dim)


def _elements(shape: tuple[int | None, ...] | None) -> int:
    return int(np.prod([d or 1 for d in shape])) if shape else 0


def find_layers(model: onnx.ModelProto) -> list[Layer]:
    """Every Conv/ConvTranspose/Gemm/MatMul whose weight (input 1) is a constant, and every Gather from a constant
    2-D table (an embedding), in graph order."""
    graph = model.graph
    weights = {t.name: tuple(t.dims) for t in graph.initializer}
    shapes = {v.name: _dims(v) for v in [*graph.value_info, *graph.input, *graph.output]}
    layers = []
    for node in graph.node:
        if node.op_type in TABLE_OPS and node.input[0] in weights and len(weights[node.input[0]]) == 2:
            table = weights[node.input[0]]
            layers.append(Layer(node.name, node.op_type, node.input[0], table, int(np.prod(table)), 0, 0,
                                constant_lookup=not _reads_input_values(graph, node.input[1])))
            continue
        if node.op_type not in LAYER_OPS or len(node.input) < 2 or node.input[1] not in weights:
            continue
        w = weights[node.input[1]]
        params = int(np.prod(w)) + (int(np.prod(weights[node.input[2]])) if len(node.input) > 2 and
                                    node.input[2] in weights else 0)
        out = _elements(shapes.get(node.output[0]))
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        if node.op_type == "Conv":
            macs, axis = out * int(np.prod(w[1:])), 0
        elif node.op_type == "ConvTranspose":
            macs, axis = _elements(shapes.get(node.input[0])) * int(np.prod(w[1:])), 1
        elif node.op_type == "Gemm":
            macs, axis = out * (w[1] if trans_b else w[0]), 0 if trans_b else 1
        else:
            macs, axis = out * w[0], len(w) - 1
        layers.append(Layer(node.name, node.op_type, node.input[1], w, params, int(macs), axis))
    return layers


def _reads_input_values(graph: onnx.GraphProto, tensor: str) -> bool:
    """Whether `tensor` depends on the values of a graph input, not only on constants and inputs' shapes."""
    made_by = {out: node for node in graph.node for out in node.output}
    inputs = {value.name for value in graph.input} - {tensor.name for tensor in graph.initializer}
    pending, seen = [tensor], set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in inputs:
            return True
        node = made_by.get(name)
        if node is not None and node.op_type not in ("Shape", "Size"):
            pending.extend(i for i in node.input if i)
    return False


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    specs = []
    for value in model.graph.input:
        elem = value.type.tensor_type.elem_type
        specs.append(InputSpec(value.name, _dims(value), np.dtype(helper.tensor_dtype_to_np_dtype(elem))))
    return specs


def save_onnx(model: onnx.ModelProto, path: Path) -> Path:
    """Save a model, moving weights to `<name>.data` when the protobuf would be too large."""
    large = model.ByteSize() > MAX_PROTO_BYTES
    onnx.save(model, str(path), save_as_external_data=large, location=f"{path.name}.data")
    return path


def stored_bytes(path: Path) -> int:
    """Bytes of an ONNX file and the external data files its weights are in."""
    proto = onnx.load(str(path), load_external_data=False)
    places = {entry.value for tensor in proto.graph.initializer for entry in tensor.external_data
              if entry.key == "location"}
    return path.stat().st_size + sum((path.parent / place).stat().st_size for place in places)


def prepare(source: str | Path, workdir: Path) -> OnnxModel:
    """Load, validate and normalise `source`; save the result as `workdir/model.onnx`."""
    model = normalise(load_onnx(source))
    layers = find_layers(model)
    if not layers:
        msg = (f"{source} has no quantizable layers (Conv, ConvTranspose, Gemm or MatMul with a constant "
               "weight): nothing to search")
        raise AutoqError(msg)
    workdir.mkdir(parents=True, exist_ok=True)
    return opened(save_onnx(model, workdir / "model.onnx"), model, layers)


def opened(path: Path, model: onnx.ModelProto | None = None, layers: list[Layer] | None = None) -> OnnxModel:
    """An OnnxModel for a file `prepare` already wrote (no checks or normalisation again)."""
    model = model or onnx.load(str(path))
    outputs = [o.name for o in model.graph.output]
    return OnnxModel(path, model, layers or find_layers(model), input_specs(model), outputs)


def weight_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    return numpy_helper.to_array(tensor)


def weights_as_inputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` whose initializers `names` are graph inputs instead, so one session runs any value of them."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    moved = [t for t in proto.graph.initializer if t.name in set(names)]
    for tensor in moved:
        proto.graph.initializer.remove(tensor)
        proto.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return proto


def probe_session(model: onnx.ModelProto, tensors: list[str]):
    """A CPU ONNX Runtime session of (a copy of) `model` that can also return the internal `tensors`."""
    import onnxruntime as ort

    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    known = {o.name for o in proto.graph.output}
    proto.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in tensors if t not in known)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def first_run(model: OnnxModel, feeds: dict[str, np.ndarray]) -> None:
    """Run the FP32 model once on the user's data with ONNX Runtime (what calibration does next), turning anything
    the runtime rejects into one line: what failed, in the runtime's words, and what to check."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # the error is said once, below, not logged by ORT too
    try:
        ort.InferenceSession(model.proto.SerializeToString(), options,
                             providers=["CPUExecutionProvider"]).run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - every runtime failure here is the user's model or data
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # ORT's "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : " prefix
        text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : ", "", text).strip()
        hint = ("the model uses an op ONNX Runtime does not know: export it with standard ONNX ops"
                if "not a registered function/op" in text or "No Op registered" in text else
                "check the data: its arrays' names, shapes, dtypes and value ranges (e.g. token ids within the "
                "vocabulary) must be what the model takes")
        msg = f"the FP32 model does not run on this data with ONNX Runtime ({text}): {hint}"
        raise AutoqError(msg) from None


def tied_tables(proto: onnx.ModelProto) -> dict[str, str]:
    """Embedding table (Gather) -> the MatMul whose constant weight is that table transposed: a tied LM head
    (`tie_word_embeddings`) exported with a transposed copy."""
    weights = {t.name: t for t in proto.graph.initializer}
    gathers = [n for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in weights]
    heads = [n for n in proto.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in weights]
    ties: dict[str, str] = {}
    for gather in gathers:
        table = weights[gather.input[0]]
        for head in heads:
            weight = weights[head.input[1]]
            if tuple(weight.dims) == tuple(reversed(table.dims)) and np.array_equal(
                    numpy_helper.to_array(weight).T, numpy_helper.to_array(table)):
                ties[gather.name] = head.name
                break
    return ties
