from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from autoq import measure
from autoq.measure import LoadMeter, fingerprint, time_runner

BUSY = "import time\nend = time.time() + {s}\nwhile time.time() < end: pass\n"


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_load_meter_sees_other_processes_not_our_own():
    meter = LoadMeter()
    meter.start()
    time.sleep(0.6)
    background = meter.stop()  # what the shared machine already runs
    meter.start()
    _spin(0.6)  # our own work is not load
    own = meter.stop()
    other = subprocess.Popen([sys.executable, "-c", BUSY.format(s=3)])
    try:
        time.sleep(0.3)
        meter.start()
        time.sleep(1.0)
        busy = meter.stop()
    finally:
        other.wait()
    assert own < background + 0.5
    assert busy > min(background, 1.0) + 0.7  # one more core spun by another process


def test_busy_machine_is_re_timed_and_recorded():
    other = subprocess.Popen([sys.executable, "-c", BUSY.format(s=2.5)])
    try:
        time.sleep(0.3)
        timing = time_runner(lambda: _spin(0.002), min_runs=12, max_runs=24, max_load=0.3, attempts=3,
                             wait_s=1.5)
    finally:
        other.wait()
    assert timing.attempts >= 2  # the first attempt saw the other process and waited
    assert timing.runs >= 12 and timing.spread_ms >= 0


def test_timing_is_a_median_with_the_reference_in_the_same_rounds():
    timing = time_runner(lambda: time.sleep(0.004), lambda: time.sleep(0.001), min_runs=12, max_runs=24)
    assert timing.median_ms >= 4.0 and timing.ref_median_ms >= 1.0
    assert timing.speedup == pytest.approx(timing.ref_median_ms / timing.median_ms)
    assert timing.median_ms > timing.ref_median_ms


def test_fingerprint_names_cpu_threads_and_libraries():
    print_ = fingerprint(threads=2)
    assert print_["threads"] == 2 and print_["cores"] >= 1 and print_["cpu"]
    assert "onnxruntime" in print_["libraries"] and "optuna" in print_["libraries"]


def test_a_trial_whose_fp32_rounds_drifted_is_timed_again(digits_cnn, digits_npz, tmp_path, monkeypatch):
    """Drift is FP32 beside the candidate more than 20% off the study's FP32. When the study's FP32 says 3x what
    FP32 now takes, the host 'changed pace': the candidate is timed again (after a pause) and the trial says so."""
    from autoq import data, graph
    from autoq.backends import get_backend
    from autoq.calibrate import calibrate
    from autoq.evaluate import Evaluator
    from autoq.metrics import accuracy
    from autoq.precision import Assignment

    monkeypatch.setattr("autoq.evaluate.DRIFT_WAIT_S", 0.0)
    model = graph.prepare(digits_cnn, tmp_path)
    splits = data.split(data.load(digits_npz, "label"))
    evaluator = Evaluator(get_backend("onnxruntime"), model, calibrate(model, splits.calibration, tmp_path / "c"),
                          splits, accuracy, 1)
    evaluator.fp32_latency_ms = 10.0
    assert not evaluator.drifted(11.9) and not evaluator.drifted(8.1)
    assert evaluator.drifted(12.1) and evaluator.drifted(7.9)
    int8 = Assignment.uniform(model.layer_names, "int8")
    evaluator.fp32_latency_ms = 3 * evaluator.time_reference()
    drifted = evaluator.evaluate(int8, min_runs=12, max_runs=24)
    evaluator.close()
    assert drifted.retimed == 1
    assert drifted.latency_ms > 2 * drifted.measured_latency_ms  # still scaled to the study's FP32


def test_rounds_take_turns_among_a_models_instances_and_the_interval_covers_them():
    """Two compiled instances of one model: round r runs instance r % 2 (against the reference's instance r % 2);
    when the instances differ, the clustered interval is wider than one that treats the rounds as independent."""
    calls = {"ref0": 0, "ref1": 0, "a0": 0, "a1": 0}

    def counting(name):
        def run():
            calls[name] += 1
        return run

    rounds = measure.ratio_rounds({"ref": [counting("ref0"), counting("ref1")], "a": [counting("a0"), counting("a1")]},
                                  "ref", rounds=4, round_size=2, warmup=1, pause_s=0)
    assert len(rounds["a"][1]) == 4
    assert calls == dict.fromkeys(calls, 1 + 2 * 3)  # warm-up, then 2 rounds x (settle + 2 timed)
    rng = np.random.default_rng(1)
    ratios = np.concatenate([1.0 + rng.normal(0, 0.005, 8), 1.1 + rng.normal(0, 0.005, 8)])
    clusters = np.repeat([0, 1], 8)
    _, low, high = measure.interval(ratios, clusters=clusters)
    _, plain_low, plain_high = measure.interval(ratios)
    assert low < 1.01 and high > 1.09  # either instance could be the one a second run compiles
    assert high - low > plain_high - plain_low
