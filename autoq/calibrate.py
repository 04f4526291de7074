"""One pass over the calibration data -> activation ranges of every tensor a layer could quantize.

The ranges are written in ONNX Runtime's calibration-cache format and cached in the run directory, so
building a candidate never re-runs calibration. The calibration samples are kept beside them
(`samples_path`) for backends whose quantizer observes activations itself (PT2E).
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np

from autoq.data import Dataset, batch_size, fingerprint
from autoq.graph import LAYER_OPS, OnnxModel

METHODS = ("minmax", "entropy", "percentile")


def cache_path(model: OnnxModel, data: Dataset, cache_dir: Path, method: str) -> Path:
    digest = hashlib.sha1(model.path.read_bytes()).hexdigest()[:12]
    return cache_dir / f"calibration-{method}-{digest}-{fingerprint(data)}.json"


def samples_path(ranges: Path) -> Path:
    """The calibration samples (model inputs by name) kept beside the ranges computed from them."""
    return ranges.with_suffix(".npz")


def calibrate(model: OnnxModel, data: Dataset, cache_dir: Path, method: str = "minmax") -> Path:
    """Return the path of the ranges for `model` on `data`, computing them only if not cached."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data

    path = cache_path(model, data, cache_dir, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not samples_path(path).is_file():
        np.savez(samples_path(path), **data.arrays)
    if path.is_file():
        return path
    ort_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[method]
    batches = list(data.batches(batch_size(model.inputs)))
    with tempfile.TemporaryDirectory(prefix="autoq-calib-") as tmp:
        calibrator = create_calibrator(model.path, list(LAYER_OPS), augmented_model_path=f"{tmp}/augmented.onnx",
                                       calibrate_method=ort_method)
        calibrator.collect_data(_Reader(batches))
        ranges = calibrator.compute_data()
    save_tensors_data(ranges, path)
    return path


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, batches: list[dict]) -> None:
        self._it = iter(batches)

    def get_next(self) -> dict | None:
        return next(self._it, None)

    def set_range(self, start_index: int, end_index: int) -> None:  # protocol method, unused
        pass
