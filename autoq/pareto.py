"""Pareto front extraction over (quality max, latency min, size min)."""

from __future__ import annotations

import numpy as np
import pandas as pd

OBJECTIVES = {"quality": True, "latency_ms": False, "size_bytes": False}  # column -> maximize?


def pareto_mask(values: np.ndarray, maximize: list[bool]) -> np.ndarray:
    """True for rows no other row dominates (at least as good everywhere, strictly better somewhere)."""
    signed = np.where(maximize, -1.0, 1.0) * np.asarray(values, dtype=float)  # now all minimised
    keep = np.ones(len(signed), dtype=bool)
    for i, row in enumerate(signed):
        others = np.delete(signed, i, axis=0)
        if ((others <= row).all(axis=1) & (others < row).any(axis=1)).any():
            keep[i] = False
    return keep


def front(trials: pd.DataFrame, objectives: dict[str, bool] = OBJECTIVES) -> pd.DataFrame:
    """Non-dominated completed trials, one per assignment, sorted by latency."""
    done = trials[trials["state"] == "COMPLETE"].drop_duplicates("key")
    if done.empty:
        return done
    mask = pareto_mask(done[list(objectives)].to_numpy(), list(objectives.values()))
    return done[mask].sort_values("latency_ms").reset_index(drop=True)
