"""The step count the dashboard recommends, calibrated (issue 16 item 3; DESIGN §10): whichever
step rule had the lowest held-out regret on the calibration suite for the prompt's family, applied
to THIS prompt.

* `prompt_statistics(lm, prompt, settings)` — this prompt's statistics exactly as the suite
  computes a record's (`calibration_tasks.calibration_statistics`): few-shot, the kernel of W_V in
  the last `settings.last_layers` layers; long context, W_Q of every layer with the model's own
  greedy answer as the query output (never the true answer); the suite's c and step grid
  0…T_max. The statistics are of this prompt's kernel, never copied from the suite.
* `rule_steps(rule, stats, t_max)` — the step count a rule of `calibration_report.rule_choices`
  gives on one prompt's statistics (the same arithmetic; None for the learned controller, whose
  weights a saved result does not hold).
* `calibration_advice(saved, prompt, stats, fallback)` — pure (no model): the recommended rule for
  the prompt's family (`calibration_tasks.prompt_family`), its held-out regret with CI, fixed
  T = 8's, the number of prompts behind it, the step count it gives here and the sentence; or,
  without a saved result or with too few prompts of the family (`stats.suite_verdict`'s rule:
  ≥ 20), the reason and today's recommendation (`fallback`, the steps verdict), labelled.
* `advice_for_prompt(lm, prompt, fallback)` — the latest saved result (`latest_calibration`),
  this prompt's statistics and the advice; `attach_calibration(report, lm, prompt)` adds it to a
  `diagnose` report as the optional "calibration" field when a saved result exists.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ttt_core.experiments.calibration_report import (
    ADAPT_P,
    POOLED,
    RULE_CONTROLLER,
    RULE_GIBBS,
    RULE_POSTERIOR,
    RULE_SKIP,
    RULE_T_MAP_FIXED,
    RULE_T_MAP_PROFILED,
    level_label,
    platt_apply,
    recommended_rule,
    verdict_prob,
    verdict_T,
)
from ttt_core.experiments.calibration_suite import latest_calibration, settings_from_dict
from ttt_core.experiments.calibration_tasks import CalibrationSettings, calibration_statistics, prompt_family
from ttt_core.experiments.stats import MIN_SUITE_TASKS, TOO_FEW, suite_verdict
from ttt_core.figure_data import json_clean
from ttt_core.fused_head import lm_head_mode
from ttt_core.models import LoadedModel
from ttt_core.prompt_kernel import PromptKernel, compute_prompt_kernel
from ttt_core.prompts import FewShotPrompt, LongContextPrompt, Prompt
from ttt_core.steps import block_kernel, select_blocks

FALLBACK_RULE = "today's recommendation: evidence T_MAP (fixed σ̂) with the §5.1 verdict, not calibrated"
NO_RESULT, TOO_FEW_PROMPTS, NO_RULE, CALIBRATED = "no calibration result", "too few prompts", "no rule", "calibrated"

#: kernel(prompt, subspace, max_positions) -> PromptKernel (the pages pass their session cache)
KernelFn = Callable[[Prompt, str, int], PromptKernel]


# ============================================================================================
# this prompt's statistics and a rule's step count on it
# ============================================================================================


def kernel_plan(prompt: Prompt, settings: CalibrationSettings) -> tuple[str, int | None, str]:
    """(subspace, last layers, words) of the kernel the suite's statistics use for such a prompt."""
    if isinstance(prompt, FewShotPrompt):
        ll = settings.last_layers
        return "v", ll, f"W_V, {'every layer' if ll is None else f'last {ll} layers'}"
    return "q", None, "W_Q, every layer, the model's own greedy answer as the query output"


def prompt_statistics(lm: LoadedModel, prompt: Prompt, settings: CalibrationSettings, *,
                      kernel: KernelFn | None = None) -> dict[str, Any]:
    """This prompt's statistics as the suite computes a record's (module docstring), from a fresh
    kernel (`kernel`, default `compute_prompt_kernel`), reading the LM head as the suite's records
    did (`settings.lm_head`)."""
    with lm_head_mode(settings.lm_head):
        return _prompt_statistics(lm, prompt, settings, kernel)


