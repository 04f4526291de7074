"""The Optuna study: per-layer precisions as parameters, (quality, latency, size) as objectives.

The uniform assignments are enqueued first; the study lives in SQLite in the run directory, so the
same command resumes it: finished trials are kept, an interrupted one is retried, an assignment already
measured is never measured again.
"""

from __future__ import annotations

import fcntl
import json
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
from optuna.trial import TrialState

from autoq.constraints import Constraints
from autoq.errors import AutoqError
from autoq.evaluate import CandidateError, Evaluator
from autoq.precision import Assignment
from autoq.space import SearchSpace

DIRECTIONS = ["maximize", "minimize", "minimize"]  # quality, latency_ms, size_bytes
OPTION_PREFIX = "option:"


def make_sampler(space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    """The space's sampler; NSGA-II and TPE also steer away from trials that break the user's constraints
    (set on each trial with `Trial.set_constraint`)."""
    if space.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if space.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=space.population)


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


def open_study(run_dir: Path, space: SearchSpace, seed: int, hardware: str) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{run_dir / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="autoq", directions=DIRECTIONS,
                                sampler=make_sampler(space, seed), load_if_exists=True)
    known = study.user_attrs.get("hardware")
    if known is None:
        study.set_user_attr("hardware", hardware)
    elif known != hardware:
        msg = (f"the study in {run_dir} was measured on another machine or thread count ({known}); "
               "latencies must not mix: use a new --out")
        raise AutoqError(msg)
    return study


def _interrupted(trial: optuna.trial.FrozenTrial) -> bool:
    """Failed without a candidate error: cut short by Ctrl-C or a killed process, not by the candidate."""
    return trial.state == TrialState.FAIL and "error" not in trial.user_attrs


def _recover_interrupted(study: optuna.Study) -> None:
    """Retry, once each, trials cut short by a second Ctrl-C or by a killed process (left RUNNING; we hold the
    run lock, so nobody else is running them)."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for trial in trials:
        if _interrupted(trial) and trial.number not in retried:
            keep = {k: v for k, v in trial.user_attrs.items() if k in ("baseline", "seeded")}
            study.enqueue_trial(trial.params, user_attrs={**keep, "retry_of": trial.number})


def _enqueue_baselines(study: optuna.Study, choices: dict[str, list[str]], options: dict[str, list]) -> None:
    precisions = sorted({p for c in choices.values() for p in c}, key=lambda p: p != "fp32")
    for precision in precisions:
        params = {name: precision if precision in c else c[0] for name, c in choices.items() if len(c) > 1}
        params |= {OPTION_PREFIX + k: v[0] for k, v in options.items() if len(v) > 1}
        study.enqueue_trial(params, user_attrs={"baseline": f"uniform-{precision}"})


def budget_used(study: optuna.Study) -> int:
    """Finished trials that count toward --trials (interrupted ones are retried, not counted)."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and "error" in t.user_attrs))


def suggest(trial: optuna.Trial, choices: dict[str, list[str]], options: dict[str, list]) -> Assignment:
    layers = {n: trial.suggest_categorical(n, c) if len(c) > 1 else c[0] for n, c in choices.items()}
    chosen = {k: trial.suggest_categorical(OPTION_PREFIX + k, v) if len(v) > 1 else v[0] for k, v in options.items()}
    return Assignment(layers, chosen)


def run_search(study: optuna.Study, evaluator: Evaluator, choices: dict[str, list[str]], space: SearchSpace,
               trials: int, timeout: float | None = None, progress: bool = True,
               seeds: list[Assignment] = (), constraints: Constraints | None = None) -> optuna.Study:
    """Run until `trials` trials have finished in the study (counting earlier runs), or `timeout` seconds.
    A new study starts with the uniform baselines, then `seeds` (e.g. sensitivity-guided assignments)."""
    if not study.trials:
        _enqueue_baselines(study, choices, space.options)
        for seed in seeds:
            params = {n: p for n, p in seed.layers.items() if len(choices[n]) > 1}
            study.enqueue_trial(params, user_attrs={"seeded": True})
    _recover_interrupted(study)
    measured = {t.user_attrs["key"]: (tuple(t.values), t.user_attrs)
                for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "key" in t.user_attrs}

    def objective(trial: optuna.Trial) -> tuple[float, float, float]:
        assignment = suggest(trial, choices, space.options)
        key = assignment.key()
        trial.set_user_attr("key", key)
        trial.set_user_attr("assignment", json.dumps(assignment.to_dict()))
        if key in measured:  # same assignment: reuse the measurement, never time it twice
            values, attrs = measured[key]
            trial.set_user_attr("duplicate", True)
            for name, value in attrs.items():
                if name not in ("key", "assignment", "baseline", "duplicate", "constraints"):
                    trial.set_user_attr(name, value)
            _constrain(trial, constraints.violations(*values, fp32_quality))
            return values
        try:
            row = evaluator.evaluate(assignment)
        except CandidateError as exc:
            trial.set_user_attr("error", str(exc))
            raise
        for name, value in row.items():
            trial.set_user_attr(name, value)
        values = (row["quality"], row["latency_ms"], row["size_bytes"])
        _constrain(trial, constraints.violations(*values, fp32_quality))
        measured[key] = (values, row)
        return values

    constraints = constraints or Constraints()
    fp32_quality = evaluator.fp32_quality()
    remaining = trials - budget_used(study)
    if remaining > 0:
        with stop_on_ctrl_c() as stopped:
            study.optimize(objective, n_trials=remaining, timeout=timeout, catch=(CandidateError,),
                           show_progress_bar=progress, callbacks=[lambda s, t: stopped[0] and s.stop()])
        if stopped[0]:
            raise KeyboardInterrupt
    return study
