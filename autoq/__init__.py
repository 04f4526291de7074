"""autoq: find the per-layer precisions that are Pareto-optimal in quality, measured latency and size."""

from autoq.api import SearchResult, analyse_sensitivity, apply, compare, export, finetune, report, search, verify
from autoq.errors import AutoqError
from autoq.precision import Assignment, Precision
from autoq.settings import RunSettings
from autoq.space import SearchSpace, load_space

__version__ = "0.1.0"
__all__ = ["Assignment", "AutoqError", "Precision", "RunSettings", "SearchResult", "SearchSpace",
           "analyse_sensitivity", "apply", "compare", "export", "finetune", "load_space", "report", "search", "verify"]
