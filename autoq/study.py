"""The Optuna study: per-layer precisions as parameters, (quality, latency, size) as objectives.

The uniform assignments are enqueued first; the study lives in SQLite in the run directory (or in a shared
database, for several workers), so the same command resumes it: finished trials are kept, an interrupted one
is retried, an assignment already measured is never measured again, and a hopeless one is screened by the
cost model instead of measured.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import optuna
from optuna.trial import TrialState

from autoq.costmodel import Screen, screen_was_wrong
from autoq.errors import AutoqError
from autoq.evaluate import CandidateError, Measurement
from autoq.pareto import DIRECTIONS
from autoq.precision import Assignment, Precision
from autoq.progress import SearchProgress, is_measured
from autoq.samplers import get_sampler
from autoq.settings import RunSettings
from autoq.space import SearchSpace

WORKER = f"{socket.gethostname()}:{os.getpid()}"  # who ran a trial, when several workers share a study
OPTION_PREFIX = "option:"
Affects = Callable[[str, Precision], bool]  # (option, precision) -> whether the option changes how it is built
LOCATION = "study.json"  # in a run directory whose study lives in a shared database: where it is


def make_sampler(space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    """The space's sampler; NSGA-II and TPE also steer away from trials that break the user's constraints
    (set on each trial with `Trial.set_constraint`)."""
    return get_sampler(space.sampler).make(seed, space.population)


def _constrain(trial: optuna.Trial, violations: list[float]) -> None:
    """Record the constraint values (<= 0 when met) for the samplers and for the trials table."""
    trial.set_user_attr("constraints", violations)
    for name, value in zip(("quality", "latency", "size"), violations, strict=True):
        trial.set_constraint(name, value)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One search process per run directory."""
    with open(run_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            msg = f"another autoq search is running in {run_dir}: wait for it or choose another --out"
            raise AutoqError(msg) from exc
        yield


@contextmanager
def stop_on_ctrl_c() -> Iterator[list[bool]]:
    """First Ctrl-C: finish the running trial, then stop (nothing is lost); a second one stops at once."""
    stopped = [False]
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return

    def handler(signum, frame) -> None:
        if stopped[0]:
            raise KeyboardInterrupt
        stopped[0] = True
        print("autoq: stopping after the running trial (Ctrl-C again to stop now)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stopped
    finally:
        signal.signal(signal.SIGINT, previous)


# what PostgreSQL says to the worker that lost the race to create Optuna's schema (a table's row, a type, a table)
_SCHEMA_RACES = ("duplicate key", "already exists")


def open_storage(run_dir: Path, url: str | None) -> str | optuna.storages.RDBStorage:
    """SQLite in the run directory, or a shared database whose workers keep a heartbeat: a worker that dies
    leaves its trial RUNNING only until the others notice (grace period), then it is retried."""
    if url is None:
        return f"sqlite:///{run_dir / 'study.db'}"
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]  # psycopg 3, the maintained driver
    for attempt in range(4):  # workers starting together race to create Optuna's tables: the loser retries
        try:
            with warnings.catch_warnings():  # the heartbeat is marked experimental; stable since Optuna 2.6
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=20, grace_period=60,
                                                  heartbeat_stale_trial_callback=_retry)
        except ModuleNotFoundError as exc:
            msg = f"--storage {url.split(':', 1)[0]} needs the driver '{exc.name}': pip install 'autoq[postgres]'"
            raise AutoqError(msg) from exc
        except Exception as exc:  # SQLAlchemy reports a bad URL or an unreachable server in many classes
            if attempt == 3 or not any(race in str(exc) for race in _SCHEMA_RACES):
                msg = f"cannot open the study storage {url!r}: {str(exc).splitlines()[0]}"
                raise AutoqError(msg) from exc
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def load_run_study(run_dir: Path) -> optuna.Study:
    """The study of a run directory: its study.db, or the shared database its study.json names."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    where = json.loads((run_dir / LOCATION).read_text()) if (run_dir / LOCATION).is_file() else {}
    return optuna.load_study(study_name=where.get("study", "autoq"),
                             storage=open_storage(run_dir, where.get("storage")))


def open_study(run_dir: Path, space: SearchSpace, seed: int, hardware: str, problem: str,
               storage: str | None = None, name: str = "autoq") -> tuple[optuna.Study, bool]:
    """Open (or create: then the second value is True) the study; refuse one measured on another machine or
    thread count, or one about another problem (model, data, space, constraints)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    backend = open_storage(run_dir, storage)
    if storage is not None:
        (run_dir / LOCATION).write_text(json.dumps({"storage": storage, "study": name}))
    sampler = make_sampler(space, seed)
    try:
        study = optuna.create_study(directions=DIRECTIONS, storage=backend, study_name=name, sampler=sampler)
        created = True
        study.set_user_attr("hardware", hardware)
        study.set_user_attr("problem", problem)
    except optuna.exceptions.DuplicatedStudyError:
        study, created = optuna.load_study(storage=backend, study_name=name, sampler=sampler), False
    where = f"the study '{name}'" + (f" in {run_dir}" if storage is None else "")
    known = study.user_attrs.get("hardware", hardware)
    if known != hardware:
        msg = (f"{where} was measured on another machine or thread count ({known}; this one is {hardware}): "
               "latencies must not mix: use a new --out or --study")
        raise AutoqError(msg)
    if study.user_attrs.get("problem", problem) != problem:
        msg = f"{where} searches another model, data, space or constraints: use a new --study (or --out)"
        raise AutoqError(msg)
    return study, created


