from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
from onnx import numpy_helper

import autoq
from autoq import data, graph
from autoq import seeds as seeding
from autoq import sensitivity as sens
from autoq.backends import get_backend
from autoq.calibrate import calibrate
from autoq.errors import AutoqError
from autoq.evaluate import Evaluator
from autoq.metrics import accuracy
from autoq.precision import Assignment


@pytest.fixture(scope="module")
def fragile_cnn(digits_cnn, digits_npz, tmp_path_factory) -> Path:
    """The digits CNN with fc1 made fragile: its most active output channel scaled x1000 and fc2 scaled back,
    so FP32 computes the same function (ReLU commutes with positive scaling) but int8 activations around fc1
    lose every other channel."""
    model = onnx.load(str(digits_cnn))
    weights = {t.name: t for t in model.graph.initializer}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(gemms[0].output[0]))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    fc1_out = session.run([gemms[0].output[0]], {"image": np.load(digits_npz)["image"]})[0]
    k = int(np.maximum(fc1_out, 0).mean(axis=0).argmax())
    fc1_w, fc1_b, fc2_w = gemms[0].input[1], gemms[0].input[2], gemms[1].input[1]
    for name, index, factor in ((fc1_w, np.s_[k, :], 1000.0), (fc1_b, np.s_[k], 1000.0),
                                (fc2_w, np.s_[:, k], 1e-3)):
        array = numpy_helper.to_array(weights[name]).copy()
        array[index] *= factor
        weights[name].CopyFrom(numpy_helper.from_array(array, name))
    path = tmp_path_factory.mktemp("fragile") / "fragile.onnx"
    onnx.save(model, str(path))
    return path


def _evaluator(model_path: Path, npz: Path, workdir: Path) -> Evaluator:
    model = graph.prepare(model_path, workdir)
    splits = data.split(data.load(npz, "label"))
    calibration = calibrate(model, splits.calibration, workdir / "cache")
    return Evaluator(get_backend("onnxruntime"), model, calibration, splits, accuracy, 1)


@pytest.fixture(scope="module")
def scores(fragile_cnn, digits_cnn, digits_npz, tmp_path_factory):
    result = {}
    for name, path in (("fragile", fragile_cnn), ("plain", digits_cnn)):
        evaluator = _evaluator(path, digits_npz, tmp_path_factory.mktemp(name))
        choices = {n: ["fp32", "int8"] for n in evaluator.model.layer_names}
        result[name] = {m: sens.analyse(evaluator, choices, m) for m in ("measured", "sqnr")}
        result[name]["layers"] = evaluator.model.layer_names
        evaluator.close()
    return result


def test_fragile_model_is_the_same_function_in_fp32(fragile_cnn, digits_cnn, digits_npz):
    images = np.load(digits_npz)["image"]
    outputs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"image": images})[0]
               for p in (digits_cnn, fragile_cnn)]
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method", ["measured", "sqnr"])
def test_the_fragile_layer_ranks_most_sensitive(scores, method):
    table = scores["fragile"][method]
    fc1 = scores["fragile"]["layers"][2]
    ranking = list(table.sort_values("score", ascending=False)["layer"])
    assert ranking[0] == fc1


def test_measured_drop_is_large_only_where_the_model_was_made_fragile(scores):
    fragile = scores["fragile"]["measured"].set_index("layer")["quality_drop"]
    plain = scores["plain"]["measured"].set_index("layer")["quality_drop"]
    fc1 = scores["fragile"]["layers"][2]
    assert fragile[fc1] > 0.2 and fragile[fc1] > plain[fc1] + 0.2
    conv1 = scores["fragile"]["layers"][0]
    assert abs(fragile[conv1] - plain[conv1]) < 0.05
    assert (scores["fragile"]["measured"]["drop_spread"] >= 0).all()


def test_savings_and_table_columns(scores):
    table = scores["plain"]["measured"]
    assert list(table.columns) == sens.COLUMNS
    assert (table["size_saving_bytes"] > 0).all()
    assert table["latency_saving_ms"].notna().all()


