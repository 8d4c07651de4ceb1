"""Figure of the per-prompt score check (`ttt_core.score_check`; DESIGN §6, §10). Pure plotly.

* `score_check_figure`: measured against linearised change of the query error, one labelled point
  per adapted subset (top-k, bottom-k, random i), with the y = x line. For qTTT on a long context the
  two axes are different quantities (answer NLL vs 1 − p), so the line is only a guide there and
  the title says to compare ranks.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from ttt_core.figures.style import OKABE_ITO, base_layout
from ttt_core.score_check import ScoreCheck

#: trace names, in drawing order
TRACE_TOP, TRACE_BOTTOM, TRACE_RANDOM, TRACE_DIAGONAL = "top-k", "bottom-k", "random k-subsets", "y = x"


def score_check_figure(check: ScoreCheck) -> go.Figure:
    """Measured (y) vs linearised (x) change per subset: traces "top-k", "bottom-k", "random
    k-subsets" (markers with text labels; customdata = the subset's block labels) and "y = x".
    Subsets without a finite measured or linearised value are left out. An impossible check gives
    an empty figure whose title carries the note."""
    fig = go.Figure()
    if not check.possible:
        base_layout(fig, f"Score check not possible: {check.note}", "linearised change", "measured change")
        return fig
    groups = [(TRACE_TOP, [s for s in check.subsets if s.label == "top-k"], OKABE_ITO[3], "diamond", 14),
              (TRACE_BOTTOM, [s for s in check.subsets if s.label == "bottom-k"], OKABE_ITO[0], "square", 12),
              (TRACE_RANDOM, check.randoms, OKABE_ITO[7], "circle", 10)]
    xs_all: list[float] = []
    ys_all: list[float] = []
    for name, subs, colour, symbol, size in groups:
        subs = [s for s in subs if s.measured is not None and s.predicted is not None]
        if not subs:
            continue
        x = [s.predicted for s in subs]
        y = [s.measured for s in subs]
        xs_all += x
        ys_all += y
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="markers+text", name=name, text=[s.label for s in subs], textposition="top center",
            marker={"color": colour, "symbol": symbol, "size": size},
            customdata=[", ".join(s.blocks) for s in subs],
            hovertemplate="%{text}: %{customdata}<br>linearised %{x:.4g}<br>measured %{y:.4g}<extra></extra>"))
    if xs_all:
        lo = float(min(min(xs_all), min(ys_all)))
        hi = float(max(max(xs_all), max(ys_all)))
        pad = 0.05 * (hi - lo) if hi > lo else max(abs(hi), 1e-12) * 0.05
        line = np.array([lo - pad, hi + pad])
        fig.add_trace(go.Scatter(x=line, y=line, mode="lines", name=TRACE_DIAGONAL, hoverinfo="skip",
                                 line={"color": "#999999", "dash": "dash"}))
    xt = f"linearised change of the {check.predicted_label}"
    yt = f"measured change of the {check.measured_label} ({check.engine})"
    title = f"{check.score} check: top-{check.k}, bottom-{check.k} and random {check.k}-subsets, {check.steps} steps"
    if not check.same_scale:
        title += " (different scales: compare ranks)"
    base_layout(fig, title, xt, yt)
    return fig
