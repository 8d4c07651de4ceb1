"""GP lab: the spectral theory of TTT checked on a Gaussian-process benchmark (DESIGN §3-§5).

UI only: read the settings, run ``ttt_core.gp_lab`` (cached: the simulation and every curve the page
shows), draw the figures built by ``ttt_core.figures.gp_lab``.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import streamlit as st

from pages.common import how_to_read, page_header
from pages.downloads import figure_downloads
from ttt_core import gp_lab, gp_sim
from ttt_core.figures import gp_lab as figs

page_header(
    "GP lab",
    "When the prompt residuals really come from a Gaussian process, how close is T-step TTT to the "
    "Bayes answer, and does the prompt evidence pick a good T?",
)

# ------------------------------------------------------------------------------ controls
c1, c2, c3, c4 = st.columns(4)
with c1:
    kernel = st.selectbox("Kernel", gp_sim.KERNELS, format_func=gp_sim.KERNEL_LABELS.get, key="gp_kernel")
    n = int(st.number_input("Prompt length n", min_value=8, max_value=256, value=48, step=8, key="gp_n"))
    if kernel == "powerlaw":
        alpha = st.slider("Power-law exponent α (λᵢ ∝ i^−α)", 0.5, 3.0, 1.5, 0.1, key="gp_alpha")
        lengthscale, dim = 0.2, 1
    else:
        lengthscale = st.slider("Length-scale ℓ", 0.02, 1.0, 0.2, 0.01, key="gp_lengthscale")
        dim = int(st.number_input("Input dimension d", min_value=1, max_value=10, value=1, key="gp_dim"))
        alpha = 1.5
with c2:
    tau2 = st.number_input("Signal τ²", min_value=1e-4, max_value=100.0, value=1.0, format="%.4g", key="gp_tau2")
    sigma2 = st.number_input("Noise σ²", min_value=1e-4, max_value=100.0, value=0.05, format="%.4g",
                             key="gp_sigma2")
    c = st.slider("Step scale c (ρ = c/λ_max)", 0.05, 0.95, 0.5, 0.05, key="gp_c")
with c3:
    T_max = st.slider("T grid max", 5, 100, 30, 1, key="gp_tmax")
    x_query = st.slider("Query location x", 0.0, 1.0, 0.5, 0.01, key="gp_xq")
    T_show = st.multiselect("T to draw in the filter plot", list(range(1, 201)), default=[1, 5, 30],
                            key="gp_T_show")
with c4:
    n_draws = int(st.number_input("Monte-Carlo draws", min_value=50, max_value=5000, value=300, step=50,
                                  key="gp_draws"))
    seed = int(st.number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, key="gp_seed"))
    delta = st.number_input("PAC-Bayes δ", min_value=0.001, max_value=0.5, value=0.05, format="%.3f",
                            key="gp_delta")
    shift_on = st.checkbox("Second noise level (distribution shift)", value=True, key="gp_shift")
    sigma2_b = st.number_input("Second noise σ₂²", min_value=1e-4, max_value=100.0, value=2.0, format="%.4g",
                               key="gp_sigma2_b", disabled=not shift_on)

settings = gp_lab.LabSettings(
    kernel=kernel, n=n, d=dim, lengthscale=float(lengthscale), alpha=float(alpha), tau2=float(tau2),
    sigma2=float(sigma2), c=float(c), T_max=int(T_max), x_query=float(x_query), n_draws=n_draws,
    seed=seed, delta=float(delta), sigma2_b=float(sigma2_b) if shift_on else None,
    projector_rank=8, floor_rank=min(8, n),
)


@st.cache_data(show_spinner="Simulating the GP benchmark…", max_entries=32)
def _run_lab(items: tuple) -> gp_lab.LabResult:
    """Cached: a pure function of the settings (data cache)."""
    return gp_lab.run_lab(gp_lab.LabSettings(**dict(items)))


@st.cache_data(show_spinner=False, max_entries=32)
def _filter_curves(items: tuple, T_values: tuple[float, ...]) -> gp_lab.FilterCurves:
    """Cached: the filter plot's curves, a pure function of the settings and the chosen T."""
    return gp_lab.lab_filter_curves(_run_lab(items), T_values)


