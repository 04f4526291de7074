"""The report's first screen: the front point a user would take for each need, with its speed-up over FP32 and
over the fastest one-line recipe it is at least as good as; and the front as a readable table (MB, ms with
spreads, one latency per point: the validation re-measure), the raw columns behind a toggle."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

FLOOR = 0.99  # "within 1% of FP32's quality": the need a user names first when no --max-drop was given
FASTER = 1.05  # "faster than FP32": by 5% at least (FP32's own graph times within a few % of itself)


def _quality(front: pd.DataFrame) -> pd.Series:
    return front["val_quality"] if "val_quality" in front else front["quality"]


def _latency(front: pd.DataFrame) -> pd.Series:
    return front["val_latency_ms"] if "val_latency_ms" in front else front["latency_ms"]


def _point(value: object) -> str:
    """A front point's number ('' while a running search has not numbered it yet)."""
    return str(int(value)) if isinstance(value, int | float | np.integer | np.floating) and pd.notna(value) else ""


def _ratio(row: pd.Series) -> float:
    """The point's speed-up over FP32 from the same alternating rounds (FP32's ms over its own, both measured)."""
    fp32 = row.get("val_fp32_latency_ms", row.get("fp32_latency_ms", np.nan))
    measured = row.get("val_measured_latency_ms", row.get("measured_latency_ms", np.nan))
    return float(fp32 / measured) if pd.notna(fp32) and pd.notna(measured) and measured > 0 else np.nan


def _speedup(row: pd.Series) -> str:
    """The speed-up over FP32, with the spread of the point's latency carried over (relative)."""
    ratio = _ratio(row)
    if np.isnan(ratio):
        return "?"
    latency = row.get("val_latency_ms", row.get("latency_ms", np.nan))
    spread = row.get("val_latency_spread_ms", row.get("latency_spread_ms", np.nan))
    return f"{ratio:.2f}x" + (f" ± {ratio * spread / 2 / latency:.2f}" if pd.notna(spread) and latency else "")


def _over_recipe(quality: float, latency: float, recipes: pd.DataFrame | None) -> str:
    """The point's speed over the fastest usable recipe whose quality it matches or beats (stored figures)."""
    if recipes is None or recipes.empty or "val_quality" not in recipes:
        return "no recipe measured"
    usable = recipes[recipes["val_quality"].notna() & ~recipes["verdict"].astype(str).str.startswith("unusable")]
    slower = usable[usable["val_quality"] <= quality + 1e-9]
    if slower.empty:
        return "every recipe is more accurate"
    best = slower.loc[slower["val_latency_ms"].idxmin()]
    return f"{best['val_latency_ms'] / latency:.2f}x vs {best['recipe']}"


def choices(front: pd.DataFrame, recipes: pd.DataFrame | None, fp32_quality: float = 1.0) -> pd.DataFrame:
    """One row per need: the point that answers it, or none."""
    if front.empty:
        return pd.DataFrame()
    quality, latency = _quality(front), _latency(front)
    faster = front[[_ratio(row) >= FASTER for _, row in front.iterrows()]]
    needs = {"fastest": front.loc[latency.idxmin()],
             f"fastest within {100 - FLOOR * 100:.0f}% of FP32's quality": (
                 front[quality >= FLOOR * fp32_quality].loc[lambda f: _latency(f).idxmin()]
                 if (quality >= FLOOR * fp32_quality).any() else None),
             "most accurate faster than FP32": faster.loc[_quality(faster).idxmax()] if not faster.empty else None,
             "smallest": front.loc[front["size_bytes"].idxmin()]}
    rows = []
    for need, row in needs.items():
        if row is None:
            rows.append({"you need": need, "take": "no point"})
            continue
        q, ms = float(row.get("val_quality", row["quality"])), float(row.get("val_latency_ms", row["latency_ms"]))
        rows.append({"you need": need, "take": f"point {_point(row.get('point'))}", "quality": f"{q:.4f}",
                     "latency": f"{ms:.2f} ms", "speed-up vs FP32": _speedup(row),
                     "vs the recipes": _over_recipe(q, ms, recipes), "size": f"{row['size_bytes'] / 1e6:.1f} MB",
                     "precisions": row["summary"]})
    return pd.DataFrame(rows).fillna("")


def front_table(front: pd.DataFrame) -> pd.DataFrame:
    """The front as a user reads it: validation quality with its spread, one latency (validation) with its spread,
    the speed-up over FP32, MB, whether every layer executed as assigned."""
    quality, latency = _quality(front), _latency(front)
    q_spread = front.get("val_quality_spread", pd.Series(np.nan, index=front.index))
    l_spread = front.get("val_latency_spread_ms", front.get("latency_spread_ms", pd.Series(np.nan, index=front.index)))
    table = pd.DataFrame({
        "point": [_point(v) for v in front["point"]] if "point" in front else range(len(front)),
        "precisions": front["summary"],
        "quality": [f"{q:.4f}" + (f" ± {s:.4f}" if pd.notna(s) else "") for q, s in zip(quality, q_spread,
                                                                                     strict=True)],
        "latency": [f"{ms:.2f} ± {s / 2:.2f} ms" if pd.notna(s) else f"{ms:.2f} ms" for ms, s in zip(latency, l_spread,
                                                                                                    strict=True)],
        "speed-up vs FP32": [_speedup(row) for _, row in front.iterrows()],
        "size": [f"{b / 1e6:.1f} MB" for b in front["size_bytes"]],
        "executed as assigned": ["yes" if ok else "NO" for ok in front.get(
            "val_executed_ok", front.get("executed_ok", pd.Series(True, index=front.index))).fillna(True)]})
    if "finetuned_from" in front and front["finetuned_from"].notna().any():
        table["fine-tuned from"] = [f"point {int(v)}" if pd.notna(v) else "" for v in front["finetuned_from"]]
    return table


def toggle(title: str, inner: str) -> str:
    """`inner` behind a click (the raw columns a user rarely needs)."""
    return f"<details><summary>{html.escape(title)}</summary>{inner}</details>"