def _prompt_statistics(lm: LoadedModel, prompt: Prompt, settings: CalibrationSettings,
                       kernel: KernelFn | None) -> dict[str, Any]:
    subspace, last, _ = kernel_plan(prompt, settings)
    kern = kernel or (lambda p, s, m: compute_prompt_kernel(lm, p, s, max_positions=m))
    if isinstance(prompt, FewShotPrompt):
        ev = kern(prompt, subspace, settings.max_positions)
        K, kx = block_kernel(ev, select_blocks(ev, last))
    else:
        from ttt_core.token_view import greedy_answer

        own = greedy_answer(lm, prompt, max_new_tokens=8).strip() if prompt.question else ""
        p = LongContextPrompt(context=prompt.context, question=prompt.question, answer=own or None,
                              needle_spans=prompt.needle_spans)
        ev = kern(p, subspace, settings.max_positions)
        K, kx = ev.K, ev.k_x
    return calibration_statistics(K, ev.residuals, kx, int(ev.n), settings)


def rule_steps(rule: str, stats: dict[str, Any], t_max: int) -> tuple[int | None, str]:
    """(T, how) the rule gives on one prompt's statistics (`calibration_report.rule_choices`'s
    arithmetic); (None, why) for the learned controller or an unknown rule."""
    if rule == "ICL (T = 0)":
        return 0, "no update"
    if rule.startswith("fixed T = "):
        return int(rule.removeprefix("fixed T = ")), "a fixed step count"
    if rule == RULE_T_MAP_FIXED:
        return int(stats["t_map_fixed"]), "the evidence's T_MAP with σ̂² = ‖r‖²/n fixed"
    if rule == RULE_T_MAP_PROFILED:
        return int(stats["t_map_profiled"]), "the evidence's T_MAP with σ² profiled"
    if rule == RULE_GIBBS:
        nu = np.asarray(stats["gibbs"], dtype=float)
        mean = float(nu @ np.arange(nu.size)) if nu.size else 0.0
        return int(round(mean)), f"the mean {mean:.2f} of the Gibbs posterior ν over T (the rule draws T ~ ν)"
    if rule == RULE_POSTERIOR:
        t_fix = int(stats["t_map_fixed"])
        p = float(stats["prob_grid"][min(t_fix, t_max)])
        adapt = p >= ADAPT_P and t_fix > 0
        return (t_fix if adapt else 0), f"P(TTT beats ICL at T_MAP = {t_fix}) = {p:.2f} " + (
            f"≥ {ADAPT_P:g}: adapt" if adapt else f"< {ADAPT_P:g} (or T_MAP = 0): ICL")
    if rule == RULE_SKIP:
        beats = bool(stats["verdict_beats"])
        return (int(stats["t_map_profiled"]) if beats else 0), (
            "the plug-in verdict says TTT beats ICL at the profiled T_MAP" if beats else "the plug-in verdict says skip")
    if rule == RULE_CONTROLLER:
        return None, "a saved result holds the controller's test decisions, not its weights"
    return None, f"unknown rule {rule!r}"


def applicable(rule: str) -> bool:
    """Whether `rule_steps` can give the rule's step count on a new prompt."""
    return rule in APPLICABLE_RULES or rule == "ICL (T = 0)" or rule.startswith("fixed T = ")


APPLICABLE_RULES = (RULE_T_MAP_FIXED, RULE_T_MAP_PROFILED, RULE_GIBBS, RULE_POSTERIOR, RULE_SKIP)


# ============================================================================================
# the advice (pure)
# ============================================================================================


def _ci(r: dict[str, Any]) -> str:
    if r.get("ci_low") is None or r.get("ci_high") is None:
        return f"{r['regret']:.4f}"
    return f"{r['regret']:.4f} (95 % CI [{r['ci_low']:.4f}, {r['ci_high']:.4f}])"


def _unpack(saved: Any) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """(summary, file name, source) of `latest_calibration()`'s tuple, a summary dict, or None."""
    if saved is None:
        return None, None, None
    if isinstance(saved, dict):
        return saved, saved.get("path") and Path(saved["path"]).name, "saved"
    path, summary, source = saved
    return summary, Path(path).name, source


