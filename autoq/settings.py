"""How a run is set up: one frozen, validated record that the API, the CLI and the search loop read."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from autoq.constraints import Constraints
from autoq.demo import DEMOS
from autoq.errors import AutoqError
from autoq.metrics import Metric
from autoq.space import SearchSpace

RECIPE_MODES = ("auto", "none")
DEMO_NAMES = tuple(DEMOS)


@dataclass(frozen=True)
class RunSettings:
    """Everything about a run but the model and its data. Bad values are a one-line error when it is made.

    `max_drop` ("0.5%" of the FP32 quality, or 0.01 absolute), `latency_budget` ("5ms") and `size_budget`
    ("20MB") make the constraints; `sampler` overrides the space's; `storage` (an SQLAlchemy URL) and `study`
    let several machines share one study; `recipes="auto"` measures the backend's one-line recipes beside the
    front, "none" skips them; a trial that crashes or takes over `trial_timeout` seconds fails alone."""

    backend: str = "onnxruntime"
    space: str | Path | dict | SearchSpace | None = None  # None: the backend's default space
    labels: str | Path | np.ndarray | None = None
    metric: str | Metric | None = None
    threads: int = 2
    out: str | Path | None = None  # None: reports/<model>-<backend>
    seed: int | None = None  # None: the space's
    sampler: str | None = None
    trials: int = 30
    timeout: float | None = None
    progress: bool = True
    max_drop: str | float | None = None
    latency_budget: str | float | None = None
    size_budget: str | float | None = None
    trial_timeout: float = 600
    storage: str | None = None
    study: str = "autoq"
    recipes: str = "auto"
    demo: str = "minilm"  # with no model: the embedded demo to search (minilm | llm)
    text: str | Path | None = None  # with a Hugging Face causal LM folder as the model: the text to keep perplexity on

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise AutoqError("--threads must be at least 1")
        if self.trials < 1:
            raise AutoqError("--trials must be at least 1")
        if self.trial_timeout <= 0:
            raise AutoqError("--trial-timeout must be more than 0 seconds")
        if self.demo not in DEMO_NAMES:
            raise AutoqError(f"--demo must be one of {', '.join(DEMO_NAMES)}, not {self.demo!r}")
        if self.recipes not in RECIPE_MODES:
            raise AutoqError(f"--recipes must be {' or '.join(RECIPE_MODES)}, not {self.recipes!r}")
        self.constraints  # noqa: B018 - parsed here so that a bad budget fails before any work

    @property
    def constraints(self) -> Constraints:
        return Constraints.parse(self.max_drop, self.latency_budget, self.size_budget)

    @property
    def local(self) -> bool:
        """Whether the study lives in the run directory (no other worker shares it)."""
        return self.storage is None

    def changed(self, **changes: Any) -> RunSettings:
        """A copy with `changes`; a name that is no setting is an error listing the settings."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            msg = f"unknown setting {unknown[0]!r} (the settings: {', '.join(sorted(known))})"
            raise AutoqError(msg)
        return replace(self, **changes)
