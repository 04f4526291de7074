from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from autoq import graph
from autoq.errors import AutoqError


def test_finds_the_cnn_layers_with_params_and_macs(digits_cnn, tmp_path):
    model = graph.prepare(digits_cnn, tmp_path)
    assert [(layer.op_type, layer.weight_shape) for layer in model.layers] == [
        ("Conv", (16, 1, 3, 3)), ("Conv", (32, 16, 3, 3)), ("Gemm", (64, 512)), ("Gemm", (10, 64))]
    conv1, conv2, fc1, fc2 = model.layers
    assert conv1.params == 16 * 9 + 16
    assert conv1.macs == 16 * 8 * 8 * 9  # out elements (batch 1) x (Cin * kh * kw)
    assert conv2.macs == 32 * 4 * 4 * 16 * 9
    assert fc1.macs == 64 * 512 and fc2.macs == 10 * 64
    assert model.inputs[0].name == "image" and model.inputs[0].shape == (None, 1, 8, 8)


def _matmul_model(opset: int, weight_as_constant: bool) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]  # no node name, as some exporters write
    initializers = [weight]
    if weight_as_constant:
        nodes.insert(0, helper.make_node("Constant", [], ["w"], value=weight))
        initializers = []
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3])], initializers)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_normalises_constant_weights_old_opsets_and_missing_names(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_matmul_model(opset=12, weight_as_constant=True), str(path))
    model = graph.prepare(path, tmp_path / "run")
    assert model.proto.opset_import[0].version >= 13
    assert [layer.weight for layer in model.layers] == ["w"]
    assert model.layers[0].name  # every node gets a unique name
    assert not any(n.op_type == "Constant" for n in model.proto.graph.node)


def test_external_data_models_load(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(_matmul_model(17, False), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)
    assert (tmp_path / "ext.data").is_file()
    assert len(graph.prepare(path, tmp_path / "run").layers) == 1


def test_model_without_layers_is_a_clear_error(tmp_path):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(AutoqError, match="no quantizable layers"):
        graph.prepare(path, tmp_path / "run")


@pytest.mark.parametrize("content", [b"", b"not a model at all \x00\x01", b"\x08\x07" * 50])
def test_corrupt_files_are_clear_errors(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(AutoqError, match="bad.onnx"):
        graph.prepare(path, tmp_path / "run")


@pytest.mark.parametrize(("op", "loads"), [("SimplifiedLayerNormalization", True), ("NoSuchOp", False)])
def test_onnx_runtime_ops_pass_the_check_unknown_ops_do_not(tmp_path, op, loads):
    """Exported language models use ONNX Runtime's own ops in the default domain (unknown to the ONNX checker):
    a model ONNX Runtime loads is accepted; an op nobody knows is still a one-line error."""
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    scale = numpy_helper.from_array(np.ones(4, np.float32), "s")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node(op, ["h", "s"], ["y"], name="norm", axis=-1, epsilon=1e-5)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])], [weight, scale])
    path = tmp_path / "contrib.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    if loads:
        assert [layer.name for layer in graph.prepare(path, tmp_path / "run").layers] == ["fc"]
    else:
        with pytest.raises(AutoqError, match="fails the ONNX checker: No Op registered for NoSuchOp"):
            graph.prepare(path, tmp_path / "run")
