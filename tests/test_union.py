"""One front across runtimes (`autoq.union`): one search per backend in one run directory, every backend's points,
FP32 and recipes timed in one set of alternating rounds, one front, export and verify on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from onnx import helper

import autoq
from autoq import union
from autoq.errors import AutoqError
from tests.models import DigitsClassifier, train_digits_module

torch = pytest.importorskip("torch")
pytest.importorskip("openvino")
pytest.importorskip("ai_edge_quantizer")
BACKENDS = ["onnxruntime", "openvino", "litert"]


@pytest.mark.parametrize(("names", "reason"), [("onnxruntime,tensorrt", "unknown backend 'tensorrt'"),
                                               ("onnxruntime,onnxruntime", "names a backend twice"),
                                               ("onnxruntime,torch", "leave it out of --backend")])
def test_a_union_of_backends_it_cannot_time_together_is_one_line(names, reason):
    with pytest.raises(AutoqError, match=reason) as caught:
        union.backends_of(names)
    assert "\n" not in str(caught.value)


def test_the_union_front_drops_what_the_measurement_cannot_tell_apart():
    """Kept: a real trade (faster and worse beyond the spread; smaller). Dropped: a twin a few bytes smaller but
    slower, a point better only within the quality spread but slower and larger, and one faster only within the
    latency interval but 2.5x larger."""
    points = pd.DataFrame({
        "quality": [0.990, 0.9902, 0.999, 0.9991, 0.980, 0.990],
        "val_quality_spread": [0.001, 0.001, 0.0001, 0.0005, 0.001, 0.001],
        "latency_ms": [3.0, 3.2, 4.0, 13.0, 4.5, 2.99],
        "val_latency_spread_ms": [0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
        "size_bytes": [1000, 994, 1000, 3000, 400, 2500]})
    assert union.undominated(points).tolist() == [True, False, True, False, True, False]


def test_a_point_only_a_left_out_point_beats_stays_on_the_union_front():
    """Margins do not chain: the smallest point beats the middle one (as fast within the interval), the middle one
    beats the fastest, but the fastest is faster than the smallest beyond the interval, so it stays."""
    points = pd.DataFrame({"quality": [0.99, 0.99, 0.99], "val_quality_spread": [0.001] * 3,
                           "latency_ms": [1.12, 1.06, 1.0], "val_latency_spread_ms": [0.15] * 3,
                           "size_bytes": [800, 900, 1000]})
    assert union.undominated(points).tolist() == [True, False, True]


@pytest.fixture(scope="module")
def union_run(digits_npz, tmp_path_factory):
    """A union search of a digits CNN (as a torch module) on the three file-based runtimes, two trials each."""
    union.PASS_PAUSE_S = 0.0
    arrays = dict(np.load(digits_npz))
    out = tmp_path_factory.mktemp("union") / "run"
    result = autoq.search(DigitsClassifier(train_digits_module()), (torch.zeros(1, 1, 8, 8),),
                          {"image": arrays["image"]}, labels=arrays["label"], backend=",".join(BACKENDS), trials=6,
                          out=out, progress=False)
    return result, out


@pytest.mark.slow
def test_the_union_front_keeps_what_no_runtime_beats_timed_in_one_set_of_rounds(union_run):
    result, out = union_run
    assert union.searched(out) == BACKENDS
    for name in BACKENDS:  # each backend searched its share of the budget in its own run directory
        assert len(pd.read_csv(out / name / "trials.csv")) >= 2
    timed = pd.read_csv(out / union.TIMED).set_index("model")
    assert {f"{name} FP32" for name in BACKENDS} <= set(timed.index)
    candidates = pd.read_csv(out / union.CANDIDATES)
    assert set(candidates["backend"]) == set(BACKENDS)
    assert set(candidates["timed_as"]) <= set(timed.index)  # every point's latency is from the one set of rounds
    front = result.front
    assert np.allclose(front["latency_ms"], timed.loc[front["timed_as"], "ms"])
    assert sorted(candidates.loc[union.undominated(candidates), "timed_as"]) == sorted(front["timed_as"])
    for row in candidates[~candidates["timed_as"].isin(front["timed_as"])].itertuples():  # each left out is beaten
        slack = np.maximum(front["val_latency_spread_ms"], row.val_latency_spread_ms) / 2  # within the interval
        assert ((front["latency_ms"] <= row.latency_ms + slack) & (front["size_bytes"] <= row.size_bytes * 1.01)).any()
    assert front["latency_ms"].is_monotonic_increasing and front["val_executed_ok"].all()
    recipes = pd.read_csv(out / "recipes.csv")
    assert {r.split(": ")[0] for r in recipes["recipe"]} == set(BACKENDS)
    assert recipes["verdict"].str.len().gt(0).all()
    assert not recipes["verdict"].str.startswith("failed").any(), recipes["verdict"].tolist()
    assert (out / "report.html").read_text().count("union front") >= 1


@pytest.mark.slow
def test_a_union_point_exports_as_its_runtime_runs_it_and_verify_retimes_the_union(union_run, tmp_path):
    result, out = union_run
    suffix = {"onnxruntime": ".onnx", "openvino": ".xml", "litert": ".tflite"}
    for row in result.front.itertuples():
        files = autoq.export(out, int(row.point), tmp_path / f"p{row.point}")
        names = {f.name for f in files}
        assert "assignment.yaml" in names and "backend.txt" in names
        assert any(name.endswith(suffix[row.backend]) for name in names), (row.backend, names)
        if row.backend == "openvino":  # the IR's weights come along
            assert any(name.endswith(".bin") for name in names), names
    with pytest.raises(AutoqError, match="fine-tune a point of one backend's run"):
        autoq.finetune(out, 0, {"image": np.zeros((4, 1, 8, 8), np.float32)}, progress=False)
    table = autoq.verify(out, rounds=3, passes=1, progress=False)
    assert set(table["model"]) == set(pd.read_csv(out / union.TIMED)["model"])
    assert (table["vs FP32"] > 0).all() and (table["95% low"] <= table["95% high"]).all()


def test_a_backend_that_cannot_take_the_model_is_left_out_with_its_reason(digits_cnn, digits_npz, tmp_path, capsys):
    """An ONNX file with an op autoq does not run in torch (an Einsum after the CNN) on onnxruntime and litert:
    litert converts an ONNX file through that torch graph, so the union is onnxruntime's front alone, and the user
    reads why in one line."""
    proto = onnx.load(str(digits_cnn))
    output = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = [f"{name}_pre" if name == output else name for name in node.output]
    proto.graph.node.append(helper.make_node("Einsum", [f"{output}_pre"], [output], equation="ij->ij", name="odd"))
    odd = tmp_path / "odd.onnx"
    onnx.save(proto, odd)
    union.PASS_PAUSE_S = 0.0
    result = autoq.search(odd, digits_npz, labels="label", backend="onnxruntime,litert", trials=2,
                          out=tmp_path / "run", progress=False, recipes="none")
    assert union.searched(tmp_path / "run") == ["onnxruntime"]
    assert set(result.front["backend"]) == {"onnxruntime"}
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("autoq: litert:")]
    assert len(said) == 1 and "does not run its Einsum op (odd)" in said[0], said
    with pytest.raises(AutoqError, match="holds a union of onnxruntime, litert"):
        autoq.search(odd, digits_npz, labels="label", backend="onnxruntime,openvino", trials=2,
                     out=tmp_path / "run", progress=False)


def test_a_union_of_one_backend_is_a_plain_run(digits_cnn, digits_npz, tmp_path):
    assert union.backends_of("onnxruntime") == ["onnxruntime"]
    assert not union.is_union(Path(tmp_path))
