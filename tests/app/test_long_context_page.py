"""AppTest of the Long context page through app.py on the tiny random model: the sweep's figures
equal a direct ttt_core.dilution computation, the Lemma 2.2 bound holds on every plotted point,
and the FLOP calculator shows ttt_core.flops' numbers (DESIGN §8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from tests.app.plotly_json import charts, decode
from ttt_core import dilution as D
from ttt_core import flops as Fl
from ttt_core.models import build_tiny_model
from ttt_core.qttt import DEFAULT_LR

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
    assert set(figs) == {"lc_fig_flops", "lc_fig_qgrad"}  # the sweep waits for its button
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


# ------------------------------------------------------------------ the qTTT query gradient (DESIGN §8)
def _grad_metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _check_gradient_section(at: AppTest, q: np.ndarray, K: np.ndarray, needle: int, scale: float) -> None:
    """The figure's bars and diamonds and the five metrics equal a recomputation from (q, K, needle):
    the closed form spelled out here and torch.autograd run here."""
    import torch

    fig = charts(at)["lc_fig_qgrad"]["data"]
    assert [tr["name"] for tr in fig] == ["closed form (μ − k_needle)·s", "torch.autograd"]
    z = scale * K @ q
    a = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    closed = scale * (a @ K - K[needle])
    qt = torch.tensor(q, dtype=torch.float64, requires_grad=True)
    (-torch.log_softmax(scale * (torch.tensor(K) @ qt), 0)[needle]).backward()
    auto = qt.grad.numpy()
    tol = 1e-12 * max(1.0, float(np.abs(closed).max()))
    np.testing.assert_allclose(decode(fig[0]["y"]), closed, rtol=0, atol=tol)
    np.testing.assert_allclose(decode(fig[1]["y"]), auto, rtol=0, atol=tol)
    np.testing.assert_allclose(decode(fig[0]["x"]), np.arange(K.shape[1]))
    m = _grad_metrics(at)
    assert m["α_needle"] == f"{a[needle]:.4g}"
    assert m["‖gradient‖, closed form"] == f"{np.linalg.norm(closed):.6g}"
    assert m["‖gradient‖, autograd"] == f"{np.linalg.norm(auto):.6g}"
    assert float(m["cosine(closed, autograd)"]) == pytest.approx(1.0, abs=1e-11)
    assert float(m["max |closed − autograd|"]) <= 1e-12


def test_query_gradient_synthetic_row_without_needle(app: AppTest) -> None:
    """Default (few-shot) prompt: no needle marked, so the synthetic row is shown and says so.

    Would catch: the comparison missing from the page, a figure/metric that is not the recomputed closed form
    or autograd, and a silent fallback (no notice that the row is synthetic)."""
    assert not app.exception, app.exception
    assert any("marks no needle" in i.value for i in app.info)
    assert any(c.value.startswith("synthetic row") for c in app.caption)
    q, K, j = D.synthetic_row()
    _check_gradient_section(app, q, K, j, K.shape[1] ** -0.5)


def test_query_gradient_measured_answer_row() -> None:
    """A needle prompt in the sidebar: the page measures its answer row on the tiny model, for the default
    head (largest needle attention) and for a chosen head, and the numbers equal ttt_core.dilution's.

    Would catch: the page ignoring the sidebar prompt, showing another head than the one chosen, keys or
    queries that are not the model's (the closed form on them would differ from the plotted bars), and a
    recovered query that does not reproduce the recorded attention row."""
    from ttt_core.attention import prefill
    from ttt_core.examples import load_example
    from ttt_core.prompts import fit_to_token_limit, parse_prompt
    from ttt_core.qttt import qttt_inputs

    text = load_example("Needle in a haystack, short")
    at = AppTest.from_file(str(APP), default_timeout=300)
    at.session_state["model_name"] = "tiny-random-llama"
    at.session_state["model_preset"] = "tiny-random-llama"
    at.session_state["prompt_text"] = text
    at.switch_page("pages/long_context.py").run()
    assert not at.exception, at.exception
    lm = build_tiny_model("llama")
    prompt = fit_to_token_limit(parse_prompt(text), lm.tokenizer, 2048)[0]
    for pick in (None, (2, 3)):
        if pick is not None:
            at.selectbox(key="lc_grad_head").set_value(pick).run()
            assert not at.exception, at.exception
        chk = D.measured_query_gradient_check(lm, prompt, *(pick or (None, None)))
        assert chk.source == "measured" and chk.q_identified and chk.recon_max_abs < 1e-5
        if pick is not None:
            assert (chk.layer, chk.head) == pick
        else:
            assert chk.alpha_needle == pytest.approx(float(chk.alpha_star_grid.max()), rel=1e-6)
        cap = [c.value for c in at.caption if c.value.startswith("answer row")]
        assert cap and f"layer {chk.layer}, query head {chk.head}" in cap[0] and "identified: yes" in cap[0]
        # the keys: the chosen head's frozen prefill keys, rebuilt here
        inp = qttt_inputs(lm, prompt)
        _, cache = prefill(lm.model, inp.ids[:, : inp.n_prompt])
        K = cache.keys[chk.layer][0, lm.adapter.kv_head_of(chk.head), : inp.n_prompt].double().numpy()
        _check_gradient_section(at, chk.q, K, chk.needle, chk.scale)
