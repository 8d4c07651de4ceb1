"""The `diagnose` report: one JSON object (and its Markdown) saying, for one prompt, when to adapt,
how far and which blocks (keys documented in README.md, section "diagnose report"). The CLI's
`diagnose`, and the pages' downloads, build it here."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import transformers

import ttt_core
from ttt_core.figure_data import json_clean
from ttt_core.models import LoadedModel
from ttt_core.posterior_verdict import posterior_dict
from ttt_core.prompt_kernel import compute_prompt_kernel, subspace_label
from ttt_core.prompts import Prompt
from ttt_core.score_check import check_scores
from ttt_core.scores import score_blocks
from ttt_core.spectrum import compute_spectrum
from ttt_core.steps import StepsSettings, block_kernel, compute_steps, select_blocks
from ttt_core.types import Progress


def diagnose_report(lm: LoadedModel, prompt: Prompt, *, subspace: str = "q", c: float = 0.1, grid: int = 30,
                    delta: float = 0.05, top_k: int = 8, last_layers: int | None = None,
                    max_positions: int = 256, check: bool = False, check_k: int = 3, check_steps: int = 4,
                    check_random: int = 5, check_seed: int = 0, progress: Progress = None) -> dict[str, Any]:
    """The `diagnose` report (keys documented in README.md, section "diagnose report").

    When: P(TTT beats ICL) over the λ⋆ posterior (DESIGN §5.1) on the query Bayes gap (prompt-value
    excess risk without a query), with the expected gaps and their 90 % intervals.
    How far: evidence curves ℓ_T (fixed σ̂, profiled σ), T_MAP, the Gibbs posterior over T, the
    plug-in PAC-Bayes slack at the posterior median with its interval.
    Which: Query-Aware / Trace scores (ridge λ⋆) of every block of the subspace and the top-k.
    The kernel is that of every block of the subspace (or of the last `last_layers` layers).
    With `check`, "check" holds `score_check.check_scores` of the ranked score (top-`check_k`,
    bottom-`check_k` and `check_random` random subsets, `check_steps` steps of real TTT, ρ = c/λ_max)
    as plain data with its "summary" sentence (DESIGN §6, §10). `progress(fraction, text)` is told
    how far it is (the report itself does not depend on it)."""
    def tell(frac: float, text: str) -> None:
        if progress is not None:
            progress(min(max(float(frac), 0.0), 1.0), text)

    t0 = time.perf_counter()
    ev = compute_prompt_kernel(lm, prompt, subspace, max_positions=max_positions,
                               progress=None if progress is None else (lambda f, t: tell(0.6 * f, t)))
    tell(0.6, "Evidence, spectrum and bounds…")
    t1 = time.perf_counter()
    st = StepsSettings(subspace=subspace, c=c, grid_max=grid, delta=delta, last_layers=last_layers, measure=False)
    rep = compute_steps(lm, prompt, st, ev=ev)
    blocks = select_blocks(ev, last_layers)
    K, kx = block_kernel(ev, blocks)
    tc, b = rep.theory, rep.bounds
    spec = compute_spectrum(K, ev.residuals, kx, T=float(tc.t_map_fixed), c=c, T_grid=tc.T_grid,
                            posterior=tc.posterior)
    t2 = time.perf_counter()
    tell(0.75, "Scoring every block…")
    has_q = ev.head_couplings is not None
    sc = score_blocks(ev, greedy_budget=top_k if has_q else 0, greedy_c=c, top_k=top_k,
                      posterior=tc.posterior if last_layers is None else None)  # same K: reuse its posterior
    rank_by = "Query-Aware" if has_q else "Trace"
    ranked = sc.ranked(rank_by)
    t3 = time.perf_counter()
    chk = None
    if check:
        tell(0.85, "Checking the scores against real TTT…")
        chk = check_scores(lm, prompt, ev, sc, k=check_k, steps=check_steps, c=c, random_subsets=check_random,
                           seed=check_seed, score=rank_by,
                           progress=None if progress is None else (lambda f, t: tell(0.85 + 0.15 * f, t))).to_dict()
    t4 = time.perf_counter()
    tell(1.0, "Diagnosis ready.")
    q = ev.query
    tm = tc.t_map_fixed
    lam = tc.lam
    return json_clean({
        "ttt_lens_diagnose": 2,
        "model": lm.name,
        "prompt_kind": ev.prompt_kind,
        "n_positions": ev.n,
        "subspace": subspace,
        "subspace_label": subspace_label(subspace),
        "blocks": rep.blocks_label,
        "route": ev.route,
        "query": None if q is None else {"label": q.label, "value": q.value, "target": q.target, "error": q.error,
                                         "nll": q.nll},
        "query_note": ev.query_note,
        "eigenvalues": lam,
        "effective_rank": {"entropy": spec.eff_rank_entropy, "participation_ratio": spec.participation_ratio},
        "tau2": tc.tau2,
        "sigma2": tc.sigma2,
        "lambda_star": tc.lambda_star,
        "lambda_star_ci90": list(spec.lam_star_ci),
        "snr": spec.snr,
        "snr_ci90": [spec.snr_lo, spec.snr_hi],
        "posterior": posterior_dict(tc.posterior),
        "flags": [f for f in (tc.posterior.flag_text,) if f],
        "c": c,
        "rho": tc.rho,
        "lambda_max": float(lam[0]) if lam.size else 0.0,
        "t_map": tm,
        "when": {"criterion": spec.criterion, "T": tm, "prob_ttt_beats_icl": spec.prob, "decision": spec.decision,
                 "gap_ttt": spec.gap_ttt, "gap_ttt_ci90": list(spec.gap_ttt_ci), "gap_icl": spec.gap_icl,
                 "gap_icl_ci90": list(spec.gap_icl_ci), "best_T_expected_gap": spec.best_T,
                 "gap_grid": spec.gap_grid, "prob_grid": spec.prob_grid, "verdict": spec.verdict,
                 "basis": "posterior over λ⋆ (DESIGN §5.1)"},
        "how_far": {"T_grid": tc.T_grid.astype(int).tolist(), "ell_fixed": tc.ell_fixed, "ell_profiled": tc.ell_profiled,
                    "sigma2_hat": tc.sigma2_hat, "t_map_fixed": tc.t_map_fixed, "t_map_profiled": tc.t_map_profiled,
                    "gibbs": {"beta": b.beta, "posterior": b.gibbs, "mean_T": b.gibbs_mean_T},
                    "pac_bayes": {"plug_in": True, "label": "plug-in PAC-Bayes bound (estimate), Σ⋆ ≈ τ̂²K + σ̂²I "
                                  "at the posterior medians", "delta": delta, "v_bar": b.v_bar, "slack": b.slack,
                                  "slack_ci90": list(b.slack_ci),
                                  "bound_at_t_map": float(tc.ell_fixed[int(np.argmin(tc.ell_fixed))] + b.slack)}},
        "which": {"ranked_by": rank_by, "ridge": sc.ridge, "ridge_source": sc.ridge_source,
                  "top_k": [r["block"] for r in ranked[:top_k]],
                  "greedy_query_aware": None if not sc.greedy else [ev.block_label(g.block) for g in sc.greedy],
                  "scores": ranked},
        "verdict": rep.verdict,
        "unavailable": rep.unavailable,
        **({"check": chk} if chk is not None else {}),
        "timings": {"evidence_s": t1 - t0, "spectrum_steps_s": t2 - t1, "scores_s": t3 - t2,
                    **({"check_s": t4 - t3} if chk is not None else {}), "total_s": t4 - t0},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "ttt_lens": ttt_core.__version__},
    })


def diagnose_markdown(r: dict[str, Any]) -> str:
    """Human summary of a diagnose report."""
    def f(x: Any) -> str:
        return "∞" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))

    def na(x: Any) -> str:
        return "n/a" if x is None else f(x)

    def ci(pair: list) -> str:
        return f"[{f(pair[0])}, {f(pair[1])}]"

    w, h, wh, v = r["when"], r["how_far"], r["which"], r["verdict"]
    pb = h["pac_bayes"]
    ml = r["posterior"]["maximum_likelihood"]
    lines = [
        f"# TTT Lens diagnosis — {r['model']}",
        "",
        f"* Prompt: {r['prompt_kind'].replace('_', ' ')}, n = {r['n_positions']} supervised positions; "
        f"subspace {r['subspace_label']} ({r['blocks']}).",
        f"* Spectrum: λ_max = {f(r['lambda_max'])}, effective rank {r['effective_rank']['entropy']:.2f}.",
        f"* Noise-to-signal ratio (posterior median, 90 % interval): λ⋆ = {f(r['lambda_star'])} "
        f"{ci(r['lambda_star_ci90'])}; τ² = {f(r['tau2'])}, σ² = {f(r['sigma2'])}. Maximum likelihood (reference "
        f"only): τ² = {f(ml['tau2'])}, σ² = {f(ml['sigma2'])}, λ⋆ = {f(ml['lambda_star'])}.",
    ]
    lines += [f"* **Flag:** {x}." for x in r.get("flags", [])]
    lines += [
        f"* **Verdict: {v['text']}**",
        "",
        "## When",
        f"{w['verdict']}. Expected {w['criterion']}: TTT {f(w['gap_ttt'])} {ci(w['gap_ttt_ci90'])} vs ICL "
        f"{f(w['gap_icl'])} {ci(w['gap_icl_ci90'])} at T = {w['T']}; lowest expected gap on the grid at "
        f"T = {f(w['best_T_expected_gap'])}.",
        "",
        "## How far",
        f"T_MAP = {h['t_map_fixed']} (fixed σ̂² = {f(h['sigma2_hat'])}), {h['t_map_profiled']} (σ profiled); Gibbs "
        f"posterior over T: mean {f(h['gibbs']['mean_T'])}; ρ = c/λ_max = {f(r['rho'])} (c = {r['c']}). "
        f"{pb['label']}: slack {f(pb['slack'])} {ci(pb['slack_ci90'])} at δ = {pb['delta']} (v̄ = {f(pb['v_bar'])}), "
        f"bound {f(pb['bound_at_t_map'])}.",
        "",
        "## Which",
        f"Top {len(wh['top_k'])} by {wh['ranked_by']} (ridge λ⋆ = {f(wh['ridge'])}): {', '.join(wh['top_k'])}.",
    ]
    if wh.get("greedy_query_aware"):
        lines.append(f"Greedy Query-Aware order: {', '.join(wh['greedy_query_aware'])}.")
    if r.get("calibration"):
        cal = r["calibration"]
        head = "" if cal.get("recommended_T") is None else \
            f"Recommended T = {cal['recommended_T']} ({cal.get('recommended_by')}). "
        lines += ["", "## Calibrated step count", head + str(cal.get("sentence", ""))]
    if r.get("check"):
        ck = r["check"]
        lines += ["", "## Check against real TTT", ck["summary"]]
        if ck.get("subsets"):
            lines += ["", f"| subset | blocks | measured Δ {ck['measured_label']} | linearised Δ {ck['predicted_label']} |",
                      "|---|---|---|---|"]
            lines += [f"| {s['label']} | {', '.join(s['blocks'])} | {na(s['measured'])} | {na(s['predicted'])} |"
                      for s in ck["subsets"]]
    if r.get("query_note"):
        lines += ["", f"Note: {r['query_note']}"]
    if r.get("unavailable"):
        lines += ["", "Not available: " + "; ".join(f"{k} — {why}" for k, why in r["unavailable"].items())]
    lines += ["", f"Timings: {r['timings']['total_s']:.1f} s. Versions: "
              + ", ".join(f"{k} {val}" for k, val in r["versions"].items()) + "."]
    return "\n".join(lines) + "\n"
