"""Markdown and CSV of a target comparison (`TargetComparison.to_dict()`), for the CLI and the
Targets page's downloads."""

from __future__ import annotations

import csv
import io
from typing import Any

COLUMNS = ("target", "signal", "route", "params", "kernel", "effective_rank", "lambda_star", "lambda_star_lo",
           "lambda_star_hi", "verdict", "P(TTT beats ICL)", "top_blocks", "error_start", "error_end", "delta_error",
           "seeds", "seconds", "step_seconds", "flops_per_step", "peak_memory_MB", "status", "note")


def _f(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def comparison_markdown(d: dict[str, Any]) -> str:
    """A Markdown summary: settings, the winner sentence, the table, how costs were measured."""
    s = d["settings"]
    lines = [f"# Which parameters and which signal? — {d['model']}", "",
             f"* Prompt: {d['prompt_kind']}; measured: {d['error_label']} after {d['steps']} steps; seeds "
             f"{d['seeds']}; lr {s['lr']:g}, span {s['span']}, {s['optimiser']}.",
             f"* **{d['sentence']}**", "",
             "| target | signal | params | eff. rank | λ⋆ [90 %] | verdict (P) | top blocks | Δ error | s/step | "
             "FLOPs/step | peak MB | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["table"]:
        lam = "—" if r["lambda_star"] is None else f"{_f(r['lambda_star'])} [{_f(r['lambda_star_lo'])}, {_f(r['lambda_star_hi'])}]"
        verdict = "kernel unavailable" if r["kernel"] == "unavailable" else (
            "—" if r["verdict"] is None else f"{r['verdict']} ({_f(r['P(TTT beats ICL)'])})")
        lines.append(f"| {r['target']} | {r['signal']} | {_f(r['params'])} | {_f(r['effective_rank'])} | {lam} | "
                     f"{verdict} | {r['top_blocks'] or '—'} | {_f(r['delta_error'])} | {_f(r['step_seconds'])} | "
                     f"{_f(r['flops_per_step'])} | {_f(r['peak_memory_MB'])} | {r['status']} |")
    notes = [f"* {r['target']} / {r['signal']}: {r['note']}" for r in d["table"] if r.get("note")]
    lines += ["", f"FLOPs: {d['flops_method']}. Memory: {d['memory_method']}."]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def comparison_csv(d: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore")
    w.writeheader()
    for r in d["table"]:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    return buf.getvalue()
