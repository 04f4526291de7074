"""The LiteRT backend against the real stack: litert-torch's conversion, AI Edge Quantizer, the XNNPACK interpreter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autoq import data, graph
from autoq.backends import get_backend
from autoq.calibrate import calibrate
from autoq.errors import AutoqError
from autoq.precision import Assignment
from autoq.torch_input import to_onnx
from tests.backend_contract import BackendContract
from tests.models import DigitsClassifier, train_digits_module

torch = pytest.importorskip("torch")
pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_quantizer")


@pytest.fixture(scope="module")
def digits_module():
    return DigitsClassifier(train_digits_module())


def _setup(module, digits_npz, workdir: Path):
    model = graph.prepare(to_onnx(module, (torch.zeros(1, 1, 8, 8),), workdir / "export"), workdir)
    model.module = module
    splits = data.split(data.load(digits_npz, "label"))
    return get_backend("litert"), model, splits, calibrate(model, splits.calibration, workdir / "cache"), workdir


class TestLiteRt(BackendContract):
    backend_name = "litert"
    low_precision = "int8"
    shrink = 0.4  # int8 weights: a quarter of the floats, plus the flatbuffer's own tables

    @pytest.fixture(scope="class")
    def setup(self, digits_module, digits_npz, tmp_path_factory):
        return _setup(digits_module, digits_npz, tmp_path_factory.mktemp("litert"))

    def run_exported(self, setup, candidate, path: Path, feeds: dict) -> np.ndarray:
        from ai_edge_litert.interpreter import Interpreter

        runner = Interpreter(str(path)).get_signature_runner("serving_default")
        return np.concatenate([next(iter(runner(args_0=x[None]).values())) for x in feeds["image"]])

    def test_each_spec_runs_as_built_and_a_layer_maps_to_its_op(self, setup):
        """Static int8, dynamic int8 and weight-only int8 side by side in one model: each layer's op reads back as
        its spec from the flatbuffer (input and weight types), and the model still agrees with FP32."""
        backend, model, splits = setup[0], setup[1], setup[2]
        asked = dict(zip(model.layer_names, ["int8", "fp32", "int8-dyn-pc", "w8"], strict=True))
        candidate = self._build(setup, asked, "every-spec")
        assert backend.executed(candidate) == asked
        feeds = {"image": splits.search.arrays["image"]}
        fp32 = backend.runner(self._build(setup, {n: "fp32" for n in model.layer_names}, "ref"), 1)(feeds)[0]
        mixed = backend.runner(candidate, 1)(feeds)[0]
        assert (mixed.argmax(1) == fp32.argmax(1)).mean() > 0.95 and not np.allclose(mixed, fp32)

    def test_float_glue_puts_float_round_trips_between_int8_layers(self, setup):
        """`glue: float` quantizes the int8 layers alone (QUANTIZE/DEQUANTIZE around each); `glue: int8` leaves
        none between two int8 layers: its flatbuffer holds fewer conversion ops."""
        backend, model = setup[0], setup[1]
        layers = {n: "int8" for n in model.layer_names}
        counts = {}
        for glue in ("int8", "float"):
            candidate = backend.build(model, Assignment(layers, {"glue": glue}), setup[3], setup[4] / f"glue-{glue}")
            assert backend.executed(candidate) == layers
            from autoq.backends.litert.model import interpreter

            ops = [op["op_name"] for op in interpreter(candidate.path)._get_ops_details()]
            counts[glue] = sum(op in ("QUANTIZE", "DEQUANTIZE") for op in ops)
        assert counts["int8"] < counts["float"]

    def test_learned_rounding_runs_its_integers_in_the_int8_kernels(self, setup, tmp_path):
        """`int8-adaround`: the learned weights go into the float model before AI Edge Quantizer quantizes it, whose
        per-channel grid is the one they were learned on: the built file stores the learned integers (the build
        reads them back), each layer runs in the int8 kernel, and the model computes closer to FP32 on unseen
        samples than round-to-nearest. A cache moved off its grid fails the build instead of running unlearned."""
        from autoq.recovery import rounding

        backend, model, splits, calibration, workdir = setup
        feeds = {"image": splits.validation.arrays["image"]}
        fp32 = backend.runner(self._build(setup, {n: "fp32" for n in model.layer_names}, "ref3"), 1)(feeds)[0]
        errors = {}
        for spec in ("int8", "int8-adaround"):
            layers = {n: spec if la.op_type == "Conv" or spec == "int8" else "int8" for n, la in zip(
                model.layer_names, model.layers, strict=True)}
            candidate = self._build(setup, layers, f"learned-{spec}")
            assert backend.executed(candidate) == layers
            errors[spec] = float(((backend.runner(candidate, 1)(feeds)[0] - fp32) ** 2).mean())
        assert errors["int8-adaround"] < errors["int8"], errors
        conv = next(la for la in model.layers if la.op_type == "Conv")
        path = rounding.cache_file(calibration, conv.name, rounding.Precision.parse("int8-adaround"))
        with np.load(path) as stored:
            kept = {key: stored[key] for key in stored.files}
        moved = kept["weight"].copy()  # one weight 0.4 of its channel's step off the grid: rounded back on build
        moved[0].flat[np.abs(moved[0]).argmin()] += 0.4 * np.abs(moved[0]).max() / 127
        np.savez(path, **{**kept, "weight": moved})
        try:
            with pytest.raises(AutoqError, match="did not keep the learned integers"):
                self._build(setup, {conv.name: "int8-adaround"}, "off-grid")
        finally:
            np.savez(path, **kept)

    @pytest.mark.parametrize("label", ["static_wi8_ai8", "PT2E"])
    def test_the_static_recipes_take_int8_input_and_are_fed_quantized(self, setup, label):
        """AI Edge Quantizer's static_wi8_ai8 and litert-torch's PT2E recipe make int8 model inputs: the runner
        quantizes the floats in with the input's scale and reads the outputs back in float, so each recipe is judged
        on the same data; every conv and fully connected op of theirs reads int8 input and weights."""
        backend, model, splits, calibration, workdir = setup
        recipe = next(r for r in backend.recipes(model) if label in r.label)
        built = recipe.build(model, calibration, workdir / f"recipe-{label}")
        from autoq.backends.litert.model import interpreter

        made = interpreter(built.path)
        runner = made.get_signature_runner("serving_default")
        assert next(iter(runner.get_input_details().values()))["dtype"] == np.int8
        dtypes = {t["index"]: np.dtype(t["dtype"]).name for t in made.get_tensor_details()}
        layers = [op for op in made._get_ops_details() if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D",
                                                                           "FULLY_CONNECTED")]
        assert len(layers) == 4 and all(dtypes[op["inputs"][0]] == dtypes[op["inputs"][1]] == "int8"
                                        for op in layers)
        feeds = {"image": splits.search.arrays["image"]}
        fp32 = backend.runner(self._build(setup, {n: "fp32" for n in model.layer_names}, "ref2"), 1)(feeds)[0]
        assert (backend.runner(built, 1)(feeds)[0].argmax(1) == fp32.argmax(1)).mean() > 0.95


def test_a_module_litert_torch_cannot_convert_gets_one_line(digits_npz, tmp_path):
    class Untraceable(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, image):
            if image.sum() > 0:  # data-dependent control flow: torch.export refuses it
                return self.fc(image.flatten(1))
            return -self.fc(image.flatten(1))

    module = Untraceable().eval()
    backend, model, _, calibration, workdir = _setup(module, digits_npz, tmp_path)
    with pytest.raises(AutoqError, match="litert-torch cannot convert this module") as caught:
        backend.build(model, Assignment({n: "int8" for n in model.layer_names}), calibration, workdir / "b")
    assert "\n" not in str(caught.value)


def test_an_onnx_file_runs_on_litert_through_its_graph_in_torch(digits_cnn, digits_npz, tmp_path):
    """An ONNX file (no module) converts through autoq's own ONNX-in-torch graph: FP32 computes what ONNX Runtime
    computes, in one XNNPACK partition with no layout transposes between the layers (the graph's scalars and
    shapes are fixed before tracing), every layer maps to its op, and int8 executes as assigned."""
    from autoq.backends.litert.model import interpreter

    model = graph.prepare(digits_cnn, tmp_path)
    splits = data.split(data.load(digits_npz, "label"))
    calibration = calibrate(model, splits.calibration, tmp_path / "cache")
    backend, ort = get_backend("litert"), get_backend("onnxruntime")
    fp32 = {n: "fp32" for n in model.layer_names}
    built = backend.build(model, Assignment(fp32), calibration, tmp_path / "fp32")
    feeds = {"image": splits.search.arrays["image"]}
    reference = ort.runner(ort.build(model, Assignment(fp32), calibration, tmp_path / "ort"), 1)(feeds)[0]
    np.testing.assert_allclose(backend.runner(built, 1)(feeds)[0], reference, rtol=1e-4, atol=1e-4)
    ops = [op["op_name"] for op in interpreter(built.path)._get_ops_details()]
    assert ops.count("DELEGATE") == 1 and ops.count("TRANSPOSE") <= 1, ops
    int8 = {n: "int8" for n in model.layer_names}
    candidate = backend.build(model, Assignment(int8), calibration, tmp_path / "int8")
    assert backend.executed(candidate) == int8
    agreement = (backend.runner(candidate, 1)(feeds)[0].argmax(1) == reference.argmax(1)).mean()
    assert agreement > 0.95


@pytest.mark.slow
def test_a_litert_search_of_a_module_reaches_int8_and_judges_the_recipes(digits_module, digits_npz, tmp_path):
    """`autoq.search(module, example_inputs, data, backend="litert")`: the front holds a point with int8 layers that
    executed as assigned, and every AI Edge Quantizer recipe got a verdict against it."""
    import pandas as pd

    import autoq

    arrays = dict(np.load(digits_npz))
    result = autoq.search(digits_module, (torch.zeros(1, 1, 8, 8),), {"image": arrays["image"]},
                          labels=arrays["label"], backend="litert", trials=6, out=tmp_path / "run", progress=False)
    assert result.front["val_executed_ok"].all()
    assert result.front["summary"].str.contains("int8").any(), result.front["summary"].tolist()
    recipes = pd.read_csv(tmp_path / "run" / "recipes.csv", keep_default_na=False)
    assert len(recipes) == 4 and recipes["verdict"].str.len().gt(0).all()
    assert not recipes["verdict"].str.startswith("failed").any(), recipes["verdict"].tolist()
    with pytest.raises(AutoqError, match="builds from your nn.Module") as caught:  # not silently untrained
        autoq.finetune(tmp_path / "run", int(result.front["point"].iloc[0]), {"image": arrays["image"]},
                       labels=arrays["label"], epochs=1, progress=False)
    assert "\n" not in str(caught.value)


class TinyEncoder(torch.nn.Module):
    """Token and position embeddings into a linear layer: the position table is read at indices only the input's
    shape decides."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.words = torch.nn.Embedding(300, 32)
        self.positions = torch.nn.Embedding(16, 32)
        self.fc = torch.nn.Linear(32, 8)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        return self.fc(self.words(ids) + self.positions(positions))


