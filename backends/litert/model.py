"""A torch module as a LiteRT flatbuffer, and what its ops run in.

`litert-torch` converts the user's module (no TensorFlow), or an ONNX file's graph run in torch, once per model,
cached beside the calibration. Each autoq layer (a module FQN, or its op's submodule in the ONNX graph) maps to
the TFLite op whose weight tensor carries that module's scope: litert-torch names a weight
`<root class>/<class>_<attribute>/...` down the modules called, which `scope` rebuilds from the module itself.
What an op runs in is read from the built flatbuffer: the types of its input and weight (a weight made by a
DEQUANTIZE op is stored in that op's input type and computed in float).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoq.errors import AutoqError
from autoq.graph import OnnxModel
from autoq.quiet import captured, native_stderr_hushed

LOOKUP = "EMBEDDING_LOOKUP"  # an embedding table's op (ids, table): the table is its input 1, as a weight is
LAYER_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "BATCH_MATMUL", LOOKUP)
SIGNATURE = "serving_default"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """litert-torch, the converter and the quantizer print progress, reports and absl lines (natively too), and
    importing them loads torchao, which reports its missing CUDA kernels: keep all of it off the user's console
    (unless verbose). Their imports happen inside it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with captured(), native_stderr_hushed():
        yield


def stack() -> tuple[object, object, object]:
    """(litert_torch, ai_edge_quantizer's quantizer module, the LiteRT Interpreter class), imported quietly."""
    with quiet():
        import litert_torch
        from ai_edge_litert.interpreter import Interpreter
        from ai_edge_quantizer import quantizer

    return litert_torch, quantizer, Interpreter


def _qualified(cls: type) -> str:
    """`module.Class` as litert-torch names it; a class of the user's script is `__main__`'s in every process (a
    spawned trial worker imports that script as `__mp_main__`)."""
    return f"{_main(cls.__module__)}.{cls.__qualname__}"


def _main(name: str) -> str:
    return "__main__" + name.removeprefix("__mp_main__") if name.startswith("__mp_main__") else name


def scope(module: object, fqn: str) -> str:
    """The name litert-torch gives the weights of submodule `fqn` of `module`: the modules called on the way down
    (a ModuleList or ModuleDict is never called, so it is not named)."""
    import torch

    parts, current = [_qualified(type(module))], module
    for attribute in fqn.split("."):
        current = getattr(current, attribute)
        if not isinstance(current, torch.nn.ModuleList | torch.nn.ModuleDict):
            parts.append(f"{_qualified(type(current))}_{attribute}")
    return "/".join(parts)


_FROM_ONNX: dict[Path, Any] = {}  # an ONNX model's file -> its graph as a torch module (OnnxModule)


def torch_module(model: OnnxModel) -> tuple[Any, dict[str, str]]:
    """The torch module litert-torch converts, and each layer's submodule path in it: the user's module (layers
    are its FQNs), or an ONNX file's graph run op by op in torch (`OnnxModule`, one submodule per layer); a graph
    with an op it does not run is a one-line error naming the op."""
    if model.module is not None:  # a layer not named by a module (no FQN found for its weight) maps to no op
        fqns = {layer.name: layer.name.split("#")[0] for layer in model.layers}
        return model.module, {layer: fqn for layer, fqn in fqns.items() if _submodule(model.module, fqn)}
    from autoq.recovery.onnx_torch import OnnxModule

    if model.path not in _FROM_ONNX:
        _FROM_ONNX[model.path] = OnnxModule(model.proto, model.layers).eval()
    module = _FROM_ONNX[model.path]
    return module, {layer.name: module.layer_path(layer.name) for layer in model.layers}


def _submodule(module: Any, fqn: str) -> bool:
    try:
        module.get_submodule(fqn)
    except AttributeError:
        return False
    return True


def _example(model: OnnxModel, samples: dict[str, np.ndarray]) -> tuple[Any, tuple]:
    """The module to convert, ready for tracing at batch 1, and its example inputs."""
    import torch

    module, _ = torch_module(model)
    module.eval()
    example = tuple(torch.from_numpy(samples[spec.name][:1]) for spec in model.inputs)
    if model.module is None:  # the ONNX graph's shape arithmetic fixed at these shapes
        module.freeze(*example)
    return module, example


def float_model(model: OnnxModel, samples: dict[str, np.ndarray], folder: Path) -> Path:
    """The model (`torch_module`) converted to an FP32 `.tflite` (batch 1, inputs in `model.inputs` order), cached
    in `folder` by the exported graph's digest."""
    digest = hashlib.sha1(model.path.read_bytes()).hexdigest()[:12]
    path = folder / f"litert-fp32-{digest}.tflite"
    if path.is_file():
        return path
    litert_torch, _, _ = stack()
    module, example = _example(model, samples)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with quiet():
            converted = litert_torch.convert(module, example)  # type: ignore[attr-defined]
            converted.export(str(path.with_suffix(".partial")))
    except Exception as exc:  # the converter raises many types; the user needs the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AutoqError(f"litert-torch cannot convert this module: {first[:300]}") from exc
    path.with_suffix(".partial").replace(path)
    return path


