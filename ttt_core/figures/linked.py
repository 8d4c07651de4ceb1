"""Linked (brushable) Altair views: one interval selection drives several charts at once.

Pure functions from ttt_core report objects to `alt.VConcatChart` specs, plus the pure helpers
that turn the selection Streamlit returns (``st.altair_chart(..., on_select="rerun")``) into the
brushed rows. No Streamlit here.

* `spectrum_linked_chart(SpectrumReport)`: brush a range of eigen-modes on the spectrum (mode i
  on x, λᵢ on a log y); the per-mode SNR (with its 90 % band), the query alignment (when the
  prompt has a query) and the filter match g_T, g⋆ against λ highlight the same modes. One
  interval selection `MODE_BRUSH` on the field "mode" (x encoding of the spectrum chart).
* `steps_linked_chart(StepsReport)`: brush a range of T on the evidence chart; the query error
  (or prediction / qTTT NLL) and the Gibbs posterior over T highlight the same T. One interval
  selection `STEPS_BRUSH` on the field "T".

Every chart reads one shared table (`mode_frame` / `steps_frame`) so that the selection test
`datum.mode` / `datum.T` means the same row everywhere. Highlighted marks keep their series
colour; marks outside a non-empty brush turn `MUTED` grey. Each highlight layer is named
(`*_pts`, `*_bars`) so its Vega mark group is ``<name>_marks`` in the rendered SVG (browser
tests count marks by that class and their fill). The charts ask for the SVG renderer
(usermeta.embedOptions) for the same reason; these tables are small (≤ a few hundred rows).
"""

from __future__ import annotations

from typing import Any, Mapping

import altair as alt
import numpy as np
import pandas as pd

from ttt_core.figures.style import OKABE_ITO

BLUE, ORANGE, GREEN, VERMILLION, PURPLE, SKY, YELLOW, BLACK = OKABE_ITO
MUTED = "#c7c7c7"
MODE_BRUSH = "mode_brush"
STEPS_BRUSH = "steps_brush"
_POS_FLOOR = 1e-300
_SVG = {"embedOptions": {"renderer": "svg"}}
WIDTH = 620          # the page stretches the charts to the container; this is the fallback width
HEIGHT = 150

# names of the highlight layers (their Vega mark groups are "<name>_marks")
SPECTRUM_MARKS = ("spec_pts", "snr_pts", "align_pts", "filter_pts")
STEPS_MARKS = ("evid_pts", "err_pts", "gibbs_bars")


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def _col(x: np.ndarray | None, n: int) -> np.ndarray:
    """A float column of length n (NaN where the quantity is missing; non-finite → NaN)."""
    if x is None:
        return np.full(n, np.nan)
    a = np.asarray(x, dtype=float).reshape(-1)
    return np.where(np.isfinite(a), a, np.nan)


def brush_range(selection: Any, param: str, field: str) -> tuple[float, float] | None:
    """The [lo, hi] an interval selection holds on `field`, from the selection state that
    `st.altair_chart(..., on_select="rerun")` returns (``{"selection": {param: {field: [a, b]}}}``),
    or from its ``selection`` part. None when the brush is empty or malformed."""
    if selection is None:
        return None
    sel = selection.get("selection", selection) if isinstance(selection, Mapping) else getattr(selection, "selection", None)
    if not isinstance(sel, Mapping):
        return None
    p = sel.get(param)
    if not isinstance(p, Mapping):
        return None
    v = p.get(field)
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        return None
    try:
        lo, hi = float(v[0]), float(v[1])
    except (TypeError, ValueError):
        return None
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return None
    return (min(lo, hi), max(lo, hi))


def _in_range(x: np.ndarray, rng: tuple[float, float] | None) -> np.ndarray:
    if rng is None:
        return np.zeros(x.shape, dtype=bool)
    return (x >= rng[0]) & (x <= rng[1])


def _highlight(brush: alt.Parameter, color: Any) -> Any:
    """Series colour inside the brush (or with no brush), MUTED grey outside it."""
    return alt.when(brush).then(color).otherwise(alt.value(MUTED))


