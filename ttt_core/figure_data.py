"""Reading a plotly figure back into data (issue 11): `figure_table` (one table: curves wide or
long, heatmaps one row per cell) and `figure_json` (every trace nested), both read FROM the figure
object (trace names, x / y / z arrays; plotly ≥ 6 "bdata" binary arrays decoded), so an export
cannot disagree with its chart. Re-exported by ttt_core.export, which wraps them in the envelope."""

from __future__ import annotations

import base64
import json
import math
import re
from typing import Any, Mapping

import numpy as np
import pandas as pd

_GRID_TYPES = ("heatmap", "contour")


def json_clean(o: Any) -> Any:
    """A JSON-safe copy: numpy → Python, tuples → lists, non-finite floats → None (the one such
    function: exports, figure data and the diagnose report use it)."""
    if isinstance(o, Mapping):
        return {str(k): json_clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_clean(v) for v in o]
    if isinstance(o, np.ndarray):
        return json_clean(o.tolist())
    if isinstance(o, (bool, np.bool_)):
        return bool(o)
    if isinstance(o, (int, np.integer)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(float(o)) else None
    if isinstance(o, np.str_):
        return str(o)
    return o


#: Column names of the main figures, by figure id (the chart's key; a prefix matches too, e.g.
#: "heads_heat" for every "heads_heat_<score>"). Keys: "x" / "y" (the axis columns), a trace name,
#: or "#i" (the i-th trace); anything not listed is named after its axis title or trace name.
COLUMNS: dict[str, dict[str, str]] = {
    "spec_scree": {"x": "mode", "#0": "eigenvalue", "#1": "cumulative_energy_fraction"},
    "spec_posterior": {"x": "lambda_star", "#0": "posterior_density_per_decade", "#1": "prior_density_per_decade"},
    "spec_snr": {"x": "mode", "#0": "snr_median", "#1": "snr_ci90_hi", "#2": "snr_ci90_lo"},
    "spec_align": {"x": "mode", "#0": "query_alignment_sq"},
    "spec_filter": {"x": "eigenvalue", "#0": "g_T_ttt", "#1": "g_star_bayes"},
    "spec_gap": {"x": "mode", "#0": "ttt_gap_contribution", "#1": "icl_gap_contribution"},
    "spec_gap_T": {"x": "T_steps", "#0": "ttt_gap_posterior_mean", "#1": "prob_ttt_beats_icl"},
    "steps_fig_error": {"x": "T_steps", "measured error": "measured_query_sq_error",
                        "linearised error": "linearised_query_sq_error", "ICL (T = 0)": "icl_T0",
                        "measured prediction": "measured_query_prediction",
                        "linearised prediction": "linearised_query_prediction",
                        "measured qTTT answer NLL": "measured_answer_nll_nats"},
    "steps_fig_prompt": {"x": "T_steps", "measured prompt MSE": "measured_prompt_mse",
                         "linearised prompt MSE": "linearised_prompt_mse"},
    "steps_fig_evidence": {"x": "T_steps", "#0": "ell_T_fixed_sigma", "#1": "ell_T_profiled_sigma",
                           "#2": "plug_in_bound", "#3": "plug_in_population_risk"},
    "steps_fig_gibbs": {"x": "T_steps", "#0": "gibbs_posterior_mass"},
    "heads_heat": {"x": "block", "y": "layer"},
    "sch_fig_choices": {"x": "chosen_T", "y": "tasks"},
    "heads_block_spectrum": {"x": "mode", "#0": "eigenvalue"},
    "heads_share": {"x": "block", "#0": "trace_share"},
    "heads_attention": {"x": "key_token", "y": "query_token", "#0": "attention_prob"},
    "qttt_loss": {"x": "step", "span NLL per token (before the step's update)": "span_nll_per_token",
                  "LOO loss ‖r‖²/(2σ̂²)": "loo_loss", "whole-context NLL per token": "context_nll_per_token"},
    "qttt_quality": {"x": "step", "query error (s_x − v(y))²": "query_sq_error", "P(expected answer)": "answer_prob",
                     "query prediction s_x": "query_prediction"},
    "qttt_needle": {"x": "step", "#0": "needle_attention_mass"},
    "qttt_time": {"x": "step", "#0": "backward_optimiser_s", "#1": "forward_metrics_s"},
    "qttt_labels": {"x": "label", "before": "prob_before", "after": "prob_after"},
    "qttt_delta": {"x": "step", "y": "layer", "#0": "delta_W_frobenius"},
}


def column_names(kind: str) -> dict[str, str]:
    """COLUMNS of figure id `kind`, or of its longest "_"-prefix listed there ({} if none)."""
    parts = kind.split("_")
    for n in range(len(parts), 0, -1):
        if "_".join(parts[:n]) in COLUMNS:
            return COLUMNS["_".join(parts[:n])]
    return {}


def _fig_dict(fig: Any) -> dict[str, Any]:
    if isinstance(fig, (str, bytes)):
        return json.loads(fig)
    if isinstance(fig, Mapping):
        return dict(fig)
    return fig.to_dict()  # a plotly Figure (plotly ≥ 6 writes numeric arrays as {"dtype", "bdata"})


def _array(v: Any) -> np.ndarray | None:
    """A plotly array (list, numpy, or {"dtype", "bdata", "shape"?}) → numpy (float when numeric,
    None → NaN; object for labels)."""
    if v is None:
        return None
    if isinstance(v, Mapping) and "bdata" in v:
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        a = a.astype(np.int64 if a.dtype.kind in "iu" else float)
        shape = v.get("shape")
        if shape is not None:
            a = a.reshape([int(s) for s in shape.split(",")] if isinstance(shape, str) else list(shape))
        return a
    if isinstance(v, (str, bytes)) or np.isscalar(v):
        return None
    if isinstance(v, np.ndarray) and v.dtype.kind in "fiub":
        return v.astype(np.int64 if v.dtype.kind in "iu" else float)
    a = np.asarray(v, dtype=object)
    if a.ndim and a.size and all(x is None or (isinstance(x, (int, float, np.number)) and not isinstance(x, bool))
                                 for x in a.ravel()):
        flat = a.ravel()
        if all(isinstance(x, (int, np.integer)) for x in flat):
            return np.array(flat.tolist(), dtype=np.int64).reshape(a.shape)
        return np.array([np.nan if x is None else x for x in flat], dtype=float).reshape(a.shape)
    if a.ndim and a.size and all(isinstance(x, (list, tuple, np.ndarray)) for x in a.ravel()[:1]):
        try:
            return np.array([[np.nan if x is None else x for x in row] for row in v], dtype=float)
        except (TypeError, ValueError):
            return a
    return a


def _title(obj: Any) -> str | None:
    t = obj.get("title") if isinstance(obj, Mapping) else None
    t = t.get("text") if isinstance(t, Mapping) else t
    return None if t is None else re.sub(r"<[^>]+>", " ", str(t)).strip()


def slug(text: str | None, strip_parentheses: bool = False) -> str:
    """A CSV column name from a trace name or axis title: word characters joined by "_" (axis
    titles lose their parenthesised remarks)."""
    s = text or ""
    if strip_parentheses:
        s = re.sub(r"\s*\([^)]*\)", "", s)
    return re.sub(r"[\W_]+", "_", s).strip("_")


def _axis(layout: Mapping[str, Any], ref: str | None, letter: str) -> tuple[str, dict]:
    ref = ref or letter
    name = f"{letter}axis{ref[1:]}"
    return ref, dict(layout.get(name) or {})


def _axis_doc(ax: Mapping[str, Any], letter: str, ref: str) -> str:
    t = _title(ax) or "(untitled)"
    return f'{letter} axis {ref} "{t}"' + (f" ({ax['type']} scale)" if ax.get("type") in ("log", "category") else "")


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out


def _lines(layout: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Reference lines (add_hline / add_vline shapes, with the annotation at their value) and the
    remaining annotation texts."""
    anns = [a for a in (layout.get("annotations") or []) if a.get("text")]
    used: set[int] = set()
    lines = []
    for s in layout.get("shapes") or []:
        if s.get("type", "line") != "line":
            continue
        xref, yref = str(s.get("xref", "x")), str(s.get("yref", "y"))
        if s.get("x0") == s.get("x1") and ("domain" in yref or yref == "paper"):
            orient, axis, value = "vertical", xref.split()[0], s.get("x0")
        elif s.get("y0") == s.get("y1") and ("domain" in xref or xref == "paper"):
            orient, axis, value = "horizontal", yref.split()[0], s.get("y0")
        else:
            continue
        label = None
        for i, a in enumerate(anns):
            at = a.get("x") if orient == "vertical" else a.get("y")
            ref = str(a.get("xref" if orient == "vertical" else "yref", "")).split()[0]
            if i not in used and ref == axis and at == value:
                used.add(i)
                label = re.sub(r"<[^>]+>", " ", str(a["text"]))
                break
        lines.append({"orientation": orient, "axis": axis, "value": json_clean(value), "label": label,
                      "dash": (s.get("line") or {}).get("dash")})
    rest = [re.sub(r"<[^>]+>", " ", str(a["text"])) for i, a in enumerate(anns) if i not in used]
    return lines, rest


def _panels(layout: Mapping[str, Any]) -> dict[str, str]:
    """x axis ref → its subplot title (make_subplots writes them as paper annotations over the
    panel's x domain)."""
    out = {}
    for k, ax in layout.items():
        if re.fullmatch(r"xaxis\d*", k) and isinstance(ax, Mapping) and ax.get("domain"):
            lo, hi = (float(v) for v in ax["domain"])
            for a in layout.get("annotations") or []:
                if (a.get("xref") == "paper" and a.get("yref") == "paper" and a.get("text")
                        and lo - 1e-9 <= float(a.get("x", -1.0)) <= hi + 1e-9):
                    out["x" + k[5:]] = re.sub(r"<[^>]+>", " ", str(a["text"]))
                    break
    return out


def _line_text(ln: Mapping[str, Any]) -> str:
    coord = ln["axis"] or ("x" if ln["orientation"] == "vertical" else "y")
    return f"{ln['orientation']} line at {coord} = {ln['value']}" + (f" — {ln['label']}" if ln["label"] else "")


def _xy(t: Mapping[str, Any]) -> tuple[np.ndarray | None, np.ndarray | None, str, str]:
    """(key, value, key axis ref, value axis ref) of an x/y trace; orientation "h" swaps roles."""
    x, y = _array(t.get("x")), _array(t.get("y"))
    n = len(y) if y is not None else (len(x) if x is not None else 0)
    if t.get("orientation") == "h":
        if y is None and x is not None:
            y = float(t.get("y0", 0)) + float(t.get("dy", 1)) * np.arange(len(x))
        return y, x, t.get("yaxis") or "y", t.get("xaxis") or "x"
    if x is None and y is not None:
        x = float(t.get("x0", 0)) + float(t.get("dx", 1)) * np.arange(n)
    return x, y, t.get("xaxis") or "x", t.get("yaxis") or "y"


def _extras(t: Mapping[str, Any], n: int) -> dict[str, np.ndarray]:
    out = {}
    for k in ("error_y", "error_x"):
        e = t.get(k) or {}
        for part, suffix in (("array", "error"), ("arrayminus", "error_minus")):
            a = _array(e.get(part))
            if a is not None and a.ndim == 1 and len(a) == n and e.get("visible", True) is not False:
                out[f"{k[-1]}_{suffix}" if k == "error_x" else suffix] = a
    for k in ("text", "customdata"):
        a = _array(t.get(k))
        if a is not None and len(a) == n:
            if a.ndim == 1:
                out[k] = a
            elif a.ndim == 2:
                out.update({f"{k}_{j}": a[:, j] for j in range(a.shape[1])})
    return out


def figure_table(fig: Any, columns: Mapping[str, str] | None = None) -> pd.DataFrame:
    """What a plotly figure draws, as one table read from the figure itself.

    * Curves / bars: one row per x value and one column per trace ("wide") when every trace's x
      values are distinct and lie among those of the longest trace; otherwise one row per point
      with a "trace" column ("long"). Error bars, text labels and customdata become extra columns.
    * Heatmaps: one row per cell (y, x, then one z column per heatmap when they share a grid, else
      a "trace" column); markers drawn over a heatmap are in `figure_json` only.
    Column names come from `columns` (keys "x", "y", a trace name or "#i"), else from the axis
    title (x / y columns) or the trace name. df.attrs documents every column (its trace and axis,
    with the axis scale), the title, the reference lines (hline / vline with their labels) and the
    other annotations; `csv_text` writes them as comment lines."""
    d = _fig_dict(fig)
    layout = d.get("layout") or {}
    cols = dict(columns or {})
    traces = list(d.get("data") or [])
    names = [str(t.get("name")) if t.get("name") not in (None, "") else None for t in traces]
    docs: dict[str, str] = {}
    lines, anns = _lines(layout)
    grid = [i for i, t in enumerate(traces) if t.get("type") in _GRID_TYPES and t.get("z") is not None]

    def trace_col(i: int, fallback: str) -> str:
        return cols.get(f"#{i}") or (cols.get(names[i]) if names[i] else None) or slug(names[i]) or fallback

    if grid:
        df = _grid_table(traces, grid, layout, cols, names, trace_col, docs)
    else:
        df = _xy_table(traces, layout, cols, names, trace_col, docs)
    df.attrs = {"title": _title(layout), "columns": {c: docs.get(c, "") for c in df.columns},
                "lines": [_line_text(ln) for ln in lines], "annotations": anns}
    return df


def _xy_table(traces, layout, cols, names, trace_col, docs) -> pd.DataFrame:
    items = []
    for i, t in enumerate(traces):
        k, v, kref, vref = _xy(t)
        if k is None or v is None or k.ndim != 1 or v.ndim != 1 or len(k) != len(v):
            continue
        items.append((i, t, k, v, kref, vref))
    if not items:
        return pd.DataFrame()
    longest = max(items, key=lambda it: len(it[2]))[2]
    pos = {}
    try:
        pos = {x: j for j, x in enumerate(longest.tolist())}
        wide = (len(pos) == len(longest) and len({it[4] for it in items}) == 1
                and all(len(set(it[2].tolist())) == len(it[2]) and all(x in pos for x in it[2].tolist())
                        for it in items)
                and not (longest.dtype == float and np.isnan(longest).any()))
    except TypeError:  # unhashable labels
        wide = False
    kref = items[0][4]
    kax = _axis(layout, kref, kref[0])[1]
    key_col = cols.get("x") or slug(_title(kax), True) or "x"
    docs[key_col] = _axis_doc(kax, kref[0], kref)
    if wide:
        out: dict[str, Any] = {key_col: longest}
        taken = [key_col]
        for i, t, k, v, _, vref in items:
            col = _unique(taken + [trace_col(i, f"trace_{i}")])[-1]
            taken.append(col)
            idx = np.array([pos[x] for x in k.tolist()], dtype=int)

            def place(a: np.ndarray) -> np.ndarray:
                if len(idx) == len(longest) and np.array_equal(idx, np.arange(len(longest))):
                    return a
                full = np.full(len(longest), None if a.dtype == object else np.nan,
                               dtype=object if a.dtype == object else float)
                full[idx] = a
                return full
            out[col] = place(v)
            vax = _axis(layout, vref, vref[0])[1]
            docs[col] = f'trace "{names[i] or f"#{i}"}" ({t.get("type", "scatter")}), {_axis_doc(vax, vref[0], vref)}'
            for ek, ea in _extras(t, len(k)).items():
                out[f"{col}_{ek}"] = place(ea)
                docs[f"{col}_{ek}"] = f'{ek} of trace "{names[i] or f"#{i}"}"'
        return pd.DataFrame(out)
    vrefs = {it[5] for it in items}
    first_vax = _axis(layout, items[0][5], items[0][5][0])[1]
    val_col = cols.get("y") or (slug(_title(first_vax), True) if len(vrefs) == 1 else "") or "y"
    if val_col == key_col:
        val_col = "y"
    rows: dict[str, list] = {"trace": [], key_col: [], val_col: []}
    krefs = {it[4] for it in items}
    multi_k = len(krefs) > 1
    panels = _panels(layout)
    if multi_k:
        rows["panel"] = []
    multi_v = len(vrefs) > 1 and not (multi_k and len(vrefs) <= len(krefs))
    if multi_v:
        rows["y_axis"] = []
    extra_keys = sorted({ek for it in items for ek in _extras(it[1], len(it[2]))})
    rows.update({ek: [] for ek in extra_keys})
    for i, t, k, v, kr, vr in items:
        ex = _extras(t, len(k))
        n = len(k)
        rows["trace"] += [trace_col(i, f"trace_{i}")] * n
        rows[key_col] += k.tolist()
        rows[val_col] += v.tolist()
        if multi_k:
            rows["panel"] += [panels.get(kr) or _title(_axis(layout, kr, kr[0])[1]) or kr] * n
        if multi_v:
            rows["y_axis"] += [_title(_axis(layout, vr, vr[0])[1]) or vr] * n
        for ek in extra_keys:
            rows[ek] += ex[ek].tolist() if ek in ex else [None] * n
    docs["trace"] = "which trace the point belongs to: " + "; ".join(
        f'{trace_col(i, f"trace_{i}")} = "{names[i] or f"#{i}"}"' for i, *_ in items)
    if multi_k:
        docs["panel"] = "which panel (subplot) the point is drawn in"
    if multi_v:
        docs["y_axis"] = "the y axis the value is read on"
    docs[val_col] = _axis_doc(first_vax, "y", items[0][5]) if len(vrefs) == 1 else "value on the trace's y axis (y_axis)"
    return pd.DataFrame(rows)


def _grid_table(traces, grid, layout, cols, names, trace_col, docs) -> pd.DataFrame:
    cells = []
    for i in grid:
        t = traces[i]
        z = _array(t.get("z"))
        z = np.atleast_2d(np.asarray(z, dtype=float) if z.dtype != object else z)
        ny, nx = z.shape
        x = _array(t.get("x"))
        y = _array(t.get("y"))
        x = float(t.get("x0", 0)) + float(t.get("dx", 1)) * np.arange(nx) if x is None else x
        y = float(t.get("y0", 0)) + float(t.get("dy", 1)) * np.arange(ny) if y is None else y
        cells.append((i, t, z, x, y))
    t0 = cells[0][1]
    xref, yref = t0.get("xaxis") or "x", t0.get("yaxis") or "y"
    xax, yax = _axis(layout, xref, "x")[1], _axis(layout, yref, "y")[1]
    x_col = cols.get("x") or slug(_title(xax), True) or "x"
    y_col = cols.get("y") or slug(_title(yax), True) or "y"
    if x_col == y_col:
        x_col, y_col = f"{x_col}_x", f"{y_col}_y"
    docs[x_col], docs[y_col] = _axis_doc(xax, "x", xref), _axis_doc(yax, "y", yref)
    same = all(c[2].shape == cells[0][2].shape and np.array_equal(c[3], cells[0][3]) and np.array_equal(c[4], cells[0][4])
               for c in cells)

    panels = _panels(layout)

    def zname(i: int, t: Mapping[str, Any]) -> str:
        return (trace_col(i, "") or slug(panels.get(t.get("xaxis") or "x")) or slug(_title(t.get("colorbar") or {}))
                or f"z_{i}")

    if same:
        _, _, z, x, y = cells[0]
        yy, xx = np.meshgrid(np.arange(len(y)), np.arange(len(x)), indexing="ij")
        out: dict[str, Any] = {y_col: np.asarray(y)[yy.ravel()], x_col: np.asarray(x)[xx.ravel()]}
        taken = [x_col, y_col]
        for i, t, zi, _, _ in cells:
            col = _unique(taken + [zname(i, t)])[-1]
            taken.append(col)
            out[col] = zi.ravel()
            docs[col] = f'heatmap "{names[i] or _title(t.get("colorbar") or {}) or f"#{i}"}" value (colour)'
        return pd.DataFrame(out)
    frames = []
    for i, t, z, x, y in cells:
        yy, xx = np.meshgrid(np.arange(len(y)), np.arange(len(x)), indexing="ij")
        frames.append(pd.DataFrame({"trace": zname(i, t), y_col: np.asarray(y)[yy.ravel()],
                                    x_col: np.asarray(x)[xx.ravel()], "z": z.ravel()}))
    docs["trace"], docs["z"] = "which heatmap the cell belongs to", "the cell's value (colour)"
    return pd.concat(frames, ignore_index=True)


def figure_json(fig: Any) -> dict[str, Any]:
    """Everything a figure draws, nested: title, axes (title, scale), every trace (name, type,
    axes, x / y / z, error bars, text, customdata as plain lists), reference lines, annotations."""
    d = _fig_dict(fig)
    layout = d.get("layout") or {}
    axes = {k: {"title": _title(v), "type": v.get("type")} for k, v in layout.items()
            if re.fullmatch(r"[xy]axis\d*", k) and isinstance(v, Mapping)}
    out_traces = []
    for i, t in enumerate(d.get("data") or []):
        tr: dict[str, Any] = {"name": t.get("name"), "type": t.get("type", "scatter"),
                              "xaxis": t.get("xaxis") or "x", "yaxis": t.get("yaxis") or "y"}
        for k in ("mode", "orientation", "fill"):
            if t.get(k) is not None:
                tr[k] = t[k]
        for k in ("x", "y", "z", "text", "customdata"):
            a = _array(t.get(k))
            if a is not None:
                tr[k] = a.tolist()
            elif isinstance(t.get(k), str) and k == "text":
                tr[k] = t[k]
        for k in ("error_y", "error_x"):
            e = t.get(k) or {}
            if _array(e.get("array")) is not None:
                tr[k] = {p: _array(e[p]).tolist() for p in ("array", "arrayminus") if _array(e.get(p)) is not None}
        if t.get("type") in _GRID_TYPES and isinstance(t.get("colorbar"), Mapping):
            tr["colorbar_title"] = _title(t["colorbar"])
        out_traces.append(tr)
    lines, anns = _lines(layout)
    return json_clean({"title": _title(layout), "axes": axes, "traces": out_traces, "lines": lines, "annotations": anns})
