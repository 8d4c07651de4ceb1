"""AppTest: the Steps & bounds page through app.py; its figures carry exactly what ttt_core.steps
computes (measured trajectory, linearised prediction, evidence, plug-in bound, Gibbs posterior)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from tests.app.plotly_json import decode
from ttt_core.examples import load_example
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
