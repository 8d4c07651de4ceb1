"""Spectral theory of test-time training (DESIGN.md §3, §4, §5).

Everything here works in the eigenbasis of the prompt kernel K = U diag(λ) Uᵀ (DESIGN §2):
callers pass the eigenvalues ``lam`` (shape ``(n,)``) and, where needed, rotated vectors
``k_tilde = Uᵀ k_x`` and ``r_tilde = Uᵀ r``.  All functions are vectorised over eigenvalues and
over step grids; nothing here builds an n × n matrix.

Conventions
-----------
* Eigenvalues.  ``lam`` must be those of a positive semi-definite matrix.  Round-off negatives
  down to ``-EIG_TOL_REL * max|λ|`` are treated as exact zeros; anything more negative raises.
* Step size.  ρ = η/σ² must satisfy 0 < ρ < 1/λ_max (strict) so that g_T ∈ [0, 1) and
  1 − ρλ > 0 (DESIGN §3).  When λ_max = 0 every ρ > 0 is admissible.
* Step grids.  ``T`` may be a scalar (result has ``lam``'s shape) or an array (result has shape
  ``T.shape + lam.shape``, i.e. ``(len(T), n)`` for a 1-D grid).  T may be non-integer (the
  filters are analytic in T) but must be ≥ 0.
* Powers.  (1 − ρλ)^T is computed as exp(T·log1p(−ρλ)) and 1 − (1 − ρλ)^T as
  −expm1(T·log1p(−ρλ)): accurate for tiny ρλ, no overflow for huge T.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import optimize

FloatArray = NDArray[np.float64]
NoiseSpec = float | Literal["fixed", "mle"]

#: Relative tolerance below zero accepted for eigenvalues of a PSD matrix (round-off).
EIG_TOL_REL: float = 1e-10
#: Default step fraction c in ρ = c/λ_max for prompt-level views (spectrum, steps, scores, paper
#: mode, diagnose, reproduction): the paper's SST-2 choice, inside its pilot grid {0.05, 0.1, 0.2}.
DEFAULT_C = 0.1
#: Default step grid {0, 1, ..., 30} (DESIGN §5).
DEFAULT_T_GRID: FloatArray = np.arange(31, dtype=float)
#: Variance floor used only when the data carry no scale at all (r = 0 exactly).
VAR_FLOOR: float = 1e-300

__all__ = [
    "EIG_TOL_REL",
    "DEFAULT_T_GRID",
    "check_eigenvalues",
    "check_rho",
    "rho_from_c",
    "eigh_psd",
    "gd_filter",
    "gd_query_filter",
    "gradient_flow_filter",
    "gradient_flow_query_filter",
    "bayes_filter",
    "bayes_query_filter",
    "matching_time",
    "implied_prior_eigs",
    "evidence_cov_eigs",
    "query_weights",
    "query_bayes_gap",
    "IclVerdict",
    "ttt_beats_icl",
    "prompt_excess_risk",
    "prompt_risk",
    "evidence_scores",
    "profiled_scores",
    "select_steps",
    "gibbs_posterior",
    "kl_to_prior",
    "model_averaged_filter",
    "fit_signal_noise",
    "gaussian_loglik",
    "population_evidence_risk",
    "pac_bayes_variance",
    "pac_bayes_slack",
    "pac_bayes_general_bound",
    "optimal_beta",
    "fixed_estimator_shift_risk",
    "no_fixed_T_lower_bound",
    "subspace_james_stein",
    "james_stein_risk_projector",
    "out_of_range_floor",
]


# --------------------------------------------------------------------------------------------
# validation helpers
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


def _grid(T: ArrayLike) -> tuple[FloatArray, bool]:
    """T as a float array and whether it was a scalar; rejects negative or non-finite T."""
    T_arr = np.asarray(T, dtype=float)
    if not np.all(np.isfinite(T_arr)) or np.any(T_arr < 0):
        raise ValueError("step counts T must be finite and >= 0")
    return T_arr, T_arr.ndim == 0


def _log_contraction(lam: FloatArray, rho: float) -> FloatArray:
    """log(1 − ρλ) via log1p (finite because ρλ < 1 was validated)."""
    return np.log1p(-rho * lam)


def _outer_T(T_arr: FloatArray, x: FloatArray) -> FloatArray:
    """T ⊗ x with shape T.shape + x.shape."""
    return T_arr.reshape(T_arr.shape + (1,) * x.ndim) * x


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
    lam = check_eigenvalues(lam)
    rho = check_rho(lam, rho)
    T_arr, _ = _grid(T)
    return -np.expm1(_outer_T(T_arr, _log_contraction(lam, rho)))


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
    lam = check_eigenvalues(lam)
    rho = check_rho(lam, rho)
    T_arr, _ = _grid(T)
    zero = lam == 0.0
    safe = np.where(zero, 1.0, lam)
    num = -np.expm1(_outer_T(T_arr, _log_contraction(lam, rho)))
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
    lam = check_eigenvalues(lam)
    rho = check_rho(lam, rho)
    T_arr, _ = _grid(T)
    return float(sigma2) * np.expm1(-_outer_T(T_arr, _log_contraction(lam, rho)))


def evidence_cov_eigs(lam: ArrayLike, rho: float, T: ArrayLike, sigma2: float) -> FloatArray:
    """Eigenvalues of Σ_T = σ²(I − ρK)^{−T} = C_T + σ²I, i.e. σ² exp(−T log1p(−ρλ)) (DESIGN §5).

    Returns:
        shape lam.shape or T.shape + lam.shape.
    """
    lam = check_eigenvalues(lam)
    rho = check_rho(lam, rho)
    T_arr, _ = _grid(T)
    return float(sigma2) * np.exp(-_outer_T(T_arr, _log_contraction(lam, rho)))


# --------------------------------------------------------------------------------------------
# risk (§4)
# --------------------------------------------------------------------------------------------


def _signal_noise(tau2: float, sigma2: float) -> tuple[float, float]:
    tau2, sigma2 = float(tau2), float(sigma2)
    if tau2 < 0 or sigma2 < 0 or (tau2 == 0 and sigma2 == 0):
        raise ValueError(f"need tau2 >= 0, sigma2 >= 0, not both zero (got {tau2}, {sigma2})")
    return tau2, sigma2


def _bayes_q(lam: FloatArray, tau2: float, sigma2: float) -> FloatArray:
    """q⋆ = 1/(λ + σ²/τ²) written as τ²/(τ²λ + σ²) (finite at τ² = 0)."""
    v = tau2 * lam + sigma2
    return np.divide(tau2, v, out=np.zeros_like(lam), where=v > 0)


def _bayes_g(lam: FloatArray, tau2: float, sigma2: float) -> FloatArray:
    """g⋆ = λ/(λ + σ²/τ²) written as τ²λ/(τ²λ + σ²)."""
    v = tau2 * lam + sigma2
    return np.divide(tau2 * lam, v, out=np.zeros_like(lam), where=v > 0)


def query_weights(lam: ArrayLike, k_tilde: ArrayLike, tau2: float, sigma2: float) -> FloatArray:
    """Query weights a_i = (τ²λ_i + σ²) k̃_i², k̃ = Uᵀk_x (DESIGN §4).

    Args:
        lam: eigenvalues, shape (n,).
        k_tilde: rotated query coupling Uᵀk_x, shape (n,).
    Returns:
        a, shape (n,).
    """
    lam = check_eigenvalues(lam)
    tau2, sigma2 = _signal_noise(tau2, sigma2)
    k_tilde = np.asarray(k_tilde, dtype=float)
    return (tau2 * lam + sigma2) * k_tilde**2


def query_bayes_gap(
    lam: ArrayLike, k_tilde: ArrayLike, tau2: float, sigma2: float, q: ArrayLike
) -> FloatArray | float:
    """Query Bayes gap Σ_i (τ²λ_i + σ²) k̃_i² (q_i − 1/(λ_i + σ²/τ²))² (DESIGN §4, Thm. 5.2).

    This is E[(k_xᵀq(K)r − f_Bayes(x))² | K, k_x] under the GP benchmark.

    Args:
        lam: eigenvalues, shape (n,).
        k_tilde: Uᵀk_x, shape (n,).
        tau2, sigma2: signal and noise variances (λ⋆ = σ²/τ²).
        q: the rule's query-filter values at lam, shape (n,) or (..., n) (e.g. (grid, n)).
    Returns:
        float for 1-D q, else array of shape q.shape[:-1] (one gap per row).
    """
    lam = check_eigenvalues(lam)
    a = query_weights(lam, k_tilde, tau2, sigma2)
    q_star = _bayes_q(lam, *_signal_noise(tau2, sigma2))
    gap = np.sum(a * (np.asarray(q, dtype=float) - q_star) ** 2, axis=-1)
    return float(gap) if np.ndim(gap) == 0 else gap


@dataclass(frozen=True)
class IclVerdict:
    """Outcome of the TTT-versus-ICL comparison at the query (DESIGN §4).

    Attributes:
        beats: True where Σ a_i (q − q⋆)² < Σ a_i q⋆² (bool or bool array over rows of q).
        gap_ttt: the rule's query Bayes gap Σ a_i (q − q⋆)².
        gap_icl: the ICL gap Σ a_i q⋆² (q ≡ 0).
    """

    beats: bool | NDArray[np.bool_]
    gap_ttt: float | FloatArray
    gap_icl: float


def ttt_beats_icl(lam: ArrayLike, k_tilde: ArrayLike, tau2: float, sigma2: float, q: ArrayLike) -> IclVerdict:
    """TTT beats ICL iff Σ a_i (q_T − q⋆)² < Σ a_i q⋆² (DESIGN §4, Cor. E.5).

    Args:
        lam, k_tilde: eigenvalues and Uᵀk_x, shape (n,).
        q: query-filter values, shape (n,) or (grid, n).
    Returns:
        IclVerdict with ``beats`` (bool or bool array over rows), ``gap_ttt``, ``gap_icl``.
    """
    gap_ttt = query_bayes_gap(lam, k_tilde, tau2, sigma2, q)
    gap_icl = float(query_bayes_gap(lam, k_tilde, tau2, sigma2, np.zeros(np.shape(lam))))
    beats = np.asarray(gap_ttt) < gap_icl
    return IclVerdict(beats=bool(beats) if beats.ndim == 0 else beats, gap_ttt=gap_ttt, gap_icl=gap_icl)


def prompt_excess_risk(lam: ArrayLike, tau2: float, sigma2: float, g: ArrayLike) -> FloatArray | float:
    """Prompt-value excess risk Σ_i (τ²λ_i + σ²)(g_i − g⋆_i)² (DESIGN §4, Eq. 14).

    Equal to E‖g(K)r − g⋆(K)r‖² under the aligned benchmark f⋆ ~ N(0, τ²K).

    Args:
        lam: eigenvalues, shape (n,).
        g: prompt-filter values, shape (n,) or (..., n).
    Returns:
        float for 1-D g, else array of shape g.shape[:-1].
    """
    lam = check_eigenvalues(lam)
    tau2, sigma2 = _signal_noise(tau2, sigma2)
    g_star = _bayes_g(lam, tau2, sigma2)
    out = np.sum((tau2 * lam + sigma2) * (np.asarray(g, dtype=float) - g_star) ** 2, axis=-1)
    return float(out) if np.ndim(out) == 0 else out


def prompt_risk(lam: ArrayLike, tau2: float, sigma2: float, g: ArrayLike) -> FloatArray | float:
    """Full prompt risk Σ_i [τ²λ_i (1 − g_i)² + σ² g_i²] = E‖g(K)r − f⋆‖² (DESIGN §4, Eq. 13).

    Args:
        lam: eigenvalues, shape (n,).
        g: prompt-filter values, shape (n,) or (..., n).
    Returns:
        float for 1-D g, else array of shape g.shape[:-1].
    """
    lam = check_eigenvalues(lam)
    tau2, sigma2 = _signal_noise(tau2, sigma2)
    g = np.asarray(g, dtype=float)
    out = np.sum(tau2 * lam * (1.0 - g) ** 2 + sigma2 * g**2, axis=-1)
    return float(out) if np.ndim(out) == 0 else out


# --------------------------------------------------------------------------------------------
# evidence (§5)
# --------------------------------------------------------------------------------------------


def _grid_1d(T_grid: ArrayLike | None) -> FloatArray:
    if T_grid is None:
        return DEFAULT_T_GRID.copy()
    T_arr, _ = _grid(T_grid)
    T_arr = np.atleast_1d(T_arr)
    if T_arr.ndim != 1 or T_arr.size == 0:
        raise ValueError("T_grid must be a non-empty 1-D array of step counts")
    return T_arr


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
    lam: ArrayLike,
    r_tilde: ArrayLike,
    rho: float,
    T_grid: ArrayLike | None = None,
    noise: NoiseSpec = "fixed",
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


# --------------------------------------------------------------------------------------------
# PAC-Bayes (§5)
# --------------------------------------------------------------------------------------------


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
    lam: ArrayLike,
    rho: float,
    T_grid: ArrayLike | None,
    sigma2: float,
    tau2_star: float,
    sigma2_star: float,
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
    lam: ArrayLike,
    rho: float,
    T_grid: ArrayLike | None,
    sigma2: float,
    tau2_star: float,
    sigma2_star: float,
) -> FloatArray:
    """Per-step variance proxy v_T = (1/n) tr(A_T²), A_T = Σ⋆^{1/2}Σ_T^{-1}Σ⋆^{1/2} (DESIGN §5).

    A_T is diagonal in K's eigenbasis with entries (τ⋆²λ_i + σ⋆²)(1 − ρλ_i)^T/σ².

    Returns:
        v_T over the grid, shape (|grid|,); v̄ = max_T v_T.
    """
    _, A, _ = _ratio_eigs(lam, rho, T_grid, sigma2, tau2_star, sigma2_star)
    return np.mean(A**2, axis=1)


def pac_bayes_slack(
    lam: ArrayLike,
    rho: float,
    T_grid: ArrayLike | None,
    sigma2: float,
    tau2_star: float,
    sigma2_star: float,
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


# --------------------------------------------------------------------------------------------
# distribution shift and the limits of fixed T (§4)
# --------------------------------------------------------------------------------------------


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
