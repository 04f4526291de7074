from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autoq.backends import get_backend
from autoq.precision import Assignment
from tests.backend_contract import BackendContract

ov = pytest.importorskip("openvino", reason="the openvino extra is not installed")

NATIVE_BF16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class TestOpenVino(BackendContract):
    backend_name = "openvino"
    low_precision = "int8"

    def run_exported(self, setup, candidate, path: Path, feeds: dict) -> np.ndarray:
        assert path.suffix == ".xml" and path.with_suffix(".bin").is_file()
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return compiled(feeds)[0]

    def test_int8_layers_run_integer_kernels(self, setup):
        """Straight from OpenVINO's runtime model: as many layer kernels run u8/i8 as layers were assigned int8,
        and the rest run f32."""
        backend, model = setup[0], setup[1]
        names = model.layer_names
        for count in (1, len(names) - 1):
            layers = {n: "int8" if i < count else "fp32" for i, n in enumerate(names)}
            candidate = self._build(setup, layers, f"kernels-{count}")
            runtime = backend._compile(candidate, 1).get_runtime_model()
            precisions = [op.get_rt_info()["runtimePrecision"].astype(str) for op in runtime.get_ordered_ops()
                          if op.get_rt_info()["layerType"].astype(str) in ("Convolution", "FullyConnected")]
            assert sorted(precisions) == sorted(["u8"] * count + ["f32"] * (len(names) - count))

    def test_float_precision_option_is_what_the_cpu_can_run(self, setup):
        backend = setup[0]
        offered = backend.options({"inference_precision": ["bf16", "f32"]})
        assert offered["inference_precision"] == (["bf16", "f32"] if NATIVE_BF16 else ["f32"])

    def test_static_shapes_compile_for_one_sample_and_still_run_any_batch(self, setup):
        """`shapes: static` fixes the symbolic batch to the one sample latency is timed at: the runtime model's
        input is static, and a batch runs sample by sample to the same outputs as the dynamic build."""
        backend, model, splits, calibration, workdir = setup
        layers = {n: "int8" if i % 2 else "fp32" for i, n in enumerate(model.layer_names)}
        built = {shapes: backend.build(model, Assignment(layers, {"shapes": shapes}), calibration, workdir / shapes)
                 for shapes in ("static", "dynamic")}
        port = backend._compile(built["static"], 1).inputs[0]
        assert port.get_partial_shape().is_static and list(port.get_shape()) == [1, 1, 8, 8]
        assert not backend._compile(built["dynamic"], 1).inputs[0].get_partial_shape().is_static
        feeds = {k: v[:8] for k, v in splits.search.arrays.items()}
        static, dynamic = backend.runner(built["static"], 1)(feeds)[0], backend.runner(built["dynamic"], 1)(feeds)[0]
        assert static.shape == dynamic.shape == (8, 10)
        assert np.abs(static - dynamic).max() < 0.05 * np.abs(dynamic).max()
        assert backend.executed(built["static"]) == layers

    @pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16: OpenVINO would run f32")
    def test_a_float_layer_under_the_bf16_option_runs_bf16(self, setup):
        backend, model = setup[0], setup[1]
        names = model.layer_names
        layers = {n: ("fp32" if i % 2 == 0 else "int8") for i, n in enumerate(names)}
        candidate = backend.build(model, Assignment(layers, {"inference_precision": "bf16"}), setup[3],
                                  setup[4] / "bf16")
        backend.runner(candidate, 1)
        assert backend.executed(candidate) == backend.expected(candidate.assignment)
        assert "bf16" in backend.executed(candidate).values()


def test_the_registry_knows_openvino():
    assert get_backend("openvino").name == "openvino"


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """A two-layer MLP whose input widths divide into NNCF's int4 groups of 128, with random data."""
    from autoq import data, graph
    from autoq.calibrate import calibrate
    from tests.models import two_layer_mlp

    rng = np.random.default_rng(0)
    workdir = tmp_path_factory.mktemp("mlp")
    two_layer_mlp(workdir / "mlp.onnx", rng.normal(0, 0.05, (256, 256)).astype(np.float32),
                  rng.normal(0, 0.05, (256, 16)).astype(np.float32))
    np.savez(workdir / "x.npz", x=rng.normal(0, 1, (64, 256)).astype(np.float32))
    model = graph.prepare(workdir / "mlp.onnx", workdir / "run")
    splits = data.split(data.load(workdir / "x.npz", None))
    return model, calibrate(model, splits.calibration, workdir / "cache"), workdir


