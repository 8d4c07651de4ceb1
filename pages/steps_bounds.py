"""Steps & bounds page: measured TTT error against step count beside the kernel's linearised
prediction, the prompt evidence ℓ_T, the plug-in PAC-Bayes bound and the Gibbs posterior over T
(DESIGN §3, §5). UI only; computation in ttt_core.steps, figures in ttt_core.figures.steps."""

from __future__ import annotations

from dataclasses import asdict

import streamlit as st

from pages.common import (get_model, get_prompt, how_to_read, interval_text, page_header, posterior_flag, verdict_box,
                          verdict_scope)
from pages.downloads import diagnosis_section, figure_downloads, steps_runs_section
from pages.state import cached_calibration_advice, cached_prompt_kernel, cached_result
from ttt_core.experiments.calibration_advice import CALIBRATED
from ttt_core.figures import steps as figs
from ttt_core.prompt_kernel import PAGE_SUBSPACES
from ttt_core.prompts import LongContextPrompt
from ttt_core.steps import DEFAULT_C, PLUG_IN_LABEL, StepsSettings, compute_steps

BETAS = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]

page_header("Steps & bounds",
            "How far should TTT adapt on this prompt: what does the error do step by step, where does the "
            "prompt evidence put T, and what does the (plug-in) PAC-Bayes bound say?")

lm = get_model()
prompt = get_prompt(lm) if lm is not None else None
if lm is None or prompt is None:
    st.stop()

long = isinstance(prompt, LongContextPrompt)
c1, c2, c3, c4 = st.columns(4)
subspace = c1.selectbox("Update subspace", list(PAGE_SUBSPACES), format_func=lambda k: PAGE_SUBSPACES[k], key="steps_subspace", bind="query-params",
                        help="The measured run updates W_V or W_Q heads (few-shot, paper-mode GD) or W_Q heads "
                             "(long context, qTTT); other subspaces show the kernel's curves only.")
c = c2.slider("Step fraction c (ρ = c/λ_max)", min_value=0.02, max_value=0.9, value=DEFAULT_C, step=0.01, key="steps_c", bind="query-params",
              help="The engine's step is set to the theory's ρ = c/λ_max of the same kernel.")
grid_max = c3.number_input("Grid max T", min_value=2, max_value=100, value=30, step=1, key="steps_grid", bind="query-params")
n_layers = lm.adapter.n_layers
last = c4.number_input("Update the last … layers", min_value=1, max_value=n_layers, value=min(4, n_layers), step=1,
                       key="steps_layers", bind="query-params", help="Blocks = every head of the subspace in these layers.")
c5, c6, c7 = st.columns([2, 2, 1])
delta = c5.slider("δ (bound holds with probability ≥ 1 − δ)", min_value=0.01, max_value=0.5, value=0.05, step=0.01,
                  key="steps_delta", bind="query-params")
beta = c6.select_slider("β (Gibbs posterior inverse temperature)", options=BETAS, value=1.0, key="steps_beta", bind="query-params")
measure = c7.checkbox("Run real TTT", value=True, key="steps_measure", bind="query-params",
                      help="Run the engine once over the whole grid (one trajectory records every step).")

settings = StepsSettings(subspace=subspace, c=float(c), grid_max=int(grid_max), delta=float(delta), beta=float(beta),
                         last_layers=int(last), measure=bool(measure))
bar = st.progress(0.0, text="Computing prompt evidence…")


def _progress(frac: float, text: str) -> None:
    bar.progress(min(max(float(frac), 0.0), 1.0), text=text)


try:
    ev = cached_prompt_kernel(st.session_state, lm, prompt, subspace, progress=lambda f, t: _progress(0.3 * f, t))
    base = cached_result(st.session_state, lm, prompt, subspace, "steps", settings.heavy_key(),
                         lambda: compute_steps(lm, prompt, settings, ev=ev, progress=_progress))
    rep = base.with_bounds(float(delta), float(beta))
except Exception as exc:  # the app stays up whatever fails
    bar.empty()
    st.error(f"Steps & bounds could not be computed: {exc}")
    st.stop()
bar.empty()
settings_dict = asdict(settings)

