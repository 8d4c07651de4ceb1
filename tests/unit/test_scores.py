"""Block scores (DESIGN §6) and the spectrum report (§2–§4) against dense computations."""

from __future__ import annotations

import numpy as np
import pytest

from ttt_core import theory
from ttt_core.prompt_kernel import compute_prompt_kernel
from ttt_core.figures import heads as hfig
from ttt_core.figures import spectrum as sfig
from ttt_core.generators import digit_shift_task, needle_haystack
from ttt_core.models import build_tiny_model
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
    M = np.linalg.inv(ev.K + sc.sigma2 * np.eye(ev.n))
    np.testing.assert_allclose(resolvent(lam, U, sc.sigma2), M, rtol=1e-8, atol=1e-8 * np.abs(M).max())
    total = np.trace(ev.K)
    for b, Kb in dense_blocks(ev).items():
        kb = ev.head_couplings[b]
        assert sc.query_aware[b] == pytest.approx(kb @ M @ kb, rel=1e-6, abs=1e-14)
        assert sc.trace[b] == pytest.approx(np.trace(Kb @ M), rel=1e-6, abs=1e-14)
        assert sc.share[b] == pytest.approx(np.trace(Kb) / total, rel=1e-8)
    assert sc.share.sum() == pytest.approx(1.0, rel=1e-8)
    _, s2, _ = theory.fit_signal_noise(lam, U.T @ ev.residuals)
    assert sc.sigma2 == pytest.approx(max(s2, 1e-12 * lam.max()))
    assert "fitted" in sc.sigma2_source


def test_hutchinson_converges_to_exact_trace(ev_fs):
    sc = score_blocks(ev_fs)
    errs = []
    for R in (8, 64, 512):
        est, se = hutchinson_trace(ev_fs, sc.sigma2, probes=R, seed=1)
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
    g = theory.gd_filter(rep.lam, rep.rho, rep.T)
    assert rep.gap_ttt == pytest.approx(theory.prompt_excess_risk(rep.lam, rep.tau2, rep.sigma2, g))


def test_spectrum_report_identities(ev_fs):
    rep = kernel_spectrum(ev_fs, T=6, c=0.4)
    lam, U = np.linalg.eigh(ev_fs.K)
    np.testing.assert_allclose(np.sort(rep.lam), np.clip(lam, 0, None), rtol=1e-8, atol=1e-12 * lam.max())
    tau2, s2, _ = theory.fit_signal_noise(rep.lam, rep.r_tilde)
    assert (rep.tau2, rep.sigma2) == pytest.approx((tau2, s2))
    assert rep.rho == pytest.approx(0.4 / rep.lam[0])
    np.testing.assert_allclose(rep.alignment, (rep.U.T @ ev_fs.k_x) ** 2)
    np.testing.assert_allclose(rep.snr, rep.tau2 * rep.lam / rep.sigma2)
    gap = theory.query_bayes_gap(rep.lam, rep.k_tilde, rep.tau2, rep.sigma2, rep.q_T)
    assert rep.gap_contrib.sum() == pytest.approx(gap, rel=1e-9)
    assert rep.beats == (rep.gap_ttt < rep.gap_icl)
    assert "plug-in estimate" in rep.verdict and "T = 6" in rep.verdict
    assert rep.gap_grid[0] == pytest.approx(rep.gap_icl, rel=1e-9)   # T = 0 is ICL
    np.testing.assert_allclose(rep.cum_energy[-1], 1.0)


def test_effective_rank_known_spectra():
    assert effective_rank(np.array([1.0, 1.0, 1.0, 0.0])) == pytest.approx((3.0, 3.0))
    ent, pr = effective_rank(np.array([1.0, 1e-12]))
    assert ent == pytest.approx(1.0, abs=1e-9) and pr == pytest.approx(1.0, abs=1e-9)
    assert effective_rank(np.zeros(3)) == (0.0, 0.0)


def test_verdict_on_synthetic_gp_kernel():
    """A high-SNR aligned kernel: TTT beats ICL; τ² = 0 (pure noise): ICL wins."""
    rng = np.random.default_rng(0)
    Phi = rng.standard_normal((40, 5))
    K = Phi @ Phi.T
    f = Phi @ rng.standard_normal(5)
    rep = compute_spectrum(K, f + 0.05 * rng.standard_normal(40), K[:, 0], T=30, c=0.9)
    assert rep.beats
    rep0 = compute_spectrum(K, rng.standard_normal(40), K[:, 0], tau2_sigma2=(0.0, 1.0))
    assert not rep0.beats and rep0.lam_star == np.inf and "ICL beats TTT" in rep0.verdict


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


# ------------------------------------------------------------------ score validation (DESIGN §6)


@pytest.mark.parametrize("kind", ["q", "o", "mlp_up"])
def test_validation_probe_route_equals_adapter_deltas(lm, kind):
    import torch

    from ttt_core.encoding import encode_few_shot
    from ttt_core.prompt_kernel import fewshot_scalar
    from ttt_core.validation import adapted_query_values, block_deltas

    task = digit_shift_task(np.random.default_rng(3))
    ev = compute_prompt_kernel(lm, task.prompt, kind)
    deltas, rhos = block_deltas(ev, lm, 0.5)
    s_probe = adapted_query_values(lm, ev, task.prompt, deltas, batch=5)
    assert sorted(s_probe) == list(range(len(ev.blocks())))
    fs = encode_few_shot(lm, task.prompt)
    ids = torch.tensor(fs.seqs[-1])[None]
    for b, (l, h) in enumerate(ev.blocks()):
        with torch.no_grad(), lm.adapter.apply(deltas={(l, kind): deltas[b]}):
            s = fewshot_scalar(lm.model(input_ids=ids).logits[0, -1], fs.label_ids, fs.label_values)
        assert float(s) == pytest.approx(s_probe[b], abs=1e-6)
        # the delta is one GD step: ρ_b Σ_i r_i ∂s_i/∂W_b, ρ_b = c/λ_max(K_b)
        assert rhos[b] == pytest.approx(0.5 / np.linalg.eigvalsh(ev.head_kernel(l, h))[-1])


def test_validation_runs_at_reduced_size(lm):
    from ttt_core.validation import validate_scores

    res = validate_scores(lm, n_tasks=3, top_k=2)
    js = res.to_json()
    assert js["n_tasks"] == 3 and len(res.tasks) == 3
    for k in ("spearman_qa_mean", "gain_top_qa_mean", "gain_random_mean", "diff_qa_random_ci95"):
        assert k in js
    t = res.tasks[0]
    assert t.gain.shape == t.query_aware.shape == (12,)
    lo, hi = js["gain_top_qa_ci95"]
    assert lo <= js["gain_top_qa_mean"] <= hi


def test_score_validation_script_tiny(capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "score_validation.py"
    spec = importlib.util.spec_from_file_location("score_validation_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--tasks", "2", "--model", "tiny-random-gpt2", "--subspace", "v"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["n_tasks"] == 2 and last["subspace"] == "v" and last["blocks_per_task"] == 12
    assert last == json.loads(json.dumps(out))