@pytest.mark.parametrize("layers", [{"fc1": "w8", "fc2": "w4g128"}, {"fc1": "w4g128", "fc2": "int8"},
                                    {"fc1": "int8", "fc2": "w8"}])
def test_weight_only_layers_run_compressed_weights(mlp, layers):
    """Read from the runtime model: w8 / w4 weights feed a float kernel, static int8 gets integer activations."""
    model, calibration, workdir = mlp
    backend = get_backend("openvino")
    fp32 = backend.build(model, Assignment({"fc1": "fp32", "fc2": "fp32"}), calibration, workdir / "fp32")
    candidate = backend.build(model, Assignment(layers), calibration, workdir / "-".join(layers.values()))
    x = {"x": np.random.default_rng(1).normal(0, 1, (8, 256)).astype(np.float32)}
    got, want = backend.runner(candidate, 1)(x)[0], backend.runner(fp32, 1)(x)[0]
    assert backend.executed(candidate) == layers
    assert not np.array_equal(got, want) and np.abs(got - want).max() < 0.2 * np.abs(want).max()
    assert candidate.size_bytes < 0.5 * fp32.size_bytes


def test_int4_groups_are_offered_only_where_they_divide_the_inputs(mlp, digits_cnn, tmp_path):
    from autoq import graph

    backend = get_backend("openvino")
    allowed = ["fp32", "int8", "w8", "w4g128"]
    mlp_layers = {la.name: backend.layer_precisions(la, allowed) for la in mlp[0].layers}
    assert mlp_layers == {"fc1": allowed, "fc2": allowed}  # 256 inputs each: groups of 128 fit
    cnn = graph.prepare(digits_cnn, tmp_path)
    offered = {la.op_type: backend.layer_precisions(la, allowed) for la in cnn.layers}
    assert "w4g128" not in offered["Conv"] and "w4g128" not in offered["Gemm"]  # 64-wide inputs
    assert "w8" in offered["Gemm"]


def test_an_unknown_option_or_value_names_what_the_backend_reads():
    from autoq.errors import AutoqError

    backend = get_backend("openvino")
    with pytest.raises(AutoqError, match=r"option 'shapes': unknown value 'fixed'.*allowed: static, dynamic"):
        backend.options({"shapes": ["static", "fixed"]})
    with pytest.raises(AutoqError, match=r"option 'compile' means nothing to the openvino backend.*shapes"):
        backend.options({"compile": [True]})


