from __future__ import annotations

import numpy as np
import pytest

from autoq import metrics
from autoq.errors import AutoqError
from autoq.precision import Assignment, Precision


def test_assignment_round_trips_through_yaml_and_keys_ignore_order(tmp_path):
    a = Assignment({"b": "int8", "a": "fp32"}, {"reduce_range": False})
    loaded = Assignment.load(a.save(tmp_path / "a.yaml"))
    assert loaded == a
    assert Assignment({"a": "fp32", "b": "int8"}, {"reduce_range": False}).key() == a.key()
    assert Assignment({"a": "int8", "b": "int8"}).key() != a.key()
    assert a.summary() == "fp32 x1, int8 x1"


def test_unknown_precisions_and_versions_are_refused():
    with pytest.raises(AutoqError, match="unknown precision 'int3'"):
        Assignment({"a": "int3"})
    with pytest.raises(AutoqError, match="version 9"):
        Assignment.from_dict({"version": 9, "layers": {}})
    assert Precision("w4g128").bits == 4 and Precision("int8-dyn").kind == "dynamic"


def test_metrics_reward_closeness_to_the_reference():
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(50, 10))]
    near, far = [ref[0] + 0.01 * rng.normal(size=(50, 10))], [rng.normal(size=(50, 10))]
    for name in ("cosine", "top1", "top5", "sqnr"):
        metric = metrics.METRICS[name]
        assert metric(ref, near, None) > metric(ref, far, None), name
    assert metrics.cosine(ref, ref) == pytest.approx(1.0)
    labels = ref[0].argmax(1)
    assert metrics.accuracy(ref, ref, labels) == 1.0
    with pytest.raises(AutoqError, match="needs labels"):
        metrics.accuracy(ref, ref, None)
