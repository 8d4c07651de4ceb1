"""Filters: what T steps of TTT do, and the spectral checks they rest on (DESIGN §2, §3).

Validation of the spectrum and of the scaled step ρ, the eigendecomposition of a PSD kernel, the
gradient-descent and gradient-flow filters g_T, q_T, the Bayes filters g⋆, q⋆, the mode-wise
matching time and the implied prior C_T (with the evidence covariance Σ_T = C_T + σ²I of §5).
Conventions (shapes, admissible ρ, stable powers) are those of ``ttt_core.theory``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from ttt_core.theory._common import EIG_TOL_REL, FloatArray, _grid, _log_contraction

# --------------------------------------------------------------------------------------------
# validation (§2, §3)
# --------------------------------------------------------------------------------------------


def check_eigenvalues(lam: ArrayLike) -> FloatArray:
    """Return ``lam`` as a float array with round-off negatives set to 0 (DESIGN §2).

    Args:
        lam: eigenvalues of a PSD kernel, any shape.
    Returns:
        float64 array of the same shape, with values in [−EIG_TOL_REL·max|λ|, 0) replaced by 0.
    Raises:
        ValueError: if an eigenvalue is more negative than the tolerance, or not finite.
    """
    arr = np.asarray(lam, dtype=float)
    if arr.size == 0:
        return arr.copy()
    if not np.all(np.isfinite(arr)):
        raise ValueError("eigenvalues must be finite")
    scale = float(np.max(np.abs(arr)))
    tol = EIG_TOL_REL * scale
    if np.any(arr < -tol):
        raise ValueError(
            f"K must be positive semi-definite: smallest eigenvalue {arr.min():.3e} is below the "
            f"round-off tolerance -{tol:.3e} (= -{EIG_TOL_REL:g} * max|lambda|)"
        )
    return np.where(arr < 0.0, 0.0, arr)


def check_rho(lam: ArrayLike, rho: float) -> float:
    """Validate the scaled step ρ against the spectrum: 0 < ρ < 1/λ_max (DESIGN §3).

    Args:
        lam: eigenvalues (any shape); λ_max = max(lam).
        rho: scaled step ρ = η/σ².
    Returns:
        ``rho`` as a float.
    Raises:
        ValueError: naming ρ, λ_max and the admissible bound when ρ ≤ 0 or ρ·λ_max ≥ 1.
    """
    arr = check_eigenvalues(lam)
    rho = float(rho)
    lam_max = float(arr.max()) if arr.size else 0.0
    if not np.isfinite(rho) or rho <= 0.0:
        raise ValueError(f"step size rho={rho!r} must be positive and finite (0 < rho < 1/lambda_max)")
    if lam_max > 0.0 and rho * lam_max >= 1.0:
        raise ValueError(
            f"step size rho={rho:.6g} is not admissible for lambda_max={lam_max:.6g}: "
            f"need 0 < rho < 1/lambda_max = {1.0 / lam_max:.6g} (DESIGN §3)"
        )
    return rho


def rho_from_c(lam: ArrayLike, c: float) -> float:
    """Scaled step ρ = c/λ_max with c ∈ (0, 1) (DESIGN §3).

    Args:
        lam: eigenvalues, shape (n,).
        c: fraction of the admissible bound, 0 < c < 1.
    Returns:
        ρ = c/λ_max (ρ = c when λ_max = 0, where any ρ > 0 is admissible).
    """
    c = float(c)
    if not (0.0 < c < 1.0):
        raise ValueError(f"c={c!r} must lie in (0, 1) so that rho = c/lambda_max is admissible")
    arr = check_eigenvalues(lam)
    lam_max = float(arr.max()) if arr.size else 0.0
    return c / lam_max if lam_max > 0.0 else c


def eigh_psd(K: ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Eigendecomposition K = U diag(λ) Uᵀ of a symmetric PSD matrix, λ sorted descending.

    Args:
        K: (n, n) symmetric PSD matrix (symmetrised as (K + Kᵀ)/2 first).
    Returns:
        (lam, U): lam shape (n,) descending with round-off negatives set to 0; U shape (n, n)
        with orthonormal columns u_i.
    """
    K = np.asarray(K, dtype=float)
    w, U = np.linalg.eigh(0.5 * (K + K.T))
    order = np.argsort(w)[::-1]
    return check_eigenvalues(w[order]), U[:, order]


def _outer_T(T_arr: FloatArray, x: FloatArray) -> FloatArray:
    """T ⊗ x with shape T.shape + x.shape."""
    return T_arr.reshape(T_arr.shape + (1,) * x.ndim) * x


def _log_decay(lam: ArrayLike, rho: float, T: ArrayLike) -> tuple[FloatArray, float, FloatArray, FloatArray]:
    """Validated (λ, ρ, T) and T ⊗ log(1 − ρλ) (shape T.shape + lam.shape), the log of (1 − ρλ)^T."""
    lam = check_eigenvalues(lam)
    rho = check_rho(lam, rho)
    T_arr, _ = _grid(T)
    return lam, rho, T_arr, _outer_T(T_arr, _log_contraction(lam, rho))


# --------------------------------------------------------------------------------------------
# filters (§3)
# --------------------------------------------------------------------------------------------


def gd_filter(lam: ArrayLike, rho: float, T: ArrayLike) -> FloatArray:
    """Prompt filter of T gradient-descent steps, g_T(λ) = 1 − (1 − ρλ)^T (DESIGN §3).

    Args:
        lam: eigenvalues, shape (n,) (or any shape).
        rho: scaled step, 0 < ρ < 1/λ_max.
        T: number of steps, scalar or array.
    Returns:
        g_T(λ) ∈ [0, 1): shape lam.shape for scalar T, T.shape + lam.shape for array T.
    """
    return -np.expm1(_log_decay(lam, rho, T)[3])


