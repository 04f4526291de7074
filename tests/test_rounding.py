"""Learned rounding (AdaRound) on a real trained CNN, built by the real ONNX Runtime and OpenVINO backends."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from autoq import data, graph
from autoq.backends import get_backend
from autoq.calibrate import cached_calibration, calibrate
from autoq.errors import AutoqError
from autoq.precision import Assignment, Precision
from autoq.recovery import rounding
from tests.models import digits_data

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def fitted(digits_cnn, tmp_path_factory):
    """The digits CNN, its calibration, and every layer's learned rounding fitted once (the cache filled)."""
    workdir = tmp_path_factory.mktemp("rounding")
    model = graph.prepare(digits_cnn, workdir)
    images, labels = digits_data()  # all of them: a Linear of 512 inputs needs hundreds of calibration samples
    splits = data.split(data.Dataset({"image": images}, labels))
    calibration = calibrate(model, splits.calibration, workdir / "cache")
    spec = Precision.parse("int8-adaround")
    rounding.prepare(model, calibration, [(layer, spec) for layer in model.layers])
    return model, splits, calibration, workdir


def _int8_weights(path, model) -> dict[str, np.ndarray]:
    """Each layer's int8 weights as the built QDQ model stores them, de-quantized."""
    built = onnx.load(str(path))
    stored = {t.name: numpy_helper.to_array(t) for t in built.graph.initializer}
    producer = {out: node for node in built.graph.node for out in node.output}
    nodes = {node.name: node for node in built.graph.node}
    weights = {}
    for layer in model.layers:
        dequantize = producer[nodes[layer.name].input[1]]
        assert dequantize.op_type == "DequantizeLinear"
        q, scale = stored[dequantize.input[0]], stored[dequantize.input[1]]
        shape = [1] * q.ndim
        shape[layer.channel_axis] = -1
        weights[layer.name] = q.astype(np.float32) * scale.reshape(shape)
    return weights


def test_learned_rounding_lowers_each_layers_output_error_on_unseen_data(fitted, tmp_path):
    """In the model built by ONNX Runtime with every layer int8 to nearest, each layer computes closer to FP32 with
    the int8 weights of the learned build than with its own, on search samples the rounding never saw (the layer's
    input as that int8 model gives it, its target FP32's output); the integers ORT stores are the learned ones (its
    own quantizer reproduces them from the cached grid weights)."""
    import torch

    model, splits, calibration, _ = fitted
    backend = get_backend("onnxruntime")
    options = {"bias_correction": False}
    built = {spec: backend.build(model, Assignment.uniform(model.layer_names, spec, options), calibration,
                                 tmp_path / spec) for spec in ("int8", "int8-adaround")}
    rtn_w, learned_w = (_int8_weights(built[spec].path, model) for spec in ("int8", "int8-adaround"))
    nodes = {node.name: node for node in model.proto.graph.node}
    feeds = {k: v[:300] for k, v in splits.search.arrays.items()}
    fp32_inputs = [nodes[name].input[0] for name in model.layer_names]
    fp32 = graph.probe_session(model.proto, fp32_inputs).run(fp32_inputs, feeds)
    quantized = onnx.load(str(built["int8"].path))
    int8_inputs = [next(n.input[0] for n in quantized.graph.node if n.name == name) for name in model.layer_names]
    int8 = graph.probe_session(quantized, int8_inputs).run(int8_inputs, feeds)
    kept = []
    for layer, x, x_int8 in zip(model.layers, fp32, int8, strict=True):
        node = nodes[layer.name]
        forward = rounding._forward(node, graph.weight_array(model.proto, node.input[2]), x.ndim)
        with torch.no_grad():
            target = forward(torch.from_numpy(x), torch.from_numpy(np.array(graph.weight_array(model.proto,
                                                                                              layer.weight))))
            errors = [float(((forward(torch.from_numpy(x_int8), torch.from_numpy(w[layer.name])) - target) ** 2).sum()
                            / (target ** 2).sum()) for w in (rtn_w, learned_w)]
        cached = rounding.load(calibration, layer.name, Precision.parse("int8-adaround"))
        np.testing.assert_allclose(learned_w[layer.name], cached.weight, rtol=1e-5, atol=1e-7)
        if np.allclose(learned_w[layer.name], rtn_w[layer.name]):  # not better on the held-out fifth: kept RTN
            assert cached.learned_error == cached.rtn_error
            continue
        kept.append(layer.name)
        assert errors[1] < errors[0], layer.name
        assert cached.learned_error < rounding.KEEP * cached.rtn_error
    assert len(kept) >= len(model.layers) // 2  # most layers learned something


@pytest.mark.parametrize("text", ["int8-adaround", "int8-mse-adaround", "int8-sym-pct99.9-adaround"])
def test_a_learned_spec_round_trips_and_says_its_rounding(text):
    spec = Precision.parse(text)
    assert str(spec) == text and Precision.parse(str(spec)) == spec
    assert spec.kind == "static" and spec.rounding == "adaround" and rounding.is_learned(spec)
    assert Precision.parse(text.replace("-adaround", "")).rounding == "rtn"
    with pytest.raises(AutoqError, match="static int8 weights are rounded by one of rtn, adaround"):
        Precision.parse("int8-gptq")


