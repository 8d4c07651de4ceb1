"""Spectrum, SNR, query alignment, filter match and the TTT-vs-ICL verdict of a prompt kernel
(DESIGN §2–§5; paper A.3–A.5).

Given K = U diag(λ) Uᵀ (full kernel or one block), residuals r and the query coupling k_x:

* τ², σ² maximise the GP evidence of r under N(0, τ²K + σ²I) (`theory.fit_signal_noise`);
  λ⋆ = σ²/τ² (∞ when τ² = 0); per-mode SNR τ²λ_i/σ².
* Query alignment (u_iᵀk_x)²; filter match g_T(λ_i) = 1 − (1 − ρλ_i)^T with ρ = c/λ_max versus
  g⋆(λ_i) = λ_i/(λ_i + λ⋆); per-mode query-gap contributions a_i (q_T − q⋆)², a_i = (τ²λ_i + σ²)(u_iᵀk_x)².
* Verdict (§4): TTT beats ICL at T iff Σ a_i (q_T − q⋆)² < Σ a_i q⋆². On a real prompt τ², σ² are
  fitted, so this is a **plug-in estimate**, never a certificate. Without k_x (free text) the
  prompt-value version Σ (τ²λ_i + σ²)(g_T − g⋆)² < Σ (τ²λ_i + σ²) g⋆² is used and labelled so.
* Effective rank: exp(spectral entropy) of p_i = λ_i/Σλ, and participation ratio (Σλ)²/Σλ²;
  cumulative energy Σ_{j≤i} λ_j / Σλ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ttt_core import theory

DEFAULT_T = 8
DEFAULT_C = theory.DEFAULT_C
T_GRID = np.arange(31, dtype=float)


@dataclass
class SpectrumReport:
    """Spectral diagnosis of one kernel. Arrays are (n,) over modes, eigenvalues descending."""

    label: str
    lam: np.ndarray
    U: np.ndarray
    r_tilde: np.ndarray
    k_tilde: np.ndarray | None
    tau2: float
    sigma2: float
    loglik: float
    lam_star: float
    snr: np.ndarray
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
    beats: bool
    criterion: str
    T_grid: np.ndarray
    gap_grid: np.ndarray
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
                     tau2_sigma2: tuple[float, float] | None = None) -> SpectrumReport:
    """Eigendecompose K (n, n) and evaluate every §3–§5 quantity at (T, c), ρ = c/λ_max.

    Args:
        K: PSD kernel (n, n); r: residuals (n,); k_x: query coupling (n,) or None.
        T, c: steps and step fraction for the filter match and the verdict.
        T_grid: steps at which the query/prompt gap is also evaluated (default 0…30).
        tau2_sigma2: use these (τ², σ²) instead of fitting them (e.g. the full kernel's fit for a block).
    """
    lam, U = theory.eigh_psd(K)
    r = np.asarray(r, dtype=float)
    r_t = U.T @ r
    k_t = None if k_x is None else U.T @ np.asarray(k_x, dtype=float)
    if tau2_sigma2 is None:
        tau2, sigma2, ll = theory.fit_signal_noise(lam, r_t)
    else:
        tau2, sigma2 = map(float, tau2_sigma2)
        ll = theory.gaussian_loglik(lam, r_t, tau2, sigma2)
    lam_star = sigma2 / tau2 if tau2 > 0 else np.inf
    snr = tau2 * lam / sigma2 if sigma2 > 0 else np.full_like(lam, np.inf)
    rho = theory.rho_from_c(lam, c)
    grid = T_GRID if T_grid is None else np.asarray(T_grid, dtype=float)
    g_T = theory.gd_filter(lam, rho, T)
    q_T = theory.gd_query_filter(lam, rho, T)
    g_star = theory.bayes_filter(lam, lam_star)
    q_star = theory.bayes_query_filter(lam, lam_star)
    if k_t is not None:
        a = theory.query_weights(lam, k_t, tau2, sigma2)
        gap_contrib, icl_contrib = a * (q_T - q_star) ** 2, a * q_star**2
        gap_grid = np.asarray(theory.query_bayes_gap(lam, k_t, tau2, sigma2, theory.gd_query_filter(lam, rho, grid)))
        criterion = "query Bayes gap"
    else:
        w = tau2 * lam + sigma2
        gap_contrib, icl_contrib = None, None
        gap_grid = np.asarray(theory.prompt_excess_risk(lam, tau2, sigma2, theory.gd_filter(lam, rho, grid)))
        criterion = "prompt-value excess risk (no query)"
    if k_t is not None:
        gap_ttt, gap_icl = float(gap_contrib.sum()), float(icl_contrib.sum())
    else:
        gap_ttt = float(np.sum(w * (g_T - g_star) ** 2))
        gap_icl = float(np.sum(w * g_star**2))
    beats = gap_ttt < gap_icl
    best_T = float(grid[int(np.argmin(gap_grid))])
    T_txt = f"{T:g}"
    if beats:
        verdict = f"TTT beats ICL at T = {T_txt} (plug-in estimate)"
    else:
        verdict = f"ICL beats TTT at T = {T_txt} (plug-in estimate)"
    if k_t is None:
        verdict += " — on prompt values, no query"
    ent, pr = effective_rank(lam)
    tot = lam.sum()
    cum = np.cumsum(lam) / tot if tot > 0 else np.zeros_like(lam)
    return SpectrumReport(
        label=label, lam=lam, U=U, r_tilde=r_t, k_tilde=k_t, tau2=float(tau2), sigma2=float(sigma2), loglik=float(ll),
        lam_star=float(lam_star), snr=snr, alignment=None if k_t is None else k_t**2, T=float(T), c=float(c), rho=rho,
        g_T=g_T, g_star=g_star, q_T=q_T, q_star=q_star, gap_contrib=gap_contrib, icl_contrib=icl_contrib,
        gap_ttt=gap_ttt, gap_icl=gap_icl, beats=bool(beats), criterion=criterion, T_grid=grid, gap_grid=gap_grid,
        best_T=best_T, verdict=verdict, eff_rank_entropy=ent, participation_ratio=pr, cum_energy=cum,
    )


def kernel_spectrum(ev, block: tuple[int, int] | None = None, **kw) -> SpectrumReport:
    """`compute_spectrum` of a PromptKernel's full kernel (block None) or of one block
    (layer, head), whose k_x is that block's coupling k_x^(b)."""
    if block is None:
        return compute_spectrum(ev.K, ev.residuals, ev.k_x, label=f"full kernel ({ev.subspace})", **kw)
    l, h = block
    kx = None if ev.head_couplings is None else ev.head_couplings[l, h]
    return compute_spectrum(ev.head_kernel(l, h), ev.residuals, kx, label=ev.block_label(block), **kw)
