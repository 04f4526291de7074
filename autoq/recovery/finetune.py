"""`autoq finetune`: quantization-aware training of one front point's exact assignment, distilled from FP32.

The model runs in torch (`onnx_torch.OnnxModule`); each layer computes with its input and weight fake-quantized as
its spec will run them (static int8: the input on its calibrated uint8 range, the weights per channel on 127
levels; int8-dyn: the input on its own range; weight-only: the weights in their bits and groups; bf16: both
rounded), gradients passing straight through the rounding. The loss is the distance to FP32's outputs on the
calibration split (no labels needed); the search split picks the best epoch; the state is saved after every
epoch, so an interrupted fine-tune resumes where it stopped. The trained float weights go back into the ONNX
model, which the backend then builds with the point's own activation ranges: its own kernels, nothing simulated.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd
import torch
from onnx import numpy_helper

from autoq.calibrate import Calibration
from autoq.data import Dataset, Splits, batch_size
from autoq.errors import AutoqError
from autoq.evaluate import Evaluator
from autoq.graph import OnnxModel, save_onnx
from autoq.precision import Assignment, Kind, Precision
from autoq.progress import PhaseProgress
from autoq.quantsim import round_weight, smoothing_scale
from autoq.recovery.onnx_torch import OnnxModule
from autoq.recovery.rounding import input_range

BATCH, PATIENCE = 16, 4
LR = 1e-5  # biases and float layers' weights (Adam's steps are per weight: larger ones moved a CNN's small
# depthwise weights by 10% and broke it)
STEP_FRACTION = 0.02  # a quantized weight's Adam step, as a share of its layer's median rounding step: a few dozen
# steps can move a weight across one rounding boundary, not across many


@dataclass(frozen=True)
class Trained:
    """The best weights found (ONNX initializer -> array), their quality and distance to FP32 on the search split
    (fake-quantized, in torch), before and after, and the epochs run."""

    weights: dict[str, np.ndarray]
    search_quality: float
    start_quality: float
    epochs: int
    search_distance: float  # to FP32's outputs (KL or relative MSE), what picks the epoch
    start_distance: float


def _ste(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """`rounded` forward, the identity backward (straight-through)."""
    return x + (rounded - x).detach()


def _activation(x: torch.Tensor, low: float, high: float, symmetric: bool = False) -> torch.Tensor:
    low, high = min(low, 0.0), max(high, 0.0)
    if symmetric:
        low, high = -max(-low, high), max(-low, high)
    step = max(high - low, 1e-12) / 255
    zero = round(-low / step)
    return _ste(x, (torch.clamp(torch.round(x / step) + zero, 0, 255) - zero) * step)


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


def hooks(model: OnnxModel, assignment: Assignment, calibration: Calibration) -> dict[str, Callable]:
    """Layer -> what its kernel computes with, (input, weight) fake-quantized as its spec says."""
    nodes = {node.name: node for node in model.proto.graph.node}
    made: dict[str, Callable] = {}
    for layer in model.layers:
        spec = assignment.specs().get(layer.name)
        if spec is None or layer.name not in nodes or spec.fmt == "fp32":
            continue
        axis = layer.channel_axis
        if spec.kind == Kind.STATIC:
            low, high = input_range(calibration, nodes[layer.name], spec)

            def static(x, w, low=low, high=high, spec=spec, axis=axis):
                return _activation(x, low, high, spec.symmetric), _weight(w, axis, spec)
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


def _param_groups(module: OnnxModule, model: OnnxModel, assignment: Assignment) -> list[dict]:
    """Adam's parameter groups: each quantized layer's weight with a step sized to its rounding step (the median over
    channels of max|w| / (2^(bits-1) - 1)): a fixed step too small to cross any rounding boundary of an int8 weight
    leaves the deployed integers as they were; the rest (biases, float layers) at `LR`."""
    specs = assignment.specs()
    nodes = {node.name: node for node in model.proto.graph.node}
    groups, grouped = [], set()
    for layer in model.layers:
        spec = specs.get(layer.name)
        if spec is None or spec.fmt == "fp32" or layer.name not in nodes or len(nodes[layer.name].input) < 2:
            continue
        name = nodes[layer.name].input[1]
        if name not in module.trained:
            continue
        weight = module.parameter(name).detach()
        channels = weight.movedim(layer.channel_axis, 0).reshape(weight.shape[layer.channel_axis], -1)
        step = float(channels.abs().amax(1).median()) / (2 ** (spec.bits - 1) - 1)
        groups.append({"params": [module.parameter(name)], "lr": max(STEP_FRACTION * step, LR)})
        grouped.add(name)
    rest = [module.parameter(name) for name in module.trained if name not in grouped]
    return groups + ([{"params": rest, "lr": LR}] if rest else [])


def _input_peaks(model: OnnxModel, calibration: Calibration, tensor: str) -> np.ndarray:
    """The largest |value| per channel of `tensor` on the calibration samples (what smoothing divides by)."""
    from autoq.backends.onnxruntime.smooth import channel_maxima  # smoothed specs are ORT's

    return channel_maxima(model, calibration)[tensor]


def _distance(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """KL divergence for probability outputs (non-negative, summing to 1), else MSE relative to FP32's power."""
    total = torch.zeros(())
    for out, ref in zip(student, teacher, strict=True):
        if ref.dim() >= 2 and bool((ref >= 0).all()) and torch.allclose(ref.sum(-1), torch.ones(())):
            total = total + torch.nn.functional.kl_div(out.clamp_min(1e-8).log(), ref, reduction="batchmean")
        else:
            total = total + ((out - ref) ** 2).mean() / ref.pow(2).mean().clamp_min(1e-12)
    return total


