"""The trials table: one row per Optuna trial, with its measurements and assignment."""

from __future__ import annotations

import json

import optuna
import pandas as pd

from autoq.trial_record import TrialRecord

# The measurement columns of each trial (`TrialRecord.measurement`), documented in docs/run-directory.md.
MEASURED = ["quality", "quality_spread", "latency_ms", "latency_spread_ms", "measured_latency_ms", "latency_runs",
            "load", "fp32_latency_ms", "speedup", "size_bytes", "conversions", "int8_chains", "retimed"]
# trials.csv has these columns, pareto.csv these plus the val_* ones.
TRIAL_COLUMNS = ["trial", "state", "baseline", "seeded", "duplicate", *MEASURED, "feasible", "executed_ok",
                 "mismatched_layers", "screened", "predicted_quality", "predicted_latency_ms", "predicted_size_bytes",
                 "screen_wrong", "summary", "error", "key", "assignment", "executed", "glue"]


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        record = TrialRecord.of(trial)
        if record.over_budget or trial.state.name == "WAITING":  # never ran: over budget, or a seed
            continue  # enqueued but left for a longer run
        measured = record.measurement
        predicted = record.predicted or (None,) * 3
        counts = pd.Series(list(record.layers().values()), dtype=object).value_counts()
        rows.append({
            "trial": trial.number, "state": trial.state.name, "baseline": record.baseline,
            "seeded": record.seeded, "duplicate": record.duplicate,
            **{c: measured.get(c) for c in MEASURED}, "executed_ok": measured.get("executed_ok"),
            "feasible": trial.state.name == "COMPLETE" and all(v <= 0 for v in record.constraints),
            "mismatched_layers": ";".join(measured.get("mismatched_layers", [])),
            "screened": record.screened, "predicted_quality": predicted[0],
            "predicted_latency_ms": predicted[1], "predicted_size_bytes": predicted[2],
            "screen_wrong": record.screen_wrong,
            "summary": ", ".join(f"{p} x{n}" for p, n in sorted(counts.items())),
            "error": record.error or ("interrupted" if trial.state.name == "FAIL" else ""),
            "key": record.key, "assignment": record.assignment,
            "executed": json.dumps(measured["executed"]) if "executed" in measured else "",
            "glue": json.dumps(measured["glue"]) if "glue" in measured else "",
        })
    return pd.DataFrame(rows, columns=TRIAL_COLUMNS)