def _finish(chart: alt.VConcatChart) -> alt.VConcatChart:
    return chart.properties(usermeta=_SVG, autosize=alt.AutoSizeParams(type="fit-x", contains="padding")) \
        .configure_view(stroke=None).configure_axis(grid=True, gridOpacity=0.5)


# --------------------------------------------------------------------------------------------
# Spectrum & SNR: modes
# --------------------------------------------------------------------------------------------


def mode_frame(rep) -> pd.DataFrame:
    """One row per eigen-mode i = 1…n of a SpectrumReport: lam, snr, snr_lo, snr_hi, alignment,
    g_T, g_star, gap_ttt, gap_icl (NaN where the report has None, e.g. no query)."""
    n = rep.n
    return pd.DataFrame({
        "mode": np.arange(1, n + 1, dtype=int),
        "lam": _col(rep.lam, n),
        "snr": _col(rep.snr, n),
        "snr_lo": _col(rep.snr_lo, n),
        "snr_hi": _col(rep.snr_hi, n),
        "alignment": _col(rep.alignment, n),
        "g_T": _col(rep.g_T, n),
        "g_star": _col(rep.g_star, n),
        "gap_ttt": _col(rep.gap_contrib, n),
        "gap_icl": _col(rep.icl_contrib, n),
    })


def _mode_x(n: int, title: str | None = "mode i (descending λ)") -> alt.X:
    return alt.X("mode:Q", title=title, scale=alt.Scale(domainMin=0.5, domainMax=n + 0.5, nice=False, zero=False),
                 axis=alt.Axis(tickMinStep=1, format="d"))


def _log_y(field: str, title: str, fmt: str | None = None) -> alt.Y:
    return alt.Y(f"{field}:Q", title=title, scale=alt.Scale(type="log"), axis=alt.Axis(format=fmt) if fmt else alt.Undefined)


