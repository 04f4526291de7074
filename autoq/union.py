"""One front across runtimes: `autoq search --backend onnxruntime,openvino,litert` searches the model on each backend
into its own sub-directory of one run directory (the trial budget split between them), then times every backend's
front points, FP32 model and one-line recipes in one set of alternating rounds against the first backend's FP32
(as `autoq verify` times one run), and keeps the points no other point beats on quality (validation split),
latency (those rounds) and size. The result is one `pareto.csv` labelled by backend with the points exported under
`front/`, the recipes of every runtime judged against it, and one report.

Each backend's quality is its agreement with its own FP32 build of the same weights (ONNX Runtime and OpenVINO run
the run's ONNX file; LiteRT converts the module), so the qualities compare across backends; the latencies compare
because they come from one set of rounds on one machine."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from autoq.backends import get_backend
from autoq.backends.base import BACKENDS, Candidate
from autoq.calibrate import cached_samples
from autoq.errors import AutoqError
from autoq.measure import interval, ratio_rounds
from autoq.pareto import MAXIMIZE, OBJECTIVES, pareto_mask
from autoq.precision import Assignment
from autoq.recipes import SIDE_BY_SIDE_ROUNDS, verdicts
from autoq.reporting.run import META, RECIPES, UNION
from autoq.retime import FP32, run_feeds, run_models, time_models
from autoq.settings import RunSettings

TIMED = "timed.csv"  # every model the union's rounds timed, with its ratio to the reference FP32
CANDIDATES = "candidates.csv"  # every backend's front points as the union timed them, before the union's front
PASS_PAUSE_S = 5.0  # between the union's timing passes
SIZE_TOLERANCE = 1.01  # sizes within 1% are one size to the union front (a file's headers differ by bytes)


def backends_of(names: str) -> list[str]:
    """The backends a `--backend` value names (comma-separated), checked: known, each once, each able to re-time
    its points from files."""
    listed = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in listed if name not in BACKENDS]
    if unknown:
        raise AutoqError(f"unknown backend '{unknown[0]}' (available: {', '.join(BACKENDS)})")
    if len(set(listed)) != len(listed):
        raise AutoqError(f"--backend names a backend twice: {names}")
    if len(listed) > 1:
        for name in listed:
            refusal = get_backend(name).verify_refusal
            if refusal:
                raise AutoqError(f"the union front re-times every point from its file, which {name} cannot: "
                                 f"{refusal.split(': ')[0]}; leave it out of --backend")
    return listed


def is_union(run_dir: Path) -> bool:
    return (Path(run_dir) / UNION).is_file()


def model_stem(model: object, demo: str) -> str:
    """What names a union's default run directory: the demo's, the file's or the module class's name."""
    from autoq.demo import DEMOS

    if model is None:
        return DEMOS[demo].stem
    if isinstance(model, str | Path):
        return Path(model).name if Path(model).is_dir() else Path(model).stem
    return type(model).__name__


def parts(settings: RunSettings, names: list[str], run_dir: Path) -> list[tuple[str, RunSettings]]:
    """Each backend's settings: its own sub-directory, an equal share of the trials and of the timeout. The run
    directory records the backends; resuming it with others is an error."""
    record = run_dir / UNION
    if record.is_file() and json.loads(record.read_text())["backends"] != names:
        raise AutoqError(f"{run_dir} holds a union of {', '.join(json.loads(record.read_text())['backends'])}: "
                         "choose another --out to search other backends")
    run_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"backends": names}))
    trials = max(1, settings.trials // len(names))
    timeout = None if settings.timeout is None else settings.timeout / len(names)
    return [(name, settings.changed(backend=name, out=str(run_dir / name), trials=trials, timeout=timeout))
            for name in names]


@dataclass
class Timed:
    """What one union timing made: every model's row, the runs behind them (label -> instances), and which label
    is which point or recipe."""

    table: pd.DataFrame
    runs: dict[str, list[Callable[[], object]]]
    points: pd.DataFrame  # every backend's front points, with their timing label
    recipes: pd.DataFrame  # every backend's recipes, with their timing label


def searched(run_dir: Path) -> list[str]:
    """The union's backends whose search finished (in the order given)."""
    names = json.loads((run_dir / UNION).read_text())["backends"]
    return [name for name in names if (run_dir / name / "pareto.csv").is_file()]