def test_a_second_build_reads_the_cache_and_fits_nothing(fitted, tmp_path, monkeypatch):
    model, _, calibration, _ = fitted
    files = sorted((calibration.folder / "rounding").glob("*.npz"))
    assert len(files) == len(model.layers)
    stamps = [f.stat().st_mtime_ns for f in files]

    def refit(*args, **kwargs):
        raise AssertionError("fitted again")

    monkeypatch.setattr(rounding, "fit", refit)
    backend = get_backend("onnxruntime")
    assignment = Assignment({n: "int8-adaround" if i % 2 else "int8" for i, n in enumerate(model.layer_names)})
    candidate = backend.build(model, assignment, calibration, tmp_path / "again")
    assert backend.executed(candidate) == assignment.layers  # the int8 kernel, with the learned weights
    assert [f.stat().st_mtime_ns for f in sorted((calibration.folder / "rounding").glob("*.npz"))] == stamps


def test_openvino_runs_the_learned_weights_in_its_int8_kernels(fitted, tmp_path):
    """OpenVINO quantizes the learned grid weights with NNCF into its own int8 kernels: executed as asked, and the
    predictions of the learned point agree with ORT's build of the same assignment."""
    pytest.importorskip("openvino")
    model, splits, calibration, _ = fitted
    backend = get_backend("openvino")
    assignment = Assignment.uniform(model.layer_names, "int8-adaround", {"inference_precision": "f32"})
    candidate = backend.build(model, assignment, calibration, tmp_path / "ov")
    outputs = backend.runner(candidate, 1)(splits.search.arrays)[0]
    assert backend.executed(candidate) == assignment.layers
    ort = get_backend("onnxruntime")
    built = ort.build(model, Assignment(assignment.layers, {"bias_correction": False}), calibration, tmp_path / "ort")
    reference = ort.runner(built, 1)(splits.search.arrays)[0]
    assert (outputs.argmax(1) == reference.argmax(1)).mean() > 0.97


def test_learned_rounding_of_an_unsupported_layer_is_a_clear_error(fitted):
    model, _, calibration, _ = fitted
    node = next(n for n in model.proto.graph.node if n.op_type == "Conv")
    layer = next(la for la in model.layers if la.name == node.name)
    odd = onnx.helper.make_node("Conv", list(node.input), list(node.output), name=node.name, auto_pad="SAME_UPPER")
    x = np.zeros((2, *[d or 1 for d in model.inputs[0].shape[1:]]), np.float32)
    with pytest.raises(AutoqError, match="auto_pad"):
        rounding.fit(odd, model.proto, layer, x, x, Precision.parse("int8-adaround"))
    assert calibration.samples_file.is_file()


def test_a_quantizer_that_does_not_keep_the_learned_integers_fails_the_build(fitted, tmp_path):
    """7-bit weights (reduce_range) put the learned grid weights on another grid: the build says so instead of
    running round-to-nearest of them under the learned spec's name."""
    model, _, calibration, _ = fitted
    backend = get_backend("onnxruntime")
    assignment = Assignment.uniform(model.layer_names, "int8-adaround", {"reduce_range": True})
    with pytest.raises(AutoqError, match="did not keep the learned integers"):
        backend.build(model, assignment, calibration, tmp_path / "seven-bit")


def test_a_search_offering_learned_rounding_fits_it_once_before_the_trials(digits_cnn, tmp_path):
    """The pass runs before the study (one cache entry per layer), the SQNR sensitivity scores the learned spec
    below round-to-nearest where it lowered a layer's error, and the uniform learned baseline runs as assigned."""
    import autoq

    images, labels = digits_data()
    space = {"default": ["fp32", "int8", "int8-adaround"], "options": {"bias_correction": [False]}}
    result = autoq.search(digits_cnn, {"image": images}, labels=labels, space=space, trials=3, out=tmp_path / "run",
                          progress=False, recipes="none")
    cached = list((tmp_path / "run" / "cache" / "rounding").glob("*.npz"))
    assert len(cached) == 4
    scores = result.sensitivity.set_index(["layer", "precision"])["score"]
    calibration = cached_calibration(tmp_path / "run" / "cache")
    assert calibration is not None
    for name in ("/0/Conv", "/3/Conv"):  # the two convs learn the most (the test above)
        fitted = rounding.load(calibration, name, Precision.parse("int8-adaround"))
        assert fitted.learned_error < fitted.rtn_error and scores[(name, "int8-adaround")] < scores[(name, "int8")]
    learned = result.trials[result.trials["baseline"] == "uniform-int8-adaround"]
    assert len(learned) == 1 and learned["executed_ok"].all()