def spectrum_linked_chart(rep, width: int = WIDTH, height: int = HEIGHT) -> alt.VConcatChart:
    """Spectrum (brush here) | SNR with its 90 % band | query alignment (if any) | filter match,
    stacked, all reading `mode_frame(rep)` and highlighting the modes in the `MODE_BRUSH`
    interval selection on "mode"."""
    n = rep.n
    brush = alt.selection_interval(name=MODE_BRUSH, encodings=["x"], empty=True)
    tip = [alt.Tooltip("mode:Q", title="mode"), alt.Tooltip("lam:Q", title="λ", format=".3g"),
           alt.Tooltip("snr:Q", title="SNR", format=".3g"), alt.Tooltip("alignment:Q", title="alignment", format=".3g"),
           alt.Tooltip("g_T:Q", title="g_T", format=".3f"), alt.Tooltip("g_star:Q", title="g⋆", format=".3f")]
    base = alt.Chart().properties(width=width, height=height)
    pos = "datum.lam > 0 && isFinite(datum.lam)"

    # 1 · spectrum: the brush lives here
    spec_line = base.mark_line(color=MUTED, strokeWidth=1).encode(x=_mode_x(n), y=_log_y("lam", "eigenvalue λᵢ", ".0e")) \
        .transform_filter(pos)
    spec_pts = base.mark_point(filled=True, size=70, opacity=1).encode(
        x=_mode_x(n), y=_log_y("lam", "eigenvalue λᵢ", ".0e"), color=_highlight(brush, alt.value(BLUE)), tooltip=tip,
    ).transform_filter(pos).add_params(brush).properties(name="spec_pts")
    layers = [spec_line, spec_pts]
    if np.isfinite(rep.lam_star) and rep.lam_star > 0:
        layers.append(base.mark_rule(color=VERMILLION, strokeDash=[5, 4]).encode(
            x=alt.datum(0.5), x2=alt.datum(n + 0.5), y=alt.datum(float(rep.lam_star))).transform_filter("datum.mode == 1"))
    spectrum = alt.layer(*layers).properties(
        title=alt.Title(f"Eigen-spectrum of the {rep.label} — drag across modes to select them",
                        subtitle=f"dashed: λ⋆ = σ²/τ² = {rep.lam_star:.3g} (modes above it have SNR > 1)"))

    # 2 · SNR with its 90 % band
    snr_pos = "datum.snr > 0 && isFinite(datum.snr)"
    band = base.mark_area(color=SKY, opacity=0.25).encode(
        x=_mode_x(n), y=_log_y("snr_lo", "τ²λᵢ / σ²"), y2="snr_hi:Q",
    ).transform_filter("datum.snr_lo > 0 && datum.snr_hi > 0")
    snr_line = base.mark_line(color=MUTED, strokeWidth=1).encode(x=_mode_x(n), y=_log_y("snr", "τ²λᵢ / σ²")) \
        .transform_filter(snr_pos)
    snr_pts = base.mark_point(filled=True, size=60, opacity=1).encode(
        x=_mode_x(n), y=_log_y("snr", "τ²λᵢ / σ²"), color=_highlight(brush, alt.value(BLUE)),
        tooltip=tip + [alt.Tooltip("snr_lo:Q", title="SNR 5 %", format=".3g"),
                       alt.Tooltip("snr_hi:Q", title="SNR 95 %", format=".3g")],
    ).transform_filter(snr_pos).properties(name="snr_pts")
    one = base.mark_rule(color=VERMILLION, strokeDash=[5, 4]).encode(
        x=alt.datum(0.5), x2=alt.datum(n + 0.5), y=alt.datum(1.0)).transform_filter("datum.mode == 1")
    snr = alt.layer(band, snr_line, snr_pts, one).properties(
        title=alt.Title("Per-mode SNR (posterior median, 90 % band)", subtitle="dashed: SNR = 1"))
    views: list[Any] = [spectrum, snr]

    # 3 · query alignment (log y: it spans many decades)
    if rep.alignment is not None:
        a_pos = "datum.alignment > 0 && isFinite(datum.alignment)"
        a_rule = base.mark_rule(color=MUTED).encode(x=_mode_x(n), y=_log_y("alignment", "(uᵢᵀ kₓ)²")) \
            .transform_filter(a_pos).transform_joinaggregate(a_min="min(alignment)") \
            .encode(y2="a_min:Q")
        a_pts = base.mark_point(filled=True, size=60, opacity=1).encode(
            x=_mode_x(n), y=_log_y("alignment", "(uᵢᵀ kₓ)²"), color=_highlight(brush, alt.value(GREEN)), tooltip=tip,
        ).transform_filter(a_pos).properties(name="align_pts")
        views.append(alt.layer(a_rule, a_pts).properties(
            title=alt.Title("Query alignment per mode (log scale)",
                            subtitle="how strongly the query couples to each eigen-direction")))

    # 4 · filter match against λ (long form: one row per mode and filter)
    fold = base.transform_filter(pos).transform_fold(["g_T", "g_star"], as_=["filter", "g"]) \
        .transform_calculate(filter_name=f"datum.filter == 'g_T' ? 'TTT g_T (T = {rep.T:g})' : 'Bayes g⋆'")
    fcolor = alt.Color("filter_name:N", title=None, scale=alt.Scale(
        domain=[f"TTT g_T (T = {rep.T:g})", "Bayes g⋆"], range=[BLUE, ORANGE]), legend=alt.Legend(orient="top-left"))
    fx = alt.X("lam:Q", title="eigenvalue λᵢ (log)", scale=alt.Scale(type="log"), axis=alt.Axis(format=".0e"))
    fy = alt.Y("g:Q", title="shrinkage g(λᵢ)", scale=alt.Scale(domain=[0, 1]))
    f_line = fold.mark_line(strokeWidth=1, opacity=0.6).encode(x=fx, y=fy, color=fcolor, detail="filter:N",
                                                               strokeDash="filter_name:N")
    f_pts = fold.mark_point(filled=True, size=60, opacity=1).encode(
        x=fx, y=fy, color=_highlight(brush, fcolor), shape=alt.Shape("filter_name:N", legend=None),
        tooltip=[alt.Tooltip("mode:Q", title="mode"), alt.Tooltip("filter_name:N", title="filter"),
                 alt.Tooltip("g:Q", title="g", format=".3f"), alt.Tooltip("lam:Q", title="λ", format=".3g")],
    ).properties(name="filter_pts")
    views.append(alt.layer(f_line, f_pts).properties(
        title=alt.Title("Filter match on each mode (x: λᵢ, not the mode index)",
                        subtitle="TTT's g_T against the Bayes-optimal g⋆ = λ/(λ+λ⋆)")))
    return _finish(alt.vconcat(*views, data=mode_frame(rep), spacing=24).resolve_scale(color="independent"))


