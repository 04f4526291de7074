"""The shared backend test suite: subclass `BackendContract` per backend (as Optuna's storage tests do)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from autoq import data, graph
from autoq.backends import get_backend
from autoq.calibrate import Calibration, calibrate
from autoq.errors import AutoqError
from autoq.precision import Assignment, Precision


class BackendContract:
    backend_name: str
    low_precision: str  # a precision with real low-precision kernels on this backend, for every layer
    shrink = 0.5  # the low-precision model is smaller than this fraction of the FP32 one

    @pytest.fixture(scope="class")
    def setup(self, digits_cnn, digits_npz, tmp_path_factory):
        workdir = tmp_path_factory.mktemp(self.backend_name)
        model = graph.prepare(digits_cnn, workdir)
        dataset = data.load(digits_npz, "label")
        splits = data.split(dataset)
        calibration = calibrate(model, splits.calibration, workdir / "cache")
        return get_backend(self.backend_name), model, splits, calibration, workdir

    @pytest.fixture(scope="class")
    def matmul_setup(self, tmp_path_factory):
        """A token-embedding MLP: an embedding table (Gather) and MatMul layers, as transformers have them."""
        from tests.models import embedding_mlp

        workdir = tmp_path_factory.mktemp(f"{self.backend_name}-matmul")
        source, samples = embedding_mlp(workdir)
        model = graph.prepare(source, workdir / "run")
        splits = data.split(data.load(samples, None))
        calibration = calibrate(model, splits.calibration, workdir / "cache")
        return get_backend(self.backend_name), model, splits, calibration, workdir

    def run_exported(self, setup, candidate, path: Path, feeds: dict) -> np.ndarray:
        """Run an exported model file with its own runtime, as a user would."""
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, feeds)[0]

    def _build(self, setup, layers: dict[str, str], name: str):
        backend, model, _, calibration, workdir = setup
        return backend.build(model, Assignment(layers), calibration, workdir / name)

    def test_declares_what_it_builds(self, setup):
        assert setup[0].unbuildable(Precision.parse("fp32")) is None
        assert setup[0].unbuildable(Precision.parse(self.low_precision)) is None

    def test_uniform_low_precision_executes_low_precision(self, setup):
        backend, model = setup[0], setup[1]
        candidate = self._build(setup, {n: self.low_precision for n in model.layer_names}, "all-low")
        backend.runner(candidate, 1)
        assert backend.executed(candidate) == {n: self.low_precision for n in model.layer_names}

    def test_mixed_assignment_executes_as_asked(self, setup):
        backend, model = setup[0], setup[1]
        names = model.layer_names
        asked = {n: ("fp32" if i % 2 == 0 else self.low_precision) for i, n in enumerate(names)}
        candidate = self._build(setup, asked, "mixed")
        backend.runner(candidate, 1)
        assert backend.executed(candidate) == asked

    def test_fp32_matches_the_source_model(self, setup):
        backend, model, splits = setup[0], setup[1], setup[2]
        candidate = self._build(setup, {n: "fp32" for n in model.layer_names}, "fp32")
        feeds = {"image": splits.search.arrays["image"]}
        expected = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        got = backend.runner(candidate, 2)(feeds)[0]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        assert set(backend.executed(candidate).values()) == {"fp32"}

    def test_low_precision_keeps_accuracy_and_shrinks(self, setup):
        backend, model, splits = setup[0], setup[1], setup[2]
        fp32 = self._build(setup, {n: "fp32" for n in model.layer_names}, "fp32-size")
        low = self._build(setup, {n: self.low_precision for n in model.layer_names}, "low-size")
        feeds = {"image": splits.search.arrays["image"]}
        outputs = [backend.runner(c, 2)(feeds)[0] for c in (fp32, low)]
        accuracy = [(o.argmax(1) == splits.search.labels).mean() for o in outputs]
        assert accuracy[1] >= accuracy[0] - 0.03
        assert not np.allclose(outputs[0], outputs[1])  # it really changed the arithmetic
        assert low.size_bytes < self.shrink * fp32.size_bytes

    def test_export_writes_a_runnable_model(self, setup, tmp_path):
        backend, model, splits = setup[0], setup[1], setup[2]
        candidate = self._build(setup, {n: self.low_precision for n in model.layer_names}, "export")
        path = backend.export(candidate, tmp_path / "exported" / "model.onnx")
        feeds = {"image": splits.search.arrays["image"][:4]}
        np.testing.assert_allclose(self.run_exported(setup, candidate, path, feeds),
                                   backend.runner(candidate, 1)(feeds)[0], atol=1e-5)

    def test_build_is_fast_and_reuses_calibration(self, setup):
        """Building must not re-calibrate: the cache file is the only source of ranges."""
        backend, model, _, calibration, workdir = setup
        files = sorted(p for p in calibration.folder.iterdir() if p.name.startswith("calibration-"))
        before = {p: p.stat().st_mtime_ns for p in files}
        self._build(setup, {n: self.low_precision for n in model.layer_names}, "again")
        assert {p: p.stat().st_mtime_ns for p in files} == before  # no range or sample file rewritten
        assert isinstance(calibration, Calibration) and calibration.ranges() and calibration.samples()

    def test_options_it_does_not_read_are_one_line_errors(self, setup):
        """Every option value it declares is accepted (a machine may drop one it cannot run); an unknown option or
        value names what it knows."""
        backend = setup[0]
        declared = {key: list(values) for key, values in backend.option_values.items()}
        kept = backend.options(declared)
        assert set(kept) == set(declared) and all(set(kept[k]) <= set(declared[k]) and kept[k] for k in kept)
        with pytest.raises(AutoqError, match=f"means nothing to the {backend.name} backend"):
            backend.options({"no_such_option": [1]})
        for key, values in declared.items():
            with pytest.raises(AutoqError, match="unknown value"):
                backend.options({key: [*values, "no-such-value"]})

    def test_the_deployed_runner_computes_what_the_search_runner_does(self, setup):
        """Deployment settings (threads spinning, streams) change the speed, not the outputs."""
        backend, model, splits = setup[0], setup[1], setup[2]
        candidate = self._build(setup, {n: self.low_precision for n in model.layer_names}, "deployed")
        feeds = {k: v[:8] for k, v in splits.validation.arrays.items()}
        searched = backend.runner(candidate, 1)(feeds)[0]
        deployed = backend.deployed_runner(candidate, 1)(feeds)[0]
        np.testing.assert_allclose(deployed, searched, rtol=1e-3, atol=1e-3 * float(np.abs(searched).max()))

    def test_layer_latency_covers_every_layer(self, setup):
        """The per-layer profile (or None where the runtime has none from Python) names every layer, with time
        spent in the layers that run."""
        backend, model, splits = setup[0], setup[1], setup[2]
        candidate = self._build(setup, {n: self.low_precision for n in model.layer_names}, "profiled")
        times = backend.layer_latency(candidate, {k: v[:1] for k, v in splits.search.arrays.items()}, 1, runs=3)
        if times is None:
            pytest.skip(f"the {backend.name} backend has no per-layer profile")
        assert set(times) == set(model.layer_names) and all(t >= 0 for t in times.values())
        assert sum(times.values()) > 0

    def test_recipes_build_from_the_cached_calibration_and_run(self, setup):
        """Each one-line recipe builds from the run's calibration alone and runs; one expressible in autoq's specs
        names only specs this backend builds."""
        backend, model, splits, calibration, workdir = setup
        feeds = {k: v[:4] for k, v in splits.validation.arrays.items()}
        recipes = backend.recipes(model)
        assert recipes, "every backend measures at least one recipe"
        for i, recipe in enumerate(recipes[:3]):
            built = recipe.build(model, calibration, workdir / f"recipe-{i}")
            assert built.size_bytes > 0 and np.isfinite(backend.deployed_runner(built, 1)(feeds)[0]).all()
            if recipe.layers is not None:
                assert all(backend.unbuildable(Precision.parse(s)) is None for s in recipe.layers(model).values())

    def test_a_matmul_model_executes_as_asked(self, matmul_setup):
        """MatMul layers (and a table) take the low precision where the backend offers it to them, and run it."""
        backend, model, splits = matmul_setup[0], matmul_setup[1], matmul_setup[2]
        if backend.takes_module:
            pytest.skip(f"the {backend.name} backend builds from an nn.Module (its own tests cover Linear layers)")
        layers = {la.name: self.low_precision if self.low_precision in backend.layer_precisions(la, [
            "fp32", self.low_precision]) else "fp32" for la in model.layers}
        assert sum(p == self.low_precision for p in layers.values()) >= 2, layers
        candidate = self._build(matmul_setup, layers, "matmul-low")
        assert backend.executed(candidate) == backend.expected(Assignment(layers))
        output = backend.runner(candidate, 1)({k: v[:4] for k, v in splits.search.arrays.items()})[0]
        assert np.isfinite(output).all()
