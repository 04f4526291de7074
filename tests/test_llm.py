"""Language models: a tiny randomly initialised decoder exported with a KV cache by ONNX Runtime GenAI's builder,
scored by perplexity, timed on a decode step, built per layer in 4 and 8 bits."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest

from autoq import data, graph
from autoq.backends import get_backend
from autoq.calibrate import calibrate
from autoq.causal_lm import LABELS, token_windows
from autoq.decoder import decode_step, is_decoder
from autoq.errors import AutoqError
from autoq.metrics import ppl_ratio, token_nll
from autoq.precision import Assignment
from tests.models import tiny_decoder

WINDOW = 32


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """(Hugging Face folder, ONNX model, windows .npz) of the tiny decoder, on docstring text."""
    pytest.importorskip("onnxruntime_genai", reason="the decoder is exported by ONNX Runtime GenAI's builder")
    from tokenizers import Tokenizer

    from autoq.demo import sentences

    folder = tmp_path_factory.mktemp("decoder")
    hf_dir, model = tiny_decoder(folder)
    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    tokens = np.array([t for line in sentences(300, seed=2) for t in tokenizer.encode(line + "\n").ids])
    windows = folder / "windows.npz"
    np.savez(windows, **token_windows(tokens, WINDOW, 12, model))
    return hf_dir, model, windows


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _inputs(windows, rows=slice(None)) -> tuple[dict[str, np.ndarray], np.ndarray]:
    arrays = dict(np.load(windows))
    labels = arrays.pop(LABELS)
    return {k: v[rows] for k, v in arrays.items()}, labels[rows]


def test_ppl_ratio_is_one_at_fp32_and_falls_with_noise():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 8, 50)).astype(np.float32)
    labels = logits.argmax(-1)  # the reference is confident in the labels: noise can only cost perplexity
    assert ppl_ratio([logits], [logits], labels) == pytest.approx(1.0)
    noisy = logits + rng.normal(scale=2.0, size=logits.shape).astype(np.float32)
    assert ppl_ratio([logits], [noisy], labels) < 0.9
    with pytest.raises(AutoqError, match="next token"):
        ppl_ratio([logits], [logits], None)


def test_fp32_export_has_the_torch_models_perplexity(decoder):
    import torch
    from transformers import AutoModelForCausalLM

    hf_dir, model, windows = decoder
    feeds, labels = _inputs(windows)
    onnx_logits = _session(model).run(["logits"], feeds)[0]
    with torch.no_grad():
        torch_logits = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()(
            torch.from_numpy(feeds["input_ids"])).logits.numpy()
    assert np.exp(token_nll(onnx_logits, labels).mean()) == pytest.approx(
        np.exp(token_nll(torch_logits, labels).mean()), rel=1e-4)


def test_a_decode_step_continues_the_prefill(decoder):
    """The step autoq times is real generation: its logits after a 16-token prompt are the logits a 17-token
    prefill gives at its last position, and the cache grows by one."""
    _, model, windows = decoder
    session = _session(model)
    outputs = [o.name for o in session.get_outputs()]
    feeds, _ = _inputs(windows, slice(0, 1))
    assert is_decoder(graph.input_specs(graph.load_onnx(model)))
    prompt = {k: (v[:, :16] if k in ("input_ids", "attention_mask") else v) for k, v in feeds.items()}
    step = decode_step(lambda f: session.run(None, f), prompt, outputs)
    assert step["past_key_values.0.key"].shape[2] == 16 and step["attention_mask"].shape == (1, 17)
    step["input_ids"] = feeds["input_ids"][:, 16:17]
    longer = {k: (v[:, :17] if k in ("input_ids", "attention_mask") else v) for k, v in feeds.items()}
    stepped = session.run(None, step)
    np.testing.assert_allclose(stepped[0][0, -1], session.run(["logits"], longer)[0][0, -1], atol=1e-4)
    assert stepped[outputs.index("present.0.key")].shape[2] == 17


def test_layers_take_4_and_8_bits_each_and_run_them(decoder, tmp_path):
    """A per-layer assignment (int4 and int8 Linear layers, fp32 ones, an int4 embedding) builds; every layer's
    kernel is read back with its bits, block and compute; the candidate generates with its KV cache."""
    _, model_path, windows = decoder
    model = graph.prepare(model_path, tmp_path)
    splits = data.split(data.load(windows, LABELS))
    calibration = calibrate(model, splits.calibration, tmp_path / "cache")
    menu = ["w4g32-acc4", "w8g128-acc4", "fp32", "w4g64-asym-acc4"]
    layers = {la.name: ("w4g32" if la.op_type == "Gather" else menu[i % len(menu)])
              for i, la in enumerate(model.layers)}
    assert {la.op_type for la in model.layers} == {"MatMul", "Gather"}
    assert len(model.layers) == 2 * 5 + 2  # qkv, o, gate, up, down per block; the LM head and the embedding
    backend = get_backend("onnxruntime")
    candidate = backend.build(model, Assignment(layers), calibration, tmp_path / "mixed")
    run = backend.runner(candidate, 1)
    assert backend.executed(candidate) == Assignment(layers).layers
    feeds = {k: v[:1] for k, v in splits.search.arrays.items()}
    step = decode_step(run, feeds, model.outputs)
    logits = run(step)[0]
    assert logits.shape == (1, 1, 512) and np.isfinite(logits).all()


def test_windows_need_enough_tokens(decoder):
    _, model, _ = decoder
    with pytest.raises(AutoqError, match="too few"):
        token_windows(np.arange(100), WINDOW, 12, model)


@pytest.mark.slow
def test_search_of_a_decoder_against_its_recipes(decoder, tmp_path):
    """A search of the decoder: perplexity ratio as quality, the decode step timed, every layer executed as
    assigned, and the weight-only recipes (ORT's quantizer, the GenAI builder's) measured beside the front."""
    import autoq

    _, model, windows = decoder
    result = autoq.search(model, windows, labels=LABELS, metric="ppl_ratio", space="llm-cpu", trials=8,
                          out=tmp_path / "run", progress=False)
    assert result.front["val_executed_ok"].all() and result.trials["executed_ok"].all()
    recipes = result.recipes.set_index("recipe")
    assert len(recipes) == 9  # ORT's quantizer x3, the GenAI builder's x3 (the model names its source), NNCF's x3
    failed = recipes.index[recipes["error"] != ""]
    assert failed.empty if importlib.util.find_spec("nncf") else failed.str.startswith("NNCF").all()
    built = recipes[recipes["error"] == ""]
    assert built["verdict"].str.len().gt(0).all() and built["speedup"].gt(0).all()
    fp32 = graph.stored_bytes(tmp_path / "run" / "model.onnx")
    assert recipes.loc["GenAI builder int4 (CPU)", "size_bytes"] < fp32 / 3  # int4 weights, for real
    table = autoq.verify(tmp_path / "run", rounds=3, passes=1)  # re-timed as deployed, on the decode step
    assert len(table) == 1 + len(result.front) + len(recipes)
    assert (table["95% low"] <= table["vs FP32"]).all() and (table["vs FP32"] <= table["95% high"]).all()


def test_a_tied_embedding_is_stored_once_with_the_same_values(decoder, tmp_path):
    """The tiny decoder ties its embedding to its LM head: with the same spec on both, the table is read from the
    head's int4 weights (no table left in the file, smaller by the table's int4 bytes), it executes as asked, and
    the model computes what the separately quantized table computes."""
    import onnx

    from autoq.backends.onnxruntime.quantize import quantize_weight_only
    from autoq.precision import Precision

    _, model_path, windows = decoder
    model = graph.prepare(model_path, tmp_path)
    splits = data.split(data.load(windows, LABELS))
    calibration = calibrate(model, splits.calibration, tmp_path / "cache")
    layers = {la.name: "w4g32" if la.op_type == "Gather" else "w4g32-acc4" for la in model.layers}
    backend = get_backend("onnxruntime")
    tied = backend.build(model, Assignment(layers), calibration, tmp_path / "tied")
    assert backend.executed(tied) == Assignment(layers).layers
    table = next(la for la in model.layers if la.op_type == "Gather")
    proto = onnx.load(str(tied.path))
    assert table.weight not in {t.name for t in proto.graph.initializer}
    apart = tmp_path / "apart.onnx"
    onnx.save(onnx.load(str(model.path)), str(apart))
    quantize_weight_only(apart, {n: Precision.parse(p) for n, p in layers.items()}, tie=False)
    assert tied.size_bytes < graph.stored_bytes(apart) - 0.9 * table.params / 2  # the int4 table, stored once
    feeds = {k: v[:2] for k, v in splits.validation.arrays.items()}
    np.testing.assert_allclose(backend.runner(tied, 1)(feeds)[0], _session(apart).run(["logits"], feeds)[0],
                               atol=1e-4)


def test_8_bit_tables_tied_or_alone(decoder, tmp_path):
    """An embedding table takes 8 bits (k-quant or nearest) like a MatMul: tied to an 8-bit head it is stored once
    in the head's weights, alone it is gathered from its own; both run as asked, no stand-in is left in the graph,
    and the embeddings stay within 8-bit rounding of fp32."""
    import onnx

    _, model_path, windows = decoder
    model = graph.prepare(model_path, tmp_path)
    splits = data.split(data.load(windows, LABELS))
    calibration = calibrate(model, splits.calibration, tmp_path / "cache")
    backend = get_backend("onnxruntime")
    table = next(la for la in model.layers if la.op_type == "Gather")
    head = backend.tied_tables(model)[table.name]
    fp32 = backend.build(model, Assignment.uniform(model.layer_names, "fp32"), calibration, tmp_path / "fp32")
    feeds = {k: v[:2] for k, v in splits.validation.arrays.items()}
    expected = backend.runner(fp32, 1)(feeds)[0]
    sizes = {}
    cases = [("tied", "w8g32-kquant-acc4", "w8g32-kquant", 0.02), ("alone", "fp32", "w8g32", 0.02),
             ("padded", "w8g128-acc4", "w8g128", 0.02),  # 64 columns: one padded block of 128
             ("untied", "w8g32-kquant-acc4", "w4g32", 0.2)]  # relative error bounds: 8-bit, and a 4-bit table
    for name, head_spec, table_spec, bound in cases:
        layers = {**dict.fromkeys(model.layer_names, "fp32"), head: head_spec, table.name: table_spec}
        built = backend.build(model, Assignment(layers), calibration, tmp_path / name)
        assert backend.executed(built) == Assignment(layers).layers
        proto = onnx.load(str(built.path))
        assert table.weight not in {t.name for t in proto.graph.initializer}
        assert not [n.name for n in proto.graph.node if "stand_in" in n.name]
        logits = backend.runner(built, 1)(feeds)[0]
        assert np.linalg.norm(logits - expected) < bound * np.linalg.norm(expected)
        sizes[name] = built.size_bytes
    assert sizes["tied"] < sizes["untied"] - 0.9 * table.params / 2  # the table's int4 bytes: stored once


def test_calibrated_sensitivity_is_the_drop_of_the_rounded_layer(decoder, tmp_path):
    """`calibrated` measures each layer's noisiest spec in one shared session: that estimate is the perplexity
    ratio drop of a model file with only that weight rounded, and the layer's other specs scale it by their SQNR
    noise power."""
    import onnx
    from onnx import numpy_helper

    from autoq.evaluate import Evaluator
    from autoq.precision import Precision
    from autoq.quantsim import round_weight
    from autoq.sensitivity import PROBE_SAMPLES, analyse

    _, model_path, windows = decoder
    model = graph.prepare(model_path, tmp_path)
    splits = data.split(data.load(windows, LABELS))
    calibration = calibrate(model, splits.calibration, tmp_path / "cache")
    evaluator = Evaluator(get_backend("onnxruntime"), model, calibration, splits, ppl_ratio, 1)
    choices = {la.name: ["fp32", "w4g32-acc4", "w8g32-acc4"] if la.op_type == "MatMul" else ["fp32", "w4g32"]
               for la in model.layers}
    table = analyse(evaluator, choices, "calibrated").set_index(["layer", "precision"])
    evaluator.close()
    assert (table["score"] == table["estimated_drop"]).all() and (table["estimated_drop"] >= 0).all()
    ratio = table["estimated_drop"] / 10 ** (-table["sqnr_db"] / 10)  # one gain per layer
    assert np.allclose(ratio.groupby(level=0).min(), ratio.groupby(level=0).max())
    head = next(la for la in model.layers if la.name == "/lm_head/MatMul")
    proto = onnx.load(str(model.path))
    weight = next(t for t in proto.graph.initializer if t.name == head.weight)
    rounded = round_weight(numpy_helper.to_array(weight), head.channel_axis, Precision.parse("w4g32-acc4"))
    weight.CopyFrom(numpy_helper.from_array(rounded, head.weight))
    onnx.save(proto, str(tmp_path / "rounded.onnx"))
    rows = splits.search.subset(np.arange(min(PROBE_SAMPLES, len(splits.search))))  # what the method reads
    fp32, low = (np.concatenate([_session(p).run(["logits"], {k: rows.arrays[k][i:i + 1] for k in rows.arrays})[0]
                                 for i in range(len(rows))]) for p in (model.path, tmp_path / "rounded.onnx"))
    drop = 1.0 - ppl_ratio([fp32], [low], rows.labels)
    assert drop > 0 and table.loc[(head.name, "w4g32-acc4"), "estimated_drop"] == pytest.approx(drop, rel=1e-3)


def test_seeds_put_a_tied_table_in_its_heads_spec(decoder, tmp_path):
    """The seeds rank a table by its own bytes; where it is tied to the LM head, they give it the head's spec (when
    the table offers it), so the backend stores it once."""
    from autoq.seeds import follow_ties

    _, model_path, _ = decoder
    model = graph.prepare(model_path, tmp_path)
    ties = get_backend("onnxruntime").tied_tables(model)
    (table, head), = ties.items()
    assert table == "/model/embed_tokens/Gather" and head == "/lm_head/MatMul"
    choices = {la.name: ["fp32", "w4g32", "w4g128"] if la.op_type == "Gather" else ["fp32", "w4g32-acc4", "w8g32"]
               for la in model.layers}
    seeds = [Assignment({**dict.fromkeys(choices, "w4g32-acc4"), table: "w4g128"}),
             Assignment({**dict.fromkeys(choices, "w8g32"), table: "w4g128"}),
             Assignment({**dict.fromkeys(choices, "w4g32-acc4"), table: "fp32"})]
    followed = follow_ties(seeds, ties, choices)
    assert [s.layers[table] for s in followed] == ["w4g32", "w4g128", "fp32"]  # w8g32 is no table's; fp32 kept


def _kernels(path) -> dict[str, tuple]:
    """Each weighted node's kernel as stored: layer name -> (op, bits, block, accuracy level, inputs)."""
    import onnx
    from onnx import helper

    kernels = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized", "MatMul", "Gather"):
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            name = node.name.removesuffix("_Q4").removesuffix("_Q8").replace("GatherBlockQuantized", "Gather")
            kernels[name] = (node.op_type, *(attributes.get(k) for k in ("bits", "block_size", "accuracy_level")),
                             len(node.input))
    return kernels


