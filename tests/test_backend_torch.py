from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autoq import data, graph
from autoq.backends import get_backend
from autoq.calibrate import calibrate
from autoq.evaluate import CandidateError, Evaluator
from autoq.metrics import accuracy
from autoq.precision import Assignment
from autoq.torch_input import to_onnx
from tests.backend_contract import BackendContract
from tests.models import DigitsClassifier, train_digits_module

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def digits_module():
    return DigitsClassifier(train_digits_module())


class TestTorch(BackendContract):
    backend_name = "torch"
    low_precision = "bf16"  # the one low precision every module (Conv and Linear) can take
    shrink = 0.6  # bf16 halves the weights; the state dict has some overhead

    @pytest.fixture(scope="class")
    def setup(self, digits_module, digits_npz, tmp_path_factory):
        workdir = tmp_path_factory.mktemp("torch")
        example = (torch.zeros(1, 1, 8, 8),)
        model = graph.prepare(to_onnx(digits_module, example, workdir / "export"), workdir)
        model.module = digits_module
        splits = data.split(data.load(digits_npz, "label"))
        calibration = calibrate(model, splits.calibration, workdir / "cache")
        return get_backend("torch"), model, splits, calibration, workdir

    def run_exported(self, setup, candidate, path: Path, feeds: dict) -> np.ndarray:
        from autoq import apply

        module = apply(setup[1].module, candidate.assignment)
        module.load_state_dict(torch.load(path, weights_only=False))  # packed int8 params are not plain tensors
        with torch.inference_mode():
            return module(torch.from_numpy(feeds["image"])).float().numpy()

    @pytest.mark.parametrize("spec", ["int8-dyn", "int8-dyn-pc"])
    def test_int8_dyn_linear_layers_run_the_quantized_kernel(self, setup, spec):
        """Per-tensor and per-channel weights both run torch.ao's dynamic kernel; executed tells them apart."""
        backend, model, splits = setup[0], setup[1], setup[2]
        linear = [la.name for la in model.layers if la.op_type in ("Gemm", "MatMul")]
        layers = {n: spec if n in linear else "fp32" for n in model.layer_names}
        candidate = self._build(setup, layers, spec)
        run = backend.runner(candidate, 1)
        with torch.profiler.profile() as profile:
            outputs = run({"image": splits.search.arrays["image"]})
        calls = sum(e.count for e in profile.key_averages() if e.key == "quantized::linear_dynamic")
        assert calls == len(linear) == 2  # one quantized kernel call per int8-dyn module, and no other
        assert backend.executed(candidate) == layers
        assert (outputs[0].argmax(1) == splits.search.labels).mean() > 0.9

    def test_int8_dyn_on_a_conv_is_refused_and_not_offered(self, setup):
        from autoq.space import load_space

        backend, model, splits, calibration, workdir = setup
        conv = next(la.name for la in model.layers if la.op_type == "Conv")
        evaluator = Evaluator(backend, model, calibration, splits, accuracy, 1)
        try:
            with pytest.raises(CandidateError, match="int8-dyn needs an nn.Linear"):
                evaluator.build(Assignment({n: "int8-dyn" if n == conv else "fp32" for n in model.layer_names}))
        finally:
            evaluator.close()
        choices = load_space("torch-cpu").choices(model.layers, backend.unbuildable)
        assert "int8-dyn" not in choices[conv] and all("int8-dyn" in choices[n] for n in ("head.6", "head.8"))

    def test_a_pt2_program_is_refused_by_the_torch_backend(self, setup):
        backend, model, _, calibration, workdir = setup
        bare = graph.opened(model.path)
        with pytest.raises(Exception, match="needs an nn.Module"):
            backend.build(bare, Assignment.uniform(bare.layer_names, "fp32"), calibration, workdir / "bare")


def test_torch_recipes_are_quantize_dynamic_and_pt2e_on_every_layer(digits_module, digits_npz, tmp_path):
    """The torch backend's one-line recipes: torch.ao quantize_dynamic on every nn.Linear (eager) and PT2E int8 on
    every layer (compiled); the first builds and its Linears run the dynamic kernel."""
    model = graph.prepare(to_onnx(digits_module, (torch.zeros(1, 1, 8, 8),), tmp_path / "export"), tmp_path)
    model.module = digits_module
    splits = data.split(data.load(digits_npz, "label"))
    calibration = calibrate(model, splits.calibration, tmp_path / "cache")
    backend = get_backend("torch")
    recipes = backend.recipes(model)
    assert [r.label for r in recipes] == ["torch quantize_dynamic, every nn.Linear", "PT2E int8, every layer, compiled"]
    candidate = recipes[0].build(model, calibration, tmp_path / "dynamic")
    assert backend.executed(candidate) == {"features.0": "fp32", "features.3": "fp32", "head.6": "int8-dyn",
                                           "head.8": "int8-dyn"}


