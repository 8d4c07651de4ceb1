"""Shared visual conventions for every figure: colour-blind-safe palettes and layout defaults.

* Categorical lines: the Okabe-Ito palette (safe for the common colour-vision deficiencies).
* Sequential magnitudes (scores, energies): "Cividis" (perceptually uniform, CVD-safe).
* Signed quantities (differences, gains): the diverging "RdBu" scale centred at zero.
"""

from __future__ import annotations

import plotly.graph_objects as go

OKABE_ITO: list[str] = [
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#D55E00",  # vermillion
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
]
SEQUENTIAL_SCALE = "Cividis"
DIVERGING_SCALE = "RdBu"


def base_layout(fig: go.Figure, title: str, x_title: str = "", y_title: str = "") -> go.Figure:
    """Apply the shared layout (template, margins, fonts, titles) to `fig` in place and return it."""
    fig.update_layout(
        title=dict(text=title, x=0.0, xanchor="left"),
        template="plotly_white",
        colorway=OKABE_ITO,
        margin=dict(l=60, r=20, t=50, b=50),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1.0),
        xaxis_title=x_title,
        yaxis_title=y_title,
    )
    return fig


def legend_below(fig: go.Figure, rows: int = 1) -> go.Figure:
    """Move the legend under the x axis (one entry per line): for half-width charts whose long
    trace names would otherwise run over the title. `rows`: legend entries, to size the margin."""
    fig.update_layout(legend=dict(orientation="v", yanchor="top", y=-0.22, xanchor="left", x=0.0),
                      margin=dict(b=70 + 22 * max(1, rows)))
    return fig
