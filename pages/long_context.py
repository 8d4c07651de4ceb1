"""Long context: score dilution of a needle as the context grows, what qTTT changes, the query
gradient qTTT follows, and what it costs in thinking tokens (DESIGN §8; qTTT paper Lemma 2.2/2.3,
Sec. 3.3). UI only: measurements are ttt_core.dilution, the FLOP accounting ttt_core.flops, figures
ttt_core.figures.long_context."""

from __future__ import annotations

import numpy as np
import streamlit as st

from pages.common import get_model, get_prompt, how_to_read, page_header
from pages.downloads import figure_downloads
from ttt_core import dilution as D
from ttt_core import flops as Fl
from ttt_core.figures import long_context as figs
from ttt_core.qttt import DEFAULT_LR

SS = st.session_state
LENGTHS = [50, 100, 200, 400, 700, 1000, 1500]
POSITIONS = [0.1, 0.5, 0.9]
LRS = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]

page_header("Long context",
            "Why does the answer position stop attending to a needle as the context grows, does qTTT restore it, "
            "and how many thinking tokens would the same compute buy?")

lm = get_model()
if lm is None:
    st.stop()

# ================================================================================ dilution
st.header("Score dilution: measured")
c1, c2, c3, c4 = st.columns(4)
with c1:
    lengths = st.multiselect("Context lengths (words of filler)", LENGTHS, default=[100, 400, 1000], key="lc_lengths")
    positions = st.multiselect("Needle positions (fraction of the context)", POSITIONS, default=[0.5],
                               key="lc_positions")
with c2:
    steps = st.slider("qTTT steps N", 1, 32, 4, key="lc_steps")
    span = st.select_slider("Span k", [16, 32, 64, 128], value=64, key="lc_span")
with c3:
    lr = st.select_slider("Learning rate (AdamW)", LRS, value=DEFAULT_LR, key="lc_lr", format_func=lambda v: f"{v:g}")
    seed = int(st.number_input("Seed", min_value=0, max_value=10_000, value=0, key="lc_seed"))
with c4:
    delta = st.slider("Δ for the distractor count m (Lemma 2.2)", 0.0, 6.0, 2.0, 0.25, key="lc_delta")
    eps = st.slider("Target ε for the margin (Lemma 2.3)", 0.01, 0.5, 0.1, 0.01, key="lc_eps")

key = (lm.name, tuple(sorted(lengths)), tuple(sorted(positions)), steps, span, float(lr), seed, float(delta))
held = SS.get("lc_result")
if st.button("Run the sweep (qTTT on every length and position)", key="lc_run", type="primary",
             disabled=not lengths or not positions):
    bar = st.progress(0.0, text="Starting…")
    try:
        pts = D.dilution_sweep(lm, sorted(lengths), sorted(positions), steps=steps, span=span, lr=float(lr), seed=seed,
                               delta=float(delta), progress=lambda f, t: bar.progress(min(max(f, 0.0), 1.0), text=t))
        SS["lc_result"] = held = (key, pts)
    except Exception as exc:  # the page stays up; the message says what failed
        st.error(f"The sweep failed: {type(exc).__name__}: {exc}")

if held is None:
    st.info(f"Press the button: each point prefills a needle-in-a-haystack prompt, measures the attention of the "
            f"answer position on the needle, runs {steps} qTTT steps (span {span}) with the engine and measures "
            "again. On a CPU a 1000-word point takes tens of seconds with the embedded model.")