items = tuple(sorted(asdict(settings).items()))
res = _run_lab(items)
prob, rho, T_grid = res.problem, res.rho, res.T_grid
lam_star = settings.sigma2 / settings.tau2
st.caption(
    f"ρ = c/λ_max = {rho:.4g} (λ_max = {prob.lam.max():.4g}); λ⋆ = σ²/τ² = {lam_star:.4g}; "
    f"T grid = {{0, …, {settings.T_max}}}; {settings.n_draws} draws per Monte-Carlo estimate."
)

# ------------------------------------------------------------------------------ spectrum & filters
left, right = st.columns(2)
with left:
    st.plotly_chart(fig := figs.spectrum_figure(prob.lam, prob.k_tilde, lam_star), key="gp_fig_spectrum")
    figure_downloads(fig, "gp_fig_spectrum", settings=asdict(settings))
    how_to_read(
        r"K = U\,\mathrm{diag}(\lambda_i)\,U^\top,\qquad \text{SNR}_i = \tau^2\lambda_i/\sigma^2",
        "Eigenvalues of the prompt kernel (blue) and how much of the query coupling k_x lies on each "
        "eigen-direction (orange bars). Modes above the dashed λ⋆ line carry more signal than noise.",
        "the query's orange mass sits on modes above λ⋆: TTT has signal to use where the query looks.",
        "the orange mass sits on modes far below λ⋆: updates there mostly fit noise.",
        section="§3",
    )
with right:
    T_vals = sorted(float(t) for t in T_show) or [1.0]
    fc = _filter_curves(items, tuple(T_vals))
    st.plotly_chart(
        fig := figs.filter_figure(fc.lam_grid, T_vals, fc.gd, fc.bayes,
                           [f"Bayes g⋆, σ² = {s2:g}" for s2 in fc.noise_levels], eigenvalues=prob.lam),
        key="gp_fig_filters",
    )
    figure_downloads(fig, "gp_fig_filters", settings=asdict(settings))
    how_to_read(
        r"g_T(\lambda) = 1-(1-\rho\lambda)^T \quad\text{vs}\quad g_\star(\lambda)=\frac{\lambda}{\lambda+\lambda_\star}",
        "How much of each eigen-direction of the residual T gradient steps keep (solid), against the Bayes "
        "shrinkage (dashed). Ticks at the bottom are the actual eigenvalues of K.",
        "one T whose curve lies close to the dashed curve where the eigenvalues are.",
        "small T under-fits large modes; large T over-fits small (noisy) modes.",
        section="§3",
    )

# ------------------------------------------------------------------------------ risks
rk = res.risks
left, right = st.columns(2)
with left:
    st.plotly_chart(
        fig := figs.risk_vs_T_figure(T_grid, rk.query_gap_closed, rk.query_gap_mc, rk.query_gap_se,
                              "Query Bayes gap vs steps", "E[(ĥ_T(x) − f_Bayes(x))²]", "query_gap"),
        key="gp_fig_query_gap",
    )
    figure_downloads(fig, "gp_fig_query_gap", settings=asdict(settings))
    verdict = res.icl
    helps = np.asarray(verdict.beats)
    st.caption(
        f"TTT beats ICL at the query for {int(helps.sum())} of {helps.size} T values "
        f"(ICL gap {verdict.gap_icl:.4g}; best T = {T_grid[int(np.argmin(verdict.gap_ttt))]:g})."
    )
    how_to_read(
        r"\sum_i (\tau^2\lambda_i+\sigma^2)(u_i^\top k_x)^2\,\big(q_T(\lambda_i)-\tfrac{1}{\lambda_i+\lambda_\star}\big)^2",
        "Closed form (line) against Monte Carlo with plain gradient descent on Φθ and a dense Bayes "
        "solve (circles ± 1 SE). T = 0 is ICL (no update).",
        "circles on the line (within a few SE) and a dip below the T = 0 value: TTT beats ICL there.",
        "circles systematically off the line (a bug), or a curve that only rises (TTT never helps).",
        section="§4",
    )
