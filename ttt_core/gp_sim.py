"""Gaussian-process benchmark simulator for the spectral theory of TTT (DESIGN.md §3-§5).

A *problem* fixes n prompt inputs and a query, a feature map Φ (n × p) with K = ΦΦᵀ and a query
feature φ(x) with k_x = Φφ(x), κ_x = ‖φ(x)‖².  Draws come from the aligned GP benchmark
(DESIGN §3): θ⋆ ~ N(0, τ²I_p), f⋆ = Φθ⋆, f_x = φ(x)ᵀθ⋆, r = f⋆ + ε, ε ~ N(0, σ²I_n), which has
exactly the covariance τ²[[K, k_x], [k_xᵀ, κ_x]] for (f⋆, f_x).

TTT is run here as *plain gradient descent* on θ ↦ Φθ with loss ‖r − Φθ‖²/(2σ²) and step η = ρσ²,
never through the filter formulas of ``ttt_core.theory``, so that the filter identities can be
checked against an independent computation.  Bayes predictions use dense linear solves.

All randomness comes from seeded ``numpy.random.Generator`` objects.

The GP lab (its settings, its one-call run and its figure curves) lives in ``ttt_core.gp_lab``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ttt_core import theory

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

KERNELS: tuple[str, ...] = ("rbf", "matern52", "powerlaw")
KERNEL_LABELS: dict[str, str] = {"rbf": "RBF", "matern52": "Matérn-5/2", "powerlaw": "Power law"}


# --------------------------------------------------------------------------------------------
# problems
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPProblem:
    """One fixed prompt geometry (DESIGN §2).

    Attributes:
        kernel: "rbf", "matern52" or "powerlaw".
        X: prompt inputs, shape (n, d) (unused by the power-law kernel: shape (n, 0)).
        x_query: query input, shape (d,).
        Phi: features, shape (n, p); K = Phi Phiᵀ.
        phi_x: query feature, shape (p,).
        K: prompt kernel, shape (n, n).
        k_x: query coupling Φφ(x), shape (n,).
        kappa_x: ‖φ(x)‖².
        lam: eigenvalues of K, descending, shape (n,).
        U: eigenvectors (columns), shape (n, n).
        k_tilde: Uᵀk_x, shape (n,).
    """

    kernel: str
    X: FloatArray
    x_query: FloatArray
    Phi: FloatArray
    phi_x: FloatArray
    K: FloatArray
    k_x: FloatArray
    kappa_x: float
    lam: FloatArray
    U: FloatArray
    k_tilde: FloatArray

    @property
    def n(self) -> int:
        """Number of prompt positions."""
        return int(self.K.shape[0])


def rbf_kernel(A: ArrayLike, B: ArrayLike, lengthscale: float) -> FloatArray:
    """k(a, b) = exp(−‖a − b‖²/(2ℓ²)); A (n, d), B (m, d) → (n, m)."""
    A, B = np.atleast_2d(A), np.atleast_2d(B)
    d2 = np.maximum(np.sum(A**2, 1)[:, None] + np.sum(B**2, 1)[None, :] - 2.0 * A @ B.T, 0.0)
    return np.exp(-0.5 * d2 / lengthscale**2)


def matern52_kernel(A: ArrayLike, B: ArrayLike, lengthscale: float) -> FloatArray:
    """Matérn-5/2: k = (1 + √5 d/ℓ + 5d²/(3ℓ²)) exp(−√5 d/ℓ); A (n, d), B (m, d) → (n, m)."""
    A, B = np.atleast_2d(A), np.atleast_2d(B)
    d2 = np.maximum(np.sum(A**2, 1)[:, None] + np.sum(B**2, 1)[None, :] - 2.0 * A @ B.T, 0.0)
    z = np.sqrt(5.0 * d2) / lengthscale
    return (1.0 + z + z**2 / 3.0) * np.exp(-z)


def random_orthogonal(n: int, rng: np.random.Generator) -> FloatArray:
    """Haar-random orthogonal n × n matrix (QR of a Gaussian matrix with the sign fix)."""
    Q, R = np.linalg.qr(rng.standard_normal((n, n)))
    return Q * np.sign(np.where(np.diag(R) == 0, 1.0, np.diag(R)))


def _factor_psd(G: FloatArray) -> FloatArray:
    """F with G ≈ F Fᵀ from the clipped eigendecomposition (negatives from round-off set to 0)."""
    w, V = np.linalg.eigh(0.5 * (G + G.T))
    return V * np.sqrt(np.maximum(w, 0.0))


def make_problem(
    kernel: str = "rbf",
    n: int = 48,
    d: int = 1,
    lengthscale: float = 0.2,
    alpha: float = 1.5,
    x_query: float = 0.5,
    seed: int = 0,
) -> GPProblem:
    """Build a prompt geometry (DESIGN §2-§3).

    * "rbf" / "matern52": inputs X ~ U[0, 1]^d (sorted when d = 1), query (x_q, …, x_q); the joint
      Gram matrix of (X, x) (unit diagonal) is factorised as F Fᵀ (clipped eigendecomposition),
      Φ = F[:n], φ(x) = F[n] (p = n + 1), so K = ΦΦᵀ, k_x = Φφ(x), κ_x = ‖φ(x)‖² hold exactly.
    * "powerlaw": K = V diag(λ) Vᵀ with λ_i ∝ i^{−α} (mean eigenvalue 1) and Haar-random V;
      Φ = V diag(√λ) (p = n); the query behaves like a fresh input, φ(x) = diag(√λ) w with w a
      random unit vector drawn from a generator seeded by (seed, x_query) — for this kernel the
      query location only reseeds the query direction.

    Args:
        kernel: one of KERNELS.  n: prompt length.  d: input dimension (RBF/Matérn).
        lengthscale: ℓ for RBF/Matérn.  alpha: power-law exponent.  x_query: query location in [0, 1].
        seed: seed of the input / eigenvector generator.
    Returns:
        GPProblem.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
    if n < 2:
        raise ValueError("n must be at least 2")
    rng = np.random.default_rng(seed)
    if kernel == "powerlaw":
        V = random_orthogonal(n, rng)
        lam0 = np.arange(1, n + 1, dtype=float) ** (-float(alpha))
        lam0 *= n / lam0.sum()
        Phi = V * np.sqrt(lam0)
        qrng = np.random.default_rng([int(seed), int(round(float(x_query) * 1e6))])
        w = qrng.standard_normal(n)
        phi_x = np.sqrt(lam0) * (w / np.linalg.norm(w))
        X = np.zeros((n, 0))
        xq = np.zeros(0)
    else:
        X = rng.uniform(0.0, 1.0, size=(n, d))
        if d == 1:
            X = np.sort(X, axis=0)
        xq = np.full(d, float(x_query))
        pts = np.vstack([X, xq[None, :]])
        kfun = rbf_kernel if kernel == "rbf" else matern52_kernel
        F = _factor_psd(kfun(pts, pts, lengthscale))
        Phi, phi_x = F[:n], F[n]
    K = Phi @ Phi.T
    K = 0.5 * (K + K.T)
    k_x = Phi @ phi_x
    lam, U = theory.eigh_psd(K)
    return GPProblem(
        kernel=kernel, X=X, x_query=xq, Phi=Phi, phi_x=phi_x, K=K, k_x=k_x,
        kappa_x=float(phi_x @ phi_x), lam=lam, U=U, k_tilde=U.T @ k_x,
    )


