"""The cost model and its screen. The 'measurements' here come from a known additive cost (plus noise), so the
test can say what the right prediction and the right screening decision are; the real model is measured in
benchmarks/search_efficiency.py."""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd
import pytest

from autoq.costmodel import AUDIT_EVERY, CostModel, Prediction, Screen, dominated
from autoq.evaluate import Measurement
from autoq.objective import run_search
from autoq.pareto import DIRECTIONS
from autoq.precision import Assignment
from autoq.settings import RunSettings
from autoq.space import parse_space

LAYERS = [f"layer{i}" for i in range(12)]
RNG = np.random.default_rng(0)
DROP = RNG.uniform(0, 0.01, len(LAYERS)) * (np.arange(len(LAYERS)) < 3) * 10 + 0.001  # three fragile layers
SAVING = RNG.uniform(0.5, 1.5, len(LAYERS))  # ms saved by int8
BYTES = np.full(len(LAYERS), 3e6)


def _sensitivity(noise: float = 0.5) -> pd.DataFrame:
    """What the analyser would give: the right shape, off by up to +-`noise` relative, in sqnr units."""
    wobble = 1 + RNG.uniform(-noise, noise, len(LAYERS))
    return pd.DataFrame({"layer": LAYERS, "precision": "int8", "quality_drop": np.nan,
                         "sqnr_db": -10 * np.log10(DROP * wobble), "latency_saving_ms": SAVING * 0.8 * wobble,
                         "size_saving_bytes": BYTES})


def _truth(assignment: Assignment, noise: float = 0.0005) -> tuple[float, float, float]:
    x = np.array([assignment.layers[n] == "int8" for n in LAYERS], dtype=float)
    return (1.0 - x @ DROP + RNG.normal(0, noise), 20.0 - x @ SAVING + RNG.normal(0, 0.1), 48e6 - x @ BYTES)


def _measured(assignment: Assignment) -> Measurement:
    """The synthetic truth as the evaluator would report it."""
    quality, latency, size = _truth(assignment)
    return Measurement(quality, 0.0, latency, 0.0, latency, 1, 0.0, None, None, int(size))


def _random(count: int) -> list[Assignment]:
    picks = [Assignment({n: "fp32" for n in LAYERS})]
    picks += [Assignment({n: "int8" if RNG.random() < 0.5 else "fp32" for n in LAYERS}) for _ in range(count - 1)]
    return picks


CHOICES = {n: ["fp32", "int8"] for n in LAYERS}


def test_the_fitted_model_predicts_unseen_assignments():
    model = CostModel(_sensitivity(), CHOICES)
    train = [(a, _truth(a)) for a in _random(25)]
    assert model.fit(train)
    errors = np.array([np.subtract(_truth(a, 0), model.predict(a).values) for a in _random(30)[1:]])
    assert np.abs(errors[:, 0]).mean() < 0.002  # quality drops of up to ~0.1 predicted within 0.002
    assert np.abs(errors[:, 1]).mean() < 0.3  # latency savings of ~10 ms within 0.3 ms
    assert np.abs(errors[:, 2]).max() < 1  # sizes add up exactly
    # the cross-validated margins are honest: no larger than needed by much, and not below the noise
    assert 0.001 < model.margins[0] < 0.01 and 0.1 < model.margins[1] < 1.5


def test_the_model_waits_for_enough_trials_and_an_fp32_point():
    model = CostModel(_sensitivity(), CHOICES)
    few = [(a, _truth(a)) for a in _random(5)]
    assert not model.fit(few)
    no_fp32 = [(a, _truth(a)) for a in _random(20)[1:]]
    assert not model.fit(no_fp32)


def test_dominated_needs_a_clear_margin_in_every_objective():
    front = np.array([[0.99, 10.0, 30e6]])
    margins = np.array([0.005, 0.5, 1e5])
    assert dominated(Prediction(np.array([0.97, 12.0, 40e6]), margins), front)
    assert not dominated(Prediction(np.array([0.988, 12.0, 40e6]), margins), front)  # quality within the margin
    assert not dominated(Prediction(np.array([0.97, 10.3, 40e6]), margins), front)  # latency within the margin
    assert not dominated(Prediction(np.array([0.97, 12.0, 29e6]), margins), front)  # smaller: may join the front