def test_hessian_sensitivity_ranks_a_fragile_module_first(digits_module, digits_npz, tmp_path):
    """HAWQ-V2 on the torch module: scale one output channel of head.6 by 1000 (and its input to head.8 by
    1/1000: the network computes the same function). Per-tensor int8 weights then round away head.6's other
    channels and head.8's scaled column: both break, and the Hessian score must rank exactly those two first,
    as the measured drops do."""
    import copy

    import autoq

    fragile = copy.deepcopy(digits_module)
    with torch.no_grad():
        fragile.head[0].weight[3] *= 1000
        fragile.head[0].bias[3] *= 1000
        fragile.head[2].weight[:, 3] /= 1000
    images = np.load(digits_npz)
    data = {"image": images["image"]}
    for module in (digits_module, fragile):
        with torch.inference_mode():  # same function
            np.testing.assert_allclose(module(torch.from_numpy(data["image"][:8])).numpy(),
                                       digits_module(torch.from_numpy(data["image"][:8])).numpy(), atol=1e-3)
    table = autoq.analyse_sensitivity(fragile, (torch.zeros(1, 1, 8, 8),), data, labels=images["label"],
                                      backend="torch", space="torch-cpu", method="hessian", out=tmp_path / "run")
    assert set(table["precision"]) == {"bf16", "int8-dyn", "int8-dyn-pc"} and (table["hessian_trace"] > 0).all()
    measured = autoq.analyse_sensitivity(fragile, (torch.zeros(1, 1, 8, 8),), data, labels=images["label"],
                                         backend="torch", space="torch-cpu", method="measured", out=tmp_path / "run")

    def top2(frame):
        return set(frame.sort_values("score", ascending=False).head(2)[["layer", "precision"]].itertuples(index=False))

    def per_tensor(frame):
        return frame[frame["precision"] != "int8-dyn-pc"]

    assert top2(per_tensor(table)) == top2(per_tensor(measured)) == {("head.6", "int8-dyn"), ("head.8", "int8-dyn")}
    assert measured.set_index(["layer", "precision"]).loc[("head.6", "int8-dyn"), "quality_drop"] > 0.3
    for frame in (table, measured):  # per-channel weights give head.6's big channel its own scale
        scores = frame.set_index(["layer", "precision"])["score"]
        assert scores[("head.6", "int8-dyn-pc")] < scores[("head.6", "int8-dyn")]


class TestTorchCompiled:
    """Static int8 per module through PT2E, compiled by inductor (the space torch-cpu-compiled)."""

    @pytest.fixture(scope="class")
    def compiled(self, digits_module, digits_npz, tmp_path_factory):
        pytest.importorskip("torchao")
        workdir = tmp_path_factory.mktemp("torch-compiled")
        model = graph.prepare(to_onnx(digits_module, (torch.zeros(1, 1, 8, 8),), workdir / "export"), workdir)
        model.module = digits_module
        splits = data.split(data.load(digits_npz, "label"))
        calibration = calibrate(model, splits.calibration, workdir / "cache")
        layers = {"features.0": "int8", "features.3": "fp32", "head.6": "int8", "head.8": "bf16"}
        backend = get_backend("torch")
        candidate = backend.build(model, Assignment(layers, {"compile": True}), calibration, workdir / "mixed")
        return backend, model, splits, calibration, workdir, candidate

    @staticmethod
    def _run_profiled(backend, candidate, splits) -> tuple[np.ndarray, dict[str, int]]:
        """The outputs on the search split, and the kernel calls of one profiled single-sample inference."""
        run = backend.runner(candidate, 1)
        outputs = run({"image": splits.search.arrays["image"]})[0]
        feeds = {"image": splits.search.arrays["image"][:1]}
        run(feeds)
        with torch.profiler.profile() as profile:
            run(feeds)
        return outputs, {e.key: e.count for e in profile.key_averages()}

    def test_int8_modules_run_onednn_int8_kernels_and_the_rest_do_not(self, compiled):
        backend, _, splits, _, _, candidate = compiled
        outputs, counts = self._run_profiled(backend, candidate, splits)
        assert counts.get("onednn::qconv_pointwise") == 1 and counts.get("onednn::qlinear_pointwise") == 1
        assert backend.executed(candidate) == candidate.assignment.layers
        assert (outputs.argmax(1) == splits.search.labels).mean() > 0.9

    def test_int8_stays_compiled_at_every_batch_size_and_thread_count_a_run_feeds(self, compiled):
        """A run calls a candidate at several batch sizes and thread counts, each a compile of its own: past
        dynamo's default 8 per graph it ran the graph uncompiled (every int8 layer in float), and a compile the
        freezing config missed (a new thread count alone) would run without oneDNN's int8 kernels."""
        backend, _, splits, _, _, candidate = compiled
        images, run = splits.search.arrays["image"], backend.runner(candidate, 2)
        for batch in range(1, 10):
            run({"image": images[:batch]})
        assert backend.executed(candidate) == candidate.assignment.layers  # one sample, one thread: a 10th compile

    def test_int8_dyn_pc_compiles_to_onednn_int8_linears_with_run_time_scales(self, compiled):
        """PT2E's dynamic config per module FQN: the two Linears run oneDNN int8 kernels (no calibration
        needed), the graph and the profile agree, and the predictions survive."""
        backend, model, splits, calibration, workdir, _ = compiled
        layers = {"features.0": "fp32", "features.3": "fp32", "head.6": "int8-dyn-pc", "head.8": "int8-dyn-pc"}
        candidate = backend.build(model, Assignment(layers, {"compile": True}), calibration, workdir / "dyn-pc")
        outputs, counts = self._run_profiled(backend, candidate, splits)
        assert counts.get("onednn::qlinear_pointwise") == 2 and not counts.get("onednn::qconv_pointwise")
        assert backend.executed(candidate) == layers
        assert (outputs.argmax(1) == splits.search.labels).mean() > 0.9

    def test_size_counts_the_int8_weights_the_compiled_graph_holds(self, compiled):
        backend, model, _, calibration, workdir, candidate = compiled
        fp32 = backend.build(model, Assignment.uniform(model.layer_names, "fp32", {"compile": True}), calibration,
                             workdir / "fp32")
        assert candidate.size_bytes < 0.6 * fp32.size_bytes  # int8 and bf16 weights, fp32 biases and scales

    def test_each_int8_kind_is_refused_in_the_mode_without_its_kernel(self, compiled):
        backend, model, _, calibration, workdir, _ = compiled
        eager_static = Assignment({n: "int8" if n == "head.6" else "fp32" for n in model.layer_names})
        with pytest.raises(Exception, match="int8 .*only compiled"):
            backend.build(model, eager_static, calibration, workdir / "eager-int8")
        compiled_dynamic = Assignment({n: "int8-dyn" if n == "head.6" else "fp32" for n in model.layer_names},
                                      {"compile": True})
        with pytest.raises(Exception, match="int8-dyn .*only eager"):
            backend.build(model, compiled_dynamic, calibration, workdir / "compiled-dyn")


