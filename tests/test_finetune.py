"""`autoq finetune`: quantization-aware training of a front point, on real small models and ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pandas as pd
import pytest

import autoq
from autoq import graph
from autoq.errors import AutoqError
from tests.models import embedding_mlp

torch = pytest.importorskip("torch")

SPACE = {"default": ["fp32"], "rules": [{"op_type": ["MatMul"], "precisions": ["fp32", "w4g32"]}],
         "sensitivity": "none"}


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A search of a token-embedding MLP whose front has its three MatMuls in 4-bit weights (cosine ~0.994)."""
    folder = tmp_path_factory.mktemp("finetune")
    model, _ = embedding_mlp(folder)
    data = folder / "ids400.npz"
    np.savez(data, ids=np.random.default_rng(1).integers(0, 512, (400, 8)).astype(np.int64))
    result = autoq.search(model, data, space=SPACE, trials=2, out=folder / "run", progress=False, recipes="none")
    point = int(result.front.loc[result.front["summary"].str.contains("w4g32"), "point"].iloc[0])
    return folder, data, point


def test_the_torch_interpreter_computes_what_onnx_runtime_does(digits_cnn, digits_npz, tmp_path):
    import onnxruntime as ort

    from autoq.recovery.onnx_torch import OnnxModule

    model = graph.prepare(digits_cnn, tmp_path)
    images = np.load(digits_npz)["image"][:16]
    with torch.no_grad():
        ours = OnnxModule(model.proto, model.layers)(torch.from_numpy(images))[0].numpy()
    theirs = ort.InferenceSession(str(model.path)).run(None, {"image": images})[0]
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_the_interpreter_runs_a_bert_encoder_as_onnx_runtime_does(tmp_path):
    """all-MiniLM-L6-v2's exported graph (LayerNormalization, the attention mask's Where/Expand/Slice/Range, mean
    pooling, ReduceL2) computes in torch what ONNX Runtime computes, on real padded sentences."""
    import onnxruntime as ort

    from autoq.demo import demo_files
    from autoq.recovery.onnx_torch import OnnxModule

    source, data = demo_files()
    model = graph.prepare(source, tmp_path)
    feeds = {name: array[:6] for name, array in np.load(data).items()}
    assert (feeds["attention_mask"] == 0).any()  # padding, so the mask path matters
    with torch.no_grad():
        ours = OnnxModule(model.proto, model.layers)(*(torch.from_numpy(feeds[i.name]) for i in model.inputs))
    theirs = ort.InferenceSession(str(model.path)).run(None, feeds)
    np.testing.assert_allclose(ours[0].numpy(), theirs[0], atol=1e-5)


