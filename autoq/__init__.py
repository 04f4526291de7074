"""autoq: find the per-layer precisions that are Pareto-optimal in quality, measured latency and size.

The names below load on first use (PEP 562), so `import autoq`, `autoq --help` and a worker process load no
runtime, pandas or Optuna until they need them."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
_WHERE = {"SearchResult": "autoq.api", "analyse_sensitivity": "autoq.api", "apply": "autoq.api",
          "compare": "autoq.api", "export": "autoq.api", "finetune": "autoq.api", "report": "autoq.api",
          "search": "autoq.api", "verify": "autoq.api", "AutoqError": "autoq.errors", "Assignment": "autoq.precision",
          "Precision": "autoq.precision", "RunSettings": "autoq.settings", "SearchSpace": "autoq.space",
          "load_space": "autoq.space"}
__all__ = ["Assignment", "AutoqError", "Precision", "RunSettings", "SearchResult", "SearchSpace",
           "analyse_sensitivity", "apply", "compare", "export", "finetune", "load_space", "report", "search", "verify"]

if TYPE_CHECKING:
    from autoq.api import SearchResult, analyse_sensitivity, apply, compare, export, finetune, report, search, verify
    from autoq.errors import AutoqError
    from autoq.precision import Assignment, Precision
    from autoq.settings import RunSettings
    from autoq.space import SearchSpace, load_space


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'autoq' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
