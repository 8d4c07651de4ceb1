"""Figures comparing saved runs (issue 11.5). Pure plotly builders over (label, x, y) curves from
`ttt_core.run_compare.run_metrics`.

* `overlay_figure`: one trace per run (name = the run's label), same axes.
* `difference_figure`: one trace per other run, named "A − B", with y = A − B on the x values both
  runs have (A = the reference run, the first), and a dashed zero line.
"""

from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go

from ttt_core.figures.style import OKABE_ITO, base_layout, legend_below
from ttt_core.run_compare import series_difference

Curve = tuple[str, Sequence[float], Sequence[float]]


def overlay_figure(curves: Sequence[Curve], metric: str, x_title: str = "step") -> go.Figure:
    """`metric` against x for every run, one trace per run (the first solid, the others dashed)."""
    fig = go.Figure()
    for i, (label, x, y) in enumerate(curves):
        fig.add_trace(go.Scatter(x=list(x), y=list(y), mode="lines+markers", name=label,
                                 line=dict(color=OKABE_ITO[i % len(OKABE_ITO)], dash="solid" if i == 0 else "dash")))
    return legend_below(base_layout(fig, f"{metric}: {len(curves)} runs", x_title, metric), len(curves))


def difference_figure(reference: Curve, others: Sequence[Curve], metric: str, x_title: str = "step") -> go.Figure:
    """reference − other for every other run, on the x values both have."""
    ref_label, rx, ry = reference
    fig = go.Figure()
    for i, (label, x, y) in enumerate(others, 1):
        dx, dy = series_difference((rx, ry), (x, y))
        fig.add_trace(go.Scatter(x=dx, y=dy, mode="lines+markers", name=f"{ref_label} − {label}",
                                 line=dict(color=OKABE_ITO[i % len(OKABE_ITO)])))
    fig.add_hline(y=0.0, line=dict(color=OKABE_ITO[7], dash="dot", width=1))
    return legend_below(base_layout(fig, f"Difference of {metric}", x_title, f"Δ {metric}"), len(others))
