"""Figures of the Schedules page (issue 7): error against latency with the Pareto front, errors on
trap tasks, chosen T per task family, measured trajectories, controller training curves.
Pure plotly builders over `ttt_core.experiments.schedules` results."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ttt_core.figures.style import OKABE_ITO, base_layout

KIND_COLORS = {"fixed": OKABE_ITO[0], "random": OKABE_ITO[7], "evidence": OKABE_ITO[2], "skip": OKABE_ITO[1],
               "controller": OKABE_ITO[3], "oracle": "#999999"}
KIND_SYMBOLS = {"fixed": "circle", "random": "x", "evidence": "diamond", "skip": "square", "controller": "star",
                "oracle": "circle-open"}


def latency_figure(rows: Sequence[dict[str, Any]], front: Sequence[int], x: str = "seconds",
                   title: str | None = None) -> go.Figure:
    """One marker per schedule at (mean latency, mean error ± SE); the Pareto front (indices into
    `rows`, sorted by latency) as a line. x: "seconds" (measured adaptation + decision seconds)
    or "steps"."""
    col = "mean seconds" if x == "seconds" else "mean steps"
    fig = go.Figure()
    for r in rows:
        fig.add_trace(go.Scatter(
            x=[r[col]], y=[r["mean error"]], mode="markers", name=r["schedule"],
            error_y=dict(type="data", array=[r["SE"] if np.isfinite(r["SE"]) else 0.0], visible=True, thickness=1),
            marker=dict(size=13 if r["kind"] == "controller" else 10, color=KIND_COLORS.get(r["kind"], OKABE_ITO[4]),
                        symbol=KIND_SYMBOLS.get(r["kind"], "circle")),
            hovertemplate=f"{r['schedule']}<br>{col}: %{{x:.3g}}<br>mean error: %{{y:.4f}}<extra></extra>"))
    fx = [rows[i][col] for i in front]
    fy = [rows[i]["mean error"] for i in front]
    fig.add_trace(go.Scatter(x=fx, y=fy, mode="lines", name="Pareto front", line=dict(color="#555", dash="dot"),
                             hoverinfo="skip"))
    x_title = "mean seconds per task (measured: adaptation + decision overhead)" if x == "seconds" \
        else "mean steps per task"
    return base_layout(fig, title or f"Error against latency ({x})", x_title, "mean query error (measured)")


def trap_figure(regular: Sequence[dict[str, Any]], trap: Sequence[dict[str, Any]]) -> go.Figure:
    """Mean error ± SE per schedule on ordinary tasks and on trap tasks (grouped bars)."""
    fig = go.Figure()
    for rows, name, color in ((regular, "ordinary tasks", OKABE_ITO[0]), (trap, "trap tasks", OKABE_ITO[3])):
        fig.add_trace(go.Bar(x=[r["schedule"] for r in rows], y=[r["mean error"] for r in rows], name=name,
                             marker_color=color,
                             error_y=dict(type="data", array=[r["SE"] if np.isfinite(r["SE"]) else 0.0 for r in rows])))
    fig.update_layout(barmode="group")
    return base_layout(fig, "Where adapting hurts: error on trap tasks", "schedule", "mean query error (measured)")


def choices_figure(counts: dict[str, dict[str, dict[int, int]]], family_labels: dict[str, str] | None = None) -> go.Figure:
    """Chosen T per task family: one panel per schedule, stacked bars (x = T, colour = family)."""
    names = list(counts)
    fig = make_subplots(rows=1, cols=max(1, len(names)), subplot_titles=names, shared_yaxes=True)
    fams = list(dict.fromkeys(f for per in counts.values() for f in per))
    Ts = sorted({int(t) for per in counts.values() for c in per.values() for t in c})
    for j, name in enumerate(names, 1):
        for k, fam in enumerate(fams):
            c = counts[name].get(fam, {})
            fig.add_trace(go.Bar(x=[str(t) for t in Ts], y=[c.get(t, 0) for t in Ts],
                                 name=(family_labels or {}).get(fam, fam), legendgroup=fam, showlegend=(j == 1),
                                 marker_color=OKABE_ITO[k % len(OKABE_ITO)]), row=1, col=j)
        fig.update_xaxes(title_text="chosen T (0 = skip)", type="category", row=1, col=j)
    fig.update_layout(barmode="stack")
    fig.update_yaxes(title_text="tasks", row=1, col=1)
    return base_layout(fig, "Chosen number of steps per task family")


def trajectory_figure(traj: dict[str, dict[str, np.ndarray]], family_labels: dict[str, str] | None = None) -> go.Figure:
    """Measured mean error ± SE against the step T for every family (the engine trajectories)."""
    fig = go.Figure()
    for k, (fam, d) in enumerate(traj.items()):
        T = np.arange(len(d["mean"]))
        se = np.where(np.isfinite(d["se"]), d["se"], 0.0)
        fig.add_trace(go.Scatter(x=T, y=d["mean"], mode="lines+markers", name=(family_labels or {}).get(fam, fam),
                                 line=dict(color=OKABE_ITO[k % len(OKABE_ITO)]),
                                 error_y=dict(type="data", array=se, visible=True, thickness=1)))
    return base_layout(fig, "Measured error trajectories (one engine run per task)", "step T",
                       "mean query error")


def training_figure(history: dict[str, list[float]]) -> go.Figure:
    """Controller training: expected regret on train and validation by epoch."""
    fig = go.Figure()
    for key, name, color in (("train", "train (expected regret)", OKABE_ITO[0]),
                             ("val", "validation (expected regret)", OKABE_ITO[3]),
                             ("val_hard", "validation (regret of argmax)", OKABE_ITO[1])):
        if history.get(key):
            fig.add_trace(go.Scatter(x=np.arange(len(history[key])), y=np.asarray(history[key], dtype=float),
                                     mode="lines", name=name, line=dict(color=color)))
    return base_layout(fig, "Controller training (early stopping on validation)", "epoch", "regret (cost units)")
