"""The search's progress line: measured trials of the budget, ETA, front size, best feasible point, screened.
On a terminal it is a live bar; elsewhere (a CI log, `| tee`) one plain line every PLAIN_EVERY trials or
PLAIN_SECONDS seconds."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from autoq.constraints import Constraints
from autoq.pareto import MAXIMIZE, pareto_mask
from autoq.study import is_measured
from autoq.trial_record import TrialRecord

PLAIN_EVERY, PLAIN_SECONDS = 5, 60.0
HEARTBEAT_SECONDS = 5.0  # how often a phase's heartbeat checks whether a plain line is due


class SearchProgress:
    """A rich progress bar over measured trials; `update()` after each trial reads the study (all workers)."""

    def __init__(self, study: optuna.Study, total: int, constraints: Constraints, fp32_quality: float,
                 enabled: bool = True) -> None:
        self.study, self.total, self.constraints, self.fp32_quality = study, total, constraints, fp32_quality
        console = Console()
        self.plain = enabled and not console.is_terminal  # no live display there: plain lines instead
        self.bar = Progress(BarColumn(bar_width=16), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("ETA"), TimeRemainingColumn(compact=True), TextColumn("{task.fields[status]}"),
                            console=console, disable=not enabled or self.plain, transient=False)
        self.task = self.bar.add_task("search", total=total, status="", completed=0)
        self._started = False
        self._said = (-PLAIN_EVERY, 0.0)  # (trials, time) of the last plain line
        self._t0 = time.monotonic()

    def __enter__(self) -> SearchProgress:
        self.bar.__enter__()
        self.update()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def status(self) -> tuple[int, str]:
        """(measured trials, the status text)."""
        trials = self.study.get_trials(deepcopy=False)
        measured = [t for t in trials if is_measured(t)]
        done = [t for t in measured if t.state == TrialState.COMPLETE]
        feasible = [t for t in done if self.constraints.feasible(t.values, self.fp32_quality)]
        pool = feasible or done
        front = [t for t, keep in zip(pool, pareto_mask(np.array([t.values for t in pool]), MAXIMIZE), strict=True)
                 if keep] if pool else []
        screened = sum(1 for t in trials if t.state == TrialState.PRUNED and TrialRecord.of(t).screened)
        text = f"front {len({TrialRecord.of(t).key for t in front})}"
        if feasible:
            fastest = min(feasible, key=lambda t: t.values[1])
            text += f" | fastest feasible {fastest.values[1]:.2f} ms, q {fastest.values[0]:.4f}"
        elif done:
            text += " | no feasible point yet"
        return len(measured), text + (f" | screened {screened}" if screened else "")

    def update(self) -> None:
        if self.plain:
            done, text = self.status()
            now = time.monotonic()
            if done - self._said[0] >= PLAIN_EVERY or now - self._said[1] >= PLAIN_SECONDS or done >= self.total:
                if done != self._said[0] and done > 0:
                    print(f"autoq: {min(done, self.total)}/{self.total} trials, {now - self._t0:.0f} s | {text}",
                          flush=True)
                self._said = (done, now)
            return
        if self.bar.disable:
            return
        done, text = self.status()
        if not self._started:  # resumed trials don't count toward the speed behind the ETA
            self.bar.reset(self.task, total=self.total, completed=done, status=text)
            self._started = True
        self.bar.update(self.task, completed=min(done, self.total), status=text)


class PhaseProgress:
    """Progress of a phase longer than a few seconds (export, calibration, learned rounding, ...): a bar on a
    terminal (its clock ticks on its own), elsewhere a plain `autoq:` line every PLAIN_SECONDS, also while one long
    step runs (a heartbeat thread), and one at the end."""

    def __init__(self, label: str, total: int, enabled: bool = True, stderr: bool = False) -> None:
        self.label, self.total = label, total
        console = Console(stderr=stderr)
        self.plain = enabled and not console.is_terminal
        self.bar = Progress(TextColumn(f"autoq: {label}"), BarColumn(bar_width=16), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(compact=True),
                            console=console, disable=not enabled or self.plain, transient=False)
        self.task = self.bar.add_task(label, total=total)
        self._t0 = self._said = time.monotonic()
        self._done = 0
        self._stop = threading.Event()
        self._out = sys.stderr if stderr else sys.stdout  # the terminal's, even while a third-party call inside the
        # phase is captured(); stderr where stdout carries a result (verify's table)

    def __enter__(self) -> PhaseProgress:
        self.bar.__enter__()
        if self.plain:
            print(f"autoq: {self.label} ...", file=self._out, flush=True)
            threading.Thread(target=self._heartbeat, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.bar.__exit__(*exc)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            if time.monotonic() - self._said >= PLAIN_SECONDS:
                self._say(self._done)

    def _say(self, done: int) -> None:
        now = time.monotonic()
        print(f"autoq: {self.label} {done}/{self.total}, {now - self._t0:.0f} s", file=self._out, flush=True)
        self._said = now

    def advance(self, done: int) -> None:
        self.bar.update(self.task, completed=done)
        self._done = done
        if self.plain and (time.monotonic() - self._said >= PLAIN_SECONDS or done >= self.total):
            self._say(done)
