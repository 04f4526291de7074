from __future__ import annotations

import subprocess
import sys
import time

import pytest

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