def brushed_mode_index(rep, rng: tuple[float, float] | None) -> np.ndarray:
    """0-based indices of the modes i (1-based mode numbers) inside the brush range."""
    return np.flatnonzero(_in_range(np.arange(1, rep.n + 1, dtype=float), rng))


def brushed_modes_table(rep, idx: np.ndarray) -> pd.DataFrame:
    """One row per brushed mode: mode, λ, SNR median [90 % interval], alignment, g_T, g⋆."""
    idx = np.asarray(idx, dtype=int)
    al = None if rep.alignment is None else np.asarray(rep.alignment, dtype=float)
    return pd.DataFrame({
        "mode": idx + 1,
        "λ": [f"{rep.lam[i]:.3g}" for i in idx],
        "SNR median [90 %]": [f"{rep.snr[i]:.3g} [{rep.snr_lo[i]:.3g}, {rep.snr_hi[i]:.3g}]" for i in idx],
        "alignment (uᵢᵀkₓ)²": ["—" if al is None else f"{al[i]:.3g}" for i in idx],
        "g_T": [f"{rep.g_T[i]:.3f}" for i in idx],
        "g⋆": [f"{rep.g_star[i]:.3f}" for i in idx],
    })


def _share(x: np.ndarray | None, idx: np.ndarray) -> float | None:
    if x is None:
        return None
    x = np.asarray(x, dtype=float)
    tot = float(np.nansum(x))
    return None if not tot > 0 else float(np.nansum(x[idx]) / tot)


def brushed_shares(rep, idx: np.ndarray) -> dict[str, float | None]:
    """Shares the brushed modes hold: of the query alignment Σ(uᵢᵀkₓ)², of the TTT gap
    contributions Σ aᵢ(q_T − q⋆)², of the ICL gap Σ aᵢ q⋆², and of the trace Σλ (None where the
    report has no such quantity or its total is 0)."""
    idx = np.asarray(idx, dtype=int)
    return {"alignment": _share(rep.alignment, idx), "gap_ttt": _share(rep.gap_contrib, idx),
            "gap_icl": _share(rep.icl_contrib, idx), "energy": _share(rep.lam, idx)}


# --------------------------------------------------------------------------------------------
# Steps & bounds: step counts T
# --------------------------------------------------------------------------------------------

EVIDENCE_SERIES = {"ell_fixed": "ℓ_T fixed σ̂", "ell_profiled": "ℓ_T profiled σ",
                   "bound": "plug-in bound ℓ_T + slack", "pop_risk": "plug-in population risk"}


def _error_series(rep) -> dict[str, str]:
    """column → legend name of the query curves the error chart draws (what the report has)."""
    tc, m = rep.theory, rep.measured
    if tc.linear_error is not None or (m is not None and m.error is not None):
        out = {"err_measured": "measured error", "err_linear": "linearised error"}
    elif tc.linear_prediction is not None or (m is not None and m.prediction is not None):
        out = {"pred_measured": "measured prediction", "pred_linear": "linearised prediction"}
    else:
        out = {}
    if m is not None and m.nll is not None:
        out["nll_measured"] = "measured qTTT answer NLL"
    return out


