"""Every precision spec each backend offers builds, runs, and passes the executed check on a small model with an
embedding table and MatMuls; a spec a backend cannot build for a layer is never offered."""

from __future__ import annotations

import numpy as np
import pytest

from autoq import data, graph
from autoq.backends import get_backend
from autoq.calibrate import calibrate
from autoq.precision import Assignment, Precision, calibrations
from tests.models import embedding_mlp

ORT_SPECS = ["int8", "int8-sym", "int8-entropy", "int8-mse", "int8-pct99.9", "int8-dyn", "int8-dyn-pc",
             "int8-dyn-pc-sq0.7", "w8g32", "w8g128-acc4", "w4g32", "w4g32-asym-acc4", "w4g64-hqq", "w4g32-gptq",
             "w4g32-kquant-acc4", "w8g32-kquant", "w2g32", "w2g32-acc4"]
OV_SPECS = ["int8", "w8", "w8-asym", "w4g32", "w4g128-asym", "w4g32-se", "w4g32-gptq", "w4g32-awq"]
OV_FORMATS = ["w3g32", "w2g32", "nf4g32", "nf4", "cb4g32", "km4g32", "fp8g32", "fp4g32"]  # built where the plugin's
# kernels read them as stored (`stored_weight_type`): each machine says which


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("specs")
    source, samples = embedding_mlp(workdir)
    model = graph.prepare(source, workdir / "run")
    splits = data.split(data.load(samples, None))
    choices = {layer.name: ORT_SPECS for layer in model.layers}
    return model, calibrate(model, splits.calibration, workdir / "cache", calibrations(choices)), splits, workdir


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def _check(backend_name: str, spec: str, small) -> None:
    model, calibration, splits, workdir = small
    backend = get_backend(backend_name)
    assert backend.unbuildable(Precision.parse(spec)) is None
    layers = {la.name: spec if spec in backend.layer_precisions(la, ["fp32", spec]) else "fp32"
              for la in model.layers}
    assert sum(p == spec for p in layers.values()) >= 2, layers  # the spec really is offered to layers
    fp32 = backend.build(model, Assignment.uniform(model.layer_names, "fp32"), calibration, workdir / backend_name)
    candidate = backend.build(model, Assignment(layers), calibration, workdir / f"{backend_name}-{spec}")
    feeds = {"ids": splits.search.arrays["ids"]}
    got, want = backend.runner(candidate, 1)(feeds)[0], backend.runner(fp32, 1)(feeds)[0]
    assert backend.executed(candidate) == backend.expected(Assignment(layers))
    parsed = Precision.parse(spec)
    assert not np.array_equal(got, want) and _cosine(got, want) > (0.75 if parsed.bits == 2 else 0.9)  # 2-bit: 3 levels
    if parsed.kind == "weight-only":  # at least 60% (fp8: 45%) of the chosen weights' fp32 bytes saved
        params = sum(la.params for la in model.layers if layers[la.name] == spec)
        assert candidate.size_bytes < fp32.size_bytes - (0.45 if parsed.bits == 8 and parsed.element == "fp" else
                                                         0.6) * 4 * params


@pytest.mark.parametrize("spec", ORT_SPECS)
def test_every_onnxruntime_spec_builds_runs_and_executes_as_asked(small, spec):
    _check("onnxruntime", spec, small)


@pytest.mark.parametrize("spec", OV_SPECS)
def test_every_openvino_spec_builds_runs_and_executes_as_asked(small, spec):
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    _check("openvino", spec, small)


