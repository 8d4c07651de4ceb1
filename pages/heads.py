"""Heads & blocks page: Query-Aware, Trace and greedy scores for every head or block of the chosen
subspace, a ranked recommendation and a drill-down into one head (DESIGN §6). UI only."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from pages.common import get_model, get_prompt, how_to_read, page_header, posterior_flag
from pages.downloads import diagnosis_section, figure_downloads
from pages.links import url_choice
from pages.state import cached_prompt_kernel, cached_result, kernel_key
from ttt_core.figures import heads as figs
from ttt_core.figures.score_check import score_check_figure
from ttt_core.prompt_kernel import PAGE_SUBSPACES, PromptKernelError, attention_pattern, is_per_layer, subspace_label
from ttt_core.prompts import LongContextPrompt
from ttt_core.score_check import DEFAULT_C as CHECK_C
from ttt_core.score_check import check_scores
from ttt_core.scores import GREEDY_C, GREEDY_T, HeadScores, score_blocks
from ttt_core.spectrum import compute_spectrum

page_header("Heads & blocks",
            "Which heads or blocks should test-time training update for this prompt and its query?")

lm = get_model()
prompt = get_prompt(lm) if lm is not None else None
if lm is None or prompt is None:
    st.stop()

long = isinstance(prompt, LongContextPrompt)
c1, c2, c3 = st.columns(3)
subspace = c1.selectbox("Update subspace", list(PAGE_SUBSPACES), format_func=lambda k: PAGE_SUBSPACES[k], key="heads_subspace", bind="query-params")
max_pos = c2.number_input("Max positions", min_value=8, max_value=2048, value=256, step=8, key="heads_maxpos", bind="query-params",
                          disabled=not long)
# The greedy rule's horizon T and step fraction c (ρ = c/λ_max of the candidate kernel): one pair of
# variables feeds both score_blocks below and the help text, so the text names what actually runs.
greedy_T, greedy_c = GREEDY_T, GREEDY_C
budget = c3.number_input("Greedy Query-Aware budget", min_value=0, max_value=64, value=4, step=1, key="heads_budget", bind="query-params",
                         help=f"Blocks picked one at a time by the paper's greedy rule, with T = {greedy_T} steps and "
                              f"step fraction c = {greedy_c:g} (ρ = c/λ_max of each candidate's kernel). 0 = off. "
                              f"Costs one λ_max and {greedy_T} kernel mat-vecs per candidate per pick.")
if long and subspace != "q":
    st.warning(f"{subspace_label(subspace)} on a long context uses the exact per-output route (one backward per 8 outputs); "
               "lower 'Max positions' if this is slow.")

bar = st.progress(0.0, text="Computing prompt evidence…")
try:
    with st.spinner(f"Per-head kernels of {subspace_label(subspace)} on {lm.name}…"):
        ev = cached_prompt_kernel(st.session_state, lm, prompt, subspace, max_positions=int(max_pos),
                                  progress=lambda f, t: bar.progress(f, text=t))
    bar.progress(1.0, text="Scoring every block…")
    scores = cached_result(st.session_state, lm, prompt, subspace, "scores", (int(budget),),
                           lambda: score_blocks(ev, greedy_budget=int(budget), greedy_T=greedy_T, greedy_c=greedy_c),
                           max_positions=int(max_pos))
except PromptKernelError as exc:
    bar.empty()
    st.error(str(exc))
    st.stop()
bar.empty()

word = "block" if is_per_layer(subspace) else ("kv head" if subspace in ("k", "v") else "head")
st.caption(f"{ev.n_layers} layers × {ev.n_blocks_per_layer} {word}(s) = {len(ev.blocks())} blocks; n = {ev.n} supervised "
           f"outputs; ridge λ⋆ = {scores.ridge:.3g} ({scores.ridge_source}). Route: {ev.route}."
           + (f" {ev.query_note}" if ev.query_note else "") + (f" {scores.greedy_note}" if scores.greedy_note else ""))

posterior_flag(None if scores.posterior is None else scores.posterior.flag_text)

labels = [ev.block_label(b) for b in ev.blocks()]
if "heads_pick" not in st.session_state or st.session_state["heads_pick"] not in labels:
    st.session_state["heads_pick"] = url_choice("heads_pick", labels) or labels[0]  # a link's pick, else the first
last_clicks = st.session_state.setdefault("_heads_last_click", {})

# ------------------------------------------------------------------ heatmaps (click a cell to drill down)
available = scores.available()


def _clicked_cell(event: Any) -> tuple[int, int] | None:
    """(layer, block) of the first selected point of a heatmap's selection state, if any."""
    pts = []
    try:
        pts = list(event.selection.points) if event is not None else []
    except AttributeError:
        pts = list((event or {}).get("selection", {}).get("points", []))
    if not pts:
        return None
    return int(round(float(pts[0]["y"]))), int(round(float(pts[0]["x"])))


