"""FLOP accounting (DESIGN §8; qTTT paper Sec. 3.3/App. C) and score dilution (Lemma 2.2/2.3) on
constructed logits and on measured attention of a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ttt_core import dilution as D
from ttt_core import flops as Fl
from ttt_core.models import build_tiny_model


# ------------------------------------------------------------------------------------ FLOPs
def test_flop_formulas_by_hand() -> None:
    fm = Fl.FlopModel(L=2, d=3, r=4)
    assert fm.c_quad == 12 and fm.c_tok == (4 + 8) * 2 * 9 == 216
    assert fm.prefill(5) == 12 * 25 + 216 * 5
    assert fm.generation(3, 5) == 12 * (3 * 5 + 3 * 2 / 2) + 216 * 3 == 864
    assert fm.qttt_step(2, 5) == 2 * (12 * 2 * 5 + (2 + 8) * 2 * 2 * 9) == 960
    assert fm.qttt_step(2, 5, span_self_attention=True) == 2 * (120 + 360 + 12 * 4 + 2 * 2 * 2 * 9) == 1200
    assert fm.qttt(7, 2, 5) == 7 * 960
    x = fm.matched_thinking_tokens(7, 2, 5)
    assert math.isclose(fm.generation(x, 5), 7 * 960, rel_tol=1e-12)
    assert Fl.approx_thinking_tokens(7, 2) == 28
    assert math.isclose(Fl.steps_for_thinking_budget(fm, x, 2, 5), 7, rel_tol=1e-12)


def test_paper_sanity_examples() -> None:
    fm = Fl.FlopModel(L=32, d=4096, r=4)
    # App. C: T = 1e5, T_think ≈ 8000 ↔ (N, k) = (10, 400)
    t = fm.matched_thinking_tokens(10, 400, 1e5)
    assert Fl.approx_thinking_tokens(10, 400) == 8000
    assert abs(t - 8000) / 8000 < 0.1, t
    # the experiments' default (k, N) = (128, 32) ↔ 8192
    t2 = fm.matched_thinking_tokens(32, 128, 1e5)
    assert Fl.approx_thinking_tokens(32, 128) == 8192
    assert abs(t2 - 8192) / 8192 < 0.1, t2
    # the approximation becomes exact for T ≫ d, k ≪ T
    assert abs(fm.matched_thinking_tokens(32, 128, 1e9) - 8192) / 8192 < 1e-3
    assert fm.generation(t2, 1e5) == pytest.approx(32 * fm.qttt_step(128, 1e5), rel=1e-12)


def test_flop_model_from_loaded_model() -> None:
    lm = build_tiny_model("llama")
    fm = Fl.FlopModel.from_model(lm)
    assert (fm.L, fm.d, fm.r) == (3, 64, 2.0)


# ------------------------------------------------------------------------------------ lemmas
def test_dilution_bound_is_tight_in_constructed_case() -> None:
    for m, delta in [(1, 0.0), (5, 1.5), (40, 3.0)]:
        z = np.concatenate([[0.0], np.full(m, -delta), np.full(7, -np.inf)])  # needle, m ties at Δ, far keys
        st = D.row_stats(z, [0], delta)
        assert st.m == m
        assert st.alpha_star == pytest.approx(1 / (1 + m * math.exp(-delta)), rel=1e-12)
        assert st.bound == pytest.approx(st.alpha_star, rel=1e-12)
        assert st.tight_bound == pytest.approx(st.alpha_star, rel=1e-12)


def test_dilution_bound_holds_on_random_logits() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(scale=3.0, size=(200, 50))
    needle = [7, 8, 9]
    for delta in (0.0, 0.5, 2.0, 5.0):
        st = D.row_stats(z, needle, delta)
        assert np.all(st.alpha_star <= st.bound + 1e-12)
        assert np.all(st.alpha_star <= st.tight_bound + 1e-12)
        assert np.all(st.tight_bound <= st.bound + 1e-12)
        assert np.all(st.needle_mass >= st.alpha_star - 1e-12)
        np.testing.assert_allclose(st.alpha_star, 1 / (1 + np.exp(-st.gamma)), rtol=1e-10)
    # shift invariance: logits and log-probabilities give the same statistics
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    a, b = D.row_stats(z, needle, 1.0), D.row_stats(logp, needle, 1.0)
    np.testing.assert_allclose(a.gamma, b.gamma, rtol=1e-10)
    np.testing.assert_array_equal(a.m, b.m)


def test_margin_formula() -> None:
    T, eps = 1000, 0.1
    g = float(D.required_margin(T, eps))
    assert g == pytest.approx(math.log((T - 1) * (1 - eps) / eps))
    # worst case: all T − 1 other keys exactly g below the needle → α* = 1 − ε exactly
    z = np.concatenate([[g], np.zeros(T - 1)])
    st = D.row_stats(z, [0], 0.0)
    assert st.alpha_star == pytest.approx(1 - eps, rel=1e-12)
    assert st.min_gap == pytest.approx(g)
    assert D.margin_lower_bound(T, g) == pytest.approx(1 - eps)
    # the paper's worked example: T = 1e5, ε = 0.1 → ≈ 13.7
    assert float(D.required_margin(1e5, 0.1)) == pytest.approx(13.7, abs=0.05)
    # retrieval margin γ: α = 1/(1 + e^{−γ}); a larger gap gives α above 1 − ε
    st2 = D.row_stats(np.concatenate([[g + 1], np.zeros(T - 1)]), [0], 0.0)
    assert st2.alpha_star > 1 - eps
    with pytest.raises(ValueError):
        D.required_margin(10, 1.5)


# ------------------------------------------------------------------------------------ measured
@pytest.fixture(scope="module")
def point():
    lm = build_tiny_model("llama", seed=0)
    return D.dilution_point(lm, 40, 0.4, steps=2, span=16, lr=1e-3, seed=3, delta=1.0)


def test_bound_holds_on_measured_attention(point) -> None:
    for meas in (point.before, point.after):
        st = meas.stats
        assert st.alpha_star.shape == (3, 4)  # layers × query heads of the tiny llama
        assert meas.needle_tokens and st.n_keys == point.n_tokens
        assert np.all(st.alpha_star <= st.bound + 1e-12)
        assert np.all(st.alpha_star <= st.tight_bound + 1e-12)
        np.testing.assert_allclose(st.alpha_star, 1 / (1 + np.exp(-st.gamma)), rtol=1e-8)
        assert np.all((st.needle_mass > 0) & (st.needle_mass <= 1 + 1e-9))
        assert 0 < meas.answer_prob <= meas.answer_first_prob <= 1
    assert point.steps == 2 and point.status == "done"
    assert point.after.mean_mass != point.before.mean_mass  # the adapted W_Q changed the attention
    rows = D.sweep_table([point])
    assert rows[0]["tokens T"] == point.n_tokens


def test_zero_deltas_reproduce_the_base_measurement() -> None:
    import torch

    from ttt_core.generators import needle_haystack
    from ttt_core.qttt import QTTTConfig, QTTTRun

    lm = build_tiny_model("llama", seed=0)
    run = QTTTRun(lm, needle_haystack(1, n_words=30), QTTTConfig(steps=0, span=8))
    run.prepare()
    a = D.measure_answer_row(lm, run, None, 1.0)
    b = D.measure_answer_row(lm, run, {k: torch.zeros_like(d) for k, d in run.deltas.items()}, 1.0)
    np.testing.assert_allclose(a.stats.needle_mass, b.stats.needle_mass, rtol=1e-6)
    assert a.answer_prob == pytest.approx(b.answer_prob, rel=1e-5)