# --------------------------------------------------------------------------------------------
# draws, gradient descent, Bayes predictions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Draws:
    """Draws from the aligned benchmark: theta (m, p), f_star (m, n), f_x (m,), r (m, n)."""

    theta: FloatArray
    f_star: FloatArray
    f_x: FloatArray
    r: FloatArray


def draw_benchmark(
    problem: GPProblem, tau2: float, sigma2: float, n_draws: int, rng: np.random.Generator
) -> Draws:
    """θ⋆ ~ N(0, τ²I), f⋆ = Φθ⋆, f_x = φ(x)ᵀθ⋆, r = f⋆ + ε, ε ~ N(0, σ²I) (DESIGN §3).

    Returns:
        Draws with m = n_draws rows.
    """
    p = problem.Phi.shape[1]
    theta = np.sqrt(tau2) * rng.standard_normal((n_draws, p))
    f_star = theta @ problem.Phi.T
    f_x = theta @ problem.phi_x
    r = f_star + np.sqrt(sigma2) * rng.standard_normal((n_draws, problem.n))
    return Draws(theta=theta, f_star=f_star, f_x=f_x, r=r)


def gradient_descent(
    Phi: ArrayLike, r: ArrayLike, rho: float, sigma2: float, steps: ArrayLike
) -> FloatArray:
    """Plain gradient descent on L(θ) = ‖r − Φθ‖²/(2σ²) from θ0 = 0 with step η = ρσ² (DESIGN §2).

    θ_{t+1} = θ_t − η ∇L(θ_t),  ∇L(θ) = −Φᵀ(r − Φθ)/σ².

    Args:
        Phi: (n, p).  r: (n,) or (m, n).  steps: non-negative integer step counts to record.
    Returns:
        θ_T for each requested T: shape (len(steps), p) or (len(steps), m, p).
    """
    Phi = np.asarray(Phi, dtype=float)
    r = np.asarray(r, dtype=float)
    steps = np.asarray(steps)
    if np.any(steps < 0) or np.any(steps != np.round(steps)):
        raise ValueError("steps must be non-negative integers")
    steps = steps.astype(int)
    single = r.ndim == 1
    R = r[None, :] if single else r
    eta = rho * sigma2
    theta = np.zeros((R.shape[0], Phi.shape[1]))
    out = np.empty((steps.size, R.shape[0], Phi.shape[1]))
    t_max = int(steps.max()) if steps.size else 0
    for t in range(t_max + 1):
        hit = steps == t
        if np.any(hit):
            out[hit] = theta
        if t == t_max:
            break
        grad = -((R - theta @ Phi.T) @ Phi) / sigma2
        theta = theta - eta * grad
    return out[:, 0, :] if single else out


