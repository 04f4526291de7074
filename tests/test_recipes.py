"""The runtime's one-line recipes measured beside the front: verdicts, failures recorded, the report."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

import autoq
from autoq.cli import main
from autoq.recipes import summary, verdicts
from tests.models import conv_only


def _front() -> pd.DataFrame:
    return pd.DataFrame({"point": [0, 1, 2], "quality": [0.95, 0.99, 1.0], "val_quality": [0.96, 0.99, 1.0],
                         "speedup": [2.0, 1.5, 1.0], "val_fp32_latency_ms": [10.0, 10.0, 10.0],
                         "val_measured_latency_ms": [5.0, 6.25, 10.0], "size_bytes": [25, 30, 100]})


def test_verdicts_name_the_dominating_point_that_saves_the_most_latency():
    recipes = pd.DataFrame([
        {"recipe": "dyn", "val_quality": 0.95, "val_latency_ms": 7.0, "speedup": 1.25, "size_bytes": 30, "error": ""},
        {"recipe": "static", "val_quality": 0.995, "val_latency_ms": 5.0, "speedup": 2.0, "size_bytes": 100,
         "error": ""},
        {"recipe": "twin", "val_quality": 1.0, "val_latency_ms": 9.7, "speedup": 1.03, "size_bytes": 100, "error": "",
         "quality_spread": 0.0, "speedup_spread": 0.05},
        {"recipe": "broken", "error": "ValueError: it quantized nothing"}])
    table = verdicts(_front(), recipes).set_index("recipe")
    # on validation, point 0 runs 2.0x FP32 and point 1 1.6x: both dominate "dyn"; point 0 saves the most
    assert table.loc["dyn", "dominated_by"] == 0
    assert abs(table.loc["dyn", "latency_saved"] - (1 - 1.25 / 2.0)) < 1e-9
    assert table.loc["dyn", "verdict"].startswith("dominated by point 0: 38% less latency")
    assert pd.isna(table.loc["static", "dominated_by"])
    assert table.loc["static", "verdict"] == ("not dominated; the fastest point at about its quality and no larger, "
                                              "point 2: 0.50x its speed (+-0.00)")
    # FP32 itself, timed 3% faster as a recipe: point 2 is within that recipe's speed spread, so it matches
    assert pd.isna(table.loc["twin", "dominated_by"]) and table.loc["twin", "matched_by"] == 2
    assert table.loc["twin", "verdict"].startswith("matched within its measurement spread by point 2")
    assert table.loc["broken", "verdict"] == "failed: ValueError: it quantized nothing"
    line = summary(table.reset_index())
    assert line == ("recipes: the front dominates 1 of 3 measured and matches 1 within their measurement spread; "
                    "NOT dominated: static; 1 failed to build (see recipes.csv)")


def test_verdicts_read_the_points_timed_side_by_side_with_the_recipe():
    """Stored speed-ups measured minutes apart say point 1 (as good, smaller) is slower than the recipe; timed
    against it in one set of rounds it is 1.1x faster: dominated. Only points at the recipe's quality (within its
    spread) and size are timed, the fastest first; an interval reaching 1 is a match, below 1 not dominated."""
    recipes = pd.DataFrame([{"recipe": "r", "val_quality": 0.985, "val_latency_ms": 5.0, "speedup": 2.0,
                             "size_bytes": 100, "error": "", "quality_spread": 0.01, "speedup_spread": 0.0}])
    asked = []
    for timed, verdict in [({1: (1.1, 1.05, 1.2), 2: (0.6, 0.55, 0.65)}, "dominated by point 1: 9% less latency"),
                           ({1: (0.97, 0.9, 1.02), 2: (0.6, 0.55, 0.65)}, "matched within its measurement spread "
                                                                            "by point 1"),
                           ({1: (0.9, 0.85, 0.95), 2: (0.6, 0.55, 0.65)}, "not dominated; the fastest point at about "
                                                                            "its quality and no larger, point 1")]:
        def side_by_side(points, row, timed=timed):
            asked.append(points)
            return {p: timed[p] for p in points}

        text = verdicts(_front(), recipes, side_by_side)["verdict"].iloc[0]
        assert text.startswith(verdict) and "timed side by side" in text
    assert asked[0] == [1, 2]  # point 0 (quality 0.96 < 0.985) is not timed; the fastest by stored speed first


def test_a_point_larger_than_the_recipe_does_not_dominate_it():
    """A recipe smaller than every point is not dominated however slow it is; the verdict says what its size
    costs: the fastest point at its quality, how much larger and how much faster."""
    recipes = pd.DataFrame([{"recipe": "tiny", "val_quality": 0.9, "val_latency_ms": 9.0, "speedup": 1.1,
                             "size_bytes": 20, "error": ""}])
    assert verdicts(_front(), recipes)["verdict"].iloc[0] == (
        "not dominated; every point at about its quality is larger: the fastest, point 0, is 25.0% larger at 1.82x "
        "its speed (stored figures)")
    recipes.loc[0, "val_quality"] = 1.01  # no point reaches its quality
    assert verdicts(_front(), recipes)["verdict"].iloc[0] == "not dominated"


def test_a_recipe_that_cannot_build_is_recorded_and_the_run_goes_on(tmp_path, capsys):
    model, samples = conv_only(tmp_path)
    result = autoq.search(model, samples, trials=4, out=tmp_path / "run", progress=False)
    table = result.recipes.set_index("recipe")
    assert table.loc["ORT quantize_dynamic, MatMul/Gemm", "error"].startswith("ValueError: it quantized nothing")
    static = table.loc["ORT quantize_static U8S8, all ops"]
    assert static["error"] == "" and 0.5 < static["val_quality"] <= 1 and static["speedup"] > 0
    assert static["verdict"].startswith(("dominated by point", "not dominated"))
    # its contenders were re-run against it, not judged by stored figures (none exists: every point is larger)
    assert "timed side by side" in static["verdict"] or static["verdict"].startswith(
        "not dominated; every point at about its quality is larger") or static["verdict"] == "not dominated"
    saved = pd.read_csv(tmp_path / "run" / "recipes.csv", keep_default_na=False).set_index("recipe")
    assert saved.loc["ORT quantize_dynamic, MatMul/Gemm", "verdict"].startswith("failed: ValueError")
    page = (tmp_path / "run" / "report.html").read_text()
    assert "one-line recipes" in page and "ORT quantize_static U8S8, weight ops" in page

    # autoq verify re-times FP32, every front point and every recipe that built: one row each, with an interval;
    # it feeds the cached calibration samples, not another cache beside them (SmoothQuant's channel maxima)
    ranges = next((tmp_path / "run" / "cache").glob("calibration-*-minmax-*[0-9a-f].json"))
    np.savez(ranges.with_name(ranges.stem + "-channel-max.npz"), **{"not_an_input": np.zeros(3)})
    assert main(["verify", str(tmp_path / "run"), "--rounds", "5", "--passes", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header, rows = lines[0].split(), lines[1:]
    assert header[:2] == ["model", "ms"] and "low" in header and "high" in header
    assert len(rows) == 1 + len(result.front) + 2
    assert rows[0].startswith("FP32") and sum(r.startswith("recipe: ORT quantize_static") for r in rows) == 2
    for row in rows:
        ratio, low, high = (float(v) for v in row.split()[-3:])
        assert 0 < low <= ratio <= high
    fp32_ratio = [float(v) for v in rows[0].split()[-3:]]
    assert fp32_ratio == [1.0, 1.0, 1.0]
    # the API function stays the API function once its module has been imported (it is callable twice)
    again = autoq.verify(tmp_path / "run", rounds=4, passes=2, pass_pause_s=0)
    assert callable(autoq.verify) and len(again) == len(rows)
    # a later verify sets each ratio beside the first verify's (kept in verify.json) and says whether it falls
    # inside that interval
    kept = json.loads((tmp_path / "run" / "verify.json").read_text())
    for row in again.itertuples(index=False):
        ratio, low, high = kept["ratios"][row.model]
        assert row.first == ratio and row[-1] == (low <= row[2] <= high)
    start, end = again.attrs["fp32_ms_start_end"]
    assert start > 0 and end > 0 and again.attrs["drifted"] == (abs(end / start - 1) > 0.15)
    # the first verify's FP32 speed is kept; a later verify on a host three times faster says so
    assert again.attrs["fp32_ms_first_verify"] == kept["fp32_ms"] > 0
    (tmp_path / "run" / "verify.json").write_text(json.dumps({**kept, "fp32_ms": kept["fp32_ms"] * 3}))
    assert main(["verify", str(tmp_path / "run"), "--rounds", "2", "--passes", "1"]) == 0
    err = capsys.readouterr().err  # notes beside the table, not rows
    assert "not as loaded as it was then" in err and "fall inside the 95% intervals of this run's first verify" in err


def test_files_timed_beside_a_run_stay_apart_when_their_names_match(tmp_path):
    """`autoq verify --against a/model.onnx --against b/model.onnx` times both files, labelled apart."""
    from autoq.retime import run_models

    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame({"point": [0], "model": [None], "summary": ["fp32 x1"]}).to_csv(run / "pareto.csv", index=False)
    files = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        files.append(tmp_path / folder / "model.onnx")
        files[-1].write_bytes(b"onnx")
    models = run_models(run, tmp_path / "fp32.onnx", [0], files)
    assert [path for path, _ in models.values()][1:] == files and len(set(models)) == 3


def test_verify_says_when_the_machine_changed_speed_while_timing():
    """FP32's rounds, in time order: steady with noise is not drift; a host that got 40% slower midway is."""
    from autoq.retime import fp32_drift

    rng = np.random.default_rng(0)
    steady = 5.0 + rng.normal(0, 0.1, 30)
    assert fp32_drift(steady)[2] is False
    slower = np.concatenate([steady[:15], 7.0 + rng.normal(0, 0.1, 15)])
    start, end, drifted = fp32_drift(slower)
    assert drifted is True and start < 5.2 and end > 6.8