def train(model: OnnxModel, assignment: Assignment, calibration: Calibration, splits: Splits,
          references: dict[str, list[np.ndarray]], metric: Callable, state_path: Path, epochs: int,
          minutes: float | None, progress: bool = True) -> Trained:
    """Fine-tune the weights of `model`'s layers under `assignment`'s fake quantization toward FP32's outputs
    (`references[split]`), keeping the epoch best on the search split; resumes from `state_path` if present."""
    torch.manual_seed(0)
    module = OnnxModule(model.proto, model.layers)
    module.hooks = hooks(model, assignment, calibration)
    optimizer = torch.optim.Adam(_param_groups(module, model, assignment))
    size = batch_size(model.inputs, BATCH)
    names = [spec.name for spec in model.inputs]

    def outputs(dataset: Dataset) -> list[np.ndarray]:
        with torch.no_grad():
            parts = [module(*(torch.from_numpy(f[n]) for n in names)) for f in dataset.batches(size)]
        return [torch.cat([p[i] for p in parts]).numpy() for i in range(len(parts[0]))]

    teacher_search = [torch.from_numpy(r) for r in references["search"]]

    def judged() -> tuple[float, float]:
        """(distance to FP32, the run's metric) on the search split: the distance picks the epoch (the metric of a
        few hundred samples moves by whole samples from one epoch to the next)."""
        found = outputs(splits.search)
        distance = float(_distance([torch.from_numpy(o) for o in found], teacher_search))
        return distance, float(metric(references["search"], found, splits.search.labels))

    first = judged()
    state: dict[str, Any] = {"epoch": 0, "best": first, "start": first, "since_best": 0}
    best = module.weights()
    if state_path.is_file():  # resume: the last epoch's weights and optimizer, the best so far
        saved = torch.load(state_path, weights_only=False)
        module.load_state_dict(saved["module"])
        optimizer.load_state_dict(saved["optimizer"])
        state, best = saved["state"], saved["best_weights"]
    started = time.monotonic()
    teacher = [torch.from_numpy(r) for r in references["calibration"]]
    count = len(splits.calibration)
    with PhaseProgress("fine-tuning (epochs)", epochs, progress) as bar:
        bar.advance(state["epoch"])
        while state["epoch"] < epochs and state["since_best"] < PATIENCE:
            order = torch.randperm(count, generator=torch.Generator().manual_seed(state["epoch"]))
            for start in range(0, count, size):
                index = order[start:start + size].numpy()
                feeds = [torch.from_numpy(splits.calibration.arrays[n][index]) for n in names]
                loss = _distance(module(*feeds), [t[index] for t in teacher])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            state["epoch"] += 1
            now = judged()
            if now[0] < state["best"][0]:
                state["best"], state["since_best"], best = now, 0, module.weights()
            else:
                state["since_best"] += 1
            state_path.parent.mkdir(parents=True, exist_ok=True)
            partial = state_path.with_suffix(".partial")
            torch.save({"module": module.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                        "best_weights": best}, partial)
            partial.replace(state_path)  # a Ctrl-C mid-save leaves the last whole state
            bar.advance(state["epoch"])
            if minutes is not None and time.monotonic() - started > 60 * minutes:
                break
    return Trained(best, state["best"][1], state["start"][1], int(state["epoch"]), state["best"][0],
                   state["start"][0])


