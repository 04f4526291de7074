"""The report and the commands around a run: regenerate, export, compare; rendered in a real browser."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest

from autoq.reporting import TRIAL_COLUMNS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000"]


@pytest.fixture(scope="module")
def run_dir(digits_run) -> Path:
    return digits_run[1]


def _autoq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoq", *args], capture_output=True, text=True, timeout=300)


def test_csvs_load_with_the_documented_columns(run_dir):
    trials = pd.read_csv(run_dir / "trials.csv")
    assert list(trials.columns) == TRIAL_COLUMNS
    readme = (Path(__file__).parents[1] / "docs" / "run-directory.md").read_text()
    assert all(f"`{c}`" in readme for c in TRIAL_COLUMNS)
    pareto = pd.read_csv(run_dir / "pareto.csv")
    assert all(f"`{c}`" in readme for c in pareto.columns if c not in TRIAL_COLUMNS)


def test_the_report_leads_with_the_answer_in_units_a_user_reads(run_dir):
    """First the point to take for each need (with its speed-ups), then the front zoomed on itself, a front table
    in MB and ms with spreads (one latency per point), and the raw columns behind a toggle."""
    page = (run_dir / "report.html").read_text()
    assert page.index("What to take") < page.index("Pareto front") < page.index("Front points")
    for need in ("fastest", "fastest within 1% of FP32", "most accurate faster than FP32", "smallest"):
        assert f"<td>{need}" in page
    front = pd.read_csv(run_dir / "pareto.csv")
    first = page[page.index("Front points"):page.index("<details>", page.index("Front points"))]
    assert "val_latency_spread_ms" not in first and "size_bytes" not in first  # raw columns only behind the toggle
    assert first.count(" MB</td>") == len(front) and first.count(" ms</td>") == len(front)
    assert "<summary>all columns</summary>" in page and "val_latency_spread_ms" in page


def test_report_regenerates_from_the_study(run_dir):
    before = (run_dir / "report.html").read_text()
    (run_dir / "report.html").unlink()
    result = _autoq("report", str(run_dir))
    assert result.returncode == 0, result.stderr
    after = (run_dir / "report.html").read_text()
    for section in ("Pareto front", "Per-layer precision", "Per-layer sensitivity", "Most sensitive layer",
                    "uniform-int8"):
        assert section in after and section in before


def test_export_copies_a_runnable_point_and_refuses_a_missing_one(run_dir, digits_npz, tmp_path):
    result = _autoq("export", str(run_dir), "--point", "0", "--to", str(tmp_path / "point0"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "point0").iterdir()) == ["assignment.yaml", "model.onnx"]
    session = ort.InferenceSession(str(tmp_path / "point0" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": np.load(digits_npz)["image"][:3]})[0].shape == (3, 10)
    missing = _autoq("export", str(run_dir), "--point", "99", "--to", str(tmp_path / "x"))
    assert missing.returncode == 2 and "no front point 99" in missing.stderr
    not_a_run = _autoq("report", str(tmp_path))
    assert not_a_run.returncode == 2 and "not an autoq run directory" in not_a_run.stderr


def test_compare_overlays_two_runs(run_dir, tmp_path):
    out = tmp_path / "compare.html"
    result = _autoq("compare", str(run_dir), str(run_dir), "--out", str(out))
    assert result.returncode == 0, result.stderr
    page = out.read_text()
    assert page.count(": front") >= 2 and "Fronts compared" in page


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="chromium not installed (CI installs it)")
def test_report_draws_in_headless_chromium(run_dir, tmp_path):
    assert CHROMIUM, "CI must install Debian's chromium (see .ci/run)"
    url = (run_dir / "report.html").resolve().as_uri()
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([CHROMIUM, *FLAGS, *profile, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    plots = dom.stdout.count('class="plotly-graph-div')
    assert plots == 4  # front, precision map, sensitivity, weight histogram
    assert dom.stdout.count('class="main-svg"') >= 2 * plots  # plotly drew every one
    assert "Uncaught" not in dom.stderr and ":ERROR:CONSOLE" not in dom.stderr
    shot = tmp_path / "report.png"  # laptop width: the first screen holds the answer and the front
    subprocess.run([CHROMIUM, *FLAGS, *profile, f"--screenshot={shot}", "--window-size=1366,1100", url],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 50_000  # a rendered page, not a blank one
    Path(os.environ.get("AUTOQ_SCREENSHOT", tmp_path / "kept.png")).write_bytes(shot.read_bytes())


def test_a_report_of_a_running_search_renders_points_not_yet_numbered(run_dir, tmp_path):
    """While a search runs (another worker's `autoq report`) the front's points are not numbered yet: the answer
    and the front table still render, with the number left blank."""
    import numpy as np

    from autoq.reporting.answer import choices, front_table

    front = pd.read_csv(run_dir / "pareto.csv").assign(point=np.nan)
    table = front_table(front)
    assert len(table) == len(front) and (table["point"] == "").all()
    assert (choices(front, None)["take"].str.strip() != "").all()
