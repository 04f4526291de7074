"""Work on a run directory after (or during) a search: regenerate its report, export a point, compare runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pandas as pd

from autoq.errors import AutoqError
from autoq.graph import find_layers, weight_array
from autoq.pareto import front as pareto_front
from autoq.reporting.html import write_compare_html, write_html, write_sensitivity_html
from autoq.reporting.tables import trials_frame
from autoq.study import LOCATION, load_run_study

META = "meta.json"
RECIPES = "recipes.csv"
UNION = "union.json"  # in a run directory holding one search per backend and their union front (`autoq.union`)
__all__ = ["compare", "export_point", "load", "regenerate", "write_sensitivity_html"]


def _check(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not any((run_dir / marker).is_file() for marker in ("study.db", LOCATION, UNION)):
        msg = f"{run_dir} is not an autoq run directory (no study.db or study.json): give the --out of a search"
        raise AutoqError(msg)
    return run_dir


def load(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(trials, front, meta) as they are now; also for a run still in progress (the front is then the
    search-split front, with the validation columns of points already re-measured)."""
    run_dir = _check(run_dir)
    study = load_run_study(run_dir)
    trials = trials_frame(study)
    front = pareto_front(trials)
    saved = run_dir / "pareto.csv"
    if saved.is_file() and not front.empty:
        measured = pd.read_csv(saved)
        extra = [c for c in measured.columns if c not in front.columns or c == "key"]
        front = front.merge(measured[extra], on="key", how="left")
    meta = json.loads((run_dir / META).read_text()) if (run_dir / META).is_file() else {}
    return trials, front, meta


def most_sensitive_weight(run_dir: Path, scores: pd.DataFrame | None) -> tuple[str, np.ndarray, int] | None:
    """(layer, weight array, output-channel axis) of the layer with the highest sensitivity score."""
    if scores is None or scores.empty or not (run_dir / "model.onnx").is_file():
        return None
    name = str(scores.sort_values("score", ascending=False)["layer"].iloc[0])
    model = onnx.load(str(run_dir / "model.onnx"))
    layer = next((la for la in find_layers(model) if la.name == name), None)
    return None if layer is None else (name, weight_array(model, layer.weight), layer.channel_axis)


def regenerate(run_dir: Path) -> Path:
    """Rewrite report.html from the study as it is now."""
    run_dir = _check(run_dir)
    trials, front, meta = load(run_dir)
    scores = pd.read_csv(run_dir / "sensitivity.csv") if (run_dir / "sensitivity.csv").is_file() else None
    recipes = pd.read_csv(run_dir / RECIPES, keep_default_na=True) if (run_dir / RECIPES).is_file() else None
    return write_html(run_dir / "report.html", trials, front, meta, scores, most_sensitive_weight(run_dir, scores),
                      recipes)


def export_point(run_dir: Path, point: int, to: Path) -> list[Path]:
    """Copy a front point's model and assignment into the folder `to`."""
    source = _check(run_dir) / "front" / f"point-{point}"
    if not source.is_dir():
        points = sorted(int(p.name.split("-")[1]) for p in (Path(run_dir) / "front").glob("point-*"))
        msg = f"{run_dir} has no front point {point} (points: {points or 'none yet; let the search finish'})"
        raise AutoqError(msg)
    to.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(f, to / f.name)) for f in sorted(source.iterdir()) if f.is_file()]


def compare(run_dirs: list[Path], out: Path) -> Path:
    """One page overlaying the fronts of several runs."""
    runs = {}
    for run_dir in run_dirs:
        trials, front, meta = load(run_dir)
        runs[f"{Path(run_dir).name} ({meta.get('backend', '?')})"] = (trials, front, meta)
    return write_compare_html(out, runs)
