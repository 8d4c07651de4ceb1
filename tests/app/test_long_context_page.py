"""AppTest of the Long context page through app.py on the tiny random model: the sweep's figures
equal a direct ttt_core.dilution computation, the Lemma 2.2 bound holds on every plotted point,
and the FLOP calculator shows ttt_core.flops' numbers (DESIGN §8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from ttt_core import dilution as D
from ttt_core import flops as Fl
from ttt_core.models import build_tiny_model
from ttt_core.qttt import DEFAULT_LR
from tests.app.plotly_json import charts, decode

APP = Path(__file__).resolve().parents[2] / "app.py"


@pytest.fixture()
def app(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    at = AppTest.from_file(str(APP), default_timeout=300)
    at.session_state["model_name"] = "tiny-random-llama"
    at.session_state["model_preset"] = "tiny-random-llama"
    at.session_state["lc_lengths"] = [50, 100]
    at.session_state["lc_positions"] = [0.5]
    at.session_state["lc_steps"] = 2
    at.session_state["lc_span"] = 16
    at.switch_page("pages/long_context.py").run()
    return at


def test_flop_calculator_defaults(app: AppTest) -> None:
    assert not app.exception, app.exception
    figs = charts(app)
    assert set(figs) == {"lc_fig_flops"}  # the sweep waits for its button
    lm = build_tiny_model("llama")
    fm = Fl.FlopModel.from_model(lm)
    data = {tr["name"]: tr for tr in figs["lc_fig_flops"]["data"]}
    exact = data["exact: F_gen(T_think; T) = N·G(k; T)"]
    T = decode(exact["x"])
    np.testing.assert_allclose(decode(exact["y"]), [fm.matched_thinking_tokens(32, 128, t) for t in T], rtol=1e-9)
    np.testing.assert_allclose(decode(data["2Nk"]["y"]), 2 * 32 * 128)
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Approximation 2Nk"] == "8,192"
    assert metrics["Thinking tokens, exact root"] == f"{fm.matched_thinking_tokens(32, 128, 100_000):,.0f}"


def test_sweep_figures_match_library(app: AppTest) -> None:
    app.button(key="lc_run").click().run()
    assert not app.exception, app.exception
    figs = charts(app)
    assert {"lc_fig_mass", "lc_fig_heat", "lc_fig_bound", "lc_fig_margin", "lc_fig_answer"} <= set(figs)
    lm = build_tiny_model("llama")
    pts = D.dilution_sweep(lm, [50, 100], [0.5], steps=2, span=16, lr=DEFAULT_LR, seed=0, delta=2.0)
    mass = {tr["name"]: tr for tr in figs["lc_fig_mass"]["data"]}
    np.testing.assert_allclose(decode(mass["before qTTT"]["y"]), [p.before.mean_mass for p in pts], rtol=1e-5)
    np.testing.assert_allclose(decode(mass["after qTTT"]["y"]), [p.after.mean_mass for p in pts], rtol=1e-5)
    np.testing.assert_allclose(decode(mass["before qTTT"]["x"]), [p.n_tokens for p in pts])
    # Lemma 2.2 on every plotted (layer, head, point): α* ≤ bound
    for tr in figs["lc_fig_bound"]["data"][:2]:
        x, y = decode(tr["x"]), decode(tr["y"])
        assert x.size == sum(p.before.stats.alpha_star.size for p in pts)
        assert np.all(y <= x * (1 + 1e-9))
    # the margin figure's requirement curve is Lemma 2.3's
    req = figs["lc_fig_margin"]["data"][0]
    np.testing.assert_allclose(decode(req["y"]), D.required_margin(decode(req["x"]), 0.1), rtol=1e-9)
    heat = figs["lc_fig_heat"]["data"][0]
    np.testing.assert_allclose(decode(heat["z"]).reshape(pts[0].before.stats.needle_mass.shape),
                               pts[0].before.stats.needle_mass, rtol=1e-5, atol=1e-9)
