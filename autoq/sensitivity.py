"""Per-layer sensitivity: what each layer alone costs in quality, and saves in latency and size, at each
candidate precision. Methods behind one interface (`analyse`):

- `measured`: quantize only that layer, everything else fp32; quality drop on the search split, with a
  bootstrap spread over samples.
- `sqnr`: one pass, no candidate builds: the signal-to-quantization-noise ratio of each layer's
  low-precision arithmetic (static int8: its input activation, per-channel weight and output, quantized with
  the calibration ranges; weight-only: its weight alone, at its bits and group size; noise powers added,
  averaged over channels), in dB; a lower SQNR means a more sensitive layer.
- `calibrated`: the SQNR noise of each spec times a per-layer gain measured once (the layer's noisiest spec
  simulated on a few search samples, one session for all layers): an estimated quality drop, in seconds to a
  few minutes, that sees where a layer sits in the network (a language model's first and last blocks).
- `hessian`: torch models only (HAWQ-V2): the Hutchinson Hessian trace per parameter times the squared weight
  perturbation of the precision (autoq/hessian.py).

Latency savings come from the backend's per-node profiler (fp32 vs uniform low precision), size savings
from the built files. Results are cached in the run directory.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from autoq.evaluate import CandidateError, Evaluator
from autoq.graph import TABLE_OPS, Layer, save_onnx, weight_array, weights_as_inputs
from autoq.methods import get_method
from autoq.precision import Assignment, Kind, Precision
from autoq.quantsim import noise_ratio, round_activation, round_weight, smoothing_scale
from autoq.recovery import rounding

PROBE_SAMPLES = 8  # search samples the calibrated method measures each layer on
COLUMNS = ["layer", "op_type", "params", "macs", "precision", "method", "quality_drop", "drop_spread", "sqnr_db",
           "hessian_trace", "latency_saving_ms", "size_saving_bytes", "score"]


def analyse(evaluator: Evaluator, choices: dict[str, list[str]], method: str = "measured",
            cache_dir: Path | None = None) -> pd.DataFrame:
    """One row per (layer, non-fp32 precision); `score` is the method's sensitivity (higher = more fragile)."""
    scorer = get_method(method)
    path = None
    if cache_dir is not None:
        key = hashlib.sha1(json.dumps([evaluator.fingerprint(), method, choices], sort_keys=True).encode())
        path = cache_dir / f"sensitivity-{method}-{key.hexdigest()[:16]}.csv"
        if path.is_file():
            return pd.read_csv(path)
    pairs = [(layer, p) for layer in evaluator.model.layers for p in choices[layer.name] if p != "fp32"]
    rows = scorer.score(evaluator, pairs)  # first: a method that cannot score this model fails before any build
    savings = _savings(evaluator, sorted({p for _, p in pairs}), choices)
    table = pd.DataFrame([{**row, "method": method, **savings.get((row["layer"], row["precision"]), {})}
                          for row in rows], columns=[*COLUMNS, *sorted({k for r in rows for k in r} - set(COLUMNS))])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(path, index=False)
    return table


def _base(layer: Layer, precision: str) -> dict:
    return {"layer": layer.name, "op_type": layer.op_type, "params": layer.params, "macs": layer.macs,
            "precision": precision}


def _savings(evaluator: Evaluator, precisions: list[str],
             choices: dict[str, list[str]]) -> dict[tuple[str, str], dict]:
    """(layer, precision) -> latency saving (profiled) and size saving (built files) of that layer alone, from
    one build per precision (every layer that allows it at that precision)."""
    model, backend = evaluator.model, evaluator.backend
    result: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="autoq-sens-") as tmp:
        fp32 = evaluator.build(Assignment.uniform(model.layer_names, "fp32"), Path(tmp) / "fp32")
        base = backend.layer_latency(fp32, evaluator.latency_feeds, evaluator.threads)
        for precision in precisions:
            chosen = [la for la in model.layers if precision in choices[la.name]]
            names = {la.name for la in chosen}
            try:
                low = evaluator.build(Assignment({n: precision if n in names else "fp32" for n in model.layer_names}),
                                      Path(tmp) / precision)
            except CandidateError:  # e.g. int4 groups that do not divide a layer: no savings known, none assumed
                continue
            times = backend.layer_latency(low, evaluator.latency_feeds, evaluator.threads)
            bytes_per_param = (fp32.size_bytes - low.size_bytes) / max(1, sum(la.params for la in chosen))
            for layer in chosen:
                saving = None if base is None or times is None else base[layer.name] - times[layer.name]
                result[layer.name, precision] = {"latency_saving_ms": saving,
                                                 "size_saving_bytes": round(bytes_per_param * layer.params)}
    return result