def steps_frame(rep) -> pd.DataFrame:
    """One row per T of a StepsReport's grid: evidence curves (ell_fixed, ell_profiled, bound,
    pop_risk), query curves (err_/pred_ measured and linear, nll_measured) and the Gibbs posterior
    gibbs (NaN where the report has no such curve)."""
    tc, b, m = rep.theory, rep.bounds, rep.measured
    G = len(rep.T_grid)
    return pd.DataFrame({
        "T": np.asarray(rep.T_grid, dtype=float),
        "ell_fixed": _col(tc.ell_fixed, G), "ell_profiled": _col(tc.ell_profiled, G),
        "bound": _col(b.bound, G), "pop_risk": _col(b.population_risk, G),
        "err_measured": _col(None if m is None else m.error, G), "err_linear": _col(tc.linear_error, G),
        "pred_measured": _col(None if m is None else m.prediction, G), "pred_linear": _col(tc.linear_prediction, G),
        "nll_measured": _col(None if m is None else m.nll, G),
        "gibbs": _col(b.gibbs, G),
    })


def _fold_chart(base: alt.Chart, series: dict[str, str], brush: alt.Parameter, name: str, y_title: str,
                colors: list[str], x: alt.X, with_brush: bool) -> alt.LayerChart:
    cols = list(series)
    names = [series[c] for c in cols]
    label = " : ".join(f"datum.key == '{c}' ? '{series[c]}'" for c in cols) + " : datum.key"
    f = base.transform_fold(cols, as_=["key", "value"]).transform_filter("isFinite(datum.value)") \
        .transform_calculate(series=label)
    color = alt.Color("series:N", title=None, scale=alt.Scale(domain=names, range=colors[:len(names)]),
                      legend=alt.Legend(orient="top", labelLimit=260))
    y = alt.Y("value:Q", title=y_title, scale=alt.Scale(zero=False))
    line = f.mark_line(strokeWidth=1.5, opacity=0.7).encode(x=x, y=y, color=color, detail="key:N")
    pts = f.mark_point(filled=True, size=45, opacity=1).encode(
        x=x, y=y, color=_highlight(brush, color),
        tooltip=[alt.Tooltip("T:Q", title="T"), alt.Tooltip("series:N"), alt.Tooltip("value:Q", format=".4g")],
    ).properties(name=name)
    if with_brush:
        pts = pts.add_params(brush)
    return alt.layer(line, pts)


