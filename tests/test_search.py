from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import optuna
import pandas as pd
import pytest

import autoq
from autoq.errors import AutoqError
from autoq.pareto import front as pareto_front
from autoq.pareto import pareto_mask
from autoq.precision import Assignment
from autoq.settings import RunSettings


@pytest.fixture(scope="module")
def run(digits_run):
    return digits_run


def test_uniform_baselines_come_first(run):
    trials = run[0].trials
    assert list(trials["baseline"][:2]) == ["uniform-fp32", "uniform-int8"]
    assert list(trials["summary"][:2]) == ["fp32 x4", "int8 x4"]


def test_front_is_non_dominated_and_holds_or_beats_the_baselines(run):
    result = run[0]
    done = result.trials[result.trials["state"] == "COMPLETE"]
    objectives = ["quality", "latency_ms", "size_bytes"]
    values = np.vstack([result.front[objectives].to_numpy(), done[objectives].to_numpy()])
    noise = np.concatenate([result.front["quality_spread"].to_numpy(), done["quality_spread"].to_numpy()])
    assert pareto_mask(values, [True, False, False], noise)[: len(result.front)].all()  # beaten only within noise
    front = result.front[objectives].to_numpy()
    for _, baseline in done[done["baseline"] != ""].iterrows():
        b = baseline[objectives].to_numpy(dtype=float)
        held_or_beaten = ((front[:, 0] >= b[0]) & (front[:, 1] <= b[1]) & (front[:, 2] <= b[2])).any()
        assert held_or_beaten, baseline["baseline"]


def test_duplicates_are_never_measured_twice(run):
    done = run[0].trials[run[0].trials["state"] == "COMPLETE"]
    measured = done[~done["duplicate"]]
    assert measured["key"].is_unique
    assert set(done["key"]) == set(measured["key"])


def test_run_directory_holds_tables_report_and_runnable_front_points(run, digits_npz):
    result, out = run
    for name in ("trials.csv", "pareto.csv", "report.html", "study.db", "meta.json", "sensitivity.csv"):
        assert (out / name).is_file(), name
    pareto = pd.read_csv(out / "pareto.csv")
    assert len(pareto) == len(result.front) and {"val_quality", "val_latency_ms", "model"} <= set(pareto.columns)
    assert pareto["val_executed_ok"].all()
    images = np.load(digits_npz)["image"][:32]
    for _, point in pareto.iterrows():
        assignment = Assignment.load(out / "front" / f"point-{point['point']}" / "assignment.yaml")
        assert assignment.summary() == point["summary"]
        session = ort.InferenceSession(str(out / point["model"]), providers=["CPUExecutionProvider"])
        assert session.run(None, {"image": images})[0].shape == (32, 10)
    html = (out / "report.html").read_text()
    assert "Pareto front" in html and "plotly" in html and len(html) > 1_000_000  # plotly.js inlined: offline


def test_the_same_call_resumes_instead_of_starting_over(run, digits_cnn, digits_npz, tmp_path):
    import shutil

    result = run[0]
    out = shutil.copytree(run[1], tmp_path / "cnn", ignore=shutil.ignore_patterns(".lock"))  # the shared run stays
    again = autoq.search(digits_cnn, digits_npz, labels="label", trials=10, out=out, progress=False)
    assert len(again.trials) == len(result.trials)
    # nothing new to measure: the front's and the recipes' validation figures are the first call's, not re-timed
    figures = ["key", "val_quality", "val_latency_ms", "val_deployed_speedup"]
    pd.testing.assert_frame_equal(again.front[figures], result.front[figures])
    recipes = ["recipe", "val_latency_ms"]
    pd.testing.assert_frame_equal(again.recipes[recipes], result.recipes[recipes])
    more = autoq.search(digits_cnn, digits_npz, labels="label", trials=12, out=out, progress=False)
    assert len(more.trials) == len(result.trials) + 2
    pd.testing.assert_frame_equal(more.trials[["key", "quality", "latency_ms"]].iloc[: len(result.trials)],
                                  result.trials[["key", "quality", "latency_ms"]])