tc, b, m = rep.theory, rep.bounds, rep.measured
v = rep.verdict
post = tc.posterior
posterior_flag(post.flag_text)
verdict_box(v["decision"], f"**{v['decision'].capitalize()}.** " + v["text"])
verdict_scope("; the measured curve below is qTTT (AdamW on W_Q, next-token NLL), a different update." if long else
              " — the measured curve below runs that update on the model itself." if m is not None else
              " — with 'Run real TTT' on (and a query to score), the measured curve runs that update on the model.")
cols = st.columns(7)
cols[0].metric("T_MAP (fixed σ̂)", tc.t_map_fixed, help=f"Gibbs posterior over T: mean {b.gibbs_mean_T:.1f} (chart below).")
cols[1].metric("T_MAP (profiled σ)", tc.t_map_profiled)
best = v.get("measured_best_T")
cols[2].metric("Measured best T", "—" if best is None else best, help="argmin of the engine's measured curve on this grid.")
cols[3].metric("P(TTT beats ICL)", f"{v['prob_ttt_beats_icl']:.2f}", help="At T_MAP, over the λ⋆ posterior (DESIGN §5.1).")
cols[4].metric("Plug-in slack", f"{b.slack:.3g}", help=f"sqrt(v̄ (log|grid| + log 1/δ)/n), v̄ = {b.v_bar:.3g} under "
                                                       "Σ̂⋆ = τ̂²K + σ̂²I at the posterior medians; 90 % interval over "
                                                       f"the posterior {interval_text(b.slack, *b.slack_ci)}. An "
                                                       "estimate, not a certificate.")
cols[5].metric("ρ = c/λ_max", f"{tc.rho:.3g}")
cols[6].metric("λ⋆ (posterior median)", f"{tc.lambda_star:.3g}",
               help=f"90 % interval {interval_text(post.lambda_star.median, post.lambda_star.lo, post.lambda_star.hi)}; "
                    f"τ² {interval_text(post.tau2.median, post.tau2.lo, post.tau2.hi)}, σ² "
                    f"{interval_text(post.sigma2.median, post.sigma2.lo, post.sigma2.hi)}; maximum likelihood "
                    f"λ⋆ = {post.ml.lambda_star:.3g}.")
st.caption(f"Blocks: {rep.blocks_label}; n = {rep.n} supervised outputs; grid 0…{int(grid_max)}. "
           + (f"Engine: {m.engine}, {m.steps_run} step(s) in {m.seconds:.1f} s ({m.status}). {m.note}" if m else ""))
if rep.unavailable:
    st.info("**Not drawn:** " + " ".join(f"*{k}* — {why}" for k, why in rep.unavailable.items()))
if m is not None and m.status == "diverged":
    st.warning(f"The run diverged: {m.reason}")

# ------------------------------------------------------------------------------------------
# The step count to use: the rule with the lowest held-out regret on prompts like this (issue 16)
# ------------------------------------------------------------------------------------------
st.subheader("How many steps: the calibrated recommendation")
try:
    adv = cached_calibration_advice(st.session_state, lm, prompt, v)
except Exception as exc:  # noqa: BLE001 — the page stays up
    adv = {"status": "error", "sentence": f"The calibrated recommendation failed: {type(exc).__name__}: {exc}. "
                                          f"Today's recommendation: T = {v['T_star']}."}
if adv["status"] == CALIBRATED:
    ac = st.columns(3)
    ac[0].metric("Recommended T (calibrated)", adv["recommended_T"],
                 help=f"{adv['rule']} on this prompt: {adv['steps_how']}.")
    ac[1].metric("Its held-out regret", f"{adv['regret']:.4f}",
                 help=f"{adv['rule']} on {adv['n']} held-out prompts like this ({adv['level_label']}); 95 % paired "
                      f"bootstrap CI [{adv['ci_low']:.4f}, {adv['ci_high']:.4f}].")
    ref_regret = adv.get("reference_regret")
    ref_rule = adv["reference_rule"]
    ac[2].metric(f"{ref_rule[:1].upper()}{ref_rule[1:]}'s regret", "—" if ref_regret is None else f"{ref_regret:.4f}")
    st.markdown(adv["sentence"])
else:
    st.info("**Not calibrated.** " + adv["sentence"])
