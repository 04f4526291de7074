"""PyTorch models as input: an `nn.Module` (with example inputs) or a `torch.export.save` file (`.pt2`) is
exported to ONNX once, and its layers are renamed to the module names (FQNs) of the user's code, so
sensitivity, assignments and reports say `encoder.layer.0.attention.self.query`, not `/MatMul_12`.

The mapping does not trust the exporter's naming: each ONNX layer's constant weight is matched to the
module parameter it was exported from (equal values, possibly transposed).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import logging
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from autoq.errors import AutoqError
from autoq.graph import find_layers, normalise, save_onnx, weight_array
from autoq.quiet import captured

OPSET = 17


def is_torch_model(model: object) -> bool:
    """An nn.Module, or a path to a torch.export file."""
    if isinstance(model, str | Path):
        return Path(model).suffix == ".pt2"
    torch_nn = __import__("sys").modules.get("torch.nn")
    return torch_nn is not None and isinstance(model, torch_nn.Module)


def load_pt2(path: Path):
    """The ExportedProgram in a `torch.export.save` file (its weights load without unpickling code)."""
    import torch

    if not path.is_file():
        raise AutoqError(f"model file not found: {path}")
    if not zipfile.is_zipfile(path):
        msg = f"{path} is not a readable torch.export program (not a .pt2 archive): save it with torch.export.save"
        raise AutoqError(msg)
    _refuse_pickles(path)
    logging.getLogger("torch.export").setLevel(logging.ERROR)  # it logs a traceback before raising
    try:
        return torch.export.load(str(path))
    except Exception as exc:  # a corrupt archive raises zipfile, pickle and RuntimeError types
        msg = f"{path} is not a readable torch.export program ({type(exc).__name__}): save it with torch.export.save"
        raise AutoqError(msg) from exc


def _refuse_pickles(path: Path) -> None:
    """torch.export.load unpickles (weights_only=False) weights or constants saved as pickles, custom or opaque
    objects, and sample inputs that fail a weights-only load: refuse such archives before loading anything."""
    import torch

    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith(("_weights_config.json", "_constants_config.json")):
                for fqn, meta in json.loads(archive.read(name)).get("config", {}).items():
                    if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(("weight", "tensor")):
                        msg = f"{path} stores {fqn} as a pickled object: autoq does not unpickle code; re-save it"
                        raise AutoqError(msg)
            elif "/data/sample_inputs/" in name:
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception as exc:
                    msg = f"{path} holds example inputs that are not plain tensors: autoq does not unpickle code"
                    raise AutoqError(msg) from exc


def _inputs(module, example_inputs) -> tuple[tuple, list[str]]:
    """Positional example inputs and their names (the forward's parameter names)."""
    if isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[1], dict):
        args, kwargs = example_inputs
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    else:
        args, kwargs = (example_inputs if isinstance(example_inputs, tuple | list) else (example_inputs,)), {}
    names = [p for p in inspect.signature(module.forward).parameters if p not in ("self",)]
    ordered = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
    return tuple(ordered), names[: len(ordered)]


def to_onnx(model, example_inputs, workdir: Path) -> Path:
    """Export `model` (an nn.Module with `example_inputs`, or a .pt2 path) to `workdir/source.onnx` with layers
    named by module FQN. A module's inputs and outputs get a dynamic first (batch) axis; a .pt2 program keeps
    the shapes it was exported with."""
    import torch

    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "source.onnx"
    try:
        if isinstance(model, str | Path):
            program = load_pt2(Path(model))
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(program, f=str(path), dynamo=True, external_data=False, verbose=False)
            model = program.module()
        else:
            _export_module(model, example_inputs, path)
    except AutoqError:
        raise
    except Exception as exc:
        msg = f"exporting the torch model to ONNX failed ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        raise AutoqError(msg) from exc
    proto = normalise(onnx.load(str(path)))
    _name_by_module(proto, model)
    return save_onnx(proto, path)


def _export_module(module, example_inputs, path: Path) -> None:
    import torch

    if example_inputs is None:
        raise AutoqError("a torch module needs example_inputs (a tuple of tensors, as for torch.export)")
    args, names = _inputs(module, example_inputs)
    module.eval()
    with torch.no_grad():
        outputs = module(*args)
    count = len(outputs) if isinstance(outputs, tuple | list) else 1
    output_names = [f"output_{i}" for i in range(count)] if count > 1 else ["output"]
    with captured():  # torch.onnx's deprecation notice for the TorchScript exporter, tracer warnings
        torch.onnx.export(module, args, str(path), dynamo=False, input_names=names, output_names=output_names,
                          dynamic_axes={n: {0: "batch"} for n in names + output_names}, opset_version=OPSET)


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def _scaled_owner(weight: np.ndarray, candidates: list[tuple[str, np.ndarray]]) -> str | None:
    """The one candidate (FQN, weight) of which `weight` is a per-output-channel rescaling: a convolution the
    exporter folded its batch norm into."""
    found = []
    for fqn, array in candidates:
        if array.shape != weight.shape:
            continue
        ours, theirs = weight.reshape(len(weight), -1).astype(np.float64), array.reshape(len(array), -1)
        scale = (ours * theirs).sum(1) / np.maximum((theirs ** 2).sum(1), 1e-30)
        if np.allclose(ours, scale[:, None] * theirs, rtol=1e-4, atol=1e-6 * np.abs(ours).max()):
            found.append(fqn)
    return found[0] if len(found) == 1 else None


def _name_by_module(proto: onnx.ModelProto, module) -> None:
    """Rename each layer node to the FQN of the module whose weight it multiplies (in place), a convolution's
    weight possibly rescaled per channel by the batch norm the exporter folded into it."""
    owners: dict[str, str] = {}
    convolutions: list[tuple[str, np.ndarray]] = []
    for fqn, sub in module.named_modules():
        weight = getattr(sub, "weight", None)
        if fqn and weight is not None and hasattr(weight, "detach") and weight.dim() >= 2:
            array = weight.detach().float().cpu().numpy()
            owners.setdefault(_digest(array), fqn)
            if array.ndim == 2:
                owners.setdefault(_digest(array.T), fqn)
            else:
                convolutions.append((fqn, array))
    taken: dict[str, int] = {}
    nodes = {node.name: node for node in proto.graph.node}
    for layer in find_layers(proto):
        weight = weight_array(proto, layer.weight)
        fqn = owners.get(_digest(weight))
        if fqn is None and weight.ndim > 2:
            fqn = _scaled_owner(weight, convolutions)
        if fqn is None:
            continue
        taken[fqn] = taken.get(fqn, 0) + 1
        nodes[layer.name].name = fqn if taken[fqn] == 1 else f"{fqn}#{taken[fqn]}"  # a module called twice
