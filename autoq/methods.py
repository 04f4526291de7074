"""The sensitivity methods: one registry that the analyser, the search space, the CLI, the cost model and the
report read. A method says how it scores (a function `rows(evaluator, pairs)`, named `module:function` and imported
only when used), whether it needs the torch module, which column its plots show, and the quality drop the cost
model starts from. A new method is one `register_method` call beside its scoring function."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from autoq.errors import AutoqError

if TYPE_CHECKING:  # the CLI reads this registry for its help: no heavy imports at run time
    import numpy as np
    import pandas as pd


@dataclass(frozen=True)
class SensitivityMethod:
    name: str
    summary: str  # one line for the CLI's help and the docs
    rows: str  # "module:function" -> (evaluator, [(layer, precision)]) -> [row dicts with at least "score"]
    column: str  # the table column its plots show
    label: str  # that column's axis title
    drop: Callable[[pd.DataFrame], np.ndarray]  # per row: the quality drop the cost model starts from
    needs_module: bool = False  # scores a torch nn.Module, not the ONNX graph
    spread: str | None = None  # the column holding each score's spread, if any

    def score(self, evaluator, pairs: list) -> list[dict]:
        module, _, function = self.rows.partition(":")
        return getattr(importlib.import_module(module), function)(evaluator, pairs)


METHODS: dict[str, SensitivityMethod] = {}


def register_method(method: SensitivityMethod) -> SensitivityMethod:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> SensitivityMethod:
    """The registered method `name`; an unknown name is an error listing the registered ones."""
    if name not in METHODS:
        msg = f"unknown sensitivity method '{name}' (registered: {', '.join(METHODS)})"
        raise AutoqError(msg)
    return METHODS[name]


def method_of(table: pd.DataFrame) -> SensitivityMethod:
    """The method that wrote a sensitivity table (its `method` column; tables written before it had one are told
    apart by which score column they filled)."""
    if "method" in table and table["method"].notna().any():
        return get_method(str(table["method"].dropna().iloc[0]))
    filled = "quality_drop" if table["quality_drop"].notna().any() else (
        "sqnr_db" if table["sqnr_db"].notna().any() else "hessian_trace")
    return next(m for m in METHODS.values() if m.column == filled)


register_method(SensitivityMethod(
    "measured", "quantize each layer alone and measure the quality drop (minutes)", "autoq.sensitivity:measured_rows",
    "quality_drop", "quality drop, this layer alone", lambda t: t["quality_drop"].to_numpy(float),
    spread="drop_spread"))
register_method(SensitivityMethod(
    "sqnr", "one-pass signal-to-quantization-noise ratio of each layer (seconds)", "autoq.sensitivity:sqnr_rows",
    "sqnr_db", "SQNR of this layer alone, dB (lower = more sensitive)",
    lambda t: 10 ** (-t["sqnr_db"].to_numpy(float) / 10)))  # the noise power shapes the quality loss
register_method(SensitivityMethod(
    "calibrated", "SQNR noise scaled per layer by one simulated, measured quality drop (a minute)",
    "autoq.sensitivity:calibrated_rows", "estimated_drop", "estimated quality drop, this layer alone",
    lambda t: t["estimated_drop"].to_numpy(float)))
register_method(SensitivityMethod(
    "hessian", "HAWQ-V2 Hessian trace x weight perturbation (torch modules)", "autoq.hessian:hessian_rows",
    "score", "Hessian trace x squared weight perturbation", lambda t: t["score"].to_numpy(float),
    needs_module=True))