def test_screen_skips_hopeless_candidates_and_audits_some():
    screen = Screen(_sensitivity(), CHOICES)
    measured = [(a, _truth(a)) for a in _random(30)]
    everything_fragile = Assignment({n: "int8" if i < 3 else "fp32" for i, n in enumerate(LAYERS)})
    verdicts = [screen.verdict(everything_fragile, measured)[0] for _ in range(2 * AUDIT_EVERY)]
    assert verdicts.count("audit") == 2 and verdicts.count("screen") == 2 * AUDIT_EVERY - 2
    robust = Assignment({n: "fp32" if i < 3 else "int8" for i, n in enumerate(LAYERS)})  # the true best trade
    assert screen.verdict(robust, measured)[0] == "measure"


def test_screened_trials_are_recorded_and_do_not_use_the_budget(tmp_path):
    space = parse_space({"sampler": "random", "sensitivity": "sqnr"})
    study = optuna.create_study(directions=DIRECTIONS, sampler=optuna.samplers.RandomSampler(seed=0),
                                storage=f"sqlite:///{tmp_path / 'study.db'}")
    calls = []

    def evaluate(assignment: Assignment) -> Measurement:
        calls.append(assignment)
        return _measured(assignment)

    run_search(study, evaluate, 1.0, CHOICES, space, RunSettings(trials=40, progress=False),
               screen=Screen(_sensitivity(), CHOICES))
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    screened = [t for t in trials if t.state.name == "PRUNED"]
    assert len(complete) == 40 and len(calls) == len({a.key() for a in calls})  # measured: the budget, once each
    assert screened and all(t.user_attrs["screened"] == "screen" and len(t.user_attrs["predicted"]) == 3
                            for t in screened)
    audited = [t for t in complete if t.user_attrs.get("screened") == "audit"]
    assert audited and all(isinstance(t.user_attrs["screen_wrong"], bool) for t in audited)
    # each screened one really was hopeless: its true value is dominated by a measured trial
    values = np.array([t.values for t in complete])
    for t in screened:
        q, latency, size = _truth(Assignment.from_dict(__import__("json").loads(t.user_attrs["assignment"])), 0)
        assert ((values[:, 0] >= q) & (values[:, 1] <= latency) & (values[:, 2] <= size)).any()


@pytest.mark.parametrize("sampler", ["tpe", "gp"])
def test_other_samplers_run_the_same_study(sampler, tmp_path):
    space = parse_space({"sampler": sampler, "sensitivity": "none"})
    from autoq.study import make_sampler

    study = optuna.create_study(directions=DIRECTIONS, sampler=make_sampler(space, 0))
    run_search(study, _measured, 1.0, CHOICES, space, RunSettings(trials=14, progress=False))
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 14


def test_seeds_run_with_the_first_value_of_each_option():
    """A seed is compared with the baselines: it takes the options' first values (unless it sets one), not a
    random draw."""
    space = parse_space({"sampler": "random", "sensitivity": "none", "options": {"float": ["bf16", "f32"],
                                                                                 "act": ["asym", "sym"]}})
    study = optuna.create_study(directions=DIRECTIONS, sampler=optuna.samplers.RandomSampler(seed=0))
    seeds = [Assignment({n: "int8" if i % 2 else "fp32" for i, n in enumerate(LAYERS)}),
             Assignment({n: "int8" if i < 2 else "fp32" for i, n in enumerate(LAYERS)})]
    seen = []

    def evaluate(assignment: Assignment) -> Measurement:
        seen.append(assignment)
        return _measured(assignment)

    seeds.append(Assignment(seeds[0].layers, {"act": "sym"}))  # a seed that sets an option keeps it
    run_search(study, evaluate, 1.0, CHOICES, space, RunSettings(trials=12, progress=False), seeds=seeds)
    seeded = [a for a in seen if a.layers in [s.layers for s in seeds]]
    assert [a.options for a in seeded] == [{"float": "bf16", "act": "asym"}, {"float": "bf16", "act": "asym"},
                                           {"float": "bf16", "act": "sym"}]
