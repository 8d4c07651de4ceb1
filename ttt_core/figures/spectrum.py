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
    """Per-mode SNR τ²λ_i/σ² = λ_i/λ⋆ at the posterior median (log y, trace 0) with its 90 % credible
    band (traces 1–2: upper, lower) and the SNR = 1 line."""
    x = _modes(rep)
    fig = go.Figure(go.Scatter(x=x, y=_positive(rep.snr), mode="lines+markers", name="SNR (posterior median)",
                               line=dict(color=OKABE_ITO[0])))
    fig.add_trace(go.Scatter(x=x, y=_positive(rep.snr_hi), mode="lines", line=dict(width=0), showlegend=False,
                             name="SNR 95 %", hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=x, y=_positive(rep.snr_lo), mode="lines", line=dict(width=0), fill="tonexty",
                             fillcolor="rgba(0,114,178,0.18)", name="90 % credible band"))
    fig.add_hline(y=1.0, line=dict(color=OKABE_ITO[3], dash="dash"), annotation_text="SNR = 1")
    base_layout(fig, "Signal-to-noise ratio per mode (posterior over λ⋆)", "mode i", "τ²λᵢ / σ²")
    fig.update_yaxes(type="log")
    return fig


def posterior_figure(rep) -> go.Figure:
    """The posterior over log₁₀ λ⋆ (trace 0: mass per grid point, normalised to a density in decades)
    against its prior (trace 1), with the median, the 90 % interval and the maximum-likelihood
    point fit (DESIGN §5.1). x is λ⋆ on a log axis."""
    post = rep.posterior
    h = float(post.log10_grid[1] - post.log10_grid[0]) if post.log10_grid.size > 1 else 1.0
    prior = np.exp(post.log_prior - post.log_prior.max())
    prior = prior / (prior.sum() * h)
    fig = go.Figure(go.Scatter(x=post.lambda_star_grid, y=post.weights / h, mode="lines", name="posterior",
                               line=dict(color=OKABE_ITO[0]), fill="tozeroy", fillcolor="rgba(0,114,178,0.15)"))
    fig.add_trace(go.Scatter(x=post.lambda_star_grid, y=prior, mode="lines", name="prior",
                             line=dict(color=OKABE_ITO[7], dash="dot")))
    fig.add_vline(x=rep.lam_star, line=dict(color=OKABE_ITO[3]), annotation_text="median")
    for v in rep.lam_star_ci:
        fig.add_vline(x=v, line=dict(color=OKABE_ITO[3], dash="dash"))
    if np.isfinite(rep.ml_lam_star) and rep.ml_lam_star > 0:
        fig.add_vline(x=rep.ml_lam_star, line=dict(color=OKABE_ITO[5], dash="dot"),
                      annotation_text="maximum likelihood", annotation_position="bottom right")
    base_layout(fig, "What this prompt says about the noise-to-signal ratio λ⋆", "λ⋆ = σ²/τ²",
                "density per decade")
    fig.update_xaxes(type="log")
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
    base_layout(fig, "Where the query Bayes gap comes from (at the posterior median of λ⋆)", "mode i", "contribution")
    return fig


def gap_vs_T_figure(rep) -> go.Figure:
    """The expected TTT gap over the step grid (trace 0, posterior mean) with the ICL gap as a line,
    and P(TTT beats ICL at T) on a secondary axis (trace 1) with the 0.9 / 0.1 decision lines."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=rep.T_grid, y=rep.gap_grid, mode="lines+markers", name="TTT gap (posterior mean)",
                             line=dict(color=OKABE_ITO[0])), secondary_y=False)
    fig.add_trace(go.Scatter(x=rep.T_grid, y=rep.prob_grid, mode="lines", name="P(TTT beats ICL)",
                             line=dict(color=OKABE_ITO[2])), secondary_y=True)
    fig.add_hline(y=rep.gap_icl, line=dict(color=OKABE_ITO[1], dash="dash"), annotation_text="ICL")
    for p in (0.9, 0.1):
        fig.add_hline(y=p, line=dict(color=OKABE_ITO[2], dash="dot", width=1), secondary_y=True)
    fig.add_vline(x=rep.T, line=dict(color=OKABE_ITO[2], dash="dot"), annotation_text=f"T = {rep.T:g}")
    base_layout(fig, f"{rep.criterion.capitalize()} and P(TTT beats ICL) versus steps", "steps T", "expected gap")
    fig.update_yaxes(title_text="P(TTT beats ICL)", range=[0, 1.02], secondary_y=True)
    return fig
