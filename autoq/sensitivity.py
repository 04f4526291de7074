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
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from autoq.calibrate import method_path
from autoq.errors import AutoqError
from autoq.evaluate import CandidateError, Evaluator
from autoq.graph import TABLE_OPS, Layer, save_onnx, weight_array, weights_as_inputs
from autoq.methods import get_method
from autoq.precision import Assignment, Precision
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
    from onnxruntime.quantization.calibrate import load_tensors_data

    specs = {p: Precision.parse(p) for _, p in pairs}
    ranges = {spec.calibration_key: load_tensors_data(method_path(evaluator.calibration, spec.calibration_key)).data
              for spec in specs.values() if spec.kind == "static"}
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
    if precision.kind == "float":
        return noise + noise_ratio(x, round_weight(x, x_axis, precision), x_axis)
    if precision.kind == "dynamic":  # the input's own per-tensor range at run time
        return noise + noise_ratio(x, round_activation(x, float(x.min()), float(x.max())), x_axis)
    if precision.kind == "static":
        for tensor, rng in zip((x, y), ranges, strict=True):
            if rng is not None and tensor is not None:
                low, high = (float(np.asarray(v).ravel()[0]) for v in rng.range_value)
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


def greedy_seeds(table: pd.DataFrame, choices: dict[str, list[str]],
                 fractions: tuple[float, ...] = (0.25, 0.5, 0.67, 0.8, 0.9, 0.95)) -> list[Assignment]:
    """Assignments that lower the precision of layers in order of least quality cost per ms saved (the
    AIMET/NNCF greedy idea), cut at several budgets, so the first trials already trace a front. Where a layer
    has a precision that saves latency, its precisions that don't are left out of the order."""
    rows = table[[p in choices.get(name, []) for name, p in zip(table["layer"], table["precision"], strict=True)]]
    faster = rows["latency_saving_ms"].fillna(0) > 0  # where a layer has a faster option, slower ones (e.g. bf16
    rows = rows[faster | ~faster.groupby(rows["layer"]).transform("any")]  # with no native bf16) take no step
    if rows.empty:
        return []
    gain = rows["latency_saving_ms"].fillna(0).clip(lower=0) + 1e-9 * rows["macs"]
    cost = rows["score"] - rows["score"].min()
    best = rows.assign(ratio=cost / gain).sort_values("ratio").drop_duplicates("layer")
    order = list(zip(best["layer"], best["precision"], strict=True))
    seeds: dict[str, Assignment] = {}
    for fraction in fractions:
        chosen = dict(order[: max(1, round(fraction * len(order)))])
        seed = Assignment({name: chosen.get(name, "fp32" if "fp32" in c else c[0]) for name, c in choices.items()})
        seeds.setdefault(seed.key(), seed)
    return list(seeds.values())


