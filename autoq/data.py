"""Calibration/evaluation data: `.npz` files or dicts of arrays, validated against the model, split."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoq.errors import AutoqError
from autoq.graph import InputSpec

SPLIT_FRACTIONS = {"calibration": 0.25, "search": 0.5, "validation": 0.25}


@dataclass
class Dataset:
    """Model inputs by name (first axis = samples), optional labels."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def subset(self, index: np.ndarray) -> Dataset:
        labels = None if self.labels is None else self.labels[index]
        return Dataset({k: v[index] for k, v in self.arrays.items()}, labels)

    def batches(self, size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self), size):
            yield {k: v[start:start + size] for k, v in self.arrays.items()}


@dataclass
class Splits:
    calibration: Dataset
    search: Dataset
    validation: Dataset


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        msg = f"data file not found: {path}"
        raise AutoqError(msg)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as exc:
        msg = f"{path} is not a readable .npz file ({exc}); save inputs with numpy.savez(path, name=array)"
        raise AutoqError(msg) from exc


def load(data: str | Path | Mapping[str, np.ndarray] | Dataset, labels: str | Path | np.ndarray | None = None,
         ) -> Dataset:
    """Read data from an `.npz` path or a dict of arrays; `labels` is an array, a `.npy`/`.npz` path, or
    the name of an array inside the data file."""
    if isinstance(data, Dataset):
        return data
    arrays = _read_npz(Path(data)) if isinstance(data, str | Path) else {k: np.asarray(v) for k, v in data.items()}
    if isinstance(labels, str) and labels in arrays:
        labels = arrays.pop(labels)
    elif isinstance(labels, str | Path):
        path = Path(labels)
        if not path.is_file():
            msg = f"labels '{labels}' are neither an array in the data file nor a file"
            raise AutoqError(msg)
        loaded = np.load(path, allow_pickle=False)
        labels = loaded[loaded.files[0]] if hasattr(loaded, "files") else loaded
    return Dataset(arrays, None if labels is None else np.asarray(labels))


def validate(dataset: Dataset, specs: list[InputSpec]) -> None:
    """Raise a one-line AutoqError naming the first mismatch between data and model inputs."""
    names = {s.name for s in specs}
    missing = [n for n in names if n not in dataset.arrays]
    extra = [n for n in dataset.arrays if n not in names]
    if missing or extra:
        msg = (f"data arrays {sorted(dataset.arrays)} do not match the model inputs {sorted(names)}"
               f" (missing: {missing or 'none'}, unexpected: {extra or 'none'}); name arrays as the inputs"
               + (f", or pass --labels {extra[0]} if it holds labels" if len(extra) == 1 and not missing else ""))
        raise AutoqError(msg)
    sizes = {len(a) if a.ndim else 0 for a in dataset.arrays.values()}
    if sizes == {0}:
        msg = "the data is empty: give at least 3 samples (first axis = samples)"
        raise AutoqError(msg)
    if len(sizes) != 1:
        msg = f"data arrays have different sample counts {sorted(sizes)}: the first axis must be samples"
        raise AutoqError(msg)
    for spec in specs:
        array = dataset.arrays[spec.name]
        if array.dtype != spec.dtype:
            msg = f"input '{spec.name}' is {array.dtype} but the model expects {spec.dtype}: convert it"
            raise AutoqError(msg)
        if array.ndim != len(spec.shape):
            msg = (f"input '{spec.name}' has shape {array.shape} but the model expects rank {len(spec.shape)} "
                   f"{_show(spec.shape)}")
            raise AutoqError(msg)
        for axis, (want, got) in enumerate(zip(spec.shape[1:], array.shape[1:], strict=True), start=1):
            if want is not None and want != got:
                msg = f"input '{spec.name}' has shape {array.shape} but the model expects {_show(spec.shape)} " \
                      f"(axis {axis}: {got} != {want})"
                raise AutoqError(msg)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            msg = f"input '{spec.name}' contains NaN or infinite values: clean the data"
            raise AutoqError(msg)
    if dataset.labels is not None and len(dataset.labels) != len(dataset):
        msg = f"{len(dataset.labels)} labels for {len(dataset)} samples: give one label per sample"
        raise AutoqError(msg)


def _show(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def split(dataset: Dataset, seed: int = 0) -> Splits:
    """Deterministic disjoint calibration / search / validation parts (25/50/25%)."""
    n = len(dataset)
    if n < 3:
        msg = f"{n} samples are too few: give at least 3 (calibration, search and validation need one each)"
        raise AutoqError(msg)
    order = np.random.default_rng(seed).permutation(n)
    n_cal = max(1, round(n * SPLIT_FRACTIONS["calibration"]))
    n_val = max(1, round(n * SPLIT_FRACTIONS["validation"]))
    cal, search, val = np.split(order, [n_cal, n - n_val])
    return Splits(dataset.subset(np.sort(cal)), dataset.subset(np.sort(search)), dataset.subset(np.sort(val)))


def fingerprint(dataset: Dataset) -> str:
    """A content hash of the data: caches and resumed runs check it."""
    import hashlib

    digest = hashlib.sha1()
    for name in sorted(dataset.arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(dataset.arrays[name]).tobytes())
    if dataset.labels is not None:
        digest.update(np.ascontiguousarray(dataset.labels).tobytes())
    return digest.hexdigest()[:16]


def batch_size(specs: list[InputSpec], default: int = 16) -> int:
    """The model's fixed batch size, or `default` when the batch axis is symbolic."""
    fixed = {s.shape[0] for s in specs if s.shape and s.shape[0] is not None}
    return fixed.pop() if len(fixed) == 1 else default
