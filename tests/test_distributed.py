"""Several workers on one study in a real PostgreSQL server (started here on loopback, in a temporary
cluster): the budget holds across workers, no assignment is measured twice, other machines are refused."""

from __future__ import annotations

import glob
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest

import autoq
from autoq.errors import AutoqError
from autoq.study import open_storage


def _server_binaries() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else (os.path.dirname(shutil.which("initdb") or "") or None)


@pytest.fixture(scope="module")
def postgres_url():
    """AUTOQ_TEST_POSTGRES if set, else a throwaway server (Debian's postgresql package; .ci/run installs it)."""
    if os.environ.get("AUTOQ_TEST_POSTGRES"):
        yield os.environ["AUTOQ_TEST_POSTGRES"]
        return
    bin_dir = _server_binaries()
    if bin_dir is None:
        pytest.skip("needs a PostgreSQL server (Debian package postgresql; .ci/run installs it)")
    root = Path(tempfile.mkdtemp(prefix="autoq-pg-"))  # not under pytest's root-only tmp: the server runs as postgres
    data = root / "data"
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # the server refuses root
    if as_user:
        shutil.chown(root, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run([*as_user, f"{bin_dir}/initdb", "-D", str(data), "-A", "trust", "-U", "autoq"], check=True,
                   capture_output=True)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    subprocess.run([*as_user, f"{bin_dir}/pg_ctl", "-D", str(data), "-o", options, "-w", "-l", str(root / "log"),
                    "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://autoq@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, f"{bin_dir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _worker(digits_cnn, digits_npz, url, out, trials=14, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "autoq", "search", str(digits_cnn), "--data", str(digits_npz), "--labels", "label",
           "--trials", str(trials), "--storage", url, "--study", "digits", "--out", str(out), "--quiet", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_workers_share_one_study(digits_cnn, digits_npz, postgres_url, tmp_path):
    workers = [_worker(digits_cnn, digits_npz, postgres_url, tmp_path / f"worker{i}") for i in range(2)]
    for worker in workers:
        _, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 0, stderr
    study = optuna.load_study(study_name="digits", storage=postgres_url.replace("://", "+psycopg://", 1))
    trials = study.get_trials(deepcopy=False)
    counted = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(counted) == 14  # the budget holds across workers
    assert not [t for t in trials if t.state.name in ("RUNNING", "FAIL")]  # nothing lost or failed
    # a waiting trial is only a seed the budget left for a later run with more --trials, never a sampled one
    assert all(t.user_attrs.get("seeded") for t in trials if t.state.name == "WAITING")
    assert len({t.user_attrs["worker"] for t in counted}) == 2  # both did work
    measured = [t.user_attrs["key"] for t in counted if not t.user_attrs.get("duplicate")]
    assert len(measured) == len(set(measured))  # no assignment measured twice
    baselines = [t.user_attrs["baseline"] for t in trials if "baseline" in t.user_attrs]
    assert sorted(baselines) == ["uniform-fp32", "uniform-int8", "uniform-int8 bias_correction=False",
                                 "uniform-int8 glue=float"]  # enqueued once, by the worker that created it

    # a worker on another machine (here: another thread count, which changes every latency) is refused
    other = _worker(digits_cnn, digits_npz, postgres_url, tmp_path / "other", 14, "--threads", "1")
    _, stderr = other.communicate(timeout=300)
    assert other.returncode == 2
    assert "another machine or thread count" in stderr and len(stderr.strip().splitlines()) == 1


def test_a_bad_storage_url_is_one_clear_error(digits_cnn, digits_npz, tmp_path):
    with pytest.raises(AutoqError, match="cannot open the study storage"):
        autoq.search(digits_cnn, digits_npz, labels="label", trials=2, out=tmp_path / "run", progress=False,
                     storage="postgresql://nobody@127.0.0.1:9/none")


def _open_after(start, url: str) -> str:
    start.wait()
    try:
        open_storage(Path("unused"), url)
        return ""
    except AutoqError as exc:
        return str(exc)


def test_workers_racing_to_create_the_schema_all_open_it(postgres_url):
    """Workers started together race to create Optuna's tables and types in an empty database: none may fail."""
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as admin:
        for attempt in range(3):
            name = f"race{os.getpid()}_{attempt}"
            admin.execute(f"CREATE DATABASE {name}")
            url = postgres_url.rsplit("/", 1)[0] + f"/{name}"
            with multiprocessing.Manager() as manager, multiprocessing.get_context("spawn").Pool(4) as pool:
                start = manager.Barrier(4)
                errors = [e for e in pool.starmap(_open_after, [(start, url)] * 4) if e]
            assert errors == []
            assert optuna.get_all_study_summaries(url.replace("://", "+psycopg://", 1)) == []