def test_the_weight_only_recipes_are_assignments_autoq_builds_to_the_same_model(decoder, tmp_path):
    """Each GenAI builder recipe's `layers` (int4 k_quant_mixed: llama.cpp's placement of its int8 layers) and each
    of ORT's MatMulNBits quantizer's, built by autoq, is the recipe's model: the same kernel for every layer and the
    same logits, so the search can start from each recipe."""
    _, model_path, windows = decoder
    model = graph.prepare(model_path, tmp_path)
    calibration = calibrate(model, data.split(data.load(windows, LABELS)).calibration, tmp_path / "cache")
    backend = get_backend("onnxruntime")
    feeds = {k: v[:2] for k, v in _inputs(windows)[0].items()}
    weight_only = [r for r in backend.recipes(model) if r.label.startswith(("GenAI", "ORT MatMulNBits"))]
    assert len(weight_only) == 6 and all(r.layers for r in weight_only)
    for recipe in weight_only:
        theirs = recipe.build(model, calibration, tmp_path / f"recipe-{weight_only.index(recipe)}")
        layers = recipe.layers(model)
        ours = backend.build(model, Assignment(layers), calibration, tmp_path / f"ours-{weight_only.index(recipe)}")
        assert _kernels(ours.path) == _kernels(theirs.path), recipe.label
        assert backend.executed(ours) == layers
        logits = _session(theirs.path).run(["logits"], feeds)[0]
        np.testing.assert_array_equal(backend.runner(ours, 1)(feeds)[0], logits)


