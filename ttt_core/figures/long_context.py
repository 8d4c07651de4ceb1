"""Figures of the Long context page (DESIGN §8): needle attention mass against context length,
per-layer/head heat maps, the dilution bound against measured attention, the logarithmic margin
requirement against measured margins, answer probability, the qTTT query-gradient identity and the
FLOP calculator.
Pure plotly builders over `ttt_core.dilution` / `ttt_core.flops` results."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ttt_core.dilution import DilutionPoint, QueryGradientCheck, required_margin
from ttt_core.figures.style import OKABE_ITO, SEQUENTIAL_SCALE, base_layout
from ttt_core.flops import FlopModel, approx_thinking_tokens

BEFORE, AFTER = OKABE_ITO[0], OKABE_ITO[3]


def _label(p: DilutionPoint) -> str:
    return f"{p.n_tokens} tok, needle at {p.position:.0%}"


def mass_figure(points: Sequence[DilutionPoint]) -> go.Figure:
    """Needle attention mass from the answer position (mean over layers and heads) against the
    context length, before and after qTTT."""
    pts = sorted(points, key=lambda p: (p.n_tokens, p.position))
    fig = go.Figure()
    for attr, name, color in (("before", "before qTTT", BEFORE), ("after", "after qTTT", AFTER)):
        fig.add_trace(go.Scatter(x=[p.n_tokens for p in pts], y=[getattr(p, attr).mean_mass for p in pts],
                                 mode="markers+lines", name=name, line=dict(color=color),
                                 text=[_label(p) for p in pts], hovertemplate="%{text}<br>mass %{y:.4f}<extra></extra>"))
    fig.update_xaxes(type="log")
    return base_layout(fig, "Needle attention mass from the answer position", "context length T (tokens)",
                       "mean needle mass (layers × heads)")


def heatmap_figure(point: DilutionPoint) -> go.Figure:
    """Needle mass per layer (rows) and query head (columns), before and after, shared colour scale."""
    b, a = point.before.stats.needle_mass, point.after.stats.needle_mass
    zmax = float(max(np.nanmax(b), np.nanmax(a), 1e-12))
    fig = make_subplots(rows=1, cols=2, subplot_titles=("before qTTT", "after qTTT"), shared_yaxes=True)
    for j, z in enumerate((b, a), 1):
        fig.add_trace(go.Heatmap(z=z, x=[f"H{h}" for h in range(z.shape[1])], y=[f"L{l}" for l in range(z.shape[0])],
                                 zmin=0.0, zmax=zmax, colorscale=SEQUENTIAL_SCALE, showscale=(j == 2),
                                 colorbar=dict(title="mass"),
                                 hovertemplate="%{y} %{x}: %{z:.4f}<extra></extra>"), row=1, col=j)
    fig.update_yaxes(autorange="reversed")
    return base_layout(fig, f"Needle mass per layer and head — {_label(point)}")


def bound_figure(points: Sequence[DilutionPoint], tight: bool = False) -> go.Figure:
    """Measured attention on the best needle key α* against the Lemma 2.2 bound 1/(1 + m e^{−Δ})
    (or its tightest value over Δ) for every layer/head/point, before and after. Every marker must
    lie on or below the diagonal."""
    fig = go.Figure()
    for attr, name, color in (("before", "before qTTT", BEFORE), ("after", "after qTTT", AFTER)):
        xs, ys, txt = [], [], []
        for p in points:
            st = getattr(p, attr).stats
            bound = st.tight_bound if tight else st.bound
            xs.append(bound.ravel())
            ys.append(st.alpha_star.ravel())
            L, H = st.alpha_star.shape
            txt += [f"{_label(p)} L{l}.H{h} m={int(st.m[l, h])}" for l in range(L) for h in range(H)]
        fig.add_trace(go.Scatter(x=np.concatenate(xs) if xs else [], y=np.concatenate(ys) if ys else [],
                                 mode="markers", name=name, marker=dict(color=color, size=6, opacity=0.6),
                                 text=txt, hovertemplate="%{text}<br>bound %{x:.3g}<br>α* %{y:.3g}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[1e-6, 1.0], y=[1e-6, 1.0], mode="lines", name="α* = bound",
                             line=dict(color="#555", dash="dot")))
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    which = "tightest over Δ" if tight else f"Δ = {points[0].before.stats.delta:g}" if points else ""
    return base_layout(fig, f"Lemma 2.2: measured α* against 1/(1 + m e^(−Δ)) ({which})",
                       "dilution bound", "measured attention on the best needle key α*")


def margin_figure(points: Sequence[DilutionPoint], eps: float) -> go.Figure:
    """Lemma 2.3: the margin log((T − 1)(1 − ε)/ε) needed for α* ≥ 1 − ε against context length,
    with the measured retrieval margin γ (best head) and the worst-case gap of that head, before
    and after qTTT."""
    pts = sorted(points, key=lambda p: p.n_tokens)
    Tmax = max([p.n_tokens for p in pts] + [100])
    T = np.unique(np.geomspace(2, Tmax * 2, 60).round())
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=T, y=required_margin(T, eps), mode="lines", name=f"required gap (ε = {eps:g})",
                             line=dict(color="#555", dash="dash")))
    for attr, name, color in (("before", "before qTTT", BEFORE), ("after", "after qTTT", AFTER)):
        g = [float(np.nanmax(getattr(p, attr).stats.gamma)) for p in pts]
        gap = []
        for p in pts:
            st = getattr(p, attr).stats
            idx = np.unravel_index(int(np.nanargmax(st.gamma)), st.gamma.shape)
            gap.append(float(st.min_gap[idx]))
        fig.add_trace(go.Scatter(x=[p.n_tokens for p in pts], y=g, mode="markers+lines", name=f"max γ {name}",
                                 line=dict(color=color)))
        fig.add_trace(go.Scatter(x=[p.n_tokens for p in pts], y=gap, mode="markers", name=f"its min gap {name}",
                                 marker=dict(color=color, symbol="triangle-down", size=9)))
    fig.update_xaxes(type="log")
    return base_layout(fig, "Lemma 2.3: the margin must grow like log T", "context length T (tokens)",
                       "logit margin (nats)")


def answer_figure(points: Sequence[DilutionPoint]) -> go.Figure:
    """Teacher-forced probability of the expected answer before/after qTTT against length
    (marker symbol: greedy answer correct ● / wrong ✕)."""
    pts = sorted(points, key=lambda p: (p.n_tokens, p.position))
    fig = go.Figure()
    for attr, name, color in (("before", "before qTTT", BEFORE), ("after", "after qTTT", AFTER)):
        ms = [getattr(p, attr) for p in pts]
        fig.add_trace(go.Scatter(x=[p.n_tokens for p in pts], y=[m.answer_prob for m in ms], mode="markers", name=name,
                                 marker=dict(color=color, size=11,
                                             symbol=["circle" if m.correct else "x" for m in ms]),
                                 text=[f"{_label(p)}: {m.answer!r}" for p, m in zip(pts, ms)],
                                 hovertemplate="%{text}<br>p(answer) %{y:.3g}<extra></extra>"))
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return base_layout(fig, "Answer probability (● correct greedy answer, ✕ wrong)", "context length T (tokens)",
                       "p(expected answer)")


def flops_figure(fm: FlopModel, N: int, k: int, T_values: Sequence[float], T_mark: float | None = None) -> go.Figure:
    """FLOP-matched thinking budget against context length: the exact root of F_gen = N·G and
    the approximation 2Nk."""
    T = np.asarray(T_values, dtype=float)
    exact = np.array([fm.matched_thinking_tokens(N, k, t) for t in T])
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=T, y=exact, mode="lines", name="exact: F_gen(T_think; T) = N·G(k; T)",
                             line=dict(color=OKABE_ITO[0])))
    fig.add_trace(go.Scatter(x=T, y=np.full_like(T, approx_thinking_tokens(N, k)), mode="lines", name="2Nk",
                             line=dict(color=OKABE_ITO[1], dash="dash")))
    if T_mark is not None:
        fig.add_trace(go.Scatter(x=[T_mark], y=[fm.matched_thinking_tokens(N, k, T_mark)], mode="markers",
                                 name="your T", marker=dict(color=OKABE_ITO[3], size=11)))
    fig.update_xaxes(type="log")
    return base_layout(fig, f"Thinking tokens with the FLOPs of {N} qTTT steps of span {k}", "context length T (tokens)",
                       "T_think")


def query_gradient_figure(check: QueryGradientCheck) -> go.Figure:
    """The query gradient of −log α_needle per coordinate: the closed form s(μ − k_needle) (bars) and
    torch.autograd's (markers), DESIGN §8. Traces: [0] closed form, [1] autograd; x = coordinate of q."""
    idx = np.arange(check.d_k)
    fig = go.Figure()
    fig.add_trace(go.Bar(x=idx, y=check.closed, name="closed form (μ − k_needle)·s", marker_color=OKABE_ITO[0],
                         opacity=0.7))
    fig.add_trace(go.Scatter(x=idx, y=check.autograd, mode="markers", name="torch.autograd",
                             marker=dict(color=OKABE_ITO[3], symbol="diamond", size=7)))
    where = f"L{check.layer}.H{check.head}, " if check.layer is not None else "synthetic row, "
    return base_layout(fig, f"∂(−log α_needle)/∂q — {where}{check.n_keys} keys, d_k = {check.d_k}",
                       "coordinate of q", "gradient")