def measured_rows(evaluator: Evaluator, pairs: list[tuple[Layer, str]]) -> list[dict]:
    baseline = evaluator.fp32_quality()
    names = evaluator.model.layer_names
    rows = []
    with tempfile.TemporaryDirectory(prefix="autoq-sens-") as tmp:
        for index, (layer, precision) in enumerate(pairs):
            assignment = Assignment({n: precision if n == layer.name else "fp32" for n in names})
            try:
                candidate = evaluator.build(assignment, Path(tmp) / str(index))
                quality, outputs, _ = evaluator.score(candidate)
            except CandidateError:
                rows.append({**_base(layer, precision), "quality_drop": np.inf, "score": np.inf})
                continue
            drop = baseline - quality  # the FP32 side of the drop has no spread: it is the reference itself
            rows.append({**_base(layer, precision), "quality_drop": drop,
                         "drop_spread": evaluator.quality_spread(outputs),
                         "score": drop})
    return rows


def sqnr_rows(evaluator: Evaluator, pairs: list[tuple[Layer, str]]) -> list[dict]:
    """Noise powers of the input, weight and output quantization add; SQNR of the sum, in dB."""

    specs = {p: Precision.parse(p) for _, p in pairs}
    ranges = {spec.calibration_key: evaluator.calibration.ranges(spec.calibration_key)
              for spec in specs.values() if spec.kind == Kind.STATIC}
    proto = evaluator.model.proto
    nodes = {n.name: n for n in proto.graph.node}
    tensors = sorted({t for layer, _ in pairs if layer.op_type not in TABLE_OPS
                      for t in (nodes[layer.name].input[0], nodes[layer.name].output[0])})
    values = evaluator.intermediates(tensors, "calibration")
    rows = []
    for layer, precision in pairs:
        node, spec = nodes[layer.name], specs[precision]
        x, y = (values.get(node.input[0]), values.get(node.output[0])) if layer.op_type not in TABLE_OPS else (None,
                                                                                                            None)
        rows_axis = 1 if x is not None and x.ndim == 4 else -1
        known = ranges.get(spec.calibration_key, {})
        noise = _layer_noise(spec, weight_array(proto, layer.weight), layer.channel_axis, x, rows_axis, y,
                             [known.get(t) for t in (node.input[0], node.output[0])])
        fitted = rounding.load(evaluator.calibration, layer.name, spec) if rounding.is_learned(spec) else None
        if fitted is not None:  # round-to-nearest's noise, scaled by how much the learned rounding lowered it
            noise *= fitted.learned_error / max(fitted.rtn_error, 1e-20)
        sqnr = -10 * np.log10(max(noise, 1e-20))
        rows.append({**_base(layer, precision), "sqnr_db": sqnr, "score": -sqnr})
    return rows


