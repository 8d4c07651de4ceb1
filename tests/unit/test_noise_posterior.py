"""Tests of the §5.1 posterior over λ⋆ = σ²/τ², its verdict probabilities, the plug-in slack and
the §5 "Bayes gap from evidence" bound (ttt_core/noise_posterior.py).  All numpy, seconds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from ttt_core import noise_posterior as npo
from ttt_core import posterior_verdict as pv
from ttt_core import theory


def gp_spectrum(n: int) -> np.ndarray:
    return 10.0 * np.arange(1, n + 1, dtype=float) ** -2.0


def gp_draw(lam: np.ndarray, tau2: float, sigma2: float, rng: np.random.Generator) -> np.ndarray:
    return np.sqrt(tau2 * lam + sigma2) * rng.standard_normal(lam.size)


# ------------------------------------------------------------------------------------------
# likelihood
# ------------------------------------------------------------------------------------------


def test_grid_loglik_matches_quadrature_over_sigma2() -> None:
    """Catches a wrong marginal likelihood: a mis-weighted log-det term, the wrong power of Σ r̃²/(1+sλ)
    (e.g. n/2 − 1 from a flat instead of Jeffreys prior), or zero modes handled as signal."""
    rng = np.random.default_rng(3)
    lam = np.array([5.0, 2.0, 1.0, 0.3, 0.05, 0.0, 0.0])  # two noise-only modes
    r = gp_draw(lam, 1.0, 0.2, rng)
    post = npo.noise_posterior(lam, r)
    n = lam.size

    def brute(s: float) -> float:
        v = 1.0 + s * lam
        Q = float(np.sum(r**2 / v))
        u0 = math.log(Q / n)  # peak of the integrand in u = log σ²

        def log_f(u: float) -> float:  # log[σ^-2 Π N(r̃_i; 0, σ²v_i)] + log dσ²/du  (Jeffreys)
            return float(-0.5 * n * math.log(2 * math.pi) - 0.5 * np.sum(np.log(v)) - 0.5 * n * u
                         - 0.5 * Q * math.exp(-u))

        ref = log_f(u0)
        val, _ = integrate.quad(lambda u: math.exp(log_f(u) - ref), u0 - 40, u0 + 60, points=[u0],
                                epsabs=0, epsrel=1e-11, limit=200)
        return ref + math.log(val)

    idx = [10, 60, 120, 180, 230]
    diffs = [brute(float(post.s_grid[j])) - post.log_lik[j] for j in idx]
    assert np.ptp(diffs) < 1e-8, diffs
    # and the public function agrees with the posterior's stored grid values
    np.testing.assert_allclose(npo.log_marginal_likelihood(lam, r, post.s_grid), post.log_lik, rtol=0, atol=1e-12)


def test_posterior_is_prior_times_likelihood_and_sigma2_is_inverse_gamma() -> None:
    """Catches a prior centred or scaled wrongly, a grid narrower than ±6 decades or < 200 points,
    and σ² quantiles that are not the inverse-gamma mixture (checked at a point-mass posterior)."""
    rng = np.random.default_rng(4)
    lam = gp_spectrum(12)
    r = gp_draw(lam, 1.0, 0.1, rng)
    post = npo.noise_posterior(lam, r)
    assert post.log10_grid.size == 241
    assert post.log10_grid[0] == pytest.approx(math.log10(lam.mean()) - 6.0)
    assert post.log10_grid[-1] == pytest.approx(math.log10(lam.mean()) + 6.0)
    logp = post.log_lik - 0.5 * ((post.log10_grid - math.log10(lam.mean())) / 1.5) ** 2
    w = np.exp(logp - logp.max())
    np.testing.assert_allclose(post.weights, w / w.sum(), rtol=1e-12, atol=1e-300)
    # exact IG quantiles: mix over the grid, compare with a scipy quantile of a single component
    j = int(np.argmax(post.weights))
    one = npo._ig_mixture_quantiles(np.eye(post.weights.size)[j], post.ig_shape, post.ig_scale[None, :],
                                    np.array([0.05, 0.5, 0.95]))
    ref = stats.invgamma(a=post.ig_shape, scale=post.ig_scale[j]).ppf([0.05, 0.5, 0.95])
    np.testing.assert_allclose(one[0], ref, rtol=1e-6)
    # mixture CDF at the reported σ² quantiles equals 5 %, 50 %, 95 %
    for p, x in [(0.05, post.sigma2.lo), (0.5, post.sigma2.median), (0.95, post.sigma2.hi)]:
        F = np.sum(post.weights * stats.invgamma(a=post.ig_shape, scale=post.ig_scale).cdf(x))
        assert F == pytest.approx(p, abs=1e-6)
    for p, x in [(0.05, post.tau2.lo), (0.95, post.tau2.hi)]:  # τ² = σ² s
        F = np.sum(post.weights * stats.invgamma(a=post.ig_shape, scale=post.ig_scale * post.s_grid).cdf(x))
        assert F == pytest.approx(p, abs=1e-6)
    # λ⋆ quantiles invert the grid CDF (each point's mass uniform over its 0.05-decade cell)
    h = post.log10_grid[1] - post.log10_grid[0]
    edges = np.r_[post.log10_grid - h / 2, post.log10_grid[-1] + h / 2]
    C = np.r_[0.0, np.cumsum(post.weights)]
    for p, x in [(0.05, post.lambda_star.lo), (0.5, post.lambda_star.median), (0.95, post.lambda_star.hi)]:
        assert np.interp(math.log10(x), edges, C) == pytest.approx(p, abs=1e-9)
    # per-mode SNR quantiles are λ_i times those of s
    np.testing.assert_allclose(post.snr.hi, lam * post.s.hi)
    assert post.s.median == pytest.approx(1.0 / post.lambda_star.median)
    assert post.ml.label == "maximum likelihood"


# ------------------------------------------------------------------------------------------
# scale equivariance
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [7.3, 1e-3])
def test_scale_equivariance(c: float) -> None:
    """Catches a prior or grid fixed in absolute units (e.g. centred at λ⋆ = 1 or built from σ² alone):
    rescaling K must move λ⋆'s interval by exactly c and leave P(TTT beats ICL) unchanged."""
    rng = np.random.default_rng(5)
    lam = gp_spectrum(20)
    r = gp_draw(lam, 1.0, 0.05, rng)
    k = np.sqrt(lam) * rng.standard_normal(lam.size)
    a = npo.noise_posterior(lam, r)
    b = npo.noise_posterior(c * lam, r)
    for f in ("median", "lo", "hi"):
        assert getattr(b.lambda_star, f) == pytest.approx(c * getattr(a.lambda_star, f), rel=1e-8)
        assert getattr(b.sigma2, f) == pytest.approx(getattr(a.sigma2, f), rel=1e-6)
        assert getattr(b.tau2, f) == pytest.approx(getattr(a.tau2, f) / c, rel=1e-6)
    assert b.log10_lambda_star_sd == pytest.approx(a.log10_lambda_star_sd, rel=1e-9)
    T = np.arange(0, 31)
    va = pv.verdict_probability_curve(a, lam, k, theory.rho_from_c(lam, 0.1), T)
    # k_x = Φφ(x) scales like K when Φ and φ(x) scale by √c
    vb = pv.verdict_probability_curve(b, c * lam, c * k, theory.rho_from_c(c * lam, 0.1), T)
    np.testing.assert_allclose(vb.prob, va.prob, atol=1e-9)
    assert vb.decision == va.decision