def recalibrated_verdict(report: dict[str, Any], stats: dict[str, Any] | None, t_max: int) -> dict[str, Any] | None:
    """This prompt's P(TTT beats ICL) as the suite computes it (at T⋆ = max(T_MAP fixed σ̂, 1), the
    suite's settings) and after the suite's Platt map (`calibration_report.verdict_recalibration`,
    fitted on its train split), with the map's held-out test numbers (pooled): what a probability of
    the verdict has meant on the calibration prompts. None without the map or the statistics."""
    recal = report.get("verdict_recalibration")
    if not recal or stats is None or not stats.get("prob_grid"):
        return None
    one = [{"stats": stats}]                      # the report's own T⋆ and P, on this prompt's statistics
    T, p = int(verdict_T(one, t_max)[0]), float(verdict_prob(one, t_max)[0])
    pooled = (recal.get("levels") or {}).get(POOLED, {})
    return {"T_star": T, "p_raw": p, "p": float(platt_apply(np.array([p]), recal["a"], recal["b"])[0]),
            "a": recal["a"], "b": recal["b"], "n_train": recal.get("n_train"),
            "train_base_rate": recal.get("train_base_rate"), "n_test": pooled.get("n"),
            "brier_raw": pooled.get("brier_raw"), "brier_recalibrated": pooled.get("brier_recalibrated"),
            "brier_base_rate": pooled.get("brier_base_rate")}


def calibration_advice(saved: Any, prompt: Prompt, stats: dict[str, Any] | None,
                       fallback: dict[str, Any] | None = None, *, model: str | None = None) -> dict[str, Any]:
    """The calibrated step recommendation for `prompt` (module docstring).

    `saved`: `latest_calibration()`'s (path, summary, source), a summary dict, or None. `stats`:
    this prompt's `prompt_statistics` under the saved settings (None: not computed). `fallback`:
    today's verdict (`steps.verdict`: "T_star", "text"). `model`: the dashboard's model, to say
    when the calibration was measured on another. Returns JSON-safe data: "status" (CALIBRATED,
    NO_RESULT, TOO_FEW_PROMPTS or NO_RULE), "recommended_T" and "recommended_by" (the rule, or
    FALLBACK_RULE), the rule's numbers when there is one, "sentence" and "notes"."""
    fam = prompt_family(prompt)
    fb = fallback or {}
    fb_T = fb.get("T_star")
    out: dict[str, Any] = {"family": fam, "status": NO_RESULT, "recommended_T": fb_T, "recommended_by": FALLBACK_RULE,
                           "fallback": {"rule": FALLBACK_RULE, "T": fb_T, "text": fb.get("text")}, "notes": []}
    fb_text = "" if fb_T is None else f"The dashboard falls back to T = {fb_T} ({FALLBACK_RULE})."

    def done(status: str, sentence: str, fell_back: bool = True) -> dict[str, Any]:
        out.update(status=status, sentence=" ".join(x for x in (sentence, fb_text if fell_back else "") if x)
                   + "".join(f" Note: {x}." for x in out["notes"]))
        return json_clean(out)

    summary, fname, source = _unpack(saved)
    if summary is None:
        return done(NO_RESULT, f"No calibration result yet: how often a step rule is right on prompts like this "
                               f"({fam}) has not been measured.")
    report = summary.get("report", {})
    settings = settings_from_dict(summary.get("settings", {}))
    out.update({"source": source, "file": fname, "created": summary.get("created"),
                "calibration_model": summary.get("model"), "n_prompts_suite": summary.get("n_prompts"),
                "settings": {"c": settings.c, "t_max": settings.t_max, "last_layers": settings.last_layers}})
    if model is not None and summary.get("model") not in (None, model):
        out["notes"].append(f"the calibration was measured on {summary.get('model')}, not on {model}")
    out["verdict_recalibrated"] = recalibrated_verdict(report, stats, settings.t_max)
    rec = recommended_rule(report, fam)
    level = None if rec is None else rec["level"]
    rows = [r for r in report.get("regret", {}).get("test", [])
            if r["level"] == level and r.get("regret") is not None and r.get("n")]
    if rec is None or level == POOLED or not rows:
        return done(NO_RULE, f"The calibration result ({fname}) has no held-out prompts like this ({fam}).")
    rows.sort(key=lambda r: (r["regret"], r.get("mean_T") or 0.0))
    best = next((r for r in rows if applicable(r["rule"])), rows[0])
    if best is not rows[0]:
        out["notes"].append(f"the rule {rows[0]['rule']} had a lower regret ({_ci(rows[0])}) but cannot be applied to a new "
                            f"prompt ({rule_steps(rows[0]['rule'], {}, 0)[1]}); the next best rule is used")
    ref_name = report.get("reference_rule", rec["reference_rule"])
    ref = next((r for r in rows if r["rule"] == ref_name), None)
    n = int(best["n"])
    vs = {k: best.get(f"vs_ref_{k}") for k in ("mean", "ci_low", "ci_high", "p")}
    v = suite_verdict({k: math.nan if x is None else x for k, x in vs.items()}, n, f"{best['rule']} beats {ref_name}",
                      f"{best['rule']} is worse than {ref_name}", ref_name)
    is_ref = ref is None or best["rule"] == ref_name
    out.update({"level": level, "level_label": level_label(level), "rule": best["rule"], "regret": best["regret"],
                "ci_low": best.get("ci_low"), "ci_high": best.get("ci_high"), "n": n, "split": "test",
                "reference_rule": ref_name, "reference_regret": None if ref is None else ref["regret"],
                "reference_ci_low": None if ref is None else ref.get("ci_low"),
                "reference_ci_high": None if ref is None else ref.get("ci_high"),
                "verdict_vs_reference": None if is_ref else v.text, "lowest_rule": rows[0]["rule"]})
    text = f"On prompts like this ({level_label(level)}), {best['rule']}'s regret was {_ci(best)} over {n} held-out prompts"
    text += "." if is_ref else f", {ref_name}'s {_ci(ref)}."
    if v.outcome == TOO_FEW:
        return done(TOO_FEW_PROMPTS, f"Too few prompts like this in the calibration result to choose a rule ({n} "
                                     f"held-out, a choice needs ≥ {MIN_SUITE_TASKS}). For the record, on{text[2:]}")
    fixed = best["rule"] == "ICL (T = 0)" or best["rule"].startswith("fixed T = ")
    if stats is None and not fixed:
        return done(NO_RULE, f"{text} This prompt's statistics could not be computed.")
    T, how = rule_steps(best["rule"], stats or {}, settings.t_max)
    basis = None if fixed else (f"this prompt's kernel ({kernel_plan(prompt, settings)[2]}; c = {settings.c:g}, "
                                f"grid 0…{settings.t_max})")
    out.update(recommended_T=T, recommended_by=best["rule"], steps_how=how, steps_basis=basis,
               stats=None if stats is None else {k: stats.get(k) for k in ("t_map_fixed", "t_map_profiled", "verdict_beats", "n_positions",
                                                "lambda_max", "rho")})
    vs_text = "" if is_ref else f" {best['rule']} vs {ref_name}: {v.text}."
    return done(CALIBRATED, f"{text}{vs_text} On this prompt {best['rule']} gives T = {T} ({how}"
                           + ("" if basis is None else f"; from {basis}") + ").",
                False)


