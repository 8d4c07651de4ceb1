"""Posterior over the noise-to-signal ratio λ⋆ = σ²/τ² of one prompt (DESIGN §5.1, §4, §5).

Everything works in the eigenbasis of the prompt kernel K = U diag(λ) Uᵀ (DESIGN §2): callers
pass the eigenvalues ``lam`` (shape ``(n,)``), ``r_tilde = Uᵀr`` and ``k_tilde = Uᵀk_x``.

Model (DESIGN §5.1).  r̃_i ~ N(0, σ²(1 + sλ_i)) independently, s = τ²/σ² = 1/λ⋆.
Prior: Jeffreys p(σ²) ∝ 1/σ² and log₁₀ λ⋆ ~ N(c, 1.5²) with c = log₁₀(mean λ) = log₁₀(tr K/n),
on a uniform grid of log₁₀ λ⋆ spanning c ± 6 decades (≥ 200 points; 241 by default, 0.05
decades apart).  Integrating σ² out,

    log p(r | s) = −½ Σ_i log(1 + sλ_i) − (n/2) log Σ_i r̃_i²/(1 + sλ_i)   (+ const),

and σ² | s, r ~ inverse-gamma(n/2, ½ Σ_i r̃_i²/(1 + sλ_i)).  The grid posterior costs O(grid·n).

Quantiles.  Quantities that are functions of s alone (λ⋆, s, the per-mode SNR sλ_i) use the grid
CDF, each grid point's mass spread uniformly over its cell in log₁₀ λ⋆ and linearly interpolated.
Quantities of the form σ²·c(s) (σ², τ² = σ²s, the query/prompt gaps, the PAC-Bayes slack) are a
mixture over the grid of scaled inverse gammas; their quantiles are EXACT mixture quantiles
(the mixture CDF Σ_j w_j Q(n/2, β_j c_j/x), Q the regularised upper incomplete gamma, solved by
bisection in log x to a relative tolerance of 1e-7) — no Monte-Carlo.  Posterior means of σ²·c(s)
use E[σ² | s] = β/(n/2 − 1), which is finite only for n ≥ 3 (reported as inf for n ≤ 2).

Degenerate inputs (all handled, never NaN): λ_i = 0 modes carry only noise (1 + sλ_i = 1);
r = 0 carries no information (posterior = prior, σ² = τ² = 0); all eigenvalues zero leaves s
unidentified (posterior = prior, grid centred at log₁₀ λ⋆ = 0, the flag fires); n = 1 works.
NaN/inf inputs raise ValueError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import special

from ttt_core import theory

FloatArray = NDArray[np.float64]

#: Default prior standard deviation of log₁₀ λ⋆, in decades (DESIGN §5.1).
PRIOR_SD_DECADES: float = 1.5
#: Default half-width of the log₁₀ λ⋆ grid around the prior centre, in decades (DESIGN §5.1).
SPAN_DECADES: float = 6.0
#: Default number of grid points (0.05 decades apart over ±6 decades).
GRID_POINTS: int = 241
#: Minimum grid size (DESIGN §5.1: ≥ 200 points).
MIN_GRID_POINTS: int = 200
#: Credible level of every reported interval: (5 %, 95 %) quantiles.
CI_LO, CI_HI = 0.05, 0.95
#: Weak identification: posterior sd of log₁₀ λ⋆ above this fraction of the prior sd.
WEAK_ID_RATIO: float = 0.8
#: Grid-end flag: ≥ GRID_END_MASS of the mass in the first or last GRID_END_FRACTION of the grid.
GRID_END_FRACTION: float = 0.02
GRID_END_MASS: float = 0.05
#: Decision thresholds on P(TTT beats ICL) (DESIGN §5.1).
ADAPT_P: float = 0.9
DONT_ADAPT_P: float = 0.1
ADAPT, DONT_ADAPT, UNDETERMINED = "adapt", "don't adapt", "undetermined on this prompt"
#: The flag sentence of DESIGN §5.1.
FLAG_TEXT_WEAK = "the noise level is not identified by this prompt; the interval is mostly the prior's"
ML_LABEL = "maximum likelihood"
QUANTILE_METHOD = (
    "grid CDF (interpolated) for functions of s; exact inverse-gamma mixture quantiles over the grid "
    "for sigma2, tau2, gaps and slack"
)
_W_CUT = 1e-14  # grid points with less posterior mass are dropped from mixture quantiles
_PROBS = np.array([CI_LO, 0.5, CI_HI])

__all__ = [
    "Interval",
    "LambdaStarBatch",
    "NoisePosterior",
    "PointFit",
    "lambda_star_posterior_batch",
    "log_marginal_likelihood",
    "noise_posterior",
]


# --------------------------------------------------------------------------------------------
# result types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """Posterior median and 90 % credible interval (5 %, 95 % quantiles); ``mean`` where defined.

    Fields are floats, or arrays of a common shape (one entry per mode / per step count).
    """

    median: float | FloatArray
    lo: float | FloatArray
    hi: float | FloatArray
    mean: float | FloatArray = math.nan

    def covers(self, x: ArrayLike) -> bool | NDArray[np.bool_]:
        """lo ≤ x ≤ hi (elementwise)."""
        out = (np.asarray(self.lo) <= x) & (np.asarray(x) <= np.asarray(self.hi))
        return bool(out) if np.ndim(out) == 0 else out


@dataclass(frozen=True)
class PointFit:
    """The maximum-likelihood point fit ``theory.fit_signal_noise`` (DESIGN §5), for reference."""

    tau2: float
    sigma2: float
    lambda_star: float  # σ²/τ² (inf when τ² = 0)
    label: str = ML_LABEL


@dataclass(frozen=True)
class NoisePosterior:
    """Grid posterior over λ⋆ = σ²/τ² with σ² integrated out (DESIGN §5.1).

    Grid arrays have shape (G,), G = ``grid_points``; ``lam`` and the SNR fields have shape (n,).

    Attributes:
        n: number of prompt positions.
        lam: eigenvalues of K used (round-off negatives set to 0), shape (n,).
        log10_grid: uniform grid of log₁₀ λ⋆, ascending; lambda_star_grid = 10**log10_grid;
            s_grid = 1/lambda_star_grid (descending).
        log_prior: log N(log₁₀ λ⋆; centre, sd²) on the grid, up to a constant.
        log_lik: log p(r | s) on the grid (σ² integrated, Jeffreys), up to a constant.
        weights: normalised posterior mass per grid point (sums to 1).
        ig_shape, ig_scale: σ² | s_j, r ~ inverse-gamma(ig_shape = n/2, ig_scale_j).
        prior_centre_log10, prior_sd_decades: the prior on log₁₀ λ⋆.
        lambda_star, s, sigma2, tau2: Intervals (median, 5 %, 95 %, mean).
        snr: per-mode SNR τ²λ_i/σ² = sλ_i, Interval of arrays (n,) (quantiles = λ_i × those of s).
        log10_lambda_star_mean, log10_lambda_star_sd: posterior moments of log₁₀ λ⋆.
        ml: the maximum-likelihood point fit (``theory.fit_signal_noise``), labelled as such.
        weakly_identified: posterior sd of log₁₀ λ⋆ > 0.8 × prior sd.
        at_grid_end: ≥ 5 % of the mass in the first or last 2 % of the grid; grid_end names the end
            ("low λ⋆" or "high λ⋆") or is None.
        flag_text: the sentence to show, or None when the posterior is informative.
        quantile_method: how each quantile was computed.
    """

    n: int
    lam: FloatArray
    log10_grid: FloatArray
    lambda_star_grid: FloatArray
    s_grid: FloatArray
    log_prior: FloatArray
    log_lik: FloatArray
    weights: FloatArray
    ig_shape: float
    ig_scale: FloatArray
    prior_centre_log10: float
    prior_sd_decades: float
    lambda_star: Interval
    s: Interval
    sigma2: Interval
    tau2: Interval
    snr: Interval
    log10_lambda_star_mean: float
    log10_lambda_star_sd: float
    ml: PointFit
    weakly_identified: bool
    at_grid_end: bool
    grid_end: str | None
    flag_text: str | None
    quantile_method: str = QUANTILE_METHOD

    @property
    def sigma2_mean_given_s(self) -> FloatArray:
        """E[σ² | s_j, r] = β_j/(n/2 − 1) on the grid, shape (G,); inf for n ≤ 2 (0 where β_j = 0)."""
        return _ig_mean(self.ig_shape, self.ig_scale)


@dataclass(frozen=True)
class LambdaStarBatch:
    """λ⋆ summaries for m residual vectors sharing one spectrum; every field has shape (m,)."""

    median: FloatArray
    lo: FloatArray
    hi: FloatArray
    log10_sd: FloatArray


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _finite_1d(x: ArrayLike, name: str) -> FloatArray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of shape (n,), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: a prompt needs at least one supervised position (n >= 1)")
    bad = ~np.isfinite(arr)
    if np.any(bad):
        idx = np.flatnonzero(bad)[:5].tolist()
        raise ValueError(f"{name} contains NaN or inf (at indices {idx}); cannot form a posterior")
    return arr


def _check_spectrum(lam: ArrayLike, r_tilde: ArrayLike | None = None) -> tuple[FloatArray, FloatArray | None]:
    lam_arr = theory.check_eigenvalues(_finite_1d(lam, "lam"))
    if r_tilde is None:
        return lam_arr, None
    r = _finite_1d(r_tilde, "r_tilde")
    if r.shape != lam_arr.shape:
        raise ValueError(f"lam and r_tilde must have the same shape (n,), got {lam_arr.shape} and {r.shape}")
    return lam_arr, r


def _check_post_lam(post: NoisePosterior, lam: ArrayLike) -> FloatArray:
    lam_arr, _ = _check_spectrum(lam)
    if lam_arr.shape != (post.n,):
        raise ValueError(f"lam has shape {lam_arr.shape} but the posterior was built for n = {post.n}")
    return lam_arr


def _grid(lam: FloatArray, grid_points: int, prior_sd: float, span: float) -> tuple[FloatArray, float, float]:
    """(log₁₀ λ⋆ grid (G,), prior centre, spacing)."""
    if int(grid_points) != grid_points or grid_points < MIN_GRID_POINTS:
        raise ValueError(f"grid_points={grid_points!r} must be an integer >= {MIN_GRID_POINTS} (DESIGN §5.1)")
    if not (np.isfinite(prior_sd) and prior_sd > 0):
        raise ValueError(f"prior_sd_decades={prior_sd!r} must be positive and finite")
    if not (np.isfinite(span) and span > 0):
        raise ValueError(f"span_decades={span!r} must be positive and finite")
    mean_lam = float(lam.mean())
    centre = math.log10(mean_lam) if mean_lam > 0 else 0.0
    x = centre + np.linspace(-span, span, int(grid_points))
    return x, centre, 2.0 * span / (int(grid_points) - 1)


# --------------------------------------------------------------------------------------------
# likelihood and grid quantiles
# --------------------------------------------------------------------------------------------


def _loglik_and_scale(lam: FloatArray, r2: FloatArray, s: FloatArray) -> tuple[FloatArray, FloatArray]:
    """log p(r | s) (up to a constant) and the IG scale β = ½ Σ r̃²/(1 + sλ).

    Args:
        lam: (n,); r2: squared r̃, (m, n); s: (G,).
    Returns:
        (loglik (m, G), beta (m, G)).  Rows with r = 0 get loglik 0 (no information), β = 0.
    """
    n = lam.shape[0]
    W = np.log1p(np.outer(s, lam))  # (G, n)
    E = np.exp(-W)
    r2max = r2.max(axis=1, keepdims=True)  # (m, 1)
    zero = r2max[:, 0] <= 0.0
    scale = np.where(zero[:, None], 1.0, r2max)
    Qn = (r2 / scale) @ E.T  # (m, G), ≥ the largest normalised entry times min E > 0
    with np.errstate(divide="ignore"):
        loglik = -0.5 * W.sum(axis=1)[None, :] - 0.5 * n * np.log(np.where(zero[:, None], 1.0, Qn))
    loglik = np.where(zero[:, None], 0.0, loglik)
    beta = 0.5 * Qn * np.where(zero[:, None], 0.0, scale)
    return loglik, beta


def log_marginal_likelihood(lam: ArrayLike, r_tilde: ArrayLike, s: ArrayLike) -> FloatArray:
    """log p(r | s) = −½ Σ log(1 + sλ_i) − (n/2) log Σ r̃_i²/(1 + sλ_i), up to a constant (DESIGN §5.1).

    σ² is integrated out under the Jeffreys prior p(σ²) ∝ 1/σ²; the dropped constant is
    log Γ(n/2) + (n/2) log 2 − (n/2) log 2π.

    Args:
        lam: eigenvalues, shape (n,); r_tilde: Uᵀr, shape (n,); s = 1/λ⋆ ≥ 0, any shape.
    Returns:
        array of s's shape (all zeros when r = 0).
    """
    lam_arr, r = _check_spectrum(lam, r_tilde)
    s_arr = np.asarray(s, dtype=float)
    if not np.all(np.isfinite(s_arr)) or np.any(s_arr < 0):
        raise ValueError("s = 1/lambda_star must be finite and >= 0")
    ll, _ = _loglik_and_scale(lam_arr, (r**2)[None, :], s_arr.ravel())
    return ll[0].reshape(s_arr.shape)


def _normalise(logw: FloatArray) -> FloatArray:
    w = np.exp(logw - logw.max(axis=-1, keepdims=True))
    return w / w.sum(axis=-1, keepdims=True)


def _grid_quantiles(w: FloatArray, x: FloatArray, h: float, probs: FloatArray) -> FloatArray:
    """Quantiles of a grid distribution, each point's mass uniform over its cell [x − h/2, x + h/2].

    Args:
        w: weights (m, G) (rows sum to 1); x: ascending grid (G,); probs: (P,).
    Returns:
        (m, P).
    """
    C = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(w, axis=1)], axis=1)  # (m, G+1)
    C[:, -1] = 1.0
    edges = np.concatenate([x - h / 2.0, [x[-1] + h / 2.0]])
    out = np.empty((w.shape[0], probs.size))
    for j, p in enumerate(probs):
        k = np.clip((C < p).sum(axis=1), 1, x.size)  # C[k-1] < p <= C[k]
        c0 = np.take_along_axis(C, (k - 1)[:, None], axis=1)[:, 0]
        c1 = np.take_along_axis(C, k[:, None], axis=1)[:, 0]
        frac = np.where(c1 > c0, (p - c0) / np.where(c1 > c0, c1 - c0, 1.0), 0.5)
        out[:, j] = edges[k - 1] + np.clip(frac, 0.0, 1.0) * h
    return out


def _ig_mean(alpha: float, beta: FloatArray) -> FloatArray:
    if alpha > 1.0:
        return beta / (alpha - 1.0)
    return np.where(beta > 0, np.inf, 0.0)


def _ig_mixture_quantiles(w: FloatArray, alpha: float, scale: FloatArray, probs: FloatArray,
                          rtol: float = 1e-7) -> FloatArray:
    """Exact quantiles of X = mixture_j w_j · inverse-gamma(α, scale_j) (scale_j = 0: point mass at 0).

    P(X ≤ x) = Σ_j w_j Q(α, scale_j/x) with Q = ``scipy.special.gammaincc``; solved by bisection in
    log x inside [min_j, max_j] of the component quantiles (valid bracket for a mixture).

    Args:
        w: weights (G,); scale: (m, G) (≥ 0); probs: (P,) in (0, 1).
    Returns:
        (m, P).
    """
    keep = w > _W_CUT
    wk = w[keep] / w[keep].sum()
    sc = scale[:, keep]  # (m, G')
    pos = sc > 0
    w0 = (wk[None, :] * ~pos).sum(axis=1)  # point mass at zero, (m,)
    p = probs[None, :]  # (1, P)
    need = p > w0[:, None] * (1 + 1e-12)  # else the quantile is 0
    p_adj = np.clip((p - w0[:, None]) / np.maximum(1.0 - w0[:, None], 1e-300), 1e-300, 1 - 1e-16)
    y = special.gammainccinv(alpha, p_adj)  # Q(α, y) = p_adj; component quantile = scale/y
    with np.errstate(divide="ignore"):
        logsc = np.where(pos, np.log(np.where(pos, sc, 1.0)), np.nan)  # (m, G')
    logq = logsc[:, None, :] - np.log(y)[:, :, None]  # (m, P, G')
    a = np.nanmin(np.where(pos[:, None, :], logq, np.inf), axis=2)
    b = np.nanmax(np.where(pos[:, None, :], logq, -np.inf), axis=2)
    a = np.where(np.isfinite(a), a, 0.0)
    b = np.where(np.isfinite(b), b, 0.0)
    width = float(np.max(b - a)) if a.size else 0.0
    iters = int(np.clip(np.ceil(np.log2(max(width, rtol) / rtol)), 1, 80))
    sc3 = sc[:, None, :]
    for _ in range(iters):
        mid = 0.5 * (a + b)
        F = special.gammaincc(alpha, sc3 * np.exp(-mid)[:, :, None]) @ wk  # (m, P)
        low = F < p
        a = np.where(low, mid, a)
        b = np.where(low, b, mid)
    return np.where(need, np.exp(0.5 * (a + b)), 0.0)


def _mixture_summary(post_w: FloatArray, alpha: float, beta: FloatArray, c: FloatArray) -> Interval:
    """Posterior of σ²·c_j over (s_j, σ²): c has shape (m, G) (or (G,)); fields shape (m,) (or scalar)."""
    scalar = c.ndim == 1
    c2 = np.atleast_2d(c)
    scale = beta[None, :] * c2
    q = _ig_mixture_quantiles(post_w, alpha, scale, _PROBS)
    mean_given = _ig_mean(alpha, beta)[None, :] * c2
    mean_given = np.where(c2 == 0, 0.0, mean_given)
    mean = np.where(post_w[None, :] > 0, mean_given, 0.0) @ post_w
    if scalar:
        return Interval(float(q[0, 1]), float(q[0, 0]), float(q[0, 2]), float(mean[0]))
    return Interval(q[:, 1], q[:, 0], q[:, 2], mean)


# --------------------------------------------------------------------------------------------
# the posterior
# --------------------------------------------------------------------------------------------


def _lambda_star_core(lam: FloatArray, r2: FloatArray, grid_points: int, prior_sd: float, span: float):
    x, centre, h = _grid(lam, grid_points, prior_sd, span)
    s = 10.0 ** (-x)
    loglik, beta = _loglik_and_scale(lam, r2, s)
    log_prior = -0.5 * ((x - centre) / prior_sd) ** 2
    w = _normalise(loglik + log_prior[None, :])
    q = _grid_quantiles(w, x, h, _PROBS)  # log10 λ⋆ quantiles (m, 3)
    mean = w @ x
    sd = np.sqrt(np.maximum(w @ x**2 - mean**2, 0.0))
    return x, centre, h, s, log_prior, loglik, beta, w, q, mean, sd


def lambda_star_posterior_batch(
    lam: ArrayLike,
    r_tilde: ArrayLike,
    grid_points: int = GRID_POINTS,
    prior_sd_decades: float = PRIOR_SD_DECADES,
    span_decades: float = SPAN_DECADES,
) -> LambdaStarBatch:
    """λ⋆ median / 90 % interval / posterior sd of log₁₀ λ⋆ for many r̃ at once (DESIGN §5.1).

    Same posterior as ``noise_posterior`` (same grid, prior and grid-CDF quantiles), vectorised
    over rows: O(m·grid·n).  Used for coverage studies.

    Args:
        lam: eigenvalues shared by all rows, shape (n,); r_tilde: shape (m, n).
    Returns:
        LambdaStarBatch with fields of shape (m,).
    """
    lam_arr, _ = _check_spectrum(lam)
    R = np.asarray(r_tilde, dtype=float)
    if R.ndim != 2 or R.shape[1] != lam_arr.shape[0]:
        raise ValueError(f"r_tilde must have shape (m, n) with n = {lam_arr.shape[0]}, got {R.shape}")
    if not np.all(np.isfinite(R)):
        raise ValueError("r_tilde contains NaN or inf; cannot form a posterior")
    *_, q, _, sd = _lambda_star_core(lam_arr, R**2, grid_points, prior_sd_decades, span_decades)
    lq = 10.0**q
    return LambdaStarBatch(median=lq[:, 1], lo=lq[:, 0], hi=lq[:, 2], log10_sd=sd)


def noise_posterior(
    lam: ArrayLike,
    r_tilde: ArrayLike,
    grid_points: int = GRID_POINTS,
    prior_sd_decades: float = PRIOR_SD_DECADES,
    span_decades: float = SPAN_DECADES,
) -> NoisePosterior:
    """Posterior over λ⋆ = σ²/τ² (s = 1/λ⋆) of r ~ N(0, τ²K + σ²I) (DESIGN §5.1).

    Prior: Jeffreys on σ², log₁₀ λ⋆ ~ N(log₁₀ mean(λ), prior_sd_decades²) on a uniform grid of
    ``grid_points`` values spanning ± ``span_decades`` around the centre (scale-equivariant).
    Likelihood with σ² integrated: log p(r|s) = −½ Σ log(1 + sλ_i) − (n/2) log Σ r̃_i²/(1 + sλ_i);
    σ² | s, r ~ IG(n/2, ½ Σ r̃_i²/(1 + sλ_i)), τ² = σ²s.  Cost O(grid·n).

    Quantiles: λ⋆, s and the per-mode SNR sλ_i from the interpolated grid CDF; σ² and τ² exact
    inverse-gamma mixture quantiles over the grid (no Monte-Carlo).  Means of σ², τ² are inf for
    n ≤ 2 (the inverse gamma IG(n/2, ·) has no mean for n/2 ≤ 1).

    Args:
        lam: all n eigenvalues of K, shape (n,) (zeros allowed: those modes carry only noise).
        r_tilde: Uᵀr, shape (n,).
        grid_points: ≥ 200.  prior_sd_decades, span_decades: > 0.
    Returns:
        NoisePosterior (see its docstring).
    Raises:
        ValueError: NaN/inf input, shape mismatch, n = 0, K not PSD, grid_points < 200.
    """
    lam_arr, r = _check_spectrum(lam, r_tilde)
    n = lam_arr.shape[0]
    x, centre, _, s, log_prior, loglik, beta, w, q, mean, sd = _lambda_star_core(
        lam_arr, (r**2)[None, :], grid_points, prior_sd_decades, span_decades)
    w, loglik, beta = w[0], loglik[0], beta[0]
    lq = 10.0 ** q[0]
    lam_star = Interval(float(lq[1]), float(lq[0]), float(lq[2]), float(w @ 10.0**x))
    s_int = Interval(float(1 / lq[1]), float(1 / lq[2]), float(1 / lq[0]), float(w @ s))
    alpha = 0.5 * n
    sig = _mixture_summary(w, alpha, beta, np.ones_like(s))
    tau = _mixture_summary(w, alpha, beta, s)
    snr = Interval(lam_arr * s_int.median, lam_arr * s_int.lo, lam_arr * s_int.hi, lam_arr * s_int.mean)

    tau2_ml, sigma2_ml, _ = theory.fit_signal_noise(lam_arr, r)
    ml = PointFit(float(tau2_ml), float(sigma2_ml), float(sigma2_ml / tau2_ml) if tau2_ml > 0 else math.inf)

    weak = bool(sd[0] > WEAK_ID_RATIO * prior_sd_decades)
    k_end = max(1, math.ceil(GRID_END_FRACTION * x.size))
    low_mass, high_mass = float(w[:k_end].sum()), float(w[-k_end:].sum())
    at_end = max(low_mass, high_mass) >= GRID_END_MASS
    grid_end = None
    if at_end:
        grid_end = "low lambda*" if low_mass >= high_mass else "high lambda*"
    if at_end:
        flag: str | None = (
            "the noise level is not identified by this prompt; the posterior piles up at the "
            f"{'low-noise' if grid_end == 'low lambda*' else 'high-noise'} end of the lambda* grid, "
            "so the interval is set by the grid and the prior"
        )
    elif weak:
        flag = FLAG_TEXT_WEAK
    else:
        flag = None
    return NoisePosterior(
        n=n, lam=lam_arr, log10_grid=x, lambda_star_grid=10.0**x, s_grid=s, log_prior=log_prior,
        log_lik=loglik, weights=w, ig_shape=alpha, ig_scale=beta, prior_centre_log10=centre,
        prior_sd_decades=float(prior_sd_decades), lambda_star=lam_star, s=s_int, sigma2=sig, tau2=tau,
        snr=snr, log10_lambda_star_mean=float(mean[0]), log10_lambda_star_sd=float(sd[0]), ml=ml,
        weakly_identified=weak, at_grid_end=at_end, grid_end=grid_end, flag_text=flag,
    )
