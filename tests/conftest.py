from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.models import digits_data, train_digits_cnn


@pytest.fixture(scope="session")
def digits_cnn(tmp_path_factory) -> Path:
    """A real trained CNN (about 97% accuracy on held-out digits) as an ONNX file."""
    return train_digits_cnn(tmp_path_factory.mktemp("cnn") / "digits_cnn.onnx")


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory) -> Path:
    """Held-out digits (not used in training) as an .npz named as the model input, labels beside."""
    images, labels = digits_data()
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, image=images[1400:1640], label=labels[1400:1640])
    return path


@pytest.fixture(scope="session")
def digits_run(digits_cnn, digits_npz, tmp_path_factory):
    """One search of the digits CNN (10 trials, the default space, the recipes measured): (SearchResult, its run
    directory), shared by every module that reads a finished run. A test that changes a run works on a copy."""
    import autoq

    out = tmp_path_factory.mktemp("digits-run") / "cnn"
    return autoq.search(digits_cnn, digits_npz, labels="label", trials=10, out=out, progress=False), out