def test_the_executed_check_finds_weight_only_layers_the_plugin_renamed(tmp_path):
    """With static shapes the CPU plugin folds a LayerNorm into the FullyConnected kernels after it and lists the
    LayerNorm as their original layers instead of the MatMuls (MiniLM's q/k/v and intermediate layers read 'not
    found'): the check also reads each kernel's own name, and finds every layer in its weight type."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from autoq import data, graph
    from autoq.calibrate import calibrate

    rng, width = np.random.default_rng(0), 64
    tensors = [numpy_helper.from_array(rng.uniform(0.5, 1.5, width).astype(np.float32), "gamma"),
               numpy_helper.from_array(rng.normal(0, 0.1, width).astype(np.float32), "beta")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], name="ln", axis=-1)]
    for k in ("q", "k", "v"):
        tensors += [numpy_helper.from_array(rng.normal(0, 0.1, (width, width)).astype(np.float32), f"w{k}"),
                    numpy_helper.from_array(rng.normal(0, 0.1, width).astype(np.float32), f"b{k}")]
        nodes += [helper.make_node("MatMul", ["n", f"w{k}"], [f"m{k}"], name=f"{k}/MatMul"),
                  helper.make_node("Add", [f"m{k}", f"b{k}"], [k], name=f"{k}/Add")]
    nodes += [helper.make_node("Add", ["q", "k"], ["qk"]), helper.make_node("Add", ["qk", "v"], ["y"])]
    proto = helper.make_model(helper.make_graph(
        nodes, "qkv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16, width])], tensors),
        opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(proto, tmp_path / "qkv.onnx")
    model = graph.prepare(tmp_path / "qkv.onnx", tmp_path)
    splits = data.split(data.Dataset({"x": rng.normal(0, 1, (32, 16, width)).astype(np.float32)}))
    calibration = calibrate(model, splits.calibration, tmp_path / "cache")
    backend = get_backend("openvino")
    assignment = Assignment({name: "w8" for name in model.layer_names}, {"inference_precision": "f32",
                                                                         "shapes": "static"})
    candidate = backend.build(model, assignment, calibration, tmp_path / "static")
    kernels = [op for op in backend._any_compiled(candidate).get_runtime_model().get_ordered_ops()
               if op.get_rt_info()["layerType"].astype(str) == "FullyConnected"]
    listed = [set(op.get_rt_info()["originalLayersNames"].astype(str).split(",")) for op in kernels]
    assert len(kernels) == 3 and not any({"q/Add", "k/Add", "v/Add"} & names for names in listed)  # renamed
    assert backend.executed(candidate) == assignment.layers


def _se_block(path: Path) -> Path:
    """conv1 -> ReLU -> squeeze-and-excitation (pool, 1x1 conv, ReLU, 1x1 conv, Sigmoid, Mul) -> conv2."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    shapes = {"w1": (16, 3, 3, 3), "ws1": (4, 16, 1, 1), "ws2": (16, 4, 1, 1), "w2": (16, 16, 3, 3)}
    weights = [numpy_helper.from_array(rng.normal(0, 0.3, s).astype(np.float32), n) for n, s in shapes.items()]
    weights += [numpy_helper.from_array(rng.normal(0, 0.1, s[0]).astype(np.float32), f"b{n}")
                for n, s in shapes.items()]
    nodes = [helper.make_node("Conv", ["x", "w1", "bw1"], ["c1"], "conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
             helper.make_node("GlobalAveragePool", ["r1"], ["g"], "pool"),
             helper.make_node("Conv", ["g", "ws1", "bws1"], ["s1"], "se_reduce"),
             helper.make_node("Relu", ["s1"], ["sr"], "se_relu"),
             helper.make_node("Conv", ["sr", "ws2", "bws2"], ["s2"], "se_expand"),
             helper.make_node("Sigmoid", ["s2"], ["gate"], "se_gate"),
             helper.make_node("Mul", ["r1", "gate"], ["m"], "se_scale"),
             helper.make_node("Conv", ["m", "w2", "bw2"], ["y"], "conv2", pads=[1] * 4)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, 16, 16])
    save(helper.make_model(helper.make_graph(nodes, "se", [x], [y], weights),
                           opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_int8_is_not_offered_on_layers_nncf_leaves_float(tmp_path, capsys):
    """NNCF leaves a squeeze-and-excitation block's convolutions float whatever is asked: one probe build finds
    them, the search never offers them int8 (so no point is flagged `executed: NO`), and says so in one line."""
    from autoq.problem import open_problem
    from autoq.settings import RunSettings

    model = _se_block(tmp_path / "se.onnx")
    data = {"x": np.random.default_rng(1).normal(0, 1, (48, 3, 16, 16)).astype(np.float32)}
    settings = RunSettings(backend="openvino", out=str(tmp_path / "run"), space="openvino-cpu", progress=True)
    with open_problem(model, data, None, settings, searching=True) as problem:
        choices = problem.choices
        assert [n for n, c in choices.items() if "int8" in c] == ["conv1", "conv2"]
        asked = {n: c[-1] for n, c in choices.items()}
        evaluator = problem.evaluator
        assert evaluator.backend.executed(evaluator.build(Assignment(asked))) == asked
    said = [line for line in capsys.readouterr().err.splitlines() if "not offered" in line]
    assert len(said) == 1 and "se_expand, se_reduce" in said[0]
    assert len(list((tmp_path / "run" / "cache").glob("probe-*.json"))) == 1  # found once, read on a resume
