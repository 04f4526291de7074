"""The objective loop: each Optuna trial's assignment measured once (a duplicate reuses the measurement, a
hopeless one is screened by the cost model), its constraints recorded, the budget counted across workers; the
uniform baselines, the recipes and the seeds enqueued first in a new study; Ctrl-C finishes the running trial."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import optuna
from optuna.trial import TrialState

from autoq import trial_record
from autoq.costmodel import Screen, screen_was_wrong
from autoq.evaluate import CandidateError, Measurement
from autoq.precision import Assignment, Kind, Precision
from autoq.progress import SearchProgress
from autoq.seeds import Affects
from autoq.settings import RunSettings
from autoq.space import SearchSpace
from autoq.study import OPTION_PREFIX, WORKER, budget_used, recover_interrupted
from autoq.trial_record import TrialRecord


def _constrain(trial: optuna.Trial, violations: list[float]) -> None:
    """Record the constraint values (<= 0 when met) for the samplers and for the trials table."""
    trial_record.write(trial, constraints=tuple(violations))
    for name, value in zip(("quality", "latency", "size"), violations, strict=True):
        trial.set_constraint(name, value)


@contextmanager
def stop_on_ctrl_c() -> Iterator[list[bool]]:
    """First Ctrl-C: finish the running trial, then stop (nothing is lost); a second one stops at once."""
    stopped = [False]
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return

    def handler(signum, frame) -> None:
        if stopped[0]:
            raise KeyboardInterrupt
        stopped[0] = True
        print("autoq: stopping after the running trial (Ctrl-C again to stop now)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stopped
    finally:
        signal.signal(signal.SIGINT, previous)


def _float_only(option: str, precision: Precision) -> bool:
    return precision.kind == Kind.FLOAT


def _weights_only_form(precision: str, allowed: list[str]) -> str:
    """For a layer that does not offer `precision`: its weight format (`Precision.weight_format`) where the layer
    offers that (a tied table then shares its head's weights in the uniform baselines too), else the layer's
    weight-only spec nearest in bytes per weight (an embedding table offering no NF4 takes 4 bits, not float), else
    the layer's first choice."""
    plain = Precision.parse(precision).weight_format()
    if plain is None:
        return allowed[0]
    if str(plain) in allowed:
        return str(plain)
    stored = [p for p in allowed if Precision.parse(p).kind == Kind.WEIGHT_ONLY]
    return min(stored, key=lambda p: abs(Precision.parse(p).bytes_per_weight() - plain.bytes_per_weight()),
               default=allowed[0])


def _enqueue_baselines(study: optuna.Study, choices: dict[str, list[str]], options: dict[str, list],
                       affects: Affects, between: Callable[[], None] = lambda: None) -> None:
    """Every layer at each precision (with the first value of each option), then (after `between`: the runtime's
    recipes) each of those uniform assignments with each other value of every option that changes how it is
    built (`affects`). So OpenVINO's bf16 gets an all-fp32 baseline, ORT's glue float an all-int8 one, and no
    option measures FP32 twice."""
    precisions = sorted({p for c in choices.values() for p in c}, key=lambda p: p != "fp32")
    first = {OPTION_PREFIX + k: v[0] for k, v in options.items() if len(v) > 1}
    uniform = {p: {name: p if p in c else _weights_only_form(p, c) for name, c in choices.items() if len(c) > 1}
               for p in precisions}
    for precision, params in uniform.items():
        study.enqueue_trial(params | first, user_attrs=trial_record.attrs(baseline=f"uniform-{precision}"))
    between()
    for precision, params in uniform.items():
        for key, values in options.items():
            if affects(key, Precision.parse(precision)):
                for value in values[1:]:
                    study.enqueue_trial(params | first | {OPTION_PREFIX + key: value}, user_attrs=trial_record.attrs(
                        baseline=f"uniform-{precision} {key}={value}"))


def _over_budget(study: optuna.Study, trial: optuna.Trial, trials: int) -> bool:
    """With several workers, a trial started when the others' running ones already fill the budget."""
    running = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                  if t.number < trial.number and not TrialRecord.of(t).screened)
    return budget_used(study) + running >= trials


