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
