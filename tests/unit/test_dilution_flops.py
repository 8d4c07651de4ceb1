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


# ------------------------------------------------------------------------------------ query gradient (DESIGN §8)
@pytest.mark.parametrize(("T", "d_k", "seed"), [(1, 4, 0), (2, 1, 1), (7, 3, 2), (50, 16, 3), (300, 64, 4)])
def test_query_gradient_closed_form_equals_autograd(T: int, d_k: int, seed: int) -> None:
    """∂(−log α_needle)/∂q = (μ − k_needle)/√d_k on random rows, float64, to 1e-10.

    Would catch: a missing 1/√d_k (or √d_k instead), μ unweighted or weighted by logits instead of α,
    the sign flipped (k_needle − μ), or the needle's own key left out of μ."""
    rng = np.random.default_rng(seed)
    K = rng.normal(scale=2.0, size=(T, d_k))
    q = rng.normal(scale=2.0, size=d_k)
    for needle in {0, T // 2, T - 1}:
        closed = D.needle_query_gradient(q, K, needle)
        auto = D.autograd_needle_gradient(q, K, needle)
        np.testing.assert_allclose(closed, auto, rtol=0, atol=1e-10 * max(1.0, float(np.abs(auto).max())))
        # the formula spelled out independently of the implementation
        z = K @ q / math.sqrt(d_k)
        a = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        np.testing.assert_allclose(closed, (a @ K - K[needle]) / math.sqrt(d_k), atol=1e-12)
    # an explicit scale replaces 1/√d_k (GPT-2's per-layer scaling, for instance)
    np.testing.assert_allclose(D.needle_query_gradient(q, K, 0, 0.3), D.autograd_needle_gradient(q, K, 0, 0.3),
                               atol=1e-10)
    chk = D.query_gradient_check(q, K, T - 1)
    assert chk.max_abs_diff <= 1e-10 and (chk.cosine == pytest.approx(1.0, abs=1e-12) or chk.norm_closed < 1e-12)
    assert chk.norm_closed == pytest.approx(chk.norm_autograd, rel=1e-10, abs=1e-14)


def test_query_gradient_check_rejects_a_wrong_row_and_single_key_is_zero() -> None:
    """The comparison has power (a wrong needle index changes the gradient) and one key gives α = 1, grad 0."""
    q, K, j = D.synthetic_row()
    assert 0.05 < D.query_gradient_check(q, K, j).alpha_needle < 0.95  # diluted, not saturated
    assert np.max(np.abs(D.needle_query_gradient(q, K, j) - D.autograd_needle_gradient(q, K, j + 1))) > 1e-3
    np.testing.assert_allclose(D.needle_query_gradient(q, K[:1], 0), 0.0, atol=1e-15)
    with pytest.raises(ValueError):
        D.needle_query_gradient(q, K, K.shape[0])
    with pytest.raises(ValueError):
        D.needle_query_gradient(q[:-1], K, 0)


def test_query_gradient_on_a_tiny_model_answer_row() -> None:
    """On a real (tiny llama) answer row: the query recovered from the recorded row is the model's own
    post-RoPE query, and closed form = autograd on it (float64, 1e-10).

    Would catch: keys from the wrong kv head or layer, the wrong attention scale, a row that is not the
    answer row, or a recovery that only matches up to the softmax's free constant in the wrong way."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from ttt_core.examples import load_example
    from ttt_core.prompts import parse_prompt

    lm = build_tiny_model("llama", seed=0)
    prompt = parse_prompt(load_example("Needle in a haystack, short"))
    layer, head = 2, 3
    # the true query of (layer, head) at the answer row, captured from the attention module's inputs
    attn = lm.model.model.layers[layer].self_attn
    seen: dict = {}
    hook = attn.register_forward_hook(lambda m, args, kwargs, out: seen.update(kwargs), with_kwargs=True)
    try:
        chk = D.measured_query_gradient_check(lm, prompt, layer, head)
    finally:
        hook.remove()
    # the last forward through the module is the one-row frozen-cache forward of the answer row
    h, (cos, sin) = seen["hidden_states"], seen["position_embeddings"]
    with torch.no_grad():
        q = attn.q_proj(h).view(1, h.shape[1], -1, attn.head_dim).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    q_true = q[0, head, -1].double().numpy()
    assert chk.source == "measured" and (chk.layer, chk.head) == (layer, head)
    assert chk.q_identified and chk.recon_max_abs < 1e-5
    assert chk.scale == pytest.approx(attn.head_dim ** -0.5)
    assert chk.d_k == attn.head_dim and chk.n_keys > 100
    # the identity on the model's own query (captured above) and its frozen keys
    from ttt_core.attention import prefill
    from ttt_core.qttt import qttt_inputs
    inp = qttt_inputs(lm, prompt)
    _, cache = prefill(lm.model, inp.ids[:, : inp.n_prompt])
    K = cache.keys[layer][0, lm.adapter.kv_head_of(head), : inp.n_prompt].double().numpy()
    assert K.shape[0] == chk.n_keys
    np.testing.assert_allclose(chk.q, q_true, rtol=0, atol=1e-4 * np.abs(q_true).max())
    closed = D.needle_query_gradient(q_true, K, chk.needle, chk.scale)
    auto = D.autograd_needle_gradient(q_true, K, chk.needle, chk.scale)
    np.testing.assert_allclose(closed, auto, rtol=0, atol=1e-10 * max(1.0, float(np.abs(auto).max())))
    np.testing.assert_allclose(chk.closed, closed, rtol=1e-3, atol=1e-6 * float(np.abs(closed).max()))
    assert chk.max_abs_diff <= 1e-10
    # the default head is the one with the largest needle attention
    auto_chk = D.measured_query_gradient_check(lm, prompt)
    assert auto_chk.alpha_needle == pytest.approx(float(np.max(auto_chk.alpha_star_grid)), rel=1e-6)
    with pytest.raises(ValueError):
        D.measured_query_gradient_check(lm, parse_prompt("1 -> 2\n3 -> 4\n5 ->"))
