"""The one orchestrator: search() and sensitivity() from a model, data, metric and space to a run directory."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autoq import data as data_mod
from autoq import recipes as recipes_mod
from autoq import sensitivity as sensitivity_mod
from autoq import union
from autoq.backends import get_backend
from autoq.backends.base import Candidate
from autoq.costmodel import Screen
from autoq.errors import AutoqError
from autoq.evaluate import CandidateError, Evaluator
from autoq.files import write_json
from autoq.measure import hardware_key
from autoq.objective import run_search
from autoq.pareto import front as pareto_front
from autoq.precision import Assignment, Precision
from autoq.problem import REPORTS, DataArg, open_problem
from autoq.progress import PhaseProgress
from autoq.recovery import rounding
from autoq.reporting import run as run_report
from autoq.reporting import trials_frame
from autoq.seeds import starting_points
from autoq.settings import RunSettings
from autoq.study import open_study
from autoq.worker import Worker, WorkerSpec


@dataclass
class SearchResult:
    run_dir: Path
    trials: pd.DataFrame
    front: pd.DataFrame
    report: Path
    sensitivity: pd.DataFrame | None = None
    recipes: pd.DataFrame | None = None  # the backend's one-line recipes and the verdict against the front


def fit_learned_rounding(evaluator: Evaluator, choices: dict[str, list[str]], progress: bool) -> None:
    """The one-time learned-rounding pass (`autoq.recovery.rounding`) for every layer a learned spec is offered to:
    cached in the run directory, so trials that pick one build as fast as round-to-nearest."""
    layers = {layer.name: layer for layer in evaluator.model.layers}
    pairs = rounding.missing(evaluator.calibration, [(layers[name], Precision.parse(p))
                                                      for name, allowed in choices.items() for p in allowed],
                             evaluator.backend.learned_roundings)
    if not pairs:
        return
    with PhaseProgress("learned rounding", len(pairs), progress) as bar:
        rounding.prepare(evaluator.model, evaluator.calibration, pairs, lambda done, _: bar.advance(done))


def search(model: str | Path | object | None = None, data: DataArg = None, *more: DataArg,
           example_inputs=None, settings: RunSettings | None = None, **changes: Any) -> SearchResult:
    """Search per-layer precisions of `model` and write the run (trials, front, models, report) to its `out`.

    How the run goes is a RunSettings (`settings`, and/or its fields as keywords: `labels`, `metric`, `space`,
    `backend`, `trials`, `timeout`, `threads`, `out`, `seed`, `progress`, `max_drop`, `latency_budget`,
    `size_budget`, `trial_timeout`, `sampler`, `storage`, `study`, `recipes`; see RunSettings).
    Constraints make the front the feasible one; the rest of the trials is kept and greyed. Each trial runs in a
    worker process: one that crashes or takes over `trial_timeout` s fails alone. With `recipes="auto"` the
    backend's one-line recipes (e.g. ORT `quantize_dynamic`) are measured beside the front, with the front point
    that dominates each (`recipes.csv`, the report).

    `model` is an ONNX file, a `torch.export.save` file (.pt2), or an nn.Module: then call it as
    `search(module, example_inputs, data, ...)`; layers are named by module FQN either way.
    With no model, searches the embedded demo (all-MiniLM-L6-v2 on English sentences, cosine to FP32).
    Running the same call again resumes the run: finished trials are kept.
    """
    started = time.perf_counter()
    if more:  # search(module, example_inputs, data)
        example_inputs, data = data, more[0]
    settings = (settings or RunSettings()).changed(**changes)
    if len(union.backends_of(settings.backend)) > 1:
        return _search_union(model, data, example_inputs, settings)
    with open_problem(model, data, example_inputs, settings, searching=True) as problem:
        run_dir, evaluator, choices = problem.run_dir, problem.evaluator, problem.choices
        scores = None
        fit_learned_rounding(evaluator, choices, settings.progress)
        if problem.space.sensitivity != "none":
            with PhaseProgress(f"sensitivity ({problem.space.sensitivity})", 1, settings.progress) as bar:
                scores = sensitivity_mod.analyse(evaluator, choices, problem.space.sensitivity, run_dir / "cache")
                bar.advance(1)
            choices = sensitivity_mod.prune(choices, scores, problem.space.max_layer_drop)
            scores.to_csv(run_dir / "sensitivity.csv", index=False)
        recipe_layers = [r.layers(evaluator.model) for r in evaluator.backend.recipes(evaluator.model) if r.layers]
        start = starting_points(scores, choices, recipe_layers, evaluator.backend.tied_tables(evaluator.model),
                                problem.space.options, evaluator.backend.option_affects)
        optuna_study, created = open_study(run_dir, problem.space, problem.seed, hardware_key(problem.machine),
                                           problem.config, settings.storage, settings.study)
        if "fp32_latency_ms" not in optuna_study.user_attrs:
            optuna_study.set_user_attr("fp32_latency_ms", evaluator.time_reference())
        evaluator.fp32_latency_ms = optuna_study.user_attrs["fp32_latency_ms"]
        screen = None
        if scores is not None and problem.space.screen:
            screen = Screen(scores, choices, screened=int(trials_frame(optuna_study)["screened"].ne("").sum()))
        worker = _worker(evaluator, settings.trial_timeout)
        try:
            run_search(optuna_study, worker.evaluate if worker else evaluator.evaluate, evaluator.fp32_quality(),
                       choices, problem.space, settings, start.seeds, screen, created,
                       evaluator.backend.option_affects, start.recipes)
            table = trials_frame(optuna_study)
            front = finalize_front(evaluator, pareto_front(table), run_dir, settings.progress)
            recipe_table = None if settings.recipes == "none" else recipes_mod.measure_recipes(
                evaluator, run_dir, front, worker.measure_recipe if worker else None, settings.progress,
                settings.constraints.quality_floor)
        finally:
            if worker:
                worker.close()
        regions = evaluator.backend.regions(evaluator.model, evaluator.calibration)
    table.to_csv(run_dir / "trials.csv", index=False)
    front.to_csv(run_dir / "pareto.csv", index=False)
    if recipe_table is not None:
        recipe_table.to_csv(run_dir / run_report.RECIPES, index=False)
    meta = {"model": problem.model_name, "backend": settings.backend, "metric": problem.metric,
            "space": problem.space.name, "machine": problem.machine,
            "wall_s": time.perf_counter() - started, "timed": problem.evaluator.timed,
            "search_settings": problem.evaluator.backend.search_settings,
            "deployed_settings": problem.evaluator.backend.deployed_settings,
            "glue_kept_float": dict(regions.kept_float) if regions is not None else None}
    (run_dir / run_report.META).write_text(json.dumps(meta, indent=2))
    return SearchResult(run_dir, table, front, run_report.regenerate(run_dir), scores, recipe_table)


def _search_union(model: object, data: DataArg, example_inputs: object, settings: RunSettings) -> SearchResult:
    """One search per backend in one run directory, then their union front (`autoq.union`). A backend that cannot
    search this model is left out with its one-line reason."""
    names = union.backends_of(settings.backend)
    run_dir = Path(settings.out) if settings.out else REPORTS / f"{union.model_stem(model, settings.demo)}-union"
    for name, part in union.parts(settings, names, run_dir):
        try:
            search(model, data, example_inputs=example_inputs, settings=part)
        except AutoqError as exc:
            print(f"autoq: {name}: {exc} (the union goes on without {name})", file=sys.stderr)
    if not union.searched(run_dir):
        raise AutoqError(f"none of {', '.join(names)} could search this model (their reasons are above)")
    front, recipes, _ = union.retime(run_dir, progress=settings.progress)
    return SearchResult(run_dir, union.trials(run_dir), front, run_dir / "report.html", None,
                        recipes if not recipes.empty else None)


def _worker(evaluator: Evaluator, timeout: float) -> Worker | None:
    """A worker process for the trials, or None when the metric cannot be sent to one (a lambda)."""
    spec = WorkerSpec.of(evaluator)
    try:
        pickle.dumps(spec.metric)
        pickle.dumps(spec.module)
    except (pickle.PicklingError, AttributeError, TypeError):
        print("autoq: the metric or the torch module cannot be sent to a worker process (define them at module "
              "level to get one); trials run in this process, without a timeout", file=sys.stderr)
        return None
    return Worker(spec, timeout)


def apply(module, assignment: Assignment | str | Path):
    """A copy of the torch `module` with each module in its assigned precision (an Assignment, or a front
    point's assignment.yaml); load the point's exported model.pt state dict into it to get the deployed model."""
    from autoq.backends.torch import apply as apply_to_module

    if not isinstance(assignment, Assignment):
        assignment = Assignment.load(Path(assignment))
    return apply_to_module(module, assignment)


def finetune(run_dir: str | Path, point: int, data: DataArg, labels: str | Path | np.ndarray | None = None,
             epochs: int = 20, minutes: float | None = None, progress: bool = True) -> pd.DataFrame:
    """Quantization-aware training of front point `point` of a finished run (`autoq.recovery.finetune`), on the
    run's own data (`data`, `labels`: as given to its search); adds the result to the run's front and returns it.
    Interrupted, the same call resumes from the last finished epoch."""
    run_dir = Path(run_dir)
    if union.is_union(run_dir):
        raise AutoqError(f"{run_dir} is a union of runs: fine-tune a point of one backend's run, e.g. autoq finetune "
                         f"{run_dir / union.searched(run_dir)[0]} --point N (its pareto.csv numbers the points)")
    if not (run_dir / "run.json").is_file() or not (run_dir / "pareto.csv").is_file():
        raise AutoqError(f"{run_dir} holds no finished search (run.json and pareto.csv): run autoq search first")
    if find_spec("torch") is None:
        raise AutoqError("fine-tuning trains in torch: pip install 'autoq[torch]'")
    from autoq.recovery.finetune import finetune_point

    config = json.loads((run_dir / "run.json").read_text())
    if get_backend(config["backend"]).takes_module:
        raise AutoqError(f"autoq finetune trains the run's ONNX graph; the {config['backend']} backend builds from "
                         "your nn.Module, which it cannot hand the trained weights yet: fine-tune an onnxruntime or "
                         "openvino run")
    settings = RunSettings(backend=config["backend"], metric=config["metric"], labels=labels, out=str(run_dir),
                           progress=progress)
    if data is None:
        raise AutoqError("give the run's data (--data), as given to its search")
    with open_problem(run_dir / "model.onnx", data, None, settings, searching=False) as problem:
        if data_mod.fingerprint(data_mod.load(data, labels)) != config["data"]:
            raise AutoqError(f"this is not the data {run_dir} was searched with: give the same --data (and --labels)")
        front = finetune_point(problem.evaluator, run_dir, point, epochs, minutes, progress)
    run_report.regenerate(run_dir)
    return front


def report(run_dir: str | Path) -> Path:
    """Regenerate report.html of a run (also of one still in progress)."""
    if union.is_union(Path(run_dir)):
        return union.write_report(Path(run_dir))
    return run_report.regenerate(Path(run_dir))


def export(run_dir: str | Path, point: int, to: str | Path) -> list[Path]:
    """Copy front point `point` (its model file and assignment.yaml) of a run into the folder `to`."""
    return run_report.export_point(Path(run_dir), point, Path(to))


def verify(run_dir: str | Path, points: list[int] | None = None, against: Sequence[str | Path] = (),
           rounds: int = 15, passes: int = 3, pass_pause_s: float | None = None, progress: bool = True) -> pd.DataFrame:
    """Re-time a finished run's front points (all, or `points`), FP32, its recipes and the files `against` in
    alternating rounds with deployment session settings, spread over `passes` passes: one row per model, ratio to
    FP32 and its 95% interval, and (after the first verify) the first verify's ratio and whether today's falls
    inside its interval."""
    from autoq.retime import PASS_PAUSE_S
    from autoq.retime import verify as verify_run

    if union.is_union(Path(run_dir)):  # every backend's points and recipes, re-timed together
        if points is not None or against:
            raise AutoqError("verify re-times a union run whole: leave out --point and --against")
        return union.retime(Path(run_dir), rounds, passes, PASS_PAUSE_S if pass_pause_s is None else pass_pause_s,
                            progress)[2]
    return verify_run(run_dir, points, against, rounds, passes,
                      PASS_PAUSE_S if pass_pause_s is None else pass_pause_s, progress)


def compare(run_dirs: list[str | Path], out: str | Path = "compare.html") -> Path:
    """Overlay the fronts of several runs (e.g. ONNX Runtime vs OpenVINO on one model) in one page."""
    return run_report.compare([Path(r) for r in run_dirs], Path(out))


def analyse_sensitivity(model: str | Path | object | None = None, data: DataArg = None, *more: DataArg,
                        example_inputs=None, method: str = "measured", settings: RunSettings | None = None,
                        **changes: Any) -> pd.DataFrame:
    """Score every layer at every precision of the space; writes sensitivity.csv and sensitivity.html.
    Takes the same models and settings as `search` (an nn.Module as `analyse_sensitivity(module,
    example_inputs, data)`); of the settings, it reads labels, metric, space, backend, threads and out."""
    if more:
        example_inputs, data = data, more[0]
    settings = (settings or RunSettings()).changed(**changes)
    with open_problem(model, data, example_inputs, settings, searching=False) as problem:
        table = sensitivity_mod.analyse(problem.evaluator, problem.choices, method, problem.run_dir / "cache")
    table.to_csv(problem.run_dir / "sensitivity.csv", index=False)
    run_report.write_sensitivity_html(problem.run_dir / "sensitivity.html", table, problem.model_name, method)
    return table


def finalize_front(evaluator: Evaluator, front: pd.DataFrame, run_dir: Path, progress: bool = False) -> pd.DataFrame:
    """Re-measure every front point on the validation split with more runs, and export it. A point an earlier call
    on this run directory measured (the same assignment) keeps its figures: a resumed run measures only new points."""
    rows = []
    with PhaseProgress("re-measuring the front on the validation split", len(front), progress) as bar:
        for index, row in front.iterrows():
            rows.append(_finalize_point(evaluator, index, row, run_dir))
            bar.advance(len(rows))
    return pd.DataFrame(rows)


def _finalize_point(evaluator: Evaluator, index: Any, row: pd.Series, run_dir: Path) -> dict:
    """One front point re-measured on the validation split and exported: its row with the validation columns."""
    point_dir = run_dir / "front" / f"point-{index}"
    point_dir.mkdir(parents=True, exist_ok=True)
    assignment = Assignment.from_dict(json.loads(row["assignment"]))
    assignment.save(point_dir / "assignment.yaml")
    saved = run_dir / "cache" / "validation" / f"{assignment.key()}.json"
    extra: dict[str, Any] = {"point": index}
    try:
        candidate = evaluator.build(assignment, point_dir / "build")
        if saved.exists():
            figures = json.loads(saved.read_text())
        else:
            figures = _validation_figures(evaluator, candidate)
            write_json(saved, figures)  # whole or absent: a run killed here resumes
        model_path = evaluator.backend.export(candidate, point_dir / "model.onnx")
        extra |= figures | {"model": str(model_path.relative_to(run_dir))}
    except CandidateError as exc:
        extra |= {"error": f"re-measure failed: {exc}"}
    finally:
        shutil.rmtree(point_dir / "build", ignore_errors=True)
    return {**row.to_dict(), **extra}


def _validation_figures(evaluator: Evaluator, candidate: Candidate) -> dict[str, Any]:
    """A built point's validation columns: quality, latency against FP32 and with the deployed settings, executed."""
    measured = evaluator.evaluate(candidate.assignment, "validation", candidate, min_runs=20, max_runs=80)
    if evaluator.backend.deployed_settings == evaluator.backend.search_settings:  # the same sessions
        deployed, deployed_spread = measured.speedup or 0.0, measured.speedup_spread
    else:
        deployed, deployed_spread = evaluator.deployed_speedup(candidate, min_runs=20, max_runs=60)
    disagree = abs(deployed - (measured.speedup or 0.0)) > max(measured.speedup_spread, deployed_spread)
    figures = {"val_quality": measured.quality, "val_quality_spread": measured.quality_spread,
               "val_latency_ms": measured.latency_ms, "val_measured_latency_ms": measured.measured_latency_ms,
               "val_latency_spread_ms": measured.latency_spread_ms, "val_load": measured.load,
               "val_fp32_latency_ms": measured.fp32_latency_ms, "val_executed_ok": measured.executed_ok,
               "val_deployed_speedup": deployed, "val_deployed_spread": deployed_spread,
               "settings_disagree": disagree}
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in figures.items()}