def bayes_query(problem: GPProblem, r: ArrayLike, tau2: float, sigma2: float) -> FloatArray:
    """f_Bayes(x) = τ² k_xᵀ(τ²K + σ²I)^{-1} r (= k_xᵀ(K + λ⋆I)^{-1}r) by a dense solve (DESIGN §3).

    Args: r (n,) or (m, n).  Returns: scalar array or shape (m,).
    """
    A = tau2 * problem.K + sigma2 * np.eye(problem.n)
    sol = np.linalg.solve(A, np.asarray(r, dtype=float).T)
    return tau2 * (problem.k_x @ sol)


def bayes_prompt(problem: GPProblem, r: ArrayLike, tau2: float, sigma2: float) -> FloatArray:
    """Bayes prompt values τ²K(τ²K + σ²I)^{-1} r by a dense solve (DESIGN §3).  Shape of r."""
    A = tau2 * problem.K + sigma2 * np.eye(problem.n)
    sol = np.linalg.solve(A, np.asarray(r, dtype=float).T)
    return (tau2 * problem.K @ sol).T


def mean_se(x: ArrayLike, axis: int = -1) -> tuple[FloatArray, FloatArray]:
    """Monte-Carlo mean and standard error (sample std / √m, ddof = 1) along ``axis``."""
    x = np.asarray(x, dtype=float)
    m = x.shape[axis]
    return x.mean(axis=axis), x.std(axis=axis, ddof=1) / np.sqrt(m)


# --------------------------------------------------------------------------------------------
# Monte-Carlo experiments
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RiskMC:
    """Closed form versus Monte Carlo for T on a grid (DESIGN §4); arrays of shape (G,)."""

    T_grid: FloatArray
    query_gap_closed: FloatArray
    query_gap_mc: FloatArray
    query_gap_se: FloatArray
    prompt_risk_closed: FloatArray
    prompt_risk_mc: FloatArray
    prompt_risk_se: FloatArray
    prompt_excess_closed: FloatArray
    prompt_excess_mc: FloatArray
    prompt_excess_se: FloatArray