rv = adv.get("verdict_recalibrated")
if rv:
    rc = st.columns([1, 3])
    rc[0].metric("P(TTT beats ICL), recalibrated", f"{rv['p']:.2f}",
                 help=f"This prompt's posterior P = {rv['p_raw']:.2f} at T⋆ = {rv['T_star']} under the calibration "
                      f"suite's settings, through the suite's Platt map σ({rv['a']:.2f}·logit P {rv['b']:+.2f}) "
                      f"fitted on its {rv['n_train']} train prompts.")
    rc[1].markdown(f"On the calibration suite's {rv['n_test']} held-out prompts the posterior's probability was "
                   f"miscalibrated: its Brier score was {rv['brier_raw']:.3f}, recalibrated {rv['brier_recalibrated']:.3f}, "
                   f"and a constant {rv['train_base_rate']:.2f} (the share of train prompts where TTT beat ICL) scores "
                   f"{rv['brier_base_rate']:.3f}. Read the P above as a measure of the evidence, the recalibrated one "
                   "as how often such a verdict came true." if rv["brier_recalibrated"] < rv["brier_raw"] else
                   f"On the calibration suite's {rv['n_test']} held-out prompts recalibration did not help (Brier "
                   f"{rv['brier_raw']:.3f} → {rv['brier_recalibrated']:.3f}).")
if adv.get("file"):
    st.caption(f"From the {adv.get('source')} calibration result `{adv['file']}` ({adv.get('created')}, "
               f"{adv.get('calibration_model')}, {adv.get('n_prompts_suite')} prompts); regret = measured error of the "
               "rule's T − the oracle's on one real TTT trajectory per prompt. The Reliability page has every rule.")

st.plotly_chart(fig := figs.error_figure(rep), key="steps_fig_error")
figure_downloads(fig, "steps_fig_error", lm, prompt, settings=settings_dict)
how_to_read(r"f_T(x)=f_0(x)+k_x^\top q_T(K)\,r=f_0+\sum_i \tilde a_i\,q_T(\lambda_i)\,\tilde r_i,\quad "
            r"q_T(\lambda)=\frac{1-(1-\rho\lambda)^T}{\lambda},\quad \mathrm{error}=(f_T(x)-y)^2",
            "Solid: the query error of real (nonlinear) TTT after each step, from one engine run. Dashed: the kernel's "
            "linearised prediction of the same error at the same ρ. Dotted: ICL (no update). Vertical lines: T_MAP of "
            "the evidence. On a long context the green curve is qTTT's answer NLL (AdamW on the span NLL, a different "
            "optimiser, so it is not a test of the dashed curve).",
            "measured and linearised agree for small T, and the error dips below the ICL line near T_MAP.",
            "the curves part early (the update leaves the kernel regime), or the error only rises: adapting hurts.",
            "§3, §5")

st.plotly_chart(fig := figs.prompt_fit_figure(rep), key="steps_fig_prompt")
figure_downloads(fig, "steps_fig_prompt", lm, prompt, settings=settings_dict)
how_to_read(r"\frac1n\|(I-\rho K)^T r\|^2=\frac1n\sum_i(1-\rho\lambda_i)^{2T}\tilde r_i^2",
            "How much of the prompt's leave-one-out residual is left after T steps: measured (engine) and linearised.",
            "a steady decrease that the linearised curve tracks.",
            "a fast fall to zero: the update is fitting the prompt, noise included (compare the query error).", "§3")

st.plotly_chart(fig := figs.evidence_figure(rep), key="steps_fig_evidence")
figure_downloads(fig, "steps_fig_evidence", lm, prompt, settings=settings_dict)
how_to_read(r"\ell_T(r)=\frac{1}{2n}\Big[n\log\sigma^2-T\sum_i\log(1-\rho\lambda_i)+\sigma^{-2}\sum_i(1-\rho\lambda_i)^T"
            r"\tilde r_i^2\Big],\quad \mathcal L(T_{MAP}\mid K)\le \ell_{T_{MAP}}(r)+\sqrt{\frac{\bar v\,(\log|\mathcal T|+"
            r"\log(1/\delta))}{n}}",
            f"The prompt evidence (normalised negative log-evidence) with σ̂² = ‖r‖²/n fixed and with σ profiled out, "
            f"and the {PLUG_IN_LABEL}: v̄ needs the true residual covariance Σ⋆, which a real prompt does not reveal, "
            "so it is computed with the plug-in Σ̂⋆ = τ̂²K + σ̂²I. The green dotted curve is the plug-in population "
            "risk 𝓛̂(T|K). Smaller δ widens the slack.",
            "a clear minimum of ℓ_T at T > 0 and a slack small next to the dip.",
            "ℓ_T smallest at T = 0 (the residuals look like noise) or a slack larger than the whole dip.", "§5")

