"""Saved runs side by side (issue 11.5): the curves a run offers for comparison (metric → (x, y)),
the difference of two curves and the table of final metrics with differences. Pure data over
`ttt_core.export.SavedRun` (duck-typed: kind, data, settings, label, created, model,
prompt_sha256); the overlay figures are ttt_core.figures.compare."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

#: Live qTTT curves: key → label. "loss" is qTTT's span NLL per token (steps ≥ 1, as the page's
#: loss chart) or paper mode's leave-one-out loss (every step).
QTTT_METRICS = {"loss": "training loss", "query_error": "query error (s_x − v(y))²",
                "answer_nll": "answer NLL (nats)", "answer_prob": "P(expected answer)",
                "query_prediction": "query prediction s_x", "needle_mass": "needle attention mass",
                "context_nll": "whole-context NLL per token", "wall_s": "seconds per step"}
#: Steps & bounds curves over T: label → path into StepsReport.to_dict().
STEPS_METRICS = {"measured error": ("measured", "error"), "linearised error": ("linearised", "error"),
                 "measured prediction": ("measured", "prediction"),
                 "linearised prediction": ("linearised", "prediction"),
                 "measured answer NLL": ("measured", "answer_nll"),
                 "measured prompt MSE": ("measured", "prompt_mse"),
                 "linearised prompt MSE": ("linearised", "prompt_mse"),
                 "ℓ_T fixed σ̂": ("evidence", "ell_fixed"), "ℓ_T profiled σ": ("evidence", "ell_profiled"),
                 "plug-in bound ℓ_T + slack": ("pac_bayes", "bound"),
                 "Gibbs posterior ν_β(T)": ("pac_bayes", "gibbs")}
_QUALITY = ("query_error", "answer_nll", "answer_prob", "query_prediction")
_STEPS_MAIN = ("measured error", "measured answer NLL", "linearised error", "measured prediction",
               "linearised prediction")
def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ------------------------------------------------------------------------------------------ curves
def run_metrics(run: Any) -> dict[str, tuple[list[float], list[float]]]:
    """Every curve of a saved run with at least one finite value: label → (x, y). Live qTTT: x =
    step (diverged records left out, as the page's charts do); Steps & bounds: x = T."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    d = run.data
    if run.kind == "qttt_run":
        recs = [r for r in d["records"] if r.get("status") != "diverged"]
        mode = recs[0]["mode"] if recs else "qttt"
        for key, label in QTTT_METRICS.items():
            if key == "loss":
                pts = [(r["step"], r.get("loss_per_token")) for r in recs if r["step"]] if mode == "qttt" else \
                    [(r["step"], r.get("loss")) for r in recs]
            else:
                pts = [(r["step"], r.get(key)) for r in recs if key != "wall_s" or r["step"]]
            pts = [(float(x), float(y)) for x, y in pts if _is_num(y) and math.isfinite(y)]
            if pts:
                out[label] = ([p[0] for p in pts], [p[1] for p in pts])
        return out
    T = [float(t) for t in d["T_grid"]]
    for label, (part, key) in STEPS_METRICS.items():
        ys = (d.get(part) or {}).get(key)
        if ys:
            pts = [(t, float(y)) for t, y in zip(T, ys) if _is_num(y) and math.isfinite(y)]
            if pts:
                out[label] = ([p[0] for p in pts], [p[1] for p in pts])
    return out


def x_title(run: Any) -> str:
    return "step" if run.kind == "qttt_run" else "steps T"


def default_metrics(run: Any) -> list[str]:
    """The curves compared by default: the loss and the query's error measure (Live qTTT), or the
    main error curve and the evidence ℓ_T (Steps & bounds)."""
    have = run_metrics(run)
    if run.kind == "qttt_run":
        main = [QTTT_METRICS["loss"]] + [QTTT_METRICS[k] for k in _QUALITY if QTTT_METRICS[k] in have][:1]
    else:
        main = [m for m in _STEPS_MAIN if m in have][:1] + ["ℓ_T fixed σ̂"]
    return [m for m in main if m in have]


def series_difference(a: tuple[Sequence[float], Sequence[float]],
                      b: tuple[Sequence[float], Sequence[float]]) -> tuple[list[float], list[float]]:
    """A − B on the x values both curves have (in A's order)."""
    bx = {float(x): float(y) for x, y in zip(*b)}
    pts = [(float(x), float(y) - bx[float(x)]) for x, y in zip(*a) if float(x) in bx]
    return [p[0] for p in pts], [p[1] for p in pts]


def unique_labels(runs: Sequence[Any]) -> list[str]:
    """Run labels made distinct ("name", "name (2)", …)."""
    seen: dict[str, int] = {}
    out = []
    for r in runs:
        base = r.label or r.created
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base} ({seen[base]})")
    return out