def simulate_risks(
    problem: GPProblem, tau2: float, sigma2: float, rho: float, T_grid: ArrayLike, n_draws: int,
    rng: np.random.Generator,
) -> RiskMC:
    """Query Bayes gap, prompt risk and prompt excess risk of T-step GD: closed form (theory)
    against Monte Carlo over benchmark draws with plain GD and dense Bayes solves (DESIGN §4).

    MC quantities per draw: (φ(x)ᵀθ_T − f_Bayes(x))², ‖Φθ_T − f⋆‖², ‖Φθ_T − f̂_Bayes‖².
    """
    T_grid = np.asarray(T_grid, dtype=float)
    dr = draw_benchmark(problem, tau2, sigma2, n_draws, rng)
    thetas = gradient_descent(problem.Phi, dr.r, rho, sigma2, T_grid)  # (G, m, p)
    h = thetas @ problem.phi_x  # (G, m)
    f_hat = thetas @ problem.Phi.T  # (G, m, n)
    fb_x = bayes_query(problem, dr.r, tau2, sigma2)  # (m,)
    fb = bayes_prompt(problem, dr.r, tau2, sigma2)  # (m, n)
    qg_mc, qg_se = mean_se((h - fb_x) ** 2)
    pr_mc, pr_se = mean_se(np.sum((f_hat - dr.f_star) ** 2, axis=-1))
    ex_mc, ex_se = mean_se(np.sum((f_hat - fb) ** 2, axis=-1))
    lam = problem.lam
    q = theory.gd_query_filter(lam, rho, T_grid)
    g = theory.gd_filter(lam, rho, T_grid)
    return RiskMC(
        T_grid=T_grid,
        query_gap_closed=np.asarray(theory.query_bayes_gap(lam, problem.k_tilde, tau2, sigma2, q)),
        query_gap_mc=qg_mc, query_gap_se=qg_se,
        prompt_risk_closed=np.asarray(theory.prompt_risk(lam, tau2, sigma2, g)),
        prompt_risk_mc=pr_mc, prompt_risk_se=pr_se,
        prompt_excess_closed=np.asarray(theory.prompt_excess_risk(lam, tau2, sigma2, g)),
        prompt_excess_mc=ex_mc, prompt_excess_se=ex_se,
    )


@dataclass(frozen=True)
class EvidenceMC:
    """Evidence-based step selection over draws (DESIGN §5).

    Attributes:
        T_grid: (G,).
        r_first: residuals of the first draw, shape (n,).
        scores_fixed_first, scores_profiled_first: ℓ_T curves of the first draw (fixed σ̂² and
            σ² profiled, both on the ℓ scale), shape (G,).
        T_map_fixed, T_map_mle, T_map_known: selected T per draw (m,) for noise "fixed", "mle"
            and the known σ².
        oracle_T_prompt: argmin_T of the closed-form prompt excess risk.
        oracle_T_evidence: argmin_T of 𝓛(T|K) (known σ²).
        population: 𝓛(T|K) over the grid (G,).
        ell_at_map, pop_at_map: ℓ_{T_MAP}(r) and 𝓛(T_MAP|K) per draw, known σ² (m,).
        v_bar, slack, delta: PAC-Bayes constants; v_bar_T: the grid T attaining v̄;
        covered: 𝓛 ≤ ℓ + slack per draw (m,).
        coverage, coverage_se: empirical frequency and its binomial standard error.
    """

    T_grid: FloatArray
    r_first: FloatArray
    scores_fixed_first: FloatArray
    scores_profiled_first: FloatArray
    T_map_fixed: FloatArray
    T_map_mle: FloatArray
    T_map_known: FloatArray
    oracle_T_prompt: float
    oracle_T_evidence: float
    population: FloatArray
    ell_at_map: FloatArray
    pop_at_map: FloatArray
    v_bar: float
    v_bar_T: float
    slack: float
    delta: float
    covered: NDArray[np.bool_]
    coverage: float
    coverage_se: float