with right:
    st.plotly_chart(
        fig := figs.risk_vs_T_figure(T_grid, rk.prompt_risk_closed, rk.prompt_risk_mc, rk.prompt_risk_se,
                              "Prompt risk vs steps", "E‖f̂_T − f⋆‖²", "prompt_risk"),
        key="gp_fig_prompt_risk",
    )
    figure_downloads(fig, "gp_fig_prompt_risk", settings=asdict(settings))
    how_to_read(
        r"\sum_i \big[\tau^2\lambda_i(1-g_T(\lambda_i))^2+\sigma^2 g_T(\lambda_i)^2\big]",
        "Error of the adapted prompt values against the true f⋆: closed form (line) and Monte Carlo "
        "(circles ± 1 SE).",
        "a U-shape whose minimum marks the best number of steps; circles on the line.",
        "a monotone curve (T grid too short or too long) or circles off the line.",
        section="§4",
    )

st.plotly_chart(
    fig := figs.gain_heatmap_figure(T_grid, res.gain_sigma2, res.gain, sigma2_mark=settings.sigma2),
    key="gp_fig_gain",
)
figure_downloads(fig, "gp_fig_gain", settings=asdict(settings))
how_to_read(
    r"1-\frac{\sum_i a_i (q_T-q_\star)^2}{\sum_i a_i q_\star^2}\;>0 \iff \text{TTT beats ICL}",
    "Signed relative improvement of T-step TTT over ICL at the query, across noise levels from far below "
    "to ten times the top mode's signal τ²λ_max (rows; dashed line = the chosen σ²) and steps (columns).",
    "a blue band whose best T moves with σ²: the right horizon depends on the noise.",
    "red everywhere: at this query TTT only hurts (poor alignment or too much noise).",
    section="§4",
)

# ------------------------------------------------------------------------------ evidence
ev = res.evidence
left, right = st.columns(2)
with left:
    st.plotly_chart(fig := figs.evidence_figure(T_grid, ev.scores_fixed_first, ev.scores_profiled_first),
                    key="gp_fig_evidence")
    figure_downloads(fig, "gp_fig_evidence", settings=asdict(settings))
    how_to_read(
        r"\ell_T(r)=\tfrac{1}{2n}\big[n\log\sigma^2-T\sum_i\log(1-\rho\lambda_i)+\sigma^{-2}\sum_i(1-\rho\lambda_i)^T\tilde r_i^2\big]",
        "Normalised negative log-evidence of the first draw's residuals under Σ_T = σ²(I − ρK)^{−T}, "
        "with σ̂² = ‖r‖²/n (blue) and with σ² profiled out (green); stars mark T_MAP.",
        "a clear interior minimum.",
        "a minimum at the grid edge: extend the T grid or change c.",
        section="§5",
    )
with right:
    st.plotly_chart(fig := figs.tmap_histogram_figure(T_grid, ev.T_map_fixed, ev.T_map_mle, ev.oracle_T_prompt,
                                               ev.oracle_T_evidence),
                    key="gp_fig_tmap_hist")
    figure_downloads(fig, "gp_fig_tmap_hist", settings=asdict(settings))
    how_to_read(
        r"T_{\rm MAP}=\arg\min_{T\in\{0,\dots,T_{\max}\}}\ell_T(r)",
        "Where evidence selection lands over the draws, against the T that minimises the true prompt "
        "excess risk (red) and the T that minimises the population evidence 𝓛(T|K) (dashed).",
        "histograms concentrated near the red line.",
        "histograms far from the red line: the evidence optimises the fit of the residual covariance, "
        "which need not be the prompt risk (the paper's own caveat).",
        section="§5",
    )

left, right = st.columns(2)
with left:
    st.plotly_chart(fig := figs.pac_bayes_figure(ev.ell_at_map + ev.slack, ev.pop_at_map, ev.delta, ev.coverage,
                                          ell=ev.ell_at_map),
                    key="gp_fig_pac")
    figure_downloads(fig, "gp_fig_pac", settings=asdict(settings))
    st.markdown(
        f"**Empirical coverage {ev.coverage:.3f} ± {ev.coverage_se:.3f}** over {ev.covered.size} draws, "
        f"target 1 − δ = {1 - ev.delta:.3f}.  v̄ = {ev.v_bar:.4g} (attained at T = {ev.v_bar_T:g}), "
        f"slack = {ev.slack:.4g}; without the slack the inequality holds for "
        f"{np.mean(ev.pop_at_map <= ev.ell_at_map):.3f} of draws.  "
        "This is a real certificate only because Σ⋆ = τ²K + σ²I is known in the GP benchmark "
        "(on a real prompt it would be a plug-in estimate)."
    )
    how_to_read(
        r"\mathcal L(T_{\rm MAP}\mid K)\le \ell_{T_{\rm MAP}}(r)+\sqrt{\bar v\,(\log|\mathcal T|+\log(1/\delta))/n}",
        "Each point is one draw: realised population evidence risk of the selected T (y) against the "
        "certificate (x), with the known σ² in the evidence. Points below the diagonal are covered.",
        "coverage at or above 1 − δ, with the blue cloud close to the diagonal (a tight certificate).",
        "coverage below 1 − δ (the slack or the evidence formulas are wrong), or a blue cloud far to the "
        "right: v̄ is set by the worst T on the grid (often T = 0 at high SNR), so the bound is loose.",
        section="§5",
    )
