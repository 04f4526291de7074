"""The samplers a search can use: one registry (name -> factory of an Optuna sampler) that the search space, the
CLI, the search and the docs read. A new sampler is one `register_sampler` call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from autoq.errors import AutoqError

if TYPE_CHECKING:  # the CLI reads this registry for its help: Optuna is imported when a sampler is made
    from optuna.samplers import BaseSampler


@dataclass(frozen=True)
class SamplerKind:
    name: str
    summary: str  # one line for the CLI's help and the docs
    make: Callable[[int, int], BaseSampler]  # (seed, population) -> the sampler


SAMPLERS: dict[str, SamplerKind] = {}


def register_sampler(name: str, make: Callable[[int, int], BaseSampler], summary: str) -> SamplerKind:
    SAMPLERS[name] = SamplerKind(name, summary, make)
    return SAMPLERS[name]


def get_sampler(name: str) -> SamplerKind:
    """The registered sampler `name`; an unknown name is an error listing the registered ones."""
    if name not in SAMPLERS:
        msg = f"unknown sampler '{name}' (registered: {', '.join(SAMPLERS)})"
        raise AutoqError(msg)
    return SAMPLERS[name]


def _nsga2(seed: int, population: int) -> BaseSampler:
    import optuna

    return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)


def _tpe(seed: int, population: int) -> BaseSampler:
    import optuna

    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def _gp(seed: int, population: int) -> BaseSampler:
    import optuna

    return optuna.samplers.GPSampler(seed=seed)


def _random(seed: int, population: int) -> BaseSampler:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


register_sampler("nsga2", _nsga2, "NSGA-II, the space's population per generation (the default)")
register_sampler("tpe", _tpe, "multi-objective TPE (multivariate)")
register_sampler("gp", _gp, "Optuna's GP sampler (log expected hypervolume improvement)")
register_sampler("random", _random, "random assignments")
