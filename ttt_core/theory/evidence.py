"""Evidence: how far to adapt (DESIGN §5).

Evidence scores ℓ_T of the residuals under Σ_T = σ²(I − ρK)^{−T} (fixed, known or profiled σ²),
evidence-based step selection T_MAP, the Gibbs posterior over the step grid with its KL to the
prior and the model-averaged filter, and the Gaussian evidence fit of (τ², σ²) for a real prompt.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize

from ttt_core.theory._common import VAR_FLOOR, FloatArray, _grid_1d, _log_contraction
from ttt_core.theory.filters import check_eigenvalues, check_rho, gd_filter, gd_query_filter

NoiseSpec = float | Literal["fixed", "mle"]


def _evidence_parts(
    lam: ArrayLike, r_tilde: ArrayLike, rho: float, T_grid: ArrayLike | None
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, int]:
    """(T grid, Q_T = Σ(1−ρλ)^T r̃² of shape (..., G), S = Σ log(1−ρλ), ‖r̃‖², n)."""
    lam = check_eigenvalues(lam)
    if lam.ndim != 1:
        raise ValueError("lam must be 1-D (all n eigenvalues of K)")
    rho = check_rho(lam, rho)
    T_arr = _grid_1d(T_grid)
    r_tilde = np.asarray(r_tilde, dtype=float)
    if r_tilde.shape[-1] != lam.shape[0]:
        raise ValueError(f"r_tilde has {r_tilde.shape[-1]} entries per row but lam has {lam.shape[0]}")
    L = _log_contraction(lam, rho)  # (n,)
    decay = np.exp(np.outer(T_arr, L))  # (G, n): (1 − ρλ)^T
    r2 = r_tilde**2
    Q = r2 @ decay.T  # (..., G)
    return T_arr, Q, np.asarray(L.sum()), r2.sum(axis=-1), lam.shape[0]


def evidence_scores(
    lam: ArrayLike,
    r_tilde: ArrayLike,
    rho: float,
    T_grid: ArrayLike | None = None,
    noise: NoiseSpec = "fixed",
) -> FloatArray:
    """Normalised negative log-evidence of r under N(0, Σ_T), Σ_T = σ²(I − ρK)^{−T} (DESIGN §5).

    ℓ_T(r) = (1/2n)[log det Σ_T + rᵀΣ_T^{-1}r]
           = (1/2n)[n log σ² − T Σ_i log(1 − ρλ_i) + σ^{-2} Σ_i (1 − ρλ_i)^T r̃_i²]
    (the 2π constant is dropped).  Cost O(|grid|·n).

    Args:
        lam: all n eigenvalues of K, shape (n,) (zeros included).
        r_tilde: Uᵀr covering all n eigen-directions, shape (n,) or (m, n) for m residual vectors.
        rho: scaled step, 0 < ρ < 1/λ_max.
        T_grid: 1-D step grid (default {0, …, 30}).
        noise: a float σ² > 0; "fixed" for σ̂² = ‖r‖²/n (per row; floored at VAR_FLOOR when r = 0);
            or "mle" for the σ²-profiled criterion, returned in the DESIGN §5 form
            L_MLE(T) = log((1/n) Σ (1 − ρλ_i)^T r̃_i²) − (T/n) Σ log(1 − ρλ_i),
            which relates to ℓ_T by min_{σ²} ℓ_T = (L_MLE(T) + 1)/2 (see ``profiled_scores``).
    Returns:
        scores, shape (|grid|,) or (m, |grid|).
    """
    T_arr, Q, S, r2sum, n = _evidence_parts(lam, r_tilde, rho, T_grid)
    if isinstance(noise, str):
        if noise == "mle":
            return np.log(np.maximum(Q / n, VAR_FLOOR)) - (T_arr / n) * S
        if noise != "fixed":
            raise ValueError(f"noise must be a float sigma2, 'fixed' or 'mle' (got {noise!r})")
        sigma2 = np.maximum(r2sum / n, VAR_FLOOR)[..., None]
    else:
        sigma2 = float(noise)
        if not (sigma2 > 0 and np.isfinite(sigma2)):
            raise ValueError(f"noise variance sigma2={noise!r} must be positive and finite")
    return (n * np.log(sigma2) - T_arr * S + Q / sigma2) / (2.0 * n)


def profiled_scores(lam: ArrayLike, r_tilde: ArrayLike, rho: float, T_grid: ArrayLike | None = None) -> FloatArray:
    """ℓ_T with σ² profiled out, on the ℓ scale: min_{σ²} ℓ_T = (L_MLE(T) + 1)/2 (DESIGN §5).

    The minimiser is σ̂_T² = (1/n) Σ (1 − ρλ_i)^T r̃_i²; same argmin as L_MLE.

    Returns:
        shape (|grid|,) or (m, |grid|).
    """
    return 0.5 * (evidence_scores(lam, r_tilde, rho, T_grid, noise="mle") + 1.0)


def select_steps(
    lam: ArrayLike, r_tilde: ArrayLike, rho: float, T_grid: ArrayLike | None = None, noise: NoiseSpec = "fixed"
) -> FloatArray | float:
    """T_MAP = argmin_{T ∈ grid} of ``evidence_scores`` (first minimiser on ties) (DESIGN §5).

    Args:
        as in ``evidence_scores``.
    Returns:
        the selected grid value (float) for 1-D r_tilde, or an array of shape (m,) for (m, n).
    """
    T_arr = _grid_1d(T_grid)
    scores = evidence_scores(lam, r_tilde, rho, T_arr, noise)
    T_map = T_arr[np.argmin(scores, axis=-1)]
    return float(T_map) if np.ndim(T_map) == 0 else T_map


def _log_prior(prior: ArrayLike | None, G: int) -> FloatArray:
    if prior is None:
        return np.full(G, -np.log(G))
    p = np.asarray(prior, dtype=float)
    if p.shape != (G,) or np.any(p < 0) or not np.any(p > 0):
        raise ValueError("prior must be a non-negative vector over the grid with positive mass")
    with np.errstate(divide="ignore"):
        return np.log(p / p.sum())


def gibbs_posterior(
    scores: ArrayLike, beta: float, prior: ArrayLike | None = None, *, n: int = 1
) -> FloatArray:
    """Gibbs posterior over the grid, ν_β(T) ∝ π0(T) exp(−β n ℓ_T) (DESIGN §5).

    Computed as a max-shifted softmax (stable for any scale of scores).

    Args:
        scores: ℓ_T over the grid, shape (G,) or (m, G).  Pass normalised scores ℓ_T together with
            ``n`` (number of prompt positions); with the default n = 1 the scores are taken as the
            un-normalised n·ℓ_T.  For "mle" use ``profiled_scores`` (the ℓ scale), not L_MLE.
        beta: inverse temperature β > 0.
        prior: π0 over the grid (default uniform), shape (G,).
        n: prompt length multiplying the scores.
    Returns:
        ν, same shape as scores, rows summing to 1.
    """
    s = np.asarray(scores, dtype=float)
    if beta <= 0:
        raise ValueError("beta must be positive")
    logits = _log_prior(prior, s.shape[-1]) - float(beta) * float(n) * s
    logits = logits - np.max(logits, axis=-1, keepdims=True)
    w = np.exp(logits)
    return w / w.sum(axis=-1, keepdims=True)


def kl_to_prior(nu: ArrayLike, prior: ArrayLike | None = None) -> FloatArray | float:
    """KL(ν‖π0) = Σ ν log(ν/π0) with 0·log 0 = 0; π0 uniform by default (DESIGN §5).

    Returns:
        float for 1-D ν, else array over rows.
    """
    nu = np.asarray(nu, dtype=float)
    lp = _log_prior(prior, nu.shape[-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(nu > 0, nu * (np.log(np.where(nu > 0, nu, 1.0)) - lp), 0.0)
    out = terms.sum(axis=-1)
    return float(out) if np.ndim(out) == 0 else out


def model_averaged_filter(
    lam: ArrayLike, rho: float, T_grid: ArrayLike, weights: ArrayLike, query: bool = False
) -> FloatArray:
    """Model average of filters Σ_T ν(T) g_T(λ) (or q_T(λ) when ``query``) (DESIGN §5).

    Args:
        lam: eigenvalues, shape (n,).
        T_grid: shape (G,); weights: ν over the grid, shape (G,) or (m, G).
    Returns:
        shape (n,) or (m, n).
    """
    T_arr = _grid_1d(T_grid)
    filt = gd_query_filter(lam, rho, T_arr) if query else gd_filter(lam, rho, T_arr)  # (G, n)
    return np.asarray(weights, dtype=float) @ filt


# --------------------------------------------------------------------------------------------
# signal / noise estimation (§5)
# --------------------------------------------------------------------------------------------


def gaussian_loglik(lam: ArrayLike, r_tilde: ArrayLike, tau2: float, sigma2: float) -> float:
    """Normalised log-likelihood (1/n) log N(r; 0, τ²K + σ²I), 2π included (DESIGN §5).

    (1/n) log N = −(1/2n) Σ_i [log(2π v_i) + r̃_i²/v_i],  v_i = τ²λ_i + σ².

    Args:
        lam, r_tilde: all n eigenvalues and Uᵀr, shape (n,).
    Returns:
        the log-likelihood divided by n (−inf if some v_i = 0 with r̃_i ≠ 0).
    """
    lam = check_eigenvalues(lam)
    r2 = np.asarray(r_tilde, dtype=float) ** 2
    v = float(tau2) * lam + float(sigma2)
    with np.errstate(divide="ignore", invalid="ignore"):
        quad = np.where(r2 > 0, r2 / v, 0.0)
        val = -0.5 * np.mean(np.log(2.0 * np.pi * v) + quad)
    return -np.inf if np.isnan(val) else float(val)


def fit_signal_noise(lam: ArrayLike, r_tilde: ArrayLike) -> tuple[float, float, float]:
    """Maximum-likelihood (τ², σ²) of r ~ N(0, τ²K + σ²I) in K's eigenbasis (DESIGN §5).

    Per-mode variance v_i = τ²λ_i + σ².  For a fixed ratio s = τ²/σ² (= 1/λ⋆) the noise is profiled
    exactly, σ̂²(s) = (1/n) Σ r̃_i²/(1 + sλ_i), leaving the scalar objective
        ℓ(s) = −½[log 2π + 1 + log σ̂²(s)] − (1/2n) Σ log(1 + sλ_i),
    which is maximised over s = 0 (τ² = 0) and a log grid s·λ_max ∈ [1e−12, 1e16] (0.05 decades),
    followed by a bounded Brent refinement around the best grid point.  The upper end bounds the
    search when the likelihood is unbounded (r in range(K) with K rank-deficient, σ² → 0).

    Args:
        lam: all n eigenvalues of K, shape (n,) (zeros allowed).
        r_tilde: Uᵀr, shape (n,).
    Returns:
        (tau2, sigma2, loglik) with loglik = (1/n) log N(r; 0, τ²K + σ²I) including the 2π term
        (normalised = divided by n).  Degenerate cases: r = 0 gives (0, VAR_FLOOR, ·);
        λ_max = 0 gives τ² = 0, σ² = ‖r‖²/n.  Never NaN.
    """
    lam = check_eigenvalues(lam)
    r2 = np.asarray(r_tilde, dtype=float) ** 2
    if lam.ndim != 1 or r2.shape != lam.shape:
        raise ValueError("lam and r_tilde must both have shape (n,)")
    n = lam.shape[0]
    ms = float(r2.mean())
    lam_max = float(lam.max()) if n else 0.0
    if ms <= VAR_FLOOR or lam_max == 0.0:
        sigma2 = max(ms, VAR_FLOOR)
        return 0.0, sigma2, gaussian_loglik(lam, r_tilde, 0.0, sigma2)

    def neg_profile(log_s: float) -> float:
        s = np.exp(log_s)
        w = np.log1p(s * lam)
        s2 = np.mean(r2 * np.exp(-w))
        return 0.5 * (np.log(2 * np.pi) + 1.0 + np.log(max(s2, VAR_FLOOR))) + 0.5 * np.mean(w)

    base = -np.log(lam_max)
    grid = base + np.log(10.0) * np.arange(-12.0, 16.0 + 1e-9, 0.05)
    s_all = np.exp(grid)
    W = np.log1p(np.outer(s_all, lam))  # (G, n)
    s2_all = np.maximum((np.exp(-W) * r2).mean(axis=1), VAR_FLOOR)
    vals = 0.5 * (np.log(2 * np.pi) + 1.0 + np.log(s2_all)) + 0.5 * W.mean(axis=1)
    k = int(np.argmin(vals))
    best_log_s, best_val = grid[k], float(vals[k])
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, grid.size - 1)]
    if hi > lo:
        res = optimize.minimize_scalar(neg_profile, bounds=(lo, hi), method="bounded",
                                       options={"xatol": 1e-10})
        if res.fun < best_val:
            best_log_s, best_val = float(res.x), float(res.fun)
    # boundary τ² = 0
    val0 = 0.5 * (np.log(2 * np.pi) + 1.0 + np.log(ms))
    if val0 <= best_val:
        return 0.0, ms, gaussian_loglik(lam, r_tilde, 0.0, ms)
    s = float(np.exp(best_log_s))
    sigma2 = max(float(np.mean(r2 / (1.0 + s * lam))), VAR_FLOOR)
    tau2 = s * sigma2
    return tau2, sigma2, gaussian_loglik(lam, r_tilde, tau2, sigma2)
