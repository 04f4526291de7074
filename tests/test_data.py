from __future__ import annotations

import numpy as np
import pytest

from autoq import data, graph
from autoq.errors import AutoqError


@pytest.fixture(scope="module")
def specs(digits_cnn, tmp_path_factory):
    return graph.prepare(digits_cnn, tmp_path_factory.mktemp("run")).inputs


def _images(n=12, dtype=np.float32, shape=(1, 8, 8)):
    return np.random.default_rng(0).random((n, *shape)).astype(dtype)


@pytest.mark.parametrize(("arrays", "message"), [
    ({"img": _images()}, "missing: \\['image'\\].*unexpected: \\['img'\\]"),
    ({"image": _images(dtype=np.float64)}, "'image' is float64 but the model expects float32"),
    ({"image": _images(shape=(1, 8, 9))}, "axis 3: 9 != 8"),
    ({"image": _images(shape=(8, 8))}, "expects rank 4"),
    ({"image": np.zeros((0, 1, 8, 8), np.float32)}, "too few|empty"),
    ({"image": np.full((6, 1, 8, 8), np.nan, np.float32)}, "NaN"),
])
def test_mismatched_inputs_name_the_problem(specs, arrays, message):
    dataset = data.load(arrays)
    with pytest.raises(AutoqError, match=message):
        data.validate(dataset, specs)
        data.split(dataset)


def test_labels_by_name_and_count(digits_npz, specs):
    dataset = data.load(digits_npz, "label")
    assert "label" not in dataset.arrays and len(dataset.labels) == len(dataset)
    data.validate(dataset, specs)
    with pytest.raises(AutoqError, match="labels"):
        data.validate(data.Dataset(dataset.arrays, dataset.labels[:5]), specs)


def test_split_is_deterministic_disjoint_and_complete():
    ids = np.arange(100, dtype=np.float32).reshape(100, 1)
    first, second = data.split(data.Dataset({"x": ids})), data.split(data.Dataset({"x": ids}))
    parts = [p.arrays["x"].ravel() for p in (first.calibration, first.search, first.validation)]
    assert [len(p) for p in parts] == [25, 50, 25]
    assert sorted(np.concatenate(parts)) == list(range(100))
    np.testing.assert_array_equal(first.search.arrays["x"], second.search.arrays["x"])


def test_unreadable_npz_is_a_clear_error(tmp_path):
    path = tmp_path / "data.npz"
    path.write_text("nope")
    with pytest.raises(AutoqError, match="not a readable .npz"):
        data.load(path)
