"""`autoq verify`: re-time a finished run's front points, its FP32 model and its recipes (or any model files) in
alternating rounds with the session settings a user deploys with, as ratios to FP32 with a confidence interval,
so a result can be checked on another day or machine."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import pandas as pd

from autoq.backends import get_backend
from autoq.backends.base import Candidate
from autoq.calibrate import cached_samples
from autoq.decoder import timing_feeds
from autoq.errors import AutoqError
from autoq.graph import input_specs
from autoq.measure import interval, ratio_rounds
from autoq.precision import Assignment
from autoq.progress import PhaseProgress

FP32 = "FP32"
DRIFT = 0.15  # FP32's own speed moving more than this (within one verify, or since the first) makes ratios move
FIRST = "verify.json"  # in the run directory: FP32's speed and ratios at the first verify, for later ones to compare
PASS_PAUSE_S = 20.0  # between verify's passes


def run_models(run_dir: Path, reference: Path, points: list[int] | None = None,
               against: Sequence[Path] = ()) -> dict[str, tuple[Path, dict]]:
    """Label -> (model file, model-wide options) of everything to time; FP32 (`reference`) first."""
    models: dict[str, tuple[Path, dict]] = {FP32: (reference, {})}
    front = pd.read_csv(run_dir / "pareto.csv")
    wanted = set(points) if points is not None else set(front["point"])
    unknown = wanted - set(front["point"])
    if unknown:
        msg = f"{run_dir} has no front point {min(unknown)} (points: {sorted(front['point'])})"
        raise AutoqError(msg)
    for row in front[front["point"].isin(wanted) & front["model"].notna()].itertuples():
        options = Assignment.load(run_dir / "front" / f"point-{row.point}" / "assignment.yaml").options
        models[f"point {row.point}: {row.summary}"] = (run_dir / str(row.model), options)
    recipes = run_dir / "recipes.csv"
    if recipes.is_file() and points is None:
        table = pd.read_csv(recipes, keep_default_na=False)
        for row in table[table["error"] == ""].itertuples():
            models[f"recipe: {row.recipe}"] = (run_dir / row.model, json.loads(row.options or "{}"))
    for path in against:
        if not path.is_file():
            msg = f"--against {path}: no such file"
            raise AutoqError(msg)
        label = f"file: {path.name}"  # two runtimes' exports are both `model.onnx`: then the path as given
        models[label if label not in models else f"file: {path}"] = (path, {})
    return models


def verify(run_dir: str | Path, points: list[int] | None = None, against: Sequence[str | Path] = (),
           rounds: int = 15, passes: int = 3, pass_pause_s: float = PASS_PAUSE_S,
           progress: bool = True) -> pd.DataFrame:
    """One row per model: its median ms, its speed-up over FP32 (median of the per-round ratios) and the 95%
    confidence interval of that median. The rounds are timed in `passes` passes `pass_pause_s` apart, and the
    interval resamples passes first: a shared host changes pace over minutes, and one burst of rounds would give an
    interval narrower than what the next invocation sees. Where the backend's compilations of one model differ
    (OpenVINO), each model is compiled several times, the rounds take turns among them, and the interval covers
    that difference too.
    The first verify of a run keeps its table (verify.json); a later one adds each model's ratio then and whether
    today's median falls inside that interval (`inside first`).
    `table.attrs`: FP32's median ms in the first and last third of the rounds and whether it moved by more than
    DRIFT (the machine changed speed while it was timed), and FP32's ms now and at the run's first verify and
    whether they differ by more than DRIFT (the host is not as loaded as it was then: the ratios are not comparable
    with that day's; measured here, with FP32 22% slower MiniLM's OpenVINO ratios were a median 12% lower,
    reports/benchmarks/verify.md)."""
    run_dir = Path(run_dir)
    if not (run_dir / "pareto.csv").is_file() or not (run_dir / "run.json").is_file():
        msg = f"{run_dir} holds no finished autoq run (no pareto.csv): give the --out of a search that finished"
        raise AutoqError(msg)
    if passes < 1 or rounds < 1:
        msg = f"verify needs at least one pass and one round (got {passes} passes, {rounds} rounds)"
        raise AutoqError(msg)
    passes = min(passes, rounds)
    backend = get_backend(json.loads((run_dir / "run.json").read_text())["backend"])
    if backend.verify_refusal:
        raise AutoqError(backend.verify_refusal)
    meta = json.loads((run_dir / "meta.json").read_text()) if (run_dir / "meta.json").is_file() else {}
    threads = int(meta.get("machine", {}).get("threads", 2))
    samples = cached_samples(run_dir / "cache")
    if samples is None:
        msg = f"{run_dir}/cache has no calibration samples to feed the models: run the search there again"
        raise AutoqError(msg)
    models = run_models(run_dir, backend.reference_model(run_dir), points, [Path(p) for p in against])
    instances = backend.deployed_instances
    runners = {label: [backend.deployed_runner(Candidate(Assignment({}, options), path, 0), threads)
                       for _ in range(instances)] for label, (path, options) in models.items()}
    feeds = run_feeds(run_dir, runners[FP32][0], samples)
    runs = {label: [partial(run, feeds) for run in each] for label, each in runners.items()}
    table = time_models(runs, FP32, rounds, passes, pass_pause_s, progress)
    return _against_first(table, run_dir / FIRST, table.attrs["fp32_ms"])


def run_feeds(run_dir: Path, runner: Callable, samples: Path) -> dict[str, np.ndarray]:
    """One sample of the run's cached calibration data, as its FP32 model is fed (a language model: one decode
    step)."""
    proto = onnx.load(str(run_dir / "model.onnx"), load_external_data=False)
    return timing_feeds(runner, {k: v[:1] for k, v in np.load(samples).items()}, input_specs(proto),
                        [o.name for o in proto.graph.output])


def time_models(runs: Mapping[str, Sequence[Callable[[], object]]], reference: str, rounds: int, passes: int,
                pass_pause_s: float, progress: bool, title: str = "verify") -> pd.DataFrame:
    """Time every model against `reference` in alternating rounds spread over `passes` passes (each model given as
    its separately compiled instances, as many for every model): one row per model with its median ms and its
    ratio to the reference with the 95% interval (passes and instances resampled first). `attrs`: the reference's
    median ms, and at the start and end of the rounds with whether it drifted."""
    instances = len(runs[reference])
    per_pass = -(-rounds // (passes * instances)) * instances  # each instance as often in every pass
    passes_timed = []
    with PhaseProgress(f"{title}: {len(runs)} models, {passes} passes", passes, progress, stderr=True) as bar:
        for index in range(passes):
            if index:
                time.sleep(pass_pause_s)
            passes_timed.append(ratio_rounds(runs, reference, rounds=per_pass))
            bar.advance(index + 1)
    rows = []
    for label in runs:
        ms = np.concatenate([timed[label][0] for timed in passes_timed])
        ratios = [timed[label][1] for timed in passes_timed]  # the reference's (all 1.0): one per model and round
        clusters = [index * instances + np.arange(len(r)) * per_pass // len(r) % instances  # pass, then instance
                    for index, r in enumerate(ratios)]
        ratio, low, high = interval(np.concatenate(ratios), clusters=np.concatenate(clusters))
        rows.append({"model": label, "ms": float(np.median(ms)), "vs FP32": ratio, "95% low": low, "95% high": high})
    table = pd.DataFrame(rows)
    reference_ms = np.concatenate([timed[reference][0] for timed in passes_timed])
    start, end, table.attrs["drifted"] = fp32_drift(reference_ms)
    table.attrs["fp32_ms_start_end"] = (start, end)
    table.attrs["fp32_ms"] = float(np.median(reference_ms))
    return table


def _against_first(table: pd.DataFrame, first: Path, now: float) -> pd.DataFrame:
    """Keep the first verify's FP32 speed and ratios in `first`; on a later one, add each model's ratio then and
    whether today's median falls inside that interval, and say whether FP32 itself moved by more than DRIFT."""
    if not first.is_file():
        columns = zip(table["model"], table["vs FP32"], table["95% low"], table["95% high"], strict=True)
        first.write_text(json.dumps({"fp32_ms": now, "ratios": {m: [r, lo, hi] for m, r, lo, hi in columns}}))
        table.attrs["fp32_ms_first_verify"], table.attrs["host_changed"] = now, False
        return table
    kept = json.loads(first.read_text())
    then = table.attrs["fp32_ms_first_verify"] = float(kept["fp32_ms"])
    table.attrs["host_changed"] = abs(now / then - 1) > DRIFT
    earlier = kept.get("ratios", {})
    if earlier:
        table["first"] = [earlier.get(model, [np.nan])[0] for model in table["model"]]
        table["inside first"] = [earlier[m][1] <= r <= earlier[m][2] if m in earlier else None
                                 for m, r in zip(table["model"], table["vs FP32"], strict=True)]
    return table


def fp32_drift(reference_ms: np.ndarray) -> tuple[float, float, bool]:
    """FP32's median ms over the first and the last third of the rounds (in time order), and whether it moved by
    more than DRIFT between them."""
    third = max(1, len(reference_ms) // 3)
    start, end = float(np.median(reference_ms[:third])), float(np.median(reference_ms[-third:]))
    return start, end, abs(end / start - 1) > DRIFT
