"""ONNX Runtime's quantizers applied per layer spec, and each spec read back from the kernel ORT made of it.

- static int8 (`quantize_static`, U8S8 QDQ, per-channel weights): a layer's calibration and activation symmetry
  are per-tensor overrides of its input (`TensorQuantOverrides`); layers sharing an input share its quantization,
  the first in graph order sets it.
- int8-dyn (`quantize_dynamic`, MatMul): one call per weight granularity (per tensor, per channel).
- weight-only (`MatMulNBitsQuantizer`): MatMul -> MatMulNBits (2, 4 or 8 bits, block size, symmetric or not,
  accuracy_level; rounded to nearest, by HQQ, or by llama.cpp's k-quant search of scales and minimums; learned
  roundings (AdaRound, GPTQ) come as weights already on their grid, `autoq.recovery.rounding`), one call per
  distinct spec;
  Gather -> GatherBlockQuantized (4 or 8 bits) of a stand-in MatMul's weights or of its tied LM head's.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

from autoq.backends.onnxruntime.tied import add_stand_in, share_tables, tied_pairs
from autoq.calibrate import Calibration
from autoq.graph import save_onnx
from autoq.precision import Kind, Precision
from autoq.regions import REMOVABLE

DYNAMIC_LAYERS = ("MatMul",)  # ORT's dynamic quantizer has no Gemm
WEIGHT_ONLY_LAYERS = {"MatMul": (2, 4, 8), "Gather": (4, 8)}  # op -> the bits autoq builds with ORT's quantizer
TABLE_ROUNDINGS = ("rtn", "kquant")  # an embedding table is rounded without calibration activations
WEIGHT_ONLY_KERNELS = ("MatMulNBits", "GatherBlockQuantized")


@contextmanager
def quiet_root_logger() -> Iterator[None]:
    """ORT's quantizers log advice on the root logger for every build, HQQ warns through torch and GPTQ prints its
    progress; keep the user's console clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def symmetric_inputs(graph: onnx.GraphProto, specs: dict[str, Precision]) -> set[str]:
    """The static layers' inputs quantized symmetrically: their spec's symmetry, except that ORT's quantizer drops a
    Relu/Clip into its output's range even under a zero point of 128, which would let negative values through: a
    rectified input stays asymmetric (it has no negative half to keep)."""
    producer = {out: node.op_type for node in graph.node for out in node.output}
    return {node.input[0] for node in graph.node if (spec := specs.get(node.name)) is not None
            and spec.kind == Kind.STATIC and spec.symmetric and producer.get(node.input[0]) not in REMOVABLE}


def static_overrides(graph: onnx.GraphProto, specs: dict[str, Precision], calibration: Calibration) -> dict[str, list]:
    """TensorQuantOverrides setting each static layer's input to its spec's calibrated range and symmetry."""

    overrides: dict[str, list] = {}
    symmetric = symmetric_inputs(graph, specs)
    for node in graph.node:
        spec = specs.get(node.name)
        if spec is None or spec.kind != Kind.STATIC or node.input[0] in overrides:
            continue
        override: dict[str, object] = {"symmetric": True} if node.input[0] in symmetric else {}
        if spec.calibration != "minmax":
            known = calibration.ranges(spec.calibration_key).get(node.input[0])
            if known is not None:
                low, high = known
                override |= {"rmin": np.array(min(low, 0.0), np.float32), "rmax": np.array(max(high, 0.0), np.float32)}
        if override:
            overrides[node.input[0]] = [override]
    return overrides


def quantize_regions(source: Path, out: Path, nodes: set[str], specs: dict[str, Precision], calibration: Calibration,
                     reduce_range: bool) -> None:
    """Static int8 (U8S8 QDQ) of the region `nodes`, with each layer's calibration and symmetry."""
    proto = onnx.load(str(source), load_external_data=False)
    op_types = sorted({node.op_type for node in proto.graph.node if node.name in nodes})
    with quiet_root_logger():
        quantize_static(
            source, out, None, quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types, per_channel=True,
            reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_quantize=sorted(nodes), calibration_cache_path=calibration.path,
            extra_options={"TensorQuantOverrides": static_overrides(proto.graph, specs, calibration)})


def quantize_dynamic_layers(path: Path, specs: dict[str, Precision]) -> None:
    """int8-dyn of the layers whose spec is dynamic, in place; one pass per weight granularity."""
    for per_channel in (False, True):
        chosen = sorted(n for n, s in specs.items() if s.kind == Kind.DYNAMIC and (s.granularity == "channel")
                        == per_channel)
        if chosen:
            with quiet_root_logger():
                quantize_dynamic(path, path, op_types_to_quantize=list(DYNAMIC_LAYERS), nodes_to_quantize=chosen,
                                 weight_type=QuantType.QInt8, per_channel=per_channel)


# weight-only rounding -> how ORT's MatMulNBits quantizer is told (rtn: the default config); the backend offers these
WEIGHT_ROUNDINGS = ("rtn", "hqq", "gptq", "kquant", "adaround")  # gptq, adaround: learned weights on the RTN grid
# (`autoq.recovery.rounding`), stored by the default config


