"""Figures of the Heads & blocks view (DESIGN §6). Pure functions returning plotly Figures.

* `score_heatmap`: layer × head grid of one score (sequential scale; diverging, centred at 0,
  for signed values). customdata holds (layer, head) so a clicked cell identifies its block.
* `head_spectrum_figure`: one block's eigenvalues (log y).
* `attention_figure`: a head's attention probabilities on the prompt tokens.
* `share_figure`: each block's share tr(K^(b))/tr(K) within its layer, the selected one highlighted.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from ttt_core.figures.style import DIVERGING_SCALE, OKABE_ITO, SEQUENTIAL_SCALE, base_layout


def score_heatmap(values: np.ndarray, name: str, block_word: str = "head",
                  selected: tuple[int, int] | None = None) -> go.Figure:
    """Heatmap of a (L, H) score: z[l][h], x = block index, y = layer (layer 0 at the bottom), with a
    transparent marker per cell (trace 1) that carries the hover text and the click selection.

    Uses the sequential scale, or the diverging one centred at 0 when values take both signs."""
    z = np.asarray(values, dtype=float)
    L, H = z.shape
    finite = z[np.isfinite(z)]
    signed = finite.size > 0 and finite.min() < 0 < finite.max()
    layers, heads = np.meshgrid(np.arange(L), np.arange(H), indexing="ij")
    custom = np.stack([layers, heads], axis=-1)
    kw = dict(colorscale=DIVERGING_SCALE, zmid=0.0) if signed else dict(colorscale=SEQUENTIAL_SCALE)
    fig = go.Figure(go.Heatmap(z=z, x=np.arange(H), y=np.arange(L), colorbar=dict(title=name), hoverinfo="skip", **kw))
    # Plotly heatmaps cannot be selected (no click/selection events in select mode), so an invisible
    # square marker sits on every cell: hovering shows the value, clicking selects that (layer, block).
    zs = np.where(np.isfinite(z), z, np.nan).ravel()
    fig.add_trace(go.Scatter(
        x=heads.ravel(), y=layers.ravel(), mode="markers", name="cells", showlegend=False,
        marker=dict(symbol="square", size=12, color="rgba(0,0,0,0)"),
        customdata=np.column_stack([custom.reshape(-1, 2), zs]),
        hovertemplate=f"layer %{{y}}, {block_word} %{{x}}<br>{name} = %{{customdata[2]:.4g}}<extra></extra>"))
    if selected is not None:
        fig.add_trace(go.Scatter(x=[selected[1]], y=[selected[0]], mode="markers", name="selected",
                                 marker=dict(symbol="square-open", size=16, color=OKABE_ITO[3], line=dict(width=3)),
                                 unselected=dict(marker=dict(opacity=1.0)),   # never dimmed by a selection
                                 hoverinfo="skip", showlegend=False))
    base_layout(fig, f"{name} per layer and {block_word}", block_word, "layer")
    fig.update_xaxes(dtick=1)
    return fig


def head_spectrum_figure(lam: np.ndarray, label: str) -> go.Figure:
    """Eigenvalues of one block's kernel K^(b) (log y; non-positive values not drawn)."""
    lam = np.asarray(lam, dtype=float)
    fig = go.Figure(go.Scatter(x=np.arange(1, lam.size + 1), y=np.where(lam > 1e-300, lam, np.nan),
                               mode="lines+markers", name="λᵢ", line=dict(color=OKABE_ITO[0])))
    base_layout(fig, f"Spectrum of {label}", "mode i", "eigenvalue λᵢ")
    fig.update_yaxes(type="log")
    return fig


def attention_figure(P: np.ndarray, tokens: list[str], label: str) -> go.Figure:
    """Attention probabilities (rows = query tokens, columns = key tokens), sequential scale."""
    labels = [f"{i}:{t}" for i, t in enumerate(tokens)]
    fig = go.Figure(go.Heatmap(z=P, x=labels, y=labels, colorscale=SEQUENTIAL_SCALE, zmin=0.0,
                               colorbar=dict(title="attention"),
                               hovertemplate="query %{y}<br>key %{x}<br>p = %{z:.3f}<extra></extra>"))
    base_layout(fig, f"Attention pattern of {label}", "key token", "query token")
    fig.update_yaxes(autorange="reversed")
    return fig


def share_figure(shares: np.ndarray, layer: int, selected: int, block_word: str = "head") -> go.Figure:
    """Bars: tr(K^(b))/tr(K) for the blocks of one layer; the selected block in vermillion."""
    shares = np.asarray(shares, dtype=float)
    colors = [OKABE_ITO[3] if h == selected else OKABE_ITO[0] for h in range(shares.size)]
    fig = go.Figure(go.Bar(x=np.arange(shares.size), y=shares, marker_color=colors, name="share"))
    base_layout(fig, f"Share of the full kernel, layer {layer}", block_word, "tr(K⁽ᵇ⁾) / tr(K)")
    fig.update_xaxes(dtick=1)
    return fig