@pytest.mark.parametrize("learned", ["w4g32-adaround", "w4g32-asym-adaround", "w4g32-gptq", "w4g32-asym-gptq"])
def test_four_bit_learned_rounding_beats_nearest_and_builds_its_integers(learned, tmp_path):
    """4-bit learned rounding (AdaRound, GPTQ) on MatMuls, on the symmetric grid and on the zero-pointed one: each
    layer's fit lowers its held-out output error below round-to-nearest's, ONNX Runtime's MatMulNBits stores the learned
    integers (the build checks them, zero points included) and runs them as asked, the model computes closer to
    FP32 than the round-to-nearest build of the same grid on unseen samples, and a second build fits nothing."""
    from tests.models import embedding_mlp

    source, _ = embedding_mlp(tmp_path)
    np.savez(tmp_path / "ids.npz", ids=np.random.default_rng(1).integers(0, 512, (384, 8)).astype(np.int64))
    model = graph.prepare(source, tmp_path / "run")
    splits = data.split(data.load(tmp_path / "ids.npz", None))
    calibration = calibrate(model, splits.calibration, tmp_path / "cache")
    spec = Precision.parse(learned)
    nearest = str(replace(spec, rounding="rtn"))
    matmuls = [la for la in model.layers if la.op_type == "MatMul"]
    fits = rounding.prepare(model, calibration, [(la, spec) for la in matmuls])
    assert len(fits) == 3 and all(f.learned_error < 0.95 * f.rtn_error for f in fits.values()), fits
    backend = get_backend("onnxruntime")
    feeds = {"ids": splits.validation.arrays["ids"]}
    fp32 = backend.runner(backend.build(model, Assignment({la.name: "fp32" for la in model.layers}), calibration,
                                        tmp_path / "fp32"), 1)(feeds)[0]
    errors = {}
    for precision in (nearest, learned):
        assignment = Assignment({la.name: precision if la in matmuls else "fp32" for la in model.layers})
        built = backend.build(model, assignment, calibration, tmp_path / precision)
        out = backend.runner(built, 1)(feeds)[0]
        assert backend.executed(built) == backend.expected(assignment)
        errors[precision] = float(((out - fp32) ** 2).mean())
    assert errors[learned] < errors[nearest]
    assert rounding.prepare(model, calibration, [(la, spec) for la in matmuls]) == {}  # cached: nothing refitted


@pytest.mark.parametrize("learned", ["w4g32-asym-adaround", "w4g32-asym-gptq"])
def test_zero_pointed_learned_blocks_are_k_quants_blocks_with_learned_integers(learned, tmp_path):
    """`w4g32-asym-adaround` and `-gptq` learn on k-quant's searched grid: the built MatMulNBits stores exactly the
    scales and zero points ORT's k-quant quantizer stores for the same weights (only the rounding differs), and it
    computes closer to FP32 than that k-quant build on unseen samples."""
    from tests.models import two_layer_mlp

    rng = np.random.default_rng(0)  # k-quant packs an even number of blocks: 128 and 64 inputs
    weights = [rng.normal(0, 0.1, shape).astype(np.float32) for shape in ((128, 64), (64, 16))]
    model = graph.prepare(two_layer_mlp(tmp_path / "mlp.onnx", *weights), tmp_path / "run")
    splits = data.split(data.Dataset({"x": rng.normal(0, 1, (512, 128)).astype(np.float32)}))
    calibration = calibrate(model, splits.calibration, tmp_path / "cache")
    backend = get_backend("onnxruntime")
    feeds = {"x": splits.validation.arrays["x"]}
    matmuls = [la.name for la in model.layers if la.op_type == "MatMul"]
    built, errors = {}, {}
    for spec in ("fp32", "w4g32-kquant", learned):
        assignment = Assignment({la.name: spec if la.name in matmuls else "fp32" for la in model.layers})
        candidate = backend.build(model, assignment, calibration, tmp_path / spec)
        assert backend.executed(candidate) == backend.expected(assignment)
        proto = onnx.load(str(candidate.path))
        stored = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        built[spec] = [[stored[name] for name in node.input[1:4]] for node in proto.graph.node
                       if node.op_type == "MatMulNBits"]  # each layer's integers, scales, zero points
        errors[spec] = backend.runner(candidate, 1)(feeds)[0]
    kquant, ours = built["w4g32-kquant"], built[learned]
    assert len(kquant) == len(ours) == len(matmuls)
    for (k_ints, *k_blocks), (l_ints, *l_blocks) in zip(kquant, ours, strict=True):
        for k_values, l_values in zip(k_blocks, l_blocks, strict=True):
            np.testing.assert_array_equal(l_values, k_values)
        assert k_ints.shape == l_ints.shape
    assert any(not np.array_equal(k[0], la[0]) for k, la in zip(kquant, ours, strict=True))  # learned rounding
    fp32 = errors.pop("fp32")
    error = {spec: float(((out - fp32) ** 2).mean()) for spec, out in errors.items()}
    assert error[learned] < error["w4g32-kquant"], error