def _rounding_config(spec: Precision, chosen: list[str]) -> object:
    from onnxruntime.quantization.matmul_nbits_quantizer import (  # it needs onnx_ir
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        KQuantWeightOnlyQuantConfig,
    )

    ops = ("MatMul",)
    if spec.rounding == "kquant":  # ORT's vendored Neural Compressor k-quant: 4 bits unless told per node
        return KQuantWeightOnlyQuantConfig(op_types_to_quantize=ops,
                                           customized_weight_config={n: {"bits": spec.bits} for n in chosen})
    if spec.rounding == "hqq":
        return HQQWeightOnlyQuantConfig(block_size=spec.group, bits=spec.bits, op_types_to_quantize=ops)
    return DefaultWeightOnlyQuantConfig(block_size=spec.group, is_symmetric=spec.symmetric,
                                        accuracy_level=spec.accuracy_level or None, op_types_to_quantize=ops,
                                        bits=spec.bits)


def quantize_weight_only(path: Path, specs: dict[str, Precision], tie: bool = True) -> None:
    """MatMulNBits / GatherBlockQuantized for the layers whose spec is weight-only, in place. An embedding table is
    rounded as a MatMul of its transpose would be (any bits and rounding the MatMul quantizer has) and gathered from
    those weights; a table tied to the LM head with the head's weight format reads the head's weights instead
    (`autoq.backends.onnxruntime.tied`) unless `tie` is off."""
    if not any(spec.kind == Kind.WEIGHT_ONLY for spec in specs.values()):
        return
    proto = onnx.load(str(path))
    ties = tied_pairs(proto, specs) if tie else {}
    kinds = {n.name: n.op_type for n in proto.graph.node}
    for name, spec in specs.items():
        if spec.kind == Kind.WEIGHT_ONLY and kinds.get(name) == "Gather" and name not in ties:
            ties[name] = add_stand_in(proto, name)
    groups: dict[Precision, list[str]] = defaultdict(list)
    for name, spec in specs.items():
        if spec.kind == Kind.WEIGHT_ONLY and name not in ties:
            groups[spec].append(name)
    for name, source in ties.items():
        if source not in specs:  # a stand-in is rounded in its table's spec (a tied head is rounded in its own)
            groups[specs[name]].append(source)
    if not groups:
        return
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer  # it needs onnx_ir

    for spec, chosen in groups.items():
        config = _rounding_config(spec, chosen)
        others = [n.name for n in proto.graph.node if n.name not in set(chosen)]
        with quiet_root_logger():
            quantizer = MatMulNBitsQuantizer(proto, bits=spec.bits, block_size=spec.group,
                                             is_symmetric=spec.symmetric, accuracy_level=spec.accuracy_level or None,
                                             nodes_to_exclude=others, op_types_to_quantize=("MatMul",),
                                             algo_config=config)
            quantizer.process()
        proto = quantizer.model.model
        if spec.rounding == "hqq" and spec.accuracy_level:  # ORT's HQQ quantizer takes no accuracy level: set it
            _set_accuracy(proto, set(chosen), spec.accuracy_level)
    share_tables(proto, ties, specs)
    save_onnx(proto, path)


def _set_accuracy(proto: onnx.ModelProto, layers: set[str], level: int) -> None:
    """Give the MatMulNBits kernels made of `layers` (named `<layer>_Q<bits>`) the accuracy level `level`."""
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits" and node.name.rsplit("_Q", 1)[0] in layers:
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", level)])


class CalibrationSamples:
    """The cached calibration samples, one at a time, as ORT's calibration data readers give them (GPTQ iterates
    over a deep copy of the reader)."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        count = len(next(iter(arrays.values())))
        self.samples = [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(count)]
        self.cursor = iter(self.samples)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.samples)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.cursor, None)


def weight_only_spec(node: onnx.NodeProto, graph: onnx.GraphProto, asked: Precision | None) -> str:
    """The weight-only spec a MatMulNBits / GatherBlockQuantized node runs (the rounding, invisible in the
    graph, is the one asked for)."""
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    symmetric = len(node.input) <= 3 or not node.input[3]  # both kernels take zero points as input 3
    if node.op_type == "MatMulNBits" or "bits" in attributes:  # a tied table's uint8 data says its bits
        bits = int(attributes.get("bits", 4))
    else:
        data = next((t for t in graph.initializer if t.name == node.input[0]), None)
        bits = 4 if data is None or data.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else 8
    rounding = asked.rounding if asked is not None and asked.kind == Kind.WEIGHT_ONLY else "rtn"
    spec = Precision(Kind.WEIGHT_ONLY, bits, symmetric=symmetric, granularity="group",
                     group=int(attributes.get("block_size", 0)), rounding=rounding,
                     accuracy_level=int(attributes.get("accuracy_level", 0)) if node.op_type == "MatMulNBits" else 0)
    return str(spec)