# ------------------------------------------------------------------------------------------
# coverage
# ------------------------------------------------------------------------------------------


def test_ci90_coverage_on_gp_draws() -> None:
    """Catches an interval that is too narrow (over-confident likelihood, wrong quantile interpolation)
    or a prior that swamps the data (DESIGN §5.1 reports 87–95 % at n = 10).

    1000 seeded draws per λ⋆ (the brief's minimum is 300): the true coverage at λ⋆ = 0.01 is ≈ 0.874
    (20 000 draws), so 300 draws would sit only ~1.2 standard errors above 0.85."""
    n = 10
    lam = gp_spectrum(n)
    rng = np.random.default_rng(2024)
    U, _ = np.linalg.qr(rng.standard_normal((n, n)))
    for lam_star in (0.01, 0.1, 1.0):
        z = rng.standard_normal((1000, n))
        r = (np.sqrt(lam + lam_star) * z) @ U.T  # r = U(√(τ²λ + σ²) z), τ² = 1, σ² = λ⋆
        batch = npo.lambda_star_posterior_batch(lam, r @ U)
        cover = np.mean((batch.lo <= lam_star) & (lam_star <= batch.hi))
        assert cover >= 0.85, (lam_star, cover)
    # the batch path is the same posterior as noise_posterior
    one = npo.noise_posterior(lam, (r @ U)[7])
    assert one.lambda_star.lo == pytest.approx(batch.lo[7], rel=1e-12)
    assert one.lambda_star.hi == pytest.approx(batch.hi[7], rel=1e-12)