def test_a_point_equal_in_quality_up_to_float_rounding_dominates():
    """The FP32 recipe scores exactly 1.0; a float point of the front scores 0.99999994 (another summation order):
    equal quality, faster, no larger: dominated, not 'not dominated'."""
    front = pd.DataFrame({"point": [0], "quality": [0.99999994], "val_quality": [0.99999994],
                          "val_fp32_latency_ms": [10.0], "val_latency_ms": [8.0], "latency_ms": [8.0],
                          "speedup": [1.25], "size_bytes": [4_916_258]})
    recipes = pd.DataFrame({"recipe": ["OpenVINO f32"], "val_quality": [1.0], "val_latency_ms": [10.3],
                            "speedup": [0.97], "size_bytes": [4_916_925], "model": ["m"], "options": ["{}"],
                            "error": [""], "quality_spread": [0.0], "speedup_spread": [0.03]})
    verdict = verdicts(front, recipes).iloc[0]
    assert verdict["dominated_by"] == 0 and verdict["verdict"].startswith("dominated by point 0")


def test_recipes_that_all_built_read_back_without_a_warning(tmp_path):
    """recipes.csv with no failed recipe has an all-empty error column (read back as NaN floats): the summary
    and the report treat it as 'no error' and say nothing on the user's terminal (warnings are errors here)."""
    from autoq.recipes import summary
    from autoq.reporting.html import recipe_verdicts_html

    path = tmp_path / "recipes.csv"
    pd.DataFrame([{"recipe": "r", "val_quality": 0.9, "val_latency_ms": 9.0, "speedup": 1.1, "size_bytes": 20,
                   "error": "", "verdict": "not dominated", "dominated_by": None, "matched_by": None}]
                 ).to_csv(path, index=False)
    table = pd.read_csv(path)
    assert table["error"].isna().all()
    assert "NOT dominated: r" in summary(table)
    assert "does not dominate" in recipe_verdicts_html(table)[0]


