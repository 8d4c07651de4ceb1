"""Figures of the Reliability page (issue 16; DESIGN §10): mean regret per step rule with its 95 %
paired CI, the reliability diagram of P(TTT beats ICL), and the head-choice gains. Pure plotly
builders over the report of `ttt_core.experiments.calibration_report` (JSON rows; None = missing)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import plotly.graph_objects as go

from ttt_core.figures.style import OKABE_ITO, base_layout


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def regret_figure(rows: Sequence[dict[str, Any]], title: str = "Regret against the oracle") -> go.Figure:
    """One horizontal bar per rule: mean regret (measured error − the oracle's) with its 95 %
    paired bootstrap CI as error bars; rows as in `calibration_report.regret_rows` (one level)."""
    rows = list(rows)
    x = [_num(r["regret"]) for r in rows]
    plus = [max(_num(r["ci_high"]) - _num(r["regret"]), 0.0) if r.get("ci_high") is not None else 0.0 for r in rows]
    minus = [max(_num(r["regret"]) - _num(r["ci_low"]), 0.0) if r.get("ci_low") is not None else 0.0 for r in rows]
    colors = [OKABE_ITO[3] if r["rule"] == "learned controller" else OKABE_ITO[2] if "T_MAP" in r["rule"]
              or "posterior" in r["rule"] or "Gibbs" in r["rule"] or "skip" in r["rule"] else OKABE_ITO[0] for r in rows]
    fig = go.Figure(go.Bar(
        x=x, y=[r["rule"] for r in rows], orientation="h", marker_color=colors, name="mean regret",
        error_x=dict(type="data", array=plus, arrayminus=minus, visible=True, thickness=1),
        customdata=[[r["n"], r.get("mean_T")] for r in rows],
        hovertemplate="%{y}<br>mean regret %{x:.4f}<br>prompts %{customdata[0]}<br>mean T %{customdata[1]:.2f}"
                      "<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    return base_layout(fig, title, "mean regret (measured error − oracle's; 95 % paired CI)", "step rule")


def reliability_figure(bins: Sequence[dict[str, Any]], title: str = "Reliability of P(TTT beats ICL)") -> go.Figure:
    """Reliability diagram: measured frequency against mean predicted probability per bin (marker
    size ~ count, empty bins left out), the diagonal of perfect calibration, and the counts as
    bars on a second axis."""
    full = [b for b in bins if b.get("count")]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                             line=dict(color="#999", dash="dot"), hoverinfo="skip"))
    fig.add_trace(go.Bar(x=[0.5 * (b["lo"] + b["hi"]) for b in bins], y=[b["count"] for b in bins],
                         width=[0.9 * (b["hi"] - b["lo"]) for b in bins], name="prompts per bin", yaxis="y2",
                         marker_color=OKABE_ITO[7], opacity=0.35,
                         hovertemplate="P in [%{customdata[0]:.1f}, %{customdata[1]:.1f}]: %{y} prompts<extra></extra>",
                         customdata=[[b["lo"], b["hi"]] for b in bins]))
    fig.add_trace(go.Scatter(
        x=[_num(b["mean_p"]) for b in full], y=[_num(b["freq"]) for b in full], mode="lines+markers",
        name="measured frequency", marker=dict(size=[8 + min(b["count"], 40) * 0.5 for b in full], color=OKABE_ITO[4]),
        line=dict(color=OKABE_ITO[4]), customdata=[[b["count"]] for b in full],
        hovertemplate="mean P %{x:.2f}<br>measured frequency %{y:.2f}<br>%{customdata[0]} prompts<extra></extra>"))
    fig = base_layout(fig, title, "predicted P(TTT beats ICL) (§5.1 posterior)",
                      "measured frequency: error(T⋆) < error(0)")
    fig.update_layout(yaxis=dict(range=[-0.02, 1.02]), xaxis=dict(range=[-0.02, 1.02]),
                      yaxis2=dict(overlaying="y", side="right", title="prompts per bin", showgrid=False, rangemode="tozero"))
    return fig


def recalibration_figure(bins_raw: Sequence[dict[str, Any]], bins_recal: Sequence[dict[str, Any]],
                         base_rate: float | None = None,
                         title: str = "Held-out prompts: P(TTT beats ICL) before and after recalibration") -> go.Figure:
    """Two reliability lines on the same (test-split) prompts: the posterior's P and the Platt-
    recalibrated P' (`calibration_report.verdict_recalibration` bins), marker size ~ count, the
    diagonal, and the train split's base rate as a horizontal line (what a constant would say)."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                             line=dict(color="#999", dash="dot"), hoverinfo="skip"))
    if base_rate is not None and math.isfinite(base_rate):
        fig.add_trace(go.Scatter(x=[0, 1], y=[base_rate, base_rate], mode="lines", name="train base rate",
                                 line=dict(color=OKABE_ITO[7], dash="dash"), hoverinfo="skip"))
    for bins, name, color in ((bins_raw, "posterior P (as shown today)", OKABE_ITO[4]),
                              (bins_recal, "recalibrated P' (Platt, train split)", OKABE_ITO[2])):
        full = [b for b in bins if b.get("count")]
        fig.add_trace(go.Scatter(
            x=[_num(b["mean_p"]) for b in full], y=[_num(b["freq"]) for b in full], mode="lines+markers", name=name,
            marker=dict(size=[8 + min(b["count"], 40) * 0.5 for b in full], color=color), line=dict(color=color),
            customdata=[[b["count"]] for b in full],
            hovertemplate="mean P %{x:.2f}<br>measured frequency %{y:.2f}<br>%{customdata[0]} prompts<extra></extra>"))
    fig = base_layout(fig, title, "predicted probability that T⋆ steps beat ICL", "measured frequency (test split)")
    fig.update_layout(yaxis=dict(range=[-0.02, 1.02]), xaxis=dict(range=[-0.02, 1.02]))
    return fig


def head_gain_figure(rows: Sequence[dict[str, Any]], title: str = "Head choice: measured gain per subset") -> go.Figure:
    """Grouped bars per score: mean measured gain of its top-k, of the random k-subsets and of its
    bottom-k (rows of `calibration_report.head_choice_rows`, one level)."""
    rows = list(rows)
    fig = go.Figure()
    for key, name, color in (("gain_top", "top-k", OKABE_ITO[2]), ("gain_random", "random k (mean)", OKABE_ITO[7]),
                             ("gain_bottom", "bottom-k", OKABE_ITO[5])):
        fig.add_trace(go.Bar(x=[r["score"] for r in rows], y=[_num(r.get(key)) for r in rows], name=name,
                             marker_color=color,
                             hovertemplate=f"%{{x}} {name}: mean gain %{{y:.4g}}<extra></extra>"))
    fig.update_layout(barmode="group")
    return base_layout(fig, title, "score", "mean measured gain (− error change; higher = better)")
