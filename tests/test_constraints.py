from __future__ import annotations

import pandas as pd
import pytest

import autoq
from autoq.constraints import Constraints
from autoq.errors import AutoqError


def test_amounts_and_drops_parse_with_units():
    c = Constraints.parse("0.5%", "2s", "20MB")
    assert (c.max_drop, c.relative, c.latency_budget_ms, c.size_budget_bytes) == (0.005, True, 2000.0, 2e7)
    absolute = Constraints.parse(0.01, "5ms", "512kb")
    assert (absolute.max_drop, absolute.relative, absolute.latency_budget_ms) == (0.01, False, 5.0)
    assert absolute.size_budget_bytes == 512e3


@pytest.mark.parametrize(("args", "message"), [(("lots", None, None), "--max-drop 'lots'"),
                                               ((None, "fast", None), "--latency-budget 'fast'"),
                                               ((None, None, "20 parsecs"), "--size-budget")])
def test_bad_constraints_say_what_to_give(args, message):
    with pytest.raises(AutoqError, match=message):
        Constraints.parse(*args)


def test_violations_are_non_positive_exactly_when_met():
    c = Constraints.parse("1%", "10ms", "1MB")
    assert all(v <= 0 for v in c.violations((0.995, 9.0, 9e5), fp32_quality=1.0))
    assert [v > 0 for v in c.violations((0.98, 11.0, 2e6), fp32_quality=1.0)] == [True, True, True]
    assert Constraints().violations((0.1, 1e9, 1e12), 1.0) == [0.0, 0.0, 0.0]


def test_front_is_the_feasible_one_and_the_rest_is_kept(digits_cnn, digits_npz, tmp_path):
    result = autoq.search(digits_cnn, digits_npz, labels="label", trials=6, out=tmp_path / "run", progress=False,
                          size_budget=f"{150_000}b")
    trials = result.trials
    sizes = dict(zip(trials["baseline"], trials["size_bytes"], strict=False))
    assert sizes["uniform-fp32"] > 150_000 > sizes["uniform-int8"]
    assert not trials.loc[trials["baseline"] == "uniform-fp32", "feasible"].iloc[0]
    assert result.front["feasible"].all() and (result.front["size_bytes"] <= 150_000).all()
    assert len(trials) == 6 and "outside constraints" in (tmp_path / "run" / "report.html").read_text()
    assert pd.read_csv(tmp_path / "run" / "pareto.csv")["feasible"].all()
