"""Evaluate one Assignment for real: build it, score it against FP32, time it, check what executed."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from autoq.backends.base import Backend, Candidate, GlueCheck
from autoq.calibrate import Calibration
from autoq.data import Dataset, Splits, batch_size, fingerprint
from autoq.decoder import describe_timing, timing_feeds
from autoq.graph import OnnxModel, probe_session
from autoq.measure import time_runner
from autoq.metrics import Metric, SampleMetric
from autoq.precision import Assignment

BOOTSTRAP = 30
DRIFT = 0.2  # a trial whose FP32 rounds moved more than this from the study's FP32 is re-timed
DRIFT_WAIT_S = 2.0


class CandidateError(RuntimeError):
    """A candidate that cannot be built, run or scored: its trial fails, the search goes on."""


@dataclass(frozen=True)
class Measurement:
    """Quality, latency and size of one built candidate (a trial's, a front point's or a recipe's)."""

    quality: float  # the metric on the split it was scored on
    quality_spread: float  # its standard deviation over bootstrap resamples of the samples
    latency_ms: float  # the study's FP32 latency x the candidate/FP32 ratio of alternating rounds
    latency_spread_ms: float  # inter-quartile range, on the same scale
    measured_latency_ms: float  # the raw median of this timing
    latency_runs: int
    load: float  # cores other processes used during the timing
    fp32_latency_ms: float | None  # FP32 timed in the same rounds
    speedup: float | None  # FP32 / candidate, same rounds
    size_bytes: int
    retimed: int = 0  # 1 if FP32 drifted beside it and it was timed again

    @property
    def values(self) -> tuple[float, float, float]:
        """The objectives, in `autoq.pareto.OBJECTIVES` order."""
        return self.quality, self.latency_ms, float(self.size_bytes)

    @property
    def speedup_spread(self) -> float:
        return self.latency_spread_ms / self.latency_ms * (self.speedup or 0.0) if self.latency_ms else 0.0

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(Measurement)}


@dataclass(frozen=True)
class Evaluation(Measurement):
    """A measurement plus what really ran: the executed check and the glue check."""

    executed_ok: bool = True
    mismatched_layers: tuple[str, ...] = ()
    executed: Mapping[str, str] = field(default_factory=dict)  # layer -> the precision its kernel ran in
    glue: GlueCheck | None = None

    def as_dict(self) -> dict:
        """The trial's attributes (trials.csv columns)."""
        checks = {"executed_ok": self.executed_ok, "mismatched_layers": list(self.mismatched_layers),
                  "executed": dict(self.executed)}
        if self.glue is not None:
            checks |= {"conversions": len(self.glue.conversions), "int8_chains": len(self.glue.chains),
                       "glue": {"conversions": self.glue.conversions, "chains": self.glue.chains}}
        return {**super().as_dict(), **checks}


