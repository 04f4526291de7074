"""`autoq finetune`: quantization-aware training of one front point's exact assignment, distilled from FP32.

The model runs in torch (`onnx_torch.OnnxModule`); each layer computes with its input and weight fake-quantized as
its spec will run them (`fake_quant`), gradients passing straight through the rounding. Where the backend builds
static int8 from the calibration's ranges (`Backend.quantized_form`), every activation tensor its PTQ build
quantizes (the glue's too) is rounded on the built grid and its range trains with the weights: rounding the
activations is most of a static int8 CNN's error. Training starts from the biases that build stored (bias
correction) and, for learned rounding, from the learned weights. The loss is the distance to FP32's outputs on the
calibration split (no labels needed); the search split picks the best epoch; the state is saved after every epoch,
so an interrupted fine-tune resumes where it stopped. The trained float weights go back into the ONNX model, which
the backend then builds with the trained ranges (or the point's own): its own kernels, nothing simulated.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd
import torch
from onnx import numpy_helper

from autoq.backends.base import QuantizedForm, TensorRange
from autoq.calibrate import Calibration
from autoq.data import Dataset, Splits, batch_size
from autoq.errors import AutoqError
from autoq.evaluate import Evaluator
from autoq.files import written_whole
from autoq.graph import OnnxModel, save_onnx
from autoq.precision import Assignment, Kind
from autoq.progress import PhaseProgress
from autoq.recovery.fake_quant import ActivationRanges, activation_ranges, hooks
from autoq.recovery.onnx_torch import OnnxModule
from autoq.recovery.rounding import is_learned, substitute

BATCH, PATIENCE = 16, 8  # STE training is jagged: an epoch or three can lose before the next gains
LR = 1e-5  # biases and float layers' weights (Adam's steps are per weight: larger ones moved a CNN's small
# depthwise weights by 10% and broke it)
STEP_FRACTION = 0.02  # a quantized weight's Adam step, as a share of its layer's median rounding step: a few dozen
# steps can move a weight across one rounding boundary, not across many
RANGE_FRACTION = 0.001  # an activation range end's Adam step, as a share of the range's width; where the ranges
# train, a static layer's weights step at a quarter of STEP_FRACTION (the ranges hold most of its error; PaddleOCR's
# classifier trained steadier so)


@dataclass(frozen=True)
class Trained:
    """The best weights found (ONNX initializer -> array) with the activation ranges they were trained with,
    their quality and distance to FP32 on the search split (fake-quantized, in torch), before and after, and the
    epochs run."""

    weights: dict[str, np.ndarray]
    ranges: dict[str, tuple[float, float]]
    search_quality: float
    start_quality: float
    epochs: int
    search_distance: float  # to FP32's outputs (KL or relative MSE), what picks the epoch
    start_distance: float


def _param_groups(module: OnnxModule, model: OnnxModel, assignment: Assignment, ranges: ActivationRanges
                  ) -> list[dict]:
    """Adam's parameter groups: each quantized layer's weight with a step sized to its rounding step (the median over
    channels of max|w| / (2^(bits-1) - 1)): a fixed step too small to cross any rounding boundary of an int8 weight
    leaves the deployed integers as they were; each trained activation range at `RANGE_FRACTION` of its width;
    the rest (biases, float layers) at `LR`."""
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
        fraction = STEP_FRACTION / 4 if spec.kind == Kind.STATIC and ranges.learned else STEP_FRACTION
        groups.append({"params": [module.parameter(name)], "lr": max(fraction * step, LR)})
        grouped.add(name)
    rest = [module.parameter(name) for name in module.trained if name not in grouped]
    bounds = [{"params": [b], "lr": RANGE_FRACTION * max(float(b.detach()[1] - b.detach()[0]), 1e-6)}
              for b in ranges.bounds if b.requires_grad]
    return groups + ([{"params": rest, "lr": LR}] if rest else []) + bounds


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
          minutes: float | None, built: dict[str, TensorRange] | None, progress: bool = True) -> Trained:
    """Fine-tune the weights of `model`'s layers under `assignment`'s fake quantization toward FP32's outputs
    (`references[split]`), keeping the epoch best on the search split; resumes from `state_path` if present.
    `built`: every activation tensor the backend's build quantizes, simulated and trained too (None: the static
    layers' calibrated input ranges, fixed)."""
    torch.manual_seed(0)
    module = OnnxModule(model.proto, model.layers)
    ranges = activation_ranges(model, assignment, calibration, built, learned=built is not None)
    module.hooks = hooks(model, assignment, calibration, ranges)
    module.tensor_hooks = ranges.tensor_hooks()
    optimizer = torch.optim.Adam(_param_groups(module, model, assignment, ranges))
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
    best = module.weights(), ranges.values()
    if state_path.is_file():  # resume: the last epoch's weights, ranges and optimizer, the best so far
        saved = torch.load(state_path, weights_only=False)
        module.load_state_dict(saved["module"])
        ranges.load_state_dict(saved["ranges"])
        optimizer.load_state_dict(saved["optimizer"])
        state, best = saved["state"], saved["best"]
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
                state["best"], state["since_best"], best = now, 0, (module.weights(), ranges.values())
            else:
                state["since_best"] += 1
            with written_whole(state_path) as partial:  # a Ctrl-C mid-save leaves the last whole state
                torch.save({"module": module.state_dict(), "ranges": ranges.state_dict(),
                            "optimizer": optimizer.state_dict(), "state": state, "best": best}, partial)
            bar.advance(state["epoch"])
            if minutes is not None and time.monotonic() - started > 60 * minutes:
                break
    return Trained(*best, state["best"][1], state["start"][1], int(state["epoch"]), state["best"][0],
                   state["start"][0])


