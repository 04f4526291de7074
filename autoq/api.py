"""The one orchestrator: search() from a model, data, metric and space to a run directory with a report."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from autoq import data as data_mod
from autoq.backends import get_backend
from autoq.calibrate import calibrate
from autoq.errors import AutoqError
from autoq.evaluate import CandidateError, Evaluator
from autoq.graph import prepare
from autoq.measure import fingerprint, hardware_key
from autoq.metrics import Metric, get_metric
from autoq.pareto import front as pareto_front
from autoq.precision import Assignment
from autoq.report import trials_frame, write_html
from autoq.search import open_study, run_lock, run_search
from autoq.space import SearchSpace, load_space

REPORTS = Path("reports")


@dataclass
class SearchResult:
    run_dir: Path
    trials: pd.DataFrame
    front: pd.DataFrame
    report: Path


def _check_run(run_dir: Path, config: dict) -> None:
    """A run directory holds one problem; resuming it with another model/data/space is an error."""
    path = run_dir / "run.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in config if old.get(k) != config[k]]
        if changed:
            msg = (f"{run_dir} holds a run with a different {', '.join(changed)}: "
                   "choose another --out (or delete it) to start a new run")
            raise AutoqError(msg)
    else:
        path.write_text(json.dumps(config, indent=2))


def search(model: str | Path | None = None, data: str | Path | Mapping[str, np.ndarray] | None = None, *,
           labels: str | Path | np.ndarray | None = None, metric: str | Metric | None = None,
           space: str | Path | dict | SearchSpace | None = None, backend: str = "onnxruntime", trials: int = 30,
           timeout: float | None = None, threads: int = 2, out: str | Path | None = None, seed: int | None = None,
           progress: bool = True) -> SearchResult:
    """Search per-layer precisions of `model` and write the run (trials, front, models, report) to `out`.

    With no model, searches the embedded demo (all-MiniLM-L6-v2 on English sentences, cosine to FP32).
    Running the same call again resumes the run: finished trials are kept.
    """
    started = time.perf_counter()
    if model is None:
        from autoq.demo import demo_files

        model, data = demo_files()
        metric = metric or "cosine"
    if data is None:
        raise AutoqError("no data: pass --data DATA.npz with arrays named as the model inputs")
    if trials < 1 or threads < 1:
        raise AutoqError("--trials and --threads must be at least 1")
    chosen_backend = get_backend(backend)
    search_space = load_space(space)
    seed = search_space.seed if seed is None else seed
    run_dir = Path(out) if out else REPORTS / f"{Path(model).stem}-{backend}"
    onnx_model = prepare(model, run_dir)
    dataset = data_mod.load(data, labels)
    data_mod.validate(dataset, onnx_model.inputs)
    splits = data_mod.split(dataset, seed=0)
    metric_name, metric_fn = get_metric(metric, dataset.labels is not None)
    choices = search_space.choices(onnx_model.layers, chosen_backend.precisions())
    _check_run(run_dir, {"model": hashlib.sha1(onnx_model.path.read_bytes()).hexdigest(),
                         "data": data_mod.fingerprint(dataset), "backend": backend, "metric": metric_name,
                         "choices": choices, "options": search_space.options, "seed": seed})
    machine = fingerprint(threads)
    with run_lock(run_dir):
        calibration = calibrate(onnx_model, splits.calibration, run_dir / "cache")
        evaluator = Evaluator(chosen_backend, onnx_model, calibration, splits, metric_fn, threads)
        try:
            study = open_study(run_dir, search_space, seed, hardware_key(machine))
            run_search(study, evaluator, choices, search_space, trials, timeout, progress)
            table = trials_frame(study)
            front = finalize_front(evaluator, pareto_front(table), run_dir)
        finally:
            evaluator.close()
    table.to_csv(run_dir / "trials.csv", index=False)
    front.to_csv(run_dir / "pareto.csv", index=False)
    meta = {"model": str(model), "backend": backend, "metric": metric_name, "machine": machine,
            "wall_s": time.perf_counter() - started}
    (run_dir / "machine.json").write_text(json.dumps(machine, indent=2))
    report = write_html(run_dir / "report.html", table, front, meta)
    return SearchResult(run_dir, table, front, report)


def finalize_front(evaluator: Evaluator, front: pd.DataFrame, run_dir: Path) -> pd.DataFrame:
    """Re-measure every front point on the validation split with more runs, and export it."""
    rows = []
    for index, row in front.iterrows():
        point_dir = run_dir / "front" / f"point-{index}"
        point_dir.mkdir(parents=True, exist_ok=True)
        assignment = Assignment.from_dict(json.loads(row["assignment"]))
        assignment.save(point_dir / "assignment.yaml")
        extra = {"point": index}
        try:
            candidate = evaluator.build(assignment, point_dir / "build")
            measured = evaluator.evaluate(assignment, "validation", candidate, min_runs=20, max_runs=80)
            model_path = evaluator.backend.export(candidate, point_dir / "model.onnx")
            extra |= {"val_quality": measured["quality"], "val_latency_ms": measured["latency_ms"],
                      "val_latency_spread_ms": measured["latency_spread_ms"], "val_load": measured["load"],
                      "val_fp32_latency_ms": measured["fp32_latency_ms"], "val_executed_ok": measured["executed_ok"],
                      "model": str(model_path.relative_to(run_dir))}
        except CandidateError as exc:
            extra |= {"error": f"re-measure failed: {exc}"}
        finally:
            shutil.rmtree(point_dir / "build", ignore_errors=True)
        rows.append({**row.to_dict(), **extra})
    return pd.DataFrame(rows)