def steps_linked_chart(rep, width: int = WIDTH, height: int = HEIGHT) -> alt.VConcatChart:
    """Evidence curves (brush a range of T here) | query error (or prediction, qTTT NLL) | Gibbs
    posterior ν_β(T), stacked on `steps_frame(rep)`, highlighting the T in `STEPS_BRUSH`."""
    tc, b = rep.theory, rep.bounds
    G = float(rep.T_grid[-1]) if len(rep.T_grid) else 1.0
    brush = alt.selection_interval(name=STEPS_BRUSH, encodings=["x"], empty=True)
    x = alt.X("T:Q", title="steps T", scale=alt.Scale(domainMin=-0.5, domainMax=G + 0.5, nice=False, zero=False),
              axis=alt.Axis(tickMinStep=1, format="d"))
    base = alt.Chart().properties(width=width, height=height)

    evid = _fold_chart(base, EVIDENCE_SERIES, brush, "evid_pts", "ℓ_T", [BLUE, PURPLE, VERMILLION, GREEN], x, True)
    tmap = base.mark_rule(color=VERMILLION, strokeDash=[5, 4]).encode(x=alt.datum(float(tc.t_map_fixed))) \
        .transform_filter("datum.T == 0")
    views: list[Any] = [alt.layer(evid, tmap).properties(title=alt.Title(
        f"Evidence and the plug-in bound (δ = {b.delta:g}) — drag across T to select steps",
        subtitle=f"dashed: T_MAP (fixed σ̂) = {tc.t_map_fixed}"))]

    series = _error_series(rep)
    if series:
        y_title = "query squared error" if "err_measured" in series else (
            "query prediction" if "pred_measured" in series else "answer NLL (nats)")
        err = _fold_chart(base, series, brush, "err_pts", y_title, [BLUE, ORANGE, GREEN], x, False)
        layers: list[Any] = [err]
        icl = rep.icl_error if "err_measured" in series else (rep.f0 if "pred_measured" in series else None)
        if icl is not None and np.isfinite(icl):
            layers.append(base.mark_rule(color=BLACK, strokeDash=[2, 3]).encode(
                x=alt.datum(-0.5), x2=alt.datum(G + 0.5), y=alt.datum(float(icl))).transform_filter("datum.T == 0"))
        views.append(alt.layer(*layers).properties(title=alt.Title(
            "Query curve against steps", subtitle="dotted: ICL (T = 0)" if len(layers) > 1 else "")))

    gib = base.transform_calculate(T0="datum.T - 0.4", T1="datum.T + 0.4").mark_bar().encode(
        x=alt.X("T0:Q", title="steps T", scale=alt.Scale(domainMin=-0.5, domainMax=G + 0.5, nice=False, zero=False),
                axis=alt.Axis(tickMinStep=1, format="d")),
        x2="T1:Q", y=alt.Y("gibbs:Q", title="ν_β(T)", scale=alt.Scale(zero=True)), y2=alt.datum(0.0), color=_highlight(brush, alt.value(BLUE)),
        tooltip=[alt.Tooltip("T:Q", title="T"), alt.Tooltip("gibbs:Q", title="ν_β(T)", format=".3g")],
    ).properties(name="gibbs_bars", title=alt.Title(
        f"Gibbs posterior over T (β = {b.beta:g})", subtitle="the brushed bars hold the mass reported below"))
    views.append(gib)
    return _finish(alt.vconcat(*views, data=steps_frame(rep), spacing=24).resolve_scale(color="independent"))


def brushed_steps_index(rep, rng: tuple[float, float] | None) -> np.ndarray:
    """Indices into rep.T_grid of the steps inside the brush range."""
    return np.flatnonzero(_in_range(np.asarray(rep.T_grid, dtype=float), rng))


def brushed_steps_table(rep, idx: np.ndarray) -> pd.DataFrame:
    """One row per brushed T (values as text, 4 significant digits; "—" where not finite):
    ℓ_T (fixed σ̂), the plug-in bound, the query curves the report has, and ν_β(T)."""
    idx = np.asarray(idx, dtype=int)
    fr = steps_frame(rep).iloc[idx]

    def txt(col: str) -> list[str]:
        return [f"{v:.4g}" if np.isfinite(v) else "—" for v in fr[col].to_numpy(dtype=float)]

    out = pd.DataFrame({"T": fr["T"].astype(int).to_numpy(), "ℓ_T fixed σ̂": txt("ell_fixed"),
                        "plug-in bound": txt("bound")})
    for col, name in _error_series(rep).items():
        out[name] = txt(col)
    out["ν_β(T)"] = txt("gibbs")
    return out


def brushed_steps_summary(rep, idx: np.ndarray) -> dict[str, Any]:
    """Gibbs mass of the brushed T, the T with the lowest ℓ_T among them, and whether T_MAP lies
    in the brushed range."""
    idx = np.asarray(idx, dtype=int)
    if idx.size == 0:
        return {"gibbs_mass": 0.0, "best_T": None, "contains_t_map": False}
    T = np.asarray(rep.T_grid, dtype=float)[idx]
    ell = np.asarray(rep.theory.ell_fixed, dtype=float)[idx]
    return {"gibbs_mass": float(np.sum(np.asarray(rep.bounds.gibbs, dtype=float)[idx])),
            "best_T": int(T[int(np.nanargmin(ell))]) if np.any(np.isfinite(ell)) else None,
            "contains_t_map": bool(np.any(T == rep.theory.t_map_fixed))}