else:
    hkey, pts = held
    if hkey != key:
        st.warning("The settings changed since this sweep ran; press the button to update it.")
    st.caption(f"Measured on {lm.name}: attention probabilities of the answer position (the last prompt token) over "
               "the frozen cache, every layer and query head, before and after the engine's qTTT run. Logits are "
               "log-probabilities (differences within a row are exact).")
    st.dataframe(D.sweep_table(pts, float(eps)), hide_index=True, width="stretch")
    left, right = st.columns(2)
    with left:
        st.plotly_chart(fig := figs.mass_figure(pts), key="lc_fig_mass")
        figure_downloads(fig, "lc_fig_mass", lm)
        how_to_read(r"\text{mass}=\sum_{j\in\text{needle}}\alpha_{a,j},\quad \alpha_{a,j}=\frac{e^{z_{a,j}}}{\sum_l e^{z_{a,l}}}",
                    "Attention of the answer position a on the needle tokens, averaged over layers and heads, "
                    "against the context length (measured). For reference, the qTTT paper (App. E, Qwen3-4B, bank "
                    "task) reports mean target mass 0.46 → 0.04 for thinking from 512 to 9,560 tokens and 0.42 → "
                    "0.25 for qTTT.", good="the after-curve above the before-curve, falling more slowly with T",
                    bad="both curves falling like 1/T and on top of each other: qTTT did not sharpen retrieval",
                    section="§8")
    with right:
        labels = [f"{p.n_words} words, needle at {p.position:.0%} ({p.n_tokens} tokens)" for p in pts]
        pick = st.selectbox("Point for the heat map", range(len(pts)), format_func=lambda i: labels[i],
                            key="lc_point")
        st.plotly_chart(fig := figs.heatmap_figure(pts[min(pick, len(pts) - 1)]), key="lc_fig_heat")
        figure_downloads(fig, "lc_fig_heat", lm)
        how_to_read(None, "Needle mass of every layer (rows) and query head (columns) from the answer position, "
                    "before and after qTTT, on one colour scale (measured).",
                    good="a few retrieval heads light up, brighter after qTTT", bad="a uniform dark map")
    left, right = st.columns(2)
    with left:
        tight = st.toggle("Tightest bound over Δ instead of the chosen Δ", key="lc_tight")
        st.plotly_chart(fig := figs.bound_figure(pts, tight=tight), key="lc_fig_bound")
        figure_downloads(fig, "lc_fig_bound", lm)
        how_to_read(r"\alpha_{a,j^\star}\le\frac{1}{1+m\,e^{-\Delta}},\qquad m=\#\{j\notin\text{needle}: z_{a,j}\ge z_{a,j^\star}-\Delta\}",
                    "Lemma 2.2 (qTTT paper) checked on the measured logits: for every layer and head, j* is the "
                    "needle token with the largest logit, m counts the non-needle keys within Δ of it; x = the "
                    "bound, y = the measured attention α* on j*. The tightest variant minimises the bound over "
                    "every Δ (Δ = the m-th smallest gap).",
                    good="every marker on or below the diagonal (the lemma is a theorem); markers near the diagonal "
                         "where distractors are near-ties", bad="a marker above the diagonal would be a bug",
                    section="§8")
    with right:
        st.plotly_chart(fig := figs.margin_figure(pts, float(eps)), key="lc_fig_margin")
        figure_downloads(fig, "lc_fig_margin", lm)
        how_to_read(r"\gamma=z_{j^\star}-\log\sum_{j\ne j^\star}e^{z_j},\qquad \min_{j\ne j^\star}(z_{j^\star}-z_j)\ge\log\frac{(T-1)(1-\varepsilon)}{\varepsilon}\Rightarrow\alpha_{j^\star}\ge1-\varepsilon",
                    "Lemma 2.3: the dashed curve is the worst-case logit gap that guarantees attention ≥ 1 − ε on "
                    "the needle with T keys — it grows like log T. Markers: the largest measured retrieval margin γ "
                    "over heads (α* = 1/(1 + e^(−γ)) exactly) and that head's smallest gap to any other key, "
                    "before and after qTTT.",
                    good="qTTT raises γ, and the gap approaches the dashed curve",
                    bad="γ falling with T at fixed weights while the requirement rises", section="§8")
    st.plotly_chart(fig := figs.answer_figure(pts), key="lc_fig_answer")
    figure_downloads(fig, "lc_fig_answer", lm)
    how_to_read(None, "Teacher-forced probability of the expected answer (all its tokens) before and after qTTT; "
                "● the greedy answer starts with the expected number, ✕ it does not (measured).",
                good="after above before at long contexts", bad="after below before: qTTT overfitted the filler")

# ================================================================================ query gradient
st.header("The query gradient qTTT follows")
st.markdown("For one attention row with query q, keys K (T × d_k), logits z = Kq/√d_k and α = softmax(z), the "
            "gradient of −log α_needle with respect to q is **(μ − k_needle)/√d_k** with μ = Σⱼ αⱼ kⱼ, the "
            "attention-weighted mean key: a descent step moves q toward k_needle − μ, raising the needle's logit "
            "against the keys that dilute it. Below, the closed form next to torch.autograd's gradient of the same "
            "row.")


@st.cache_data(max_entries=16, show_spinner=False)
def _measured_gradient_check(model_name: str, prompt_key: str, layer: int | None, head: int | None,
                             _lm, _prompt) -> D.QueryGradientCheck:
    """Cached per (model, prompt, head): one prefill and one answer-row forward."""
    return D.measured_query_gradient_check(_lm, _prompt, layer, head)


