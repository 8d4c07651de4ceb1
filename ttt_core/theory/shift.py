"""Distribution shift and the limits of fixed T (DESIGN §4).

A change of λ⋆ on a rank-m projector (exact risk of fixed shrinkage and the no-fixed-T lower
bound), subspace James–Stein shrinkage against the full fit, and the out-of-range error floor.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from ttt_core.theory._common import FloatArray


def fixed_estimator_shift_risk(
    a: ArrayLike, lam_star_j: ArrayLike, sigma2: ArrayLike, m: int
) -> FloatArray:
    """Exact risk of a fixed spectral estimator a·Kr for a rank-m projector K (DESIGN §4, Prop. 6.1).

    E_{λ_j}‖a Kr − f_Bayes^{(λ_j)}‖² = m (τ_j² + σ_j²)(a − s_j)²,  s_j = 1/(1 + λ_j), τ_j² = σ_j²/λ_j.
    The paper's statement has one σ² for all j (pass a float); passing one σ_j² per level covers
    "same signal τ², different noise" shifts (then τ_j² = τ² for all j).

    Args:
        a: shrinkage factor(s), shape (A,) or scalar (fixed-T TTT has a = g_T(1)).
        lam_star_j: noise-to-signal ratios λ_j > 0, shape (J,) or scalar.
        sigma2: noise variance, scalar or shape (J,).
        m: rank of the projector.
    Returns:
        shape lam_star_j.shape + a.shape.
    """
    a = np.asarray(a, dtype=float)
    lj = np.asarray(lam_star_j, dtype=float)
    if np.any(lj <= 0):
        raise ValueError("noise-to-signal ratios must be positive")
    s2 = np.broadcast_to(np.asarray(sigma2, dtype=float), lj.shape)
    v_j = s2 / lj + s2
    s_j = 1.0 / (1.0 + lj)
    shape = lj.shape + (1,) * a.ndim
    return m * v_j.reshape(shape) * (a - s_j.reshape(shape)) ** 2


def no_fixed_T_lower_bound(lam_star_1: float, lam_star_2: float, sigma2: ArrayLike, m: int) -> float:
    """Lower bound, valid for every fixed a (DESIGN §4, Prop. 6.1; rank-m projector K):

        max_j E‖aKr − f_Bayes^{(λ_j)}‖² ≥ m min_j(τ_j² + σ_j²)(|s1 − s2|/2)²,
    τ_j² = σ_j²/λ_j, s_j = 1/(1 + λ_j); ``sigma2`` is one σ² (paper) or a pair (σ_1², σ_2²).
    """
    l1, l2 = float(lam_star_1), float(lam_star_2)
    s2a, s2b = np.broadcast_to(np.asarray(sigma2, dtype=float), (2,))
    s1, s2 = 1.0 / (1.0 + l1), 1.0 / (1.0 + l2)
    v = min(s2a / l1 + s2a, s2b / l2 + s2b)
    return float(m * v * (abs(s1 - s2) / 2.0) ** 2)


def subspace_james_stein(r: ArrayLike, basis: ArrayLike, sigma2: float, positive_part: bool = False) -> FloatArray:
    """Subspace James–Stein (1 − (d − 2)σ²/‖Π_S r‖²) Π_S r (DESIGN §4, Prop. 6.2).

    Dominates the full fit Π_S r = lim_{T→∞} f̂_T when d = dim S ≥ 3 (σ² known).

    Args:
        r: residuals, shape (n,) or (m, n).
        basis: orthonormal basis of S as columns, shape (n, d).
        positive_part: clip the factor at 0 (the positive-part estimator).
    Returns:
        same shape as r.
    """
    B = np.asarray(basis, dtype=float)
    r = np.asarray(r, dtype=float)
    d = B.shape[1]
    proj = (r @ B) @ B.T
    norm2 = np.sum(proj**2, axis=-1, keepdims=True)
    factor = 1.0 - (d - 2) * float(sigma2) / np.where(norm2 > 0, norm2, np.inf)
    if positive_part:
        factor = np.maximum(factor, 0.0)
    return factor * proj


def james_stein_risk_projector(d: int, tau2: float, sigma2: float) -> tuple[float, float]:
    """(full-fit risk, James–Stein risk) of estimating Π_S f⋆ when Π_S r ~ N(0, (τ² + σ²)I_d)
    (K a rank-d projector, aligned benchmark) (DESIGN §4, Prop. 6.2):
    full fit dσ²;  James–Stein dσ² − (d − 2)σ⁴/(τ² + σ²)  (uses E[1/χ²_d] = 1/(d − 2), d ≥ 3)."""
    if d < 3:
        raise ValueError("James-Stein dominance needs d >= 3")
    return float(d * sigma2), float(d * sigma2 - (d - 2) * sigma2**2 / (tau2 + sigma2))


def out_of_range_floor(f_star: ArrayLike, basis: ArrayLike) -> FloatArray | float:
    """Error floor ‖Π_{S⊥} f⋆‖² = ‖f⋆‖² − ‖Bᵀf⋆‖² that no T removes (DESIGN §4, Prop. 6.3).

    Args:
        f_star: shape (n,) or (m, n); basis: orthonormal basis of S = range(K), shape (n, d).
    Returns:
        float or shape (m,).
    """
    f = np.asarray(f_star, dtype=float)
    B = np.asarray(basis, dtype=float)
    out = np.maximum(np.sum(f**2, axis=-1) - np.sum((f @ B) ** 2, axis=-1), 0.0)
    return float(out) if np.ndim(out) == 0 else out
