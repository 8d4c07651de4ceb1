"""Verdicts, slack and the evidence bound under the §5.1 posterior over λ⋆ (DESIGN §4, §5, §5.1).

`noise_posterior.noise_posterior` gives the posterior; here it becomes P(TTT beats ICL at T | r)
with "adapt" / "don't adapt" / "undetermined on this prompt", the posterior of both Bayes gaps,
the plug-in PAC-Bayes slack's interval, and the Bayes-gap-from-evidence bound. Arguments are in
K's eigenbasis, as in `noise_posterior`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ttt_core import theory
from ttt_core.noise_posterior import (
    _W_CUT,
    ADAPT,
    ADAPT_P,
    DONT_ADAPT,
    DONT_ADAPT_P,
    UNDETERMINED,
    FloatArray,
    Interval,
    NoisePosterior,
    _check_post_lam,
    _check_spectrum,
    _finite_1d,
    _mixture_summary,
)


@dataclass(frozen=True)
class VerdictCurve:
    """P(TTT beats ICL | r) over a step grid (DESIGN §4, §5.1); arrays have shape (|T|,).

    Attributes:
        kind: "query" (Σ a_i (q_T − q⋆)² vs Σ a_i q⋆²) or "prompt" (prompt excess risk vs g ≡ 0).
        T: step counts.
        prob: posterior probability that T steps beat ICL.
        decision: "adapt" (P ≥ 0.9), "don't adapt" (P ≤ 0.1) or "undetermined on this prompt".
        gap_ttt, gap_icl: posterior of the Bayes gaps σ²·c(s) (mean, median, 90 % interval).
        lambda_star_threshold: TTT beats ICL at T iff λ⋆ < this value (σ² cancels; 0 = never).
    """

    kind: str
    T: FloatArray
    prob: FloatArray
    decision: tuple[str, ...]
    gap_ttt: Interval
    gap_icl: Interval
    lambda_star_threshold: FloatArray


@dataclass(frozen=True)
class VerdictProbability:
    """``VerdictCurve`` at one step count T (all fields scalars)."""

    kind: str
    T: float
    prob: float
    decision: str
    gap_ttt: Interval
    gap_icl: Interval
    lambda_star_threshold: float


@dataclass(frozen=True)
class SlackInterval:
    """Plug-in PAC-Bayes slack sqrt(v̄ (log|grid| + log 1/δ)/n) with Σ̂⋆ = τ²K + σ²I (DESIGN §5).

    Attributes:
        at_median: slack with (τ², σ²) at their posterior medians; v_bar_at_median its v̄.
        posterior: the slack's posterior (mean, median, 90 % interval) over (s, σ²).
        evidence_sigma2: σ² of the evidence family Σ_T (default the fixed σ̂² = ‖r‖²/n).
        delta, grid_size: δ and |grid|.
        label: "plug-in" — Σ⋆ is estimated from the same prompt; this is not a certificate.
    """

    at_median: float
    v_bar_at_median: float
    posterior: Interval
    evidence_sigma2: float
    delta: float
    grid_size: int
    label: str = "plug-in (Sigma* estimated from this prompt; not a certificate)"


@dataclass(frozen=True)
class BayesGapBound:
    """E‖f̂_T − f_Bayes‖² and its evidence bound 4σ²·KL(N(0,Σ⋆) ‖ N(0,Σ_T)) (DESIGN §5).

    Fields are floats for scalar T, arrays of T's shape otherwise.
    """

    expected_gap: float | FloatArray
    bound: float | FloatArray
    kl: float | FloatArray



# --------------------------------------------------------------------------------------------
# verdicts (§4 under the §5.1 posterior)
# --------------------------------------------------------------------------------------------


def decision_from_probability(prob: ArrayLike) -> str | tuple[str, ...]:
    """"adapt" if P ≥ 0.9, "don't adapt" if P ≤ 0.1, else "undetermined on this prompt" (DESIGN §5.1)."""
    p = np.asarray(prob, dtype=float)
    d = np.where(p >= ADAPT_P, ADAPT, np.where(p <= DONT_ADAPT_P, DONT_ADAPT, UNDETERMINED))
    return str(d) if d.ndim == 0 else tuple(str(v) for v in d)


def _per_sigma2_gaps(post: NoisePosterior, lam: FloatArray, k_tilde: ArrayLike | None, rho: float,
                     T_arr: FloatArray) -> tuple[str, FloatArray, FloatArray, NDArray[np.bool_], FloatArray]:
    """Per unit σ²: (kind, c_ttt (|T|, G), c_icl (G,), criterion (|T|, G), λ⋆ threshold (|T|,))."""
    s = post.s_grid
    onep = 1.0 + np.outer(s, lam)  # (G, n) = (τ²λ + σ²)/σ²
    if k_tilde is None:
        kind, wv, h = "prompt", np.ones_like(lam), lam
        f = theory.gd_filter(lam, rho, T_arr)  # (|T|, n)
        target = np.outer(s, lam) / onep  # g⋆ = sλ/(1 + sλ)
    else:
        k = _finite_1d(k_tilde, "k_tilde")
        if k.shape != lam.shape:
            raise ValueError(f"k_tilde must have shape {lam.shape}, got {k.shape}")
        kind, wv, h = "query", k**2, np.ones_like(lam)
        f = theory.gd_query_filter(lam, rho, T_arr)
        target = s[:, None] / onep  # q⋆ = 1/(λ + 1/s)
    a = wv[None, :] * onep  # (G, n)
    c_icl = np.sum(a * target**2, axis=1)
    c_ttt = np.empty((T_arr.size, s.size))
    chunk = max(1, int(2**21 // max(1, s.size * lam.size)))
    for i in range(0, T_arr.size, chunk):
        d = f[i:i + chunk, None, :] - target[None, :, :]
        c_ttt[i:i + chunk] = np.einsum("tgn,gn->tg", d * d, a)
    # Σ a (f − f⋆)² − Σ a f⋆² = σ²[Σ w f² − s Σ w f (2h − λ f)] (using (1 + sλ) f⋆ = s h): linear
    # in s, so TTT wins iff s > s_crit = num/den, i.e. λ⋆ < den/num.  The sign of this exact
    # difference decides the criterion (no cancellation between two nearly equal gaps).
    num = f**2 @ wv
    den = (f * (2.0 * h - lam * f)) @ wv
    beats = (num[:, None] - s[None, :] * den[:, None]) < 0.0  # (|T|, G)
    thr = np.where(num > 0, den / np.where(num > 0, num, 1.0), 0.0)
    return kind, c_ttt, c_icl, beats, thr


def verdict_probability_curve(
    post: NoisePosterior, lam: ArrayLike, k_tilde: ArrayLike | None, rho: float, T_grid: ArrayLike
) -> VerdictCurve:
    """P(TTT beats ICL at T | r) for every T of a grid, over the §5.1 posterior (DESIGN §4, §5.1).

    Query (k_tilde given): at each grid s_j the §4 criterion Σ a_i (q_T − q⋆)² < Σ a_i q⋆² with
    a_i = σ²(1 + s_jλ_i) k̃_i², q⋆ = 1/(λ + 1/s_j); σ² factors out, so P = Σ_j w_j 1[criterion].
    The criterion is decided by the sign of the exact difference of the two sides,
    σ²[Σ w f_T² − s Σ w f_T (2h − λ f_T)] (w = k̃², h = 1 for the query; w = 1, h = λ for the
    prompt), which is linear in s: TTT wins iff λ⋆ < ``lambda_star_threshold`` (T = 0 never wins).
    Prompt (k_tilde None): Σ (τ²λ + σ²)(g_T − g⋆)² < Σ (τ²λ + σ²) g⋆² (ICL: g ≡ 0), g⋆ = sλ/(1 + sλ).
    Gaps are σ²·c_j(T); their means use E[σ² | s_j] = β_j/(n/2 − 1) (inf for n ≤ 2) and their
    intervals are exact inverse-gamma mixture quantiles.  Cost O(|T|·grid·n).

    Args:
        post: from ``noise_posterior`` on the same (lam, r̃).
        lam: eigenvalues, shape (n,); k_tilde: Uᵀk_x, shape (n,), or None for the prompt analogue.
        rho: scaled step, 0 < ρ < 1/λ_max.  T_grid: step counts ≥ 0, shape (|T|,).
    Returns:
        VerdictCurve with arrays of shape (|T|,).
    """
    lam_arr = _check_post_lam(post, lam)
    rho = theory.check_rho(lam_arr, rho)
    T_arr = np.atleast_1d(np.asarray(T_grid, dtype=float))
    if T_arr.ndim != 1 or not np.all(np.isfinite(T_arr)) or np.any(T_arr < 0):
        raise ValueError("T_grid must be a 1-D array of finite step counts >= 0")
    kind, c_ttt, c_icl, beats, thr = _per_sigma2_gaps(post, lam_arr, k_tilde, rho, T_arr)
    w = post.weights
    prob = np.clip(beats @ w, 0.0, 1.0)
    nT = T_arr.size
    both = _mixture_summary(w, post.ig_shape, post.ig_scale, np.vstack([c_ttt, c_icl[None, :]]))
    gt = Interval(both.median[:nT], both.lo[:nT], both.hi[:nT], both.mean[:nT])
    gi = Interval(np.full(nT, both.median[nT]), np.full(nT, both.lo[nT]), np.full(nT, both.hi[nT]),
                  np.full(nT, both.mean[nT]))
    dec = decision_from_probability(prob)
    return VerdictCurve(kind=kind, T=T_arr, prob=prob, decision=dec if isinstance(dec, tuple) else (dec,),
                        gap_ttt=gt, gap_icl=gi, lambda_star_threshold=thr)


def verdict_probability(
    post: NoisePosterior, lam: ArrayLike, k_tilde: ArrayLike | None, rho: float, T: float
) -> VerdictProbability:
    """P(TTT beats ICL at step T | r) and the posterior of both gaps (DESIGN §4, §5.1).

    See ``verdict_probability_curve`` (this is its one-T case); k_tilde None gives the prompt-value
    analogue.  decision: "adapt" if P ≥ 0.9, "don't adapt" if P ≤ 0.1, else "undetermined on this
    prompt".
    """
    T_f = float(T)
    c = verdict_probability_curve(post, lam, k_tilde, rho, np.array([T_f]))

    def one(iv: Interval) -> Interval:
        return Interval(float(iv.median[0]), float(iv.lo[0]), float(iv.hi[0]), float(iv.mean[0]))

    return VerdictProbability(kind=c.kind, T=T_f, prob=float(c.prob[0]), decision=c.decision[0],
                              gap_ttt=one(c.gap_ttt), gap_icl=one(c.gap_icl),
                              lambda_star_threshold=float(c.lambda_star_threshold[0]))


# --------------------------------------------------------------------------------------------
# plug-in PAC-Bayes slack (§5)
# --------------------------------------------------------------------------------------------


def slack_interval(
    post: NoisePosterior,
    lam: ArrayLike,
    r_tilde: ArrayLike,
    rho: float,
    T_grid: ArrayLike | None = None,
    delta: float = 0.05,
    evidence_sigma2: float | None = None,
) -> SlackInterval:
    """Plug-in PAC-Bayes slack sqrt(v̄ (log|grid| + log(1/δ))/n), Σ̂⋆ = τ²K + σ²I (DESIGN §5, §5.1).

    v̄ = max_T (1/n) Σ_i [(τ²λ_i + σ²)(1 − ρλ_i)^T/σ_ev²]² (``theory.pac_bayes_slack``; Σ⋆ and Σ_T
    are both diagonal in K's eigenbasis).  With τ² = σ²s the slack is σ²·c(s), so over the
    posterior it is an inverse-gamma mixture: exact quantiles, mean via E[σ² | s].

    Args:
        post: posterior from the same (lam, r̃); lam, r_tilde: shape (n,).
        rho: scaled step; T_grid: the step grid of the evidence (None → {0,…,30}); delta ∈ (0, 1).
        evidence_sigma2: σ² of the evidence family Σ_T; default the fixed σ̂² = ‖r‖²/n.
    Returns:
        SlackInterval (at the posterior medians of τ², σ², and its posterior interval).
    """
    lam_arr = _check_post_lam(post, lam)
    _, r = _check_spectrum(lam_arr, r_tilde)
    T_arr = theory.DEFAULT_T_GRID if T_grid is None else np.asarray(T_grid, dtype=float)
    if evidence_sigma2 is None:
        evidence_sigma2 = float(np.mean(r**2))
        if not evidence_sigma2 > 0:
            raise ValueError("r = 0: the fixed-sigma evidence family needs ||r|| > 0 (or pass evidence_sigma2)")
    if not (np.isfinite(evidence_sigma2) and evidence_sigma2 > 0):
        raise ValueError(f"evidence_sigma2={evidence_sigma2!r} must be positive and finite")
    v_med, sl_med = theory.pac_bayes_slack(lam_arr, rho, T_arr, evidence_sigma2, post.tau2.median,
                                           post.sigma2.median, delta)
    w = post.weights
    c = np.zeros_like(w)
    for j in np.flatnonzero(w > _W_CUT):  # slack per unit σ⋆²: Σ⋆ = σ⋆²(s_j K + I)
        c[j] = theory.pac_bayes_slack(lam_arr, rho, T_arr, evidence_sigma2, float(post.s_grid[j]), 1.0, delta)[1]
    iv = _mixture_summary(w, post.ig_shape, post.ig_scale, c)
    return SlackInterval(at_median=float(sl_med), v_bar_at_median=float(v_med), posterior=iv,
                         evidence_sigma2=float(evidence_sigma2), delta=float(delta), grid_size=int(np.size(T_arr)))


# --------------------------------------------------------------------------------------------
# Bayes gap from evidence (§5)
# --------------------------------------------------------------------------------------------


def bayes_gap_bound(lam: ArrayLike, rho: float, T: ArrayLike, tau2: float, sigma2: float) -> BayesGapBound:
    """E‖f̂_T − f_Bayes‖² and the bound 4σ²·KL(N(0,Σ⋆) ‖ N(0,Σ_T)) (DESIGN §5, aligned GP benchmark).

    Σ⋆ = τ²K + σ²I, Σ_T = σ²(I − ρK)^{−T}; f̂_T = G_T r, f_Bayes = g⋆(K) r, r ~ N(0, Σ⋆).  In K's
    eigenbasis, with v⋆_i = τ²λ_i + σ², x_i = v⋆_i/(σ²(1 − ρλ_i)^{−T}):
        E‖f̂_T − f_Bayes‖² = Σ_i v⋆_i (g_T(λ_i) − g⋆(λ_i))²,   g⋆ = τ²λ/(τ²λ + σ²),
        KL = ½ Σ_i (x_i − 1 − log x_i).
    (Per mode g_T − g⋆ = (σ²/v⋆)(1 − x), and (σ²/v⋆)(1 − x)² ≤ 2(x − 1 − log x) because
    v⋆/σ² ≥ max(1, x): the bound holds mode by mode.)

    Args:
        lam: eigenvalues, shape (n,); rho: 0 < ρ < 1/λ_max; T: scalar or array ≥ 0;
        tau2 ≥ 0, sigma2 > 0.
    Returns:
        BayesGapBound (floats for scalar T, arrays of T's shape otherwise).
    """
    lam_arr, _ = _check_spectrum(lam)
    rho = theory.check_rho(lam_arr, rho)
    tau2, sigma2 = float(tau2), float(sigma2)
    if not (np.isfinite(tau2) and tau2 >= 0):
        raise ValueError(f"tau2={tau2!r} must be finite and >= 0")
    if not (np.isfinite(sigma2) and sigma2 > 0):
        raise ValueError(f"sigma2={sigma2!r} must be finite and > 0 (Sigma_T = sigma2 (I - rho K)^-T)")
    T_arr = np.asarray(T, dtype=float)
    v_star = tau2 * lam_arr + sigma2
    g_T = theory.gd_filter(lam_arr, rho, T_arr)  # T.shape + (n,)
    g_star = tau2 * lam_arr / v_star
    gap = np.sum(v_star * (g_T - g_star) ** 2, axis=-1)
    log_x = np.log(v_star / sigma2) + T_arr[..., None] * np.log1p(-rho * lam_arr)
    kl = 0.5 * np.sum(np.expm1(log_x) - log_x, axis=-1)
    bound = 4.0 * sigma2 * kl
    if T_arr.ndim == 0:
        return BayesGapBound(float(gap), float(bound), float(kl))
    return BayesGapBound(gap, bound, kl)


def _iv(iv: Interval) -> dict[str, Any]:
    def f(x: Any) -> Any:
        a = np.asarray(x, dtype=float)
        if a.ndim:
            return [float(v) if np.isfinite(v) else None for v in a]
        return float(a) if np.isfinite(a) else None
    return {"median": f(iv.median), "ci90": [f(iv.lo), f(iv.hi)], "mean": f(iv.mean)}


def posterior_dict(post: NoisePosterior) -> dict[str, Any]:
    """JSON-able summary of a λ⋆ posterior (medians, 90 % intervals, the flag, the prior, and the
    maximum-likelihood point fit labelled as such) — the `posterior` block of reports and exports."""
    ml = post.ml
    return {
        "lambda_star": _iv(post.lambda_star), "tau2": _iv(post.tau2), "sigma2": _iv(post.sigma2),
        "snr_per_mode": _iv(post.snr), "log10_lambda_star_sd": float(post.log10_lambda_star_sd),
        "weakly_identified": bool(post.weakly_identified), "at_grid_end": bool(post.at_grid_end),
        "flag": post.flag_text,
        "prior": {"log10_lambda_star_centre": float(post.prior_centre_log10), "sd_decades": float(post.prior_sd_decades),
                  "grid_points": int(post.lambda_star_grid.size),
                  "grid_log10": [float(post.log10_grid[0]), float(post.log10_grid[-1])],
                  "sigma2": "Jeffreys p(σ²) ∝ 1/σ²"},
        "maximum_likelihood": {"label": ml.label, "tau2": float(ml.tau2), "sigma2": float(ml.sigma2),
                               "lambda_star": float(ml.lambda_star) if math.isfinite(ml.lambda_star) else None},
    }
