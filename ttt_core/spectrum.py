"""Spectrum, SNR, query alignment, filter match and the TTT-vs-ICL verdict of a prompt kernel
(DESIGN §2–§5.1; paper A.3–A.5).

Given K = U diag(λ) Uᵀ (full kernel or one block), residuals r and the query coupling k_x:

* λ⋆ = σ²/τ², τ² and σ²: the §5.1 posterior (`noise_posterior`: Jeffreys on σ², a normal prior on
  log₁₀ λ⋆ around the mean eigenvalue), reported as posterior medians with 90 % intervals; a
  posterior that is mostly the prior is flagged (`flag`). The maximum-likelihood point fit
  (`theory.fit_signal_noise`) is kept as `ml_*`, labelled so, and never decides anything.
* Per-mode curves at the posterior medians: SNR τ²λ_i/σ², query alignment (u_iᵀk_x)², filter
  match g_T(λ_i) = 1 − (1 − ρλ_i)^T (ρ = c/λ_max) against g⋆(λ_i) = λ_i/(λ_i + λ⋆), per-mode query
  gap contributions a_i (q_T − q⋆)², a_i = (τ²λ_i + σ²)(u_iᵀk_x)².
* Verdict (§4 under §5.1): P(TTT beats ICL at T | r) = posterior mass of the λ⋆ where
  Σ a_i (q_T − q⋆)² < Σ a_i q⋆² (σ² cancels); "adapt" when P ≥ 0.9, "don't adapt" when P ≤ 0.1,
  otherwise "undetermined on this prompt". Gaps are posterior means with 90 % intervals. Without
  k_x (free text) the prompt-value version Σ (τ²λ_i + σ²)(g_T − g⋆)² < Σ (τ²λ_i + σ²) g⋆² is used
  and labelled so.
* Effective rank: exp(spectral entropy) of p_i = λ_i/Σλ, and participation ratio (Σλ)²/Σλ²;
  cumulative energy Σ_{j≤i} λ_j / Σλ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ttt_core import theory
from ttt_core.noise_posterior import ADAPT, NoisePosterior, noise_posterior
from ttt_core.posterior_verdict import verdict_probability_curve
from ttt_core.prompt_kernel import PromptKernel
from ttt_core.types import Block

DEFAULT_T = 8
DEFAULT_C = theory.DEFAULT_C
T_GRID = np.arange(31, dtype=float)


@dataclass
class SpectrumReport:
    """Spectral diagnosis of one kernel. Arrays are (n,) over modes, eigenvalues descending;
    arrays over `T_grid` have its length. tau2, sigma2, lam_star are posterior medians; gap_ttt /
    gap_icl posterior means (intervals in gap_ttt_ci / gap_icl_ci); prob = P(TTT beats ICL at T)."""

    label: str
    lam: np.ndarray
    U: np.ndarray
    r_tilde: np.ndarray
    k_tilde: np.ndarray | None
    posterior: NoisePosterior
    tau2: float
    sigma2: float
    lam_star: float
    lam_star_ci: tuple[float, float]
    ml_tau2: float
    ml_sigma2: float
    ml_lam_star: float
    loglik: float
    flag: str | None
    snr: np.ndarray
    snr_lo: np.ndarray
    snr_hi: np.ndarray
    alignment: np.ndarray | None
    T: float
    c: float
    rho: float
    g_T: np.ndarray
    g_star: np.ndarray
    q_T: np.ndarray
    q_star: np.ndarray
    gap_contrib: np.ndarray | None
    icl_contrib: np.ndarray | None
    gap_ttt: float
    gap_icl: float
    gap_ttt_ci: tuple[float, float]
    gap_icl_ci: tuple[float, float]
    prob: float
    decision: str
    beats: bool
    criterion: str
    T_grid: np.ndarray
    gap_grid: np.ndarray
    prob_grid: np.ndarray
    best_T: float
    verdict: str
    eff_rank_entropy: float
    participation_ratio: float
    cum_energy: np.ndarray

    @property
    def n(self) -> int:
        return int(self.lam.shape[0])


def effective_rank(lam: np.ndarray) -> tuple[float, float]:
    """(exp of spectral entropy, participation ratio (Σλ)²/Σλ²); both 0 for a zero spectrum."""
    lam = np.clip(np.asarray(lam, dtype=float), 0.0, None)
    total = lam.sum()
    if total <= 0:
        return 0.0, 0.0
    p = lam / total
    nz = p[p > 0]
    return float(np.exp(-(nz * np.log(nz)).sum())), float(total**2 / (lam**2).sum())


def compute_spectrum(K: np.ndarray, r: np.ndarray, k_x: np.ndarray | None = None, *, T: float = DEFAULT_T,
                     c: float = DEFAULT_C, T_grid: np.ndarray | None = None, label: str = "full kernel",
                     posterior: NoisePosterior | None = None) -> SpectrumReport:
    """Eigendecompose K (n, n) and evaluate every §3–§5.1 quantity at (T, c), ρ = c/λ_max.

    Args:
        K: PSD kernel (n, n); r: residuals (n,); k_x: query coupling (n,) or None.
        T, c: steps and step fraction for the filter match and the verdict.
        T_grid: steps at which the gaps and P(TTT beats ICL) are also evaluated (default 0…30).
        posterior: the λ⋆ posterior to use (default: computed from K's spectrum and r).
    """
    lam, U = theory.eigh_psd(K)
    r = np.asarray(r, dtype=float)
    r_t = U.T @ r
    k_t = None if k_x is None else U.T @ np.asarray(k_x, dtype=float)
    post = noise_posterior(lam, r_t) if posterior is None else posterior
    tau2, sigma2, lam_star = float(post.tau2.median), float(post.sigma2.median), float(post.lambda_star.median)
    ll = theory.gaussian_loglik(lam, r_t, post.ml.tau2, post.ml.sigma2)
    rho = theory.rho_from_c(lam, c)
    grid = T_GRID if T_grid is None else np.asarray(T_grid, dtype=float)
    g_T = theory.gd_filter(lam, rho, T)
    q_T = theory.gd_query_filter(lam, rho, T)
    g_star = theory.bayes_filter(lam, lam_star)
    q_star = theory.bayes_query_filter(lam, lam_star)
    if k_t is not None:  # per-mode curves at λ⋆'s median with σ² at its median (τ² = σ²/λ⋆ there)
        a = theory.query_weights(lam, k_t, sigma2 / lam_star, sigma2)
        gap_contrib, icl_contrib = a * (q_T - q_star) ** 2, a * q_star**2
        criterion = "query Bayes gap"
    else:
        gap_contrib = icl_contrib = None
        criterion = "prompt-value excess risk (no query)"
    curve = verdict_probability_curve(post, lam, k_t, rho, np.concatenate([[float(T)], grid]))
    prob, decision = float(curve.prob[0]), curve.decision[0]
    gap_grid = np.asarray(curve.gap_ttt.mean[1:], dtype=float)
    best_T = float(grid[int(np.argmin(gap_grid))]) if np.all(np.isfinite(gap_grid)) else float(
        grid[int(np.argmax(curve.prob[1:]))])
    where = " — on prompt values, no query" if k_t is None else ""
    verdict = (f"{decision.capitalize()} at T = {T:g}: P(TTT beats ICL) = {prob:.2f} over the λ⋆ posterior{where}")
    ent, pr = effective_rank(lam)
    tot = lam.sum()
    cum = np.cumsum(lam) / tot if tot > 0 else np.zeros_like(lam)
    return SpectrumReport(
        label=label, lam=lam, U=U, r_tilde=r_t, k_tilde=k_t, posterior=post, tau2=tau2, sigma2=sigma2,
        lam_star=lam_star, lam_star_ci=(float(post.lambda_star.lo), float(post.lambda_star.hi)),
        ml_tau2=float(post.ml.tau2), ml_sigma2=float(post.ml.sigma2), ml_lam_star=float(post.ml.lambda_star),
        loglik=float(ll), flag=post.flag_text, snr=np.asarray(post.snr.median, dtype=float),
        snr_lo=np.asarray(post.snr.lo, dtype=float), snr_hi=np.asarray(post.snr.hi, dtype=float),
        alignment=None if k_t is None else k_t**2, T=float(T), c=float(c), rho=rho,
        g_T=g_T, g_star=g_star, q_T=q_T, q_star=q_star, gap_contrib=gap_contrib, icl_contrib=icl_contrib,
        gap_ttt=float(curve.gap_ttt.mean[0]), gap_icl=float(curve.gap_icl.mean[0]),
        gap_ttt_ci=(float(curve.gap_ttt.lo[0]), float(curve.gap_ttt.hi[0])),
        gap_icl_ci=(float(curve.gap_icl.lo[0]), float(curve.gap_icl.hi[0])), prob=prob, decision=decision,
        beats=decision == ADAPT, criterion=criterion, T_grid=grid, gap_grid=gap_grid,
        prob_grid=np.asarray(curve.prob[1:], dtype=float), best_T=best_T, verdict=verdict,
        eff_rank_entropy=ent, participation_ratio=pr, cum_energy=cum,
    )


def kernel_spectrum(ev: PromptKernel, block: Block | None = None, **kw: Any) -> SpectrumReport:
    """`compute_spectrum` of a PromptKernel's full kernel (block None) or of one block
    (layer, head), whose k_x is that block's coupling k_x^(b)."""
    if block is None:
        return compute_spectrum(ev.K, ev.residuals, ev.k_x, label=f"full kernel ({ev.subspace})", **kw)
    l, h = block
    kx = None if ev.head_couplings is None else ev.head_couplings[l, h]
    return compute_spectrum(ev.head_kernel(l, h), ev.residuals, kx, label=ev.block_label(block), **kw)
