"""The backend's one-line recipes measured beside the front, and whether the front dominates each.

Each recipe is built into `recipes/<name>/` of the run directory from the run's cached calibration data, and
measured by the evaluator like a front point (validation split, alternating rounds with FP32), once per run
directory: a resumed run keeps the measurement (`measured.json` beside the model) and judges it against its new
front. A recipe that fails is a row with its one-line reason, tried again by the next call; the run goes on.

A front point dominates a recipe when its quality is at least the recipe's, its model no larger (1% slack for
the file format) and it runs at least as fast: the fastest such points are timed against the recipe in one set of
alternating rounds (their speed-ups over FP32, measured minutes apart on a shared host, differ by more than the
points and the recipe may), and the verdict names the one that saves the most latency. Where none does but one is
within the recipe's own measurement spread (its quality's bootstrap spread; the side-by-side interval), it
"matches" it: the same graph timed twice lands on either side of it.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autoq.backends.base import Candidate
from autoq.evaluate import CandidateError, Evaluator, Measurement
from autoq.files import write_json
from autoq.measure import interval, ratio_rounds
from autoq.precision import Assignment
from autoq.progress import PhaseProgress

SideBySide = Callable[[list[int], Any], dict[int, tuple[float, float, float]]]  # points, recipe row -> each
# point's speed-up over the recipe, timed against it in alternating rounds: (median, 95% low, 95% high)
SIDE_BY_SIDE_POINTS = 3  # the fastest points at the recipe's quality and size that are timed against it
SIDE_BY_SIDE_ROUNDS = 12
QUALITY_EPS = 1e-6  # float rounding: an exact FP32 copy scores 0.99999994 or 1.0 by summation order
COLUMNS = ["recipe", "val_quality", "val_latency_ms", "speedup", "size_bytes", "model", "options", "error",
           "quality_spread", "speedup_spread", "dominated_by", "matched_by", "latency_saved", "verdict"]


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


@dataclass(frozen=True)
class RecipeMeasurement:
    """A recipe built and measured: where its model is, its model-wide options, and the measurement."""

    path: Path
    options: dict
    measurement: Measurement


def measure_recipe(evaluator: Evaluator, label: str, workdir: Path) -> RecipeMeasurement:
    """Build the backend's recipe `label` into `workdir` and measure it on the validation split."""
    recipe = next(r for r in evaluator.backend.recipes(evaluator.model) if r.label == label)
    shutil.rmtree(workdir, ignore_errors=True)
    try:
        candidate = recipe.build(evaluator.model, evaluator.calibration, workdir)
    except Exception as exc:  # a recipe that cannot build on this model is recorded with its reason
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise CandidateError(f"{type(exc).__name__}: {reason}") from exc
    measured = evaluator.measure(candidate, "validation", min_runs=20, max_runs=80)
    return RecipeMeasurement(candidate.path, dict(candidate.assignment.options), measured)


def measure_recipes(evaluator: Evaluator, run_dir: Path, front: pd.DataFrame,
                    measure: Callable[[str, Path], RecipeMeasurement] | None = None,
                    progress: bool = False, max_drop: Callable[[float], float | None] | None = None) -> pd.DataFrame:
    """Every recipe of the evaluator's backend measured by `measure(label, workdir)` (the trial worker's, so a
    recipe that crashes or hangs fails alone; else in this process); then the verdicts against `front`."""
    measure = measure or (lambda label, workdir: measure_recipe(evaluator, label, workdir))
    rows: list[dict] = []
    recipes = evaluator.backend.recipes(evaluator.model)
    with PhaseProgress("measuring the runtime's recipes", len(recipes), progress) as bar:
        for recipe in recipes:
            rows.append(_recipe_row(recipe.label, measure, run_dir))
            bar.advance(len(rows))
    with PhaseProgress("timing the recipes beside the front", 1, progress) as bar:
        table = verdicts(front, pd.DataFrame(rows, columns=COLUMNS[:10]),
                         partial(_side_by_side, evaluator, run_dir, front), usable_floor(evaluator, max_drop))
        bar.advance(1)
    return table


