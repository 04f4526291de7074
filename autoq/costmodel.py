"""A cost model that screens hopeless candidates before they are built and timed.

Each objective is predicted as the FP32 value minus a sum of per-(layer, precision) effects. The effects start
from the sensitivity table (quality drop, or the SQNR noise power; profiled latency saving; size saving), are
scaled to the study's measurements, then fitted to the measured trials (non-negative least squares, pulled
toward the sensitivity prior). A candidate whose prediction the measured front dominates by more than twice
the model's cross-validated error (1.4826 x the median absolute error, robust to timing spikes) in every
objective is screened: recorded with its prediction, not measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import nnls

from autoq.methods import method_of
from autoq.pareto import MAXIMIZE, pareto_mask
from autoq.precision import Assignment

MIN_TRIALS = 10  # measured trials before the model is trusted
RIDGE = 1.0  # pull of the sensitivity prior, per effect
FOLDS = 5
Measured = list[tuple[Assignment, tuple]]  # (assignment, (quality, latency_ms, size_bytes)) of measured trials


@dataclass
class Prediction:
    values: np.ndarray  # quality, latency_ms, size_bytes
    margins: np.ndarray  # twice the cross-validated error (a robust standard deviation) of each objective


def _fit(features: np.ndarray, target: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Effects >= 0 explaining `target` (each trial's loss against FP32): least squares plus RIDGE x the squared
    distance to the prior scaled to the data (the prior counts as RIDGE observations per effect)."""
    guess = features @ prior
    scale = max(float(guess @ target) / float(guess @ guess), 0.0) if guess.any() else 0.0
    pull = np.sqrt(RIDGE)
    rows = np.vstack([features, pull * np.eye(len(prior))])
    effects, _ = nnls(rows, np.concatenate([target, pull * scale * prior]))
    return effects


class CostModel:
    """Predicts (quality, latency, size) of an assignment from the sensitivity table and the measured trials."""

    def __init__(self, sensitivity: pd.DataFrame, choices: dict[str, list[str]]) -> None:
        rows = sensitivity[[p in choices.get(n, []) for n, p in zip(sensitivity["layer"], sensitivity["precision"],
                                                                    strict=True)]]
        self.pairs = list(zip(rows["layer"], rows["precision"], strict=True))
        self.index = {pair: i for i, pair in enumerate(self.pairs)}
        drop = method_of(sensitivity).drop(rows) if len(rows) else np.zeros(0)
        self.priors = [np.nan_to_num(drop).clip(min=0),
                       rows["latency_saving_ms"].fillna(0).to_numpy(dtype=float).clip(min=0),
                       rows["size_saving_bytes"].fillna(0).to_numpy(dtype=float).clip(min=0)]
        self.effects: list[np.ndarray] = []
        self.margins = np.zeros(3)
        self.base = np.zeros(3)
        self.fitted_on = -1

    def features(self, assignment: Assignment) -> np.ndarray:
        x = np.zeros(len(self.pairs))
        for name, precision in assignment.layers.items():
            if (name, precision) in self.index:
                x[self.index[(name, precision)]] = 1.0
        return x

    def fit(self, measured: Measured) -> bool:
        """Refit on the measured (assignment, values) pairs; False while there are too few or no FP32 point."""
        if len(measured) == self.fitted_on:
            return bool(self.effects)
        self.fitted_on = len(measured)
        x = np.array([self.features(a) for a, _ in measured])
        y = np.array([v for _, v in measured], dtype=float)
        fp32 = [i for i, row in enumerate(x) if not row.any()]
        if len(measured) < MIN_TRIALS or not fp32:
            self.effects = []
            return False
        self.base = y[fp32[0]]
        losses = self.base - y  # quality lost, latency saved, bytes saved: all >= 0 in expectation
        self.effects = [_fit(x, losses[:, k], self.priors[k]) for k in range(3)]
        folds = np.arange(len(x)) % FOLDS
        errors = np.zeros_like(y)
        for fold in range(FOLDS):
            test, train = folds == fold, folds != fold
            for k in range(3):
                errors[test, k] = losses[test, k] - x[test] @ _fit(x[train], losses[train, k], self.priors[k])
        # robust: a shared machine's timing spikes would otherwise inflate the latency margin several-fold
        self.margins = 2 * 1.4826 * np.median(np.abs(errors), axis=0)
        return True

    def predict(self, assignment: Assignment) -> Prediction:
        x = self.features(assignment)
        return Prediction(self.base - np.array([x @ e for e in self.effects]), self.margins)


def dominated(prediction: Prediction, front: np.ndarray) -> bool:
    """Whether a measured point beats the prediction by more than the margin in every objective
    (quality maximised, latency and size minimised)."""
    q, latency, size = prediction.values
    mq, ml, ms = prediction.margins
    return bool(((front[:, 0] >= q + mq) & (front[:, 1] <= latency - ml) & (front[:, 2] <= size - ms)).any())


def front_of(values: np.ndarray) -> np.ndarray:
    return values[pareto_mask(values, MAXIMIZE)] if len(values) else values


AUDIT_EVERY = 5  # one screened candidate in five is measured anyway, to count how often the screen is wrong
MAX_IN_A_ROW = 50  # after this many screened in a row, measure the next one: the sampler must move on


class Screen:
    """Decides, per sampled candidate, whether it is worth measuring; keeps count of screened and audited ones."""

    def __init__(self, sensitivity: pd.DataFrame, choices: dict[str, list[str]], screened: int = 0) -> None:
        self.model = CostModel(sensitivity, choices)
        self.screened = screened
        self.in_a_row = 0

    def verdict(self, assignment: Assignment, measured: Measured) -> tuple[str, Prediction | None]:
        """("measure", None) while the model is not fitted or the candidate may help; otherwise ("screen" or
        "audit", prediction): skip it, or measure it anyway to check the screen."""
        if not self.model.fit(measured) or self.in_a_row >= MAX_IN_A_ROW:
            self.in_a_row = 0
            return "measure", None
        prediction = self.model.predict(assignment)
        if not dominated(prediction, front_of(np.array([v for _, v in measured], dtype=float))):
            self.in_a_row = 0
            return "measure", prediction
        self.screened += 1
        self.in_a_row += 1
        return ("audit" if self.screened % AUDIT_EVERY == 1 else "screen"), prediction


def screen_was_wrong(values: tuple, measured: Measured) -> bool:
    """An audited candidate proved the screen wrong if, measured, no earlier trial dominates it."""
    points = np.array([v for _, v in measured] + [values], dtype=float)
    return bool(pareto_mask(points, MAXIMIZE)[-1])