def _interrupted(trial: optuna.trial.FrozenTrial) -> bool:
    """Failed without a candidate error: cut short by Ctrl-C or a killed process, not by the candidate."""
    return trial.state == TrialState.FAIL and "error" not in trial.user_attrs


def _retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    keep = {k: v for k, v in trial.user_attrs.items() if k in ("baseline", "seeded")}
    study.enqueue_trial(trial.params, user_attrs={**keep, "retry_of": trial.number})


def _recover_interrupted(study: optuna.Study, local: bool) -> None:
    """Retry, once each, trials cut short by a second Ctrl-C or by a killed process. Locally they are left
    RUNNING (we hold the run lock, so nobody else runs them); in a shared study the heartbeat fails them."""
    if local:
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for trial in trials:
        if _interrupted(trial) and trial.number not in retried:
            _retry(study, trial)


def _float_only(option: str, precision: Precision) -> bool:
    return precision.kind == "float"


def option_variants(seeds: Sequence[Assignment], options: Mapping[str, Sequence], affects: Affects,
                    limit: int | None = None) -> list[Assignment]:
    """Each seed with each other value of every option that changes how one of its layers is built (`affects`),
    the first `limit` such seeds per value: e.g. ORT's SmoothQuant on the fast end's int8-dyn-pc seeds."""
    variants = []
    for key, values in options.items():
        touched = [seed for seed in seeds if any(affects(key, Precision.parse(p)) for p in set(seed.layers.values()))]
        variants += [Assignment(seed.layers, {**seed.options, key: value})
                     for value in values[1:] for seed in touched[:limit]]
    return variants


def _weights_only_form(precision: str, allowed: list[str]) -> str:
    """For a layer that does not offer `precision`: its weight format (`Precision.weight_format`) where the layer
    offers that, else the layer's first choice. A tied table then shares its head's weights in the uniform
    baselines too."""
    plain = Precision.parse(precision).weight_format()
    return str(plain) if plain is not None and str(plain) in allowed else allowed[0]


def _enqueue_baselines(study: optuna.Study, choices: dict[str, list[str]], options: dict[str, list],
                       affects: Affects, between: Callable[[], None] = lambda: None) -> None:
    """Every layer at each precision (with the first value of each option), then (after `between`: the runtime's
    recipes) each of those uniform assignments with each other value of every option that changes how it is
    built (`affects`). So OpenVINO's bf16 gets an all-fp32 baseline, ORT's glue float an all-int8 one, and no
    option measures FP32 twice."""
    precisions = sorted({p for c in choices.values() for p in c}, key=lambda p: p != "fp32")
    first = {OPTION_PREFIX + k: v[0] for k, v in options.items() if len(v) > 1}
    uniform = {p: {name: p if p in c else _weights_only_form(p, c) for name, c in choices.items() if len(c) > 1}
               for p in precisions}
    for precision, params in uniform.items():
        study.enqueue_trial(params | first, user_attrs={"baseline": f"uniform-{precision}"})
    between()
    for precision, params in uniform.items():
        for key, values in options.items():
            if affects(key, Precision.parse(precision)):
                for value in values[1:]:
                    study.enqueue_trial(params | first | {OPTION_PREFIX + key: value},
                                        user_attrs={"baseline": f"uniform-{precision} {key}={value}"})


def budget_used(study: optuna.Study) -> int:
    """Measured trials that count toward --trials (interrupted ones are retried, screened ones cost nothing)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if is_measured(t))


def _over_budget(study: optuna.Study, trial: optuna.Trial, trials: int) -> bool:
    """With several workers, a trial started when the others' running ones already fill the budget."""
    running = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                  if t.number < trial.number and "screened" not in t.user_attrs)
    return budget_used(study) + running >= trials


def _measurements(study: optuna.Study) -> dict[str, tuple[tuple, dict]]:
    """Every measured assignment in the study (all workers'): key -> (objective values, attributes)."""
    return {t.user_attrs["key"]: (tuple(t.values), t.user_attrs)
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "key" in t.user_attrs}