# ------------------------------------------------------------------------------------------
# verdicts
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [3.0, 8.0, 25.0])
def test_sigma2_cancels_in_verdict_probability(T: float) -> None:
    """Catches a verdict that depends on σ² (it must not: DESIGN §5.1) and any mismatch with the §4
    criterion of theory.ttt_beats_icl; also checks E[gap] = Σ_j w_j gap(τ² = σ̄_j² s_j, σ̄_j²)."""
    rng = np.random.default_rng(6)
    lam = gp_spectrum(16)
    r = gp_draw(lam, 1.0, 0.3, rng)
    k = np.sqrt(lam) * rng.standard_normal(lam.size)
    rho = theory.rho_from_c(lam, 0.1)
    post = npo.noise_posterior(lam, r)
    v = pv.verdict_probability(post, lam, k, rho, T)
    q = theory.gd_query_filter(lam, rho, T)
    s2_mean = post.sigma2_mean_given_s
    probs: list[float] = []
    for sig2 in (s2_mean, np.ones_like(s2_mean)):
        beats = np.array([theory.ttt_beats_icl(lam, k, sig2[j] * s, sig2[j], q).beats
                          for j, s in enumerate(post.s_grid)])
        probs.append(float(post.weights @ beats))
    assert probs[0] == probs[1]
    assert v.prob == pytest.approx(probs[0], abs=1e-12)
    gaps_ttt = [theory.ttt_beats_icl(lam, k, s2_mean[j] * s, s2_mean[j], q) for j, s in enumerate(post.s_grid)]
    assert v.gap_ttt.mean == pytest.approx(sum(w * g.gap_ttt for w, g in zip(post.weights, gaps_ttt)), rel=1e-9)
    assert v.gap_icl.mean == pytest.approx(sum(w * g.gap_icl for w, g in zip(post.weights, gaps_ttt)), rel=1e-9)
    assert v.gap_ttt.lo <= v.gap_ttt.median <= v.gap_ttt.hi
    # the closed-form threshold: TTT wins iff λ⋆ < threshold
    assert v.prob == pytest.approx(float(post.weights @ (post.lambda_star_grid < v.lambda_star_threshold)), abs=1e-12)


def test_prompt_analogue_matches_prompt_excess_risk() -> None:
    """Catches a wrong prompt-value criterion (k_x None): it must compare theory.prompt_excess_risk of
    g_T with that of g ≡ 0 at every grid s, independently of σ²."""
    rng = np.random.default_rng(7)
    lam = gp_spectrum(16)
    r = gp_draw(lam, 1.0, 0.3, rng)
    rho = theory.rho_from_c(lam, 0.1)
    post = npo.noise_posterior(lam, r)
    v = pv.verdict_probability(post, lam, None, rho, 6.0)
    g = theory.gd_filter(lam, rho, 6.0)
    beats = np.array([theory.prompt_excess_risk(lam, 2.0 * s, 2.0, g) < theory.prompt_excess_risk(lam, 2.0 * s, 2.0, 0 * g)
                      for s in post.s_grid])
    assert v.kind == "prompt"
    assert v.prob == pytest.approx(float(post.weights @ beats), abs=1e-12)