def time_union(run_dir: Path, rounds: int, passes: int, pass_pause_s: float, progress: bool) -> Timed:
    """Every searched backend's FP32, front points and recipes timed in one set of alternating rounds, against the
    first backend's FP32, each with its backend's deployed session settings."""
    names = searched(run_dir)
    if not names:
        raise AutoqError(f"{run_dir} holds no finished search of any of its backends: run autoq search there again")
    instances = max(get_backend(name).deployed_instances for name in names)
    runs: dict[str, list[Callable[[], object]]] = {}
    points, recipes = [], []
    for name in names:
        backend, sub = get_backend(name), run_dir / name
        threads = int(json.loads((sub / META).read_text()).get("machine", {}).get("threads", 2))
        samples = cached_samples(sub / "cache")
        if samples is None:
            raise AutoqError(f"{sub}/cache has no calibration samples to feed the models: run the search again")
        feeds = None
        for label, (path, options) in run_models(sub, backend.reference_model(sub)).items():
            made = [backend.deployed_runner(Candidate(Assignment({}, options), path, 0), threads)
                    for _ in range(backend.deployed_instances)]
            feeds = feeds if feeds is not None else run_feeds(sub, made[0], samples)
            runs[f"{name} {label}"] = [partial(made[i % len(made)], feeds) for i in range(instances)]
        front = pd.read_csv(sub / "pareto.csv")
        front = front[front["model"].notna()]
        points.append(front.assign(backend=name, timed_as=[f"{name} point {p}: {s}" for p, s in
                                                           zip(front["point"], front["summary"], strict=True)]))
        if (sub / RECIPES).is_file():
            table = pd.read_csv(sub / RECIPES)
            for text in ("error", "model", "options"):  # an all-empty column reads back as NaN floats
                table[text] = table[text].astype(object).where(table[text].notna(), "").astype(str)
            recipes.append(table.assign(backend=name, timed_as=[f"{name} recipe: {r}" for r in table["recipe"]]))
    table = time_models(runs, f"{names[0]} {FP32}", rounds, passes, pass_pause_s, progress,
                        f"timing every runtime together against {names[0]} FP32")
    return Timed(table, runs, pd.concat(points, ignore_index=True),
                 pd.concat(recipes, ignore_index=True) if recipes else pd.DataFrame())


def union_front(run_dir: Path, timed: Timed) -> pd.DataFrame:
    """The points no other backend's point beats (quality beyond its spread, latency from the union's rounds,
    size), numbered by latency and exported under `front/` as `autoq export` reads them."""
    by_label = timed.table.set_index("model")
    reference_ms = timed.table.attrs["fp32_ms"]
    rows = []
    for row in timed.points.itertuples():
        clocked = by_label.loc[row.timed_as]
        rows.append({"backend": row.backend, "from_point": int(row.point), "summary": f"{row.backend}: {row.summary}",
                     "quality": row.val_quality, "val_quality": row.val_quality,
                     "val_quality_spread": row.val_quality_spread, "latency_ms": clocked["ms"],
                     "val_latency_ms": clocked["ms"], "val_measured_latency_ms": reference_ms / clocked["vs FP32"],
                     "val_fp32_latency_ms": reference_ms, "speedup": clocked["vs FP32"],
                     "speedup_low": clocked["95% low"], "speedup_high": clocked["95% high"],
                     "val_latency_spread_ms": reference_ms / clocked["95% low"] - reference_ms / clocked["95% high"],
                     "size_bytes": row.size_bytes, "val_executed_ok": row.val_executed_ok,
                     "assignment": row.assignment, "source": f"{row.backend}/{row.model}", "timed_as": row.timed_as})
    every = pd.DataFrame(rows)
    every.to_csv(run_dir / CANDIDATES, index=False)
    front = every[undominated(every)].sort_values("latency_ms").reset_index(drop=True)
    front.insert(0, "point", range(len(front)))
    shutil.rmtree(run_dir / "front", ignore_errors=True)
    models = []
    for row in front.itertuples():
        folder = run_dir / "front" / f"point-{row.point}"
        source = run_dir / row.source
        shutil.copytree(source.parent, folder)  # the model with its weights file (OpenVINO's .bin, ONNX's .data)
        (folder / "backend.txt").write_text(f"{row.backend}\n")
        models.append(str((folder / source.name).relative_to(run_dir)))
    return front.assign(model=models)


def undominated(points: pd.DataFrame) -> np.ndarray:
    """True for the points no other point on the front beats: at least as fast (within half either's latency
    interval), as small (within SIZE_TOLERANCE) and as good (within either's quality spread), and better somewhere
    beyond those margins (a point beaten only by points that are themselves beaten stays). Unlike a study's
    front, a point does not stay for a difference the measurement cannot tell apart (MiniLM: one OpenVINO
    assignment under two hints, 6 bytes apart, stayed beside its slower twin; a LiteRT point 2.5x larger stayed
    for being 0.01 ms faster within a 0.1 ms interval)."""
    quality, latency, size = (points[c].to_numpy(dtype=float) for c in OBJECTIVES)
    spread = np.nan_to_num(points["val_quality_spread"].to_numpy(dtype=float))
    jitter = np.nan_to_num(points["val_latency_spread_ms"].to_numpy(dtype=float)) / 2
    beaten_by = np.zeros((len(points), len(points)), dtype=bool)  # [i, j]: j beats i
    for i in range(len(points)):
        margin, slack = np.maximum(spread, spread[i]), np.maximum(jitter, jitter[i])
        as_good = ((latency <= latency[i] + slack) & (size <= size[i] * SIZE_TOLERANCE)
                   & (quality >= quality[i] - margin))
        better = (latency < latency[i] - slack) | (size * SIZE_TOLERANCE < size[i]) | (quality > quality[i] + margin)
        beaten_by[i] = as_good & better
    keep = np.logical_not(beaten_by.any(axis=1))
    if not keep.any():  # margins can chain into a cycle: then the plain front
        return pareto_mask(points[list(OBJECTIVES)].to_numpy(dtype=float), MAXIMIZE)
    while True:  # margins do not chain: a point only a left-out point beats stays (it may be the fastest of all)
        orphaned = ~keep & ~beaten_by[:, keep].any(axis=1)
        if not orphaned.any():
            return keep
        keep |= orphaned