def _finals(run: Any) -> dict[str, float | None]:
    d = run.data
    out: dict[str, float | None] = {}
    curves = run_metrics(run)
    if run.kind == "qttt_run":
        recs = d["records"]
        out["steps run"] = float(max(0, len(recs) - 1))
        for label, (_, ys) in curves.items():
            if label != QTTT_METRICS["wall_s"]:
                out[f"final {label}"] = ys[-1]
        out["total seconds"] = recs[-1].get("elapsed_s")
        return out
    ev, pb, v = d.get("evidence") or {}, d.get("pac_bayes") or {}, d.get("verdict") or {}
    post = (d.get("posterior") or {}).get("lambda_star") or {}
    out.update({"T_MAP (fixed σ̂)": ev.get("t_map_fixed"), "T_MAP (profiled σ)": ev.get("t_map_profiled"),
                "measured best T": v.get("measured_best_T"), "P(TTT beats ICL)": v.get("prob_ttt_beats_icl"),
                "plug-in slack": pb.get("slack"), "λ⋆ (posterior median)": post.get("median"),
                "ICL error": d.get("icl_error"), "n (supervised outputs)": d.get("n")})
    for label in ("measured error", "linearised error", "measured answer NLL"):
        if label in curves:
            out[f"min {label}"] = min(curves[label][1])
    return out


def compare_table(runs: Sequence[Any]) -> list[dict[str, Any]]:
    """Final metrics, one row per metric: the value of every run (columns = unique run labels)
    and, for every other run B, "A − B" with A = the first run. Numbers only (None = not
    available), so the table is one numeric column per run."""
    labels = unique_labels(runs)
    finals = [_finals(r) for r in runs]
    keys = list(dict.fromkeys(k for f in finals for k in f))
    rows = []
    for k in keys:
        vals = [f.get(k) for f in finals]
        row: dict[str, Any] = {"metric": k}
        row.update({lab: (None if v is None else float(v)) for lab, v in zip(labels, vals)})
        for lab, v in zip(labels[1:], vals[1:]):
            a = vals[0]
            row[f"{labels[0]} − {lab}"] = float(a) - float(v) if _is_num(a) and _is_num(v) else None
        rows.append(row)
    return rows


def runs_overview(runs: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per run: label, kind details, model, whether its prompt is the first run's, when."""
    labels = unique_labels(runs)
    ref = runs[0].prompt_sha256 if runs else None
    out = []
    for lab, r in zip(labels, runs):
        s = r.settings
        what = (f"{s.get('mode', '?')}, {r.data.get('status', '?')}" if r.kind == "qttt_run"
                else f"{s.get('subspace', '?')}, c = {s.get('c', '?')}, grid 0…{s.get('grid_max', '?')}")
        out.append({"run": lab, "what": what, "model": r.model or "—",
                    "same prompt as the first": "yes" if r.prompt_sha256 == ref else "no",
                    "prompt sha256": (r.prompt_sha256 or "—")[:12], "created (UTC)": r.created})
    return out


def as_arrays(xy: tuple[Sequence[float], Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(xy[0], dtype=float), np.asarray(xy[1], dtype=float)
