"""One pass over the calibration data -> a Calibration: the range of every float tensor, and its uint8 resolution.

The ranges cover every float tensor (layers and the glue between them) and are written in ONNX Runtime's
calibration-cache format, cached in the run directory, so building a candidate never re-runs calibration.
Beside them: the calibration samples for backends whose quantizer observes activations itself (PT2E, NNCF), and
each tensor's resolution under its uint8 range: the SQNR of quantizing the values
between the range's ends. A tensor whose range a sentinel dominates (an attention mask's float-min) has its
real values rounded away (about 0 dB): `autoq.regions` keeps such glue float.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
from contextlib import redirect_stdout
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from autoq.data import Dataset, batch_size, fingerprint
from autoq.graph import OnnxModel, probe_session

VERSION = 2  # v2: every float tensor, not only the layers' inputs and outputs
RESOLUTION_SAMPLES = 16
LEVELS = 255  # uint8 activations


def cache_path(model: OnnxModel, data: Dataset, cache_dir: Path, method: str) -> Path:
    digest = hashlib.sha1(model.path.read_bytes()).hexdigest()[:12]
    return cache_dir / f"calibration-v{VERSION}-{method}-{digest}-{fingerprint(data)}.json"


def method_path(ranges: Path, key: str) -> Path:
    """The ranges of the same model and data under another calibration (`entropy`, `pct99.99`, ...)."""
    parts = ranges.name.split("-")
    return ranges.with_name("-".join([*parts[:2], key, *parts[3:]]))


def samples_path(ranges: Path) -> Path:
    """The calibration samples (model inputs by name) kept beside the ranges computed from them."""
    return ranges.with_suffix(".npz")


def cached_calibration(cache_dir: Path) -> Calibration | None:
    """The calibration a run cached (its min-max ranges with their samples beside them), if any."""
    found = [p for p in sorted(cache_dir.glob("calibration-*-minmax-*.json")) if samples_path(p).is_file()]
    return Calibration(found[0]) if found else None


def cached_samples(cache_dir: Path) -> Path | None:
    """The calibration samples a run cached beside its min-max ranges (other caches there hold other arrays)."""
    found = cached_calibration(cache_dir)
    return None if found is None else found.samples_file


def resolution_path(ranges: Path) -> Path:
    """Tensor -> SQNR (dB) of its uint8 quantization under its calibrated range."""
    return ranges.with_name(ranges.stem + "-resolution.json")


def resolution(ranges: Path) -> dict[str, float]:
    return json.loads(resolution_path(ranges).read_text())


@dataclass(frozen=True)
class Calibration:
    """A run's calibration, as backends and the core read it: each tensor's range under a calibration method, the
    samples the ranges came from, each tensor's uint8 resolution, and a place for caches derived from them. Named
    by its min-max ranges file (`path`), which also keys those caches."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def folder(self) -> Path:
        """The cache directory the calibration lives in (learned rounding and smoothing caches sit there too)."""
        return self.path.parent

    @property
    def samples_file(self) -> Path:
        return samples_path(self.path)

    def samples(self) -> dict[str, np.ndarray]:
        """The calibration samples: model inputs by name."""
        return dict(_arrays(self.samples_file))

    def ranges(self, key: str = "minmax") -> dict[str, tuple[float, float]]:
        """Tensor -> (low, high) under the calibration `key` (`minmax`, `entropy`, `mse`, `pct99.99`, ...; the
        histogram methods cover the layers' inputs and outputs only)."""
        return _ranges_of(method_path(self.path, key) if key != "minmax" else self.path)

    def resolution(self) -> dict[str, float]:
        """Tensor -> SQNR (dB) of its uint8 quantization under its min-max range."""
        return resolution(self.path)

    def derived(self, suffix: str) -> Path:
        """A cache file computed from this calibration (e.g. `channel-max.npz`), beside it."""
        return self.path.with_name(f"{self.path.stem}-{suffix}")

    def with_ranges(self, ranges: dict[str, tuple[float, float]], folder: Path) -> Calibration:
        """A copy of this calibration in `folder` whose tensors in `ranges` take those ranges under every method
        (fine-tuning's learned activation ranges); the samples and resolutions stay (so do the regions)."""
        from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, save_tensors_data

        folder.mkdir(parents=True, exist_ok=True)
        copy = Calibration(folder / self.name)
        shutil.copyfile(self.samples_file, copy.samples_file)
        shutil.copyfile(resolution_path(self.path), resolution_path(copy.path))
        for source in {self.path, *self.path.parent.glob(method_path(self.path, "*").name)}:
            merged = _ranges_of(source) | {name: (float(low), float(high)) for name, (low, high) in ranges.items()}
            save_tensors_data(TensorsData(CalibrationMethod.MinMax, {
                name: TensorData(lowest=np.float32(low), highest=np.float32(high))
                for name, (low, high) in merged.items()}), copy.path.with_name(source.name))
        return copy


@lru_cache(maxsize=8)
def _arrays(path: Path) -> dict[str, np.ndarray]:
    return dict(np.load(path))


@lru_cache(maxsize=16)
def _ranges_of(path: Path) -> dict[str, tuple[float, float]]:
    from onnxruntime.quantization.calibrate import load_tensors_data

    return {name: (float(np.min(r.range_value[0])), float(np.max(r.range_value[1])))
            for name, r in load_tensors_data(path).data.items()}


