"""What a trial stores: the one place that names the keys of an Optuna trial's user attributes (trials.csv's source,
read by the search, the progress line and the tables), and the record read back from them.

The measurement (`Evaluation.as_dict()`: quality, latency, size, the executed check) is stored flat beside the
bookkeeping keys below, so studies written before this record read the same."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

import optuna

from autoq.evaluate import Evaluation


@dataclass(frozen=True)
class TrialRecord:
    """A trial's bookkeeping, and its measurement as the evaluator recorded it."""

    key: str = ""  # Assignment.key(): the same assignment is measured once
    assignment: str = ""  # the assignment as JSON (Assignment.to_dict())
    worker: str = ""  # host:pid that ran it, when several workers share a study
    baseline: str = ""  # `uniform-<spec>[ <option>=<value>]` for an enqueued uniform baseline
    seeded: bool = False  # enqueued from the recipes or the seeds
    retry_of: int | None = None  # the interrupted trial this one retries
    duplicate: bool = False  # an assignment measured before: its measurement copied, not timed again
    constraints: tuple[float, ...] = ()  # quality, latency and size violations (<= 0 when met)
    screened: str = ""  # `screen` (skipped as dominated by the cost model) or `audit` (measured to check it)
    predicted: tuple[float, ...] | None = None  # the cost model's (quality, latency, size), when it screened
    screen_wrong: bool | None = None  # an audit found the cost model wrong
    error: str = ""  # the candidate's error: a failed measured trial
    over_budget: bool = False  # started when other workers' trials already filled the budget
    measurement: dict[str, Any] = field(default_factory=dict)  # Evaluation.as_dict(), flat in the attributes

    @classmethod
    def of(cls, trial: optuna.trial.FrozenTrial | optuna.Trial) -> TrialRecord:
        attrs = trial.user_attrs
        known = {f.name: attrs[f.name] for f in fields(cls) if f.name in attrs and f.name != "measurement"}
        for name in ("constraints", "predicted"):
            if name in known:
                known[name] = tuple(known[name])
        return cls(**known, measurement={k: v for k, v in attrs.items() if k in MEASURED})

    def layers(self) -> dict[str, str]:
        return json.loads(self.assignment)["layers"] if self.assignment else {}


BOOKKEEPING = frozenset(f.name for f in fields(TrialRecord)) - {"measurement"}
MEASURED = frozenset(f.name for f in fields(Evaluation)) | {"conversions", "int8_chains"}  # Evaluation.as_dict()


def attrs(**values: Any) -> dict[str, Any]:
    """User attributes for `Study.enqueue_trial`, by the record's names (an unknown name is a bug)."""
    unknown = set(values) - BOOKKEEPING
    if unknown:
        raise KeyError(f"not a trial record key: {sorted(unknown)}")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def write(trial: optuna.Trial, **values: Any) -> None:
    """Store bookkeeping values on a running trial, by the record's names."""
    for name, value in attrs(**values).items():
        trial.set_user_attr(name, value)


def write_measurement(trial: optuna.Trial, measurement: dict[str, Any]) -> None:
    """Store a measurement (`Evaluation.as_dict()`, or one copied from an earlier trial) on a running trial."""
    for name, value in measurement.items():
        if name in MEASURED:
            trial.set_user_attr(name, value)