with right:
    if res.shift is not None:
        sh = res.shift
        labels = [f"σ² = {s:g}" for s in sh.sigma2_levels]
        st.plotly_chart(fig := figs.shift_figure(T_grid, sh.excess, labels, sh.evidence_mc, sh.evidence_se,
                                          sh.T_map_mean, sh.T_minimax),
                        key="gp_fig_shift")
        figure_downloads(fig, "gp_fig_shift", settings=asdict(settings))
        st.caption(
            f"Best T per level: {sh.T_best[0]:g} and {sh.T_best[1]:g}; best single T = {sh.T_minimax:g} "
            f"(worst-case excess {sh.worst.min():.4g} vs per-level optima "
            f"{sh.excess[0].min():.4g}, {sh.excess[1].min():.4g}). Evidence ({sh.noise}) selects on average "
            f"T = {sh.T_map_mean[0]:.1f} and {sh.T_map_mean[1]:.1f}, with excess "
            f"{sh.evidence_mc[0]:.4g} ± {sh.evidence_se[0]:.2g} and {sh.evidence_mc[1]:.4g} ± {sh.evidence_se[1]:.2g}."
        )
        how_to_read(
            r"\min_T \max_j \sum_i(\tau^2\lambda_i+\sigma_j^2)\big(g_T(\lambda_i)-g^{(j)}_\star(\lambda_i)\big)^2 > \max_j \min_T (\cdot)",
            "Prompt excess risk over T for two noise levels (a change of λ⋆). Stars: Monte-Carlo risk of "
            "evidence-selected T, drawn at the mean selected T.",
            "the two minima sit at different T (no single T is good for both) and the stars move with the "
            "noise level.",
            "stars above the dotted worst-case curve's minimum: at this n the evidence's variance costs "
            "more than its adaptivity gains.",
            section="§4",
        )
    else:
        st.info("Tick “Second noise level” to see the distribution-shift panels.")

# ------------------------------------------------------------------------------ Bayes gap from evidence
bg = res.bayes_gap
left, right = st.columns([2, 1])
with left:
    st.plotly_chart(fig := figs.bayes_gap_figure(bg.T_grid, bg.bound, bg.expected, bg.mc_mean, bg.mc_se),
                    key="gp_fig_bayes_gap")
    figure_downloads(fig, "gp_fig_bayes_gap", settings=asdict(settings))
    how_to_read(
        r"\mathbb E\|\hat f_T-f_{\rm Bayes}\|^2=\sum_i(\tau^2\lambda_i+\sigma^2)\big(g_T(\lambda_i)-g_\star(\lambda_i)\big)^2"
        r"\;\le\;4\sigma^2\,\mathrm{KL}\big(\mathcal N(0,\Sigma_\star)\,\|\,\mathcal N(0,\Sigma_T)\big)",
        "How far the T-step prompt values f̂_T = G_T r are from the Bayes prompt values f_Bayes = g⋆(K) r, on "
        "the aligned GP benchmark (Σ⋆ = τ²K + σ²I, Σ_T = σ²(I − ρK)^{−T}, the known σ²). Blue: the closed-form "
        "expectation; orange: the Monte-Carlo mean over the same draws as the prompt-risk plot (bars ± 2 SE); "
        "dashed: the bound by the KL divergence between the true residual law and the evidence model of T steps. "
        "That KL is n·𝓛(T|K) minus a constant (𝓛 = the population evidence risk), so the T the evidence aims "
        "for, argmin 𝓛(T|K), is the T with the smallest bound on the distance to Bayes.",
        "orange circles on the blue line (within 2–3 SE), everything under the dashed curve, and the dashed "
        "curve's minimum near the blue curve's: aiming the evidence at Σ⋆ then also lands close to Bayes.",
        "circles off the line (a bug in the formula or the simulation), or a circle above the dashed curve "
        "(the bound would be false). A dashed curve far above the blue one is not a bug: where the signal-to-noise "
        "is high the bound is loose by a factor of about 2 or more.",
        section="§5",
    )
