"""Spectrum & SNR page: the prompt kernel's eigen-spectrum, per-mode SNR, query alignment, filter
match and the plug-in TTT-versus-ICL verdict (DESIGN §2–§4). UI only; computation in ttt_core."""

from __future__ import annotations

import numpy as np
import streamlit as st

from pages.common import (get_model, get_prompt, how_to_read, interval_text, page_header, posterior_flag, verdict_box,
                          verdict_scope)
from pages.downloads import figure_downloads
from pages.state import cached_prompt_kernel, cached_result
from ttt_core.figures import spectrum as figs
from ttt_core.prompt_kernel import PAGE_SUBSPACES, PromptKernelError, subspace_label
from ttt_core.prompts import LongContextPrompt
from ttt_core.spectrum import DEFAULT_C, kernel_spectrum

page_header("Spectrum & SNR",
            "Does adapting on this prompt beat plain in-context prediction, and which eigen-directions "
            "of the prompt kernel carry the signal the query needs?")

lm = get_model()
prompt = get_prompt(lm) if lm is not None else None
if lm is None or prompt is None:
    st.stop()

long = isinstance(prompt, LongContextPrompt)
c1, c2, c3, c4 = st.columns(4)
subspace = c1.selectbox("Update subspace", list(PAGE_SUBSPACES), format_func=lambda k: PAGE_SUBSPACES[k], key="spec_subspace", bind="query-params",
                        help="W_Q per head is what qTTT updates; W_V per head is what the paper's experiments update.")
T = c2.number_input("Steps T", min_value=1, max_value=200, value=8, step=1, key="spec_T", bind="query-params")
c = c3.slider("Step fraction c (ρ = c/λ_max)", min_value=0.05, max_value=0.95, value=DEFAULT_C, step=0.05, key="spec_c", bind="query-params")
max_pos = c4.number_input("Max positions", min_value=8, max_value=2048, value=256, step=8, key="spec_maxpos", bind="query-params",
                          disabled=not long, help="Long context: the last this-many next-token predictions are "
                                                 "the supervised positions (few-shot uses one per demonstration).")
if long:
    st.caption("Long context: each supervised output is the probability of the observed next token (target 1, "
               "residual 1 − p), which puts free text in the paper's squared-loss frame (DESIGN §7.2).")
    if subspace != "q":
        st.warning(f"{subspace_label(subspace)} on a long context uses the exact per-output route: one backward pass per "
                   "group of at most 8 outputs (fewer for long contexts: ≤ 2048 tokens per batch), e.g. "
                   f"{int(max_pos)} outputs ≈ {int(np.ceil(max_pos / 8))}+ passes. Lower 'Max positions' if this is slow.")

bar = st.progress(0.0, text="Computing prompt evidence…")


def _progress(frac: float, text: str) -> None:
    bar.progress(frac, text=text)


try:
    with st.spinner(f"Kernel of {subspace_label(subspace)} on {lm.name}…"):
        ev = cached_prompt_kernel(st.session_state, lm, prompt, subspace, max_positions=int(max_pos), progress=_progress)
except PromptKernelError as exc:
    bar.empty()
    st.error(str(exc))
    st.stop()
bar.empty()

block_opts = ["Full kernel"] + [ev.block_label(b) for b in ev.blocks()]
choice = st.selectbox("Kernel to decompose", block_opts, key="spec_block", bind="query-params",
                      help="The full kernel K = Σ_b K⁽ᵇ⁾ of the subspace, or one block's K⁽ᵇ⁾ (its own τ², σ² fit).")
block = None if choice == "Full kernel" else ev.blocks()[block_opts.index(choice) - 1]
try:
    rep = cached_result(st.session_state, lm, prompt, subspace, "spectrum", (block, float(T), float(c)),
                        lambda: kernel_spectrum(ev, block, T=float(T), c=float(c)), max_positions=int(max_pos))
except ValueError as exc:
    st.error(f"Spectrum failed: {exc}")
    st.stop()

m = st.columns(6)
m[0].metric("n (supervised outputs)", ev.n)
m[1].metric("Effective rank", f"{rep.eff_rank_entropy:.1f}", help=f"exp(spectral entropy); participation ratio "
                                                                   f"{rep.participation_ratio:.1f}")
post = rep.posterior
m[2].metric("τ² (signal)", f"{rep.tau2:.3g}", help="Posterior median; 90 % interval "
            + interval_text(post.tau2.median, post.tau2.lo, post.tau2.hi) + f". Maximum likelihood: {rep.ml_tau2:.3g}.")
m[3].metric("σ² (noise)", f"{rep.sigma2:.3g}", help="Posterior median; 90 % interval "
            + interval_text(post.sigma2.median, post.sigma2.lo, post.sigma2.hi)
            + f". Maximum likelihood: {rep.ml_sigma2:.3g}.")
