"""The Optuna study's storage: per-layer precisions as parameters, (quality, latency, size) as objectives.

The study lives in SQLite in the run directory (or in a shared database, for several workers), so the same command
resumes it: finished trials are kept and an interrupted one is retried. One search process per run directory (the
lock); a study measured on another machine or about another problem is refused. The loop is `autoq.objective`.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
from optuna.trial import TrialState

from autoq.errors import AutoqError
from autoq.pareto import DIRECTIONS
from autoq.samplers import get_sampler
from autoq.space import SearchSpace
from autoq.trial_record import TrialRecord, attrs

WORKER = f"{socket.gethostname()}:{os.getpid()}"  # who ran a trial, when several workers share a study
OPTION_PREFIX = "option:"
LOCATION = "study.json"  # in a run directory whose study lives in a shared database: where it is


def make_sampler(space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    """The space's sampler; NSGA-II and TPE also steer away from trials that break the user's constraints
    (set on each trial with `Trial.set_constraint`)."""
    return get_sampler(space.sampler).make(seed, space.population)


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
    return trial.state == TrialState.FAIL and not TrialRecord.of(trial).error


def _retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    record = TrialRecord.of(trial)
    study.enqueue_trial(trial.params, user_attrs=attrs(baseline=record.baseline, seeded=record.seeded,
                                                       retry_of=trial.number))


def recover_interrupted(study: optuna.Study, local: bool) -> None:
    """Retry, once each, trials cut short by a second Ctrl-C or by a killed process. Locally they are left
    RUNNING (we hold the run lock, so nobody else runs them); in a shared study the heartbeat fails them."""
    if local:
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {TrialRecord.of(t).retry_of for t in trials}
    for trial in trials:
        if _interrupted(trial) and trial.number not in retried:
            _retry(study, trial)


def budget_used(study: optuna.Study) -> int:
    """Measured trials that count toward --trials (interrupted ones are retried, screened ones cost nothing)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if is_measured(t))


def is_measured(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial that was measured and counts toward the budget: complete, or failed by its candidate (interrupted
    trials are retried and screened ones cost nothing)."""
    return trial.state == TrialState.COMPLETE or (trial.state == TrialState.FAIL and bool(TrialRecord.of(trial).error))