def usable_floor(evaluator: Evaluator,
                 max_drop: Callable[[float], float | None] | None = None) -> tuple[float, str]:
    """The lowest validation quality worth comparing against: the search's --max-drop floor (`max_drop` maps the
    FP32 quality to it), and at least what a model that ignores its input scores (the FP32 outputs of other
    samples, shuffled: the metric's chance level on this data)."""
    fp32 = evaluator.fp32_quality("validation")
    floor = (max_drop(fp32) if max_drop is not None else None) or -np.inf
    if not getattr(evaluator.metric, "__module__", "").startswith("autoq."):  # a user's metric runs in workers only:
        return floor, "below --max-drop"  # it may crash on outputs it does not expect
    reference = evaluator.reference("validation")
    order = np.roll(np.arange(len(reference[0])), 1)
    chance = float(evaluator.metric(reference, [r[order] for r in reference], evaluator.splits.validation.labels))
    return (floor, "below --max-drop") if floor > chance else (chance, f"no better than a model that ignores its "
                                                                      f"input: {chance:.4f}")


def _recipe_row(label: str, measure: Callable[[str, Path], RecipeMeasurement], run_dir: Path) -> dict:
    """The recipe's row: measured by an earlier call on this run directory if its model is still there, else now."""
    saved = run_dir / "recipes" / _slug(label) / "measured.json"
    if saved.exists():
        row = json.loads(saved.read_text())
        if (run_dir / row["model"]).exists():
            return row
    try:
        built = measure(label, saved.parent)
    except CandidateError as exc:
        return {"recipe": label, "error": str(exc)}
    measured = built.measurement
    row = {"recipe": label, "val_quality": measured.quality, "val_latency_ms": measured.latency_ms,
           "speedup": measured.speedup, "size_bytes": measured.size_bytes,
           "model": str(built.path.relative_to(run_dir)), "options": json.dumps(built.options), "error": "",
           "quality_spread": measured.quality_spread, "speedup_spread": measured.speedup_spread}
    row = {k: v.item() if isinstance(v, np.generic) else v for k, v in row.items()}
    write_json(saved, row)  # whole or absent: a run killed here resumes
    return row


