from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from autoq.pareto import front, hypervolume, normalised_hypervolume, pareto_mask


def test_pareto_mask_keeps_exactly_the_non_dominated():
    values = np.array([[0.9, 10.0], [0.95, 12.0], [0.9, 11.0], [0.8, 12.0], [0.95, 12.0]])
    assert pareto_mask(values, [True, False]).tolist() == [True, True, False, False, True]


def test_hypervolume_of_boxes():
    ref = np.array([1.0, 1.0, 1.0])
    assert hypervolume(np.array([[0.5, 0.5, 0.5]]), ref) == pytest.approx(0.125)
    two = np.array([[0.0, 0.5, 0.5], [0.5, 0.0, 0.5]])
    assert hypervolume(two, ref) == pytest.approx(0.25 + 0.25 - 0.125)
    assert hypervolume(np.array([[2.0, 0.0, 0.0]]), ref) == 0.0  # outside the reference box


def test_normalised_hypervolume_rewards_the_better_front():
    def frame(rows):
        return pd.DataFrame([{"state": "COMPLETE", "quality": q, "latency_ms": t, "size_bytes": s, "key": str(i)}
                             for i, (q, t, s) in enumerate(rows)])

    worse = frame([(1.0, 20, 90), (0.94, 15, 58)])
    better = frame([(1.0, 20, 90), (0.94, 15, 58), (0.99, 16, 62)])
    volumes = normalised_hypervolume({"worse": worse, "better": better})
    assert volumes["better"] > volumes["worse"] > 0
    assert len(front(better)) == 3


def test_a_point_beaten_in_quality_within_its_spread_stays_on_the_front():
    """b is faster and smaller than a, and better in quality by 0.006: it dominates a outright, but not when their
    quality spreads are 0.012 (the search split cannot rank them); c, better by 0.05, dominates a either way."""
    trials = pd.DataFrame({"state": "COMPLETE", "key": ["a", "b", "c"], "quality": [0.883, 0.889, 0.933],
                           "latency_ms": [6.2, 5.9, 7.0], "size_bytes": [114.0, 111.0, 140.0],
                           "quality_spread": [0.012, 0.011, 0.012]})
    assert sorted(front(trials)["key"]) == ["a", "b", "c"]
    assert sorted(front(trials, noise=None)["key"]) == ["b", "c"]
    assert sorted(front(trials.assign(latency_ms=[7.5, 5.9, 7.0], size_bytes=[150.0, 111.0, 140.0]))["key"]) == [
        "b", "c"]