def test_verdict_decisions_follow_the_theory() -> None:
    """Catches a verdict that ignores the data: (a) a high-SNR GP draw (λ⋆ = 1e-3) with the query on
    the top modes, T = 30: q_T ≈ q⋆ there, so P → 1 and "adapt"; (b) pure noise on a rank-128 K
    (n = 256) with the query on the null space, T = 30: on λ = 0, TTT wins iff s > ρT/2 = 1.5, and the
    noise pins s ≈ 0, so P → 0 and "don't adapt"; (c) T = 0 is ICL itself: never strictly better."""
    rng = np.random.default_rng(8)
    lam = gp_spectrum(256)
    rho = theory.rho_from_c(lam, 0.1)
    r = gp_draw(lam, 1.0, 1e-3, rng)
    k = np.zeros(256)
    k[:3] = 1.0
    v = pv.verdict_probability(npo.noise_posterior(lam, r), lam, k, rho, 30)
    assert v.prob >= 0.99 and v.decision == "adapt"

    lam2 = np.r_[np.ones(128), np.zeros(128)]
    rho2 = theory.rho_from_c(lam2, 0.1)
    noise = rng.standard_normal(256)
    k2 = np.r_[np.zeros(128), np.ones(128)]
    post2 = npo.noise_posterior(lam2, noise)
    v2 = pv.verdict_probability(post2, lam2, k2, rho2, 30)
    assert v2.lambda_star_threshold == pytest.approx(2.0 / (rho2 * 30))
    assert v2.prob <= 0.01 and v2.decision == "don't adapt"

    curve = pv.verdict_probability_curve(post2, lam2, k2, rho2, [0, 1, 30])
    assert curve.prob[0] == 0.0 and curve.decision[0] == "don't adapt"
    assert pv.decision_from_probability([0.95, 0.5, 0.05]) == ("adapt", "undetermined on this prompt", "don't adapt")


# ------------------------------------------------------------------------------------------
# Bayes gap from evidence (§5)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,tau2,sigma2", [(0, 1.0, 0.5), (5, 1.0, 0.1), (20, 0.5, 1.0), (3, 2.0, 0.01)])
def test_bayes_gap_bound_monte_carlo(T: int, tau2: float, sigma2: float) -> None:
    """Catches a wrong closed form of E‖f̂_T − f_Bayes‖² (f̂_T built here by matrix powers of I − ρK,
    f_Bayes by a linear solve — no spectral filters) and a bound that fails or is mis-scaled."""
    rng = np.random.default_rng(100 + T)
    n = 6
    lam = np.array([4.0, 2.0, 1.0, 0.5, 0.1, 0.0])
    U, _ = np.linalg.qr(rng.standard_normal((n, n)))
    K = U @ np.diag(lam) @ U.T
    rho = theory.rho_from_c(lam, 0.3)
    S = tau2 * K + sigma2 * np.eye(n)
    r = rng.standard_normal((20_000, n)) @ np.linalg.cholesky(S).T
    G_T = np.eye(n) - np.linalg.matrix_power(np.eye(n) - rho * K, T)
    G_B = tau2 * K @ np.linalg.inv(S)
    err = np.sum((r @ (G_T - G_B).T) ** 2, axis=1)
    res = pv.bayes_gap_bound(lam, rho, T, tau2, sigma2)
    se = err.std(ddof=1) / math.sqrt(err.size)
    assert abs(err.mean() - res.expected_gap) < 3 * se, (err.mean(), res.expected_gap, se)
    assert err.mean() < res.bound and res.expected_gap <= res.bound
    # KL against the dense Gaussian formula
    S_T = sigma2 * np.linalg.matrix_power(np.linalg.inv(np.eye(n) - rho * K), T)
    M = np.linalg.solve(S_T, S)
    kl = 0.5 * (np.trace(M) - n - np.linalg.slogdet(M)[1])
    assert res.kl == pytest.approx(kl, rel=1e-9, abs=1e-12)


