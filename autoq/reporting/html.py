"""report.html: one self-contained file (plotly inlined) that explains the front, works offline."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from autoq.methods import method_of
from autoq.precision import Precision
from autoq.recipes import built
from autoq.reporting.answer import choices, front_table, toggle

STYLE = """<style>body{font-family:sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;max-width:100%}
th,td{padding:3px 10px;text-align:left;border-bottom:1px solid #ddd;font-size:14px;overflow-wrap:break-word}
details{margin:0.5em 0} summary{cursor:pointer;color:#446}</style>"""  # a run's report and a union's


def _front_figure(trials: pd.DataFrame, front: pd.DataFrame, metric: str,
                  recipes: pd.DataFrame | None = None) -> go.Figure:
    done = trials[trials["state"] == "COMPLETE"]
    fig = go.Figure()
    hover = "trial %{customdata}<br>%{text}<br>%{x:.2f} ms, quality %{y:.4f}<extra></extra>"
    feasible = done["feasible"].astype(bool)
    for rows, name, colour in ((done[feasible], "trials", "rgba(221,132,82,0.35)"),
                               (done[~feasible], "outside constraints", "rgba(150,150,150,0.3)")):
        if not rows.empty:
            fig.add_scatter(x=rows["latency_ms"], y=rows["quality"], mode="markers", name=name, text=rows["summary"],
                            marker={"color": colour, "size": 7}, hovertemplate=hover, customdata=rows["trial"])
    fig.add_scatter(x=front["latency_ms"], y=front["quality"], mode="markers+lines", name="Pareto front",
                    line={"shape": "hv", "color": "#dd8452"},
                    marker={"size": 12, "color": front["size_bytes"] / 1e6, "colorscale": "Viridis",
                            "showscale": True, "colorbar": {"title": "size MB"}},
                    text=front["summary"], customdata=front["trial"],
                    hovertemplate="front point, trial %{customdata}<br>%{text}<br>%{x:.2f} ms, quality %{y:.4f}"
                                  "<extra></extra>")
    baselines = done[done["baseline"] != ""].drop_duplicates("baseline")
    fig.add_scatter(x=baselines["latency_ms"], y=baselines["quality"], mode="markers", name="uniform",
                    text=baselines["baseline"], hovertemplate="%{text}<br>%{x:.2f} ms, quality %{y:.4f}<extra></extra>",
                    marker={"symbol": "x", "size": 12, "color": "black"})
    low, high = _zoom(front)
    measured = recipes[recipes["val_quality"].notna()] if recipes is not None else None
    if measured is not None and not measured.empty:
        off = measured["val_quality"] < low  # off the zoomed scale: marked at the bottom edge with their quality
        fig.add_scatter(x=measured["val_latency_ms"], y=measured["val_quality"].clip(lower=low),
                        mode="markers+text", name="one-line recipes",
                        text=[f"{r} ({q:.3f} ↓)" if o else r
                              for r, q, o in zip(measured["recipe"], measured["val_quality"], off, strict=True)],
                        textposition="top right", cliponaxis=False,
                        marker={"symbol": ["triangle-down" if o else "diamond" for o in off], "size": 12,
                                "color": "#c44e52"},
                        hovertemplate="%{text}<br>%{x:.2f} ms<extra></extra>")
    below = int((done["quality"] < low).sum())
    fig.update_layout(title="Quality vs measured latency" + (f" (zoomed on the front; {below} trials below)"
                                                             if below else ""),
                      xaxis_title="latency (ms, median)", yaxis_title=f"quality ({metric})", height=560,
                      template="plotly_white", legend={"orientation": "h", "y": -0.18},
                      yaxis={"range": [low, high]})
    return fig


def _zoom(front: pd.DataFrame) -> tuple[float, float]:
    """The quality range that shows the front (and FP32's 1.0), a margin around it: a broken recipe or trial far
    below would otherwise squash the front into a line at the top."""
    values = pd.concat([front["quality"], front.get("val_quality", front["quality"])]).dropna()
    if values.empty:
        return 0.0, 1.05
    top, bottom = max(float(values.max()), 1.0), float(values.min())
    margin = max((top - bottom) * 0.12, 0.002)
    return bottom - margin, top + margin


def _precision_map(front: pd.DataFrame) -> go.Figure:
    layers = list(json.loads(front["assignment"].iloc[0])["layers"])
    names = sorted({p for assignment in front["assignment"] for p in json.loads(assignment)["layers"].values()})
    z, text, ran = [], [], []
    executed = front["executed"] if "executed" in front else [""] * len(front)
    for assignment, what_ran in zip(front["assignment"], executed, strict=True):
        chosen = json.loads(assignment)["layers"]
        z.append([names.index(chosen[layer]) for layer in layers])
        text.append([chosen[layer] for layer in layers])
        what_ran = json.loads(what_ran) if isinstance(what_ran, str) and what_ran else {}
        ran.append([what_ran.get(layer, "?") for layer in layers])
    used = sorted({v for row in z for v in row})
    scale = []
    for i, value in enumerate(used):  # a discrete colour per precision present
        lo, hi = i / len(used), (i + 1) / len(used)
        scale += [[lo, Precision.parse(names[value]).colour], [hi, Precision.parse(names[value]).colour]]
    position = {v: i for i, v in enumerate(used)}
    rows = [f"point {i} (trial {t})" for i, t in enumerate(front["trial"])]
    fig = go.Figure(go.Heatmap(z=[[position[v] for v in row] for row in z], x=layers, text=text, customdata=ran,
                               y=rows, colorscale=scale, zmin=-0.5, zmax=len(used) - 0.5, xgap=1, ygap=2,
                               hovertemplate="%{y}<br>%{x}: asked %{text}, executed %{customdata}<extra></extra>",
                               colorbar={"tickvals": list(range(len(used))), "ticktext": [names[v] for v in used]}))
    wrong = [(layer, row) for row, asked, got in zip(rows, text, ran, strict=True)
             for layer, a, g in zip(layers, asked, got, strict=True) if g not in (a, "?")]
    if wrong:  # a layer that did not run in the precision it asked for (e.g. a QDQ pair the runtime left unfused)
        fig.add_scatter(x=[w[0] for w in wrong], y=[w[1] for w in wrong], mode="markers", name="executed otherwise",
                        marker={"symbol": "x", "size": 9, "color": "red"})
    fig.update_layout(title="Per-layer precision of each front point (layers in model order)",
                      height=180 + 40 * len(front), template="plotly_white", xaxis={"showticklabels": False})
    return fig


def _sensitivity_figure(scores: pd.DataFrame, layer_order: list[str] | None = None) -> go.Figure:
    """Bars per layer, one group per precision: the column the method shows (a measured quality drop, an SQNR...).
    With `layer_order` (model order) the x axis lines up with the precision map; else most sensitive first."""
    method = method_of(scores)
    column, title = method.column, method.label
    order = layer_order or list(scores.groupby("layer")["score"].max().sort_values(ascending=False).index)
    fig = go.Figure()
    for precision, rows in scores.groupby("precision"):
        rows = rows.set_index("layer").reindex(order)
        fig.add_bar(x=order, y=rows[column], name=precision, marker_color=Precision.parse(precision).colour,
                    error_y={"array": rows[method.spread]} if method.spread else None,
                    customdata=rows[["latency_saving_ms"]].to_numpy(),
                    hovertemplate="%{x}<br>" + column + " %{y:.4g}<br>saves %{customdata[0]:.3f} ms<extra></extra>")
    fig.update_layout(title=f"Per-layer sensitivity ({method.name})", yaxis_title=title,
                      barmode="group", height=380, template="plotly_white",
                      xaxis={"showticklabels": layer_order is None, "tickangle": 45})
    return fig


def write_sensitivity_html(path: Path, scores: pd.DataFrame, model: str, method: str) -> Path:
    plot = _sensitivity_figure(scores).to_html(full_html=False, include_plotlyjs=True)
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>autoq sensitivity</title></head>
<body style="font-family:sans-serif;margin:2em"><h1>Sensitivity of {html.escape(model)} ({html.escape(method)})</h1>
{plot}{_table(scores.sort_values("score", ascending=False))}</body></html>""")
    return path


def _weight_figure(layer: str, weight: np.ndarray, axis: int) -> go.Figure:
    """The coarsest channel of the most sensitive layer: FP32 values vs the int8 grid they round to."""
    moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    channel = int(np.abs(moved).max(axis=1).argmax())
    values = moved[channel]
    scale = max(float(np.abs(values).max()), 1e-12) / 127
    rounded = np.clip(np.round(values / scale), -127, 127) * scale
    grid = np.arange(np.floor(values.min() / scale), np.ceil(values.max() / scale) + 1) * scale
    fig = go.Figure()
    fig.add_histogram(x=values, nbinsx=120, name="FP32 weights", marker_color="#4c72b0", opacity=0.6)
    fig.add_histogram(x=rounded, xbins={"size": scale / 4}, name="after int8 rounding", marker_color="#dd8452",
                      opacity=0.8)
    fig.add_scatter(x=grid, y=np.zeros_like(grid), mode="markers", name=f"int8 grid (step {scale:.3g})",
                    marker={"symbol": "line-ns-open", "size": 10, "color": "black"})
    error = float(np.sqrt(np.mean((values - rounded) ** 2)))
    fig.update_layout(title=f"Most sensitive layer {layer}: channel {channel} before and after int8 rounding "
                            f"(RMS error {error:.3g}, {len(values)} weights)", barmode="overlay", height=380,
                      template="plotly_white", xaxis_title="weight value", yaxis_title="count")
    return fig


def _text(column: pd.Series) -> pd.Series:
    """A column of optional text as strings, "" where empty (read back from CSV, an all-empty one is NaN floats)."""
    return column.astype(object).where(column.notna(), "").astype(str)


def _trial_counts(trials: pd.DataFrame) -> str:
    """Trials by outcome, with how often the cost model's screen proved wrong when checked."""
    text = f"{len(trials)}: {int((trials['state'] == 'COMPLETE').sum())} measured"
    screened = trials[_text(trials["screened"]) != ""] if "screened" in trials else trials[:0]
    if len(screened):
        audited = screened[screened["screened"] == "audit"]
        wrong = int(audited["screen_wrong"].fillna(False).astype(bool).sum())
        text += (f", {len(screened) - len(audited)} screened by the cost model (not measured); {len(audited)} more "
                 f"screened but measured to check: the screen was wrong for {wrong}")
    return text


def _kept_float(kept: dict[str, str] | None) -> str:
    """The run's glue that stays float beside int8 layers, counted by reason."""
    if kept is None:
        return "placed by the backend's own quantizer"
    reasons = pd.Series(list(kept.values()), dtype=object).str.replace(
        r" \S+ would quantize at [\d.-]+ dB SQNR", " its uint8 SQNR is too low", regex=True).value_counts()
    return "; ".join(f"{n} x {reason}" for reason, n in reasons.items()) or "none"


def _region_map(front: pd.DataFrame) -> str:
    """Per front point: the int8 chains (layers running as one integer chain) and where float<->int8
    conversions remain in the runtime's graph (beside the executed check)."""
    if "glue" not in front or not _text(front["glue"]).str.len().any():
        return ""
    rows = []
    for point, glue in zip(front.get("point", front.index), _text(front["glue"]), strict=True):
        if not glue:
            continue
        found = json.loads(glue)
        chains = sorted(found["chains"], key=len, reverse=True)
        listed = "; ".join(f"[{len(c)}] {c[0]} .. {c[-1]}" for c in chains[:6]) + (" ..." if len(chains) > 6 else "")
        where = ", ".join(found["conversions"][:6]) + (" ..." if len(found["conversions"]) > 6 else "")
        rows.append({"point": point, "int8 chains": len(chains), "chains (layers, first .. last)": listed,
                     "conversions": len(found["conversions"]), "where": where})
    return ("<h2>Region map: int8 chains and the float&lt;-&gt;int8 conversions left in the runtime's graph</h2>"
            + _table(pd.DataFrame(rows)))


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, border=0, classes="table", float_format=lambda v: f"{v:.4g}")


def recipe_verdicts_html(recipes: pd.DataFrame | None) -> tuple[str, str]:
    """(the line at the top, the section) on the runtime's one-line recipes against the front."""
    if recipes is None or recipes.empty:
        return "", ""
    measured = built(recipes)
    beaten = (measured["dominated_by"].notna() | measured.get("matched_by", measured["dominated_by"]).notna()
              | measured["verdict"].astype(str).str.startswith("unusable"))
    top = (f'<p style="color:#c00;font-weight:bold">The front does not dominate: '
           f'{html.escape(", ".join(measured.loc[~beaten, "recipe"]))}</p>' if (~beaten).any() else
           f"<p><b>The front dominates (or matches within the measurement spread) all {len(measured)} measured "
           "one-line recipes of this runtime that keep a usable quality.</b></p>")
    readable = pd.DataFrame({
        "recipe": recipes["recipe"],
        "quality": [f"{q:.4f}" if pd.notna(q) else "" for q in recipes["val_quality"]],
        "latency": [f"{ms:.2f} ms" if pd.notna(ms) else "" for ms in recipes["val_latency_ms"]],
        "speed-up vs FP32": [f"{x:.2f}x" if pd.notna(x) else "" for x in recipes["speedup"]],
        "size": [f"{b / 1e6:.1f} MB" if pd.notna(b) else "" for b in recipes["size_bytes"]],
        "verdict": _text(recipes["verdict"]) + _text(recipes.get("error", pd.Series("", index=recipes.index)))})
    return top, ("<h2>The runtime's one-line recipes, measured in this run (validation split, latency in the "
                 "study's FP32 scale)</h2>" + _table(readable) + toggle("all columns", _table(recipes)))


def write_html(path: Path, trials: pd.DataFrame, front: pd.DataFrame, meta: dict,
               scores: pd.DataFrame | None = None, weight: tuple[str, np.ndarray, int] | None = None,
               recipes: pd.DataFrame | None = None) -> Path:
    figures = [_front_figure(trials, front, meta.get("metric", "quality"), recipes)]
    recipes_top, recipes_section = recipe_verdicts_html(recipes)
    if not front.empty:
        figures.append(_precision_map(front))
        if scores is not None and not scores.empty:
            figures.append(_sensitivity_figure(scores, list(json.loads(front["assignment"].iloc[0])["layers"])))
        if weight is not None:
            figures.append(_weight_figure(*weight))
    plots = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figures)]
    fp32 = trials.loc[trials["baseline"].astype(str) == "uniform-fp32", "quality"]
    answer = choices(front, recipes, float(fp32.iloc[0]) if len(fp32) else 1.0)
    disagree = front.loc[front["settings_disagree"].fillna(False).astype(bool), "point"].tolist() if (
        "settings_disagree" in front.columns) else []
    machine = meta.get("machine", {})
    facts = {"model": meta.get("model"), "backend": meta.get("backend"), "metric": meta.get("metric"),
             "CPU": machine.get("cpu"), "CPU flags": " ".join(machine.get("cpu_flags", [])),
             "cores / threads": f"{machine.get('cores')} / {machine.get('threads')}",
             "libraries": ", ".join(f"{k} {v}" for k, v in machine.get("libraries", {}).items()),
             "trials": _trial_counts(trials),
             "glue kept float next to int8 regions": _kept_float(meta.get("glue_kept_float")),
             "median load of other processes (cores)": f"{trials['load'].median():.2f}" if len(trials) else "",
             "trials re-timed because FP32 drifted more than 20% from the study's": (
                 int((trials["retimed"].fillna(0) > 0).sum()) if "retimed" in trials.columns else 0),
             "latency is": meta.get("timed", "?"),
             "timing settings": f"search: {meta.get('search_settings', '?')}; front also re-timed as deployed: "
                                f"{meta.get('deployed_settings', '?')}" + (
                                    f" (the two disagree beyond their spread on points {disagree})" if disagree else
                                    " (they agree within their spread on every point)" if "settings_disagree" in
                                    front.columns else ""),
             "wall time of this run": f"{meta.get('wall_s', 0):.0f} s"}
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>autoq report</title>
{STYLE}</head><body>
<h1>autoq: {html.escape(str(meta.get("model", "")))} on {html.escape(str(meta.get("backend", "")))}</h1>
<h2>What to take</h2>{_table(answer) if not answer.empty else "<p>No front point.</p>"}
{recipes_top}
<h2>Pareto front</h2>{plots[0]}
<h2>Front points (quality and latency re-measured on the validation split)</h2>
{_table(front_table(front)) if not front.empty else ""}{toggle("all columns", _table(front))}
{recipes_section}
{toggle("machine, libraries and how this run was timed", f"<table>{rows}</table>")}
{_region_map(front)}
{"".join(plots[1:]) if len(plots) > 1 else "<p>No completed trial.</p>"}
</body></html>"""
    path.write_text(body)
    return path


def write_compare_html(path: Path, runs: dict[str, tuple[pd.DataFrame, pd.DataFrame, dict]]) -> Path:
    """Overlay the fronts of several runs (e.g. two backends on one model): label -> (trials, front, meta)."""
    fig = go.Figure()
    rows = []
    for label, (trials, front, meta) in runs.items():
        done = trials[trials["state"] == "COMPLETE"]
        fig.add_scatter(x=done["latency_ms"], y=done["quality"], mode="markers", name=f"{label}: all trials",
                        marker={"size": 6, "opacity": 0.25}, text=done["summary"])
        fig.add_scatter(x=front["latency_ms"], y=front["quality"], mode="markers+lines", name=f"{label}: front",
                        line={"shape": "hv"}, marker={"size": 11}, text=front["summary"])
        machine = meta.get("machine", {})
        rows.append({"run": label, "model": meta.get("model"), "backend": meta.get("backend"),
                     "metric": meta.get("metric"), "cpu": machine.get("cpu"), "threads": machine.get("threads"),
                     "trials": len(trials), "front points": len(front)})
    fig.update_layout(title="Fronts compared", xaxis_title="latency (ms)", yaxis_title="quality", height=560,
                      template="plotly_white")
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>autoq compare</title></head>
<body style="font-family:sans-serif;margin:2em"><h1>autoq: fronts compared</h1>{_table(pd.DataFrame(rows))}
{fig.to_html(full_html=False, include_plotlyjs=True)}</body></html>""")
    return path