def test_cache_is_reused_when_inputs_match_and_refreshed_when_they_change(digits_cnn, digits_npz, tmp_path,
                                                                          monkeypatch):
    evaluator = _evaluator(digits_cnn, digits_npz, tmp_path / "a")
    choices = {n: ["fp32", "int8"] for n in evaluator.model.layer_names}
    first = sens.analyse(evaluator, choices, "sqnr", tmp_path / "cache")
    evaluator.close()

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although nothing changed")

    monkeypatch.setattr(sens, "sqnr_rows", fail)
    evaluator = _evaluator(digits_cnn, digits_npz, tmp_path / "b")
    pd.testing.assert_frame_equal(sens.analyse(evaluator, choices, "sqnr", tmp_path / "cache"), first)
    monkeypatch.undo()
    fewer = {n: (["fp32"] if i == 0 else c) for i, (n, c) in enumerate(choices.items())}  # the space changed
    sens.analyse(evaluator, fewer, "sqnr", tmp_path / "cache")
    other = tmp_path / "other.npz"
    with np.load(digits_npz) as npz:
        np.savez(other, image=npz["image"][:120], label=npz["label"][:120])
    changed = _evaluator(digits_cnn, other, tmp_path / "c")  # the data changed
    sens.analyse(changed, choices, "sqnr", tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("sensitivity-sqnr-*.csv"))) == 3
    evaluator.close()
    changed.close()


def test_greedy_seeds_quantize_least_costly_layers_first(scores):
    table = scores["fragile"]["measured"]
    layers = scores["fragile"]["layers"]
    choices = {n: ["fp32", "int8"] for n in layers}
    seeds = seeding.greedy_seeds(table, choices, fractions=(0.25, 0.5, 1.0))
    counts = [s.counts().get("int8", 0) for s in seeds]
    assert counts == [1, 2, 4]
    fc1, fc2 = layers[2:]
    assert seeds[1].layers[fc1] == "fp32" and seeds[1].layers[fc2] == "fp32"  # the fragile pair stays fp32


def test_prune_removes_precisions_too_costly_alone(scores):
    table = scores["fragile"]["measured"]
    layers = scores["fragile"]["layers"]
    pruned = sens.prune({n: ["fp32", "int8"] for n in layers}, table, max_drop=0.1)
    assert pruned[layers[2]] == ["fp32"] and pruned[layers[0]] == ["fp32", "int8"]


def test_search_is_seeded_and_pruned_by_measured_sensitivity(fragile_cnn, digits_npz, tmp_path):
    space = {"default": ["fp32", "int8"], "sensitivity": "measured", "max_layer_drop": 0.1, "population": 4}
    result = autoq.search(fragile_cnn, digits_npz, labels="label", space=space, trials=3, out=tmp_path / "run",
                          progress=False)
    trials = result.trials
    assert len(trials) == 3, "greedy seeds left over by a short budget are not listed as trials"
    assert list(trials["baseline"][:2]) == ["uniform-fp32", "uniform-int8"]
    assert trials["seeded"][2:4].all()
    fc1 = graph.find_layers(onnx.load(str(fragile_cnn)))[2].name
    # after the baselines, pruning means fc1 is never int8 again
    assert all('"' + fc1 + '": "fp32"' in a for a in trials["assignment"][1:].loc[lambda s: s.index > 1])
    assert (tmp_path / "run" / "sensitivity.csv").is_file()
    assert "Per-layer sensitivity" in (tmp_path / "run" / "report.html").read_text()