with right:
    z = np.abs(bg.mc_mean - bg.expected) / np.where(bg.mc_se > 0, bg.mc_se, np.inf)
    ratio = bg.bound / np.where(bg.expected > 0, bg.expected, np.nan)
    i_tight = int(np.nanargmin(ratio))
    st.markdown(
        f"**Monte Carlo against the closed form:** within 2 SE at {int(np.sum(z <= 2))} of {z.size} T values, "
        f"within 3 SE at {int(np.sum(z <= 3))} ({bg.n_draws} draws, the prompt-risk draws).  \n"
        f"**Bound:** Monte-Carlo mean below 4σ²·KL at {int(np.sum(bg.mc_mean <= bg.bound))} of {z.size} T values; "
        f"the bound is tightest at T = {bg.T_grid[i_tight]:g} (bound / expectation = {ratio[i_tight]:.3g}).  \n"
        f"The smallest expected gap is at T = {bg.T_grid[int(np.argmin(bg.expected))]:g}; the smallest bound at "
        f"T = {bg.T_grid[int(np.argmin(bg.bound))]:g}, which is argmin 𝓛(T|K) = {ev.oracle_T_evidence:g} "
        "(KL = n·𝓛(T|K) − const)."
    )

if res.projector is not None:
    pj = res.projector
    left, right = st.columns([2, 1])
    with left:
        st.plotly_chart(
            fig := figs.projector_figure(pj.a_grid, pj.risk, [f"σ² = {s:g}" for s in res.shift.sigma2_levels],
                                  pj.lower_bound, pj.a_T, T_grid),
            key="gp_fig_projector",
        )
        figure_downloads(fig, "gp_fig_projector", settings=asdict(settings))
        how_to_read(
            r"\max_j \mathbb E\|aKr-f^{(\lambda_j)}_{\rm Bayes}\|^2 \ge m\,\min_j(\tau_j^2+\sigma_j^2)\Big(\frac{|s_1-s_2|}{2}\Big)^2",
            f"K a rank-{pj.m} projector: every fixed shrinkage a (every fixed T, coloured points) pays at "
            "least the dashed bound under one of the two noise levels.",
            "the two parabolas' minima far apart: a clear price for committing to one T.",
            "parabolas nearly coincide: the shift is too small to matter.",
            section="§4",
        )
    with right:
        st.metric("Full fit Π_S r (T → ∞), risk", f"{pj.full_fit_mc:.3g} ± {pj.full_fit_se:.2g}",
                  help=f"closed form dσ² = {pj.full_fit_closed:.4g}")
        st.metric("Subspace James–Stein, risk", f"{pj.js_mc:.3g} ± {pj.js_se:.2g}",
                  help=f"closed form dσ² − (d − 2)σ⁴/(τ² + σ²) = {pj.js_closed:.4g}")
        st.metric(f"Out-of-range floor, rank-{pj.floor_rank} update subspace",
                  f"{pj.floor_mc:.3g} ± {pj.floor_se:.2g}", help=f"closed form τ²Σ_(i>k) λᵢ = {pj.floor_closed:.4g}")
        how_to_read(
            r"\Big(1-\frac{(d-2)\sigma^2}{\|\Pi_S r\|^2}\Big)\Pi_S r,\qquad \inf_T\|\hat f_T-f_\star\|^2\ge\|\Pi_{S^\perp}f_\star\|^2",
            "Running TTT to convergence (full fit) is beaten by James–Stein shrinkage when d ≥ 3; the part "
            "of f⋆ outside the update subspace is an error no T removes (σ² = first level).",
            "James–Stein clearly below the full fit; a small floor.",
            "a large floor: the update subspace misses the signal; more steps cannot help.",
            section="§4",
        )