@dataclass
class Evaluator:
    backend: Backend
    model: OnnxModel
    calibration: Calibration
    splits: Splits
    metric: Metric
    threads: int = 2
    latency_batch: int = 1
    fp32_latency_ms: float | None = None  # the study's FP32 latency: latencies are reported relative to it
    workdir: Path | None = None  # where its files go (a fresh temporary folder inside; default: the system's)
    _reference: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="autoq-", dir=self.workdir))
        fp32 = Assignment.uniform(self.model.layer_names, "fp32")
        self._ref_candidate = self.backend.build(self.model, fp32, self.calibration, self._tmp / "reference")
        self._ref_run = self.backend.runner(self._ref_candidate, self.threads)
        first = {k: v[: self.latency_batch] for k, v in self.splits.search.arrays.items()}
        self.latency_feeds = timing_feeds(self._ref_run, first, self.model.inputs, self.model.outputs)
        self.timed = describe_timing(self.model.inputs, first)

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def outputs(self, run: Callable, dataset: Dataset) -> list[np.ndarray]:
        """The model's outputs over `dataset` from `run` (feeds -> outputs), concatenated over its batches."""
        parts = [run(feeds) for feeds in dataset.batches(batch_size(self.model.inputs))]
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]

    def reference(self, split: str) -> list[np.ndarray]:
        if split not in self._reference:
            self._reference[split] = self.outputs(self._ref_run, getattr(self.splits, split))
        return self._reference[split]

    def fp32_quality(self, split: str = "search") -> float:
        """The metric of the FP32 model itself (1.0 for agreement metrics; the accuracy with labels)."""
        reference = self.reference(split)
        return float(self.metric(reference, reference, getattr(self.splits, split).labels))

    def quality_spread(self, outputs: list[np.ndarray], split: str = "search") -> float:
        """Standard deviation of the metric over bootstrap resamples of the samples (fixed draws)."""
        reference, labels = self.reference(split), getattr(self.splits, split).labels
        rng = np.random.default_rng(0)
        draws = [rng.integers(0, len(reference[0]), len(reference[0])) for _ in range(BOOTSTRAP)]
        if isinstance(self.metric, SampleMetric):
            values = self.metric.per_sample(reference, outputs, labels)
            return float(np.std([self.metric.combine(values[i]) for i in draws]))
        return float(np.std([self.metric([r[i] for r in reference], [o[i] for o in outputs],
                                          None if labels is None else labels[i]) for i in draws]))

    def time_reference(self) -> float:
        """A careful median of the FP32 model alone: the scale of every latency in the study."""
        return time_runner(lambda: self._ref_run(self.latency_feeds), min_runs=30, max_runs=120).median_ms

    def fingerprint(self) -> dict:
        """What cached analyses depend on: model, calibration, data and metric."""
        return {"model": hashlib.sha1(self.model.path.read_bytes()).hexdigest(), "calibration": self.calibration.name,
                "data": fingerprint(self.splits.search.subset(np.arange(len(self.splits.search)))),
                "metric": getattr(self.metric, "__name__", "custom")}

    def intermediates(self, tensors: list[str], split: str, max_samples: int = 16) -> dict[str, np.ndarray]:
        """FP32 values of internal tensors on the first `max_samples` samples of `split`."""
        session = probe_session(self.model.proto, tensors)
        dataset = getattr(self.splits, split)
        dataset = dataset.subset(np.arange(min(max_samples, len(dataset))))
        parts = [session.run(tensors, feeds) for feeds in dataset.batches(batch_size(self.model.inputs))]
        return {t: np.concatenate([p[i] for p in parts]) for i, t in enumerate(tensors)}

    def build(self, assignment: Assignment, workdir: Path | None = None) -> Candidate:
        workdir = workdir or Path(tempfile.mkdtemp(dir=self._tmp))
        try:
            return self.backend.build(self.model, assignment, self.calibration, workdir)
        except Exception as exc:
            msg = f"build failed: {type(exc).__name__}: {exc}"
            raise CandidateError(msg) from exc

    def score(self, candidate: Candidate, split: str = "search") -> tuple[float, list[np.ndarray], Callable]:
        """Quality of a built candidate on `split`, its outputs, and its runner."""
        try:
            run = self.backend.runner(candidate, self.threads)
            outputs = self.outputs(run, getattr(self.splits, split))
        except Exception as exc:
            msg = f"run failed: {type(exc).__name__}: {exc}"
            raise CandidateError(msg) from exc
        if not all(np.isfinite(o).all() for o in outputs if o.dtype.kind == "f"):
            raise CandidateError("outputs contain NaN or infinite values")
        quality = float(self.metric(self.reference(split), outputs, getattr(self.splits, split).labels))
        if not np.isfinite(quality):
            raise CandidateError(f"the metric returned {quality}")
        return quality, outputs, run

    def measure(self, candidate: Candidate, split: str = "search", **timing: int) -> Measurement:
        """quality (on `split`) and latency (median, spread, load, ratio to FP32 in alternating rounds) and size of
        a built candidate (a trial's, or a recipe's)."""
        quality, outputs, run = self.score(candidate, split)
        feeds = self.latency_feeds
        measured = time_runner(lambda: run(feeds), lambda: self._ref_run(feeds), **timing)
        retimed = 0
        if self.drifted(measured.ref_median_ms):  # the host changed pace mid-study: time it again, once
            time.sleep(DRIFT_WAIT_S)
            measured, retimed = time_runner(lambda: run(feeds), lambda: self._ref_run(feeds), **timing), 1
        # The whole machine drifts (shared VM): the candidate/FP32 ratio from the same rounds is what is stable.
        scale = self.fp32_latency_ms / measured.ref_median_ms if self.fp32_latency_ms and measured.ref_median_ms \
            else 1.0
        return Measurement(quality, self.quality_spread(outputs, split), measured.median_ms * scale,
                           measured.spread_ms * scale, measured.median_ms, measured.runs, measured.load,
                           measured.ref_median_ms, measured.speedup, candidate.size_bytes, retimed)

    def deployed_speedup(self, candidate: Candidate, **timing: int) -> tuple[float, float]:
        """The candidate's speed-up over FP32, both run with deployment session settings in alternating rounds,
        and the spread of that ratio."""
        if "deployed" not in self._reference:
            self._reference["deployed"] = self.backend.deployed_runner(self._ref_candidate, self.threads)
        reference, feeds = self._reference["deployed"], self.latency_feeds
        run = self.backend.deployed_runner(candidate, self.threads)
        measured = time_runner(lambda: run(feeds), lambda: reference(feeds), **timing)
        speedup = measured.speedup or 0.0  # timed beside a reference: always set
        return speedup, measured.spread_ms / measured.median_ms * speedup

    def drifted(self, fp32_ms: float | None) -> bool:
        """Whether FP32, timed beside a candidate, moved more than DRIFT from the study's FP32 latency."""
        return bool(self.fp32_latency_ms and fp32_ms and abs(fp32_ms / self.fp32_latency_ms - 1) > DRIFT)

    def evaluate(self, assignment: Assignment, split: str = "search", candidate: Candidate | None = None,
                 **timing: int) -> Evaluation:
        """`measure`, and the executed check: which precision each layer really ran in."""
        own = candidate is None
        candidate = candidate or self.build(assignment)
        try:
            result = self.measure(candidate, split, **timing)
            executed = self.backend.executed(candidate)
            glue = self.backend.glue_check(candidate)
        finally:
            if own:
                shutil.rmtree(candidate.path.parent, ignore_errors=True)
        mismatched = tuple(sorted(n for n, p in self.backend.expected(assignment).items() if executed.get(n) != p))
        return Evaluation(**vars(result), executed_ok=not mismatched, mismatched_layers=mismatched,
                          executed=executed, glue=glue)