def test_a_tie_is_a_match_and_the_point_better_beyond_the_spread_dominates():
    """The demo's case: the recipe's own graph (point 0) times 1.02x the recipe, 95% 0.98-1.14, at equal quality: a
    match, not domination. A point with quality better than the recipe's beyond its spread, at a speed whose
    interval reaches 1, dominates, and the verdict names it."""
    front = pd.DataFrame({"point": [0, 1], "quality": [0.97, 0.994], "val_quality": [0.97, 0.994],
                          "speedup": [1.5, 1.48], "size_bytes": [50, 50]})
    recipe = {"recipe": "quantize_dynamic", "val_quality": 0.97, "val_latency_ms": 5.0, "speedup": 1.5,
              "size_bytes": 50, "error": "", "quality_spread": 0.004, "speedup_spread": 0.0}

    def timed(ratios):
        return lambda points, row: {p: ratios[p] for p in points}

    tie = verdicts(front.iloc[:1], pd.DataFrame([recipe]), timed({0: (1.02, 0.98, 1.14)})).iloc[0]
    assert pd.isna(tie["dominated_by"]) and tie["matched_by"] == 0 and tie["verdict"].startswith("matched")
    both = verdicts(front, pd.DataFrame([recipe]), timed({0: (1.02, 0.98, 1.14), 1: (0.99, 0.95, 1.05)})).iloc[0]
    assert both["dominated_by"] == 1 and both["verdict"].startswith("dominated by point 1: quality 0.9940 > 0.9700")
    slower = verdicts(front, pd.DataFrame([recipe]), timed({0: (1.02, 0.98, 1.14), 1: (0.9, 0.85, 0.95)})).iloc[0]
    assert pd.isna(slower["dominated_by"]) and slower["matched_by"] == 0


def test_a_recipe_below_the_usable_floor_is_unusable_not_undominated():
    """A recipe whose quality is under the search's floor (--max-drop, or a model that ignores its input) is
    'unusable' with its quality, and the summary does not list it as NOT dominated."""
    recipes = pd.DataFrame([
        {"recipe": "all ops", "val_quality": 0.36, "val_latency_ms": 3.0, "speedup": 3.3, "size_bytes": 10,
         "error": ""},
        {"recipe": "dyn", "val_quality": 0.95, "val_latency_ms": 7.0, "speedup": 1.25, "size_bytes": 30, "error": ""}])
    table = verdicts(_front(), recipes, usable=(0.4, "no better than a model that ignores its input: 0.4000"))
    assert table["verdict"].iloc[0] == ("unusable: quality 0.3600 (no better than a model that ignores its input: "
                                        "0.4000)")
    assert pd.isna(table["dominated_by"].iloc[0]) and table["dominated_by"].iloc[1] == 0
    assert summary(table) == ("recipes: the front dominates 1 of 2 measured; 1 unusable (quality below the usable "
                              "floor)")