@pytest.mark.parametrize("spec", OV_FORMATS)
def test_openvino_weight_formats_build_where_a_kernel_runs_them(small, spec):
    """NF4, NNCF's codebook, float8/float4 and 3/2-bit weights: offered only where the CPU plugin's matmul reads the
    weights as stored (probed on this machine), then built, run and executed as asked; elsewhere refused in one
    line naming the type the plugin decompresses them to. ONNX Runtime stores none of the non-integer formats."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from autoq.backends.openvino.nncf_build import WEIGHT_LABELS, stored_weight_type

    backend, precision = get_backend("openvino"), Precision.parse(spec)
    runs = WEIGHT_LABELS.get(stored_weight_type(precision)) == precision.weight_label
    assert backend.unbuildable(precision) is None
    reason = backend.lacks(precision)
    if not runs:
        assert reason is not None and "decompresses" in reason and "\n" not in reason
        pytest.skip(f"this CPU's plugin does not run {spec} as stored: {reason}")
    assert reason is None
    _check("openvino", spec, small)
    if precision.element != "int":
        assert "does not store" in get_backend("onnxruntime").unbuildable(precision)


@pytest.mark.parametrize("spec", ["w2g32", "w3g32", "nf4g32", "cb4g32", "km4g32", "km4", "fp8g32", "fp4g32", "w4g32"])
def test_the_simulated_rounding_is_what_nncf_stores(spec):
    """The sensitivity's numpy rounding of each weight format equals the weights NNCF compresses and OpenVINO
    decompresses (read back through an identity input): the integers exactly (MatMulNBits' and NNCF's signed grid),
    the codebooks to their f16 scales' precision."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    import io
    from contextlib import redirect_stderr, redirect_stdout

    import nncf
    import openvino as ov
    from openvino import opset13 as ops

    from autoq.backends.openvino.nncf_build import _mode_arguments
    from autoq.quantsim import kmeans_codebook, noise_ratio, round_weight

    weight = np.random.default_rng(0).normal(0, 0.1, (64, 96)).astype(np.float32)  # (inputs, outputs)
    x = ops.parameter([64, 64], np.float32, name="x")
    model = ov.Model([ops.matmul(x, ops.constant(weight), False, False)], [x])
    precision = Precision.parse(spec)
    codebook = kmeans_codebook(weight, 1, precision.group) if precision.element == "km" else None
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        compressed = nncf.compress_weights(model, **_mode_arguments(precision, codebook))
    compiled = ov.Core().compile_model(compressed, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    stored = compiled(np.eye(64, dtype=np.float32))[0]
    simulated = round_weight(weight, 1, Precision.parse(spec))  # groups along the inputs of each output channel
    share = 0.1 if spec.startswith("fp8") else 0.05 if spec.startswith("km") else 0.02  # OpenVINO's E4M3
    # conversion rounds ~0.4% of values otherwise; a fitted codebook's midpoints lie where the values are dense,
    # so the f16 scales' rounding moves more of them to the next value
    assert noise_ratio(stored, simulated, 1) < share * noise_ratio(weight, simulated, 1), spec


def test_a_k_means_codebook_fits_the_layer_better_than_a_fixed_one():
    """`km4`'s 16 values, fitted by k-means to a layer's own normalised weights (heavy-tailed here, as trained
    weights are), lose less of it than NormalFloat4's and NNCF's CB4 fixed values at the same bits and blocks,
    and they differ from layer to layer."""
    from autoq.quantsim import kmeans_codebook, noise_ratio, round_weight

    rng = np.random.default_rng(0)
    heavy, light = rng.standard_t(3, (256, 128)).astype(np.float32), rng.uniform(-1, 1, (256, 128)).astype(np.float32)
    for weight in (heavy, light):
        noise = {spec: noise_ratio(weight, round_weight(weight, 1, Precision.parse(spec)), 1)
                 for spec in ("km4g32", "nf4g32", "cb4g32")}
        assert noise["km4g32"] < min(noise["nf4g32"], noise["cb4g32"]), noise
    assert not np.allclose(kmeans_codebook(heavy, 1, 32), kmeans_codebook(light, 1, 32), atol=0.05)


@pytest.mark.parametrize("backend_name", ["onnxruntime", "openvino"])
def test_groups_are_offered_where_the_backend_builds_them(small, backend_name):
    """NNCF's groups must tile a layer's inputs; ORT's MatMulNBits pads the last block (its k-quant packer needs an
    even number of 4-bit blocks); an embedding table takes groups along its columns on both."""
    model = small[0]
    backend = get_backend(backend_name)
    menu = ["fp32", "w4g32", "w4g128", "int8-dyn", "w4g32-kquant"]
    offered = {la.name: backend.layer_precisions(la, menu) for la in model.layers}
    assert "w4g128" in offered["fc1"] and "w4g128" in offered["fc2"]  # 256 inputs
    assert ("w4g128" in offered["fc3"]) == (backend_name == "onnxruntime") and "w4g32" in offered["fc3"]  # 96
    if backend_name == "onnxruntime":
        assert "w4g32-kquant" in offered["fc1"] and "w4g32-kquant" not in offered["fc3"]  # 8 blocks; 3 blocks
    assert "int8-dyn" not in offered["embed"]
    assert "w4g128" in offered["embed"]  # 256 columns: GatherBlockQuantized on ORT, NNCF's compressed Gather
    if backend_name == "onnxruntime":  # asymmetric 4-bit zero points: no GatherBlockQuantized reads them
        assert "w4g32-kquant" not in offered["embed"]


def test_openvino_activation_symmetry_and_smooth_quant_are_model_wide_options(small):
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    model, calibration, splits, workdir = small
    backend = get_backend("openvino")
    layers = {la.name: "int8" if la.op_type == "MatMul" else "fp32" for la in model.layers}
    feeds = {"ids": splits.search.arrays["ids"]}
    outputs = {}
    for options in ({"activations": "asym"}, {"activations": "sym"}, {"activations": "sym", "smooth_quant": "off"}):
        assignment = Assignment(layers, options)
        candidate = backend.build(model, assignment, calibration, workdir / ("ov-" + "-".join(options.values())))
        assert backend.executed(candidate) == backend.expected(assignment)
        outputs[tuple(options.values())] = backend.runner(candidate, 1)(feeds)[0]
    assert not np.array_equal(outputs[("asym",)], outputs[("sym",)])  # the preset really changes the quantizers


@pytest.mark.parametrize("spec", ["w4g32", "w8g32-acc4", "int8-dyn-pc"])
def test_profiled_latency_reaches_weight_only_and_dynamic_kernels(small, spec):
    """ORT names weight-only kernels `<node>_Q4` / `_Q8`: every layer's time is still found in the profile."""
    model, calibration, splits, workdir = small
    backend = get_backend("onnxruntime")
    layers = {la.name: spec if spec in backend.layer_precisions(la, [spec]) else "fp32" for la in model.layers}
    candidate = backend.build(model, Assignment(layers), calibration, workdir / f"profile-{spec}")
    times = backend.layer_latency(candidate, {"ids": splits.search.arrays["ids"][:1]}, 1, runs=5)
    assert set(times) == set(model.layer_names)
    assert all(times[name] > 0 for name, p in layers.items() if p == spec)