m[4].metric("λ⋆ = σ²/τ²", f"{rep.lam_star:.3g}", help="Posterior median with 90 % interval "
            + interval_text(rep.lam_star, *rep.lam_star_ci) + f"; maximum likelihood {rep.ml_lam_star:.3g} "
            "(shown for reference, never used for a verdict).")
m[5].metric(f"P(TTT beats ICL at T={rep.T:g})", f"{rep.prob:.2f}", help=rep.verdict)
st.caption(f"λ⋆ posterior median {interval_text(rep.lam_star, *rep.lam_star_ci)} (90 % credible interval, DESIGN "
           f"§5.1); maximum likelihood {rep.ml_lam_star:.3g}.")
posterior_flag(rep.flag)
verdict_box(rep.decision,
            f"**{rep.verdict}.** Expected {rep.criterion}: TTT {interval_text(rep.gap_ttt, *rep.gap_ttt_ci)} vs ICL "
            f"{interval_text(rep.gap_icl, *rep.gap_icl_ci)} (posterior mean [90 % interval]); lowest expected gap "
            f"at T = {rep.best_T:g}. 'Adapt' needs P ≥ 0.9, 'don't adapt' P ≤ 0.1; anything between is undetermined.")
verdict_scope("; the Steps & bounds page runs it on the model"
              + (" (for this long prompt, qTTT: AdamW on W_Q, a different update)." if long else
                 " and draws its measured error beside this prediction."))
q = ev.query
st.caption(f"Route: {ev.route} — {ev.route_note} "
           + (f"Query: {q.label} = {q.value:.4f}" + (f", error {q.error:.4f}" if q.error is not None else "")
              + (f", NLL {q.nll:.3f}" if q.nll is not None else "") + "." if q is not None else "")
           + (f" {ev.query_note}" if ev.query_note else ""))

st.plotly_chart(fig := figs.scree_figure(rep), key="spec_scree")
figure_downloads(fig, "spec_scree", lm, prompt)
how_to_read(r"K = U\,\mathrm{diag}(\lambda_i)\,U^\top,\quad \mathrm{energy}(i)=\frac{\sum_{j\le i}\lambda_j}{\sum_j\lambda_j},"
            r"\quad r_{\mathrm{eff}}=\exp\Big(-\sum_i p_i\log p_i\Big),\ p_i=\lambda_i/\textstyle\sum\lambda",
            "Eigenvalues of the prompt kernel (log scale), the cumulative share of the trace, the effective rank "
            "(dashed vertical) and λ⋆ = σ²/τ² (dashed horizontal: modes above it have SNR > 1).",
            "a few modes well above λ⋆ that hold most of the energy: the update has a clear, low-dimensional signal.",
            "a flat spectrum entirely below λ⋆: every direction is noise-dominated, and adapting mostly fits noise.",
            "§2, §3")

st.plotly_chart(fig := figs.posterior_figure(rep), key="spec_posterior")
figure_downloads(fig, "spec_posterior", lm, prompt)
how_to_read(r"\log p(r\mid s) = -\tfrac12\sum_i\log(1+s\lambda_i) - \tfrac n2\log\sum_i \frac{\tilde r_i^2}{1+s\lambda_i},"
            r"\quad s = 1/\lambda_\star",
            "The posterior over the noise-to-signal ratio λ⋆ (σ² integrated out under a Jeffreys prior) against its "
            "prior, a normal on log₁₀ λ⋆ around the mean eigenvalue with sd 1.5 decades. Solid line: median; "
            "dashed: 90 % interval; dotted: the maximum-likelihood point fit.",
            "a posterior much narrower than the prior: the prompt pins the noise level down.",
            "a posterior that looks like the prior (flagged above): the prompt cannot tell signal from noise.",
            "§5.1")

st.plotly_chart(fig := figs.snr_figure(rep), key="spec_snr")
figure_downloads(fig, "spec_snr", lm, prompt)
how_to_read(r"\mathrm{SNR}_i = \tau^2\lambda_i/\sigma^2 = \lambda_i/\lambda_\star",
            "Per-mode signal-to-noise ratio at the posterior median of λ⋆, with its 90 % credible band.",
            "the leading modes sit well above the SNR = 1 line.", "all modes below 1 (τ² ≈ 0: ICL is Bayes-optimal).",
            "§3, §5")

st.plotly_chart(fig := figs.alignment_figure(rep), key="spec_align")
figure_downloads(fig, "spec_align", lm, prompt)
how_to_read(r"(u_i^\top k_x)^2,\qquad k_x = \Phi\,\phi(x)",
            "How strongly the query couples to each eigen-direction of the prompt kernel.",
            "alignment concentrated on high-SNR modes: what TTT learns on the prompt transfers to the query.",
            "alignment on low-SNR (tail) modes: the query needs directions the prompt cannot estimate.", "§2, §4")