def starting_point(model: OnnxModel, assignment: Assignment, calibration: Calibration, folder: Path,
                   form: QuantizedForm | None, learned: tuple[str, ...]) -> tuple[OnnxModel, Assignment]:
    """The model and assignment training starts from: a layer with learned rounding starts from its learned weights
    (on its grid) and trains as round-to-nearest, so the backend builds the trained weights, not the cached ones;
    biases the PTQ build changed (`form.biases`, bias correction) start as built, and the trained model is built
    with `form.options` (not corrected again)."""
    from autoq.graph import prepare

    specs = assignment.specs()
    fitted = {name: spec for name, spec in specs.items() if is_learned(spec, learned)}
    if not fitted and (form is None or not form.biases):
        return model, assignment
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    substitute(proto, model, fitted, calibration)
    for tensor in proto.graph.initializer:
        if form is not None and tensor.name in form.biases:
            tensor.CopyFrom(numpy_helper.from_array(form.biases[tensor.name], tensor.name))
    plain = {name: str(replace(spec, rounding="rtn")) if name in fitted else str(spec) for name, spec in specs.items()}
    options = {**assignment.options, **(form.options if form is not None else {})}
    folder.mkdir(parents=True, exist_ok=True)
    return prepare(save_onnx(proto, folder / "source.onnx"), folder), Assignment(plain, options)


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
                                "search_distance_before": trained.start_distance,
                                "activation_ranges": trained.ranges}, indent=2))


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
    backend, threads, calibration = evaluator.backend, evaluator.threads, evaluator.calibration
    before = evaluator.build(assignment, work / "ptq")  # the PTQ twin: what it quantizes and stores is simulated
    form = backend.quantized_form(before)
    start, trained_as = starting_point(evaluator.model, assignment, calibration, work / "start", form,
                                       backend.learned_roundings)
    trained = train(start, trained_as, calibration, evaluator.splits, references, evaluator.metric,
                    work / "state.pt", epochs, minutes, None if form is None else form.ranges, progress)
    tuned = prepare(with_weights(start, trained.weights, work / "source.onnx"), work)
    if form is not None:  # the trained ranges; the regions stay those of the PTQ twin
        calibration = calibration.with_ranges(trained.ranges, work / "calibration")
    candidate = backend.build(tuned, trained_as, calibration, work / "build")
    run = backend.runner(candidate, threads)
    outputs = evaluator.outputs(run, evaluator.splits.validation)
    quality = float(evaluator.metric(references["validation"], outputs, evaluator.splits.validation.labels))
    executed = backend.executed(candidate)
    executed_ok = all(executed.get(name) == spec for name, spec in backend.expected(trained_as).items())
    before_run, feeds = backend.runner(before, threads), evaluator.latency_feeds
    rounds = ratio_rounds({"ptq": lambda: before_run(feeds), "tuned": lambda: run(feeds)}, "ptq")
    median, low, high = interval(rounds["tuned"][1])  # the point's ms over the fine-tuned one's
    new = int(front["point"].max()) + 1
    point_dir = run_dir / "front" / f"point-{new}"
    point_dir.mkdir(parents=True, exist_ok=True)
    trained_as.save(point_dir / "assignment.yaml")
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