def test_k_quant_mixed_places_int8_by_llama_cpps_rule():
    """SmolLM2's 30 blocks: int8 for QKV and down in blocks 0-3 and 27-29, every third block from 6 to 24, and the
    LM head (as the builder's k_quant_mixed model has them: 29 int8 MatMuls); the rest k-quant int4."""
    from types import SimpleNamespace

    names = [f"/model/layers.{b}/{m}/MatMul" for b in range(30)
             for m in ("attn/qkv_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")]
    layers = [graph.Layer("/model/embed_tokens/Gather", "Gather", "t", (512, 64), 0, 0)] + [
        graph.Layer(name, "MatMul", name, (64, 64), 0, 0) for name in [*names, "/lm_head/MatMul"]]
    inputs = [graph.InputSpec(n, (1, None), np.dtype("int64")) for n in ("input_ids", "past_key_values.0.key")]
    model = SimpleNamespace(layers=layers, inputs=inputs)
    mixed = next(r for r in get_backend("onnxruntime").recipes(model) if "k_quant_mixed" in r.label).layers(model)
    upgraded = sorted({int(n.split(".")[1].split("/")[0]) for n, s in mixed.items() if "layers" in n and "w8" in s})
    assert upgraded == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29]
    assert all(("qkv" in n or "down" in n) for n, s in mixed.items() if "layers" in n and "w8" in s)
    assert mixed["/lm_head/MatMul"] == "w8g32-kquant-acc4" and mixed["/model/embed_tokens/Gather"] == "w8g32-kquant"
    assert sum(s == "w8g32-kquant-acc4" for s in mixed.values()) == 29


