from __future__ import annotations

import onnx
import pytest

from tests.backend_contract import BackendContract


class TestOnnxRuntime(BackendContract):
    backend_name = "onnxruntime"
    low_precision = "int8"

    def test_unfused_qdq_is_reported_as_fp32(self, setup):
        """A layer whose QDQ pair ORT cannot fuse runs fp32 between Q/DQ: it must not count as int8."""
        backend, model = setup[0], setup[1]
        layers = {n: "int8" for n in model.layer_names}
        candidate = self._build(setup, layers, "unfusable")
        proto = onnx.load(str(candidate.path))
        first = model.layers[0]
        # Feed the first layer its float activation instead of the Q/DQ pair: what remains is a weight
        # DequantizeLinear in front of a float Conv, which ORT cannot fuse into an integer kernel.
        producers = {out: node for node in proto.graph.node for out in node.output}
        layer = next(n for n in proto.graph.node if n.name == first.name)
        dequantize = producers[layer.input[0]]
        assert dequantize.op_type == "DequantizeLinear"
        layer.input[0] = producers[dequantize.input[0]].input[0]
        onnx.save(proto, str(candidate.path))
        candidate.path.with_name("optimized.onnx").unlink(missing_ok=True)
        backend.runner(candidate, 1)
        executed = backend.executed(candidate)
        assert executed[first.name] == "fp32"
        assert all(executed[n] == "int8" for n in model.layer_names[1:])

    def test_dynamic_int8_is_offered_on_matmul_only(self, setup):
        backend, model = setup[0], setup[1]
        for layer in model.layers:  # the digits CNN: Conv and Gemm (ORT's dynamic quantizer has no Gemm)
            assert backend.layer_precisions(layer, ["fp32", "int8", "int8-dyn"]) == ["fp32", "int8"]

    def test_bias_correction_removes_the_mean_shift_of_int8_layers(self, setup):
        """`bias_correction: true` changes only the biases of the static int8 Conv/Gemm layers, keeps every layer's
        integer kernel, and brings the mean of the model's outputs on the calibration samples closer to FP32's."""
        import numpy as np
        import onnxruntime as ort
        from onnx import numpy_helper

        from autoq.precision import Assignment

        backend, model, _, calibration, workdir = setup
        layers = {n: "int8" for n in model.layer_names}
        plain = self._build(setup, layers, "bias-plain")
        corrected = backend.build(model, Assignment(layers, {"bias_correction": True}), calibration,
                                  workdir / "bias-corrected")
        backend.runner(corrected, 1)
        assert backend.executed(corrected) == layers
        tensors = [{t.name: numpy_helper.to_array(t) for t in onnx.load(str(c.path)).graph.initializer}
                   for c in (plain, corrected)]
        changed = sorted(n for n in tensors[0] if not np.array_equal(tensors[0][n], tensors[1][n]))
        biases = {node.input[2] for node in model.proto.graph.node if node.name in layers and len(node.input) > 2}
        assert changed and all(n.removesuffix("_quantized") in biases for n in changed)
        samples = calibration.samples()

        def mean_output(path) -> np.ndarray:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            return session.run(None, samples)[0].mean(axis=0)

        want = mean_output(model.path)
        shift = [np.abs(mean_output(c.path) - want).mean() for c in (plain, corrected)]
        assert shift[1] < shift[0]


def test_smooth_quant_moves_outlier_channels_into_the_weights(tmp_path):
    """An input channel 50x larger than the rest takes the whole int8 range of a per-tensor dynamic scale.
    `int8-dyn-pc-sq0.7` scales it down in front of the layer and the weight rows up: the float function is
    unchanged, the layers still run DynamicQuantizeMatMul behind the smoothing (the executed check reads it
    back), and the error against FP32 drops. A layer left unsmoothed reads the original input."""
    import numpy as np
    import onnxruntime as ort

    from autoq import data, graph
    from autoq.backends import get_backend
    from autoq.backends.onnxruntime.smooth import smooth
    from autoq.calibrate import calibrate
    from autoq.precision import Assignment
    from tests.models import two_layer_mlp

    rng = np.random.default_rng(0)
    two_layer_mlp(tmp_path / "mlp.onnx", rng.normal(0, 0.2, (64, 64)).astype(np.float32),
                  rng.normal(0, 0.2, (64, 8)).astype(np.float32))
    x = rng.normal(0, 1, (96, 64)).astype(np.float32)
    x[:, 3] *= 50
    np.savez(tmp_path / "x.npz", x=x)
    model = graph.prepare(tmp_path / "mlp.onnx", tmp_path / "run")
    splits = data.split(data.load(tmp_path / "x.npz", None))
    calibration = calibrate(model, splits.calibration, tmp_path / "cache")
    feeds = {"x": splits.validation.arrays["x"]}

    def run(path) -> np.ndarray:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    want = run(model.path)
    smoothed = tmp_path / "smoothed.onnx"
    smoothed.write_bytes(model.path.read_bytes())
    smooth(smoothed, model, {"fc1": 0.7, "fc2": 0.5}, calibration)
    assert np.allclose(run(smoothed), want, rtol=1e-4, atol=1e-4)  # the float function is unchanged
    backend = get_backend("onnxruntime")
    errors = {}
    for first in ("int8-dyn-pc", "int8-dyn-pc-sq0.7"):
        layers = {"fc1": first, "fc2": "int8-dyn-pc"}
        candidate = backend.build(model, Assignment(layers), calibration, tmp_path / first)
        backend.runner(candidate, 1)
        assert backend.executed(candidate) == layers
        errors[first] = float(np.abs(run(candidate.path) - want).mean())
    assert errors["int8-dyn-pc-sq0.7"] < 0.7 * errors["int8-dyn-pc"]  # measured: 0.085 against 0.169


def test_a_smoothing_mul_is_charged_to_the_layers_it_feeds():
    """The per-layer profile (what the greedy seeds weigh savings by) charges a smoothing Mul to the layers that
    read the tensor it smooths, shared equally (in the savings profile every one of them is smoothed)."""
    from onnx import helper

    from autoq.backends.onnxruntime.graph import attribute_profile
    from autoq.regions import Regions

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                               helper.make_node("MatMul", ["r", "w1"], ["a"], name="q"),
                               helper.make_node("MatMul", ["r", "w2"], ["b"], name="k"),
                               helper.make_node("MatMul", ["r", "w3"], ["c"], name="v")], "g", [], [])
    per_node = {"q_quant": 1.0, "k_quant": 1.0, "v_quant": 1.0, "r_smoothed0.7_mul": 0.4}
    charged = attribute_profile(graph, Regions({}, {}), per_node, ["q", "k", "v"])
    assert charged == pytest.approx({"q": 1.0 + 0.4 / 3, "k": 1.0 + 0.4 / 3, "v": 1.0 + 0.4 / 3})
