"""Block scores (DESIGN §6) and the spectrum report (§2–§4) against dense computations."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ttt_core import theory
from ttt_core.figures import heads as hfig
from ttt_core.figures import spectrum as sfig
from ttt_core.generators import digit_shift_task, needle_haystack
from ttt_core.models import build_tiny_model
from ttt_core.noise_posterior import noise_posterior
from ttt_core.prompt_kernel import compute_prompt_kernel
from ttt_core.prompts import parse_prompt
from ttt_core.scores import greedy_query_aware, hutchinson_trace, resolvent, score_blocks
from ttt_core.spectrum import compute_spectrum, effective_rank, kernel_spectrum

LONG = ("The river bends twice before it reaches the old mill. Farmers grow barley there. The bell rings."
        "\nQuestion: What do farmers grow?\nAnswer: barley")


@pytest.fixture(scope="module")
def lm():
    return build_tiny_model("llama", seed=5)


@pytest.fixture(scope="module")
def ev_fs(lm):
    return compute_prompt_kernel(lm, digit_shift_task(7, n=10).prompt, "q")


@pytest.fixture(scope="module")
def ev_exact(lm):
    return compute_prompt_kernel(lm, parse_prompt(LONG), "o", max_positions=14, qttt=False, chunk=8)


def dense_blocks(ev):
    return {b: ev.head_kernel(*b) for b in ev.blocks()}


@pytest.mark.parametrize("which", ["ev_fs", "ev_exact"])
def test_query_aware_and_trace_match_dense(which, request):
    ev = request.getfixturevalue(which)
    sc = score_blocks(ev)
    lam, U = theory.eigh_psd(ev.K)
    M = np.linalg.inv(ev.K + sc.ridge * np.eye(ev.n))
    np.testing.assert_allclose(resolvent(lam, U, sc.ridge), M, rtol=1e-8, atol=1e-8 * np.abs(M).max())
    total = np.trace(ev.K)
    for b, Kb in dense_blocks(ev).items():
        kb = ev.head_couplings[b]
        assert sc.query_aware[b] == pytest.approx(kb @ M @ kb, rel=1e-6, abs=1e-14)
        assert sc.trace[b] == pytest.approx(np.trace(Kb @ M), rel=1e-6, abs=1e-14)
        assert sc.share[b] == pytest.approx(np.trace(Kb) / total, rel=1e-8)
    assert sc.share.sum() == pytest.approx(1.0, rel=1e-8)
    # the ridge is λ⋆'s posterior median (DESIGN §5.1, §6), not the boundary-prone σ² point fit
    post = noise_posterior(lam, U.T @ ev.residuals)
    assert sc.ridge == pytest.approx(post.lambda_star.median) and "posterior median" in sc.ridge_source


def test_hutchinson_converges_to_exact_trace(ev_fs):
    sc = score_blocks(ev_fs)
    errs = []
    for R in (8, 64, 512):
        est, se = hutchinson_trace(ev_fs, sc.ridge, probes=R, seed=1)
        z = np.abs(est - sc.trace) / np.maximum(se, 1e-30)
        assert np.mean(z < 4) >= 0.95, (R, z.max())      # within a few standard errors
        errs.append(np.linalg.norm(est - sc.trace) / np.linalg.norm(sc.trace))
    assert errs[2] < errs[0] and errs[2] < 0.1


def test_quad_forms_feature_route(ev_exact):
    """z_rᵀ K_b u_r from FeatureFactors and RowFactors agree with dense kernels."""
    rng = np.random.default_rng(0)
    Z, U = rng.standard_normal((ev_exact.n, 3)), rng.standard_normal((ev_exact.n, 3))
    Q = ev_exact.quad_forms(Z, U)
    for b, Kb in dense_blocks(ev_exact).items():
        np.testing.assert_allclose(Q[b], np.einsum("ir,ij,jr->r", Z, Kb, U), rtol=1e-6, atol=1e-14)


def _dense_h(K, kx, r, T, c):
    lam, U = theory.eigh_psd(K)
    rho = theory.rho_from_c(lam, c)
    return kx @ (U @ (theory.gd_query_filter(lam, rho, T) * (U.T @ r))), rho


def test_greedy_matches_brute_force(ev_fs):
    steps = greedy_query_aware(ev_fs, budget=3, T=8, c=0.5)
    blocks = dense_blocks(ev_fs)
    K_curr, kx_curr, remaining = np.zeros((ev_fs.n, ev_fs.n)), np.zeros(ev_fs.n), list(blocks)
    for step in steps:
        h2 = {}
        for b in remaining:
            h, _ = _dense_h(K_curr + blocks[b], kx_curr + ev_fs.head_couplings[b], ev_fs.residuals, 8, 0.5)
            h2[b] = h**2
        best = max(h2, key=h2.get)
        assert step.block == best
        assert step.h2 == pytest.approx(h2[best], rel=1e-6)
        K_curr, kx_curr = K_curr + blocks[best], kx_curr + ev_fs.head_couplings[best]
        remaining.remove(best)
    sc = score_blocks(ev_fs, greedy_budget=2)
    assert [s.block for s in sc.greedy] == [s.block for s in steps[:2]]


def test_greedy_power_iteration_route_for_large_n(lm):
    ev = compute_prompt_kernel(lm, needle_haystack(0, n_words=60), "q", max_positions=140)
    assert ev.n > 128
    steps = greedy_query_aware(ev, budget=1)
    h2 = {b: _dense_h(ev.head_kernel(*b), ev.head_couplings[b], ev.residuals, 8, 0.5)[0] ** 2 for b in ev.blocks()}
    assert steps[0].block == max(h2, key=h2.get)


def test_no_query_scores(lm):
    ev = compute_prompt_kernel(lm, parse_prompt("Free text with no question, just a sentence or two here."), "v",
                          max_positions=20, qttt=False)
    sc = score_blocks(ev, greedy_budget=3)
    assert sc.query_aware is None and sc.greedy is None and "needs a query" in sc.greedy_note
    assert "Query-Aware" not in sc.available()
    rep = kernel_spectrum(ev)
    assert rep.alignment is None and "no query" in rep.verdict
    # P(TTT beats ICL) by brute force over the posterior grid with the §4 prompt-value risks (σ² = 1:
    # it cancels once s = 1/λ⋆ is fixed)
    g = theory.gd_filter(rep.lam, rep.rho, rep.T)
    post = rep.posterior
    wins = [theory.prompt_excess_risk(rep.lam, s, 1.0, g) < theory.prompt_excess_risk(rep.lam, s, 1.0, 0 * g)
            for s in post.s_grid]
    assert rep.prob == pytest.approx(float(np.dot(post.weights, wins)), abs=1e-9)


def test_spectrum_report_identities(ev_fs):
    rep = kernel_spectrum(ev_fs, T=6, c=0.4)
    lam, U = np.linalg.eigh(ev_fs.K)
    np.testing.assert_allclose(np.sort(rep.lam), np.clip(lam, 0, None), rtol=1e-8, atol=1e-12 * lam.max())
    tau2, s2, _ = theory.fit_signal_noise(rep.lam, rep.r_tilde)
    assert (rep.ml_tau2, rep.ml_sigma2) == pytest.approx((tau2, s2))          # kept, labelled, never decisive
    post = rep.posterior
    assert (rep.tau2, rep.sigma2, rep.lam_star) == pytest.approx((post.tau2.median, post.sigma2.median,
                                                                  post.lambda_star.median))
    assert rep.lam_star_ci[0] <= rep.lam_star <= rep.lam_star_ci[1]
    assert rep.rho == pytest.approx(0.4 / rep.lam[0])
    np.testing.assert_allclose(rep.alignment, (rep.U.T @ ev_fs.k_x) ** 2)
    np.testing.assert_allclose(rep.snr, rep.lam / rep.lam_star, rtol=1e-6)   # SNR τ²λ/σ² = λ/λ⋆ at the median
    # the per-mode curves use λ⋆'s median with σ² at its median: τ² = σ²/λ⋆ there
    gap = theory.query_bayes_gap(rep.lam, rep.k_tilde, rep.sigma2 / rep.lam_star, rep.sigma2, rep.q_T)
    assert rep.gap_contrib.sum() == pytest.approx(gap, rel=1e-9)
    # P(TTT beats ICL at T) by brute force over the grid with theory.ttt_beats_icl (σ² = 1: it cancels)
    wins = [theory.ttt_beats_icl(rep.lam, rep.k_tilde, s, 1.0, rep.q_T).beats for s in post.s_grid]
    assert rep.prob == pytest.approx(float(np.dot(post.weights, wins)), abs=1e-9)
    want = "adapt" if rep.prob >= 0.9 else "don't adapt" if rep.prob <= 0.1 else "undetermined on this prompt"
    assert rep.decision == want and rep.beats == (want == "adapt")
    assert "P(TTT beats ICL)" in rep.verdict and "T = 6" in rep.verdict
    assert rep.gap_grid[0] == pytest.approx(rep.gap_icl, rel=1e-9)   # T = 0 is ICL
    np.testing.assert_allclose(rep.cum_energy[-1], 1.0)


def test_effective_rank_known_spectra():
    assert effective_rank(np.array([1.0, 1.0, 1.0, 0.0])) == pytest.approx((3.0, 3.0))
    ent, pr = effective_rank(np.array([1.0, 1e-12]))
    assert ent == pytest.approx(1.0, abs=1e-9) and pr == pytest.approx(1.0, abs=1e-9)
    assert effective_rank(np.zeros(3)) == (0.0, 0.0)


def test_verdict_on_synthetic_gp_kernel():
    """A high-SNR aligned kernel: adapt; pure noise outside the kernel's range: don't adapt."""
    rng = np.random.default_rng(0)
    Phi = rng.standard_normal((40, 5))
    K = Phi @ Phi.T
    f = Phi @ rng.standard_normal(5)
    rep = compute_spectrum(K, f + 0.05 * rng.standard_normal(40), K[:, 0], T=30, c=0.9)
    assert rep.decision == "adapt" and rep.beats and rep.prob >= 0.9 and rep.flag is None
    # pure noise on full-rank kernels: λ⋆ is identified as large and ICL wins on most draws; the
    # verdict never says "adapt" (on the rank-5 kernel above, noise leaves λ⋆ weakly pinned)
    decisions = []
    for seed in range(20):
        g = np.random.default_rng(100 + seed)
        Phi0 = g.standard_normal((80, 80))
        K0 = Phi0 @ Phi0.T
        rep0 = compute_spectrum(K0, g.standard_normal(80), K0[:, 0], T=30, c=0.5)
        decisions.append(rep0.decision)
        assert rep0.lam_star > 10 * rep.lam_star
    assert "adapt" not in decisions and decisions.count("don't adapt") >= 15


def test_figures_carry_report_data(ev_fs):
    rep = kernel_spectrum(ev_fs)
    sc = score_blocks(ev_fs)
    f = sfig.scree_figure(rep)
    np.testing.assert_allclose(f.data[0].y, np.where(rep.lam > 1e-300, rep.lam, np.nan), equal_nan=True)
    assert f.layout.yaxis.type == "log"
    assert f.data[1].yaxis == "y2"
    assert any(s.x0 == pytest.approx(rep.eff_rank_entropy) for s in f.layout.shapes)
    assert any(s.y0 == pytest.approx(1.0) for s in sfig.snr_figure(rep).layout.shapes)
    np.testing.assert_allclose(sfig.alignment_figure(rep).data[0].y, rep.alignment)
    ff = sfig.filter_figure(rep)
    np.testing.assert_allclose(ff.data[1].y, rep.g_star)
    np.testing.assert_allclose(sfig.gap_figure(rep).data[1].y, rep.icl_contrib)
    np.testing.assert_allclose(sfig.gap_vs_T_figure(rep).data[0].y, rep.gap_grid)
    hm = hfig.score_heatmap(sc.trace, "Trace", selected=(1, 2))
    np.testing.assert_allclose(np.asarray(hm.data[0].z), sc.trace)
    assert hm.data[0].colorscale[0][1] != "RdBu"
    cells = hm.data[1]                      # the clickable per-cell markers (heatmaps cannot be selected)
    L, H = sc.trace.shape
    assert cells.mode == "markers" and len(cells.x) == L * H and hm.data[0].hoverinfo == "skip"
    i = 1 * H + 2                           # cell (layer 1, head 2)
    assert (cells.y[i], cells.x[i]) == (1, 2) and cells.customdata[i][2] == pytest.approx(sc.trace[1, 2])
    assert hm.data[2].name == "selected" and (hm.data[2].y[0], hm.data[2].x[0]) == (1, 2)
    signed = hfig.score_heatmap(sc.trace - sc.trace.mean(), "diff")
    assert signed.data[0].zmid == 0.0
    rows = sc.ranked("Query-Aware", 3)
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert rows[0]["Query-Aware"] == pytest.approx(sc.query_aware.max())
    P = np.full((4, 4), 0.25)
    assert hfig.attention_figure(P, list("abcd"), "h").data[0].x[0] == "0:a"
    assert list(hfig.share_figure(sc.share[0], 0, 1).data[0].marker.color)[1] != list(
        hfig.share_figure(sc.share[0], 0, 1).data[0].marker.color)[0]


def _rescaled(ev, c):
    """The same prompt kernel with every feature φ_i (and φ_x) multiplied by c: each block's
    output-side factor (and query factor) scales by c, so K^(b) → c²K^(b), k_x^(b) → c²k_x^(b)."""
    factors = []
    for f in ev.factors:   # float64 copies: the test is about the algebra, not fp32 round-off
        factors.append(dataclasses.replace(f, H=f.H.double() * c, O=f.O.double(), Hx=None if f.Hx is None else f.Hx.double() * c,
                                           Ox=None if f.Ox is None else f.Ox.double()))
    hc = None if ev.head_couplings is None else ev.head_couplings * c * c
    return dataclasses.replace(ev, factors=factors, K=ev.K * c * c, head_couplings=hc,
                               k_x=None if ev.k_x is None else ev.k_x * c * c)


def test_rankings_do_not_change_when_the_kernel_is_rescaled(ev_fs):
    """Rescaling Φ by c ∈ {1e-3, 1, 1e3} leaves every ranking identical (DESIGN §6). Would catch a
    ridge that does not scale with K, e.g. the fitted σ² alone: σ² is scale-free while K is not,
    so (c²K + σ²I)⁻¹ re-weights the modes and the ranking moves."""
    ev1 = _rescaled(ev_fs, 1.0)
    base = score_blocks(ev1, greedy_budget=4)
    for c in (1e-3, 1.0, 1e3):
        ev = _rescaled(ev_fs, c)
        np.testing.assert_allclose(ev.head_kernel(0, 1), c * c * ev1.head_kernel(0, 1), rtol=1e-9)
        sc = score_blocks(ev, greedy_budget=4)
        assert sc.ridge == pytest.approx(c * c * base.ridge, rel=1e-6)
        for name in ("Query-Aware", "Trace", "Kernel share"):
            assert [r["block"] for r in sc.ranked(name)] == [r["block"] for r in base.ranked(name)], (c, name)
        assert [g.block for g in sc.greedy] == [g.block for g in base.greedy]
        np.testing.assert_allclose(sc.top_k_frequency, base.top_k_frequency, atol=1e-9)
    # a ridge that does not follow the kernel's scale (as the fitted σ² did not) moves the ranking
    fixed = [[r["block"] for r in score_blocks(_rescaled(ev_fs, c), base.ridge).ranked("Query-Aware")]
             for c in (1e-3, 1e3)]
    assert fixed[0] != fixed[1]


def test_top_k_frequency_matches_brute_force(ev_fs):
    sc = score_blocks(ev_fs, top_k=3)
    post = sc.posterior
    lam, U = theory.eigh_psd(ev_fs.K)
    freq = np.zeros(sc.query_aware.shape)
    for w, ls in zip(post.weights, post.lambda_star_grid):
        qa = score_blocks(ev_fs, float(ls)).query_aware
        top = np.argsort(-qa, axis=None, kind="stable")[:3]
        freq.flat[top] += w
    np.testing.assert_allclose(sc.top_k_frequency, freq, atol=1e-5)
