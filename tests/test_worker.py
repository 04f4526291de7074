"""A crash or hang inside one candidate fails that trial only; the search goes on."""

from __future__ import annotations

import tempfile

import numpy as np

import autoq
from tests.models import crash_unless_fp32, hang_unless_fp32

SPACE = {"default": ["fp32", "int8"], "sensitivity": "none", "population": 2}


def _run(model, npz, out, metric, trials, timeout, recipes="none"):
    return autoq.search(model, npz, labels="label", metric=metric, space=SPACE, trials=trials, out=out,
                        progress=False, trial_timeout=timeout, recipes=recipes)


def test_a_crashing_candidate_fails_its_trial_and_the_search_goes_on(digits_cnn, digits_npz, tmp_path):
    result = _run(digits_cnn, digits_npz, tmp_path / "crash", crash_unless_fp32, trials=3, timeout=120,
                  recipes="auto")
    trials = result.trials
    assert list(trials["state"][:2]) == ["COMPLETE", "FAIL"]  # uniform fp32, then uniform int8
    assert "worker crashed (killed by SIGSEGV)" in trials["error"][1]
    assert len(trials) == 3
    # the recipes crash the metric too: each is recorded as failed, and the run still ends with its report
    assert len(result.recipes) == 3 and result.recipes["error"].str.contains("worker crashed").all()
    assert result.report.is_file()


def test_a_hanging_candidate_times_out_and_its_killed_worker_leaves_no_files(digits_cnn, digits_npz, tmp_path,
                                                                              monkeypatch):
    (temp := tmp_path / "temp").mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # the worker process's temporary folder too
    monkeypatch.setattr(tempfile, "tempdir", None)  # read again from TMPDIR
    trials = _run(digits_cnn, digits_npz, tmp_path / "hang", hang_unless_fp32, trials=2, timeout=8).trials
    assert list(trials["state"]) == ["COMPLETE", "FAIL"]
    assert "timed out after 8 s" in trials["error"][1]
    assert list(temp.glob("autoq-*")) == []  # the killed worker's models (and the search's own) are gone


def test_a_metric_that_cannot_go_to_a_worker_runs_in_process(digits_cnn, digits_npz, tmp_path, capfd):
    trials = _run(digits_cnn, digits_npz, tmp_path / "lambda",
                  lambda ref, out, labels: float(np.mean(ref[0].argmax(1) == out[0].argmax(1))), trials=2,
                  timeout=60).trials
    assert (trials["state"] == "COMPLETE").all()
    assert "cannot be sent to a worker process" in capfd.readouterr().err


def test_a_script_without_a_main_guard_gets_a_clear_error_not_a_hang(digits_cnn, digits_npz, tmp_path):
    """The spawned worker re-runs an unguarded script and dies while starting: the search must say so."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text("import autoq\n"
                      f"autoq.search({str(digits_cnn)!r}, {str(digits_npz)!r}, labels='label', trials=2,\n"
                      f"             space={SPACE!r}, out={str(tmp_path / 'run')!r}, progress=False)\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "the trial worker process could not start" in run.stderr