class _Tagger(torch.nn.Module):
    """An embedding table, then a Linear: the shape of a transformer's first and last layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(50, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, ids):
        return self.head(self.table(ids)).mean(1)


@pytest.mark.parametrize("compiled", [False, True])
def test_an_embedding_tables_executed_precision_is_read_in_fp32_and_bf16(tmp_path, compiled):
    """A table's indices are integers: what the table ran in is its own dtype, fp32 or bf16, eager and compiled
    (where no C++ compiler exists inductor cannot compile, and the compiled case is skipped)."""
    import shutil

    if compiled and shutil.which("g++") is None:
        pytest.skip("inductor needs a C++ compiler (g++) to compile")
    module = _Tagger().eval()
    ids = np.random.default_rng(0).integers(0, 50, (16, 6)).astype(np.int64)
    model = graph.prepare(to_onnx(module, (torch.zeros(1, 6, dtype=torch.int64),), tmp_path / "export"), tmp_path)
    model.module = module
    assert {la.name: la.op_type for la in model.layers} == {"table": "Gather", "head": "MatMul"}
    calibration = calibrate(model, data.split(data.Dataset({"ids": ids})).calibration, tmp_path / "cache")
    backend = get_backend("torch")
    for table in ("fp32", "bf16"):
        layers = {"table": table, "head": "fp32"}
        candidate = backend.build(model, Assignment(layers, {"compile": compiled}), calibration, tmp_path / table)
        backend.runner(candidate, 1)({"ids": ids})
        assert backend.executed(candidate) == layers


@pytest.mark.slow
def test_the_default_torch_search_reaches_compiled_int8_where_a_compiler_exists(digits_module, digits_npz, tmp_path):
    """With a C++ compiler, the default space is the compiled one: the search's uniform int8 baseline is a PT2E
    candidate compiled by inductor whose layers executed in int8 (without one, the eager space and a printed
    reason: the check is skipped with it)."""
    import autoq
    from autoq.backends.torch import cxx_compiler

    backend = get_backend("torch")
    if cxx_compiler() is None:
        assert backend.default_space == "torch-cpu" and "apt-get install g++" in backend.default_space_note
        pytest.skip("no C++ compiler: inductor cannot compile, the eager space is the default")
    assert backend.default_space == "torch-cpu-compiled" and backend.default_space_note is None
    images = np.load(digits_npz)
    result = autoq.search(digits_module, (torch.zeros(1, 1, 8, 8),), {"image": images["image"]},
                          labels=images["label"], backend="torch", trials=4, out=tmp_path / "run", progress=False,
                          recipes="none")
    trials = result.trials
    int8 = trials[trials["summary"] == "int8 x4"]
    assert len(int8) == 1 and int8["executed_ok"].all() and json.loads(int8["assignment"].iloc[0])["options"] == {
        "compile": True}
