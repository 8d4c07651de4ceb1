"""Tests of ttt_core.theory against independent dense computations (DESIGN §3-§5)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import linalg, optimize

from ttt_core import gp_sim, theory


def random_psd(n: int, rank: int, rng: np.random.Generator, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """K = ΦΦᵀ with Φ of shape (n, rank); returns (K, Φ)."""
    Phi = scale * rng.standard_normal((n, rank)) / np.sqrt(rank)
    return Phi @ Phi.T, Phi


def mpow(M: np.ndarray, T: int) -> np.ndarray:
    return np.linalg.matrix_power(M, int(T))


# ------------------------------------------------------------------------------ filters


def test_query_filter_continuous_at_zero() -> None:
    rho, T = 0.3, 7.0
    lam = np.array([0.0, 1e-300, 1e-15, 1e-10, 1e-6, 1.0])
    q = theory.gd_query_filter(lam, rho, T)
    assert q[0] == pytest.approx(rho * T, rel=0, abs=0)
    np.testing.assert_allclose(q[1:4], rho * T, rtol=1e-8)
    # q_T(λ) = ρ Σ_{t<T} (1 − ρλ)^t exactly (finite geometric sum)
    geo = rho * sum((1 - rho * lam) ** t for t in range(int(T)))
    np.testing.assert_allclose(q, geo, rtol=1e-12)
    # K q_T(K) = g_T(K)
    g = theory.gd_filter(lam, rho, T)
    np.testing.assert_allclose(lam * q, g, rtol=1e-12, atol=1e-300)


def test_filters_in_unit_interval_and_shapes() -> None:
    rng = np.random.default_rng(0)
    lam = np.sort(rng.exponential(size=50))[::-1]
    lam[-5:] = 0.0
    rho = 0.999 / lam.max()
    T = np.arange(0, 200, dtype=float)
    g = theory.gd_filter(lam, rho, T)
    assert g.shape == (T.size, lam.size)
    assert np.all(g >= 0) and np.all(g <= 1)  # exact value < 1; rounds to 1 once (1-ρλ)^T < eps
    resid = np.power(1 - rho * lam, T[:, None])
    np.testing.assert_allclose(1 - g, resid, rtol=1e-9, atol=1e-15)
    assert np.all(g[resid > 1e-15] < 1)
    g_half = theory.gd_filter(lam, 0.5 / lam.max(), np.arange(41.0))
    assert np.all(g_half >= 0) and np.all(g_half < 1)
    assert np.all(np.diff(g, axis=0) >= 0)  # more steps never shrink a mode more
    q = theory.gd_query_filter(lam, rho, T)
    assert q.shape == (T.size, lam.size)
    assert np.all(q >= 0) and np.all(q <= rho * T[:, None] + 1e-15)
    assert theory.gd_filter(lam, rho, 3.0).shape == lam.shape


def test_no_overflow_at_huge_T() -> None:
    lam = np.array([0.0, 1e-12, 1e-3, 0.5, 1.0])
    rho = 0.9
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        g = theory.gd_filter(lam, rho, 1e4)
        q = theory.gd_query_filter(lam, rho, [1.0, 1e4])
        s = theory.evidence_scores(lam, np.ones(5), rho, [0.0, 1e4], noise=0.5)
        s2 = theory.evidence_scores(lam, np.ones(5), rho, [0.0, 1e4], noise="mle")
    for x in (g, q, s, s2):
        assert np.all(np.isfinite(x))
    assert np.all((g >= 0) & (g <= 1))
    assert q[1, 0] == pytest.approx(rho * 1e4)
    assert q[1, -1] == pytest.approx(1.0)  # (1 − 0)/1 once the mode is fully fitted


def test_rho_validation_messages() -> None:
    lam = np.array([2.0, 1.0, 0.0])
    with pytest.raises(ValueError) as err:
        theory.gd_filter(lam, 0.5, 3)
    msg = str(err.value)
    assert "rho=0.5" in msg and "lambda_max=2" in msg and "0.5" in msg and "1/lambda_max" in msg
    with pytest.raises(ValueError):
        theory.gd_query_filter(lam, 0.7, 3)
    with pytest.raises(ValueError):
        theory.evidence_scores(lam, np.ones(3), 1.0, None)
    with pytest.raises(ValueError):
        theory.gd_filter(lam, 0.0, 3)
    with pytest.raises(ValueError):
        theory.gd_filter(lam, -0.1, 3)
    with pytest.raises(ValueError):
        theory.gd_filter(lam, 0.1, -1)
    # round-off negatives are zeros, real negatives are errors
    np.testing.assert_array_equal(theory.gd_filter(np.array([1.0, -1e-14]), 0.5, 2)[1], 0.0)
    with pytest.raises(ValueError, match="positive semi-definite"):
        theory.gd_filter(np.array([1.0, -1e-3]), 0.5, 2)
    assert theory.rho_from_c(lam, 0.5) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        theory.rho_from_c(lam, 1.0)
    theory.check_rho(lam, 0.4999)


def test_gradient_flow_limit_and_lemma_G2() -> None:
    lam = np.linspace(0.0, 3.0, 31)
    t = 2.5
    flow = theory.gradient_flow_filter(lam, t)
    errs = []
    for rho in [1e-2, 1e-3, 1e-4]:
        T = t / rho
        g = theory.gd_filter(lam, rho, T)
        diff = g - flow
        bound = T * (rho * lam) ** 2 / (2 * (1 - rho * lam)) * np.exp(-t * lam)
        assert np.all(diff >= -1e-14) and np.all(diff <= bound + 1e-14)
        errs.append(np.max(np.abs(diff)))
        np.testing.assert_allclose(theory.gd_query_filter(lam, rho, T),
                                   theory.gradient_flow_query_filter(lam, t), atol=5 * rho * t)
    assert errs[2] < errs[1] < errs[0] and errs[2] < 1e-3


def test_matching_time_and_bayes_filters() -> None:
    lam = np.array([0.0, 0.1, 1.0, 10.0])
    lam_star = 0.3
    t_star = theory.matching_time(lam, lam_star)
    flow_at = np.array([theory.gradient_flow_filter(lam[i : i + 1], t_star[i])[0] for i in range(4)])
    np.testing.assert_allclose(flow_at, theory.bayes_filter(lam, lam_star), atol=1e-15)
    assert t_star[0] == pytest.approx(1 / lam_star)
    np.testing.assert_allclose(theory.bayes_query_filter(lam, lam_star) * lam, theory.bayes_filter(lam, lam_star))
    with pytest.raises(ValueError):
        theory.bayes_filter(lam, 0.0)


# ------------------------------------------------------------------------------ identities with GD


@pytest.mark.parametrize("rank", [12, 7])
def test_ttt_equals_posterior_mean_and_query_form(rank: int) -> None:
    rng = np.random.default_rng(rank)
    n, sigma2 = 12, 0.3
    K, Phi = random_psd(n, rank, rng, scale=1.5)
    phi_x = rng.standard_normal(rank)
    k_x = Phi @ phi_x
    lam, U = theory.eigh_psd(K)
    rho = theory.rho_from_c(lam, 0.45)
    r = rng.standard_normal(n)
    T_list = [0, 1, 3, 8, 20]
    thetas = gp_sim.gradient_descent(Phi, r, rho, sigma2, T_list)  # plain GD, independent
    I = np.eye(n)
    for T, th in zip(T_list, thetas, strict=True):
        G = I - mpow(I - rho * K, T)
        C = sigma2 * G @ np.linalg.inv(I - G)
        post = C @ np.linalg.solve(C + sigma2 * I, r)
        assert np.max(np.abs(Phi @ th - post)) <= 1e-8
        # Σ_T = C_T + σ²I = σ²(I − ρK)^{−T}
        Sigma_T = sigma2 * np.linalg.inv(mpow(I - rho * K, T))
        np.testing.assert_allclose(C + sigma2 * I, Sigma_T, atol=1e-9 * np.abs(Sigma_T).max())
        np.testing.assert_allclose(U @ np.diag(theory.evidence_cov_eigs(lam, rho, T, sigma2)) @ U.T, Sigma_T,
                                   atol=1e-9 * np.abs(Sigma_T).max())
        np.testing.assert_allclose(U @ np.diag(theory.implied_prior_eigs(lam, rho, T, sigma2)) @ U.T, C,
                                   atol=1e-9 * max(np.abs(C).max(), 1.0))
        # query form via the spectral filter versus φ(x)ᵀθ_T from GD
        h_filter = (U.T @ k_x) @ (theory.gd_query_filter(lam, rho, T) * (U.T @ r))
        assert abs(h_filter - phi_x @ th) <= 1e-10 * max(1.0, abs(phi_x @ th))
        # prompt form via g_T
        np.testing.assert_allclose(U @ (theory.gd_filter(lam, rho, T) * (U.T @ r)), Phi @ th, atol=1e-10)


# ------------------------------------------------------------------------------ risk formulas


def _dense_filters(K: np.ndarray, rho: float, T: int, tau2: float, sigma2: float):
    n = K.shape[0]
    I = np.eye(n)
    G = I - mpow(I - rho * K, T)
    Q = rho * sum(mpow(I - rho * K, t) for t in range(T)) if T > 0 else np.zeros((n, n))
    Sstar = tau2 * K + sigma2 * I
    Qstar = tau2 * np.linalg.inv(Sstar)  # (K + λ⋆I)^{-1}
    Gstar = tau2 * K @ np.linalg.inv(Sstar)
    return G, Q, Gstar, Qstar, Sstar


def test_query_gap_and_prompt_risks_match_dense() -> None:
    rng = np.random.default_rng(3)
    n, tau2, sigma2 = 15, 1.7, 0.4
    K, Phi = random_psd(n, 9, rng)
    k_x = Phi @ rng.standard_normal(9)
    lam, U = theory.eigh_psd(K)
    rho = theory.rho_from_c(lam, 0.6)
    kt = U.T @ k_x
    T_list = [0, 1, 4, 12]
    q_rows = theory.gd_query_filter(lam, rho, np.array(T_list, float))
    g_rows = theory.gd_filter(lam, rho, np.array(T_list, float))
    gaps = theory.query_bayes_gap(lam, kt, tau2, sigma2, q_rows)
    ex = theory.prompt_excess_risk(lam, tau2, sigma2, g_rows)
    pr = theory.prompt_risk(lam, tau2, sigma2, g_rows)
    for j, T in enumerate(T_list):
        G, Q, Gs, Qs, Ss = _dense_filters(K, rho, T, tau2, sigma2)
        D = Q - Qs
        assert gaps[j] == pytest.approx(k_x @ D @ Ss @ D @ k_x, rel=1e-9)
        E = G - Gs
        assert ex[j] == pytest.approx(np.trace(E @ Ss @ E.T), rel=1e-9)
        R = G - np.eye(n)
        assert pr[j] == pytest.approx(tau2 * np.trace(R @ K @ R.T) + sigma2 * np.trace(G @ G.T), rel=1e-9)
        assert theory.query_bayes_gap(lam, kt, tau2, sigma2, q_rows[j]) == pytest.approx(gaps[j])
    verdict = theory.ttt_beats_icl(lam, kt, tau2, sigma2, q_rows)
    assert verdict.gap_icl == pytest.approx(gaps[0])  # T = 0 is ICL
    np.testing.assert_array_equal(verdict.beats, gaps < gaps[0])
    assert theory.ttt_beats_icl(lam, kt, tau2, sigma2, q_rows[0]).beats is False


# ------------------------------------------------------------------------------ evidence


def _dense_ell(K: np.ndarray, r: np.ndarray, rho: float, T: int, sigma2: float) -> float:
    n = K.shape[0]
    Sigma = sigma2 * np.linalg.inv(mpow(np.eye(n) - rho * K, T))
    sign, logdet = np.linalg.slogdet(Sigma)
    assert sign > 0
    return (logdet + r @ np.linalg.solve(Sigma, r)) / (2 * n)


@pytest.mark.parametrize("rank", [40, 25])
def test_evidence_scores_match_dense(rank: int) -> None:
    rng = np.random.default_rng(10 + rank)
    n = 40
    K, _ = random_psd(n, rank, rng, scale=2.0)
    lam, U = theory.eigh_psd(K)
    rho = theory.rho_from_c(lam, 0.3)
    r = 0.7 * rng.standard_normal(n)
    rt = U.T @ r
    grid = np.arange(31, dtype=float)
    I = np.eye(n)
    # float σ²
    s = theory.evidence_scores(lam, rt, rho, grid, noise=0.37)
    dense = np.array([_dense_ell(K, r, rho, T, 0.37) for T in range(31)])
    np.testing.assert_allclose(s, dense, rtol=1e-10, atol=1e-10 * np.abs(dense).max())
    # fixed σ̂² = ‖r‖²/n
    s2_hat = r @ r / n
    s = theory.evidence_scores(lam, rt, rho, grid, noise="fixed")
    dense = np.array([_dense_ell(K, r, rho, T, s2_hat) for T in range(31)])
    np.testing.assert_allclose(s, dense, rtol=1e-10, atol=1e-10 * np.abs(dense).max())
    # mle: L_MLE(T) = log((1/n) rᵀ(I − ρK)^T r) + (1/n) log det (I − ρK)^{−T}
    s = theory.evidence_scores(lam, rt, rho, grid, noise="mle")
    dense = []
    for T in range(31):
        M = mpow(I - rho * K, T)
        dense.append(np.log(r @ M @ r / n) + np.linalg.slogdet(np.linalg.inv(M))[1] / n)
    dense = np.array(dense)
    np.testing.assert_allclose(s, dense, rtol=1e-10, atol=1e-10 * np.abs(dense).max())
    # profiled = min over σ² of the dense ℓ_T, attained at σ̂_T² = rᵀ(I−ρK)^T r / n
    prof = theory.profiled_scores(lam, rt, rho, grid)
    dense_min = np.array([_dense_ell(K, r, rho, T, r @ mpow(I - rho * K, T) @ r / n) for T in range(31)])
    np.testing.assert_allclose(prof, dense_min, rtol=1e-10, atol=1e-10)
    for T in (0, 5, 30):  # and it is a minimum
        s2T = r @ mpow(I - rho * K, T) @ r / n
        assert prof[T] <= _dense_ell(K, r, rho, T, 1.1 * s2T) and prof[T] <= _dense_ell(K, r, rho, T, 0.9 * s2T)
    # batched rows equal single rows; select_steps is the argmin
    R = rng.standard_normal((3, n))
    batch = theory.evidence_scores(lam, R @ U, rho, grid, noise="fixed")
    for i in range(3):
        np.testing.assert_allclose(batch[i], theory.evidence_scores(lam, U.T @ R[i], rho, grid, "fixed"))
        assert theory.select_steps(lam, U.T @ R[i], rho, grid, "fixed") == grid[np.argmin(batch[i])]
    np.testing.assert_array_equal(theory.select_steps(lam, R @ U, rho, grid, "mle"),
                                  grid[np.argmin(theory.evidence_scores(lam, R @ U, rho, grid, "mle"), axis=1)])


def test_evidence_zero_residual_is_finite() -> None:
    lam = np.array([1.0, 0.5, 0.0])
    for noise in ("fixed", "mle", 0.1):
        s = theory.evidence_scores(lam, np.zeros(3), 0.5, None, noise)
        assert s.shape == (31,) and np.all(np.isfinite(s))
    assert theory.select_steps(lam, np.zeros(3), 0.5, None, "fixed") == 0.0


def test_gibbs_posterior_and_model_average() -> None:
    scores = np.array([3.0, 1.0, 2.0, 1.0 + 1e-12])
    nu = theory.gibbs_posterior(scores, beta=2.0, n=5)
    direct = np.exp(-10 * scores) / np.exp(-10 * scores).sum()
    np.testing.assert_allclose(nu, direct, rtol=1e-12)
    huge = theory.gibbs_posterior(scores * 1e6, beta=1.0, n=1000)
    assert np.all(np.isfinite(huge)) and huge.sum() == pytest.approx(1.0) and np.argmax(huge) == 1
    prior = np.array([1.0, 0.0, 1.0, 1.0])
    nu_p = theory.gibbs_posterior(scores, 1.0, prior, n=3)
    assert nu_p[1] == 0.0 and nu_p.sum() == pytest.approx(1.0)
    point = np.array([0.0, 1.0, 0.0, 0.0])
    assert theory.kl_to_prior(point) == pytest.approx(np.log(4))
    assert theory.kl_to_prior(np.full(4, 0.25)) == pytest.approx(0.0, abs=1e-15)
    lam = np.array([2.0, 1.0, 0.0])
    grid = np.array([0.0, 3.0, 10.0])
    w = np.array([0.2, 0.5, 0.3])
    avg = theory.model_averaged_filter(lam, 0.2, grid, w)
    np.testing.assert_allclose(avg, w @ theory.gd_filter(lam, 0.2, grid))
    np.testing.assert_allclose(theory.model_averaged_filter(lam, 0.2, grid, w, query=True)[2], 0.2 * (w @ grid))


# ------------------------------------------------------------------------------ signal / noise fit


def _dense_negloglik(params: np.ndarray, K: np.ndarray, r: np.ndarray) -> float:
    tau2, sigma2 = np.exp(params)
    n = K.shape[0]
    C = tau2 * K + sigma2 * np.eye(n)
    sign, logdet = np.linalg.slogdet(C)
    if sign <= 0:
        return np.inf
    return 0.5 * (n * np.log(2 * np.pi) + logdet + r @ np.linalg.solve(C, r)) / n


def _scipy_best(K: np.ndarray, r: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's finite differences near overflow
        return _scipy_best_inner(K, r)


def _scipy_best_inner(K: np.ndarray, r: np.ndarray) -> float:
    best = np.inf
    scale = max(np.log(r @ r / len(r) + 1e-300), -690)
    for start in [(0.0, 0.0), (scale, scale), (scale + 3, scale - 3), (scale - 3, scale + 3), (2.0, -4.0)]:
        for method in ("Nelder-Mead", "L-BFGS-B"):
            res = optimize.minimize(_dense_negloglik, np.array(start, float), args=(K, r), method=method,
                                    options={"maxiter": 4000} if method == "Nelder-Mead" else {})
            if np.isfinite(res.fun):
                best = min(best, float(res.fun))
    return -best


@pytest.mark.parametrize("case", ["full", "rank_deficient", "tiny_r", "pure_noise"])
def test_fit_signal_noise_beats_scipy(case: str) -> None:
    rng = np.random.default_rng({"full": 1, "rank_deficient": 2, "tiny_r": 3, "pure_noise": 4}[case])
    n = 30
    rank = 30 if case in ("full", "pure_noise") else 8
    K, Phi = random_psd(n, rank, rng, scale=3.0)
    f = Phi @ rng.standard_normal(rank) * (0.0 if case == "pure_noise" else 1.3)
    r = f + 0.5 * rng.standard_normal(n)
    if case == "tiny_r":
        r = 1e-9 * r
    lam, U = theory.eigh_psd(K)
    tau2, sigma2, ll = theory.fit_signal_noise(lam, U.T @ r)
    assert np.isfinite([tau2, sigma2, ll]).all() and tau2 >= 0 and sigma2 > 0
    assert ll == pytest.approx(-_dense_negloglik(np.log([max(tau2, 1e-300), sigma2]), K, r), rel=1e-9, abs=1e-9)
    assert ll >= _scipy_best(K, r) - 1e-9


def test_fit_signal_noise_degenerate_and_recovery() -> None:
    lam = np.array([3.0, 1.0, 0.0, 0.0])
    for rt in (np.zeros(4), np.array([1.0, 2.0, 0.0, 0.0])):  # r = 0; r in range(K) (unbounded likelihood)
        out = theory.fit_signal_noise(lam, rt)
        assert not np.any(np.isnan(out)) and out[1] > 0
    out = theory.fit_signal_noise(np.zeros(4), np.ones(4))
    assert out[0] == 0.0 and out[1] == pytest.approx(1.0)
    # consistent recovery on a long prompt (n = 2000 independent modes)
    rng = np.random.default_rng(5)
    lam = rng.exponential(size=2000)
    rt = np.sqrt(2.0 * lam + 0.5) * rng.standard_normal(2000)
    tau2, sigma2, _ = theory.fit_signal_noise(lam, rt)
    assert tau2 == pytest.approx(2.0, rel=0.2) and sigma2 == pytest.approx(0.5, rel=0.2)


# ------------------------------------------------------------------------------ population risk / PAC-Bayes


def test_population_risk_and_pac_slack_match_dense() -> None:
    rng = np.random.default_rng(7)
    n, tau2s, sigma2s, sigma2 = 20, 1.4, 0.3, 0.5
    K, _ = random_psd(n, 14, rng)
    lam, U = theory.eigh_psd(K)
    rho = theory.rho_from_c(lam, 0.4)
    grid = np.arange(0, 16, dtype=float)
    I = np.eye(n)
    Sstar = tau2s * K + sigma2s * I
    root = np.real(linalg.sqrtm(Sstar))
    pop = theory.population_evidence_risk(lam, rho, grid, sigma2, tau2s, sigma2s)
    vs = []
    for j, T in enumerate(range(16)):
        Sigma = sigma2 * np.linalg.inv(mpow(I - rho * K, T))
        dense = (np.linalg.slogdet(Sigma)[1] + np.trace(np.linalg.solve(Sigma, Sstar))) / (2 * n)
        assert pop[j] == pytest.approx(dense, rel=1e-10)
        A = root @ np.linalg.solve(Sigma, root)
        vs.append(np.trace(A @ A) / n)
    v_bar, slack = theory.pac_bayes_slack(lam, rho, grid, sigma2, tau2s, sigma2s, 0.05)
    assert v_bar == pytest.approx(max(vs), rel=1e-8)
    assert slack == pytest.approx(np.sqrt(max(vs) * (np.log(16) + np.log(20)) / n), rel=1e-8)
    # population risk is the mean of ℓ_T over draws (Monte Carlo within 4 SE)
    R = rng.standard_normal((4000, n)) @ root
    ell = theory.evidence_scores(lam, R @ U, rho, grid, sigma2)
    m, se = ell.mean(0), ell.std(0, ddof=1) / np.sqrt(4000)
    assert np.all(np.abs(m - pop) <= 4 * se)
    # the general bound with ν = δ_T and the optimal β reproduces ℓ_T + slack
    kl = np.log(16)
    beta = theory.optimal_beta(v_bar, n, 0.05, kl=kl)
    nu = np.zeros(16)
    nu[4] = 1.0
    bound = theory.pac_bayes_general_bound(ell[0], nu, beta, n, v_bar, 0.05)
    assert bound == pytest.approx(ell[0, 4] + slack, rel=1e-12)


# ------------------------------------------------------------------------------ shift, James–Stein, floor


def test_no_fixed_T_lower_bound_projector() -> None:
    rng = np.random.default_rng(11)
    n, m, sigma2 = 10, 4, 0.5
    B = np.linalg.qr(rng.standard_normal((n, m)))[0]
    K = B @ B.T
    lams = np.array([0.2, 3.0])
    a_grid = np.linspace(0, 1, 501)
    risk = theory.fixed_estimator_shift_risk(a_grid, lams, sigma2, m)
    lb = theory.no_fixed_T_lower_bound(lams[0], lams[1], sigma2, m)
    assert risk.shape == (2, 501)
    assert risk.max(axis=0).min() >= lb - 1e-12
    # exact risk formula vs Monte Carlo at a = 0.5 for λ_1 (f⋆ ~ N(0, τ²K), r = f⋆ + ε)
    tau2 = sigma2 / lams[0]
    draws = 20000
    f = (rng.standard_normal((draws, n)) @ B) @ B.T * np.sqrt(tau2)
    r = f + np.sqrt(sigma2) * rng.standard_normal((draws, n))
    s1 = 1 / (1 + lams[0])
    err = np.sum(((0.5 - s1) * r @ K) ** 2, axis=1)
    exact = theory.fixed_estimator_shift_risk(0.5, lams[0], sigma2, m)
    assert abs(err.mean() - exact) <= 4 * err.std(ddof=1) / np.sqrt(draws)


def test_james_stein_and_floor() -> None:
    rng = np.random.default_rng(12)
    d, tau2, sigma2, draws = 6, 0.5, 1.0, 20000
    f = np.sqrt(tau2) * rng.standard_normal((draws, d))
    r = f + rng.standard_normal((draws, d))
    js = theory.subspace_james_stein(r, np.eye(d), sigma2)
    full, js_closed = theory.james_stein_risk_projector(d, tau2, sigma2)
    err_js = np.sum((js - f) ** 2, axis=1)
    err_full = np.sum((r - f) ** 2, axis=1)
    assert err_js.mean() < err_full.mean()
    assert abs(err_js.mean() - js_closed) <= 4 * err_js.std(ddof=1) / np.sqrt(draws)
    assert abs(err_full.mean() - full) <= 4 * err_full.std(ddof=1) / np.sqrt(draws)
    # floor: no T gets below ‖Π_{S⊥} f⋆‖²
    n = 12
    K, Phi = random_psd(n, 5, rng)
    lam, U = theory.eigh_psd(K)
    basis = U[:, :5]
    f_star = rng.standard_normal(n)
    floor = theory.out_of_range_floor(f_star, basis)
    assert floor == pytest.approx(np.sum((f_star - basis @ (basis.T @ f_star)) ** 2))
    assert theory.out_of_range_floor(basis @ rng.standard_normal(5), basis) == pytest.approx(0.0, abs=1e-12)
    rho = theory.rho_from_c(lam, 0.9)
    r = f_star + 0.1 * rng.standard_normal(n)
    g = theory.gd_filter(lam, rho, np.arange(0, 2000, 10.0))
    errs = np.sum(((g * (U.T @ r)) @ U.T - f_star) ** 2, axis=1)
    assert errs.min() >= floor - 1e-12