def judge_recipes(timed: Timed, front: pd.DataFrame) -> pd.DataFrame:
    """Every backend's one-line recipes with their latency from the union's rounds, each judged against the union
    front: the contenders are timed against it side by side, whatever their runtime."""
    if timed.recipes.empty:
        return timed.recipes
    by_label = timed.table.set_index("model")
    recipes = timed.recipes.copy()
    clocked = [by_label.loc[label] if label in by_label.index else None for label in recipes["timed_as"]]
    recipes["recipe"] = recipes["backend"] + ": " + recipes["recipe"]
    recipes["val_latency_ms"] = [c["ms"] if c is not None else np.nan for c in clocked]
    recipes["speedup"] = [c["vs FP32"] if c is not None else np.nan for c in clocked]
    recipes["speedup_spread"] = [c["95% high"] - c["95% low"] if c is not None else np.nan for c in clocked]
    recipes["model"] = [f"{b}/{m}" if m else "" for b, m in zip(recipes["backend"], recipes["model"], strict=True)]
    labels = front.set_index("point")["timed_as"]

    def side_by_side(points: list[int], recipe) -> dict[int, tuple[float, float, float]]:
        runs = {"recipe": timed.runs[recipe.timed_as][0], **{str(p): timed.runs[labels[p]][0] for p in points}}
        rounds = ratio_rounds(runs, "recipe", rounds=SIDE_BY_SIDE_ROUNDS)
        return {p: interval(rounds[str(p)][1]) for p in points}

    return verdicts(front, recipes, side_by_side)


def retime(run_dir: Path, rounds: int = 15, passes: int = 3, pass_pause_s: float | None = None,
           progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Time the union (`time_union`), take its front and judge the recipes; writes pareto.csv, recipes.csv,
    timed.csv, meta.json and the report. Returns (front, recipes, timed)."""
    run_dir = Path(run_dir)
    if not is_union(run_dir):
        raise AutoqError(f"{run_dir} is not a union run (no {UNION}): give the --out of a multi-backend search")
    pause = PASS_PAUSE_S if pass_pause_s is None else pass_pause_s
    timed = time_union(run_dir, rounds, max(1, min(passes, rounds)), pause, progress)
    front = union_front(run_dir, timed)
    recipes = judge_recipes(timed, front)
    front.to_csv(run_dir / "pareto.csv", index=False)
    if not recipes.empty:
        recipes.to_csv(run_dir / RECIPES, index=False)
    timed.table.to_csv(run_dir / TIMED, index=False)
    names = searched(run_dir)
    first = json.loads((run_dir / names[0] / META).read_text())
    start, end = timed.table.attrs["fp32_ms_start_end"]
    meta = {"model": first.get("model"), "backend": ", ".join(names), "metric": first.get("metric"),
            "machine": first.get("machine", {}), "reference": f"{names[0]} {FP32}",
            "fp32_ms": timed.table.attrs["fp32_ms"], "fp32_ms_start_end": [start, end],
            "drifted": bool(timed.table.attrs["drifted"]), "rounds": rounds, "passes": passes}
    (run_dir / META).write_text(json.dumps(meta, indent=2))
    write_report(run_dir)
    timed.table.attrs["host_changed"] = False  # verify's comparison with a first verify: not kept for a union
    return front, recipes, timed.table


def trials(run_dir: Path) -> pd.DataFrame:
    """Every backend's trials, labelled by backend."""
    return pd.concat([pd.read_csv(run_dir / name / "trials.csv").assign(backend=name) for name in searched(run_dir)],
                     ignore_index=True)


def write_report(run_dir: Path) -> Path:
    """report.html of a union run, from its tables."""
    from autoq.reporting.html import write_union_html

    def read(name: str) -> pd.DataFrame:
        return pd.read_csv(run_dir / name) if (run_dir / name).is_file() else pd.DataFrame()

    return write_union_html(run_dir / "report.html", read("pareto.csv"), read(CANDIDATES), read(RECIPES),
                            read(TIMED), json.loads((run_dir / META).read_text()), searched(run_dir))