def simulate_evidence(
    problem: GPProblem,
    tau2: float,
    sigma2: float,
    rho: float,
    T_grid: ArrayLike,
    n_draws: int,
    rng: np.random.Generator,
    delta: float = 0.05,
) -> EvidenceMC:
    """Evidence scores, T_MAP over draws and PAC-Bayes coverage (DESIGN §5, Thm. 7.2).

    The certificate uses the evidence family with the known benchmark σ² (Σ_T = σ²(I − ρK)^{−T}),
    Σ⋆ = τ²K + σ²I; coverage = frequency of 𝓛(T_MAP|K) ≤ ℓ_{T_MAP}(r) + slack.
    """
    T_grid = np.asarray(T_grid, dtype=float)
    lam = problem.lam
    dr = draw_benchmark(problem, tau2, sigma2, n_draws, rng)
    rt = dr.r @ problem.U  # (m, n) = (Uᵀ r)ᵀ
    s_known = theory.evidence_scores(lam, rt, rho, T_grid, sigma2)
    s_fixed = theory.evidence_scores(lam, rt, rho, T_grid, "fixed")
    s_prof = theory.profiled_scores(lam, rt, rho, T_grid)
    idx = np.argmin(s_known, axis=1)
    pop = theory.population_evidence_risk(lam, rho, T_grid, sigma2, tau2, sigma2)
    v_bar, slack = theory.pac_bayes_slack(lam, rho, T_grid, sigma2, tau2, sigma2, delta)
    ell_map = s_known[np.arange(n_draws), idx]
    pop_map = pop[idx]
    covered = pop_map <= ell_map + slack
    cov = float(covered.mean())
    g = theory.gd_filter(lam, rho, T_grid)
    excess = np.asarray(theory.prompt_excess_risk(lam, tau2, sigma2, g))
    return EvidenceMC(
        T_grid=T_grid,
        r_first=dr.r[0].copy(),
        scores_fixed_first=s_fixed[0],
        scores_profiled_first=s_prof[0],
        T_map_fixed=T_grid[np.argmin(s_fixed, axis=1)],
        T_map_mle=T_grid[np.argmin(s_prof, axis=1)],
        T_map_known=T_grid[idx],
        oracle_T_prompt=float(T_grid[np.argmin(excess)]),
        oracle_T_evidence=float(T_grid[np.argmin(pop)]),
        population=pop,
        ell_at_map=ell_map,
        pop_at_map=pop_map,
        v_bar=v_bar,
        v_bar_T=float(T_grid[np.argmax(theory.pac_bayes_variance(lam, rho, T_grid, sigma2, tau2, sigma2))]),
        slack=slack,
        delta=float(delta),
        covered=covered,
        coverage=cov,
        coverage_se=float(np.sqrt(max(cov * (1 - cov), 0.0) / n_draws)),
    )


@dataclass(frozen=True)
class ShiftMC:
    """Two noise levels (a change of λ⋆ = σ²/τ²), DESIGN §4.

    Attributes:
        T_grid: (G,).  sigma2_levels: (2,).
        excess: closed-form prompt excess risk per level, shape (2, G).
        worst: max over the two levels, (G,); T_minimax: argmin of ``worst``.
        T_best: per-level argmin_T, (2,).
        evidence_mc, evidence_se: MC prompt excess risk of evidence-selected T per level, (2,).
        T_map_mean: mean selected T per level, (2,).
        noise: evidence variant used ("mle" by default: σ² unknown).
    """

    T_grid: FloatArray
    sigma2_levels: FloatArray
    excess: FloatArray
    worst: FloatArray
    T_minimax: float
    T_best: FloatArray
    evidence_mc: FloatArray
    evidence_se: FloatArray
    T_map_mean: FloatArray
    noise: str


def simulate_shift(
    problem: GPProblem,
    tau2: float,
    sigma2_levels: tuple[float, float],
    rho: float,
    T_grid: ArrayLike,
    n_draws: int,
    rng: np.random.Generator,
    noise: str = "mle",
) -> ShiftMC:
    """No fixed T is good for two noise levels; evidence-selected T adapts (DESIGN §4, §5).

    For each σ_j²: closed-form excess Σ(τ²λ + σ_j²)(g_T − g⋆_j)² over the grid, and the Monte-Carlo
    excess ‖(g_{T_MAP}(K) − g⋆_j(K)) r‖² of the evidence-selected T_MAP (computed in K's eigenbasis).
    ``noise``: evidence variant, "mle" (σ² unknown, default), "fixed", or "known" (the level's σ_j²).
    """
    T_grid = np.asarray(T_grid, dtype=float)
    lam = problem.lam
    g = theory.gd_filter(lam, rho, T_grid)  # (G, n)
    levels = np.asarray(sigma2_levels, dtype=float)
    excess = np.stack([np.asarray(theory.prompt_excess_risk(lam, tau2, s2, g)) for s2 in levels])
    worst = excess.max(axis=0)
    ev_mean, ev_se, t_mean = np.empty(2), np.empty(2), np.empty(2)
    for j, s2 in enumerate(levels):
        dr = draw_benchmark(problem, tau2, s2, n_draws, rng)
        rt = dr.r @ problem.U
        scores = theory.evidence_scores(lam, rt, rho, T_grid, noise if noise != "known" else s2)
        idx = np.argmin(scores, axis=1)
        g_star = tau2 * lam / (tau2 * lam + s2)
        err = np.sum(((g[idx] - g_star) * rt) ** 2, axis=1)
        ev_mean[j], ev_se[j] = mean_se(err)
        t_mean[j] = T_grid[idx].mean()
    return ShiftMC(
        T_grid=T_grid, sigma2_levels=levels, excess=excess, worst=worst,
        T_minimax=float(T_grid[np.argmin(worst)]), T_best=T_grid[np.argmin(excess, axis=1)],
        evidence_mc=ev_mean, evidence_se=ev_se, T_map_mean=t_mean, noise=noise,
    )


