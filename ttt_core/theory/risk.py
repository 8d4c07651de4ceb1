"""Risk: when TTT helps (DESIGN §4).

Query weights a_i, the query Bayes gap of any kernel-linear rule, the TTT-versus-ICL verdict and the
prompt-value risks, all in the eigenbasis of K.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ttt_core.theory._common import FloatArray
from ttt_core.theory.filters import check_eigenvalues


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

    Arguments and result shapes as in ``prompt_excess_risk``.
    """
    lam = check_eigenvalues(lam)
    tau2, sigma2 = _signal_noise(tau2, sigma2)
    g = np.asarray(g, dtype=float)
    out = np.sum(tau2 * lam * (1.0 - g) ** 2 + sigma2 * g**2, axis=-1)
    return float(out) if np.ndim(out) == 0 else out