def test_a_run_directory_refuses_other_data_or_another_machine(run, digits_cnn, digits_npz, tmp_path):
    out = run[1]
    other = tmp_path / "other.npz"
    images = np.load(digits_npz)["image"]
    np.savez(other, image=images[::-1].copy(), label=np.load(digits_npz)["label"][::-1].copy())
    with pytest.raises(AutoqError, match="different data"):
        autoq.search(digits_cnn, other, labels="label", trials=10, out=out, progress=False)
    study = optuna.load_study(study_name="autoq", storage=f"sqlite:///{out / 'study.db'}")
    real = study.user_attrs["hardware"]
    study.set_user_attr("hardware", "another CPU|64|2|")
    try:
        with pytest.raises(AutoqError, match="another machine"):
            autoq.search(digits_cnn, digits_npz, labels="label", trials=10, out=out, progress=False)
    finally:
        study.set_user_attr("hardware", real)


def _states(db) -> list[str]:
    """Trial states in the study database; none while Optuna is still creating its tables."""
    try:
        with sqlite3.connect(db) as con:
            return [s for (s,) in con.execute("select state from trials order by number")]
    except sqlite3.OperationalError:
        return []


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_loses_nothing(digits_cnn, digits_npz, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "autoq", "search", str(digits_cnn), "--data", str(digits_npz), "--labels",
           "label", "--trials", "12", "--out", str(out), "--quiet"]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = out / "study.db"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill while a trial is running, after a few have finished
        states = _states(db) if db.is_file() else []
        if states.count("COMPLETE") >= 3 and "RUNNING" in states:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = _states(db)
    assert before.count("COMPLETE") >= 3
    study = optuna.load_study(study_name="autoq", storage=f"sqlite:///{db}")
    finished = {t.number: t.values for t in study.trials if t.state.name == "COMPLETE"}

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    study = optuna.load_study(study_name="autoq", storage=f"sqlite:///{db}")
    after = {t.number: t for t in study.trials}
    assert all(after[n].values == v for n, v in finished.items())  # nothing lost or re-run
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 12
    interrupted = [t for t in study.trials if t.state.name == "FAIL" and "error" not in t.user_attrs]
    assert len(interrupted) == before.count("RUNNING") == 1
    assert all(any(r.user_attrs.get("retry_of") == t.number for r in study.trials) for t in interrupted)
    # the front of the resumed run is the front of all its trials, before and after the kill
    trials, front = pd.read_csv(out / "trials.csv"), pd.read_csv(out / "pareto.csv")
    assert set(front["key"]) == set(pareto_front(trials)["key"]) and len(front) >= 1
    assert set(finished) <= set(trials["trial"])


@pytest.mark.slow
def test_ctrl_c_finishes_the_running_trial_then_stops_and_resumes(digits_cnn, digits_npz, tmp_path):
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "autoq", "search", str(digits_cnn), "--data", str(digits_npz), "--labels",
           "label", "--trials", "16", "--out", str(out), "--quiet"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db = out / "study.db"
    deadline = time.time() + 120
    while time.time() < deadline:
        states = _states(db) if db.is_file() else []
        if states.count("COMPLETE") >= 2 and "RUNNING" in states:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-2:] == ["autoq: stopping after the running trial (Ctrl-C again to stop now)",
                                           "autoq: interrupted; run the same command again to resume"]
    stopped_at = _states(db)
    assert "RUNNING" not in stopped_at and "FAIL" not in stopped_at  # the running trial was finished
    assert 3 <= stopped_at.count("COMPLETE") < 16, stopped_at
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    assert _states(db) == ["COMPLETE"] * 16


def test_without_a_terminal_progress_is_plain_lines(capsys):
    """In a CI log or behind `| tee` there is no live bar: one plain autoq line every few trials."""
    import optuna

    from autoq.constraints import Constraints
    from autoq.pareto import DIRECTIONS
    from autoq.progress import PLAIN_EVERY, SearchProgress

    study = optuna.create_study(directions=DIRECTIONS)
    with SearchProgress(study, 12, Constraints(), 1.0) as bar:
        for i in range(12):
            study.add_trial(optuna.trial.create_trial(values=[1.0 - i / 100, 10.0 - i / 10, 100.0],
                                                      user_attrs={"key": str(i)}))
            bar.update()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 12 // PLAIN_EVERY + 1 and all(line.startswith("autoq: ") for line in lines)
    assert lines[-1].startswith("autoq: 12/12 trials") and "front 12" in lines[-1]