def fallback_seeds(table: pd.DataFrame, choices: dict[str, list[str]],
                   fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75), table_cost: float = 0.02,
                   fp32_only: bool = False, fine: tuple[float, ...] = (0.01, 0.03)) -> list[Assignment]:
    """The fast end, alone and with its most fragile layers protected. For each of the two precisions that save the
    most latency in total, the top `fractions` of layers (by that precision's score) move to a safer spec: the most
    accurate one that still saves latency, the most accurate one that saves nearly as much (int8-dyn -> its
    per-channel form; the first three fractions), or fp32 (the first two). A layer that does not offer the fast
    precision (an embedding table) takes the spec saving it the most bytes at a latency cost under `table_cost` of
    the fast precision's total saving, except in the seeds protecting with fp32, which seek quality: there it
    stays fp32 (MiniLM: int4 word and token-type tables cost 0.003 of cosine, 0.9935 -> 0.9904, more than fp32
    on the four most fragile MatMuls regains under SmoothQuant, 0.0019).
    The safest spec also protects the `fine` fractions, a layer or a few of a large model: a language model's LM
    head (and the table tied to it) in 8 bits and the rest in 4 is the size class of NNCF's and the GenAI builder's
    int4 recipes (SmolLM2 on OpenVINO: nothing between 78 and 104 MB without them).
    With a menu of specs, random mixes rarely find these. `fp32_only`: only the seeds that protect with fp32."""
    rows = table[[p in choices.get(n, []) for n, p in zip(table["layer"], table["precision"], strict=True)]]
    if rows.empty:
        return []
    totals = rows.groupby("precision")["latency_saving_ms"].sum().sort_values(ascending=False)
    saving = totals[totals > 0]
    accuracy = rows[rows["precision"].isin(saving.index)].groupby("precision")["score"].mean().sort_values()
    seeds: dict[str, Assignment] = {}
    for fast in list(saving.index[:2]):
        cheap = rows[rows["latency_saving_ms"].fillna(0) >= -table_cost * saving[fast]]
        cheap = cheap.sort_values("size_saving_bytes", ascending=False).drop_duplicates("layer")
        smallest = dict(zip(cheap["layer"], cheap["precision"], strict=True))
        safer = [p for p in accuracy.index if accuracy[p] < accuracy[fast]]
        near = [p for p in safer if saving[p] >= 0.9 * saving[fast]]
        order = list(rows[rows["precision"] == fast].sort_values("score", ascending=False)["layer"])
        plans = [("fp32", (0.0,) + fractions[:2])]
        if not fp32_only:
            plans += [*((safe, fine + fractions) for safe in safer[:1]),
                      *((safe, fractions[:3]) for safe in near[:1] if safe not in safer[:1])]
        for safe, cuts in plans:
            for fraction in cuts:
                protected = set(order[: max(1, round(fraction * len(order)))] if fraction else [])
                tables = "fp32" if safe == "fp32" and fraction else None  # protecting with fp32 seeks quality
                layers = {name: (safe if safe in c else "fp32") if name in protected else
                          (fast if fast in c else
                           (tables if tables in c else smallest.get(name, "fp32" if "fp32" in c else c[0])))
                          for name, c in choices.items()}
                seed = Assignment(layers)
                seeds.setdefault(seed.key(), seed)
    return list(seeds.values())


def recipe_seeds(recipes: list[dict[str, str]], table: pd.DataFrame | None, choices: dict[str, list[str]],
                 fractions: tuple[float, ...] = (0.2, 0.4), keep: frozenset[str] = frozenset()) -> list[Assignment]:
    """The backend's recipes the space can express (`Recipe.layers`), as they are and, with a sensitivity `table`,
    rebalanced two ways. The recipe's most accurate spec on as many layers, and on `fractions` of them, picked as
    the most fragile under their other spec (the recipe's own, or its most common one) by the sensitivity instead
    of by the recipe's rule (llama.cpp's blocks for k_quant_mixed; NNCF's last layer). And at the recipe's size
    (`at_size`). The search then starts where the runtime's one-line recipes are, and from their bytes placed by
    measurement. `keep`: layers left as the recipe has them (a tied table and LM head: stored once)."""
    seeds: dict[str, Assignment] = {}
    scores = None if table is None else table.set_index(["layer", "precision"])["score"]
    for layers in recipes:
        if any(spec not in choices.get(name, []) for name, spec in layers.items()):
            continue  # a spec the space leaves out (e.g. float compute): not this space's to start from
        seed = Assignment({name: layers.get(name, "fp32" if "fp32" in c else c[0]) for name, c in choices.items()})
        seeds.setdefault(seed.key(), seed)
        twin = learned_twin(seed, choices, keep)
        seeds.setdefault(twin.key(), twin)
        if table is not None:
            resized = at_size(seed, table, choices, keep)
            seeds.setdefault(resized.key(), resized)
        specs = pd.Series(list(layers.values())).value_counts()
        if table is None or scores is None or specs.index.isin(table["precision"]).sum() < 2:
            continue  # one scored spec (fp32 has no score): nothing to rebalance
        specs = specs[specs.index.isin(table["precision"])]
        safest = min(specs.index, key=lambda spec: scores.xs(spec, level="precision").mean())
        base = next(spec for spec in specs.index if spec != safest)
        lower = {name: base if spec == safest else spec for name, spec in layers.items()}
        offering = [n for n in layers if n not in keep and safest in choices[n] and lower[n] in choices[n]
                    and (n, lower[n]) in scores]
        order = sorted(offering, key=lambda n: scores[(n, lower[n])], reverse=True)
        for count in (sum(layers[n] == safest for n in offering), *(round(f * len(offering)) for f in fractions)):
            rebalanced = Assignment({**seed.layers, **{n: safest if i < count else lower[n]
                                                       for i, n in enumerate(order)}})
            seeds.setdefault(rebalanced.key(), rebalanced)
    return list(seeds.values())