def test_bayes_gap_bound_vectorised_over_T() -> None:
    """Catches broadcasting errors of the T-grid path (must equal the scalar calls)."""
    lam = gp_spectrum(8)
    rho = theory.rho_from_c(lam, 0.1)
    grid = pv.bayes_gap_bound(lam, rho, np.arange(0, 31), 1.0, 0.2)
    for T in (0, 7, 30):
        one = pv.bayes_gap_bound(lam, rho, T, 1.0, 0.2)
        assert grid.expected_gap[T] == pytest.approx(one.expected_gap)
        assert grid.bound[T] == pytest.approx(one.bound)
    assert np.all(grid.expected_gap <= grid.bound)


# ------------------------------------------------------------------------------------------
# slack interval
# ------------------------------------------------------------------------------------------


def test_slack_interval_reuses_pac_bayes_slack() -> None:
    """Catches a slack that is not theory.pac_bayes_slack at the plug-in Σ̂⋆, or an interval that does
    not bracket it; slack ∝ σ⋆² so the posterior is a scaled inverse-gamma mixture."""
    rng = np.random.default_rng(9)
    lam = gp_spectrum(40)
    r = gp_draw(lam, 1.0, 0.1, rng)
    rho = theory.rho_from_c(lam, 0.1)
    post = npo.noise_posterior(lam, r)
    si = pv.slack_interval(post, lam, r, rho, None, 0.05)
    _, ref = theory.pac_bayes_slack(lam, rho, theory.DEFAULT_T_GRID, float(np.mean(r**2)),
                                    post.tau2.median, post.sigma2.median, 0.05)
    assert si.at_median == pytest.approx(ref)
    assert si.posterior.lo < si.posterior.median < si.posterior.hi
    assert si.posterior.lo < si.at_median < si.posterior.hi
    assert "plug-in" in si.label
    # homogeneity used in the mixture: slack(σ⋆², s) = σ⋆² · slack(1, s)
    s = float(post.s_grid[100])
    a = theory.pac_bayes_slack(lam, rho, None, 0.3, 2.5 * s, 2.5, 0.05)[1]
    b = theory.pac_bayes_slack(lam, rho, None, 0.3, s, 1.0, 0.05)[1]
    assert a == pytest.approx(2.5 * b, rel=1e-12)


# ------------------------------------------------------------------------------------------
# identification flag and degenerate inputs
# ------------------------------------------------------------------------------------------


def test_flag_fires_on_tiny_prompt_not_on_informative_one() -> None:
    """Catches a flag that never fires (n = 2 teaches almost nothing about λ⋆) or always fires."""
    tiny = npo.noise_posterior([1.0, 0.5], [0.3, -1.2])
    assert tiny.weakly_identified
    assert tiny.flag_text == "the noise level is not identified by this prompt; the interval is mostly the prior's"
    lam = gp_spectrum(256)
    big = npo.noise_posterior(lam, gp_draw(lam, 1.0, 0.1, np.random.default_rng(1)))
    assert not big.weakly_identified and not big.at_grid_end and big.flag_text is None
    assert big.lambda_star.covers(0.1)


def test_grid_end_flag() -> None:
    """Catches a missing grid-end check: r exactly in range(K) of a rank-deficient K makes the
    likelihood grow like s^{(n−rank)/2} as λ⋆ → 0, pushing mass to the low end."""
    lam = np.r_[np.ones(4), np.zeros(60)]
    r = np.r_[np.ones(4), np.zeros(60)]
    post = npo.noise_posterior(lam, r)
    assert post.at_grid_end and post.grid_end == "low lambda*"
    assert post.flag_text is not None and "end of the lambda* grid" in post.flag_text