grad_prompt = get_prompt(lm)
grad_check = None
if D.has_marked_needle(grad_prompt):
    L_q, H_q = lm.adapter.n_layers, lm.adapter.n_heads
    head_opts = [None] + [(l, h) for l in range(L_q) for h in range(H_q)]
    pick_head = st.selectbox("Query head", head_opts, key="lc_grad_head",
                             format_func=lambda o: "the head with the largest needle attention" if o is None
                             else f"layer {o[0]}, head {o[1]}")
    try:
        with st.spinner("Measuring the answer row of the sidebar prompt…"):
            grad_check = _measured_gradient_check(lm.name, repr(grad_prompt),
                                                  None if pick_head is None else pick_head[0],
                                                  None if pick_head is None else pick_head[1], lm, grad_prompt)
    except Exception as exc:  # the page stays up; fall back to the synthetic row
        st.warning(f"Could not measure the sidebar prompt's answer row ({type(exc).__name__}: {exc}); "
                   "showing a synthetic row instead.")
else:
    st.info("The sidebar prompt marks no needle (mark one with <needle>…</needle>, as the 'Needle in a haystack' "
            "examples do), so a small synthetic row is shown instead.")
if grad_check is None:
    q_syn, K_syn, j_syn = D.synthetic_row()
    grad_check = D.query_gradient_check(q_syn, K_syn, j_syn, source="synthetic",
                                        description=f"synthetic row: {K_syn.shape[0]} keys K ~ N(0, I), d_k = "
                                                    f"{K_syn.shape[1]}, q = 0.7·k_needle + N(0, I), needle key {j_syn}")
st.caption(grad_check.description + (
    f". Keys from the frozen prefill cache (position-rotated); the row's query q is recovered from the recorded "
    f"attention (least squares on s·Kq − c = log α; identified: {'yes' if grad_check.q_identified else 'no, minimum-norm'}), "
    f"and softmax(s·Kq̂) reproduces the recorded row to max |Δα| = {grad_check.recon_max_abs:.2e}. Scale s = "
    f"{grad_check.scale:.4g}." if grad_check.source == "measured" else "."))
g = st.columns(5)
g[0].metric("α_needle", f"{grad_check.alpha_needle:.4g}")
g[1].metric("‖gradient‖, closed form", f"{grad_check.norm_closed:.6g}")
g[2].metric("‖gradient‖, autograd", f"{grad_check.norm_autograd:.6g}")
g[3].metric("cosine(closed, autograd)", f"{grad_check.cosine:.12f}")
g[4].metric("max |closed − autograd|", f"{grad_check.max_abs_diff:.2e}")
st.plotly_chart(fig := figs.query_gradient_figure(grad_check), key="lc_fig_qgrad")
figure_downloads(fig, "lc_fig_qgrad", lm, grad_prompt)
how_to_read(r"\frac{\partial(-\log\alpha_{\rm needle})}{\partial q}=\frac{\mu-k_{\rm needle}}{\sqrt{d_k}},\qquad"
            r"\mu=\sum_j\alpha_j k_j,\quad \alpha=\mathrm{softmax}(Kq/\sqrt{d_k})",
            "Each coordinate of the gradient of −log α_needle with respect to the query: bars from the closed form, "
            "diamonds from torch.autograd on the same q and K (float64). For a measured row K is the chosen head's "
            "frozen keys of the sidebar prompt and the needle key is the needle token that head attends to most.",
            good="every diamond on top of its bar, cosine 1 and a difference at round-off (≈ 1e-16 … 1e-12)",
            bad="diamonds off the bars: the closed form (or the scale s) is wrong", section="§8")

# ================================================================================ FLOPs
st.header("Compute: qTTT steps against thinking tokens")
fm0 = Fl.FlopModel.from_model(lm)
c1, c2, c3 = st.columns(3)
with c1:
    L = int(st.number_input("Layers L", min_value=1, max_value=512, value=fm0.L, key="lc_L"))
    d = int(st.number_input("Width d", min_value=8, max_value=65536, value=fm0.d, key="lc_d"))
    r = float(st.number_input("MLP ratio r = d_ff/d", min_value=0.5, max_value=16.0, value=float(round(fm0.r, 4)),
                              key="lc_r"))
with c2:
    T_ctx = int(st.number_input("Context length T (tokens)", min_value=2, max_value=10_000_000, value=100_000,
                                key="lc_T"))
    N = int(st.number_input("qTTT steps N", min_value=1, max_value=10_000, value=32, key="lc_N"))
    k = int(st.number_input("Span k", min_value=1, max_value=100_000, value=128, key="lc_k"))