def calibrate(model: OnnxModel, data: Dataset, cache_dir: Path, others: tuple[str, ...] = ()) -> Calibration:
    """The min-max ranges of every float tensor of `model` on `data` (computed only if not cached); the `others`
    calibrations (`entropy`, `mse`, `pct99.99`: see `Precision.calibration_key`) are cached beside them for the
    layers' inputs and outputs."""
    from onnxruntime.quantization.calibrate import save_tensors_data

    path = cache_path(model, data, cache_dir, "minmax")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not samples_path(path).is_file():
        arrays: dict[str, Any] = dict(data.arrays)
        np.savez(samples_path(path), **arrays)
    batches = list(data.batches(batch_size(model.inputs)))
    for key in others:  # ORT's histograms stack every batch: one sample each keeps the shapes equal
        if not method_path(path, key).is_file():
            save_tensors_data(_ranges(model, list(data.batches(1)), key), method_path(path, key))
    if path.is_file() and resolution_path(path).is_file():
        return Calibration(path)
    ranges = _ranges(model, batches, "minmax")
    bounds = {name: (float(np.min(r.range_value[0])), float(np.max(r.range_value[1])))
              for name, r in ranges.data.items()}
    resolution_path(path).write_text(json.dumps(_resolution(model, bounds, batches[:RESOLUTION_SAMPLES])))
    save_tensors_data(ranges, path)
    return Calibration(path)


def _resolution(model: OnnxModel, bounds: dict[str, tuple[float, float]], batches: list[dict]) -> dict[str, float]:
    """Per tensor: SQNR (dB) of its uint8 quantization under its calibrated range (widened to hold 0, as the
    quantizer does), over the values strictly between the range's ends (values at an end, a sentinel or a clip
    bound, are exact); inf where no value lies between."""
    names = list(bounds)
    session = probe_session(model.proto, names)
    power = {name: np.zeros(2) for name in names}  # signal, noise
    for feeds in batches:
        for name, value in zip(names, session.run(names, feeds), strict=True):
            low, high = min(bounds[name][0], 0.0), max(bounds[name][1], 0.0)
            if high <= low:
                continue
            inside = value[(value > low) & (value < high)].astype(np.float64)
            scale = (high - low) / LEVELS
            zero = np.round(-low / scale)
            error = (np.clip(np.round(inside / scale) + zero, 0, LEVELS) - zero) * scale - inside
            power[name] += (np.square(inside).sum(), np.square(error).sum())
    return {name: float(10 * np.log10(signal / noise)) if noise > 0 else float("inf")
            for name, (signal, noise) in power.items()}


def _ranges(model: OnnxModel, batches: list[dict], key: str) -> Any:  # ORT's TensorsData
    """ONNX Runtime's calibrator run for one method: min-max over every float tensor; the histogram methods
    over the layers' inputs and outputs (`mse`: the range minimising uint8 rounding plus clipping error)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, create_calibrator

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "mse": CalibrationMethod.Entropy}.get(key, CalibrationMethod.Percentile)
    extra = {"percentile": float(key.removeprefix("pct")), "symmetric": False} if key.startswith("pct") else {}
    op_types = [] if key == "minmax" else sorted({layer.op_type for layer in model.layers})
    with tempfile.TemporaryDirectory(prefix="autoq-calib-") as tmp, redirect_stdout(io.StringIO()):  # its prints
        calibrator = create_calibrator(model.path, op_types, augmented_model_path=f"{tmp}/augmented.onnx",
                                       calibrate_method=method, extra_options=extra)
        calibrator.collect_data(_Reader(batches))
        if key != "mse":
            return calibrator.compute_data()
        histograms = calibrator.collector.histogram_dict
    return TensorsData(CalibrationMethod.Entropy, {
        name: TensorData(lowest=np.float32(low), highest=np.float32(high))
        for name, (low, high) in ((n, _mse_range(*h[:4])) for n, h in histograms.items())})


def _mse_range(counts: np.ndarray, edges: np.ndarray, lowest: float, highest: float) -> tuple[float, float]:
    """The uint8 range, shrunk from the observed ends in 2% steps at either end, with the least expected
    squared error (rounding inside the range, clipping outside)."""
    centres = (edges[:-1] + edges[1:]) / 2
    weights = counts / max(counts.sum(), 1)
    low_end, high_end = min(float(lowest), 0.0), max(float(highest), 0.0)
    best, found = np.inf, (low_end, high_end)
    for shrink_low in np.linspace(1.0, 0.3, 36):
        for shrink_high in np.linspace(1.0, 0.3, 36):
            low, high = low_end * shrink_low, high_end * shrink_high
            step = max(high - low, 1e-12) / LEVELS
            clipped = np.clip(centres, low, high)
            error = float(weights @ ((centres - clipped) ** 2)) + step ** 2 / 12
            if error < best:
                best, found = error, (low, high)
    return found


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, batches: list[dict]) -> None:
        self._it = iter(batches)

    def get_next(self) -> dict | None:
        return next(self._it, None)

    def set_range(self, start_index: int, end_index: int) -> None:  # protocol method, unused
        pass