def gd_query_filter(lam: ArrayLike, rho: float, T: ArrayLike) -> FloatArray:
    """Query filter q_T(λ) = (1 − (1 − ρλ)^T)/λ with q_T(0) = ρT (DESIGN §3, Prop. E.1).

    Computed as −expm1(T·log1p(−ρλ))/λ, which is continuous as λ → 0 (no 0/0).

    Args:
        lam: eigenvalues, shape (n,).
        rho: scaled step, 0 < ρ < 1/λ_max.
        T: scalar or array of step counts.
    Returns:
        shape lam.shape (scalar T) or T.shape + lam.shape (array T).
    """
    lam, rho, T_arr, log_decay = _log_decay(lam, rho, T)
    zero = lam == 0.0
    safe = np.where(zero, 1.0, lam)
    num = -np.expm1(log_decay)
    at_zero = rho * _outer_T(T_arr, np.ones_like(lam))
    return np.where(zero, at_zero, num / safe)


def gradient_flow_filter(lam: ArrayLike, t: ArrayLike) -> FloatArray:
    """Gradient-flow prompt filter g_t(λ) = 1 − e^{−tλ}, the ρ → 0 limit with t = ρT (DESIGN §3).

    Args:
        lam: eigenvalues, shape (n,).
        t: continuous time ≥ 0, scalar or array.
    Returns:
        shape lam.shape or t.shape + lam.shape.
    """
    lam = check_eigenvalues(lam)
    t_arr, _ = _grid(t)
    return -np.expm1(-_outer_T(t_arr, lam))


def gradient_flow_query_filter(lam: ArrayLike, t: ArrayLike) -> FloatArray:
    """Gradient-flow query filter (1 − e^{−tλ})/λ, equal to t at λ = 0 (DESIGN §3).

    Returns:
        shape lam.shape or t.shape + lam.shape.
    """
    lam = check_eigenvalues(lam)
    t_arr, _ = _grid(t)
    zero = lam == 0.0
    safe = np.where(zero, 1.0, lam)
    return np.where(zero, _outer_T(t_arr, np.ones_like(lam)), -np.expm1(-_outer_T(t_arr, lam)) / safe)


def _check_lam_star(lam_star: float) -> float:
    lam_star = float(lam_star)
    if not (lam_star > 0.0):
        raise ValueError(f"noise-to-signal ratio lambda_star={lam_star!r} must be > 0 (inf allowed)")
    return lam_star


def bayes_filter(lam: ArrayLike, lam_star: float) -> FloatArray:
    """Bayes prompt filter g⋆(λ) = λ/(λ + λ⋆), λ⋆ = σ²/τ² (DESIGN §3).

    Args:
        lam: eigenvalues, any shape.
        lam_star: noise-to-signal ratio λ⋆ > 0 (``np.inf`` gives g⋆ ≡ 0).
    Returns:
        array of lam's shape.
    """
    lam = check_eigenvalues(lam)
    lam_star = _check_lam_star(lam_star)
    if np.isinf(lam_star):
        return np.zeros_like(lam)
    return lam / (lam + lam_star)


def bayes_query_filter(lam: ArrayLike, lam_star: float) -> FloatArray:
    """Bayes query filter q⋆(λ) = 1/(λ + λ⋆) (DESIGN §3, Thm. 5.2).

    Returns:
        array of lam's shape (zeros when λ⋆ = inf).
    """
    lam = check_eigenvalues(lam)
    lam_star = _check_lam_star(lam_star)
    if np.isinf(lam_star):
        return np.zeros_like(lam)
    return 1.0 / (lam + lam_star)


def matching_time(lam: ArrayLike, lam_star: float) -> FloatArray:
    """Mode-wise matching time t⋆(λ) = (1/λ) log(1 + λ/λ⋆), with t⋆(0) = 1/λ⋆ (DESIGN §3).

    At t = t⋆(λ) the gradient-flow filter equals the Bayes filter on that mode:
    1 − e^{−t⋆λ} = λ/(λ + λ⋆).

    Returns:
        array of lam's shape.
    """
    lam = check_eigenvalues(lam)
    lam_star = _check_lam_star(lam_star)
    zero = lam == 0.0
    safe = np.where(zero, 1.0, lam)
    return np.where(zero, 1.0 / lam_star, np.log1p(lam / lam_star) / safe)


def implied_prior_eigs(lam: ArrayLike, rho: float, T: ArrayLike, sigma2: float) -> FloatArray:
    """Eigenvalues of the implied prior C_T = σ² G_T (I − G_T)^{-1} (DESIGN §3, Prop. 4.1).

    c_T(λ) = σ² g_T/(1 − g_T) = σ² ((1 − ρλ)^{−T} − 1) = σ² expm1(−T log1p(−ρλ)).

    Returns:
        shape lam.shape or T.shape + lam.shape.
    """
    return float(sigma2) * np.expm1(-_log_decay(lam, rho, T)[3])


def evidence_cov_eigs(lam: ArrayLike, rho: float, T: ArrayLike, sigma2: float) -> FloatArray:
    """Eigenvalues of Σ_T = σ²(I − ρK)^{−T} = C_T + σ²I, i.e. σ² exp(−T log1p(−ρλ)) (DESIGN §5).

    Returns:
        shape lam.shape or T.shape + lam.shape.
    """
    return float(sigma2) * np.exp(-_log_decay(lam, rho, T)[3])