def test_a_token_table_is_offered_int8_and_runs_as_stored_a_folded_position_table_is_not(tmp_path):
    """The word table, read at the input's ids, builds as int8 rows that EMBEDDING_LOOKUP reads (executed `w8`,
    the file smaller, outputs close to FP32); the position table, which litert-torch folds into a constant, is
    offered fp32 only (there is no op to quantize)."""
    module = TinyEncoder().eval()
    ids = np.random.default_rng(0).integers(0, 300, (48, 16)).astype(np.int64)
    model = graph.prepare(to_onnx(module, (torch.from_numpy(ids[:1]),), tmp_path / "export"), tmp_path)
    model.module = module
    backend = get_backend("litert")
    tables = {layer.name: backend.layer_precisions(layer, ["fp32", "w8"]) for layer in model.layers
              if layer.op_type == "Gather"}
    assert tables == {"words": ["fp32", "w8"], "positions": ["fp32"]}
    splits = data.split(data.load({"ids": ids}))
    calibration = calibrate(model, splits.calibration, tmp_path / "cache")
    fp32 = backend.build(model, Assignment({n: "fp32" for n in model.layer_names}), calibration, tmp_path / "f")
    asked = {"words": "w8", "positions": "fp32", "fc": "int8-dyn-pc"}
    built = backend.build(model, Assignment(asked), calibration, tmp_path / "q")
    assert backend.executed(built) == asked
    four = backend.build(model, Assignment({**asked, "fc": "int4-dyn-pc"}), calibration, tmp_path / "q4")
    assert backend.executed(four)["fc"] == "int4-dyn-pc"  # the flatbuffer's int4 type (the interpreter says int8)
    assert built.size_bytes < 0.5 * fp32.size_bytes
    feeds = {"ids": splits.search.arrays["ids"]}
    reference, quantized = backend.runner(fp32, 1)(feeds)[0], backend.runner(built, 1)(feeds)[0]
    assert np.abs(quantized - reference).max() < 0.05 * np.abs(reference).max()
    dynamic = next(r for r in backend.recipes(model) if r.label.endswith("dynamic_wi8_afp32"))
    assert dynamic.layers is not None and dynamic.layers(model) == asked  # the search starts from the recipe
    recipe = dynamic.build(model, calibration, tmp_path / "recipe")
    assert abs(recipe.size_bytes - built.size_bytes) < 0.02 * recipe.size_bytes  # its layout, as autoq builds it
    assert np.allclose(backend.runner(recipe, 1)(feeds)[0], quantized, atol=1e-5)