def test_degenerate_inputs_are_finite() -> None:
    """Catches NaN/crash on the documented degenerate cases: r = 0, n = 1, all eigenvalues zero,
    and zero modes (which carry only noise)."""
    p0 = npo.noise_posterior([2.0, 1.0, 0.0], [0.0, 0.0, 0.0])  # r = 0: posterior = prior, σ² = 0
    np.testing.assert_allclose(p0.weights, np.exp(p0.log_prior) / np.exp(p0.log_prior).sum())
    assert p0.sigma2.hi == 0.0 and p0.tau2.hi == 0.0 and p0.weakly_identified
    v0 = pv.verdict_probability(p0, [2.0, 1.0, 0.0], [1.0, 0.0, 0.0], 0.1, 5)
    assert v0.gap_ttt.mean == 0.0 and 0.0 <= v0.prob <= 1.0

    p1 = npo.noise_posterior([3.0], [0.7])  # n = 1: IG(1/2) has no mean
    assert np.isfinite(p1.sigma2.hi) and p1.sigma2.mean == math.inf and p1.weakly_identified

    pz = npo.noise_posterior(np.zeros(5), [1.0, -0.5, 0.2, 0.0, 2.0])  # s unidentified
    assert pz.prior_centre_log10 == 0.0 and pz.weakly_identified
    assert np.allclose(pz.log_lik, pz.log_lik[0])
    assert pz.sigma2.median == pytest.approx(stats.invgamma(a=2.5, scale=0.5 * (1 + 0.25 + 0.04 + 4)).median(), rel=1e-6)

    for p in (p0, p1, pz):
        for iv in (p.lambda_star, p.sigma2, p.tau2):
            assert np.isfinite([iv.median, iv.lo, iv.hi]).all()


@pytest.mark.parametrize(
    "lam,r,match",
    [
        ([1.0, np.nan], [0.1, 0.2], "NaN or inf"),
        ([1.0, 0.5], [np.inf, 0.2], "NaN or inf"),
        ([1.0, 0.5], [0.1], "same shape"),
        ([], [], "empty"),
        ([1.0, -0.5], [0.1, 0.2], "positive semi-definite"),
        ([[1.0]], [[0.1]], "1-D"),
    ],
)
def test_bad_input_raises(lam, r, match) -> None:
    """Catches silent NaN propagation or a cryptic numpy error on bad input."""
    with pytest.raises(ValueError, match=match):
        npo.noise_posterior(lam, r)


def test_bad_arguments_raise() -> None:
    """Catches unchecked grid size, query shape, step size and variances."""
    lam, r = gp_spectrum(5), np.ones(5)
    with pytest.raises(ValueError, match=">= 200"):
        npo.noise_posterior(lam, r, grid_points=50)
    post = npo.noise_posterior(lam, r)
    with pytest.raises(ValueError, match="k_tilde"):
        pv.verdict_probability(post, lam, np.ones(4), 0.01, 3)
    with pytest.raises(ValueError, match="NaN or inf"):
        pv.verdict_probability(post, lam, np.r_[np.ones(4), np.nan], 0.01, 3)
    with pytest.raises(ValueError, match="n = 5"):
        pv.verdict_probability(post, gp_spectrum(6), np.ones(6), 0.01, 3)
    with pytest.raises(ValueError, match="rho"):
        pv.verdict_probability(post, lam, np.ones(5), 1.0, 3)
    with pytest.raises(ValueError, match="T_grid"):
        pv.verdict_probability_curve(post, lam, np.ones(5), 0.01, [-1, 2])
    with pytest.raises(ValueError, match="sigma2"):
        pv.bayes_gap_bound(lam, 0.01, 3, 1.0, 0.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        npo.lambda_star_posterior_batch(lam, np.full((2, 5), np.nan))