def _wait_for_twin(study: optuna.Study, trial: optuna.Trial, key: str, timeout: float) -> None:
    """Another worker measuring the same assignment (an earlier trial): wait for it instead of timing it twice."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(
            t.number < trial.number and t.user_attrs.get("key") == key and "screened" not in t.user_attrs
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
        time.sleep(0.5)


def suggest(trial: optuna.Trial, choices: dict[str, list[str]], options: dict[str, list],
            affects: Affects = _float_only) -> Assignment:
    """The trial's assignment. An option that changes none of its layers (`affects`) takes its first value, so
    the same model is never measured twice under two option values that cannot differ (SmoothQuant on a CNN)."""
    layers = {n: trial.suggest_categorical(n, c) if len(c) > 1 else c[0] for n, c in choices.items()}
    chosen = {k: trial.suggest_categorical(OPTION_PREFIX + k, v) if len(v) > 1 else v[0] for k, v in options.items()}
    specs = {Precision.parse(p) for p in layers.values()}
    return Assignment(layers, {k: v if any(affects(k, spec) for spec in specs) else options[k][0]
                               for k, v in chosen.items()})


def run_search(study: optuna.Study, evaluate: Callable[[Assignment], Measurement], fp32_quality: float,
               choices: dict[str, list[str]], space: SearchSpace, settings: RunSettings,
               seeds: Sequence[Assignment] = (), screen: Screen | None = None, created: bool = True,
               affects: Affects = _float_only, recipes: Sequence[Assignment] = ()) -> optuna.Study:
    """Run until `settings.trials` trials have been measured in the study (counting earlier runs and other
    workers), or `settings.timeout` seconds. `evaluate` measures one assignment (a Worker's, or an Evaluator's);
    `fp32_quality` anchors --max-drop. A study this call `created` starts with the uniform baselines, then
    `seeds` (sensitivity-guided assignments; an option a seed does not set takes its first value). `screen` skips
    sampled candidates the cost model finds hopeless. `affects(option, precision)` says whether an option changes
    how a precision is built: the uniform baselines are also measured with the option's other values. `recipes`
    (the runtime's recipes in autoq's specs) come right after the uniform baselines, before their variants."""
    constraints, trials = settings.constraints, settings.trials
    if created:
        first = {OPTION_PREFIX + k: v[0] for k, v in space.options.items() if len(v) > 1}

        def enqueue(assignments: Sequence[Assignment]) -> None:
            for seed in assignments:  # with the first value of each option it does not set, as the baselines
                params = {n: p for n, p in seed.layers.items() if len(choices[n]) > 1}
                chosen = {OPTION_PREFIX + k: v for k, v in seed.options.items() if len(space.options.get(k, ())) > 1}
                study.enqueue_trial(params | first | chosen, user_attrs={"seeded": True})

        _enqueue_baselines(study, choices, space.options, affects, lambda: enqueue(recipes))
        enqueue(seeds)
    _recover_interrupted(study, settings.local)

    def measured_pairs(known: dict) -> list[tuple[Assignment, tuple]]:
        return [(Assignment.from_dict(json.loads(attrs["assignment"])), values) for values, attrs in known.values()]

    def objective(trial: optuna.Trial) -> tuple[float, float, float]:
        if _over_budget(study, trial, trials):
            trial.set_user_attr("over_budget", True)
            study.stop()
            raise optuna.TrialPruned("the budget is filled by other workers")
        assignment = suggest(trial, choices, space.options, affects)
        key = assignment.key()
        trial.set_user_attr("worker", WORKER)
        trial.set_user_attr("key", key)
        trial.set_user_attr("assignment", json.dumps(assignment.to_dict()))
        if not settings.local:
            _wait_for_twin(study, trial, key, settings.trial_timeout)
        known = _measurements(study)
        if key in known:  # same assignment: reuse the measurement, never time it twice
            values, attrs = known[key]
            trial.set_user_attr("duplicate", True)
            for name, value in attrs.items():
                if name not in ("key", "assignment", "baseline", "duplicate", "constraints", "seeded", "retry_of"):
                    trial.set_user_attr(name, value)
            _constrain(trial, constraints.violations(values, fp32_quality))
            return values
        enqueued = any(k in trial.user_attrs for k in ("baseline", "seeded", "retry_of"))
        verdict, prediction = ("measure", None) if screen is None or enqueued else screen.verdict(
            assignment, measured_pairs(known))
        if prediction is not None and verdict != "measure":
            trial.set_user_attr("predicted", [float(v) for v in prediction.values])
            trial.set_user_attr("screened", verdict)
            if verdict == "screen":
                raise optuna.TrialPruned("screened: the cost model finds it dominated by the front")
        try:
            record = evaluate(assignment)
        except CandidateError as exc:
            trial.set_user_attr("error", str(exc))
            raise
        for name, value in record.as_dict().items():
            trial.set_user_attr(name, value)
        values = record.values
        if verdict == "audit":
            trial.set_user_attr("screen_wrong", screen_was_wrong(values, measured_pairs(known)))
        _constrain(trial, constraints.violations(values, fp32_quality))
        return values

    if budget_used(study) >= trials:
        return study
    bar = SearchProgress(study, trials, constraints, fp32_quality, enabled=settings.progress)

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        bar.update()
        if stopped[0] or budget_used(study) >= trials:
            study.stop()

    with stop_on_ctrl_c() as stopped, bar:
        study.optimize(objective, timeout=settings.timeout, catch=(CandidateError,), callbacks=[after_trial])
    if stopped[0]:
        raise KeyboardInterrupt
    return study