@dataclass(frozen=True)
class ProjectorMC:
    """Prop. 6.1-6.3 pictures (DESIGN §4).

    Attributes:
        a_grid: shrinkage factors (A,); risk: exact risk per level (2, A); lower_bound: float;
        a_T: fixed-T factors g_T(1) on the grid with ρ = c (G,); m: projector rank.
        full_fit_closed, js_closed: closed-form risks of Π_S r and James–Stein (d = m).
        full_fit_mc, full_fit_se, js_mc, js_se: Monte-Carlo versions.
        floor_rank: rank k of a truncated update subspace; floor_closed = τ² Σ_{i>k} λ_i;
        floor_mc, floor_se: MC of ‖Π_{S⊥}f⋆‖² on the lab's problem.
    """

    a_grid: FloatArray
    risk: FloatArray
    lower_bound: float
    a_T: FloatArray
    m: int
    full_fit_closed: float
    js_closed: float
    full_fit_mc: float
    full_fit_se: float
    js_mc: float
    js_se: float
    floor_rank: int
    floor_closed: float
    floor_mc: float
    floor_se: float


def simulate_projector(
    problem: GPProblem,
    tau2: float,
    sigma2_levels: tuple[float, float],
    c: float,
    T_grid: ArrayLike,
    m: int,
    floor_rank: int,
    n_draws: int,
    rng: np.random.Generator,
) -> ProjectorMC:
    """Limits of fixed T on a rank-m projector (Prop. 6.1), full fit vs subspace James–Stein
    (Prop. 6.2, level σ_1²) and the out-of-range floor of a rank-k update subspace (Prop. 6.3)."""
    levels = np.asarray(sigma2_levels, dtype=float)
    lam_j = levels / tau2
    a_grid = np.linspace(0.0, 1.0, 201)
    risk = theory.fixed_estimator_shift_risk(a_grid, lam_j, levels, m)
    lb = theory.no_fixed_T_lower_bound(lam_j[0], lam_j[1], levels, m)
    a_T = theory.gd_filter(np.array([1.0]), c, np.asarray(T_grid, dtype=float))[:, 0]
    s2 = float(levels[0])
    d = max(m, 3)
    ff, js = theory.james_stein_risk_projector(d, tau2, s2)
    f = np.sqrt(tau2) * rng.standard_normal((n_draws, d))
    r = f + np.sqrt(s2) * rng.standard_normal((n_draws, d))
    js_est = theory.subspace_james_stein(r, np.eye(d), s2)
    ff_mc, ff_se = mean_se(np.sum((r - f) ** 2, axis=1))
    js_mc, js_se = mean_se(np.sum((js_est - f) ** 2, axis=1))
    k = int(np.clip(floor_rank, 0, problem.n))
    dr = draw_benchmark(problem, tau2, s2, n_draws, rng)
    fl = theory.out_of_range_floor(dr.f_star, problem.U[:, :k])
    fl_mc, fl_se = mean_se(np.atleast_1d(fl))
    return ProjectorMC(
        a_grid=a_grid, risk=risk, lower_bound=lb, a_T=a_T, m=d,
        full_fit_closed=ff, js_closed=js, full_fit_mc=float(ff_mc), full_fit_se=float(ff_se),
        js_mc=float(js_mc), js_se=float(js_se), floor_rank=k,
        floor_closed=float(tau2 * problem.lam[k:].sum()), floor_mc=float(fl_mc), floor_se=float(fl_se),
    )
