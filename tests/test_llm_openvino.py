"""Language models on OpenVINO: the tiny decoder exported with standard ONNX ops (autoq.causal_lm's torch
exporter), each Linear and the embedding table compressed by NNCF in its own spec, run with the KV cache, and
NNCF's compress_weights recipes measured beside a search's front."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from autoq import data, graph
from autoq.backends import get_backend
from autoq.causal_lm import LABELS, token_windows
from autoq.decoder import decode_step, is_decoder
from autoq.metrics import token_nll
from autoq.precision import Assignment, Precision
from tests.models import tiny_decoder

pytest.importorskip("openvino", reason="the OpenVINO backend needs the openvino extra")
pytest.importorskip("transformers", reason="the torch exporter needs transformers")

WINDOW = 32


@pytest.fixture(scope="module")
def plain_decoder(tmp_path_factory):
    """(Hugging Face folder, ONNX model in standard ops, windows .npz) of the tiny decoder, on docstring text."""
    from tokenizers import Tokenizer

    from autoq.demo import sentences

    folder = tmp_path_factory.mktemp("plain")
    hf_dir, model = tiny_decoder(folder, exporter="torch")
    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    tokens = np.array([t for line in sentences(300, seed=2) for t in tokenizer.encode(line + "\n").ids])
    windows = folder / "windows.npz"
    np.savez(windows, **token_windows(tokens, WINDOW, 12, model))
    return hf_dir, model, windows


def _setup(plain_decoder, tmp_path):
    from autoq.calibrate import calibrate

    _, model_path, windows = plain_decoder
    model = graph.prepare(model_path, tmp_path)
    splits = data.split(data.load(windows, LABELS))
    return model, splits, calibrate(model, splits.calibration, tmp_path / "cache")


def test_torch_export_has_the_torch_models_perplexity_and_decodes(plain_decoder):
    """Standard ops only (nothing OpenVINO would read as an internal op), the torch model's perplexity, and a
    decode step whose logits are a one-token-longer prefill's."""
    import onnx
    import torch
    from transformers import AutoModelForCausalLM

    hf_dir, model, windows = plain_decoder
    assert {n.domain for n in onnx.load(str(model), load_external_data=False).graph.node} <= {"", "ai.onnx"}
    arrays = dict(np.load(windows))
    labels = arrays.pop(LABELS)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], arrays)[0]
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()(
            torch.from_numpy(arrays["input_ids"])).logits.numpy()
    assert np.exp(token_nll(logits, labels).mean()) == pytest.approx(np.exp(token_nll(reference, labels).mean()),
                                                                     rel=1e-4)
    assert is_decoder(graph.input_specs(graph.load_onnx(model)))
    outputs = [o.name for o in session.get_outputs()]
    one = {k: v[:1] for k, v in arrays.items()}
    prompt = {k: (v[:, :16] if k in ("input_ids", "attention_mask", "position_ids") else v) for k, v in one.items()}
    step = decode_step(lambda f: session.run(None, f), prompt, outputs)
    step["input_ids"] = one["input_ids"][:, 16:17]
    longer = {k: (v[:, :17] if k in ("input_ids", "attention_mask", "position_ids") else v) for k, v in one.items()}
    np.testing.assert_allclose(session.run(["logits"], step)[0][0, -1], session.run(["logits"], longer)[0][0, -1],
                               atol=1e-4)


@pytest.mark.parametrize("table", ["fp32", "w8-asym", "w4g32"])
def test_openvino_runs_each_layer_and_the_table_in_its_spec(plain_decoder, tmp_path, table):
    """4- and 8-bit Linear layers, fp32 ones, and the table in `table`: NNCF compresses exactly those (an fp32
    table stays float though 8-bit layers are compressed around it), the runtime model shows each one's weight
    type, and the candidate decodes with its KV cache."""
    from autoq.backends import get_backend

    model, splits, calibration = _setup(plain_decoder, tmp_path)
    menu = ["w4g32", "w8", "fp32", "w4g16-asym", "w8-asym"]
    layers = {la.name: table if la.op_type == "Gather" else menu[i % len(menu)] for i, la in enumerate(model.layers)}
    assert {la.op_type for la in model.layers} == {"MatMul", "Gather"}
    backend = get_backend("openvino")
    candidate = backend.build(model, Assignment(layers, {"inference_precision": "f32"}), calibration, tmp_path / "c")
    assert backend.executed(candidate) == Assignment(layers).layers
    run = backend.runner(candidate, 1)
    step = decode_step(run, {k: v[:1] for k, v in splits.search.arrays.items()}, model.outputs)
    logits = run(step)[0]
    assert logits.shape == (1, 1, 512) and np.isfinite(logits).all()