# A click reruns the page with the chart's selection already in session_state: apply it before
# drawing, so the heatmaps' highlight and the drill-down show the clicked block in the same run.
for name in available:
    key = f"heads_heat_{name}"
    click = _clicked_cell(st.session_state.get(key))
    if (click is not None and last_clicks.get(key) != click
            and 0 <= click[0] < ev.n_layers and 0 <= click[1] < ev.n_blocks_per_layer):
        last_clicks[key] = click
        st.session_state["heads_pick"] = ev.block_label(click)
selected = ev.blocks()[labels.index(st.session_state["heads_pick"])]
HELP = {
    "Query-Aware": (r"s_b = k_x^{(b)\top}(K_{\mathrm{full}}+\sigma^2 I)^{-1}k_x^{(b)}",
                    "How much of the query's correction block b can capture, discounted for what the other blocks "
                    "already explain (redundancy-aware; Σ = I)."),
    "Trace": (r"s_b = \mathrm{tr}\big(K^{(b)}(K_{\mathrm{full}}+\sigma^2 I)^{-1}\big)",
              "How much prompt signal block b captures, ignoring the query (query-marginal)."),
    "Kernel share": (r"\mathrm{tr}(K^{(b)})/\mathrm{tr}(K)", "Block b's share of the full kernel's trace."),
    "Greedy rank": (r"\arg\max_b h_b^2,\ h_b = k_x^\top Q_T(K_{\mathrm{curr}}+K^{(b)})\,r,\ Q_T(\lambda)=\frac{1-(1-\rho\lambda)^T}{\lambda}",
                    "Order in which the greedy rule of the paper's experiments adds blocks (1 = first pick; blank = not picked)."),
}
tabs = st.tabs(list(available))
for tab, (name, values) in zip(tabs, available.items()):
    with tab:
        key = f"heads_heat_{name}"
        st.plotly_chart(fig := figs.score_heatmap(values, name, word, selected), key=key,
                        on_select="rerun", selection_mode="points")
        figure_downloads(fig, key, lm, prompt)
        latex, what = HELP.get(name, (None, name))
        how_to_read(latex, what + " Click a cell to drill into that block.",
                    "a few bright cells: the score singles out a small set of blocks to update.",
                    "a uniform grid: no block stands out; the recommendation is close to random.", "§6")

# ------------------------------------------------------------------ ranked table
st.subheader("Ranked blocks")
r1, r2 = st.columns([2, 1])
rank_opts = list(available)
rank_by = r1.selectbox("Rank by", rank_opts, key="heads_rank_by", bind="query-params")
topk = r2.number_input("Recommend top-k", min_value=1, max_value=len(labels), value=min(4, len(labels)), step=1,
                       key="heads_topk", bind="query-params")
rows = scores.ranked(rank_by)
st.dataframe(pd.DataFrame(rows), hide_index=True, key="heads_table")
picked = [r["block"] for r in rows[:int(topk)]]
st.success(f"Recommended {len(picked)} block(s) by {rank_by}: " + ", ".join(picked))
# Publish this session's scores for Live qTTT's "Top-k by head scores" selection (per session only).
st.session_state["head_scores"] = HeadScores.from_scores(scores, subspace, rank_by)
if subspace == "q":
    st.caption("Live qTTT can now update exactly these top-ranked W_Q heads ('Top-k by head scores').")

# ------------------------------------------------------------------ drill-down
st.subheader("Drill-down")
pick = st.selectbox("Block", labels, key="heads_pick", bind="query-params")
layer, head = ev.blocks()[labels.index(pick)]
Kb = ev.head_kernel(layer, head)
kx = None if ev.head_couplings is None else ev.head_couplings[layer, head]
rep = cached_result(st.session_state, lm, prompt, subspace, "block_spectrum", (layer, head),
                    lambda: compute_spectrum(Kb, ev.residuals, kx, label=pick), max_positions=int(max_pos))
d = st.columns(4)
d[0].metric("Share tr(K⁽ᵇ⁾)/tr(K)", f"{scores.share[layer, head]:.3%}")
d[1].metric("Query-Aware", "—" if scores.query_aware is None else f"{scores.query_aware[layer, head]:.3g}")
d[2].metric("Trace", f"{scores.trace[layer, head]:.3g}")
d[3].metric("Effective rank", f"{rep.eff_rank_entropy:.1f}")

st.plotly_chart(fig := figs.head_spectrum_figure(rep.lam, pick), key="heads_block_spectrum")
figure_downloads(fig, "heads_block_spectrum", lm, prompt)
how_to_read(r"K^{(b)} = (AA^\top)\odot(B_bB_b^\top) = U_b\,\mathrm{diag}(\lambda_i)\,U_b^\top",
            "Eigenvalues of this block's own kernel (factorised: input Gram ⊙ output-gradient Gram).",
            "a few large eigenvalues: the block moves the prompt outputs along a few clear directions.",
            "eigenvalues orders of magnitude below the full kernel's: updating this block barely moves the outputs.",
            "§2")