st.plotly_chart(fig := figs.filter_figure(rep), key="spec_filter")
figure_downloads(fig, "spec_filter", lm, prompt)
how_to_read(r"g_T(\lambda)=1-(1-\rho\lambda)^T,\ \rho=c/\lambda_{\max};\qquad g_\star(\lambda)=\frac{\lambda}{\lambda+\lambda_\star}",
            "How much of each mode T steps of gradient descent fit (solid) versus the Bayes-optimal shrinkage "
            "(dashed), at the kernel's actual eigenvalues.",
            "the two curves close on the modes that carry query alignment.",
            "g_T ≈ 1 where g⋆ ≈ 0 (over-fitting noisy modes) or g_T ≈ 0 where g⋆ ≈ 1 (too few steps).", "§3")

st.plotly_chart(fig := figs.gap_figure(rep), key="spec_gap")
figure_downloads(fig, "spec_gap", lm, prompt)
how_to_read(r"\sum_i a_i\,(q_T(\lambda_i)-q_\star(\lambda_i))^2 \;<\; \sum_i a_i\,q_\star(\lambda_i)^2,"
            r"\quad a_i=(\tau^2\lambda_i+\sigma^2)(u_i^\top k_x)^2",
            "Per-mode contributions to the query Bayes gap of TTT at T steps (blue) and of ICL (orange). TTT beats ICL "
            "when the blue bars sum to less than the orange ones (at the posterior medians; the verdict above "
            "integrates over the whole posterior instead).",
            "blue bars far below orange on the aligned modes.", "blue bars above orange: TTT's filter is mismatched.",
            "§4")

st.plotly_chart(fig := figs.gap_vs_T_figure(rep), key="spec_gap_T")
figure_downloads(fig, "spec_gap_T", lm, prompt)
how_to_read(r"\mathrm{gap}(T)=\sum_i a_i\,(q_T(\lambda_i)-q_\star(\lambda_i))^2",
            "The expected gap (posterior mean) over T = 0…30 with ρ fixed, the ICL line (T = 0), and the posterior "
            "probability that T steps beat ICL (right axis; dotted lines at 0.9 and 0.1).",
            "a dip below the ICL line: some horizon helps.", "a curve that only rises: any adaptation hurts.", "§4")


# ------------------------------------------------------------------------------------------
# Linked view of the modes (issue 11, point 4): one brush on the spectrum drives every chart
# ------------------------------------------------------------------------------------------
from ttt_core.figures import linked as linked_figs  # noqa: E402  (this section's own import)

st.subheader("Linked view of the modes")
st.caption("Drag across the spectrum (top chart) to select a range of modes; the SNR, query-alignment and "
           "filter-match charts highlight the same modes, and the table lists them. Double-click to clear.")
spec_event = st.altair_chart(linked_figs.spectrum_linked_chart(rep), key="spec_linked", on_select="rerun",
                             selection_mode=linked_figs.MODE_BRUSH, width="stretch")
spec_idx = linked_figs.brushed_mode_index(rep, linked_figs.brush_range(spec_event, linked_figs.MODE_BRUSH, "mode"))
if rep.alignment is None:
    st.caption("This prompt has no query coupling kₓ: no alignment chart and no gap contributions.")
if spec_idx.size == 0:
    st.info("No modes brushed yet: drag across the spectrum chart to select some.")
else:
    shares = linked_figs.brushed_shares(rep, spec_idx)

    def _pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:.3g} %"

    lo_m, hi_m = int(spec_idx[0]) + 1, int(spec_idx[-1]) + 1
    sc = st.columns(5)
    sc[0].metric("Brushed modes", f"{lo_m}–{hi_m}" if hi_m > lo_m else f"{lo_m}", help=f"{spec_idx.size} of {rep.n}")
    sc[1].metric("Share of query alignment", _pct(shares["alignment"]), help="Σ over the brushed modes of (uᵢᵀkₓ)² "
                                                                            "/ Σ over all modes.")
    sc[2].metric("Share of TTT gap", _pct(shares["gap_ttt"]), help="Share of Σ aᵢ(q_T − q⋆)² (at T = "
                                                                   f"{rep.T:g}, posterior medians).")
    sc[3].metric("Share of ICL gap", _pct(shares["gap_icl"]), help="Share of Σ aᵢ q⋆².")
    sc[4].metric("Share of the trace", _pct(shares["energy"]), help="Σλᵢ over the brushed modes / Σλ.")
    st.table(linked_figs.brushed_modes_table(rep, spec_idx), hide_index=True)
how_to_read(None,
            "One interval selection on the mode index i: the spectrum λᵢ (log), the per-mode SNR with its 90 % "
            "credible band, the query alignment (uᵢᵀkₓ)² (log) and the filter match g_T(λᵢ), g⋆(λᵢ) (plotted "
            "against λᵢ, so the same modes sit at their eigenvalues there). Modes outside the brush turn grey.",
            "the brushed high-SNR leading modes hold most of the query alignment and of the ICL gap, with g_T "
            "close to g⋆ on them.",
            "most of the alignment (or of the TTT gap) sits in the low-SNR tail you brush last.", "§2–§4")