st.plotly_chart(fig := figs.gibbs_figure(rep), key="steps_fig_gibbs")
figure_downloads(fig, "steps_fig_gibbs", lm, prompt, settings=settings_dict)
how_to_read(r"\nu_\beta(T)\propto \pi_0(T)\,e^{-\beta n\,\ell_T(r)},\quad \mathbb E_\nu\mathcal L\le \mathbb E_\nu\ell+"
            r"\frac{\mathrm{KL}(\nu\|\pi_0)+\log(1/\delta)}{\beta n}+\frac{\beta\bar v}{4}",
            f"The Gibbs posterior over the step grid (uniform prior). Larger β concentrates it on T_MAP. Plug-in general "
            f"bound for this ν: {b.gibbs_bound:.4g} (β⋆ for the point mass ≈ {b.beta_star:.3g}).",
            "mass concentrated on a few neighbouring T.", "mass spread over the whole grid: the evidence hardly "
            "distinguishes horizons.", "§5")


# ------------------------------------------------------------------------------------------
# Linked view over T: brush steps on the evidence chart, the error and Gibbs charts follow
# ------------------------------------------------------------------------------------------
from ttt_core.figures import linked as linked_figs  # noqa: E402  (this section's own import)

st.subheader("Linked view over T")
st.caption("Drag across the evidence chart (top) to select a range of step counts T; the query-curve and Gibbs "
           "charts highlight the same T, and the table lists them. Double-click to clear.")
steps_event = st.altair_chart(linked_figs.steps_linked_chart(rep), key="steps_linked", on_select="rerun",
                              selection_mode=linked_figs.STEPS_BRUSH, width="stretch")
steps_idx = linked_figs.brushed_steps_index(rep, linked_figs.brush_range(steps_event, linked_figs.STEPS_BRUSH, "T"))
if steps_idx.size == 0:
    st.info("No steps brushed yet: drag across the evidence chart to select some.")
else:
    summ = linked_figs.brushed_steps_summary(rep, steps_idx)
    T_sel = rep.T_grid[steps_idx]
    lc = st.columns(3)
    lc[0].metric("Brushed T", f"{int(T_sel[0])}–{int(T_sel[-1])}" if T_sel.size > 1 else f"{int(T_sel[0])}",
                 help=f"{steps_idx.size} of {len(rep.T_grid)} grid points")
    lc[1].metric("Gibbs mass on the brushed T", f"{summ['gibbs_mass']:.3g}",
                 help=f"ν_β(T ∈ brush) at β = {rep.bounds.beta:g}")
    lc[2].metric("Lowest ℓ_T among them", "—" if summ["best_T"] is None else f"T = {summ['best_T']}",
                 help="T_MAP (fixed σ̂) is " + ("inside" if summ["contains_t_map"] else "outside") + " the brush.")
    st.table(linked_figs.brushed_steps_table(rep, steps_idx), hide_index=True)
how_to_read(None,
            "One interval selection on T: the evidence curves (ℓ_T with fixed σ̂ and profiled σ, the plug-in bound "
            "and population risk), the query curve (measured and linearised error, or prediction / qTTT NLL) and "
            "the Gibbs posterior ν_β(T). Steps outside the brush turn grey.",
            "the brush around the ℓ_T dip also holds most of the Gibbs mass and the lowest measured error.",
            "the Gibbs mass sits where the measured error is high: the evidence and the real run disagree.", "§3, §5")


# ------------------------------------------------------------------------------------------
# The whole diagnosis, and results you can keep (issue 11)
# ------------------------------------------------------------------------------------------
diagnosis_section(lm, prompt, "steps", subspace=subspace, c=float(c), grid=int(grid_max), delta=float(delta),
                  last_layers=int(last))
steps_runs_section(lm, prompt, rep)