def test_a_module_class_of_the_users_script_maps_its_layers_in_a_spawned_worker(digits_module, digits_npz, tmp_path):
    """A class defined in the user's script is `__main__.X` where the model converts and `__mp_main__.X` in the
    spawned trial worker that builds the candidates: its layers still map to their TFLite ops there (every
    EfficientNet-class module of a benchmark script failed its builds with "no TFLite op carries the weights")."""
    import copy

    from autoq.backends.litert.model import float_model

    module = copy.deepcopy(digits_module)
    module.__class__ = type("Scripted", (type(digits_module),), {"__module__": "__main__"})
    backend, model, _, calibration, workdir = _setup(module, digits_npz, tmp_path)
    float_model(model, calibration.samples(), calibration.folder)  # converted where the class is __main__'s
    type(module).__module__ = "__mp_main__"  # the class as the worker imports it
    layers = {name: "int8" for name in model.layer_names}
    candidate = backend.build(model, Assignment(layers), calibration, workdir / "int8")
    assert backend.executed(candidate) == layers


def test_int8_glue_keeps_hard_swish_float_where_xnnpack_has_no_int8_kernel(digits_npz, tmp_path):
    """A HardSwish between int8 convolutions runs float (its input is dequantized, its output quantized again):
    XNNPACK does not run int8 HARD_SWISH, which split the delegated graph and ran PaddleOCR's classifier 4x slower
    than with it float. The convolutions still run int8."""
    from autoq.backends.litert.model import interpreter, stored_types

    class HardSwishNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
            self.head = torch.nn.Linear(8 * 8 * 8, 10)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            h = torch.nn.functional.hardswish(self.conv2(torch.nn.functional.hardswish(self.conv1(image))))
            return self.head(h.flatten(1))

    torch.manual_seed(0)
    backend, model, _, calibration, workdir = _setup(HardSwishNet().eval(), digits_npz, tmp_path)
    layers = {n: "int8" for n in model.layer_names}
    candidate = backend.build(model, Assignment(layers), calibration, workdir / "int8")
    assert backend.executed(candidate) == layers
    types = stored_types(candidate.path)
    swishes = [op for op in interpreter(candidate.path)._get_ops_details() if op["op_name"] == "HARD_SWISH"]
    assert len(swishes) == 2 and all(types[int(op["inputs"][0])] == "float32" for op in swishes)


