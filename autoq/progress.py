"""The search's progress line: measured trials of the budget, ETA, front size, best feasible point, screened."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from autoq.constraints import Constraints
from autoq.pareto import pareto_mask


class SearchProgress:
    """A rich progress bar over measured trials; `update()` after each trial reads the study (all workers)."""

    def __init__(self, study: optuna.Study, total: int, constraints: Constraints, fp32_quality: float,
                 enabled: bool = True) -> None:
        self.study, self.total, self.constraints, self.fp32_quality = study, total, constraints, fp32_quality
        self.bar = Progress(BarColumn(bar_width=16), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("ETA"), TimeRemainingColumn(compact=True), TextColumn("{task.fields[status]}"),
                            disable=not enabled, transient=False)
        self.task = self.bar.add_task("search", total=total, status="", completed=0)
        self._started = False

    def __enter__(self) -> SearchProgress:
        self.bar.__enter__()
        self.update()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def status(self) -> tuple[int, str]:
        """(measured trials, the status text)."""
        trials = self.study.get_trials(deepcopy=False)
        measured = [t for t in trials if t.state == TrialState.COMPLETE
                    or (t.state == TrialState.FAIL and "error" in t.user_attrs)]
        done = [t for t in measured if t.state == TrialState.COMPLETE]
        feasible = [t for t in done if self.constraints.feasible(*t.values, self.fp32_quality)]
        pool = feasible or done
        front = [t for t, keep in zip(pool, pareto_mask([t.values for t in pool], [True, False, False]), strict=True)
                 if keep] if pool else []
        screened = sum(1 for t in trials if t.state == TrialState.PRUNED and "screened" in t.user_attrs)
        text = f"front {len({t.user_attrs.get('key') for t in front})}"
        if feasible:
            fastest = min(feasible, key=lambda t: t.values[1])
            text += f" | fastest feasible {fastest.values[1]:.2f} ms, q {fastest.values[0]:.4f}"
        elif done:
            text += " | no feasible point yet"
        return len(measured), text + (f" | screened {screened}" if screened else "")

    def update(self) -> None:
        if self.bar.disable:
            return
        done, text = self.status()
        if not self._started:  # resumed trials don't count toward the speed behind the ETA
            self.bar.reset(self.task, total=self.total, completed=done, status=text)
            self._started = True
        self.bar.update(self.task, completed=min(done, self.total), status=text)
