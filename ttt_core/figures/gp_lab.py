"""Figure builders for the GP lab (DESIGN.md §3-§5): numbers in, ``plotly.graph_objects.Figure`` out.

Pure functions: no Streamlit, no simulation.  Colours follow ``ttt_core.figures.style``
(Okabe-Ito lines, Cividis for magnitudes, RdBu for signed quantities centred at zero).
Every figure stores a ``meta={"figure": <name>}`` tag so tests can find it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from numpy.typing import ArrayLike

from ttt_core.figures.style import DIVERGING_SCALE, OKABE_ITO, SEQUENTIAL_SCALE, base_layout

BLUE, ORANGE, GREEN, VERMILLION, PURPLE, SKY, YELLOW, BLACK = OKABE_ITO


def _arr(x: ArrayLike) -> np.ndarray:
    return np.asarray(x, dtype=float)


def _legend_below(fig: go.Figure) -> go.Figure:
    """Move the legend under the plot (figures with many entries would cover the title)."""
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0.0),
                      margin=dict(b=110))
    return fig


def spectrum_figure(lam: ArrayLike, k_tilde: ArrayLike, lam_star: float) -> go.Figure:
    """Eigenvalues λ_i of K (log scale) with the noise-to-signal line λ⋆ and query alignment.

    Args:
        lam: eigenvalues, descending, shape (n,).  k_tilde: Uᵀk_x, shape (n,).
        lam_star: σ²/τ²; modes above the line have per-mode SNR τ²λ/σ² > 1 (DESIGN §3).
    Traces: [0] eigenvalues, [1] alignment k̃_i²/‖k̃‖² (right axis).
    """
    lam, kt = _arr(lam), _arr(k_tilde)
    idx = np.arange(1, lam.size + 1, dtype=float)
    shown = np.where(lam > 0, lam, np.nan)
    align = kt**2 / max(float(np.sum(kt**2)), np.finfo(float).tiny)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=idx, y=shown, mode="markers+lines", name="eigenvalue λᵢ",
                             marker=dict(color=BLUE, size=6), line=dict(color=BLUE, width=1)))
    fig.add_trace(go.Bar(x=idx, y=align, name="query alignment k̃ᵢ²/‖k̃‖²", marker_color=ORANGE,
                         opacity=0.6, yaxis="y2"))
    fig.add_hline(y=lam_star, line=dict(color=BLACK, dash="dash"),
                  annotation_text=f"λ⋆ = σ²/τ² = {lam_star:.3g}", annotation_position="top right")
    base_layout(fig, "Spectrum of K and query alignment", "mode index i", "λᵢ (log scale)")
    _legend_below(fig)
    fig.update_layout(yaxis_type="log", yaxis_exponentformat="power", meta={"figure": "spectrum"},
                      yaxis2=dict(title="alignment", overlaying="y", side="right", range=[0, 1],
                                  showgrid=False))
    return fig


def filter_figure(
    lam_grid: ArrayLike,
    T_values: Sequence[float],
    g_rows: ArrayLike,
    g_star_rows: ArrayLike,
    star_labels: Sequence[str],
    eigenvalues: ArrayLike | None = None,
) -> go.Figure:
    """GD filters g_T(λ) = 1 − (1 − ρλ)^T against Bayes filters g⋆(λ) = λ/(λ + λ⋆) (DESIGN §3).

    Args:
        lam_grid: λ values, shape (L,).  T_values: the T of each row of ``g_rows`` (len R).
        g_rows: shape (R, L).  g_star_rows: Bayes filters, shape (S, L), labelled by star_labels.
        eigenvalues: optional actual eigenvalues, drawn as a rug at y = 0.
    Traces: R GD curves, then S Bayes curves, then the optional rug.
    """
    x = _arr(lam_grid)
    G = np.atleast_2d(_arr(g_rows))
    S = np.atleast_2d(_arr(g_star_rows))
    fig = go.Figure()
    n_rows = len(T_values)
    for j, (T, row) in enumerate(zip(T_values, G, strict=True)):
        shade = 0.35 + 0.65 * (j + 1) / max(n_rows, 1)
        fig.add_trace(go.Scatter(x=x, y=row, mode="lines", name=f"g_T, T = {T:g}",
                                 line=dict(color=BLUE, width=1 + 2 * shade), opacity=shade))
    for j, (lab, row) in enumerate(zip(star_labels, S, strict=True)):
        fig.add_trace(go.Scatter(x=x, y=row, mode="lines", name=lab,
                                 line=dict(color=[VERMILLION, GREEN, PURPLE][j % 3], dash="dash", width=3)))
    if eigenvalues is not None:
        ev = _arr(eigenvalues)
        fig.add_trace(go.Scatter(x=ev, y=np.zeros_like(ev), mode="markers", name="eigenvalues of K",
                                 marker=dict(symbol="line-ns-open", size=10, color=BLACK)))
    base_layout(fig, "What T steps do to each eigen-direction", "eigenvalue λ", "filter value")
    _legend_below(fig)
    fig.update_layout(meta={"figure": "filters"}, yaxis_range=[-0.05, 1.05])
    return fig


def risk_vs_T_figure(
    T_grid: ArrayLike,
    closed: ArrayLike,
    mc_mean: ArrayLike,
    mc_se: ArrayLike,
    title: str,
    y_title: str,
    name: str,
) -> go.Figure:
    """Closed-form risk curve against Monte-Carlo means ± 1 SE over T (DESIGN §4).

    Traces: [0] closed form (line), [1] Monte Carlo (markers, error_y = SE).  T = 0 is ICL.
    """
    T = _arr(T_grid)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=T, y=_arr(closed), mode="lines", name="closed form",
                             line=dict(color=BLUE, width=3)))
    fig.add_trace(go.Scatter(x=T, y=_arr(mc_mean), mode="markers", name="Monte Carlo ± SE",
                             marker=dict(color=ORANGE, size=7, symbol="circle-open"),
                             error_y=dict(type="data", array=_arr(mc_se), visible=True, color=ORANGE)))
    base_layout(fig, title, "steps T (T = 0 is ICL)", y_title)
    fig.update_layout(meta={"figure": name})
    return fig


def evidence_figure(
    T_grid: ArrayLike, ell_fixed: ArrayLike, ell_profiled: ArrayLike
) -> go.Figure:
    """Evidence curves ℓ_T − min ℓ for one draw: fixed σ̂² and σ² profiled (DESIGN §5).

    Args:
        ell_fixed: ℓ_T with σ̂² = ‖r‖²/n, shape (G,).
        ell_profiled: min_σ² ℓ_T = (L_MLE + 1)/2, shape (G,).
    Traces: [0] fixed curve, [1] profiled curve, [2] fixed T_MAP marker, [3] profiled T_MAP marker.
    """
    T = _arr(T_grid)
    a = _arr(ell_fixed) - np.min(ell_fixed)
    b = _arr(ell_profiled) - np.min(ell_profiled)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=T, y=a, mode="lines+markers", name="fixed σ̂² = ‖r‖²/n",
                             line=dict(color=BLUE), marker=dict(size=5)))
    fig.add_trace(go.Scatter(x=T, y=b, mode="lines+markers", name="σ² profiled (MLE)",
                             line=dict(color=GREEN, dash="dot"), marker=dict(size=5)))
    ia, ib = int(np.argmin(a)), int(np.argmin(b))
    fig.add_trace(go.Scatter(x=[T[ia]], y=[0.0], mode="markers", name=f"T_MAP fixed = {T[ia]:g}",
                             marker=dict(color=BLUE, size=16, symbol="star")))
    fig.add_trace(go.Scatter(x=[T[ib]], y=[0.0], mode="markers", name=f"T_MAP profiled = {T[ib]:g}",
                             marker=dict(color=GREEN, size=14, symbol="diamond-open", line=dict(width=2))))
    base_layout(fig, "Prompt evidence of one draw", "steps T", "ℓ_T − min ℓ")
    _legend_below(fig)
    fig.update_layout(meta={"figure": "evidence"})
    return fig


def tmap_histogram_figure(
    T_grid: ArrayLike,
    T_map_fixed: ArrayLike,
    T_map_mle: ArrayLike,
    oracle_T_prompt: float,
    oracle_T_evidence: float,
) -> go.Figure:
    """Histogram of T_MAP over draws (fixed and profiled σ²) against oracle T's (DESIGN §5).

    Traces: [0] fixed counts, [1] profiled counts (x = T_grid); vertical lines mark the T minimising
    the closed-form prompt excess risk and the T minimising the population evidence 𝓛(T|K).
    """
    T = _arr(T_grid)
    def counts(v: ArrayLike) -> np.ndarray:
        v = _arr(v)
        return np.array([np.sum(v == t) for t in T], dtype=float)
    fig = go.Figure()
    fig.add_trace(go.Bar(x=T, y=counts(T_map_fixed), name="fixed σ̂²", marker_color=BLUE, opacity=0.75))
    fig.add_trace(go.Bar(x=T, y=counts(T_map_mle), name="σ² profiled", marker_color=GREEN, opacity=0.75))
    fig.add_vline(x=oracle_T_prompt, line=dict(color=VERMILLION, width=3),
                  annotation_text=f"oracle T (prompt risk) = {oracle_T_prompt:g}", annotation_position="top left")
    fig.add_vline(x=oracle_T_evidence, line=dict(color=BLACK, dash="dash"),
                  annotation_text=f"argmin 𝓛(T|K) = {oracle_T_evidence:g}", annotation_position="bottom right")
    base_layout(fig, "Where the evidence lands over draws", "selected T_MAP", "draws")
    _legend_below(fig)
    fig.update_layout(barmode="overlay", meta={"figure": "tmap_hist"})
    return fig


def pac_bayes_figure(
    bound: ArrayLike, realised: ArrayLike, delta: float, coverage: float, ell: ArrayLike | None = None
) -> go.Figure:
    """Realised 𝓛(T_MAP|K) against the certificate ℓ_{T_MAP}(r) + slack, one point per draw
    (DESIGN §5, Thm. 7.2).  Points on or below the diagonal are covered.  Optionally the same draws
    against ℓ_{T_MAP}(r) alone (no slack), which shows what the slack pays for.

    Traces: [0] covered draws, [1] violations, [2] no-slack points (if ``ell``), last: y = x.
    """
    x, y = _arr(bound), _arr(realised)
    ok = y <= x
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x[ok], y=y[ok], mode="markers", name="with slack: covered",
                             marker=dict(color=BLUE, size=5, opacity=0.5)))
    fig.add_trace(go.Scatter(x=x[~ok], y=y[~ok], mode="markers", name="with slack: violated",
                             marker=dict(color=VERMILLION, size=8, symbol="x")))
    xs = [x]
    if ell is not None:
        e = _arr(ell)
        xs.append(e)
        fig.add_trace(go.Scatter(x=e, y=y, mode="markers", name="ℓ alone (no slack)",
                                 marker=dict(color="#999999", size=4, opacity=0.4)))
    allx = np.concatenate(xs)
    lo = float(min(allx.min(), y.min())) if allx.size else 0.0
    hi = float(max(allx.max(), y.max())) if allx.size else 1.0
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x",
                             line=dict(color=BLACK, dash="dash")))
    base_layout(fig, f"PAC-Bayes certificate: coverage {coverage:.3f} (target ≥ {1 - delta:.2f})",
                "ℓ<sub>T_MAP</sub>(r) + slack  (certificate)", "𝓛(T<sub>MAP</sub> | K)  (realised)")
    _legend_below(fig)
    fig.update_layout(meta={"figure": "pac_bayes"})
    return fig


def shift_figure(
    T_grid: ArrayLike,
    excess: ArrayLike,
    labels: Sequence[str],
    evidence_mc: ArrayLike,
    evidence_se: ArrayLike,
    T_map_mean: ArrayLike,
    T_minimax: float,
) -> go.Figure:
    """Two noise levels: closed-form prompt excess risk over T per level and its worst case,
    with the Monte-Carlo risk of evidence-selected T (plotted at the mean selected T) (DESIGN §4).

    Traces: [0], [1] per-level curves; [2] worst case max_j; [3], [4] evidence points ± SE.
    """
    T = _arr(T_grid)
    E = _arr(excess)
    colours = [BLUE, ORANGE]
    fig = go.Figure()
    for j in range(2):
        fig.add_trace(go.Scatter(x=T, y=E[j], mode="lines", name=f"fixed T, {labels[j]}",
                                 line=dict(color=colours[j], width=3)))
    fig.add_trace(go.Scatter(x=T, y=E.max(axis=0), mode="lines", name="worst of the two",
                             line=dict(color=BLACK, dash="dot")))
    for j in range(2):
        fig.add_trace(go.Scatter(
            x=[float(_arr(T_map_mean)[j])], y=[float(_arr(evidence_mc)[j])], mode="markers",
            name=f"evidence-selected T, {labels[j]}",
            marker=dict(color=colours[j], size=14, symbol="star", line=dict(color=BLACK, width=1)),
            error_y=dict(type="data", array=[float(_arr(evidence_se)[j])], visible=True)))
    fig.add_vline(x=T_minimax, line=dict(color=GREEN, dash="dash"),
                  annotation_text=f"best single T = {T_minimax:g}", annotation_position="top right")
    base_layout(fig, "Distribution shift: one T for two noise levels?", "steps T",
                "prompt excess risk Σ(τ²λ+σ²)(g_T − g⋆)²")
    _legend_below(fig)
    fig.update_layout(meta={"figure": "shift"}, yaxis_type="log")
    return fig


def gain_heatmap_figure(
    T_grid: ArrayLike, sigma2_grid: ArrayLike, rel_gain: ArrayLike, sigma2_mark: float | None = None
) -> go.Figure:
    """Signed relative query gain of TTT over ICL, 1 − gap(T)/gap(ICL), over (σ², T) (DESIGN §4).

    Positive (blue) = TTT beats ICL; negative (red) = TTT hurts.  Colour range clipped to [−1, 1]
    and centred at 0 (diverging scale).  Trace [0]: heatmap with z of shape (len σ², len T);
    ``sigma2_mark`` draws a line at the lab's current σ².
    """
    fig = go.Figure(go.Heatmap(
        x=_arr(T_grid), y=_arr(sigma2_grid), z=_arr(rel_gain), colorscale=DIVERGING_SCALE,
        zmid=0.0, zmin=-1.0, zmax=1.0, colorbar=dict(title="1 − gap_T/gap_ICL"),
    ))
    if sigma2_mark is not None:  # a trace, not add_hline: hline annotations misplace on log axes
        T = _arr(T_grid)
        fig.add_trace(go.Scatter(x=[T.min(), T.max()], y=[sigma2_mark, sigma2_mark], mode="lines",
                                 name=f"chosen σ² = {sigma2_mark:g}", line=dict(color=BLACK, dash="dash")))
        _legend_below(fig)
    base_layout(fig, "Does TTT beat ICL at the query? (blue = yes)", "steps T", "noise σ²")
    fig.update_layout(meta={"figure": "gain_heatmap"}, yaxis_type="log", yaxis_exponentformat="power",
                      showlegend=sigma2_mark is not None)
    return fig


def projector_figure(
    a_grid: ArrayLike, risk: ArrayLike, labels: Sequence[str], lower_bound: float, a_T: ArrayLike,
    T_grid: ArrayLike,
) -> go.Figure:
    """Prop. 6.1 on a rank-m projector: risk m(τ_j² + σ_j²)(a − s_j)² of a fixed shrinkage a for
    two levels, their maximum, the lower bound, and the factors a = g_T(1) reachable by fixed T
    (DESIGN §4).  Traces: [0], [1] per-level risk; [2] max; [3] fixed-T points on the max curve.
    """
    a = _arr(a_grid)
    R = _arr(risk)
    worst = R.max(axis=0)
    aT = _arr(a_T)
    worst_T = np.interp(aT, a, worst)
    fig = go.Figure()
    for j, c in enumerate([BLUE, ORANGE]):
        fig.add_trace(go.Scatter(x=a, y=R[j], mode="lines", name=labels[j], line=dict(color=c, width=3)))
    fig.add_trace(go.Scatter(x=a, y=worst, mode="lines", name="max over levels", line=dict(color=BLACK, dash="dot")))
    fig.add_trace(go.Scatter(x=aT, y=worst_T, mode="markers", name="fixed T (a = g_T(1))",
                             marker=dict(color=_arr(T_grid), colorscale=SEQUENTIAL_SCALE, size=7,
                                         colorbar=dict(title="T", thickness=12)),
                             text=[f"T = {t:g}" for t in _arr(T_grid)]))
    fig.add_hline(y=lower_bound, line=dict(color=VERMILLION, dash="dash"),
                  annotation_text=f"lower bound {lower_bound:.3g}", annotation_position="bottom right")
    base_layout(fig, "No fixed shrinkage is good for both levels (rank-m projector)",
                "shrinkage a in â = a·Kr", "E‖aKr − f_Bayes‖²")
    _legend_below(fig)
    fig.update_layout(meta={"figure": "projector"})
    return fig


def bayes_gap_figure(
    T_grid: ArrayLike, bound: ArrayLike, expected: ArrayLike, mc_mean: ArrayLike, mc_se: ArrayLike
) -> go.Figure:
    """Bayes gap from evidence over T (DESIGN §5, aligned GP benchmark): the bound
    4σ²·KL(N(0,Σ⋆) ‖ N(0,Σ_T)), the closed-form E‖f̂_T − f_Bayes‖² and its Monte-Carlo mean ± 2 SE.

    Args: arrays of shape (G,) over T_grid; mc_se is one standard error (the bars are 2·mc_se).
    Traces: [0] bound (dashed), [1] closed form (line), [2] Monte Carlo (markers, error_y = 2·SE).
    Log y axis: the gap falls by orders of magnitude while T grows.
    """
    T = _arr(T_grid)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=T, y=_arr(bound), mode="lines", name="bound 4σ²·KL(N(0,Σ⋆) ‖ N(0,Σ_T))",
                             line=dict(color=VERMILLION, dash="dash", width=3)))
    fig.add_trace(go.Scatter(x=T, y=_arr(expected), mode="lines", name="closed form E‖f̂_T − f_Bayes‖²",
                             line=dict(color=BLUE, width=3)))
    fig.add_trace(go.Scatter(x=T, y=_arr(mc_mean), mode="markers", name="Monte Carlo ± 2 SE",
                             marker=dict(color=ORANGE, size=7, symbol="circle-open"),
                             error_y=dict(type="data", array=2.0 * _arr(mc_se), visible=True, color=ORANGE)))
    base_layout(fig, "Bayes gap from evidence vs steps",
                "steps T", "E‖f̂_T − f_Bayes‖²  (log scale)")
    _legend_below(fig)
    fig.update_layout(meta={"figure": "bayes_gap"}, yaxis_type="log", yaxis_exponentformat="power")
    return fig