def test_the_interpreter_runs_a_segmentation_head_as_onnx_runtime_does(tmp_path):
    """A detector-style head (a strided and a padded ConvTranspose, a BatchNormalization after an Add, nearest and
    bilinear Resize, as PaddleOCR's detector has them) computes in torch what ONNX Runtime computes."""
    import onnxruntime as ort

    from autoq.recovery.onnx_torch import OnnxModule

    nn = torch.nn

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.norm = nn.BatchNorm2d(8).eval()
            self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
            self.refine = nn.ConvTranspose2d(4, 2, 3, padding=1)

        def forward(self, x):
            h = self.down(x)
            h = self.norm(h + nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")[..., ::2, ::2])
            h = self.refine(torch.relu(self.up(h)))
            return nn.functional.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False)

    torch.manual_seed(0)
    head = Head().eval()
    head.norm.running_mean.uniform_(-1, 1)
    head.norm.running_var.uniform_(0.5, 2)
    image = torch.randn(2, 3, 16, 16)
    path = tmp_path / "head.onnx"
    torch.onnx.export(head, (image,), str(path), dynamo=False, input_names=["x"], do_constant_folding=False,
                      training=torch.onnx.TrainingMode.PRESERVE, opset_version=13)
    model = graph.prepare(path, tmp_path / "prepared")
    ops = {node.op_type for node in model.proto.graph.node}
    assert {"ConvTranspose", "BatchNormalization", "Resize"} <= ops, ops
    with torch.no_grad():
        ours = OnnxModule(model.proto, model.layers)(image)[0].numpy()
    theirs = ort.InferenceSession(str(model.path)).run(None, {"x": image.numpy()})[0]
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_a_model_with_an_op_the_interpreter_lacks_gets_one_line(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from autoq.recovery.onnx_torch import OnnxModule

    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("Einsum", ["h"], ["y"], equation="ij->ji", name="odd")]
    proto = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, "n"])],
        [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(proto, tmp_path / "odd.onnx")
    model = graph.prepare(tmp_path / "odd.onnx", tmp_path)
    with pytest.raises(AutoqError, match="does not run its Einsum op \\(odd\\) yet") as caught:
        OnnxModule(model.proto, model.layers)
    assert "\n" not in str(caught.value)


def test_finetune_raises_the_4bit_point_and_adds_it_to_the_front(searched):
    """Distilled from FP32 under MatMulNBits' own 4-bit grid, the point gains cosine on the validation split (data
    the training never saw), runs its kernels as assigned, is timed beside its twin and joins the front."""
    folder, data, point = searched
    front = autoq.finetune(folder / "run", point, data, epochs=10, progress=False)
    before = front[front["point"] == point].iloc[0]
    tuned = front.iloc[-1]
    assert tuned["finetuned_from"] == point and tuned["summary"].endswith(f"(fine-tuned from {point})")
    assert tuned["val_quality"] > before["val_quality"] + 0.002 and tuned["quality_before"] == before["val_quality"]
    assert tuned["val_executed_ok"] and tuned["speed_vs_before"].startswith(("0.", "1."))
    saved = pd.read_csv(folder / "run" / "pareto.csv")
    assert len(saved) == len(front) and (folder / "run" / str(tuned["model"])).is_file()
    record = json.loads((folder / "run" / "front" / f"point-{int(tuned['point'])}" / "finetune.json").read_text())
    assert record["search_distance"] < record["search_distance_before"]
    with pytest.raises(AutoqError, match="already fine-tuned"):
        autoq.finetune(folder / "run", int(tuned["point"]), data, epochs=1, progress=False)
    with pytest.raises(AutoqError, match="not the data"):
        autoq.finetune(folder / "run", point, {"ids": np.zeros((8, 8), np.int64)}, epochs=1, progress=False)


def test_an_interrupted_finetune_resumes_from_its_last_epoch(searched, tmp_path, monkeypatch):
    """Stopped after the second epoch (as by Ctrl-C): the state of that epoch is kept; the same call goes on from it
    to the end."""
    import shutil

    from autoq.recovery import finetune as finetune_mod

    folder, data, point = searched
    run = tmp_path / "run"
    shutil.copytree(folder / "run", run)
    shutil.rmtree(run / "finetune", ignore_errors=True)  # the other test's training state
    seen = []

    class Stopped(Exception):
        pass

    class Interrupting(finetune_mod.PhaseProgress):
        def advance(self, done: int) -> None:
            seen.append(done)
            if done == 2 and not resumed:
                raise Stopped

    monkeypatch.setattr(finetune_mod, "PhaseProgress", Interrupting)
    resumed = False
    with pytest.raises(Stopped):
        autoq.finetune(run, point, data, epochs=4, progress=False)
    state = torch.load(run / "finetune" / f"point-{point}" / "state.pt", weights_only=False)
    assert state["state"]["epoch"] == 2
    seen.clear()
    resumed = True
    front = autoq.finetune(run, point, data, epochs=4, progress=False)
    assert seen[0] == 2 and seen[-1] == 4  # went on from epoch 2, not from the start
    record = json.loads((run / "front" / f"point-{int(front['point'].max())}" / "finetune.json").read_text())
    assert record["epochs"] == 4


def test_fine_tuning_simulates_every_tensor_the_built_int8_model_quantizes(digits_cnn, digits_npz, tmp_path):
    """The all-int8 digits CNN in torch, each tensor ORT's build quantizes (the glue's too) rounded on the built grid,
    computes what ORT's int8 kernels compute, closer than rounding only the layers' inputs and far inside the
    quantization error itself."""
    import onnxruntime as ort

    from autoq import data as data_mod
    from autoq.backends import get_backend
    from autoq.calibrate import calibrate
    from autoq.precision import Assignment
    from autoq.recovery.fake_quant import activation_ranges, hooks
    from autoq.recovery.onnx_torch import OnnxModule

    model = graph.prepare(digits_cnn, tmp_path)
    splits = data_mod.split(data_mod.load(digits_npz, "label"))
    calibration = calibrate(model, splits.calibration, tmp_path / "cache")
    backend = get_backend("onnxruntime")
    assignment = Assignment.uniform(model.layer_names, "int8")
    candidate = backend.build(model, assignment, calibration, tmp_path / "build")
    built = backend.quantized_form(candidate).ranges
    assert {model.proto.graph.node[0].input[0]} < set(built)  # the image and the glue between the layers
    images = splits.search.arrays["image"]
    theirs = ort.InferenceSession(str(candidate.path)).run(None, {"image": images})[0]
    fp32 = ort.InferenceSession(str(model.path)).run(None, {"image": images})[0]

    def simulated(tensors):
        module = OnnxModule(model.proto, model.layers)
        ranges = activation_ranges(model, assignment, calibration, tensors, learned=False)
        module.hooks, module.tensor_hooks = hooks(model, assignment, calibration, ranges), ranges.tensor_hooks()
        with torch.no_grad():
            return module(torch.from_numpy(images))[0].numpy()

    every, inputs_only = np.abs(simulated(built) - theirs).mean(), np.abs(simulated(None) - theirs).mean()
    assert every <= inputs_only and every < 0.1 * np.abs(theirs - fp32).mean()
    # ranges put into a copy of the calibration are the ranges ORT then builds with, glue and output included
    moved = {tensor: (0.8 * r.low, 0.7 * r.high) for tensor, r in built.items()}
    rebuilt = backend.quantized_form(backend.build(model, assignment, calibration.with_ranges(
        moved, tmp_path / "moved"), tmp_path / "rebuilt")).ranges
    assert set(rebuilt) == set(moved)
    for tensor, (low, high) in moved.items():  # to the zero point's rounding: one uint8 step
        step = (high - min(low, 0.0)) / 255
        assert abs(rebuilt[tensor].low - min(low, 0.0)) <= step and abs(rebuilt[tensor].high - high) <= step


def test_trained_activation_ranges_are_the_ranges_the_rebuilt_model_runs(digits_run, digits_npz, tmp_path):
    """Fine-tuning a static int8 point trains the ranges of the tensors its build quantizes; the fine-tuned model ORT
    builds quantizes each of them on the trained range (to its uint8 rounding), not on the calibrated one."""
    import shutil

    from onnx import numpy_helper

    from autoq.calibrate import Calibration

    result, source = digits_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    shutil.rmtree(run / "finetune", ignore_errors=True)
    static = result.front[result.front["assignment"].map(
        lambda a: any(p.startswith("int8") and "dyn" not in p for p in json.loads(a)["layers"].values()))]
    point = int(static["point"].iloc[0])
    tuned = autoq.finetune(run, point, digits_npz, labels="label", epochs=3, progress=False).iloc[-1]
    record = json.loads((run / "front" / f"point-{int(tuned['point'])}" / "finetune.json").read_text())
    proto = onnx.load(str(run / str(tuned["model"])))
    stored = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    built = {node.input[0].removesuffix("_QuantizeLinear_Input"): (float(stored[node.input[1]]),
                                                                   int(stored[node.input[2]]))
             for node in proto.graph.node if node.op_type == "QuantizeLinear" and node.input[0] not in stored}
    trained = record["activation_ranges"]
    assert tuned["val_executed_ok"] and trained and set(trained) <= set(built)
    calibrated = Calibration(next((run / "cache").glob("calibration-*-minmax-*[0-9a-f].json"))).ranges()
    for tensor, (low, high) in trained.items():
        scale, zero = built[tensor]
        low, high = min(low, 0.0), max(high, 0.0)
        assert scale == pytest.approx((high - low) / 255, rel=1e-5) and zero == round(-low / scale)
    assert set(trained) <= set(calibrated)
