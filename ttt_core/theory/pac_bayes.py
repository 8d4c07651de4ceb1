"""PAC-Bayes guarantee for evidence-selected steps (DESIGN §5).

Population evidence risk 𝓛(T|K) under a true residual covariance Σ⋆ = τ⋆²K + σ⋆²I, the variance
proxy v_T = (1/n) tr(A_T²), the slack of the T_MAP certificate, the general bound for a posterior
over the grid and the β that optimises it.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from ttt_core.theory._common import FloatArray, _grid_1d, _log_contraction
from ttt_core.theory.evidence import kl_to_prior
from ttt_core.theory.filters import check_eigenvalues, check_rho


def _ratio_eigs(
    lam: ArrayLike, rho: float, T_grid: ArrayLike | None, sigma2: float, tau2_star: float, sigma2_star: float
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(T grid, eigenvalues of A_T = Σ⋆^{1/2}Σ_T^{-1}Σ⋆^{1/2} (G, n), Σ log(1−ρλ))."""
    lam = check_eigenvalues(lam)
    rho = check_rho(lam, rho)
    T_arr = _grid_1d(T_grid)
    if not sigma2 > 0:
        raise ValueError("sigma2 of the evidence family must be positive")
    L = _log_contraction(lam, rho)
    v_star = float(tau2_star) * lam + float(sigma2_star)
    A = v_star * np.exp(np.outer(T_arr, L)) / float(sigma2)
    return T_arr, A, np.asarray(L.sum())


def population_evidence_risk(
    lam: ArrayLike, rho: float, T_grid: ArrayLike | None, sigma2: float, tau2_star: float, sigma2_star: float
) -> FloatArray:
    """𝓛(T|K) = E[ℓ_T(r) | K] for r ~ N(0, Σ⋆), Σ⋆ = τ⋆²K + σ⋆²I (DESIGN §5).

    𝓛(T|K) = (1/2n)[log det Σ_T + tr(Σ_T^{-1}Σ⋆)]
            = (1/2n)[n log σ² − T Σ log(1 − ρλ_i) + σ^{-2} Σ (1 − ρλ_i)^T (τ⋆²λ_i + σ⋆²)].

    Args:
        lam: all n eigenvalues, shape (n,).
        T_grid: 1-D grid (None → {0..30}); sigma2: σ² of the evidence family Σ_T.
    Returns:
        shape (|grid|,).
    """
    T_arr, A, S = _ratio_eigs(lam, rho, T_grid, sigma2, tau2_star, sigma2_star)
    n = A.shape[1]
    return (n * np.log(float(sigma2)) - T_arr * S + A.sum(axis=1)) / (2.0 * n)


def pac_bayes_variance(
    lam: ArrayLike, rho: float, T_grid: ArrayLike | None, sigma2: float, tau2_star: float, sigma2_star: float
) -> FloatArray:
    """Per-step variance proxy v_T = (1/n) tr(A_T²), A_T = Σ⋆^{1/2}Σ_T^{-1}Σ⋆^{1/2} (DESIGN §5).

    A_T is diagonal in K's eigenbasis with entries (τ⋆²λ_i + σ⋆²)(1 − ρλ_i)^T/σ².

    Returns:
        v_T over the grid, shape (|grid|,); v̄ = max_T v_T.
    """
    _, A, _ = _ratio_eigs(lam, rho, T_grid, sigma2, tau2_star, sigma2_star)
    return np.mean(A**2, axis=1)


def pac_bayes_slack(
    lam: ArrayLike, rho: float, T_grid: ArrayLike | None, sigma2: float, tau2_star: float, sigma2_star: float,
    delta: float,
) -> tuple[float, float]:
    """PAC-Bayes slack for T_MAP: (v̄, sqrt(v̄ (log|grid| + log(1/δ))/n)) (DESIGN §5, Thm. 7.2).

    v̄ = max_T (1/n) tr(A_T²) (see ``pac_bayes_variance``).  With probability ≥ 1 − δ over
    r ~ N(0, Σ⋆):  𝓛(T_MAP|K) ≤ ℓ_{T_MAP}(r) + slack.

    Args:
        lam: all n eigenvalues, shape (n,); T_grid: 1-D grid (None → {0..30});
        sigma2: σ² of the evidence family; tau2_star, sigma2_star: Σ⋆ = τ⋆²K + σ⋆²I; delta ∈ (0, 1).
    Returns:
        (v_bar, slack) as floats.
    """
    if not (0.0 < delta < 1.0):
        raise ValueError("delta must lie in (0, 1)")
    v = pac_bayes_variance(lam, rho, T_grid, sigma2, tau2_star, sigma2_star)
    n = np.asarray(lam).shape[0]
    v_bar = float(np.max(v))
    slack = float(np.sqrt(v_bar * (np.log(v.size) + np.log(1.0 / delta)) / n))
    return v_bar, slack


def optimal_beta(v_bar: float, n: int, delta: float, kl: float = 0.0) -> float:
    """β⋆ = 2 sqrt((KL + log(1/δ))/(n v̄)), which turns the general bound into sqrt(v̄(KL+log 1/δ)/n)
    (DESIGN §5, Cor. E.14)."""
    return float(2.0 * np.sqrt((kl + np.log(1.0 / delta)) / (n * v_bar)))


def pac_bayes_general_bound(
    scores: ArrayLike,
    nu: ArrayLike,
    beta: float,
    n: int,
    v_bar: float,
    delta: float,
    prior: ArrayLike | None = None,
) -> float:
    """General PAC-Bayes bound for a posterior ν over the grid (DESIGN §5, Lemma E.13):

        E_ν𝓛 ≤ E_ν ℓ + (KL(ν‖π0) + log(1/δ))/(βn) + β v̄/4,   π0 uniform unless given.

    Args:
        scores: ℓ_T(r) over the grid, shape (G,); nu: posterior weights, shape (G,).
        beta: the β fixed before seeing r; n: prompt length; v_bar: from ``pac_bayes_slack``.
    Returns:
        the right-hand side (float).
    """
    nu = np.asarray(nu, dtype=float)
    kl = float(kl_to_prior(nu, prior))
    return float(nu @ np.asarray(scores, dtype=float) + (kl + np.log(1.0 / delta)) / (beta * n) + beta * v_bar / 4.0)
