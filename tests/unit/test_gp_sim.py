"""Tests of the GP benchmark simulator and Monte-Carlo checks of the closed forms (DESIGN §3-§5)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ttt_core import gp_lab, gp_sim, theory


@pytest.mark.parametrize("kernel", gp_sim.KERNELS)
def test_problem_geometry_is_consistent(kernel: str) -> None:
    p = gp_sim.make_problem(kernel, n=20, d=2 if kernel != "powerlaw" else 1, alpha=1.2, seed=4)
    np.testing.assert_allclose(p.K, p.Phi @ p.Phi.T, atol=1e-12)
    np.testing.assert_allclose(p.k_x, p.Phi @ p.phi_x, atol=1e-12)
    assert p.kappa_x == pytest.approx(p.phi_x @ p.phi_x)
    np.testing.assert_allclose(p.U.T @ p.U, np.eye(20), atol=1e-10)
    np.testing.assert_allclose(p.U @ np.diag(p.lam) @ p.U.T, p.K, atol=1e-10)
    np.testing.assert_allclose(p.k_tilde, p.U.T @ p.k_x)
    assert np.all(np.diff(p.lam) <= 0) and np.all(p.lam >= 0)
    joint = np.block([[p.K, p.k_x[:, None]], [p.k_x[None, :], np.array([[p.kappa_x]])]])
    assert np.linalg.eigvalsh(joint).min() >= -1e-10
    if kernel == "powerlaw":
        np.testing.assert_allclose(p.lam[0] / p.lam[1:6], np.arange(2, 7) ** 1.2, rtol=1e-8)
        assert p.lam.mean() == pytest.approx(1.0)
    else:
        np.testing.assert_allclose(np.diag(p.K), 1.0, atol=1e-8)  # unit-variance stationary kernel
        ref = (gp_sim.rbf_kernel if kernel == "rbf" else gp_sim.matern52_kernel)(p.X, p.X, 0.2)
        np.testing.assert_allclose(p.K, ref, atol=1e-8)
        np.testing.assert_allclose(
            p.k_x, (gp_sim.rbf_kernel if kernel == "rbf" else gp_sim.matern52_kernel)(p.X, p.x_query[None], 0.2)[:, 0],
            atol=1e-8)


def test_draws_have_benchmark_covariance() -> None:
    p = gp_sim.make_problem("matern52", n=5, seed=1)
    tau2, sigma2, m = 2.0, 0.3, 40000
    dr = gp_sim.draw_benchmark(p, tau2, sigma2, m, np.random.default_rng(0))
    Z = np.column_stack([dr.f_star, dr.f_x])
    target = tau2 * np.block([[p.K, p.k_x[:, None]], [p.k_x[None, :], np.array([[p.kappa_x]])]])
    emp = Z.T @ Z / m
    # sd of a sample second moment ≈ sqrt((Σ_ii Σ_jj + Σ_ij²)/m)
    sd = np.sqrt((np.outer(np.diag(target), np.diag(target)) + target**2) / m)
    assert np.all(np.abs(emp - target) <= 5 * sd)
    noise = dr.r - dr.f_star
    assert noise.var() == pytest.approx(sigma2, rel=0.03)


def test_gradient_descent_shapes_and_seed() -> None:
    p = gp_sim.make_problem("rbf", n=10)
    rho = theory.rho_from_c(p.lam, 0.5)
    r = np.random.default_rng(0).standard_normal((3, 10))
    th = gp_sim.gradient_descent(p.Phi, r, rho, 0.2, [5, 0, 2])
    assert th.shape == (3, 3, p.Phi.shape[1])
    assert np.all(th[1] == 0)
    np.testing.assert_allclose(th[:, 1], gp_sim.gradient_descent(p.Phi, r[1], rho, 0.2, [5, 0, 2]))
    with pytest.raises(ValueError):
        gp_sim.gradient_descent(p.Phi, r, rho, 0.2, [1.5])
    s = gp_lab.LabSettings(n=16, n_draws=60, sigma2_b=1.0)
    a, b = gp_lab.run_lab(s), gp_lab.run_lab(s)
    np.testing.assert_array_equal(a.risks.query_gap_mc, b.risks.query_gap_mc)
    np.testing.assert_array_equal(a.evidence.T_map_mle, b.evidence.T_map_mle)
    c = gp_lab.run_lab(replace(s, seed=1))
    assert not np.array_equal(a.risks.query_gap_mc, c.risks.query_gap_mc)


SETTINGS = [  # (kernel, tau2, sigma2): high, medium and low SNR on three kernels
    ("rbf", 1.0, 0.05),
    ("matern52", 1.0, 0.5),
    ("powerlaw", 0.5, 2.0),
]


@pytest.mark.parametrize(("kernel", "tau2", "sigma2"), SETTINGS)
def test_closed_forms_agree_with_monte_carlo(kernel: str, tau2: float, sigma2: float) -> None:
    p = gp_sim.make_problem(kernel, n=32, seed=2)
    rho = theory.rho_from_c(p.lam, 0.5)
    T_grid = np.array([0.0, 1.0, 3.0, 10.0, 30.0])
    mc = gp_sim.simulate_risks(p, tau2, sigma2, rho, T_grid, 3000, np.random.default_rng(17))
    for closed, mean, se in [
        (mc.query_gap_closed, mc.query_gap_mc, mc.query_gap_se),
        (mc.prompt_risk_closed, mc.prompt_risk_mc, mc.prompt_risk_se),
        (mc.prompt_excess_closed, mc.prompt_excess_mc, mc.prompt_excess_se),
    ]:
        assert np.all(se > 0)
        assert np.all(np.abs(mean - closed) <= 3 * se), (closed, mean, se)
    # the closed forms here are the theory functions
    q = theory.gd_query_filter(p.lam, rho, T_grid)
    np.testing.assert_allclose(mc.query_gap_closed, theory.query_bayes_gap(p.lam, p.k_tilde, tau2, sigma2, q))


def test_monte_carlo_detects_a_wrong_formula() -> None:
    """The 3-SE check has power: a slightly wrong closed form (λ⋆ off by 20%) is rejected."""
    p = gp_sim.make_problem("rbf", n=32, seed=2)
    tau2, sigma2 = 1.0, 0.5
    rho = theory.rho_from_c(p.lam, 0.5)
    T_grid = np.array([0.0, 1.0, 3.0, 10.0, 30.0])
    mc = gp_sim.simulate_risks(p, tau2, sigma2, rho, T_grid, 3000, np.random.default_rng(17))
    wrong = theory.prompt_excess_risk(p.lam, tau2, 1.2 * sigma2, theory.gd_filter(p.lam, rho, T_grid))
    assert np.any(np.abs(mc.prompt_excess_mc - wrong) > 3 * mc.prompt_excess_se)


def test_pac_bayes_coverage() -> None:
    p = gp_sim.make_problem("matern52", n=40, seed=3)
    tau2, sigma2, delta = 1.0, 1.0, 0.05
    rho = theory.rho_from_c(p.lam, 0.5)
    T_grid = np.arange(31, dtype=float)
    ev = gp_sim.simulate_evidence(p, tau2, sigma2, rho, T_grid, 2500, np.random.default_rng(8), delta)
    assert ev.covered.size == 2500
    assert ev.coverage >= 1 - delta
    # cross-check against theory, and that the inequality is not vacuous: without the slack it fails
    pop = theory.population_evidence_risk(p.lam, rho, T_grid, sigma2, tau2, sigma2)
    np.testing.assert_allclose(ev.pop_at_map, pop[np.searchsorted(T_grid, ev.T_map_known)])
    assert ev.slack == pytest.approx(theory.pac_bayes_slack(p.lam, rho, T_grid, sigma2, tau2, sigma2, delta)[1])
    assert np.mean(ev.pop_at_map <= ev.ell_at_map) < 1 - delta


def test_evidence_mc_matches_theory_and_oracles() -> None:
    p = gp_sim.make_problem("rbf", n=24, seed=5)
    rho = theory.rho_from_c(p.lam, 0.5)
    T_grid = np.arange(21, dtype=float)
    ev = gp_sim.simulate_evidence(p, 1.0, 0.1, rho, T_grid, 200, np.random.default_rng(1))
    rt = p.U.T @ ev.r_first
    np.testing.assert_allclose(ev.scores_fixed_first, theory.evidence_scores(p.lam, rt, rho, T_grid, "fixed"))
    np.testing.assert_allclose(ev.scores_profiled_first, theory.profiled_scores(p.lam, rt, rho, T_grid))
    assert ev.T_map_fixed.shape == ev.T_map_mle.shape == (200,)
    assert set(np.unique(ev.T_map_mle)) <= set(T_grid)
    ex = theory.prompt_excess_risk(p.lam, 1.0, 0.1, theory.gd_filter(p.lam, rho, T_grid))
    assert ev.oracle_T_prompt == T_grid[np.argmin(ex)]


def test_shift_no_single_T_is_best() -> None:
    p = gp_sim.make_problem("rbf", n=48, seed=0)
    rho = theory.rho_from_c(p.lam, 0.5)
    T_grid = np.arange(31, dtype=float)
    sh = gp_sim.simulate_shift(p, 1.0, (0.02, 2.0), rho, T_grid, 200, np.random.default_rng(2))
    assert sh.T_best[0] != sh.T_best[1]
    assert sh.worst.min() > 1.2 * sh.excess.min(axis=1).max()  # committing to one T costs
    assert sh.T_map_mean[0] > sh.T_map_mean[1]  # evidence picks more steps at lower noise
    assert np.all(np.isfinite(sh.evidence_mc)) and np.all(sh.evidence_se > 0)


def test_projector_panel_numbers() -> None:
    p = gp_sim.make_problem("rbf", n=20, seed=0)
    pj = gp_sim.simulate_projector(p, 1.0, (0.1, 2.0), 0.5, np.arange(31.0), 6, 5, 4000, np.random.default_rng(3))
    assert pj.risk.max(axis=0).min() >= pj.lower_bound
    assert abs(pj.js_mc - pj.js_closed) <= 4 * pj.js_se
    assert abs(pj.full_fit_mc - pj.full_fit_closed) <= 4 * pj.full_fit_se
    assert abs(pj.floor_mc - pj.floor_closed) <= 4 * pj.floor_se
    assert pj.js_closed < pj.full_fit_closed


# ------------------------------------------------------------------ Bayes gap from evidence (DESIGN §5)
BAYES_GAP_SETTINGS = [
    # the GP lab page's defaults (σ² = 0.05, second level 2.0) …
    gp_lab.LabSettings(kernel="rbf", n=48, tau2=1.0, sigma2=0.05, c=0.5, T_max=30, n_draws=300, seed=0,
                       sigma2_b=2.0),
    # … and a low-SNR power-law spectrum with a larger step and a longer grid
    gp_lab.LabSettings(kernel="powerlaw", n=32, alpha=2.0, tau2=0.5, sigma2=2.0, c=0.8, T_max=60, n_draws=400,
                       seed=3, sigma2_b=None),
]


@pytest.mark.parametrize("s", BAYES_GAP_SETTINGS, ids=["page-defaults", "powerlaw-low-snr"])
def test_bayes_gap_from_evidence_monte_carlo_and_bound(s: gp_lab.LabSettings) -> None:
    """E‖f̂_T − f_Bayes‖² ≤ 4σ²·KL(N(0,Σ⋆) ‖ N(0,Σ_T)) in the lab's LabResult.

    Would catch: a wrong closed form or Σ_T in `bayes_gap_bound` (MC off by > 3 SE), a wrong filter or
    Bayes solve in the MC (same), a bound that fails (MC mean above it), the lab not reusing the risk
    experiment's draws (its GD-based prompt excess MC would differ), and a KL that is not the population
    evidence risk n·𝓛(T|K) up to a constant."""
    res = gp_lab.run_lab(s)
    bg = res.bayes_gap
    prob = res.problem
    np.testing.assert_array_equal(bg.T_grid, np.arange(s.T_max + 1, dtype=float))
    assert bg.n_draws == s.n_draws and np.all(bg.mc_se > 0)
    # the lab's curves are posterior_verdict's, for the lab's problem and grid
    from ttt_core.posterior_verdict import bayes_gap_bound
    ref = bayes_gap_bound(prob.lam, res.rho, res.T_grid, s.tau2, s.sigma2)
    np.testing.assert_allclose(bg.expected, ref.expected_gap, rtol=1e-12)
    np.testing.assert_allclose(bg.bound, ref.bound, rtol=1e-12)
    # and the closed form is the prompt excess risk of theory (an independent implementation)
    np.testing.assert_allclose(
        bg.expected, theory.prompt_excess_risk(prob.lam, s.tau2, s.sigma2, theory.gd_filter(prob.lam, res.rho, res.T_grid)),
        rtol=1e-10)
    # Monte Carlo within 3 SE of the closed form at every T, and below the bound at every T
    assert np.all(np.abs(bg.mc_mean - bg.expected) <= 3 * bg.mc_se), (bg.mc_mean - bg.expected) / bg.mc_se
    assert np.all(bg.mc_mean <= bg.bound)
    assert np.all(bg.expected <= bg.bound)
    # the same draws as the risk experiment: G_T r by the filter = Φθ_T by plain gradient descent
    np.testing.assert_allclose(bg.mc_mean, res.risks.prompt_excess_mc, rtol=1e-9)
    # KL = n·𝓛(T|K) − const: the smallest bound sits at the population-evidence optimum
    d = bg.kl - prob.n * res.evidence.population
    np.testing.assert_allclose(d, d[0], rtol=1e-10, atol=1e-9 * float(np.abs(bg.kl).max()))
    assert res.T_grid[int(np.argmin(bg.bound))] == res.evidence.oracle_T_evidence


def test_bayes_gap_monte_carlo_has_power() -> None:
    """The 3-SE check rejects a slightly wrong expectation (σ² off by 20% in Σ⋆) and an MC with the Bayes
    filter at the wrong noise level: it is not vacuous."""
    p = gp_sim.make_problem("rbf", n=32, seed=2)
    tau2, sigma2 = 1.0, 0.5
    rho = theory.rho_from_c(p.lam, 0.5)
    T_grid = np.array([0.0, 1.0, 3.0, 10.0, 30.0])
    dr = gp_sim.draw_benchmark(p, tau2, sigma2, 3000, np.random.default_rng(17))
    bg = gp_lab.bayes_gap_from_evidence(p, tau2, sigma2, rho, T_grid, dr)
    assert np.all(np.abs(bg.mc_mean - bg.expected) <= 3 * bg.mc_se)
    wrong = gp_lab.bayes_gap_from_evidence(p, tau2, 1.2 * sigma2, rho, T_grid, dr)  # Σ⋆, g⋆ at the wrong σ²
    assert np.any(np.abs(wrong.expected - bg.mc_mean) > 3 * bg.mc_se)
    # draws from a different noise level than the closed form assumes
    dr2 = gp_sim.draw_benchmark(p, tau2, 1.2 * sigma2, 3000, np.random.default_rng(17))
    off = gp_lab.bayes_gap_from_evidence(p, tau2, sigma2, rho, T_grid, dr2)
    assert np.any(np.abs(off.mc_mean - off.expected) > 3 * off.mc_se)