def test_each_option_varies_the_uniform_baselines_it_changes():
    """An all-fp32 model built with bias correction on or off is the same model: an option that changes how static
    int8 is built varies the all-int8 baseline, one that changes float layers (OpenVINO's float precision) the
    all-fp32 one."""
    import optuna

    from autoq.evaluate import Measurement
    from autoq.objective import run_search
    from autoq.pareto import DIRECTIONS
    from autoq.space import parse_space

    space = parse_space({"sampler": "random", "sensitivity": "none",
                         "options": {"bias_correction": [True, False], "inference_precision": ["bf16", "f32"]}})
    choices = {"a": ["fp32", "int8"], "b": ["fp32", "int8"]}

    def evaluate(assignment: Assignment) -> Measurement:
        int8 = sum(p == "int8" for p in assignment.layers.values())
        return Measurement(1.0 - 0.01 * int8, 0.0, 10.0 - int8, 0.0, 10.0 - int8, 1, 0.0, None, None, 100 - 10 * int8)

    study = optuna.create_study(directions=DIRECTIONS, sampler=optuna.samplers.RandomSampler(seed=0))
    KINDS_OF_OPTIONS = {"inference_precision": "float", "bias_correction": "static"}
    run_search(study, evaluate, 1.0, choices, space, RunSettings(trials=4, progress=False),
               affects=lambda option, p: p.kind == KINDS_OF_OPTIONS[option])
    baselines = [t.user_attrs["baseline"] for t in study.trials if "baseline" in t.user_attrs]
    assert baselines == ["uniform-fp32", "uniform-int8", "uniform-fp32 inference_precision=f32",
                         "uniform-int8 bias_correction=False"]


def test_option_variants_copy_only_the_seeds_an_option_changes():
    """ORT's bias correction changes static int8 layers only: a seed without one gets no (duplicate) copy."""
    from autoq.backends import get_backend
    from autoq.seeds import option_variants

    seeds = [Assignment({"a": "int8-dyn", "b": "fp32"}), Assignment({"a": "int8", "b": "fp32"}),
             Assignment({"a": "int8", "b": "int8-dyn-pc"}), Assignment({"a": "fp32", "b": "int8"}),
             Assignment({"a": "fp32", "b": "int8-dyn-pc-sq0.7"})]
    options = {"bias_correction": [True, False], "glue": ["int8"]}
    variants = option_variants(seeds, options, get_backend("onnxruntime").option_affects, limit=2)
    assert [(v.layers, v.options) for v in variants] == [
        (seeds[1].layers, {"bias_correction": False}), (seeds[2].layers, {"bias_correction": False})]


def test_settings_are_one_record_checked_when_made(digits_cnn, digits_npz, tmp_path):
    """A misspelt setting or a bad value is a one-line error before any work; a RunSettings and keywords combine
    (keywords change the record)."""
    with pytest.raises(AutoqError, match="unknown setting 'trails'.*trials"):
        autoq.search(digits_cnn, digits_npz, trails=3)
    with pytest.raises(AutoqError, match="--trials must be at least 1"):
        autoq.RunSettings(trials=0)
    with pytest.raises(AutoqError, match="--latency-budget"):
        autoq.RunSettings(latency_budget="fast")
    base = autoq.RunSettings(labels="label", trials=2, progress=False, recipes="none")
    result = autoq.search(digits_cnn, digits_npz, settings=base, out=tmp_path / "run")
    assert len(result.trials) == 2 and result.recipes is None and base.out is None  # the record itself unchanged


def test_an_option_that_changes_no_layer_of_a_trial_takes_its_first_value():
    """SmoothQuant changes only int8-dyn-pc layers: a sampled trial without one is built and keyed with the
    option's first value, so the same model is never measured under two values that cannot differ."""
    from autoq.evaluate import Measurement
    from autoq.objective import run_search
    from autoq.pareto import DIRECTIONS
    from autoq.space import parse_space

    space = parse_space({"sampler": "random", "sensitivity": "none", "options": {"smooth_quant": [False, 0.7]}})
    choices = {"a": ["fp32", "int8", "int8-dyn-pc"], "b": ["fp32", "int8"]}
    seen: list[Assignment] = []

    def evaluate(assignment: Assignment) -> Measurement:
        seen.append(assignment)
        fast = sum(p != "fp32" for p in assignment.layers.values())
        return Measurement(1.0 - 0.01 * fast, 0.0, 10.0 - fast, 0.0, 10.0 - fast, 1, 0.0, None, None, 100 - fast)

    study = optuna.create_study(directions=DIRECTIONS, sampler=optuna.samplers.RandomSampler(seed=1))
    run_search(study, evaluate, 1.0, choices, space, RunSettings(trials=6, progress=False),
               affects=lambda option, p: p.kind == "dynamic")
    assert any(a.options["smooth_quant"] == 0.7 for a in seen)  # where it applies, both values are tried
    assert all(a.options["smooth_quant"] is False for a in seen if a.layers["a"] != "int8-dyn-pc")
    assert len({a.key() for a in seen}) == len(seen)  # and nothing was measured twice


