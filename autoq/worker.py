"""Trials run in a worker process with a timeout: a candidate that crashes the runtime (a segfault in a
kernel), hangs, or runs out of memory fails its trial; the search restarts the worker and goes on.

The worker builds its own Evaluator from files and arrays (spawned, not forked: ONNX Runtime's thread pools
do not survive a fork) and ignores Ctrl-C, so the parent's graceful stop lets the running trial finish.
"""

from __future__ import annotations

import multiprocessing
import pickle
import shutil
import signal
import tempfile
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from autoq.calibrate import Calibration
from autoq.data import Splits
from autoq.errors import AutoqError
from autoq.evaluate import CandidateError, Evaluation, Evaluator
from autoq.metrics import Metric
from autoq.precision import Assignment
from autoq.quiet import hush
from autoq.recipes import RecipeMeasurement, measure_recipe


@dataclass
class WorkerSpec:
    """Everything a worker needs to rebuild the parent's Evaluator: picklable."""

    backend: str
    model_path: Path
    calibration: Calibration
    splits: Splits
    metric: Metric
    threads: int
    fp32_latency_ms: float | None
    module: object | None = None  # a torch model for the torch backend

    @classmethod
    def of(cls, evaluator: Evaluator) -> WorkerSpec:
        return cls(evaluator.backend.name, evaluator.model.path, evaluator.calibration, evaluator.splits,
                   evaluator.metric, evaluator.threads, evaluator.fp32_latency_ms, evaluator.model.module)


def _serve(conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    hush()
    spec = pickle.loads(conn.recv_bytes())
    workdir = Path(conn.recv())
    from autoq.backends import get_backend
    from autoq.graph import opened

    model = opened(spec.model_path)
    model.module = spec.module
    evaluator = Evaluator(get_backend(spec.backend), model, spec.calibration, spec.splits, spec.metric,
                          spec.threads, fp32_latency_ms=spec.fp32_latency_ms, workdir=workdir)
    conn.send(("ready", None))
    try:
        while (request := conn.recv()) is not None:
            kind, *args = request
            try:
                if kind == "recipe":
                    conn.send(("ok", measure_recipe(evaluator, args[0], Path(args[1]))))
                else:
                    conn.send(("ok", evaluator.evaluate(Assignment.from_dict(args[0]))))
            except CandidateError as exc:
                conn.send(("error", str(exc)))
    finally:
        evaluator.close()


class Worker:
    """`evaluate(assignment)` like an Evaluator's (and `measure_recipe`), in a separate process, within `timeout`
    seconds. Its files live in a folder the parent removes, so a worker killed mid-trial leaves none behind."""

    def __init__(self, spec: WorkerSpec, timeout: float) -> None:
        self.spec, self.timeout = spec, timeout
        self._payload = pickle.dumps(spec)  # sent over our pipe, not as Process args: a child that dies while
        # starting (a script without a __main__ guard) leaves spawn's own pipe full and the parent blocked
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._workdir: Path | None = None

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        conn, child = context.Pipe()
        process = context.Process(target=_serve, args=(child,), daemon=True)
        self._conn, self._process = conn, process
        self._workdir = Path(tempfile.mkdtemp(prefix="autoq-worker-"))
        process.start()
        child.close()
        try:  # a worker that cannot even start is the setup's problem, not a candidate's
            conn.send_bytes(self._payload)
            conn.send(str(self._workdir))
            if not conn.poll(self.timeout):
                raise EOFError
            conn.recv()
        except (EOFError, OSError) as exc:
            process.join(timeout=30)
            exitcode = process.exitcode
            self._stop()
            msg = (f"the trial worker process could not start ({_describe(exitcode)}; its error is above): "
                   "call autoq.search under `if __name__ == '__main__':` in a script file (not standard input), "
                   "or use the CLI")
            raise AutoqError(msg) from exc

    def _stop(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
        if self._process is not None:
            self._process.join()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._process = self._conn = self._workdir = None

    def evaluate(self, assignment: Assignment) -> Evaluation:
        return self._ask(("trial", assignment.to_dict()))

    def measure_recipe(self, label: str, workdir: Path) -> RecipeMeasurement:
        """`autoq.recipes.measure_recipe` in the worker: a recipe that crashes or hangs fails alone."""
        return self._ask(("recipe", label, str(workdir)))

    def _ask(self, request: tuple) -> Any:
        if self._process is None or self._conn is None:
            self._start()
        process, conn = self._process, self._conn
        assert process is not None and conn is not None  # _start sets both or raises
        conn.send(request)
        answered = conn.poll(self.timeout)  # True on a reply, and on EOF when the worker died
        try:
            status, payload = conn.recv() if answered else (None, None)
        except (EOFError, ConnectionError):
            status, payload = None, None
        if status is None:
            if answered:
                process.join(timeout=30)  # it died: wait for its exit code
            exitcode = process.exitcode
            self._stop()
            if not answered:
                msg = f"timed out after {self.timeout:g} s (the worker was stopped)"
            else:
                msg = f"the worker crashed ({_describe(exitcode)}): this candidate breaks the runtime"
            raise CandidateError(msg)
        if status == "error":
            raise CandidateError(payload)
        return payload

    def close(self) -> None:
        if self._process is not None and self._conn is not None and self._process.is_alive():
            try:
                self._conn.send(None)
                self._process.join(timeout=10)
            except (BrokenPipeError, OSError):
                pass
        self._stop()


def _describe(exitcode: int | None) -> str:
    if exitcode is None:
        return "it closed its pipe"
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"