def learned_twin(seed: Assignment, choices: dict[str, list[str]], keep: frozenset[str] = frozenset()) -> Assignment:
    """`seed` with each layer moved to the learned-rounding form of its spec where the space offers it
    (`w4g32-acc4` or `w4g32-kquant-acc4` -> `w4g32-adaround-acc4`, `int8` -> `int8-adaround`): the same bits,
    blocks and kernels, the weights fitted to FP32's outputs. `keep`: layers left as they are (a tied table and
    LM head, stored once only while they share a format)."""
    layers = {}
    for name, text in seed.layers.items():
        spec = Precision.parse(text)
        try:
            twin = text if spec.kind not in ("static", "weight-only") or name in keep else str(
                replace(spec, rounding="adaround", symmetric=spec.symmetric or spec.kind == "weight-only"))
        except AutoqError:  # no learned form of this spec
            twin = text
        layers[name] = twin if twin in choices.get(name, []) else text
    return Assignment(layers, dict(seed.options))


def at_size(seed: Assignment, table: pd.DataFrame, choices: dict[str, list[str]], keep: frozenset[str] = frozenset(),
            relax: float = 0.5, spend: float = 0.9) -> Assignment:
    """`seed` at its own size with its bytes placed by sensitivity: the `relax` share of its layers that lose the
    least in their fastest spec no larger than theirs take it (SmolLM2: int4 in blocks of 128 for blocks of 32),
    and `spend` of the bytes that frees goes, most fragile layer first, to each layer's most accurate spec that
    saves latency (the rest is slack for the table's estimates: SmolLM2's GenAI int4 so placed was 0.2% larger)."""
    rows = table.set_index(["layer", "precision"])
    score, saved = rows["score"], rows["size_saving_bytes"]
    faster = rows["latency_saving_ms"].fillna(0)
    layers = dict(seed.layers)
    movable = [n for n, p in layers.items() if n not in keep and (n, p) in score.index]
    own = {n: [p for p in choices[n] if (n, p) in score.index] for n in movable}
    fast = {n: max((p for p in own[n] if saved[(n, p)] >= saved[(n, layers[n])]), key=lambda p: faster[(n, p)])
            for n in movable}
    for n in sorted(movable, key=lambda n: score[(n, fast[n])])[: round(relax * len(movable))]:
        layers[n] = fast[n]
    budget = spend * sum(saved[(n, layers[n])] - saved[(n, seed.layers[n])] for n in movable)
    for n in sorted(movable, key=lambda n: score[(n, layers[n])], reverse=True):
        safe = min((p for p in own[n] if faster[(n, p)] > 0), key=lambda p: score[(n, p)], default=layers[n])
        cost = saved[(n, layers[n])] - saved[(n, safe)]
        if layers[n] == seed.layers[n] and 0 < cost <= budget:
            layers[n], budget = safe, budget - cost
    return Assignment(layers, dict(seed.options))


def follow_ties(seeds: list[Assignment], ties: dict[str, str], choices: dict[str, list[str]]) -> list[Assignment]:
    """Each seed with every weight-only tied table (`Backend.tied_tables`) in its head's spec where the table offers
    it (the head's accuracy level aside): the backend then stores the table once, in the head's weights (SmolLM2:
    16 MB of int4 table saved). Seeds rank tables by their own bytes and cannot see that saving."""
    followed: dict[str, Assignment] = {}
    for seed in seeds:
        layers = dict(seed.layers)
        for table, head in ties.items():
            if table not in layers or head not in layers or Precision.parse(layers[table]).kind != "weight-only":
                continue
            same = Precision.parse(layers[head]).weight_format()
            if same is not None and str(same) in choices.get(table, []):
                layers[table] = str(same)
        moved = Assignment(layers, dict(seed.options))
        followed.setdefault(moved.key(), moved)
    return list(followed.values())
