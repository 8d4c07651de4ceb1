"""The calibrated step recommendation (issue 16 item 3; DESIGN §10) on a hand-made small saved
result: the rule with the lowest held-out regret for the prompt's family, its regret and CI, fixed
T = 8's, the number of prompts, and the step count it gives on THIS prompt's statistics; the
fallback to today's recommendation without a result, with too few prompts, or for a family the
suite lacks. Also: a rule's step count is `calibration_report.rule_choices`'s, this prompt's
statistics equal a suite record's on the tiny model, and the diagnose report gets the optional
"calibration" field only with a saved result."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch

from tests.unit.experiments.test_calibration_report import SETTINGS, synthetic_records
from ttt_core.experiments import calibration_advice as A
from ttt_core.experiments import calibration_suite as CS
from ttt_core.experiments import calibration_tasks as CT
from ttt_core.experiments.calibration_report import (
    RULE_CONTROLLER,
    RULE_GIBBS,
    RULE_POSTERIOR,
    RULE_SKIP,
    RULE_T_MAP_FIXED,
    RULE_T_MAP_PROFILED,
    calibration_report,
    recommended_rule,
    rule_choices,
)
from ttt_core.experiments.store import write_json
from ttt_core.prompts import LongContextPrompt, parse_prompt

SHIFT = parse_prompt("1 -> 2\n3 -> 4\n5 -> 6\n7 -> 8\n2 ->")          # "digit shift" → shift_clean_arrow
WORDS = parse_prompt("pear -> fruit\ndog -> animal\nbus -> vehicle\napple ->")   # "word map": not in the suite
FALLBACK = {"T_star": 5, "text": "Adapt: T* = 5 steps (evidence T_MAP, fixed σ̂)."}


def _row(rule: str, level: str, n: int, regret: float, lo: float, hi: float, mean_T: float = 4.0, **kw) -> dict:
    return {"rule": rule, "level": level, "n": n, "regret": regret, "ci_low": lo, "ci_high": hi, "mean_T": mean_T,
            "mean_error": regret + 0.1, "decided_by": "x", **kw}


def hand_summary(n_shift: int = 24, n_trap: int = 6) -> dict:
    """A saved result whose held-out table is written by hand: on shift_clean_arrow the learned
    controller is lowest, then T_MAP (fixed σ̂²), then fixed T = 8; trap_noise has few prompts."""
    vs = dict(vs_ref_mean=0.02, vs_ref_ci_low=0.01, vs_ref_ci_high=0.03, vs_ref_p=0.001)
    test = [
        _row("ICL (T = 0)", "shift_clean_arrow", n_shift, 0.20, 0.15, 0.25, 0.0, **vs),
        _row("fixed T = 8", "shift_clean_arrow", n_shift, 0.031, 0.02, 0.04, 8.0),
        _row(RULE_T_MAP_FIXED, "shift_clean_arrow", n_shift, 0.0112, 0.006, 0.017, 5.0, **vs,
             vs_ref_verdict="T_MAP (fixed σ̂²) beats fixed T = 8"),
        _row(RULE_CONTROLLER, "shift_clean_arrow", n_shift, 0.0050, 0.001, 0.009, 6.0, **vs),
        _row("fixed T = 8", "trap_noise", n_trap, 0.05, 0.03, 0.07, 8.0),
        _row("ICL (T = 0)", "trap_noise", n_trap, 0.001, 0.0, 0.002, 0.0, **vs),
        _row("fixed T = 8", "all prompts", n_shift + n_trap, 0.035, 0.02, 0.05, 8.0),
    ]
    report = {"regret": {"test": test, "all": test}, "reference_rule": "fixed T = 8"}
    return {"kind": "calibration", "format": "ttt_lens_calibration/1", "created": "2026-01-01T00:00:00+00:00",
            "settings": asdict(SETTINGS), "model": SETTINGS.model, "n_prompts": 80, "report": report}


def stats(t_fix: int = 3, t_pro: int = 2, p: float = 0.95, beats: bool = True) -> dict:
    nu = np.zeros(SETTINGS.t_max + 1)
    nu[[2, 6]] = 0.5                                          # Gibbs mean 4
    return {"t_map_fixed": float(t_fix), "t_map_profiled": float(t_pro), "verdict_beats": beats,
            "prob_grid": [0.0] + [p] * SETTINGS.t_max, "gibbs": nu.tolist(), "n_positions": 4, "lambda_max": 2.0,
            "rho": 0.05}


def test_the_lowest_regret_rule_of_the_family_applied_to_this_prompt() -> None:
    adv = A.calibration_advice(hand_summary(), SHIFT, stats(t_fix=3), FALLBACK)
    assert adv["status"] == A.CALIBRATED and adv["family"] == "digit shift" and adv["level"] == "shift_clean_arrow"
    # the controller was lower but cannot be applied to a new prompt: the next best, said so
    assert adv["lowest_rule"] == RULE_CONTROLLER and adv["rule"] == RULE_T_MAP_FIXED
    assert any("the rule learned controller had a lower regret" in n for n in adv["notes"])
    assert (adv["regret"], adv["ci_low"], adv["ci_high"], adv["n"]) == (0.0112, 0.006, 0.017, 24)
    assert adv["reference_rule"] == "fixed T = 8" and adv["reference_regret"] == 0.031
    assert adv["recommended_T"] == 3 and adv["recommended_by"] == RULE_T_MAP_FIXED    # THIS prompt's T_MAP
    s = adv["sentence"]
    assert s.startswith('On prompts like this (digit shift, clean, "x->y"), T_MAP (fixed σ̂²)\'s regret was 0.0112 '
                        "(95 % CI [0.0060, 0.0170]) over 24 held-out prompts, fixed T = 8's 0.0310 (95 % CI [0.0200, "
                        "0.0400]).")
    assert "gives T = 3" in s and "W_V, last 4 layers" in s and "T = 5" not in s      # not the fallback
    json.dumps(adv, allow_nan=False)
    # the step count is this prompt's, never the suite's
    assert A.calibration_advice(hand_summary(), SHIFT, stats(t_fix=7), FALLBACK)["recommended_T"] == 7


def test_without_a_result_or_with_too_few_prompts_it_falls_back_labelled() -> None:
    none = A.calibration_advice(None, SHIFT, None, FALLBACK)
    assert none["status"] == A.NO_RESULT and none["recommended_T"] == 5 and none["recommended_by"] == A.FALLBACK_RULE
    assert "No calibration result yet" in none["sentence"] and A.FALLBACK_RULE in none["sentence"]
    few = A.calibration_advice(hand_summary(n_shift=12), SHIFT, stats(), FALLBACK)
    assert few["status"] == A.TOO_FEW_PROMPTS and few["recommended_T"] == 5 and few["n"] == 12
    assert "Too few prompts like this" in few["sentence"] and "≥ 20" in few["sentence"]
    assert f"T = 5 ({A.FALLBACK_RULE})" in few["sentence"]
    # a family the suite does not hold: not answered from the pooled table
    absent = A.calibration_advice(hand_summary(), WORDS, stats(), FALLBACK)
    assert absent["family"] == "word map" and absent["status"] == A.NO_RULE and absent["recommended_T"] == 5
    assert "no held-out prompts like this" in absent["sentence"]
    # a model other than the calibration's is named
    other = A.calibration_advice(hand_summary(), SHIFT, stats(), FALLBACK, model="tiny-random-llama")
    assert "measured on synthetic, not on tiny-random-llama" in other["sentence"]


def test_rule_steps_are_the_reports_arithmetic() -> None:
    recs = synthetic_records({"test": 12})
    ch = rule_choices(recs, SETTINGS)
    for i, rec in enumerate(recs):
        for rule in [*ch, RULE_CONTROLLER]:
            T, how = A.rule_steps(rule, rec["stats"], SETTINGS.t_max)
            if rule == RULE_CONTROLLER:
                assert T is None and not A.applicable(rule)
            elif rule == RULE_GIBBS:
                assert T == round(ch[rule]["steps"][i]) and A.applicable(rule)
            else:
                assert T == ch[rule]["steps"][i] and A.applicable(rule), rule
    st = stats(t_fix=3, t_pro=2, p=0.5, beats=False)
    assert A.rule_steps(RULE_POSTERIOR, st, 8)[0] == 0 and A.rule_steps(RULE_SKIP, st, 8)[0] == 0
    assert A.rule_steps(RULE_T_MAP_PROFILED, st, 8)[0] == 2 and A.rule_steps(RULE_GIBBS, st, 8)[0] == 4


def test_on_a_computed_report_it_agrees_with_recommended_rule() -> None:
    recs = synthetic_records({"train": 20, "val": 8, "test": 40})
    report = calibration_report(recs, SETTINGS, n_boot=200)
    summary = {"created": "x", "settings": asdict(SETTINGS), "model": SETTINGS.model, "report": report}
    adv = A.calibration_advice(summary, SHIFT, stats(), FALLBACK)
    rec = recommended_rule(report, "digit shift")
    assert adv["status"] == A.CALIBRATED and adv["n"] == rec["n"] == 20
    if A.applicable(rec["rule"]):
        assert (adv["rule"], adv["regret"], adv["ci_low"]) == (rec["rule"], rec["regret"], rec["ci_low"])


def test_the_advice_carries_this_prompts_recalibrated_verdict() -> None:
    """The prompt's P at T⋆ = max(T_MAP fixed σ̂, 1) under the suite's settings, through the suite's
    Platt map: σ(a·logit P + b) by hand; absent without a map or without statistics."""
    recs = synthetic_records({"train": 30, "val": 8, "test": 30})
    report = calibration_report(recs, SETTINGS, n_boot=100, controller=False)
    summary = {"created": "x", "settings": asdict(SETTINGS), "model": SETTINGS.model, "report": report}
    st = stats(t_fix=0, p=0.8)
    st["prob_grid"][1] = 0.7                                  # T⋆ = max(0, 1) = 1 reads this entry
    rv = A.calibration_advice(summary, SHIFT, st, FALLBACK)["verdict_recalibrated"]
    a, b = report["verdict_recalibration"]["a"], report["verdict_recalibration"]["b"]
    assert rv["T_star"] == 1 and rv["p_raw"] == 0.7
    assert rv["p"] == pytest.approx(1.0 / (1.0 + math.exp(-(a * math.log(0.7 / 0.3) + b))))
    pooled = report["verdict_recalibration"]["levels"]["all prompts"]
    assert (rv["n_test"], rv["brier_recalibrated"]) == (pooled["n"], pooled["brier_recalibrated"]) == (30, pooled["brier_recalibrated"])
    assert A.calibration_advice(summary, SHIFT, None, FALLBACK)["verdict_recalibrated"] is None
    assert A.calibration_advice(hand_summary(), SHIFT, st, FALLBACK)["verdict_recalibrated"] is None


@pytest.fixture(scope="module")
def lm():
    from ttt_core.models import build_tiny_model

    torch.set_num_threads(1)
    return build_tiny_model("llama")


def test_this_prompts_statistics_equal_a_suite_records(lm) -> None:
    settings = CT.quick_settings(lm.name)
    specs = CT.calibration_specs(24, settings.families)
    for fam in ("shift_noisy_colon", "needle_short"):
        spec = next(s for s in specs if s.family == fam)
        rec = CT.run_calibration_task(lm, spec, settings)
        prompt, _ = CT.make_calibration_task(spec, settings)
        if fam == "needle_short":
            assert isinstance(prompt, LongContextPrompt)
        want = {k: v for k, v in rec["stats"].items() if k not in ("n_tokens", "confidence", "long_context")}
        assert A.prompt_statistics(lm, prompt, settings) == want


def test_records_and_a_prompts_statistics_read_the_lm_head_as_the_settings_say(lm, head_path_modes) -> None:
    """A long-context record and the live prompt's statistics build their kernel's head path in the
    settings' `lm_head` mode (records made before the fused head read "logits", and the page's
    advice must compute this prompt's statistics the way those records were computed); the two
    modes agree to float32 round-off on the tiny model; saved settings without the field read
    "logits" and keep their folder key."""
    import dataclasses

    from ttt_core.experiments.calibration_suite import settings_from_dict

    seen = head_path_modes
    spec = next(s for s in CT.calibration_specs(24, CT.quick_settings(lm.name).families) if s.family == "needle_short")
    stats = {}
    for mode in ("fused", "logits"):
        settings = CT.quick_settings(lm.name, lm_head=mode)
        seen.clear()
        stats[mode] = CT.run_calibration_task(lm, spec, settings)["stats"]
        assert seen and set(seen) == {mode == "fused"}
        seen.clear()
        A.prompt_statistics(lm, CT.make_calibration_task(spec, settings)[0], settings)
        assert seen and set(seen) == {mode == "fused"}
    assert stats["fused"]["lambda_max"] == pytest.approx(stats["logits"]["lambda_max"], rel=1e-4)
    d = dataclasses.asdict(CT.quick_settings(lm.name, lm_head="logits"))
    old = {k: v for k, v in d.items() if k != "lm_head"}
    assert settings_from_dict(old).lm_head == "logits"
    assert settings_from_dict(old).key() == CT.quick_settings(lm.name, lm_head="logits").key()
    assert CT.quick_settings(lm.name).lm_head == "fused" != settings_from_dict(old).lm_head
    assert CT.quick_settings(lm.name).key() != settings_from_dict(old).key()
    with pytest.raises(ValueError, match="lm_head"):
        CT.quick_settings(lm.name, lm_head="soft").validate()


def test_diagnose_report_gets_the_field_only_with_a_saved_result(lm, tmp_path, monkeypatch) -> None:
    from ttt_core.diagnosis import diagnose_markdown, diagnose_report

    monkeypatch.setenv("TTT_LENS_ARTIFACTS", str(tmp_path / "art"))
    monkeypatch.setattr(CS, "published_calibration_dir", lambda: tmp_path / "published")
    base = diagnose_report(lm, SHIFT, grid=8, max_positions=32)
    assert "calibration" not in A.attach_calibration(dict(base), lm, SHIFT)
    summary = {**hand_summary(), "model": lm.name, "settings": {**asdict(SETTINGS), "model": lm.name}}
    CS.calibration_dir().mkdir(parents=True)
    write_json(CS.calibration_dir() / "calibration-2026.json", summary, indent=1)
    r = A.attach_calibration(dict(base), lm, SHIFT)
    cal = r["calibration"]
    assert r["ttt_lens_diagnose"] == base["ttt_lens_diagnose"] == 2     # optional field: same format version
    assert cal["status"] == A.CALIBRATED and cal["rule"] == RULE_T_MAP_FIXED and cal["file"] == "calibration-2026.json"
    st = A.prompt_statistics(lm, SHIFT, CS.settings_from_dict(summary["settings"]))
    assert cal["recommended_T"] == int(st["t_map_fixed"])
    assert cal["fallback"]["T"] == base["verdict"]["T_star"]
    json.dumps(r, allow_nan=False)
    assert "## Calibrated step count" in diagnose_markdown(r) and cal["sentence"] in diagnose_markdown(r)
