"""The embedded demo end to end: all-MiniLM-L6-v2 exported from its pip package, on stdlib sentences."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from autoq.demo import sentences


def test_demo_sentences_are_real_deterministic_english():
    first, again = sentences(), sentences()
    assert first == again and len(set(first)) == len(first) == 160
    assert all(s[0].isupper() and s.endswith(".") and len(s.split()) >= 5 for s in first)


@pytest.mark.slow
def test_demo_search_finds_mixed_points_that_beat_uniform_int8(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "autoq", "search", "--trials", "8", "--out", str(out), "--quiet"],
                            capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "AUTOQ_CACHE": str(tmp_path / "cache")})  # exports afresh
    assert result.returncode == 0, result.stderr[-2000:]
    trials = pd.read_csv(out / "trials.csv")
    pareto = pd.read_csv(out / "pareto.csv")
    assert len(trials) == 8 and (trials["state"] == "COMPLETE").all()
    assert trials["executed_ok"].all()
    by_baseline = trials.set_index("baseline")  # by name: which trial number a baseline gets is not the point
    fp32, int8 = by_baseline.loc["uniform-fp32"], by_baseline.loc["uniform-int8"]
    assert fp32["quality"] == pytest.approx(1.0, abs=1e-5)
    assert 0.5 < int8["quality"] < 0.999  # quantization really bites on this model
    assert int8["size_bytes"] < 0.7 * fp32["size_bytes"]
    assert (pareto["val_executed_ok"]).all() and len(pareto) >= 2
    assert "report:" in result.stdout
    assert (tmp_path / "cache" / "demo" / "all-MiniLM-L6-v2.onnx").is_file()
