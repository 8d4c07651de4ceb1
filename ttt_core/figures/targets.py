"""Figures of the Targets page (issue 12): the measured query error of every target × signal on one
axis, against steps and against counted training FLOPs; and the suite's mean error change per
target. Pure plotly builders over `targets.comparison.TargetComparison` (or its `to_dict()`)."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ttt_core.figures.style import OKABE_ITO, base_layout

_DASH = {"nll": "solid", "entropy": "dash", "syttta": "dot"}


def _rows(cmp: Any) -> list[dict[str, Any]]:
    d = cmp if isinstance(cmp, dict) else cmp.to_dict()
    return d["rows"], d


def error_vs_steps_figure(cmp: Any) -> go.Figure:
    """Measured query error (mean over seeds) at steps 0…N, one trace per target × signal (colour
    per target, dash per signal)."""
    rows, d = _rows(cmp)
    fig = go.Figure()
    colours = {t: OKABE_ITO[i % len(OKABE_ITO)] for i, t in enumerate(dict.fromkeys(r["target"] for r in rows))}
    for r in rows:
        if not r["errors"] or all(e is None for e in r["errors"]):
            continue
        fig.add_trace(go.Scatter(x=list(range(len(r["errors"]))), y=r["errors"], mode="lines+markers",
                                 name=f"{r['target']} · {r['signal']}",
                                 line=dict(color=colours[r["target"]], dash=_DASH.get(r["signal"], "solid"))))
    return base_layout(fig, f"Measured {d['error_label']} against steps", "TTT step", d["error_label"])


def error_vs_flops_figure(cmp: Any) -> go.Figure:
    """The same curves against cumulative training FLOPs (step × counted FLOPs of one step), log x."""
    rows, d = _rows(cmp)
    fig = go.Figure()
    colours = {t: OKABE_ITO[i % len(OKABE_ITO)] for i, t in enumerate(dict.fromkeys(r["target"] for r in rows))}
    for r in rows:
        f = r.get("flops_per_step")
        if not f or not r["errors"] or all(e is None for e in r["errors"]):
            continue
        x = [t * f for t in range(1, len(r["errors"]))]
        fig.add_trace(go.Scatter(x=x, y=r["errors"][1:], mode="lines+markers", name=f"{r['target']} · {r['signal']}",
                                 line=dict(color=colours[r["target"]], dash=_DASH.get(r["signal"], "solid"))))
    fig.update_xaxes(type="log")
    return base_layout(fig, f"Measured {d['error_label']} against training FLOPs", "training FLOPs (counted)",
                       d["error_label"])


def suite_figure(summary: dict[str, Any]) -> go.Figure:
    """Mean error change per target × signal over a suite's prompts with its 95 % CI, one panel per
    family (`experiments.targets_suite.summarise`): the families' errors have different units
    (squared error vs nats), so each panel has its own y axis."""
    fams = list(summary.get("families", {}).items())
    fig = make_subplots(rows=max(1, len(fams)), cols=1, subplot_titles=[f for f, _ in fams] or None,
                        vertical_spacing=0.18)
    for i, (fam, rows) in enumerate(fams):
        names = [f"{r['target']} · {r['signal']}" for r in rows]
        mean = [r["mean_delta"] for r in rows]
        lo = [None if r["ci_low"] is None or m is None else m - r["ci_low"] for r, m in zip(rows, mean)]
        hi = [None if r["ci_high"] is None or m is None else r["ci_high"] - m for r, m in zip(rows, mean)]
        fig.add_trace(go.Bar(x=names, y=mean, name=fam, marker_color=OKABE_ITO[i % len(OKABE_ITO)],
                             error_y=dict(type="data", array=hi, arrayminus=lo, visible=True)), row=i + 1, col=1)
        fig.add_hline(y=0.0, line=dict(color=OKABE_ITO[7], dash="dot", width=1), row=i + 1, col=1)
    base_layout(fig, "Suite: mean measured error change per target (95 % CI)")
    for i in range(len(fams)):
        fig.update_yaxes(title_text="mean Δ error after N steps", row=i + 1, col=1)
    fig.update_layout(height=380 * max(1, len(fams)))
    return fig


def kernel_check_figure(check: dict[str, Any]) -> go.Figure:
    """Reliability of each target's kernel verdict against its measured run over a suite
    (`experiments.targets_suite.kernel_check`): per family, each target's bins — mean P(TTT beats
    ICL) (x) against the share of its prompts whose run lowered the query error (y), marker area ∝
    prompts in the bin — and the pooled bins of all targets (black diamonds, joined); the diagonal is
    a calibrated verdict. One panel per family, titled with the pooled Brier score and the base
    rate's; a target's own Brier scores are in its hover text."""
    fams = list(check.get("families", {}).items())
    titles = [f"{f}: pooled Brier {g['all']['brier']:.2f} (base rate {g['all']['brier_base_rate']:.2f})"
              for f, g in fams if "all" in g] or None
    fig = make_subplots(rows=1, cols=max(1, len(fams)), subplot_titles=titles, horizontal_spacing=0.1)
    targets = list(dict.fromkeys(t for _, by_t in fams for t in by_t if t != "all"))
    colour = {t: OKABE_ITO[j % len(OKABE_ITO)] for j, t in enumerate(targets)} | {"all": "#000000"}
    for i, (fam, by_t) in enumerate(fams):
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(color="#999999", dash="dot", width=1),
                                 name="calibrated", legendgroup="calibrated", showlegend=i == 0, hoverinfo="skip"),
                      row=1, col=i + 1)
        for t, g in sorted(by_t.items(), key=lambda kv: kv[0] == "all"):
            bins = [b for b in g["reliability"] if b["count"]]
            pooled = t == "all"
            fig.add_trace(go.Scatter(
                x=[b["mean_p"] for b in bins], y=[b["freq"] for b in bins], mode="markers+lines" if pooled else "markers",
                name="all targets (pooled)" if pooled else t, legendgroup=t, showlegend=i == 0,
                line=dict(color=colour[t], width=1.5),
                marker=dict(size=[5 + 2.5 * b["count"] ** 0.5 for b in bins], color=colour[t], opacity=0.9 if pooled else 0.7,
                            symbol="diamond" if pooled else "circle", line=dict(width=0)),
                customdata=[[b["count"], b["lo"], b["hi"], g["brier"], g["brier_base_rate"]] for b in bins],
                hovertemplate=("P in [%{customdata[1]:.1f}, %{customdata[2]:.1f}): %{customdata[0]} prompts, helped %{y:.0%}"
                               "<br>Brier %{customdata[3]:.3f} (base rate %{customdata[4]:.3f})<extra>" + f"{fam} · {t}</extra>")),
                row=1, col=i + 1)
        fig.update_xaxes(title_text="kernel's P(TTT beats ICL)", range=[-0.03, 1.03], row=1, col=i + 1)
        fig.update_yaxes(title_text="share of runs that lowered the error" if i == 0 else None, range=[-0.03, 1.03],
                         row=1, col=i + 1)
    base_layout(fig, "Did each target's kernel foresee its run? Reliability of the verdict")
    fig.update_layout(height=520, margin=dict(t=90, b=120),
                      legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0.0))
    fig.update_annotations(font_size=12)
    return fig
