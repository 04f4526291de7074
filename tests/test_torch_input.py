"""PyTorch models as input: an nn.Module through the API, a torch.export file through the CLI; layers are
named by module FQN in assignments and reports, on every backend."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import autoq
from autoq.errors import AutoqError
from tests.models import DigitsClassifier, digits_data, train_digits_module

torch = pytest.importorskip("torch")
FQNS = {"features.0", "features.3", "head.6", "head.8"}


@pytest.fixture(scope="module")
def classifier():
    return DigitsClassifier(train_digits_module())


@pytest.fixture(scope="module")
def digits():
    images, labels = digits_data()
    return {"image": images[1400:1640]}, labels[1400:1640]


@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("openvino", marks=pytest.mark.slow),
                                     pytest.param("torch", marks=pytest.mark.slow)])
def test_a_module_is_searched_with_its_module_names(classifier, digits, backend, tmp_path):
    data, labels = digits
    example = (torch.from_numpy(data["image"][:1]),)
    space = "torch-cpu" if backend == "torch" else None  # eager: inductor's compiles have their own test
    result = autoq.search(classifier, example, data, labels=labels, backend=backend, trials=4, out=tmp_path / "run",
                          progress=False, recipes="none", space=space)  # the recipes' tests build them from modules
    done = result.trials[result.trials["state"] == "COMPLETE"]
    assert len(done) == 4 and done["executed_ok"].all()
    for assignment in done["assignment"]:
        assert set(json.loads(assignment)["layers"]) == FQNS
    assert set(pd.read_csv(tmp_path / "run" / "sensitivity.csv")["layer"]) == FQNS
    assert result.front["val_quality"].max() >= 0.9  # the exported model is the trained one


def test_a_module_called_twice_gets_one_name_per_call(tmp_path):
    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.shared(torch.relu(self.shared(x)))

    from autoq.graph import prepare
    from autoq.torch_input import to_onnx

    path = to_onnx(Twice(), (torch.randn(2, 8),), tmp_path)
    assert sorted(layer.name for layer in prepare(path, tmp_path / "run").layers) == ["shared", "shared#2"]


def test_a_convolution_with_its_batch_norm_folded_keeps_its_module_name(tmp_path):
    """The exporter folds each eval-mode BatchNorm into the convolution before it (a per-channel rescaling of its
    weight): the layer is still named by the convolution's FQN, and two convolutions of the same shape are told
    apart by their values."""
    nn = torch.nn
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                           nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                           nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    for norm in (module[1], module[4], module[7]):
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.data.uniform_(0.5, 1.5)
    from autoq.graph import prepare
    from autoq.torch_input import to_onnx

    path = to_onnx(module.eval(), (torch.randn(1, 3, 8, 8),), tmp_path)
    assert [layer.name for layer in prepare(path, tmp_path / "run").layers] == ["0", "3", "6"]


def test_a_pt2_file_through_the_cli(classifier, digits, tmp_path):
    data, labels = digits
    program = torch.export.export(classifier, (torch.from_numpy(data["image"][:1]),))
    torch.export.save(program, tmp_path / "digits.pt2")
    np.savez(tmp_path / "digits.npz", image=data["image"], label=labels)
    cmd = [sys.executable, "-m", "autoq", "sensitivity", str(tmp_path / "digits.pt2"), "--data",
           str(tmp_path / "digits.npz"), "--labels", "label", "--method", "sqnr", "--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert set(pd.read_csv(tmp_path / "run" / "sensitivity.csv")["layer"]) == FQNS


def test_bad_torch_input_is_one_clear_error(classifier, digits, tmp_path):
    data, _ = digits
    with pytest.raises(AutoqError, match="needs example_inputs"):
        autoq.search(classifier, data=data, trials=2, out=tmp_path / "a", progress=False)
    broken = tmp_path / "broken.pt2"
    broken.write_bytes(b"not a zip archive")
    cmd = [sys.executable, "-m", "autoq", "search", str(broken), "--data", str(tmp_path / "none.npz")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not a readable torch.export program" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_pt2_with_pickled_payloads_is_refused_before_loading(classifier, digits, tmp_path):
    """torch.export.load would unpickle such payloads (weights_only=False): autoq refuses the file instead."""
    import zipfile

    from autoq.torch_input import load_pt2

    program = torch.export.export(classifier, (torch.from_numpy(digits[0]["image"][:1]),))
    torch.export.save(program, tmp_path / "clean.pt2")
    assert load_pt2(tmp_path / "clean.pt2") is not None
    with zipfile.ZipFile(tmp_path / "clean.pt2") as source, zipfile.ZipFile(tmp_path / "pickled.pt2", "w") as out:
        for item in source.infolist():
            payload = source.read(item)
            if item.filename.endswith("_weights_config.json"):
                config = json.loads(payload)
                next(iter(config["config"].values()))["use_pickle"] = True
                payload = json.dumps(config).encode()
            out.writestr(item, payload)
    with pytest.raises(AutoqError, match="pickled object"):
        load_pt2(tmp_path / "pickled.pt2")