def test_sensitivity_command_and_hessian_error(digits_cnn, digits_npz, tmp_path):
    out = tmp_path / "sens"
    run = subprocess.run([sys.executable, "-m", "autoq", "sensitivity", str(digits_cnn), "--data", str(digits_npz),
                          "--labels", "label", "--method", "sqnr", "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    table = pd.read_csv(out / "sensitivity.csv")
    assert len(table) == 4 and table["sqnr_db"].notna().all()
    assert (out / "sensitivity.html").is_file()
    hessian = subprocess.run([sys.executable, "-m", "autoq", "sensitivity", str(digits_cnn), "--data",
                              str(digits_npz), "--labels", "label", "--method", "hessian", "--out", str(out)],
                             capture_output=True, text=True)
    assert hessian.returncode == 2 and "needs a torch nn.Module" in hessian.stderr
    assert len(hessian.stderr.strip().splitlines()) == 1
    with pytest.raises(AutoqError, match="unknown sensitivity method"):
        sens.analyse(None, {}, "magic")


def test_greedy_seeds_skip_a_precision_that_makes_the_model_slower(scores):
    """bf16 without native bf16 costs almost no quality but slows every layer: it must not lead the order."""
    table = scores["fragile"]["measured"].assign(latency_saving_ms=0.5)
    layers = scores["fragile"]["layers"]
    slow = table[table["precision"] == "int8"].assign(precision="bf16", score=0.0,
                                                      latency_saving_ms=-1.0)
    seeds = seeding.greedy_seeds(pd.concat([table, slow]), {n: ["fp32", "bf16", "int8"] for n in layers})
    assert seeds and all("bf16" not in s.layers.values() for s in seeds)


def test_greedy_seeds_order_layers_without_profiled_savings_tables_included():
    """A backend with no per-layer profiler (LiteRT) leaves every saving empty; an embedding table has no MACs:
    the order then follows MACs and parameters, the cheapest in quality first, and nothing divides by zero."""
    rows = [{"layer": "table", "precision": "w8", "latency_saving_ms": None, "score": -40.0, "macs": 0,
             "params": 10_000},
            {"layer": "big", "precision": "int8", "latency_saving_ms": None, "score": -20.0, "macs": 5000,
             "params": 500},
            {"layer": "small", "precision": "int8", "latency_saving_ms": None, "score": -20.0, "macs": 50,
             "params": 50}]
    table = pd.DataFrame(rows).astype({"latency_saving_ms": object})
    choices = {"table": ["fp32", "w8"], "big": ["fp32", "int8"], "small": ["fp32", "int8"]}
    seeds = seeding.greedy_seeds(table, choices, fractions=(0.34, 0.67, 1.0))
    quantized = [sorted(n for n, p in s.layers.items() if p != "fp32") for s in seeds]
    assert quantized == [["table"], ["big", "table"], ["big", "small", "table"]]


def test_fallback_seeds_protect_the_fast_precisions_most_fragile_layers():
    """Ten layers, a fast spec (saves 1 ms each, layer l9 most fragile) and an accurate slower one: the seeds put
    the fast spec everywhere but the most fragile 10% / 30%, which get the accurate spec or fp32; an embedding
    table that offers only w4g32 (no latency cost) takes it, but where fp32 protects layers it stays fp32."""
    layers = [f"l{i}" for i in range(10)]
    rows = [{"layer": n, "precision": "int8-dyn", "latency_saving_ms": 1.0, "score": float(i), "macs": 1}
            for i, n in enumerate(layers)]
    rows += [{"layer": n, "precision": "w8g128-acc4", "latency_saving_ms": 0.5, "score": -50.0, "macs": 1}
             for n in layers]
    rows += [{"layer": n, "precision": "w4g32", "latency_saving_ms": -0.1, "score": 5.0, "macs": 1} for n in layers]
    rows += [{"layer": "table", "precision": "w4g32", "latency_saving_ms": 0.0, "score": 20.0, "macs": 0,
              "size_saving_bytes": 1e6}]
    choices = {n: ["fp32", "int8-dyn", "w8g128-acc4", "w4g32"] for n in layers} | {"table": ["fp32", "w4g32"]}
    seeds = seeding.fallback_seeds(pd.DataFrame(rows).fillna({"size_saving_bytes": 0}), choices, fractions=(0.1, 0.3))
    fp32_protected = [s for s in seeds if "fp32" in {s.layers[n] for n in layers}]
    assert fp32_protected and all(s.layers["table"] == "fp32" for s in fp32_protected)  # they seek quality
    assert all(s.layers["table"] == "w4g32" for s in seeds if s not in fp32_protected)  # else: the smallest free one
    protected = [{n for n, p in s.layers.items() if p == "w8g128-acc4"} for s in seeds
                 if {s.layers[n] for n in layers} == {"int8-dyn", "w8g128-acc4"}]
    assert {"l9"} in protected and {"l9", "l8", "l7"} in protected
    assert any(all(s.layers[n] == "int8-dyn" for n in layers) for s in seeds)  # and the fast end alone
    assert any({p for n, p in s.layers.items() if n != "table"} == {"fp32", "int8-dyn"} for s in seeds)
    assert not any("w4g32" in [p for n, p in s.layers.items() if n != "table"] for s in seeds)  # slower: never fast
    only_fp32 = seeding.fallback_seeds(pd.DataFrame(rows).fillna({"size_saving_bytes": 0}), choices,
                                       fractions=(0.1, 0.3), fp32_only=True)
    assert only_fp32 and all(len({s.layers[n] for n in layers} - {"fp32"}) == 1 for s in only_fp32)  # fast + fp32
    assert {s.key() for s in only_fp32} < {s.key() for s in seeds}


def test_fallback_seeds_protect_a_few_layers_of_a_large_model_with_the_safest_spec():
    """Of 200 layers, the 1% and 3% most fragile (2 and 6) take the safest spec that saves latency, the rest the
    fast one: the int4-body, 8-bit-head size class a language model's recipes sit in. fp32 protects no such few."""
    layers = [f"l{i}" for i in range(200)]
    rows = [{"layer": n, "precision": "w4g32-acc4", "latency_saving_ms": 1.0, "score": float(i)}
            for i, n in enumerate(layers)]
    rows += [{"layer": n, "precision": "w8g32-acc4", "latency_saving_ms": 0.6, "score": float(i) - 500}
             for i, n in enumerate(layers)]
    choices = {n: ["fp32", "w4g32-acc4", "w8g32-acc4"] for n in layers}
    seeds = seeding.fallback_seeds(pd.DataFrame(rows).assign(size_saving_bytes=0.0), choices)
    safe = [{n for n, p in s.layers.items() if p == "w8g32-acc4"} for s in seeds]
    assert {"l199", "l198"} in safe and {f"l{i}" for i in range(194, 200)} in safe
    assert not any(len({n for n, p in s.layers.items() if p == "fp32"}) in (2, 6) for s in seeds)


def test_fallback_seeds_use_the_nearly_as_fast_spec_and_cheap_tables():
    """int8-dyn-pc saves nearly what int8-dyn saves and is more accurate: seeds protect int8-dyn's fragile layers
    with it (up to half of them). A big table whose int4 form costs 1% of the saving takes it; a small one whose
    int4 form costs 5% stays fp32."""
    layers = [f"l{i}" for i in range(10)]
    rows = [{"layer": n, "precision": "int8-dyn", "latency_saving_ms": 1.0, "score": float(i)}
            for i, n in enumerate(layers)]
    rows += [{"layer": n, "precision": "int8-dyn-pc", "latency_saving_ms": 0.95, "score": float(i) - 20}
             for i, n in enumerate(layers)]
    rows += [{"layer": "words", "precision": "w4g32", "latency_saving_ms": -0.1, "score": 20.0,
              "size_saving_bytes": 4e7},
             {"layer": "positions", "precision": "w4g32", "latency_saving_ms": -0.5, "score": 20.0,
              "size_saving_bytes": 6e5}]
    choices = {n: ["fp32", "int8-dyn", "int8-dyn-pc"] for n in layers} | {t: ["fp32", "w4g32"]
                                                                         for t in ("words", "positions")}
    seeds = seeding.fallback_seeds(pd.DataFrame(rows).fillna({"size_saving_bytes": 0}), choices)
    mixes = [{n for n, p in s.layers.items() if p == "int8-dyn-pc"} for s in seeds
             if {s.layers[n] for n in layers} == {"int8-dyn", "int8-dyn-pc"}]
    assert {"l9"} in mixes and {"l9", "l8", "l7", "l6", "l5"} in mixes
    with_tables = [s for s in seeds if s.layers["l0"] == "int8-dyn" and "fp32" not in {s.layers[n] for n in layers}]
    assert with_tables and all(s.layers["words"] == "w4g32" and s.layers["positions"] == "fp32"
                               for s in with_tables)


def test_recipe_seeds_start_at_each_recipe_and_at_its_mix_placed_by_sensitivity():
    """Ten blocks of a w4 body with a w8 head (NNCF's int4 shape; l9 is most fragile under w4, the head l0 is not):
    the recipe as it is, then w8 on 1 layer (l9, not the head), on 20% and 40% (l9..l8, l9..l6), the others' w4
    group kept. A recipe with a spec the space leaves out is no seed; without a table, only the recipes."""
    layers = [f"l{i}" for i in range(10)]
    rows = [{"layer": n, "precision": "w4g64" if i % 2 else "w4g128", "score": float(i)} for i, n in enumerate(layers)]
    rows += [{"layer": n, "precision": "w4g64", "score": float(i)} for i, n in enumerate(layers) if i % 2 == 0]
    rows += [{"layer": n, "precision": "w8-asym", "score": -100.0 + i} for i, n in enumerate(layers)]
    choices = {n: ["fp32", "w4g64", "w4g128", "w8-asym"] for n in layers} | {"table": ["fp32", "w8-asym"]}
    recipe = {"l0": "w8-asym", "table": "w8-asym"} | {n: "w4g64" if i % 2 else "w4g128"
                                                       for i, n in enumerate(layers) if i}
    unexpressible = dict.fromkeys(layers, "w4g32")
    table = pd.DataFrame(rows).assign(latency_saving_ms=1.0, size_saving_bytes=0.0)
    seeds = seeding.recipe_seeds([recipe, unexpressible], table, choices)
    assert seeds[0].layers == recipe
    rebalanced = [s for s in seeds if s.layers["l0"] == "w4g64" and s.layers["l2"] == "w4g128"
                  and s.layers["table"] == "w8-asym"]  # the head leaves w8 for the recipe's most common spec
    eights = [{n for n in layers if s.layers[n] == "w8-asym"} for s in rebalanced]
    assert eights == [{"l9"}, {"l9", "l8"}, {"l9", "l8", "l7", "l6"}]
    assert [s.layers for s in seeding.recipe_seeds([recipe, unexpressible], None, choices)] == [recipe]
    assert len(seeds) == 1 + 3 + 1  # the recipe, rebalanced thrice, and at its size (`at_size`)
    kept = seeding.recipe_seeds([recipe], table, choices, keep=frozenset({"l9"}))
    assert all(s.layers["l9"] == "w4g64" for s in kept) and any(s.layers["l8"] == "w8-asym" for s in kept)


def test_at_size_moves_bytes_from_robust_layers_to_fragile_ones_at_the_same_size():
    """All-w4g32 (100 bytes saved per layer): the robust half takes w4g128 (faster, 10 bytes smaller each), and 90%
    of the 50 bytes freed buy w8 (35 bytes larger) for the most fragile layer, l9, and no more; a kept layer (a tied
    head) is not moved, so the next most fragile gets the bytes (36, from 4 of the 9 others)."""
    layers = [f"l{i}" for i in range(10)]
    rows = [{"layer": n, "precision": p, "score": score, "latency_saving_ms": fast, "size_saving_bytes": saved}
            for i, n in enumerate(layers)
            for p, score, fast, saved in (("w4g32", i - 0.5, 0.8, 100.0), ("w4g128", float(i), 1.0, 110.0),
                                          ("w8", -100.0 + i, 0.5, 65.0))]
    choices = {n: ["fp32", "w4g32", "w4g128", "w8"] for n in layers}
    seed = Assignment(dict.fromkeys(layers, "w4g32"))
    resized = seeding.at_size(seed, pd.DataFrame(rows), choices)
    assert resized.layers == {**dict.fromkeys(layers[:5], "w4g128"), **dict.fromkeys(layers[5:9], "w4g32"), "l9": "w8"}
    kept = seeding.at_size(seed, pd.DataFrame(rows), choices, keep=frozenset({"l9"}))
    assert kept.layers["l9"] == "w4g32" and kept.layers["l8"] == "w8"


def test_a_recipe_seed_has_its_learned_twin_where_the_space_offers_one():
    """A recipe is also tried with learned rounding on the layers whose space offers the learned form of the same
    bits and blocks (the same kernels and bytes), k-quants included (on their zero-pointed grid where offered, else
    the symmetric one); a spec without one (dynamic int8, or where the space has none) and a kept layer (a tied
    head) stay as they are."""
    choices = {"a": ["fp32", "w4g32-acc4", "w4g32-adaround-acc4"], "b": ["fp32", "w4g32-acc4"],
               "c": ["fp32", "int8-dyn"], "d": ["fp32", "w4g32-kquant-acc4", "w4g32-adaround-acc4"],
               "e": ["fp32", "w4g32-acc4", "w4g32-adaround-acc4"],
               "f": ["fp32", "w4g32-kquant-acc4", "w4g32-adaround-acc4", "w4g32-asym-adaround-acc4"],
               "g": ["fp32", "w4g32-kquant-acc4", "w4g32-asym-adaround-acc4", "w4g32-asym-gptq-acc4"]}
    recipe = {"a": "w4g32-acc4", "b": "w4g32-acc4", "c": "int8-dyn", "d": "w4g32-kquant-acc4", "e": "w4g32-acc4",
              "f": "w4g32-kquant-acc4", "g": "w4g32-kquant-acc4"}
    twin = {**recipe, "a": "w4g32-adaround-acc4", "d": "w4g32-adaround-acc4", "f": "w4g32-asym-adaround-acc4",
            "g": "w4g32-asym-gptq-acc4"}  # GPTQ first where both are offered
    assert seeding.learned_twin(Assignment(recipe), choices, frozenset({"e"})).layers == twin
    assert [s.layers for s in seeding.recipe_seeds([recipe], None, choices, keep=frozenset({"e"}))] == [recipe, twin]
    for name in ("a", "d", "e", "f", "g"):
        choices[name] = [c for c in choices[name] if "adaround" not in c and "gptq" not in c]
    assert [s.layers for s in seeding.recipe_seeds([recipe], None, choices)] == [recipe]  # no twin: no duplicate
