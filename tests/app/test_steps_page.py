"""AppTest: the Steps & bounds page through app.py; its figures carry exactly what ttt_core.steps
computes (measured trajectory, linearised prediction, evidence, plug-in bound, Gibbs posterior)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from tests.app.plotly_json import decode
from ttt_core.examples import load_example
from ttt_core.experiments.targets_suite import kernel_transfer
from ttt_core.models import build_tiny_model
from ttt_core.prompts import parse_prompt
from ttt_core.steps import PLUG_IN_LABEL, StepsSettings, compute_steps

APP = str(Path(__file__).resolve().parents[2] / "app.py")
MODEL = "tiny-random-llama"
CLEAN = load_example("Digit shift, clean labels")


def figs(at: AppTest) -> dict[str, dict]:
    return {_key(c): json.loads(c.proto.spec) for c in at.get("plotly_chart")}


def _key(c) -> str:
    for k in ("steps_fig_error", "steps_fig_prompt", "steps_fig_evidence", "steps_fig_gibbs"):
        if k in c.proto.id:
            return k
    return c.proto.id


def traces(fig: dict) -> dict[str, dict]:
    return {t.get("name"): t for t in fig["data"]}


def app(prompt: str = CLEAN) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["model_name"] = MODEL
    at.session_state["model_preset"] = MODEL
    at.session_state["prompt_text"] = prompt
    at.run()
    return at.switch_page("pages/steps_bounds.py").run()


@pytest.fixture(scope="module")
def lm():
    return build_tiny_model("llama", seed=0)  # what load_model("tiny-random-llama") builds


def close(a, b, rtol=1e-6, atol=1e-9):
    np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=rtol, atol=atol)


def check(at: AppTest, rep) -> None:
    assert not at.exception, at.exception
    f = figs(at)
    assert set(f) == {"steps_fig_error", "steps_fig_prompt", "steps_fig_evidence", "steps_fig_gibbs"}
    T = rep.T_grid
    err = traces(f["steps_fig_error"])
    close(decode(err["measured error"]["x"]), T)
    close(decode(err["measured error"]["y"]), rep.measured.error)
    close(decode(err["linearised error"]["y"]), rep.theory.linear_error)
    close(decode(err["ICL (T = 0)"]["y"]), [rep.icl_error, rep.icl_error])
    pr = traces(f["steps_fig_prompt"])
    close(decode(pr["measured prompt MSE"]["y"]), rep.measured.prompt_mse)
    close(decode(pr["linearised prompt MSE"]["y"]), rep.theory.linear_prompt_mse)
    ev = traces(f["steps_fig_evidence"])
    close(decode(ev["ℓ_T fixed σ̂"]["y"]), rep.theory.ell_fixed, rtol=1e-9)
    close(decode(ev["ℓ_T profiled σ"]["y"]), rep.theory.ell_profiled, rtol=1e-9)
    close(decode(ev[PLUG_IN_LABEL]["y"]), rep.bounds.bound, rtol=1e-9)
    close(decode(ev["plug-in population risk 𝓛̂(T|K)"]["y"]), rep.bounds.population_risk, rtol=1e-9)
    gi = traces(f["steps_fig_gibbs"])
    close(decode(gi["Gibbs posterior ν_β(T)"]["y"]), rep.bounds.gibbs, rtol=1e-9)
    assert decode(gi["Gibbs posterior ν_β(T)"]["y"]).sum() == pytest.approx(1.0)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["T_MAP (fixed σ̂)"] == str(rep.theory.t_map_fixed)
    assert metrics["Plug-in slack"] == f"{rep.bounds.slack:.3g}"
    cards = [m.value for m in at.success] + [m.value for m in at.info]
    assert any(rep.verdict["text"] in c for c in cards)
    scope = [c.value for c in at.caption if "Which update this verdict is about" in c.value]
    assert len(scope) == 1 and "the measured curve below runs that update on the model itself" in scope[0]
    transfer = kernel_transfer()
    assert transfer is not None          # the committed frozen-K/V suite has kernel columns
    assert transfer["sentence"] in scope[0] and transfer["folder"] in scope[0]


def test_fewshot_page_equals_ttt_core(lm):
    at = app()
    rep = compute_steps(lm, parse_prompt(CLEAN), StepsSettings(subspace="q", c=0.1, grid_max=30, last_layers=3))
    check(at, rep)
    # δ and β only change the bound part
    at.slider(key="steps_delta").set_value(0.2)
    at.select_slider(key="steps_beta").set_value(10.0)
    at.run()
    check(at, rep.with_bounds(0.2, 10.0))
    # another subspace, c and grid
    at.selectbox(key="steps_subspace").set_value("v")
    at.slider(key="steps_c").set_value(0.2)
    at.number_input(key="steps_grid").set_value(10)
    at.run()
    rep_v = compute_steps(lm, parse_prompt(CLEAN), StepsSettings(subspace="v", c=0.2, grid_max=10, last_layers=3,
                                                                 delta=0.2, beta=10.0))
    check(at, rep_v)


def test_long_context_and_free_text_say_what_is_not_drawn():
    at = app(load_example("Needle in a haystack, short"))
    assert not at.exception
    err = traces(figs(at)["steps_fig_error"])
    assert "measured qTTT answer NLL" in err and "linearised error" in err
    assert any("Which update this verdict is about" in c.value and "a different update" in c.value for c in at.caption)
    assert np.all(np.isfinite(decode(err["measured qTTT answer NLL"]["y"])))
    at = app(load_example("Free text (no question)"))
    assert not at.exception
    notes = " ".join(m.value for m in at.info)
    assert "Not drawn" in notes and "no query" in notes.lower()
    assert "measured error" not in traces(figs(at)["steps_fig_error"])


def test_bad_prompt_shows_error_and_app_stays_up():
    at = app("1 -> 2\n3 -> 4\nnot a demo line\n5 -> 6\n7 ->")
    assert not at.exception
    assert at.error and not at.get("plotly_chart")


# ------------------------------------------------------------------------------------------
# the calibrated step count (issue 16 item 3): a saved result in a temporary artifacts root
# ------------------------------------------------------------------------------------------


@pytest.fixture
def cal_root(tmp_path, monkeypatch):
    from ttt_core.experiments import calibration_suite as CS

    monkeypatch.setenv("TTT_LENS_ARTIFACTS", str(tmp_path / "art"))
    monkeypatch.setattr(CS, "published_calibration_dir", lambda: tmp_path / "published")
    return CS


def _page_verdict(lm) -> dict:
    return compute_steps(lm, parse_prompt(CLEAN), StepsSettings(subspace="q", c=0.1, grid_max=30, last_layers=3,
                                                                measure=False)).verdict


def test_calibrated_step_count_is_shown_with_a_saved_result(lm, cal_root):
    from dataclasses import asdict

    from tests.unit.experiments.test_calibration_advice import SETTINGS, hand_summary
    from ttt_core.experiments import calibration_advice as A
    from ttt_core.experiments.store import write_json

    summary = {**hand_summary(), "model": MODEL, "settings": {**asdict(SETTINGS), "model": MODEL}}
    summary["report"]["verdict_recalibration"] = {     # a Platt map written by hand
        "a": 0.5, "b": 0.1, "n_train": 100, "train_base_rate": 0.6,
        "levels": {"all prompts": {"n": 40, "brier_raw": 0.3, "brier_recalibrated": 0.24, "brier_base_rate": 0.235}}}
    cal_root.calibration_dir().mkdir(parents=True)
    write_json(cal_root.calibration_dir() / "calibration-2026.json", summary, indent=1)
    prompt = parse_prompt(CLEAN)
    want = A.advice_for_prompt(lm, prompt, _page_verdict(lm))
    assert want["status"] == A.CALIBRATED and want["rule"] == "T_MAP (fixed σ̂²)"
    st = A.prompt_statistics(lm, prompt, cal_root.settings_from_dict(summary["settings"]))
    assert want["recommended_T"] == int(st["t_map_fixed"])      # this prompt's T_MAP (W_V, last 4 layers)
    at = app()
    assert not at.exception, at.exception
    text = " ".join(m.value for m in at.markdown)
    assert want["sentence"] in text
    assert "T_MAP (fixed σ̂²)'s regret was 0.0112 (95 % CI [0.0060, 0.0170]) over 24 held-out prompts, fixed T = 8's " \
           "0.0310" in text
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Recommended T (calibrated)"] == str(want["recommended_T"])
    assert metrics["Its held-out regret"] == "0.0112" and metrics["Fixed T = 8's regret"] == "0.0310"
    assert any("calibration-2026.json" in c.value for c in at.caption)
    assert not any("Not calibrated" in i.value for i in at.info)
    # this prompt's P at T⋆ under the suite's settings, through the map: σ(0.5·logit P + 0.1)
    p_raw = st["prob_grid"][min(max(int(st["t_map_fixed"]), 1), SETTINGS.t_max)]
    p_raw = min(max(p_raw, 1e-4), 1 - 1e-4)
    p_cal = 1.0 / (1.0 + math.exp(-(0.5 * math.log(p_raw / (1 - p_raw)) + 0.1)))
    assert metrics["P(TTT beats ICL), recalibrated"] == f"{p_cal:.2f}"
    assert "Brier score was 0.300, recalibrated 0.240" in text and "scores 0.235" in text


def test_without_a_calibration_result_the_fallback_is_labelled(lm, cal_root):
    from ttt_core.experiments.calibration_advice import FALLBACK_RULE

    at = app()
    assert not at.exception, at.exception
    notes = " ".join(i.value for i in at.info)
    T = _page_verdict(lm)["T_star"]
    assert "Not calibrated." in notes and "No calibration result yet" in notes
    assert f"falls back to T = {T} ({FALLBACK_RULE})" in notes
    assert "Recommended T (calibrated)" not in {m.label for m in at.metric}
