"""The GP lab: every experiment of the lab page as one pure function of its settings (DESIGN §3-§5).

``run_lab`` builds the problem with ``ttt_core.gp_sim``, runs the Monte-Carlo experiments
(risks, evidence, distribution shift, projector) and computes every closed-form curve the page
draws that depends only on the settings: the TTT-versus-ICL verdict over the T grid, the
signed-gain map over noise levels and the Bayes gap from evidence (closed form and bound from
``posterior_verdict.bayes_gap_bound`` against a Monte Carlo over the risk experiment's own draws).  The filter plot also depends on which T the reader picks;
``lab_filter_curves`` computes it from a ``LabResult``.  The page caches both and only draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from ttt_core import theory
from ttt_core.gp_sim import (
    Draws,
    EvidenceMC,
    FloatArray,
    GPProblem,
    ProjectorMC,
    RiskMC,
    ShiftMC,
    bayes_prompt,
    draw_benchmark,
    make_problem,
    mean_se,
    simulate_evidence,
    simulate_projector,
    simulate_risks,
    simulate_shift,
)
from ttt_core.posterior_verdict import bayes_gap_bound

# --------------------------------------------------------------------------------------------
# closed-form helpers for the lab's figures
# --------------------------------------------------------------------------------------------


def filter_curves(
    problem: GPProblem, rho: float, T_values: ArrayLike, lam_stars: ArrayLike, n_points: int = 200
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """g_T(λ) and g⋆(λ) on an even λ grid [0, λ_max] (DESIGN §3).

    Returns:
        (lam_grid (L,), g_T rows (len(T_values), L), g⋆ rows (len(lam_stars), L)).
    """
    lam_grid = np.linspace(0.0, float(problem.lam.max()), n_points)
    G = theory.gd_filter(lam_grid, rho, np.asarray(T_values, dtype=float))
    S = np.stack([theory.bayes_filter(lam_grid, ls) for ls in np.atleast_1d(lam_stars)])
    return lam_grid, G, S


def gain_sigma2_grid(problem: GPProblem, tau2: float, points: int = 31) -> FloatArray:
    """Noise levels for the TTT-vs-ICL map: σ² = τ²λ_max · 10^{[−4, 1]} (from far below to ten times
    the top mode's signal), log-spaced, shape (points,)."""
    return tau2 * float(problem.lam.max()) * np.logspace(-4.0, 1.0, points)


def icl_gain_grid(
    problem: GPProblem, tau2: float, sigma2_grid: ArrayLike, rho: float, T_grid: ArrayLike
) -> FloatArray:
    """Relative query gain of TTT over ICL, 1 − gap(T)/gap(ICL), shape (len σ², len T) (DESIGN §4).

    gap(T) = Σ a_i (q_T − q⋆)², gap(ICL) = Σ a_i q⋆² (``theory.ttt_beats_icl``).
    """
    q = theory.gd_query_filter(problem.lam, rho, np.asarray(T_grid, dtype=float))
    rows = []
    for s2 in np.asarray(sigma2_grid, dtype=float):
        v = theory.ttt_beats_icl(problem.lam, problem.k_tilde, tau2, s2, q)
        icl = v.gap_icl if v.gap_icl > 0 else np.inf
        rows.append(1.0 - np.asarray(v.gap_ttt) / icl)
    return np.stack(rows)


@dataclass(frozen=True)
class BayesGapMC:
    """Bayes gap from evidence on the T grid (DESIGN §5, aligned GP benchmark); arrays of shape (G,).

    E‖f̂_T − f_Bayes‖² ≤ 4σ²·KL(N(0,Σ⋆) ‖ N(0,Σ_T)), Σ⋆ = τ²K + σ²I, Σ_T = σ²(I − ρK)^{−T}.

    Attributes:
        T_grid: (G,).
        expected, bound, kl: closed-form E‖f̂_T − f_Bayes‖², 4σ²·KL and the KL itself
            (``posterior_verdict.bayes_gap_bound``).
        mc_mean, mc_se: Monte-Carlo mean of ‖G_T r − g⋆(K) r‖² over the draws and its standard
            error (ddof = 1).  n_draws: number of draws.
    """

    T_grid: FloatArray
    expected: FloatArray
    bound: FloatArray
    kl: FloatArray
    mc_mean: FloatArray
    mc_se: FloatArray
    n_draws: int


def bayes_gap_from_evidence(
    problem: GPProblem, tau2: float, sigma2: float, rho: float, T_grid: ArrayLike, draws: Draws
) -> BayesGapMC:
    """Closed form and evidence bound of E‖f̂_T − f_Bayes‖² against Monte Carlo over ``draws``.

    Per draw r: f̂_T = G_T r with G_T = U diag(g_T(λ)) Uᵀ = I − (I − ρK)^T, and f_Bayes = g⋆(K) r =
    τ²K(τ²K + σ²I)^{-1} r by a dense solve (``gp_sim.bayes_prompt``); the squared difference is
    taken in K's eigenbasis (U is orthogonal, so norms are unchanged).  One T at a time, so memory
    stays O(m·n) whatever the grid.
    """
    T_grid = np.asarray(T_grid, dtype=float)
    closed = bayes_gap_bound(problem.lam, rho, T_grid, tau2, sigma2)
    rt = draws.r @ problem.U                                     # (m, n): rows Uᵀ r
    bt = bayes_prompt(problem, draws.r, tau2, sigma2) @ problem.U  # (m, n): rows Uᵀ f_Bayes
    g = theory.gd_filter(problem.lam, rho, T_grid)               # (G, n)
    err = np.stack([np.sum((g_T * rt - bt) ** 2, axis=1) for g_T in g])  # (G, m)
    mc, se = mean_se(err)
    return BayesGapMC(T_grid=T_grid, expected=np.asarray(closed.expected_gap), bound=np.asarray(closed.bound),
                      kl=np.asarray(closed.kl), mc_mean=mc, mc_se=se, n_draws=int(draws.r.shape[0]))


# --------------------------------------------------------------------------------------------
# the whole lab
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabSettings:
    """All inputs of the GP lab (hashable: usable as a cache key)."""

    kernel: str = "rbf"
    n: int = 48
    d: int = 1
    lengthscale: float = 0.2
    alpha: float = 1.5
    tau2: float = 1.0
    sigma2: float = 0.1
    c: float = 0.5
    T_max: int = 30
    x_query: float = 0.5
    n_draws: int = 300
    seed: int = 0
    delta: float = 0.05
    sigma2_b: float | None = None
    projector_rank: int = 8
    floor_rank: int = 8


@dataclass(frozen=True)
class LabResult:
    """Everything the GP lab page draws except the reader-chosen filter rows (pure function of
    LabSettings).

    Attributes:
        settings, problem: the inputs and the prompt geometry they give.
        rho: ρ = c/λ_max.  T_grid: {0, …, T_max}, shape (G,).
        risks, evidence: Monte-Carlo experiments at σ²; shift, projector: at (σ², σ₂²), or None.
        noise_levels: σ² and, when set, σ₂² (the Bayes filters drawn in the filter plot).
        icl: TTT versus ICL at the query for every T on the grid, at σ² (``theory.ttt_beats_icl``).
        gain_sigma2: noise levels of the signed-gain map, shape (S,) (``gain_sigma2_grid``).
        gain: relative query gain of TTT over ICL, shape (S, G) (``icl_gain_grid``).
        bayes_gap: the Bayes gap from evidence, closed form and bound against Monte Carlo over the
            risk experiment's draws (``bayes_gap_from_evidence``).
    """

    settings: LabSettings
    problem: GPProblem
    rho: float
    T_grid: FloatArray
    risks: RiskMC
    evidence: EvidenceMC
    shift: ShiftMC | None
    projector: ProjectorMC | None
    noise_levels: tuple[float, ...]
    icl: theory.IclVerdict
    gain_sigma2: FloatArray
    gain: FloatArray
    bayes_gap: BayesGapMC


@dataclass(frozen=True)
class FilterCurves:
    """The filter plot's curves on an even λ grid [0, λ_max] (DESIGN §3).

    Attributes:
        lam_grid: shape (L,).  T_values: the T drawn, shape (k,).
        gd: g_T(λ) rows, shape (k, L).  bayes: g⋆(λ) rows, one per noise level, shape (len(levels), L).
        noise_levels: the σ² of the Bayes rows (``LabResult.noise_levels``).
    """

    lam_grid: FloatArray
    T_values: FloatArray
    gd: FloatArray
    bayes: FloatArray
    noise_levels: tuple[float, ...]


def problem_from_settings(s: LabSettings) -> GPProblem:
    """The GPProblem the lab uses for settings ``s`` (problem seed = s.seed)."""
    return make_problem(s.kernel, s.n, s.d, s.lengthscale, s.alpha, s.x_query, s.seed)


def run_lab(s: LabSettings) -> LabResult:
    """Run every GP-lab experiment for settings ``s`` (DESIGN §3-§5).

    ρ = c/λ_max, T grid {0, …, T_max}.  Monte-Carlo streams are independent children of
    SeedSequence(s.seed) (risks, evidence, shift, projector).  The Bayes gap from evidence reuses
    the risk experiment's draws: its stream is replayed from the same child seed.
    """
    problem = problem_from_settings(s)
    rho = theory.rho_from_c(problem.lam, s.c)
    T_grid = np.arange(int(s.T_max) + 1, dtype=float)
    seq_risk, *seq_rest = np.random.SeedSequence(s.seed).spawn(4)
    r_ev, r_shift, r_proj = (np.random.default_rng(q) for q in seq_rest)
    risks = simulate_risks(problem, s.tau2, s.sigma2, rho, T_grid, s.n_draws, np.random.default_rng(seq_risk))
    # simulate_risks draws the benchmark first from its generator: the same draws, replayed
    risk_draws = draw_benchmark(problem, s.tau2, s.sigma2, s.n_draws, np.random.default_rng(seq_risk))
    bayes_gap = bayes_gap_from_evidence(problem, s.tau2, s.sigma2, rho, T_grid, risk_draws)
    evidence = simulate_evidence(problem, s.tau2, s.sigma2, rho, T_grid, s.n_draws, r_ev, s.delta)
    shift = projector = None
    if s.sigma2_b is not None and s.sigma2_b != s.sigma2:
        levels = (s.sigma2, float(s.sigma2_b))
        shift = simulate_shift(problem, s.tau2, levels, rho, T_grid, s.n_draws, r_shift)
        projector = simulate_projector(
            problem, s.tau2, levels, s.c, T_grid, s.projector_rank, s.floor_rank, s.n_draws, r_proj
        )
    icl = theory.ttt_beats_icl(problem.lam, problem.k_tilde, s.tau2, s.sigma2,
                               theory.gd_query_filter(problem.lam, rho, T_grid))
    gain_sigma2 = gain_sigma2_grid(problem, s.tau2)
    return LabResult(settings=s, problem=problem, rho=rho, T_grid=T_grid, risks=risks,
                     evidence=evidence, shift=shift, projector=projector,
                     noise_levels=(s.sigma2,) + ((s.sigma2_b,) if s.sigma2_b is not None else ()),
                     icl=icl, gain_sigma2=gain_sigma2,
                     gain=icl_gain_grid(problem, s.tau2, gain_sigma2, rho, T_grid), bayes_gap=bayes_gap)


def lab_filter_curves(res: LabResult, T_values: ArrayLike) -> FilterCurves:
    """g_T for the chosen ``T_values`` and g⋆ for each of ``res.noise_levels`` (``filter_curves``)."""
    lam_stars = [s2 / res.settings.tau2 for s2 in res.noise_levels]
    lam_grid, G, S = filter_curves(res.problem, res.rho, T_values, lam_stars)
    return FilterCurves(lam_grid=lam_grid, T_values=np.asarray(T_values, dtype=float), gd=G, bayes=S,
                        noise_levels=res.noise_levels)