def _side_by_side(evaluator: Evaluator, run_dir: Path, front: pd.DataFrame, points: list[int],
                  recipe: Any) -> dict[int, tuple[float, float, float]]:
    """Each front point's speed-up over the recipe, from their exported models timed against it in one set of
    alternating rounds with the session settings a user deploys with (as `autoq verify` times them; they write
    nothing beside the models) on the search's latency feeds: (median, 95% low, 95% high). Each model runs as the
    backend's `deployed_instances` separately made sessions, made in turns and taking turns in the rounds, the
    interval resampling them: two sessions of one file can time a few percent apart."""
    backend, feeds = evaluator.backend, evaluator.latency_feeds
    models = front.set_index("point")["model"]
    files = {"recipe": (run_dir / recipe.model, json.loads(recipe.options or "{}"))}
    for point in points:
        options = Assignment.load(run_dir / "front" / f"point-{point}" / "assignment.yaml").options
        files[str(point)] = (run_dir / models[point], options)
    instances = backend.deployed_instances
    runs: dict[str, list[Callable[[], Any]]] = {label: [] for label in files}
    for _ in range(instances):  # in turns: no model has all the first-made (or last-made) sessions
        for label, (path, options) in files.items():
            run = backend.deployed_runner(Candidate(Assignment({}, options), path, 0), evaluator.threads)
            runs[label].append(partial(run, feeds))
    count = -(-SIDE_BY_SIDE_ROUNDS // instances) * instances
    rounds = ratio_rounds(runs, "recipe", rounds=count)
    clusters = np.arange(count) % instances  # the session each round ran
    return {point: interval(rounds[str(point)][1], clusters=clusters) for point in points}


def _front_speedup(front: pd.DataFrame) -> pd.Series:
    """A front point's validation speed-up over FP32 from its own alternating rounds (search split if absent)."""
    if {"val_fp32_latency_ms", "val_measured_latency_ms"} <= set(front.columns):
        return (front["val_fp32_latency_ms"] / front["val_measured_latency_ms"]).fillna(front["speedup"])
    return front["speedup"]


def verdicts(front: pd.DataFrame, recipes: pd.DataFrame, side_by_side: SideBySide | None = None,
             usable: tuple[float, str] | None = None) -> pd.DataFrame:
    """Add to each measured recipe the front point dominating it that saves the most latency, and a verdict. With
    `side_by_side`, the points at least as good and as small (or within the recipe's quality spread) are timed
    against the recipe in one set of alternating rounds and the verdict reads those ratios: a shared host's pace
    moves between two measurements minutes apart by more than a point and a recipe may differ. A recipe below
    `usable` (the lowest quality the search treats as usable, and why) is `unusable`: no point needs to beat it."""
    quality = front["val_quality"] if "val_quality" in front.columns else front["quality"]
    quality = quality.fillna(front["quality"])
    speedup = _front_speedup(front)
    dominated_by: list[int | None] = []
    matched_by: list[int | None] = []
    saved: list[float | None] = []
    text: list[str] = []
    for row in recipes.itertuples():
        dominated_by.append(None)
        matched_by.append(None)
        saved.append(None)
        if row.error or pd.isna(row.val_quality):
            text.append(f"failed: {row.error}")
            continue
        if usable is not None and row.val_quality < usable[0]:
            text.append(f"unusable: quality {row.val_quality:.4f} ({usable[1]})")
            continue
        smaller = front["size_bytes"] <= row.size_bytes * 1.01
        # within the recipe's own measurement noise (bootstrap spread of its quality, spread of its speed-up)
        quality_spread, speedup_spread = (_spread(getattr(row, c, None)) for c in ("quality_spread", "speedup_spread"))
        as_good = (quality >= row.val_quality - QUALITY_EPS) & smaller
        close = (quality >= row.val_quality - quality_spread) & smaller
        contenders = list(speedup[close].sort_values(ascending=False).index[:SIDE_BY_SIDE_POINTS])
        timed = None
        if side_by_side is not None and contenders:
            try:
                timed = side_by_side([int(front.loc[i, "point"]) for i in contenders], row)
            except Exception:  # noqa: BLE001 - models this process cannot re-run (a torch run's state dicts)
                timed = None  # are judged by their stored figures
        if timed is not None:
            ratios = {i: timed[int(front.loc[i, "point"])] for i in contenders}
            gain = {i: r[0] for i, r in ratios.items()}
            notes = {i: f"timed side by side: {r[0]:.2f}x its speed, 95% {r[1]:.2f}-{r[2]:.2f}"
                     for i, r in ratios.items()}
            # dominated: as good and faster beyond the interval, or better beyond the quality's spread and no slower
            better = [i for i in contenders if as_good[i] and (ratios[i][1] >= 1 or (
                quality[i] > row.val_quality + quality_spread and ratios[i][2] >= 1))]
            tied = [i for i in contenders if ratios[i][2] >= 1]
        else:
            gain = (speedup / row.speedup).to_dict()
            notes = {i: f"{g:.2f}x its speed (+-{speedup_spread / row.speedup:.2f})" for i, g in gain.items()}
            own = _own_spread(front, speedup)  # stored figures: both spreads must separate
            better = [i for i in gain if as_good[i] and (speedup[i] - own[i] >= row.speedup + speedup_spread or (
                quality[i] > row.val_quality + quality_spread and speedup[i] >= row.speedup - speedup_spread))]
            tied = [i for i in gain if close[i] and speedup[i] >= row.speedup - speedup_spread]
        if better:  # the largest margin: the most speed, then the most quality
            best = max(better, key=lambda i: (gain[i], quality[i]))
            less = 1 - 1 / gain[best]
            dominated_by[-1], saved[-1] = int(front.loc[best, "point"]), less
            how = (f"{less:.0%} less latency at quality {quality[best]:.4f} >= {row.val_quality:.4f}"
                   if less > 0 else f"quality {quality[best]:.4f} > {row.val_quality:.4f} beyond its spread "
                   f"(+-{quality_spread:.4f}) at its speed")
            text.append(f"dominated by point {dominated_by[-1]}: {how} ({notes[best]})")
        elif tied:
            best = max(tied, key=gain.__getitem__)
            matched_by[-1] = int(front.loc[best, "point"])
            text.append(f"matched within its measurement spread by point {matched_by[-1]}: quality "
                        f"{quality[best]:.4f} vs {row.val_quality:.4f}, {notes[best]}")
        else:  # what the user would take instead, and its speed
            instead = [i for i in gain if as_good[i]] or [i for i in gain if close[i]]
            fastest = max(instead, key=gain.__getitem__) if instead else None
            text.append("not dominated" + (
                f"; the fastest point at about its quality and no larger, point {int(front.loc[fastest, 'point'])}: "
                f"{notes[fastest]}" if fastest is not None else _larger(front, quality, speedup, row, quality_spread)))
    return recipes.assign(dominated_by=pd.array(dominated_by, dtype="Int64"),
                          matched_by=pd.array(matched_by, dtype="Int64"), latency_saved=saved, verdict=text)


def _larger(front: pd.DataFrame, quality: pd.Series, speedup: pd.Series, row: Any, spread: float) -> str:
    """What a recipe smaller than every point at its quality gives up for its size: the fastest such point, how
    much larger and faster (stored figures: only points no larger are timed side by side)."""
    at_quality = speedup[quality >= row.val_quality - spread]
    if at_quality.empty or not row.speedup:
        return ""
    i = at_quality.idxmax()
    return (f"; every point at about its quality is larger: the fastest, point {int(front.loc[i, 'point'])}, is "
            f"{front.loc[i, 'size_bytes'] / row.size_bytes - 1:.1%} larger at {speedup[i] / row.speedup:.2f}x its "
            "speed (stored figures)")


def _own_spread(front: pd.DataFrame, speedup: pd.Series) -> pd.Series:
    """Each point's speed-up spread, from its validation latency's spread (0 where not measured)."""
    if {"val_latency_spread_ms", "val_latency_ms"} <= set(front.columns):
        return (speedup * front["val_latency_spread_ms"] / front["val_latency_ms"]).fillna(0.0)
    return pd.Series(0.0, index=front.index)


def _spread(value: Any) -> float:
    return 0.0 if value is None or pd.isna(value) else float(value)


def built(recipes: pd.DataFrame) -> pd.DataFrame:
    """The recipes that built: no error (read back from recipes.csv, an all-empty error column is NaN)."""
    errors = recipes["error"]
    return recipes[errors.isna() | (errors.astype(str) == "")]


def summary(recipes: pd.DataFrame) -> str:
    """One line: how many recipes the front dominates or matches within noise, and which it does not."""
    measured = built(recipes)
    unusable = measured["verdict"].astype(str).str.startswith("unusable")
    beaten, matched = measured["dominated_by"].notna(), measured["matched_by"].notna()
    line = f"recipes: the front dominates {int(beaten.sum())} of {len(measured)} measured"
    line += f" and matches {int(matched.sum())} within their measurement spread" if matched.any() else ""
    line += f"; {int(unusable.sum())} unusable (quality below the usable floor)" if unusable.any() else ""
    if (~beaten & ~matched & ~unusable).any():
        line += "; NOT dominated: " + ", ".join(measured.loc[~beaten & ~matched & ~unusable, "recipe"])
    failed = len(recipes) - len(measured)
    return line + (f"; {failed} failed to build (see recipes.csv)" if failed else "")