with c3:
    self_attn = st.checkbox("Span also attends within itself (+C_quad k² + 2Lkd²)", key="lc_selfattn")
    st.caption(fm0.note)

fm = Fl.FlopModel(L=L, d=d, r=r)
exact = fm.matched_thinking_tokens(N, k, T_ctx, self_attn)
approx = Fl.approx_thinking_tokens(N, k)
m1, m2, m3, m4 = st.columns(4)
m1.metric("Thinking tokens, exact root", f"{exact:,.0f}")
m2.metric("Approximation 2Nk", f"{approx:,.0f}", delta=f"{(approx - exact) / exact:+.1%} vs exact")
m3.metric("One qTTT step G(k; T)", f"{fm.qttt_step(k, T_ctx, self_attn):.3e} FLOP")
m4.metric("Prefill F_prefill(T)", f"{fm.prefill(T_ctx):.3e} FLOP")
st.caption(f"C_quad = 2Ld = {fm.c_quad:.4g}, C_tok = (4 + 2r)Ld² = {fm.c_tok:.4g}. Sanity check from the paper "
           f"(App. C): L = 32, d = 4096, r = 4, T = 10⁵ — N = 10, k = 400 matches ≈ 8,000 thinking tokens "
           f"(exact root {Fl.FlopModel(32, 4096, 4).matched_thinking_tokens(10, 400, 1e5):,.0f}); the experiments' "
           f"default (k, N) = (128, 32) ↔ 8,192 = 2Nk (exact root "
           f"{Fl.FlopModel(32, 4096, 4).matched_thinking_tokens(32, 128, 1e5):,.0f}).")
T_values = np.unique(np.geomspace(max(2 * k, 16), max(10 * T_ctx, 4 * k), 80).round())
st.plotly_chart(fig := figs.flops_figure(fm, N, k, T_values, T_mark=T_ctx), key="lc_fig_flops")
figure_downloads(fig, "lc_fig_flops", lm)
how_to_read(r"C_{quad}\Big(T_{think}T+\tfrac{T_{think}(T_{think}-1)}{2}\Big)+C_{tok}T_{think}=N\cdot2\big(C_{quad}kT+(2+2r)Lkd^2\big)",
            "The number of thinking tokens (decoding with a KV cache after a T-token context) whose FLOPs equal N qTTT "
            "steps of span k against the frozen cache: the exact positive root of the quadratic, and the paper's "
            "approximation 2Nk (valid for T ≫ d and k ≪ T).",
            good="the exact curve meets 2Nk at long contexts", bad="at short contexts (T ≲ d) the MLP terms dominate "
            "and 2Nk is far off", section="§8")

with st.expander("Measured seconds on this machine"):
    st.markdown("Times N engine qTTT steps of span k against the frozen cache of a needle-in-a-haystack context, and "
                "greedy decoding of T_think tokens after the same context (prefill timed separately). Small values "
                "keep it quick on a CPU.")
    a, b, c = st.columns(3)
    T_meas = int(a.number_input("Context tokens", min_value=32, max_value=8192, value=400, step=32, key="lc_mT"))
    N_meas = int(b.number_input("qTTT steps", min_value=1, max_value=64, value=4, key="lc_mN"))
    k_meas = int(c.number_input("Span", min_value=4, max_value=1024, value=32, key="lc_mk"))
    think = int(round(Fl.FlopModel.from_model(lm).matched_thinking_tokens(N_meas, k_meas, T_meas)))
    think = int(st.number_input("Thinking tokens to generate (default: the FLOP-matched budget)", min_value=1,
                                max_value=4096, value=max(1, min(think, 4096)), key="lc_mthink"))
    if st.button("Time both", key="lc_time"):
        with st.spinner("Timing…"):
            SS["lc_timing"] = Fl.measure_seconds(lm, T_meas, N_meas, k_meas, think)
    tm = SS.get("lc_timing")
    if tm:
        st.dataframe([tm], hide_index=True, width="stretch")
        ratio = tm["generation_seconds"] / max(tm["qttt_seconds"], 1e-12)
        st.markdown(f"Measured: {tm['qttt_steps']} qTTT steps (span {tm['span']}) took **{tm['qttt_seconds']:.2f} s**; "
                    f"{tm['thinking_tokens']} greedy tokens took **{tm['generation_seconds']:.2f} s** "
                    f"(ratio {ratio:.2f}; FLOP accounting predicts ≈ 1 for the matched budget). Decoding one token at a "
                    "time is latency-bound on a CPU, so wall-clock parity differs from FLOP parity.")