def calibrated_rows(evaluator: Evaluator, pairs: list[tuple[Layer, str]]) -> list[dict]:
    """The SQNR noise of every (layer, spec) turned into a quality drop: each layer's noisiest spec is measured once,
    its weight rounded in numpy and everything else fp32, on the first PROBE_SAMPLES of the search split, all layers
    in one ONNX Runtime session that takes the weights as inputs (no build per layer); its other specs scale that
    drop by their noise power (to first order a drop grows with it). Weight rounding only: activations are not
    quantized, as in the SQNR of a weight-only spec."""
    import onnxruntime as ort

    rows = sqnr_rows(evaluator, pairs)
    noise = [10 ** (-row["sqnr_db"] / 10) for row in rows]
    probes: dict[str, int] = {}
    for index, (layer, _) in enumerate(pairs):
        if layer.name not in probes or noise[index] > noise[probes[layer.name]]:
            probes[layer.name] = index
    proto, metric = evaluator.model.proto, evaluator.metric
    weights = {pairs[i][0].weight: weight_array(proto, pairs[i][0].weight) for i in probes.values()}
    search = evaluator.splits.search
    subset = search.subset(np.arange(min(PROBE_SAMPLES, len(search))))
    options = ort.SessionOptions()
    options.log_severity_level, options.intra_op_num_threads = 3, evaluator.threads
    with tempfile.TemporaryDirectory(prefix="autoq-probe-") as tmp:
        path = save_onnx(weights_as_inputs(proto, list(weights)), Path(tmp) / "probe.onnx")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def outputs(changed: dict[str, np.ndarray]) -> list[np.ndarray]:
            return evaluator.outputs(lambda feeds: session.run(None, {**feeds, **weights, **changed}), subset)

        reference = outputs({})
        top = float(metric(reference, reference, subset.labels))
        gain = {}
        for name, index in probes.items():
            layer, precision = pairs[index]
            rounded = round_weight(weights[layer.weight], layer.channel_axis, Precision.parse(precision))
            drop = top - float(metric(reference, outputs({layer.weight: rounded}), subset.labels))
            gain[name] = np.nan_to_num(max(drop, 0.0), nan=np.inf) / max(noise[index], 1e-20)
    for row, power in zip(rows, noise, strict=True):
        row["estimated_drop"] = row["score"] = gain[row["layer"]] * power
    return rows


def _layer_noise(precision: Precision, w: np.ndarray, axis: int, x: np.ndarray | None, x_axis: int,
                 y: np.ndarray | None, ranges: list) -> float:
    """Noise-to-signal power of one layer at `precision`: weight rounding, plus the activations it quantizes
    (static: input and output with the ranges of its calibration; dynamic: the input with its own range; float:
    weight and input rounded to the float format). A table (Gather) has no float input: its weight alone."""
    if precision.smooth and x is not None and w.ndim == 2:  # SmoothQuant: the input / s, the weight rows * s
        scale = smoothing_scale(np.abs(x).reshape(-1, x.shape[-1]).max(0), np.abs(w).max(1), precision.smooth)
        x, w = x / scale, w * scale[:, None]
    noise = noise_ratio(w, round_weight(w, axis, precision), axis)
    if x is None:
        return noise
    if precision.kind == Kind.FLOAT:
        return noise + noise_ratio(x, round_weight(x, x_axis, precision), x_axis)
    if precision.kind == Kind.DYNAMIC:  # the input's own per-tensor range at run time
        return noise + noise_ratio(x, round_activation(x, float(x.min()), float(x.max())), x_axis)
    if precision.kind == Kind.STATIC:
        for tensor, rng in zip((x, y), ranges, strict=True):
            if rng is not None and tensor is not None:
                low, high = rng
                noisy = round_activation(tensor, low, high, precision.symmetric)
                noise += noise_ratio(tensor, noisy, 1 if tensor.ndim == 4 else -1)
    return noise


def rank_correlation(a: pd.DataFrame, b: pd.DataFrame) -> float:
    """Spearman rank correlation of two methods' scores over the same (layer, precision) rows."""
    merged = a.merge(b, on=["layer", "precision"])
    return float(merged["score_x"].rank().corr(merged["score_y"].rank()))


def prune(choices: dict[str, list[str]], table: pd.DataFrame, max_drop: float | None) -> dict[str, list[str]]:
    """Drop precisions whose single-layer quality drop exceeds `max_drop` (fp32 always stays)."""
    if max_drop is None or table["quality_drop"].isna().all():
        return choices
    too_costly = {(r.layer, r.precision) for r in table.itertuples() if r.quality_drop > max_drop}
    return {name: [p for p in allowed if (name, p) not in too_costly] or ["fp32"]
            for name, allowed in choices.items()}