st.plotly_chart(fig := figs.share_figure(scores.share[layer], layer, head, word), key="heads_share")
figure_downloads(fig, "heads_share", lm, prompt)
how_to_read(r"\mathrm{tr}(K^{(b)})/\mathrm{tr}(K)", "This layer's blocks' shares of the full kernel's trace; the "
            "selected block in vermillion.", None, None, "§2, §6")

if is_per_layer(subspace):
    st.info("MLP blocks have no attention pattern.")
else:
    qhead = head * (lm.adapter.n_heads // lm.adapter.n_kv_heads) if subspace in ("k", "v") else head
    P, toks = attention_pattern(lm, ev, layer, qhead)
    note = f" (query head {qhead}, the first that reads kv head {head})" if subspace in ("k", "v") else ""
    st.plotly_chart(fig := figs.attention_figure(P, toks, f"layer {layer} head {qhead}{note}"), key="heads_attention")
    figure_downloads(fig, "heads_attention", lm, prompt)
    how_to_read(r"\alpha_{ks} = \mathrm{softmax}_s\big(q_k^\top k_s/\sqrt{d}\big)",
                "Attention probabilities of this head on the prompt (last 96 tokens; rows attend to columns).",
                "attention on the tokens that decide the answer (labels, the needle).",
                "attention stuck on the first token or on the diagonal.", "§2")

# ------------------------------------------------------------------ check against real TTT (DESIGN §6, §10)
st.subheader("Check these scores")
st.caption("Adapts the top-k blocks of a score, its bottom-k and random k-subsets with real TTT (paper GD on a "
           f"few-shot prompt with ρ = c/λ_max of each subset's kernel, c = {CHECK_C:g}; qTTT on a long context) and "
           "compares the measured change of the query error with the kernel's linearised prediction.")
check_opts = [name for name in available if name != "Greedy rank"]
k1, k2, k3, k4 = st.columns(4)
check_score = k1.selectbox("Score to check", check_opts, key="heads_check_score",
                           index=check_opts.index(rank_by) if rank_by in check_opts else 0)
check_k = k2.number_input("Blocks per subset k", min_value=1, max_value=len(labels), value=min(3, len(labels)),
                          step=1, key="heads_check_k")
check_steps = k3.number_input("TTT steps", min_value=1, max_value=64, value=4, step=1, key="heads_check_steps")
check_random = k4.number_input("Random subsets", min_value=0, max_value=50, value=5, step=1, key="heads_check_random")
# One result per (model, prompt, subspace, settings) in this session: another prompt never shows a stale check.
check_key = kernel_key(lm, prompt, subspace, int(max_pos)) + ("score_check", check_score, int(check_k),
                                                               int(check_steps), int(check_random))
checks = st.session_state.setdefault("_heads_score_checks", {})
if st.button("Check these scores", key="heads_check_run",
             help=f"{2 + int(check_random)} TTT runs of {int(check_steps)} steps each."):
    check_bar = st.progress(0.0, text="Adapting the top-k blocks…")
    try:
        result = check_scores(lm, prompt, ev, scores, k=int(check_k), steps=int(check_steps), c=CHECK_C,
                              random_subsets=int(check_random), score=check_score,
                              progress=lambda f, t: check_bar.progress(min(max(f, 0.0), 1.0), text=t))
    except ValueError as exc:
        check_bar.empty()
        st.error(str(exc))
    else:
        check_bar.empty()
        checks.pop(check_key, None)
        checks[check_key] = result
        while len(checks) > 4:
            checks.pop(next(iter(checks)))
chk = checks.get(check_key)
if chk is None:
    st.caption("Not run yet for this prompt, subspace and settings.")
elif not chk.possible:
    st.warning(chk.note)
else:
    st.plotly_chart(fig := score_check_figure(chk), key="heads_check_fig")
    figure_downloads(fig, "heads_check_fig", lm, prompt)
    st.dataframe(pd.DataFrame(chk.table_rows()), hide_index=True, key="heads_check_table")
    (st.success if chk.top_beats_random and chk.top_beats_bottom else st.info)(chk.summary)
    how_to_read(r"\Delta_S = e_{T}(S) - e_0,\quad \hat\Delta_S = e^{\mathrm{lin}}_T(K_S, k_{x,S}) - e_0",
                "Each point is one adapted k-subset S: the measured change of the query error after T steps of real "
                "TTT on exactly those blocks (y) against the kernel's linearised prediction of that change (x). "
                "Negative = the error went down. On a long context the measured axis is qTTT's answer-NLL change and "
                "the linearised one the change of 1 − p: different scales, so compare ranks.",
                "the top-k point lowest, the bottom-k highest, and the points ordered along y = x (high Spearman).",
                "the top-k among or above the random subsets: the score does not predict what TTT does here.",
                "§6, §10")

# ------------------------------------------------------------------ the whole diagnosis (issue 11)
diagnosis_section(lm, prompt, "heads", subspace=subspace, max_positions=int(max_pos), top_k=int(topk))
