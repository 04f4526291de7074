"""Quality metrics: higher is better; each compares a candidate's outputs with the FP32 reference's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class SampleMetric:
    """A metric combined from per-sample values: its bootstrap spread resamples those values, not the outputs
    (a language model's logits are hundreds of MB; scoring them 30 times would cost more than the trial)."""

    name: str
    per_sample: Callable[[list[np.ndarray], list[np.ndarray], np.ndarray | None], np.ndarray]
    combine: Callable[[np.ndarray], float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "__name__", self.name)  # named like the plain metric functions

    def __call__(self, ref: list[np.ndarray], out: list[np.ndarray], labels: np.ndarray | None = None) -> float:
        return self.combine(self.per_sample(ref, out, labels))


def token_nll(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean negative log-likelihood of the label tokens, per sample: logits (samples, tokens, vocabulary)."""
    logits = logits.astype(np.float32, copy=False)
    peak = logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[..., 0]
    picked = np.take_along_axis(logits, labels[..., None].astype(np.int64), axis=-1)[..., 0]
    return (log_norm - picked).astype(np.float64).mean(axis=-1)


def _nll_pairs(ref: list[np.ndarray], out: list[np.ndarray], labels: np.ndarray | None) -> np.ndarray:
    if labels is None or labels.ndim != 2:
        msg = "metric 'ppl_ratio' needs the next token of every input token as labels (samples, tokens): pass --labels"
        raise AutoqError(msg)
    return np.stack([token_nll(ref[0], labels), token_nll(out[0], labels)], axis=1)


def _perplexity_ratio(pairs: np.ndarray) -> float:
    return float(np.exp(pairs[:, 0].mean() - pairs[:, 1].mean()))


# FP32's perplexity on the label tokens over the candidate's: 1.0 at FP32, 0.95 for a 5% higher perplexity
ppl_ratio = SampleMetric("ppl_ratio", _nll_pairs, _perplexity_ratio)

METRICS: dict[str, Metric] = {"cosine": cosine, "top1": top1, "top5": top5, "sqnr": sqnr, "accuracy": accuracy,
                              "ppl_ratio": ppl_ratio}


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