@pytest.mark.slow
def test_a_hugging_face_folder_and_a_text_file_are_searched_in_one_command(decoder, tmp_path):
    """`autoq search HF_FOLDER --text FILE`: the folder is exported once, the text cut into windows by the model's
    tokenizer, scored by perplexity on the language-model space; a rerun reuses the export. Bad folders, empty or
    short text and --text with a model file are one-line errors (exit 2)."""
    import subprocess
    import sys

    from autoq.demo import sentences

    hf_dir = decoder[0]
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(sentences(500, seed=3)))
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "autoq", "search", str(hf_dir), "--text", str(text), "--trials", "3",
                           "--out", str(out), "--recipes", "none", "--quiet"], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["metric"] == "ppl_ratio" and meta["space"] == "llm-cpu"
    trials = pd.read_csv(out / "trials.csv")
    assert trials.loc[trials["baseline"] == "uniform-fp32", "quality"].iloc[0] == pytest.approx(1.0)
    assert trials["executed_ok"].all() and trials["summary"].str.contains("w8g|w4g").any()  # MatMulNBits points
    assert "exporting" in done.stdout and len(list((out / "cache" / "causal-lm").glob("windows-*.npz"))) == 1

    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("a few words only")
    for args, message in (([str(tmp_path), "--text", str(text)], "not a Hugging Face model folder"),
                          ([str(hf_dir), "--text", str(tmp_path / "empty.txt")], "is empty"),
                          ([str(hf_dir), "--text", str(tmp_path / "short.txt")], "tokens: at least 1025"),
                          ([str(hf_dir)], "with --text FILE"),
                          ([str(decoder[1]), "--text", str(text)], "--text goes with a Hugging Face")):
        bad = subprocess.run([sys.executable, "-m", "autoq", "search", *args, "--out", str(out), "--quiet"],
                             capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, (
            args, bad.stderr)