def _measurements(study: optuna.Study) -> dict[str, tuple[tuple, TrialRecord]]:
    """Every measured assignment in the study (all workers'): key -> (objective values, its record)."""
    records = [(t, TrialRecord.of(t)) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return {r.key: (tuple(t.values), r) for t, r in records if r.key}


def _wait_for_twin(study: optuna.Study, trial: optuna.Trial, key: str, timeout: float) -> None:
    """Another worker measuring the same assignment (an earlier trial): wait for it instead of timing it twice."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(
            t.number < trial.number and (record := TrialRecord.of(t)).key == key and not record.screened
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
        time.sleep(0.5)


def suggest(trial: optuna.Trial, choices: dict[str, list[str]], options: dict[str, list],
            affects: Affects = _float_only) -> Assignment:
    """The trial's assignment. An option that changes none of its layers (`affects`) takes its first value, so
    the same model is never measured twice under two option values that cannot differ (SmoothQuant on a CNN)."""
    layers = {n: trial.suggest_categorical(n, c) if len(c) > 1 else c[0] for n, c in choices.items()}
    chosen = {k: trial.suggest_categorical(OPTION_PREFIX + k, v) if len(v) > 1 else v[0] for k, v in options.items()}
    specs = {Precision.parse(p) for p in layers.values()}
    return Assignment(layers, {k: v if any(affects(k, spec) for spec in specs) else options[k][0]
                               for k, v in chosen.items()})


def run_search(study: optuna.Study, evaluate: Callable[[Assignment], Measurement], fp32_quality: float,
               choices: dict[str, list[str]], space: SearchSpace, settings: RunSettings,
               seeds: Sequence[Assignment] = (), screen: Screen | None = None, created: bool = True,
               affects: Affects = _float_only, recipes: Sequence[Assignment] = ()) -> optuna.Study:
    """Run until `settings.trials` trials have been measured in the study (counting earlier runs and other
    workers), or `settings.timeout` seconds. `evaluate` measures one assignment (a Worker's, or an Evaluator's);
    `fp32_quality` anchors --max-drop. A study this call `created` starts with the uniform baselines, then
    `seeds` (sensitivity-guided assignments; an option a seed does not set takes its first value). `screen` skips
    sampled candidates the cost model finds hopeless. `affects(option, precision)` says whether an option changes
    how a precision is built: the uniform baselines are also measured with the option's other values. `recipes`
    (the runtime's recipes in autoq's specs) come right after the uniform baselines, before their variants."""
    constraints, trials = settings.constraints, settings.trials
    if created:
        first = {OPTION_PREFIX + k: v[0] for k, v in space.options.items() if len(v) > 1}

        def enqueue(assignments: Sequence[Assignment]) -> None:
            for seed in assignments:  # with the first value of each option it does not set, as the baselines
                params = {n: p for n, p in seed.layers.items() if len(choices[n]) > 1}
                chosen = {OPTION_PREFIX + k: v for k, v in seed.options.items() if len(space.options.get(k, ())) > 1}
                study.enqueue_trial(params | first | chosen, user_attrs=trial_record.attrs(seeded=True))

        _enqueue_baselines(study, choices, space.options, affects, lambda: enqueue(recipes))
        enqueue(seeds)
    recover_interrupted(study, settings.local)

    def measured_pairs(known: dict) -> list[tuple[Assignment, tuple]]:
        return [(Assignment.from_dict(json.loads(record.assignment)), values) for values, record in known.values()]

    def objective(trial: optuna.Trial) -> tuple[float, float, float]:
        if _over_budget(study, trial, trials):
            trial_record.write(trial, over_budget=True)
            study.stop()
            raise optuna.TrialPruned("the budget is filled by other workers")
        assignment = suggest(trial, choices, space.options, affects)
        key = assignment.key()
        trial_record.write(trial, worker=WORKER, key=key, assignment=json.dumps(assignment.to_dict()))
        if not settings.local:
            _wait_for_twin(study, trial, key, settings.trial_timeout)
        known = _measurements(study)
        if key in known:  # same assignment: reuse the measurement, never time it twice
            values, earlier = known[key]
            trial_record.write(trial, duplicate=True)
            trial_record.write_measurement(trial, earlier.measurement)
            _constrain(trial, constraints.violations(values, fp32_quality))
            return values
        mine = TrialRecord.of(trial)  # with what was enqueued with it
        enqueued = bool(mine.baseline or mine.seeded or mine.retry_of is not None)
        verdict, prediction = ("measure", None) if screen is None or enqueued else screen.verdict(
            assignment, measured_pairs(known))
        if prediction is not None and verdict != "measure":
            trial_record.write(trial, predicted=tuple(float(v) for v in prediction.values), screened=verdict)
            if verdict == "screen":
                raise optuna.TrialPruned("screened: the cost model finds it dominated by the front")
        try:
            record = evaluate(assignment)
        except CandidateError as exc:
            trial_record.write(trial, error=str(exc))
            raise
        trial_record.write_measurement(trial, record.as_dict())
        values = record.values
        if verdict == "audit":
            trial_record.write(trial, screen_wrong=screen_was_wrong(values, measured_pairs(known)))
        _constrain(trial, constraints.violations(values, fp32_quality))
        return values

    if budget_used(study) >= trials:
        return study
    bar = SearchProgress(study, trials, constraints, fp32_quality, enabled=settings.progress)

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        bar.update()
        if stopped[0] or budget_used(study) >= trials:
            study.stop()

    with stop_on_ctrl_c() as stopped, bar:
        study.optimize(objective, timeout=settings.timeout, catch=(CandidateError,), callbacks=[after_trial])
    if stopped[0]:
        raise KeyboardInterrupt
    return study
