"""What the user needs: a quality floor, a latency budget, a size budget. Trials outside are infeasible."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from autoq.errors import AutoqError

_UNITS = {"latency": {"": 1.0, "ms": 1.0, "s": 1000.0, "us": 1e-3},
          "size": {"": 1e6, "b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9}}


def _amount(text: str | float, kind: str, flag: str) -> float:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS[kind]:
        units = ", ".join(u for u in _UNITS[kind] if u)
        msg = f"{flag} {text!r} is not an amount: give a number with a unit ({units})"
        raise AutoqError(msg)
    return float(match.group(1)) * _UNITS[kind][unit]


@dataclass(frozen=True)
class Constraints:
    max_drop: float | None = None  # quality below the FP32 quality, absolute or (relative=True) a fraction
    relative: bool = False
    latency_budget_ms: float | None = None
    size_budget_bytes: float | None = None

    @classmethod
    def parse(cls, max_drop: str | float | None = None, latency_budget: str | float | None = None,
              size_budget: str | float | None = None) -> Constraints:
        """`max_drop`: "0.5%" (relative to the FP32 quality) or 0.01 (absolute); budgets: "5ms", "20MB"."""
        drop, relative = None, False
        if max_drop is not None:
            text = str(max_drop).strip()
            relative = text.endswith("%")
            try:
                drop = float(text.rstrip("%")) / (100 if relative else 1)
            except ValueError:
                drop = -1.0
            if drop < 0:
                msg = f"--max-drop {max_drop!r} is not a drop: give e.g. 0.5% (relative) or 0.01 (absolute)"
                raise AutoqError(msg)
        return cls(drop, relative,
                   None if latency_budget is None else _amount(latency_budget, "latency", "--latency-budget"),
                   None if size_budget is None else _amount(size_budget, "size", "--size-budget"))

    def violations(self, values: Sequence[float], fp32_quality: float) -> list[float]:
        """Optuna's convention: one value per constraint, <= 0 when it is met; `values` are the objectives
        (quality, latency ms, size bytes)."""
        quality, latency_ms, size_bytes = values
        floor = self.quality_floor(fp32_quality)
        return [0.0 if floor is None else floor - quality,
                0.0 if self.latency_budget_ms is None else latency_ms - self.latency_budget_ms,
                0.0 if self.size_budget_bytes is None else size_bytes - self.size_budget_bytes]

    def quality_floor(self, fp32_quality: float) -> float | None:
        """The lowest quality --max-drop allows, or None without one."""
        if self.max_drop is None:
            return None
        return fp32_quality * (1 - self.max_drop) if self.relative else fp32_quality - self.max_drop

    def feasible(self, values: Sequence[float], fp32_quality: float) -> bool:
        return all(v <= 0 for v in self.violations(values, fp32_quality))

    def as_dict(self) -> dict:
        return asdict(self)