@pytest.mark.slow
def test_openvino_search_of_a_decoder_against_nncf_recipes(plain_decoder, tmp_path):
    """A search of the decoder on OpenVINO: every layer executed as assigned, and NNCF's compress_weights recipes
    (int8; int4 in groups of 128 and 32; int4 at ratios 0.8 and 0.6; NF4 and CB4) built and measured beside the
    front."""
    import autoq

    _, model, windows = plain_decoder
    result = autoq.search(model, windows, labels=LABELS, metric="ppl_ratio", backend="openvino",
                          space="llm-openvino", trials=6, out=tmp_path / "run", progress=False)
    assert result.front["val_executed_ok"].all() and result.trials["executed_ok"].all()
    recipes = result.recipes.set_index("recipe")
    floats = 2 if get_backend("openvino").native_bf16 else 1  # each recipe under f32, and bf16 where native
    assert (recipes["error"] == "").all() and recipes.index.str.startswith("NNCF compress_weights").sum() == 7 * floats
    assert recipes.index.str.contains("f32").sum() == 8  # OpenVINO f32 itself and NNCF's seven
    assert recipes["verdict"].str.len().gt(0).all() and recipes["speedup"].gt(0).all()
    int8 = recipes.loc[recipes.index.str.contains("int8, its default"), "size_bytes"].iloc[0]
    int4 = recipes.loc[recipes.index.str.contains("int4, group 32"), "size_bytes"].iloc[0]
    assert int4 < int8 < 0.6 * graph.stored_bytes(tmp_path / "run" / "model.onnx")  # compressed for real
    table = autoq.verify(tmp_path / "run", rounds=3, passes=1)
    assert len(table) == 1 + len(result.front) + len(recipes)


def test_nncf_recipes_are_assignments_autoq_builds_to_the_same_model(plain_decoder, tmp_path):
    """NNCF's int8 default, int4 group 128 / 32, NF4 and CB4 (the embedding and the LM head in int8, a group that
    does not divide a layer's inputs halved), as autoq's per-layer specs, build to NNCF's own model: the same logits
    and size, executed as assigned where this machine's plugin runs the format as stored; the ratio recipes rank
    layers by NNCF's own criterion and have no such form."""
    from autoq.backends import get_backend
    from autoq.backends.base import Candidate

    model, splits, calibration = _setup(plain_decoder, tmp_path)
    backend = get_backend("openvino")
    recipes = [r for r in backend.recipes(model) if r.label.startswith("NNCF") and r.label.endswith("(f32)")]
    assert [r.layers is not None for r in recipes] == [True, True, True, False, False, True, True]
    feeds = {k: v[:2] for k, v in splits.search.arrays.items()}
    for i, recipe in enumerate(r for r in recipes if r.layers is not None):
        theirs = recipe.build(model, calibration, tmp_path / f"recipe-{i}")
        options = dict(theirs.assignment.options)
        ours = backend.build(model, Assignment(recipe.layers(model), options), calibration, tmp_path / f"ours-{i}")
        if not any(backend.lacks(Precision.parse(spec)) for spec in recipe.layers(model).values()):
            assert backend.executed(ours) == recipe.layers(model)
        assert ours.size_bytes == pytest.approx(theirs.size_bytes, rel=0.01), recipe.label
        logits = [backend.deployed_runner(Candidate(Assignment({}, options), c.path, 0), 1)(feeds)[0]
                  for c in (ours, theirs)]
        np.testing.assert_allclose(*logits, atol=1e-5, err_msg=recipe.label)


def test_openvino_stores_a_tied_table_once_in_its_heads_spec(plain_decoder, tmp_path):
    """The tiny decoder's table is its LM head's weight transposed: OpenVINO keeps one constant for both while they
    take the same spec, and stores the table again (one byte per weight in 8 bits) when they differ."""
    from autoq.backends import get_backend

    model, _, calibration = _setup(plain_decoder, tmp_path)
    backend = get_backend("openvino")
    (table, head), = backend.tied_tables(model).items()
    assert (table, head) == ("/model/embed_tokens/Gather", "/lm_head/MatMul")
    layers = {la.name: "w8-asym" for la in model.layers}
    options = {"inference_precision": "f32"}
    same = backend.build(model, Assignment(layers, options), calibration, tmp_path / "same")
    apart = backend.build(model, Assignment({**layers, table: "w8"}, options), calibration, tmp_path / "apart")
    weights = next(la.params for la in model.layers if la.name == table)
    assert 0.9 * weights <= apart.size_bytes - same.size_bytes <= 1.2 * weights


def test_builds_start_from_one_read_of_the_model_and_never_change_it(plain_decoder, tmp_path):
    """The backend converts the model once and builds each candidate from a copy sharing its weights: NNCF's
    data-aware roundings (AWQ, scale estimation, GPTQ) leave those weights as they were, so an fp32 build after
    them still computes the model itself, and a repeated build computes what the first one did."""
    from autoq.backends import get_backend

    model, splits, calibration = _setup(plain_decoder, tmp_path)
    backend = get_backend("openvino")
    feeds = {k: v[:2] for k, v in splits.search.arrays.items()}

    def logits(layers: dict[str, str], name: str) -> np.ndarray:
        candidate = backend.build(model, Assignment(layers, {"inference_precision": "f32"}), calibration,
                                  tmp_path / name)
        return backend.runner(candidate, 1)(feeds)[0]

    fp32 = {la.name: "fp32" for la in model.layers}
    first = {la.name: "w4g32-gptq" if la.op_type == "MatMul" else "w8" for la in model.layers}
    reference = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    np.testing.assert_allclose(logits(fp32, "before"), reference, atol=1e-4)
    built = logits(first, "first")
    for rounding in ("awq", "se"):
        logits({n: f"w4g32-{rounding}" if p != "w8" else p for n, p in first.items()}, rounding)
    np.testing.assert_allclose(logits(fp32, "after"), reference, atol=1e-4)
    np.testing.assert_array_equal(logits(first, "again"), built)