def test_learned_rounding_finds_a_weight_the_converter_scaled(tmp_path):
    """A convolution before a HardSigmoid (as in PaddleOCR's squeeze-and-excitation blocks) is stored times 1.2 in
    the converted model (relu6(1.2 x + 3) / 6 folded into it): its learned integers still go in and read back, so
    `int8-adaround` builds there (every such build failed with "laid out in no way autoq can match")."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    shapes = {"w1": (8, 1, 3, 3), "w2": (8, 8, 1, 1), "w3": (4, 8, 3, 3)}
    weights = [numpy_helper.from_array(rng.normal(0, 0.4, s).astype(np.float32), n) for n, s in shapes.items()]
    nodes = [helper.make_node("Conv", ["image", "w1"], ["c1"], "conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], "gate_conv"),
             helper.make_node("HardSigmoid", ["c2"], ["gate"], "gate", alpha=0.2, beta=0.5),
             helper.make_node("Mul", ["r1", "gate"], ["m"], "scale"),
             helper.make_node("Conv", ["m", "w3"], ["y"], "conv3", pads=[1] * 4)]
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])
    save(helper.make_model(helper.make_graph(nodes, "g", [image], [out], weights),
                           opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "gate.onnx"))
    model = graph.prepare(tmp_path / "gate.onnx", tmp_path / "run")
    splits = data.split(data.Dataset({"image": rng.normal(0, 1, (96, 1, 8, 8)).astype(np.float32)}))
    calibration = calibrate(model, splits.calibration, tmp_path / "cache")
    backend = get_backend("litert")
    learned = {n: "int8-adaround" for n in model.layer_names}
    candidate = backend.build(model, Assignment(learned), calibration, tmp_path / "learned")
    assert backend.executed(candidate) == learned