def test_a_uniform_baseline_gives_a_table_the_weight_format_without_runtime_knobs():
    """`uniform-w4g32-acc4` puts an embedding table, which offers no accuracy level, in `w4g32` (the same weights:
    a tied table then shares its head's); a table without the format (NF4) takes its weight-only spec nearest in
    bytes; a layer offering no weight-only spec stays at its first choice."""
    from autoq.objective import _enqueue_baselines

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    choices = {"fc": ["fp32", "w4g32-acc4"], "table": ["fp32", "w4g32"], "conv": ["fp32", "int8"]}
    _enqueue_baselines(study, choices, {}, lambda option, precision: False)
    enqueued = {t.user_attrs["baseline"]: t.system_attrs["fixed_params"] for t in study.get_trials(deepcopy=False)}
    assert enqueued["uniform-w4g32-acc4"] == {"fc": "w4g32-acc4", "table": "w4g32", "conv": "fp32"}
    choices = {"fc": ["fp32", "nf4g64", "w8"], "table": ["fp32", "w8", "w4g64", "w4g32"], "conv": ["fp32", "int8"]}
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    _enqueue_baselines(study, choices, {}, lambda option, precision: False)
    enqueued = {t.user_attrs["baseline"]: t.system_attrs["fixed_params"] for t in study.get_trials(deepcopy=False)}
    assert enqueued["uniform-nf4g64"] == {"fc": "nf4g64", "table": "w4g64", "conv": "fp32"}  # the nearest in bytes


def test_a_long_single_step_phase_still_says_it_is_working(capsys, monkeypatch):
    """Without a terminal a phase of one long step (an export, the calibration) prints a plain line every
    PLAIN_SECONDS while the step runs, to the real stdout even while a third-party call inside it is captured."""
    import time

    from autoq import progress
    from autoq.quiet import captured

    monkeypatch.setattr(progress, "PLAIN_SECONDS", 0.2)
    monkeypatch.setattr(progress, "HEARTBEAT_SECONDS", 0.05)
    with progress.PhaseProgress("exporting", 1) as bar, captured():
        print("third-party chatter")
        time.sleep(0.7)
        bar.advance(1)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "autoq: exporting ..." and lines[-1].startswith("autoq: exporting 1/1")
    assert sum(line.startswith("autoq: exporting 0/1") for line in lines) >= 2  # the heartbeat, mid-step
    assert "third-party chatter" not in lines


def test_a_trial_record_names_every_key_a_trial_stores():
    """Bookkeeping is written and read by the record's names only (a misspelt key is an error, not a silent new
    column); a measurement keeps only the evaluator's fields; what was enqueued with a trial reads back."""
    from autoq.trial_record import TrialRecord, attrs, write, write_measurement

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    study.enqueue_trial({"x": "a"}, user_attrs=attrs(baseline="uniform-fp32", seeded=True))
    trial = study.ask()
    trial.suggest_categorical("x", ["a", "b"])
    assert TrialRecord.of(trial).baseline == "uniform-fp32"  # readable while it runs
    write(trial, key="k1", constraints=(0.1, -1.0, 0.0))
    write_measurement(trial, {"quality": 0.9, "latency_ms": 1.5, "not_a_measurement": 3})
    study.tell(trial, [0.9, 1.5, 10.0])
    record = TrialRecord.of(study.trials[0])
    assert (record.baseline, record.seeded, record.key, record.constraints) == ("uniform-fp32", True, "k1",
                                                                                  (0.1, -1.0, 0.0))
    assert record.measurement == {"quality": 0.9, "latency_ms": 1.5} and record.retry_of is None
    with pytest.raises(KeyError, match="qualty"):
        attrs(qualty=1.0)
