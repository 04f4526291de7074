"""A tiny ONNX model and data for the install checks, from onnx and numpy alone (the core dependencies): a
least-squares linear classifier on random clusters, behind a hidden MatMul+Relu layer."""

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
centres = rng.normal(0, 1, (4, 32))
labels = rng.integers(0, 4, 256)
x = (centres[labels] + rng.normal(0, 0.5, (256, 32))).astype(np.float32)
w1 = rng.normal(0, 0.3, (32, 64)).astype(np.float32)
hidden = np.maximum(x @ w1, 0)
w2 = np.linalg.lstsq(hidden, np.eye(4)[labels], rcond=None)[0].astype(np.float32)
nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), out / "tiny.onnx")
np.savez(out / "tiny.npz", x=x, label=labels)
