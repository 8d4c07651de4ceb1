"""Figures of the Live qTTT page (pure functions of StepRecords or their dicts; DESIGN §1).

Every builder takes the run's records *including* the step-0 baseline (`run.baseline`) first, as
`ttt_core.qttt.StepRecord` objects or `StepRecord.to_dict()` dicts, and returns a plotly Figure
(or None when the record holds nothing to draw, e.g. no needle was marked).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import plotly.graph_objects as go

from ttt_core.figures.style import OKABE_ITO, SEQUENTIAL_SCALE, base_layout

Rec = Any  # StepRecord | Mapping[str, Any]


def _get(r: Rec, key: str) -> Any:
    return r.get(key) if isinstance(r, Mapping) else getattr(r, key, None)


def _series(records: Sequence[Rec], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = _get(r, key)
        if v is not None and _get(r, "status") != "diverged":
            xs.append(int(_get(r, "step")))
            ys.append(float(v))
    return xs, ys


def _diverged_marker(fig: go.Figure, records: Sequence[Rec]) -> None:
    for r in records:
        if _get(r, "status") == "diverged":
            fig.add_vline(x=int(_get(r, "step")), line_dash="dot", line_color=OKABE_ITO[3],
                          annotation_text="diverged", annotation_position="top left")


def loss_figure(records: Sequence[Rec]) -> go.Figure:
    """Training loss per step. qTTT: span NLL per token, Σ NLL / k, on each step's random span
    (before its update), with the whole-context mean at step 0 as the dashed reference; paper:
    L = ‖r‖²/(2σ̂²) (n/2 at step 0)."""
    mode = _get(records[0], "mode") if records else "qttt"
    fig = go.Figure()
    if mode == "paper":
        xs, ys = _series(records, "loss")
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name="LOO loss ‖r‖²/(2σ̂²)"))
        base_layout(fig, "Leave-one-out loss", "step", "‖r‖² / (2σ̂²)")
    else:
        pts = [(int(_get(r, "step")), float(_get(r, "loss_per_token"))) for r in records
               if _get(r, "step") and _get(r, "loss_per_token") is not None]
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                                 name="span NLL per token (before the step's update)"))
        if records and _get(records[0], "step") == 0 and _get(records[0], "loss_per_token") is not None:
            fig.add_hline(y=float(_get(records[0], "loss_per_token")), line_dash="dash", line_color=OKABE_ITO[7],
                          annotation_text="unadapted context mean", annotation_position="bottom right")
        ctx = _series(records, "context_nll")
        if ctx[0]:
            fig.add_trace(go.Scatter(x=ctx[0], y=ctx[1], mode="lines+markers", name="whole-context NLL per token"))
        base_layout(fig, "Span loss (next-token NLL)", "step", "nats per token")
    _diverged_marker(fig, records)
    return fig


def quality_figure(records: Sequence[Rec]) -> go.Figure | None:
    """The prompt's error measure per step: query squared error (few-shot), else the probability
    of the expected answer (long context with an answer); None when the prompt has neither."""
    fig = go.Figure()
    qx, qy = _series(records, "query_error")
    if qx:
        fig.add_trace(go.Scatter(x=qx, y=qy, mode="lines+markers", name="query error (s_x − v(y))²"))
        base_layout(fig, "Query error", "step", "(s_x − v(y_x))²")
    else:
        ax, ay = _series(records, "answer_prob")
        if not ax:
            px, py = _series(records, "query_prediction")
            if not px:
                return None
            fig.add_trace(go.Scatter(x=px, y=py, mode="lines+markers", name="query prediction s_x"))
            base_layout(fig, "Query prediction (no true label given)", "step", "s_x")
            _diverged_marker(fig, records)
            return fig
        fig.add_trace(go.Scatter(x=ax, y=ay, mode="lines+markers", name="P(expected answer)"))
        base_layout(fig, "Probability of the expected answer", "step", "P(answer | context, question)")
        if min(ay) < 1e-3:  # tiny probabilities (e.g. a random model) are only readable on a log axis
            fig.update_yaxes(type="log", exponentformat="power")
        else:
            fig.update_yaxes(rangemode="tozero")
    _diverged_marker(fig, records)
    return fig


def needle_figure(records: Sequence[Rec]) -> go.Figure | None:
    """Attention mass from the answer position onto the needle tokens, mean over layers and
    heads, per step; None when no needle is marked."""
    xs, ys = _series(records, "needle_mass")
    if not xs:
        return None
    fig = go.Figure(go.Scatter(x=xs, y=ys, mode="lines+markers", name="needle attention mass",
                               line=dict(color=OKABE_ITO[2])))
    base_layout(fig, "Needle attention mass", "step", "Σ attention on needle tokens (mean over layers, heads)")
    fig.update_yaxes(rangemode="tozero")
    _diverged_marker(fig, records)
    return fig


def delta_heatmap(records: Sequence[Rec]) -> go.Figure:
    """‖ΔW_l‖_F after each step, as a heatmap over steps (x) × layers (y)."""
    rows = [r for r in records if _get(r, "delta_norms")]
    steps = [int(_get(r, "step")) for r in rows]
    n_layers = max((len(_get(r, "delta_norms")) for r in rows), default=0)
    z = [[float(_get(r, "delta_norms")[layer]) for r in rows] for layer in range(n_layers)]
    mode = _get(records[0], "mode") if records else "qttt"
    fig = go.Figure(go.Heatmap(x=steps, y=list(range(n_layers)), z=z, colorscale=SEQUENTIAL_SCALE,
                               colorbar=dict(title="‖ΔW‖_F"),
                               hovertemplate="step %{x}<br>layer %{y}<br>‖ΔW‖_F = %{z:.3g}<extra></extra>"))
    what = "W_V or W_Q" if mode == "paper" else "W_Q"
    base_layout(fig, f"Size of the update of {what} per layer", "step", "layer")
    if n_layers <= 40:
        fig.update_yaxes(dtick=1 if n_layers <= 12 else 5)
    return fig


def step_time_figure(records: Sequence[Rec]) -> go.Figure:
    """Seconds per step, stacked: `step_s` (the backward and the optimiser; also the span's forward
    when no look-ahead ran it) and `eval_s` (the forward after the update, which yields the metrics
    and, with look-ahead, the next step's span loss: `qttt._Run`)."""
    rows = [r for r in records if _get(r, "step")]
    x = [int(_get(r, "step")) for r in rows]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=x, y=[float(_get(r, "step_s") or 0) for r in rows], name="backward + optimiser"))
    fig.add_trace(go.Bar(x=x, y=[float(_get(r, "eval_s") or 0) for r in rows], name="forward: metrics + next span"))
    fig.update_layout(barmode="stack")
    base_layout(fig, "Seconds per step", "step", "seconds")
    return fig


def label_distribution_figure(before: Mapping[str, float], after: Mapping[str, float] | None,
                              true_label: str | None = None) -> go.Figure:
    """Predicted label distribution (softmax restricted to the label tokens) before and after."""
    labels = list(before)
    fig = go.Figure()
    fig.add_trace(go.Bar(x=labels, y=[before[y] for y in labels], name="before"))
    if after is not None:
        fig.add_trace(go.Bar(x=labels, y=[after.get(y, 0.0) for y in labels], name="after"))
    fig.update_layout(barmode="group")
    base_layout(fig, "Predicted label distribution at the query", "label", "probability")
    if true_label is not None and true_label in labels:
        fig.add_annotation(x=true_label, y=max(list(before.values()) + list((after or {}).values())), text="true",
                           showarrow=True, arrowhead=2, yshift=10)
    return fig