def write_union_html(path: Path, front: pd.DataFrame, candidates: pd.DataFrame, recipes: pd.DataFrame,
                     timed: pd.DataFrame, meta: dict, backends: list[str]) -> Path:
    """The union of several backends' fronts (`autoq.union`): every backend's points and recipes on one latency
    axis (one set of alternating rounds), the union front, the recipes' verdicts and every model's timing."""
    fig = go.Figure()
    for backend in backends:
        own = candidates[candidates["backend"] == backend] if not candidates.empty else candidates
        fig.add_scatter(x=own.get("latency_ms"), y=own.get("quality"), mode="markers", name=f"{backend}: its front",
                        marker={"size": 9, "opacity": 0.5}, text=own.get("summary"))
        made = recipes[recipes["backend"] == backend] if not recipes.empty else recipes
        fig.add_scatter(x=made.get("val_latency_ms"), y=made.get("val_quality"), mode="markers",
                        name=f"{backend}: recipes", marker={"symbol": "x", "size": 11}, text=made.get("recipe"))
    fig.add_scatter(x=front.get("latency_ms"), y=front.get("quality"), mode="lines+markers", name="union front",
                    line={"shape": "hv", "color": "black"}, marker={"size": 5, "color": "black"},
                    text=front.get("summary"))
    fig.update_layout(title="One front across runtimes", xaxis_title="latency (ms, one set of alternating rounds)",
                      yaxis_title=str(meta.get("metric", "quality")), height=560, template="plotly_white")
    recipes_top, recipes_section = recipe_verdicts_html(recipes if not recipes.empty else None)
    answer = choices(front, recipes if not recipes.empty else None)
    machine = meta.get("machine", {})
    facts = (f"{html.escape(str(machine.get('cpu')))}, {machine.get('threads')} threads; every model timed in "
             f"{meta.get('rounds')} alternating rounds over {meta.get('passes')} passes against "
             f"{html.escape(str(meta.get('reference')))} ({meta.get('fp32_ms', 0):.2f} ms)"
             + ("; <b>FP32's speed drifted during the rounds</b>" if meta.get("drifted") else ""))
    links = " ".join(f'<a href="{b}/report.html">{b}</a>' for b in backends)
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>autoq union report</title>
{STYLE}</head><body>
<h1>autoq: {html.escape(str(meta.get("model", "")))} across {html.escape(", ".join(backends))}</h1>
<p>{facts}. Each backend's own run: {links}.</p>
<h2>What to take</h2>{_table(answer) if not answer.empty else "<p>No front point.</p>"}
{recipes_top}{fig.to_html(full_html=False, include_plotlyjs=True)}
<h2>The union front</h2>{_table(front_table(front).assign(backend=front["backend"].to_numpy()))
                          if not front.empty else ""}
{toggle("all columns", _table(front))}{recipes_section}
<h2>Every model timed</h2>{_table(timed)}</body></html>""")
    return path
