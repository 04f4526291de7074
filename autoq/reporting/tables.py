"""The trials table: one row per Optuna trial, with its measurements and assignment."""

from __future__ import annotations

import json

import optuna
import pandas as pd

# Measurements stored on each trial as they are; with the others below, documented in the README.
MEASURED = ["quality", "quality_spread", "latency_ms", "latency_spread_ms", "measured_latency_ms", "latency_runs",
            "load", "fp32_latency_ms", "speedup", "size_bytes", "conversions", "int8_chains", "retimed"]
# trials.csv has these columns, pareto.csv these plus the val_* ones.
TRIAL_COLUMNS = ["trial", "state", "baseline", "seeded", "duplicate", *MEASURED, "feasible", "executed_ok",
                 "mismatched_layers", "screened", "predicted_quality", "predicted_latency_ms", "predicted_size_bytes",
                 "screen_wrong", "summary", "error", "key", "assignment", "executed", "glue"]


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if attrs.get("over_budget") or trial.state.name == "WAITING":  # never ran: over budget, or a seed
            continue  # enqueued but left for a longer run
        predicted = attrs.get("predicted", [None] * 3)
        assignment = json.loads(attrs["assignment"]) if "assignment" in attrs else {"layers": {}}
        counts = pd.Series(list(assignment["layers"].values()), dtype=object).value_counts()
        rows.append({
            "trial": trial.number, "state": trial.state.name, "baseline": attrs.get("baseline", ""),
            "seeded": bool(attrs.get("seeded", False)),
            "duplicate": bool(attrs.get("duplicate", False)),
            **{c: attrs.get(c) for c in MEASURED}, "executed_ok": attrs.get("executed_ok"),
            "feasible": trial.state.name == "COMPLETE" and all(v <= 0 for v in attrs.get("constraints", [])),
            "mismatched_layers": ";".join(attrs.get("mismatched_layers", [])),
            "screened": attrs.get("screened", ""), "predicted_quality": predicted[0],
            "predicted_latency_ms": predicted[1], "predicted_size_bytes": predicted[2],
            "screen_wrong": attrs.get("screen_wrong"),
            "summary": ", ".join(f"{p} x{n}" for p, n in sorted(counts.items())),
            "error": attrs.get("error", "interrupted" if trial.state.name == "FAIL" else ""),
            "key": attrs.get("key", ""), "assignment": attrs.get("assignment", ""),
            "executed": json.dumps(attrs["executed"]) if "executed" in attrs else "",
            "glue": json.dumps(attrs["glue"]) if "glue" in attrs else "",
        })
    return pd.DataFrame(rows, columns=TRIAL_COLUMNS)
