"""Pure figure builders for the Steps & bounds view (ttt_core.steps.StepsReport → plotly figures).

Trace names are stable (tests and the page look traces up by name):

* `error_figure`: "measured error", "linearised error" (or "measured prediction" /
  "linearised prediction" when the query's answer is unknown), "ICL (T = 0)", and for long
  contexts "measured qTTT answer NLL" on a second y axis; vertical markers at T_MAP.
* `prompt_fit_figure`: "measured prompt MSE", "linearised prompt MSE".
* `evidence_figure`: "ℓ_T fixed σ̂", "ℓ_T profiled σ", PLUG_IN_LABEL (ℓ_T + slack),
  "plug-in population risk 𝓛̂(T|K)".
* `gibbs_figure`: one bar trace "Gibbs posterior ν_β(T)".
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from ttt_core.figures.style import OKABE_ITO, base_layout
from ttt_core.steps import PLUG_IN_LABEL, StepsReport

BLUE, ORANGE, GREEN, VERMILLION, PURPLE, SKY, YELLOW, BLACK = OKABE_ITO


def _vline(fig: go.Figure, x: float, text: str, color: str, dash: str = "dash", pos: str = "top left") -> None:
    fig.add_vline(x=float(x), line=dict(color=color, dash=dash, width=1.5), annotation_text=text,
                  annotation_position=pos, annotation_font_color=color)


def error_figure(rep: StepsReport) -> go.Figure:
    """Query error against T: measured (engine) and linearised (kernel), the ICL line, T_MAP."""
    T = rep.T_grid
    tc, m = rep.theory, rep.measured
    fig = go.Figure()
    use_error = tc.linear_error is not None or (m is not None and m.error is not None)
    if use_error:
        if m is not None and m.error is not None:
            fig.add_trace(go.Scatter(x=T, y=m.error, name="measured error", mode="lines+markers",
                                     line=dict(color=BLUE, width=2.5)))
        if tc.linear_error is not None:
            fig.add_trace(go.Scatter(x=T, y=tc.linear_error, name="linearised error", mode="lines",
                                     line=dict(color=ORANGE, dash="dash", width=2)))
        icl = rep.icl_error
        if icl is not None:
            fig.add_trace(go.Scatter(x=[T[0], T[-1]], y=[icl, icl], name="ICL (T = 0)", mode="lines",
                                     line=dict(color=BLACK, dash="dot", width=1.5)))
        y_title = "query squared error (f_T(x) − y)²"
    else:
        if m is not None and m.prediction is not None:
            fig.add_trace(go.Scatter(x=T, y=m.prediction, name="measured prediction", mode="lines+markers",
                                     line=dict(color=BLUE, width=2.5)))
        if tc.linear_prediction is not None:
            fig.add_trace(go.Scatter(x=T, y=tc.linear_prediction, name="linearised prediction", mode="lines",
                                     line=dict(color=ORANGE, dash="dash", width=2)))
        if rep.f0 is not None:
            fig.add_trace(go.Scatter(x=[T[0], T[-1]], y=[rep.f0, rep.f0], name="ICL (T = 0)", mode="lines",
                                     line=dict(color=BLACK, dash="dot", width=1.5)))
        y_title = "query prediction f_T(x)" if rep.has_query else "(no query output)"
    if m is not None and m.nll is not None:
        fig.add_trace(go.Scatter(x=T, y=m.nll, name="measured qTTT answer NLL", mode="lines+markers", yaxis="y2",
                                 line=dict(color=GREEN, width=2)))
        fig.update_layout(yaxis2=dict(title="answer NLL (nats)", overlaying="y", side="right", showgrid=False))
    _vline(fig, tc.t_map_fixed, f"T_MAP fixed σ̂ = {tc.t_map_fixed}", VERMILLION)
    if tc.t_map_profiled != tc.t_map_fixed:
        _vline(fig, tc.t_map_profiled, f"T_MAP profiled σ = {tc.t_map_profiled}", PURPLE, "dot", "bottom right")
    best = rep.verdict.get("measured_best_T")
    if best is not None and best != tc.t_map_fixed:
        _vline(fig, best, f"measured best T = {best}", GREEN, "dashdot", "bottom left")
    return base_layout(fig, "Query error against steps: measured TTT vs the kernel's prediction", "steps T", y_title)


def prompt_fit_figure(rep: StepsReport) -> go.Figure:
    """Mean squared prompt residual against T: measured (engine) and ‖(I − ρK)^T r‖²/n."""
    T = rep.T_grid
    fig = go.Figure()
    m = rep.measured
    if m is not None and m.prompt_mse is not None:
        fig.add_trace(go.Scatter(x=T, y=m.prompt_mse, name="measured prompt MSE", mode="lines+markers",
                                 line=dict(color=BLUE, width=2.5)))
    fig.add_trace(go.Scatter(x=T, y=rep.theory.linear_prompt_mse, name="linearised prompt MSE", mode="lines",
                             line=dict(color=ORANGE, dash="dash", width=2)))
    return base_layout(fig, "Prompt fit: mean squared residual after T steps", "steps T", "‖r_T‖² / n")


def evidence_figure(rep: StepsReport) -> go.Figure:
    """ℓ_T (fixed σ̂ and profiled σ), the plug-in PAC-Bayes bound ℓ_T + slack, the plug-in
    population risk, and the T_MAP markers."""
    T = rep.T_grid
    tc, b = rep.theory, rep.bounds
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=T, y=tc.ell_fixed, name="ℓ_T fixed σ̂", mode="lines+markers",
                             line=dict(color=BLUE, width=2.5)))
    fig.add_trace(go.Scatter(x=T, y=tc.ell_profiled, name="ℓ_T profiled σ", mode="lines",
                             line=dict(color=PURPLE, width=2)))
    fig.add_trace(go.Scatter(x=T, y=b.bound, name=PLUG_IN_LABEL, mode="lines",
                             line=dict(color=VERMILLION, dash="dash", width=2)))
    fig.add_trace(go.Scatter(x=T, y=b.population_risk, name="plug-in population risk 𝓛̂(T|K)", mode="lines",
                             line=dict(color=GREEN, dash="dot", width=2)))
    _vline(fig, tc.t_map_fixed, f"T_MAP = {tc.t_map_fixed}", VERMILLION)
    if tc.t_map_profiled != tc.t_map_fixed:
        _vline(fig, tc.t_map_profiled, f"T_MAP profiled = {tc.t_map_profiled}", PURPLE, "dot", "bottom right")
    title = f"Evidence and the {PLUG_IN_LABEL}: δ = {b.delta:g}, slack = {b.slack:.3g}"
    return base_layout(fig, title, "steps T", "normalised negative log-evidence ℓ_T")


def gibbs_figure(rep: StepsReport) -> go.Figure:
    """The Gibbs posterior ν_β(T) ∝ exp(−β n ℓ_T) over the grid (uniform prior)."""
    b = rep.bounds
    fig = go.Figure(go.Bar(x=rep.T_grid, y=b.gibbs, name="Gibbs posterior ν_β(T)", marker_color=BLUE))
    title = f"Gibbs posterior over T (β = {b.beta:g}, mean T = {b.gibbs_mean_T:.2f}, KL to uniform = {b.gibbs_kl:.2f})"
    return base_layout(fig, title, "steps T", "ν_β(T)")


def all_figures(rep: StepsReport) -> dict[str, go.Figure]:
    """name → figure for every Steps & bounds figure."""
    return {"error": error_figure(rep), "prompt_fit": prompt_fit_figure(rep), "evidence": evidence_figure(rep),
            "gibbs": gibbs_figure(rep)}


def reproduction_figure(summary: dict) -> go.Figure:
    """Reproduction Exp1: mean measured query MSE over tasks against the fixed step count T, one
    line per update subspace (trace "mean query MSE, <subspace> heads"), with each subspace's
    evidence-selected MSE as a marker at its mean selected T (trace "evidence profiled-σ, …")."""
    fig = go.Figure()
    for i, (kind, block) in enumerate((summary.get("exp1") or {}).items()):
        color = OKABE_ITO[i % len(OKABE_ITO)]
        y = np.asarray(block["mean_error_by_T"], dtype=float)
        fig.add_trace(go.Scatter(x=np.arange(y.size), y=y, name=f"mean query MSE, {block['subspace']} heads",
                                 mode="lines+markers", line=dict(color=color, width=2)))
        rows = {r["method"]: r for r in block["rows"]}
        ev = rows["evidence_profiled"]
        fig.add_trace(go.Scatter(x=[ev["mean_T"]], y=[ev["mse"]], name=f"evidence profiled-σ, {block['subspace']} heads",
                                 mode="markers", marker=dict(color=color, symbol="star", size=14)))
    return base_layout(fig, "Reproduction Exp1: mean query MSE against a fixed number of steps", "steps T",
                       "mean query MSE over tasks")
