"""Figures of the Spectrum & SNR view (DESIGN §2–§4). Pure functions: SpectrumReport → plotly Figure.

Every figure plots against the mode index i = 1…n (eigenvalues descending) unless stated.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ttt_core.figures.style import OKABE_ITO, base_layout

_POS_FLOOR = 1e-300


def _modes(rep) -> np.ndarray:
    return np.arange(1, rep.n + 1)


def _positive(x: np.ndarray) -> np.ndarray:
    """Values for a log axis: non-positive entries become NaN (not drawn)."""
    x = np.asarray(x, dtype=float)
    return np.where(x > _POS_FLOOR, x, np.nan)


def scree_figure(rep) -> go.Figure:
    """Eigenvalues λ_i (log y, trace 0) with cumulative energy Σ_{j≤i}λ_j/Σλ on a secondary axis
    (trace 1), the effective rank exp(H) as a vertical line and λ⋆ = σ²/τ² as a horizontal line."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    x = _modes(rep)
    fig.add_trace(go.Scatter(x=x, y=_positive(rep.lam), mode="lines+markers", name="eigenvalue λᵢ",
                             line=dict(color=OKABE_ITO[0])), secondary_y=False)
    fig.add_trace(go.Scatter(x=x, y=rep.cum_energy, mode="lines", name="cumulative energy",
                             line=dict(color=OKABE_ITO[1], dash="dot")), secondary_y=True)
    if rep.eff_rank_entropy > 0:
        fig.add_vline(x=rep.eff_rank_entropy, line=dict(color=OKABE_ITO[2], dash="dash"),
                      annotation_text=f"effective rank {rep.eff_rank_entropy:.1f}", annotation_position="top right")
    if np.isfinite(rep.lam_star) and rep.lam_star > 0:
        fig.add_hline(y=rep.lam_star, line=dict(color=OKABE_ITO[3], dash="dash"),
                      annotation_text="λ⋆ = σ²/τ² (SNR 1)", annotation_position="bottom left")
    base_layout(fig, f"Eigen-spectrum of the {rep.label}", "mode i (descending λ)", "eigenvalue λᵢ")
    fig.update_yaxes(type="log", secondary_y=False)
    fig.update_yaxes(title_text="cumulative energy", range=[0, 1.02], secondary_y=True)
    return fig


def snr_figure(rep) -> go.Figure:
    """Per-mode SNR τ²λ_i/σ² (log y) with the SNR = 1 line."""
    fig = go.Figure(go.Scatter(x=_modes(rep), y=_positive(rep.snr), mode="lines+markers", name="SNR τ²λᵢ/σ²",
                               line=dict(color=OKABE_ITO[0])))
    fig.add_hline(y=1.0, line=dict(color=OKABE_ITO[3], dash="dash"), annotation_text="SNR = 1")
    base_layout(fig, "Signal-to-noise ratio per mode", "mode i", "τ²λᵢ / σ²")
    fig.update_yaxes(type="log")
    return fig


def alignment_figure(rep) -> go.Figure:
    """Query alignment (u_iᵀk_x)² per mode (bars); an empty annotated figure without k_x."""
    fig = go.Figure()
    if rep.alignment is None:
        fig.add_annotation(text="No query coupling k_x for this prompt", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")
    else:
        fig.add_trace(go.Bar(x=_modes(rep), y=rep.alignment, name="(uᵢᵀkₓ)²", marker_color=OKABE_ITO[0]))
    base_layout(fig, "Query alignment per mode", "mode i", "(uᵢᵀ kₓ)²")
    return fig


def filter_figure(rep) -> go.Figure:
    """Filter match at the actual eigenvalues: g_T(λ_i) (trace 0) and g⋆(λ_i) (trace 1), log x."""
    lam = _positive(rep.lam)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=lam, y=rep.g_T, mode="markers+lines", name=f"TTT g_T, T={rep.T:g}, c={rep.c:g}",
                             line=dict(color=OKABE_ITO[0])))
    fig.add_trace(go.Scatter(x=lam, y=rep.g_star, mode="markers+lines", name="Bayes g⋆ = λ/(λ+λ⋆)",
                             line=dict(color=OKABE_ITO[1], dash="dash")))
    base_layout(fig, "Filter match: TTT versus Bayes on each mode", "eigenvalue λᵢ", "shrinkage g(λᵢ)")
    fig.update_xaxes(type="log")
    fig.update_yaxes(range=[-0.02, 1.02])
    return fig


def gap_figure(rep) -> go.Figure:
    """Per-mode query-gap contributions a_i(q_T − q⋆)² (TTT, trace 0) against a_i q⋆² (ICL, trace 1)."""
    fig = go.Figure()
    if rep.gap_contrib is None:
        fig.add_annotation(text="No query: the verdict uses the prompt-value risk instead", showarrow=False,
                           x=0.5, y=0.5, xref="paper", yref="paper")
    else:
        x = _modes(rep)
        fig.add_trace(go.Bar(x=x, y=rep.gap_contrib, name=f"TTT at T={rep.T:g}: aᵢ(q_T − q⋆)²", marker_color=OKABE_ITO[0]))
        fig.add_trace(go.Bar(x=x, y=rep.icl_contrib, name="ICL: aᵢ q⋆²", marker_color=OKABE_ITO[1]))
        fig.update_layout(barmode="group")
    base_layout(fig, "Where the query Bayes gap comes from (plug-in)", "mode i", "contribution")
    return fig


def gap_vs_T_figure(rep) -> go.Figure:
    """The TTT gap over the step grid (trace 0) with the ICL gap (T = 0) as a line."""
    fig = go.Figure(go.Scatter(x=rep.T_grid, y=rep.gap_grid, mode="lines+markers", name="TTT gap",
                               line=dict(color=OKABE_ITO[0])))
    fig.add_hline(y=rep.gap_icl, line=dict(color=OKABE_ITO[1], dash="dash"), annotation_text="ICL")
    fig.add_vline(x=rep.T, line=dict(color=OKABE_ITO[2], dash="dot"), annotation_text=f"T = {rep.T:g}")
    base_layout(fig, f"{rep.criterion.capitalize()} versus steps (plug-in)", "steps T", "gap")
    return fig