def with_weights(model: OnnxModel, weights: dict[str, np.ndarray], path: Path) -> Path:
    """`model` with its trained initializers replaced, saved at `path`."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    for tensor in proto.graph.initializer:
        if tensor.name in weights:
            tensor.CopyFrom(numpy_helper.from_array(weights[tensor.name].astype(np.float32), tensor.name))
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_onnx(proto, path)


def record(trained: Trained, path: Path) -> None:
    path.write_text(json.dumps({"search_quality_fake_quantized": trained.search_quality,
                                "search_quality_before": trained.start_quality, "epochs": trained.epochs,
                                "search_distance": trained.search_distance,
                                "search_distance_before": trained.start_distance}, indent=2))


def finetune_point(evaluator: Evaluator, run_dir: Path, point: int, epochs: int, minutes: float | None,
                   progress: bool = True) -> pd.DataFrame:
    """Fine-tune front point `point` of the run (its data and calibration in `evaluator`), build the result with
    the backend, time it side by side with the point, and add it to the run's front as a new point `finetuned from
    N`; the recipes' verdicts are recomputed against the new front. Returns the new front."""
    from autoq.graph import prepare
    from autoq.measure import interval, ratio_rounds
    from autoq.recipes import COLUMNS, verdicts

    front = pd.read_csv(run_dir / "pareto.csv")
    if point not in set(front["point"]):
        msg = f"{run_dir} has no front point {point} (points: {sorted(front['point'])})"
        raise AutoqError(msg)
    row = front[front["point"] == point].iloc[0]
    if pd.notna(row.get("finetuned_from", np.nan)):
        msg = f"point {point} is already fine-tuned (from point {int(row['finetuned_from'])}): fine-tune that one"
        raise AutoqError(msg)
    assignment = Assignment.load(run_dir / "front" / f"point-{point}" / "assignment.yaml")
    work = run_dir / "finetune" / f"point-{point}"
    references = {split: evaluator.reference(split) for split in ("calibration", "search", "validation")}
    trained = train(evaluator.model, assignment, evaluator.calibration, evaluator.splits, references,
                    evaluator.metric, work / "state.pt", epochs, minutes, progress)
    tuned = prepare(with_weights(evaluator.model, trained.weights, work / "source.onnx"), work)
    backend, threads = evaluator.backend, evaluator.threads
    # the point's own activation ranges (tensors keep their names): what the training fake-quantized with, and the
    # same regions, so the fine-tuned point differs from its PTQ twin in its weights alone
    candidate = backend.build(tuned, assignment, evaluator.calibration, work / "build")
    run = backend.runner(candidate, threads)
    outputs = evaluator.outputs(run, evaluator.splits.validation)
    quality = float(evaluator.metric(references["validation"], outputs, evaluator.splits.validation.labels))
    executed = backend.executed(candidate)
    executed_ok = all(executed.get(name) == spec for name, spec in backend.expected(assignment).items())
    before = evaluator.build(assignment, work / "ptq")
    before_run, feeds = backend.runner(before, threads), evaluator.latency_feeds
    rounds = ratio_rounds({"ptq": lambda: before_run(feeds), "tuned": lambda: run(feeds)}, "ptq")
    median, low, high = interval(rounds["tuned"][1])  # the point's ms over the fine-tuned one's
    new = int(front["point"].max()) + 1
    point_dir = run_dir / "front" / f"point-{new}"
    point_dir.mkdir(parents=True, exist_ok=True)
    assignment.save(point_dir / "assignment.yaml")
    model = backend.export(candidate, point_dir / "model.onnx")
    record(trained, point_dir / "finetune.json")
    latency = row.get("val_latency_ms", row["latency_ms"]) / median
    added = {**row.to_dict(), "point": new, "val_quality": quality,
             "val_quality_spread": evaluator.quality_spread(outputs, "validation"), "val_latency_ms": latency,
             "val_executed_ok": executed_ok, "size_bytes": candidate.size_bytes,
             "model": str(model.relative_to(run_dir)), "finetuned_from": point,
             "quality_before": row.get("val_quality", row["quality"]),
             "speed_vs_before": f"{median:.3f} (95% {low:.3f}-{high:.3f})",
             "summary": f"{row['summary']} (fine-tuned from {point})"}
    front = pd.concat([front, pd.DataFrame([added])], ignore_index=True)
    front.to_csv(run_dir / "pareto.csv", index=False)
    recipes = run_dir / "recipes.csv"
    if recipes.is_file():  # against the new front, by the stored figures
        table = pd.read_csv(recipes, keep_default_na=False)
        verdicts(front, table[[c for c in COLUMNS[:10] if c in table.columns]]).to_csv(recipes, index=False)
    return front