def pt2e_model(model: OnnxModel, samples: dict[str, np.ndarray], path: Path) -> Path:
    """The model (`torch_module`) quantized by litert-torch's own recipe (its PT2E quantizer, symmetric int8 with
    per-channel weights, observed on `samples` one at a time) and converted to `path`."""
    import torch

    litert_torch, _, _ = stack()
    module, example = _example(model, samples)
    with quiet():
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        names = [spec.name for spec in model.inputs]
        graph = prepare_pt2e(torch.export.export(module, example).module(), quantizer)
        with torch.no_grad():
            for i in range(len(samples[names[0]])):
                graph(*(torch.from_numpy(samples[name][i:i + 1]) for name in names))
        graph = convert_pt2e(graph, fold_quantize=False)
        converted = litert_torch.convert(graph, example, quant_config=QuantConfig(pt2e_quantizer=quantizer))  # type: ignore[attr-defined]
        converted.export(str(path))
    return path


@dataclass(frozen=True)
class Op:
    """A layer's op in a flatbuffer: its type, output tensor, and the types of its input and weight as they run
    (`weight_stored`: the weight's type in the file, before any DEQUANTIZE)."""

    kind: str
    output: str
    input_type: str
    weight_type: str
    weight_stored: str
    weight_scales: int


def interpreter(path: Path, threads: int = 1) -> Any:
    """The LiteRT interpreter (XNNPACK by default) on `path`, tensors allocated."""
    _, _, made_by = stack()
    with quiet():
        made = made_by(str(path), num_threads=threads)  # type: ignore[operator]
        made.allocate_tensors()
    return made


def weight_sizes(model: OnnxModel) -> dict[str, int]:
    """Layer -> the element count of its weight (what tells apart layers whose names one op's weight shares)."""
    stored = {t.name: int(np.prod(t.dims)) for t in model.proto.graph.initializer}
    return {layer.name: stored.get(layer.weight, 0) for layer in model.layers}


def stored_types(path: Path) -> list[str]:
    """Each tensor's type in the flatbuffer at `path` (main subgraph, by index), lower-case (`float32`, `int8`,
    `int4`): the interpreter reports an int4 tensor as int8."""
    from ai_edge_litert import schema_py_generated as schema

    names = {code: name.lower() for name, code in vars(schema.TensorType).items() if not name.startswith("_")}
    graph = schema.Model.GetRootAsModel(path.read_bytes(), 0).Subgraphs(0)
    return [names.get(graph.Tensors(i).Type(), "?") for i in range(graph.TensorsLength())]


def layer_ops(path: Path, scopes: dict[str, str], sizes: dict[str, int]) -> dict[str, Op]:
    """Layer -> its op in the flatbuffer at `path`. An op's weight is named by the scopes of the modules it came
    from, `;`-joined (a fused op's weight names its neighbours too, e.g. a key projection also names the query's):
    the op takes the first module named there that is a layer not taken yet, with the weight's size."""
    runner = interpreter(path)
    tensors = {t["index"]: t for t in runner.get_tensor_details()}
    ops = [op for op in runner._get_ops_details() if op["op_name"] != "DELEGATE"]
    made_by = {int(out): op for op in ops for out in op["outputs"]}
    types = stored_types(path)

    def type_of(tensor: dict) -> str:
        index = int(tensor["index"])
        return types[index] if index < len(types) else np.dtype(tensor["dtype"]).name

    by_scope: dict[str, list[str]] = {}
    for layer, name in scopes.items():
        by_scope.setdefault(name, []).append(layer)
    found: dict[str, Op] = {}
    for op in ops:
        if op["op_name"] not in LAYER_OPS or len(op["inputs"]) < 2:
            continue
        weight = stored = tensors[int(op["inputs"][1])]
        source = made_by.get(int(op["inputs"][1]))
        if source is not None and source["op_name"] == "DEQUANTIZE":
            stored = tensors[int(source["inputs"][0])]
        size = int(np.prod(weight["shape"]))
        names = [stored["name"]]
        if op["op_name"] == LOOKUP:  # a table is named as a constant; the lookup's output names its module
            names.append(tensors[int(op["outputs"][0])]["name"])
        named = [layer for name in names for part in name.split(";") for layer in by_scope.get(_main(part), [])]
        taker = next((la for la in named if la not in found and sizes.get(la, size) == size), None)
        if taker is None:
            continue
        scales = stored.get("quantization_parameters", {}).get("scales", np.zeros(0))
        found[taker] = Op(op["op_name"], tensors[int(op["outputs"][0])]["name"],
                          type_of(tensors[int(op["inputs"][0])]), type_of(weight), type_of(stored), int(len(scales)))
    return found


def ran_as(op: Op) -> str:
    """The autoq spec an op runs as: int8 input and weight: static int8; float input, int8 weight: dynamic int8
    (per channel where the weight has a scale per channel); a weight dequantized to float: weight-only in its
    stored width; all float: fp32."""
    if op.kind == LOOKUP:  # ids in, float rows out: the table is stored in its type, read as it is
        return "w8" if "int8" in (op.weight_type, op.weight_stored) else "fp32"
    if op.input_type == "int8" and op.weight_type == "int8":
        return "int8"
    if op.input_type == "float32" and op.weight_type in ("int8", "int4"):
        return f"{op.weight_type}-dyn-pc" if op.weight_scales > 1 else f"{op.weight_type}-dyn"
    if op.weight_stored == "int8" and op.weight_type == "float32":
        return "w8"
    if op.weight_stored == "int4" and op.weight_type == "float32":
        return "w4"
    if op.weight_stored == "float16":
        return "fp16"
    return "fp32" if op.input_type == op.weight_type == "float32" else f"{op.input_type}/{op.weight_type}"
