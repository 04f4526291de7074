"""Quality metrics: higher is better; each compares a candidate's outputs with the FP32 reference's."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from autoq.errors import AutoqError

# (reference outputs, candidate outputs, labels or None) -> score, higher is better
Metric = Callable[[list[np.ndarray], list[np.ndarray], "np.ndarray | None"], float]


def _rows(array: np.ndarray) -> np.ndarray:
    return array.reshape(len(array), -1).astype(np.float64)


def cosine(ref: list[np.ndarray], out: list[np.ndarray], labels: np.ndarray | None = None) -> float:
    """Mean cosine similarity of the first output, per sample."""
    a, b = _rows(ref[0]), _rows(out[0])
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean((a * b).sum(axis=1) / np.maximum(norms, 1e-12)))


def top1(ref: list[np.ndarray], out: list[np.ndarray], labels: np.ndarray | None = None) -> float:
    """Fraction of samples whose arg-max class matches the reference's."""
    return float(np.mean(_rows(ref[0]).argmax(1) == _rows(out[0]).argmax(1)))


def top5(ref: list[np.ndarray], out: list[np.ndarray], labels: np.ndarray | None = None) -> float:
    """Fraction of samples whose reference top-1 class is in the candidate's top 5."""
    best = _rows(ref[0]).argmax(1)
    top = np.argsort(-_rows(out[0]), axis=1)[:, :5]
    return float(np.mean((top == best[:, None]).any(1)))


def sqnr(ref: list[np.ndarray], out: list[np.ndarray], labels: np.ndarray | None = None) -> float:
    """Signal-to-quantization-noise ratio of the first output, in dB."""
    a, b = _rows(ref[0]), _rows(out[0])
    noise = float(np.sum((a - b) ** 2))
    return float(10 * np.log10(np.sum(a**2) / noise)) if noise > 0 else 200.0


def accuracy(ref: list[np.ndarray], out: list[np.ndarray], labels: np.ndarray | None = None) -> float:
    """Fraction of samples whose arg-max class equals the label."""
    if labels is None:
        msg = "metric 'accuracy' needs labels: pass --labels"
        raise AutoqError(msg)
    return float(np.mean(_rows(out[0]).argmax(1) == labels.reshape(-1)))


METRICS: dict[str, Metric] = {"cosine": cosine, "top1": top1, "top5": top5, "sqnr": sqnr, "accuracy": accuracy}


def get_metric(metric: str | Metric | None, has_labels: bool) -> tuple[str, Metric]:
    """Resolve a metric name (or callable); default: accuracy with labels, cosine without."""
    if metric is None:
        metric = "accuracy" if has_labels else "cosine"
    if callable(metric):
        return getattr(metric, "__name__", "custom"), metric
    if metric not in METRICS:
        msg = f"unknown metric '{metric}' (choose from {', '.join(METRICS)}, or pass a callable in the API)"
        raise AutoqError(msg)
    return metric, METRICS[metric]
