from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from autoq.backends import get_backend
from autoq.precision import Assignment
from tests.backend_contract import BackendContract

NATIVE_BF16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class TestOpenVino(BackendContract):
    backend_name = "openvino"
    low_precision = "int8"

    @staticmethod
    def run_exported(path: Path, feeds: dict) -> np.ndarray:
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