# ============================================================================================
# with a model: the latest saved result, this prompt's statistics, the advice
# ============================================================================================


def advice_for_prompt(lm: LoadedModel, prompt: Prompt, fallback: dict[str, Any] | None = None, *,
                      saved: Any = "latest", kernel: KernelFn | None = None) -> dict[str, Any]:
    """`calibration_advice` for the latest saved result (`latest_calibration()`; or `saved`) with
    this prompt's statistics under its settings (computed only when there is a result)."""
    hit = latest_calibration() if isinstance(saved, str) and saved == "latest" else saved
    summary, _, _ = _unpack(hit)
    stats = None
    note = None
    if summary is not None:
        try:
            stats = prompt_statistics(lm, prompt, settings_from_dict(summary.get("settings", {})), kernel=kernel)
        except Exception as exc:  # noqa: BLE001 — the advice falls back and says why
            note = f"this prompt's statistics failed: {type(exc).__name__}: {exc}"
    out = calibration_advice(hit, prompt, stats, fallback, model=getattr(lm, "name", None))
    if note:
        out["notes"].append(note)
    return out


def attach_calibration(report: dict[str, Any], lm: LoadedModel, prompt: Prompt) -> dict[str, Any]:
    """The `diagnose` report with the optional "calibration" field (`advice_for_prompt`, today's
    recommendation = the report's verdict) when a saved calibration result exists; unchanged
    otherwise."""
    hit = latest_calibration()
    if hit is not None:
        try:
            report["calibration"] = advice_for_prompt(lm, prompt, report.get("verdict"), saved=hit)
        except Exception as exc:  # noqa: BLE001 — a broken saved result must not break the diagnosis
            report["calibration"] = {"status": "error", "file": Path(hit[0]).name,
                                     "sentence": f"The calibration result could not be read: {type(exc).__name__}: "
                                                 f"{exc}."}
    return report
