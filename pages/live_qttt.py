"""Live qTTT: run query-only TTT (or the paper's LOO gradient descent) on the sidebar's prompt and
watch every step. UI only: the engine is ttt_core.qttt, the figures ttt_core.figures.qttt."""

from __future__ import annotations

from typing import Any

import streamlit as st

from pages.common import get_model, get_prompt, how_to_read, page_header
from pages.downloads import figure_downloads, qttt_runs_section, slot_chart
from ttt_core.figures.qttt import (
    delta_heatmap,
    label_distribution_figure,
    loss_figure,
    needle_figure,
    quality_figure,
    step_time_figure,
)
from ttt_core.paper_gd import PaperConfig
from ttt_core.prompts import FewShotPrompt
from ttt_core.qttt import DEFAULT_LR, PAPER_LR_RANGE, QTTTConfig, kernel_backend
from ttt_core.runs import make_run
from ttt_core.scores import HeadScores
from ttt_core.types import block_label, parse_block_label

SS = st.session_state
RESULT = "qttt_result"  # this session's run: settings, records (dicts), answers, status
RUN_OBJ = "qttt_run_obj"  # the engine object (holds this session's deltas; the model is shared)
LRS = [1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2]


def session_head_scores(kind: str, n_layers: int, n_heads: int) -> dict[tuple[int, int], float]:
    """This session's scores from the Heads & blocks page (a `HeadScores`), for `kind`'s heads."""
    hs = SS.get("head_scores")
    return hs.for_kind(kind, n_layers, n_heads) if isinstance(hs, HeadScores) else {}


def _reset() -> None:
    SS.pop(RESULT, None)
    run = SS.pop(RUN_OBJ, None)
    if run is not None:
        run.request_stop()


def _stop() -> None:
    run = SS.get(RUN_OBJ)
    if run is not None:
        run.request_stop()  # programmatic stop flag; the click's rerun also interrupts the loop
    res = SS.get(RESULT)
    if res and res.get("status") == "running":
        n = max(0, len(res["records"]) - 1)
        res["status"], res["reason"] = "stopped", f"stopped by you after {n} step(s)"


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


# ------------------------------------------------------------------------------------------ page
page_header("Live qTTT",
            "What happens to the loss, the answer and the attention, step by step, when this prompt "
            "adapts the model's query projections at test time?")

lm = get_model()
prompt = get_prompt(lm) if lm is not None else None
if lm is None or prompt is None:
    st.info("Choose a model and a prompt in the sidebar.")
    st.stop()

a = lm.adapter
few_shot = isinstance(prompt, FewShotPrompt)

top = st.columns([3, 2])
with top[0]:
    modes = ["qTTT", "Paper mode (LOO gradient descent)"] if few_shot else ["qTTT"]
    if SS.get("qttt_mode") not in modes:
        SS["qttt_mode"] = "qTTT"
    mode_label = st.radio("Mode", modes, key="qttt_mode", bind="query-params", horizontal=True)
    if not few_shot:
        st.caption("Paper mode needs a few-shot prompt (x -> y lines): its loss is the leave-one-out squared "
                   "error of the demonstrations (DESIGN §7.1). This prompt is a long context, so only qTTT runs.")
mode = "paper" if mode_label.startswith("Paper") else "qttt"
with top[1]:
    last = SS.get(RESULT)
    if last and last["settings"].get("mode") == mode and last["records"]:
        badge = last["records"][-1]["backend_label"]  # what this session's run actually used
    else:
        badge = kernel_backend(lm.device)[1] if mode == "qttt" else "PyTorch SDPA (paper mode, no frozen cache)"
    st.badge(f"Kernel: {badge}", icon=":material/memory:", color="blue")
if mode == "qttt":
    st.caption("qTTT (DESIGN §7.2): one prefill caches every layer's keys/values; each step samples a span of k "
               "tokens and updates only W_Q with AdamW (wd 0.01 on W0+ΔW, clip 1.0) on the span's summed "
               "next-token NLL. The span tokens' keys/values are the frozen prefill ones (DESIGN §2).")
else:
    st.caption("Paper mode (DESIGN §3): plain gradient descent Δ ← Δ + ρ Σᵢ rᵢ ∇sᵢ on the leave-one-out squared "
               "loss ‖r‖²/(2σ̂²), with ρ = c/λ_max of the selected blocks' kernel and σ̂² = ‖r₀‖²/n.")

kind = "q" if mode == "qttt" else None
c1, c2, c3, c4 = st.columns(4)
if mode == "qttt":
    steps = c1.number_input("Steps N", 1, 256, 32, key="qttt_steps", bind="query-params")
    span = c2.number_input("Span length k", 2, 4096, 128, step=16, key="qttt_span", bind="query-params",
                           help="Clamped to the context length − 1.")
    lr = c3.select_slider("Learning rate", LRS, value=DEFAULT_LR, key="qttt_lr", bind="query-params", format_func=lambda v: f"{v:.0e}",
                          help=f"The paper's range is {PAPER_LR_RANGE[0]:.0e}…{PAPER_LR_RANGE[1]:.0e} for billion-scale "
                               f"models; the default {DEFAULT_LR:.0e} was measured on SmolLM2-135M.")
    track_ctx = st.checkbox("Also track the whole-context NLL (one extra frozen-cache forward of the context per step)",
                            value=False, key="qttt_ctx_nll", bind="query-params")
else:
    steps = c1.number_input("Steps T", 1, 64, 8, key="paper_steps", bind="query-params")
    c_val = c2.number_input("c (ρ = c/λ_max)", 0.001, 1.9, 0.1, step=0.05, format="%.3f", key="paper_c", bind="query-params",
                            help="c < 1 keeps every filter g_T(λ) in [0, 1) (DESIGN §3); GD converges for c < 2.")
    kind_label = c3.radio("Projection", ["V (the paper)", "Q"], key="paper_kind", bind="query-params", horizontal=True)
    kind = "v" if kind_label.startswith("V") else "q"
seed = c4.number_input("Seed", 0, 10_000, 0, key="qttt_seed", bind="query-params") if mode == "qttt" else 0

# ---------------------------------------------------------------- head selection
n_heads = a.heads_of(kind)
scores = session_head_scores(kind, a.n_layers, n_heads)
sel_modes = ["All heads", "Top-k by head scores", "Manual"]
h1, h2 = st.columns([1, 2])
sel = h1.radio("Heads to update", sel_modes, key="qttt_head_mode", bind="query-params")
heads: list[tuple[int, int]] | None = None
if sel == "Top-k by head scores":
    if not scores:
        h2.info("No head scores for this projection yet: open **Heads & blocks**, compute the scores, and come back "
                "(they are kept in this session). Until then all heads are updated.")
    else:
        k_top = h2.slider("k", 1, len(scores), min(8, len(scores)), key="qttt_topk", bind="query-params")
        heads = SS["head_scores"].top_k(k_top)
        h2.caption("Selected: " + ", ".join(block_label(*hk, kind) for hk in heads))
elif sel == "Manual":
    options = [block_label(layer, h, kind) for layer in range(a.n_layers) for h in range(n_heads)]
    chosen = h2.multiselect(f"{kind.upper()} heads", options, key=f"qttt_manual_{kind}", bind="query-params",
                            help="Only these heads' rows of the projection get updates.")
    heads = [parse_block_label(s)[:2] for s in chosen] if chosen else []
    if not chosen:
        h2.warning("Choose at least one head.")

b1, b2, b3, _ = st.columns([1, 1, 1, 3])
run_clicked = b1.button("Run", type="primary", key="qttt_run", disabled=(heads == []))
b2.button("Stop", key="qttt_stop", on_click=_stop)
b3.button("Reset", key="qttt_reset", on_click=_reset,
          help="Forget this session's run. The shared model was never changed (runs keep their own deltas).")

status_slot = st.empty()
progress_slot = st.empty()
answer_slot = st.container()
g1, g2 = st.columns(2)
with g1:
    loss_slot = st.empty()
    how_to_read(r"\mathcal L_t=-\sum_{i=s}^{s+k-1}\log p_{W_Q+\Delta}(x_{i+1}\mid \text{frozen }K,V)"
                if mode == "qttt" else r"L(\theta)=\frac{\|r(\theta)\|^2}{2\hat\sigma^2},\quad r_i=v(y_i)-s_i(\theta)",
                "qTTT: the summed next-token NLL of each step's randomly drawn span, divided by k, measured before "
                "that step's update; the dashed line is the unadapted model's mean over the whole context. "
                "Paper mode: the leave-one-out loss (n/2 before any update).",
                "a noisy but falling curve (spans differ from step to step).",
                "a curve climbing away from the dashed line: the learning rate is too large.",
                "§7.2" if mode == "qttt" else "§3")
with g2:
    quality_slot = st.empty()
    how_to_read(r"(s_x-v(y_x))^2,\qquad s_x=\sum_y v(y)\,\mathrm{softmax}(\ell_{\text{labels}})_y"
                if few_shot else r"P(\text{answer})=\prod_j p_{W_Q+\Delta}(a_j\mid \text{context},\text{question},a_{<j})",
                "The error that matters: for a few-shot prompt the squared error of the expected label value at the "
                "query (needs '# answer: y'); for a long context the probability of the expected answer after the "
                "question, computed against the frozen cache of the full text with the adapted W_Q.",
                "the error falls (or the probability rises) while the loss falls.",
                "the loss falls but the error rises: the update fits the context without helping the query.",
                "§7")
g3, g4 = st.columns(2)
with g3:
    delta_slot = st.empty()
    how_to_read(r"\|\Delta W^{(\ell)}\|_F", "How far each layer's W_Q (paper mode: the chosen projection) has moved "
                "from the pretrained weights after each step; rows are layers, columns steps.",
                "smooth growth spread over the layers that matter.",
                "one layer exploding, or every layer still at 0 (learning rate too small).", "§7.2")
with g4:
    needle_slot = st.empty()
    how_to_read(r"\frac{1}{LH}\sum_{\ell,h}\sum_{j\in\text{needle}}\alpha^{(\ell,h)}_{\text{answer},j}",
                "Attention mass from the position that predicts the answer onto the marked needle's tokens, "
                "averaged over layers and heads (shown only when a needle is marked with <needle>…</needle>).",
                "the mass grows: the adapted queries find the needle (score dilution undone, DESIGN §8).",
                "flat or falling mass while the loss falls.", "§8")
time_slot = st.empty()
how_to_read(None, "Wall-clock seconds of each step: the backward pass and AdamW, and one forward after the update that "
            "gives the metrics and, in the same pass, the next step's span loss (so no pass is run twice).",
            "flat bars; on a 2-core CPU about 1.5 s per step for SmolLM2 at k = 128 and 1,024 tokens (bench/qttt_step.py).",
            "growing bars (memory pressure) or metrics dominating the update.", "§8")


def draw(res: dict[str, Any]) -> None:
    """Fill the placeholders from a result dict (used while running and on every rerun)."""
    recs = res["records"]
    n = len(recs)
    total = res["settings"]["steps"]
    done = max(0, n - 1)
    progress_slot.progress(min(1.0, done / max(1, total)), text=f"{done} / {total} steps")
    if res["status"] == "diverged":
        status_slot.warning(f"The updates diverged: {res['reason']}")
    elif res["status"] == "stopped":
        status_slot.info(res["reason"] or "Stopped.")
    elif res["status"] == "done":
        status_slot.success(f"Finished {done} steps in {recs[-1]['elapsed_s']:.1f} s "
                            f"({res['settings']['mode']}, kernel: {recs[-1]['backend_label']}).")
    elif res["status"] == "running":
        status_slot.info(f"Running… step {done} of {total}")
    if not recs:
        return
    slot_chart(loss_slot, loss_figure(recs), f"qttt_loss_fig_{n}", "qttt_loss", res, lm, prompt)
    qf = quality_figure(recs)
    if qf is not None:
        slot_chart(quality_slot, qf, f"qttt_quality_fig_{n}", "qttt_quality", res, lm, prompt)
    else:
        quality_slot.caption("This prompt has no query label and no expected answer: nothing to score. Add "
                             "'# answer: y' (few-shot) or 'Answer: …' (long context).")
    slot_chart(delta_slot, delta_heatmap(recs), f"qttt_delta_fig_{n}", "qttt_delta", res, lm, prompt)
    nf = needle_figure(recs)
    if nf is not None:
        slot_chart(needle_slot, nf, f"qttt_needle_fig_{n}", "qttt_needle", res, lm, prompt)
    else:
        needle_slot.caption("No needle marked: wrap the fact in <needle>…</needle> to see the needle attention mass.")
    if n > 1:
        slot_chart(time_slot, step_time_figure(recs), f"qttt_time_fig_{n}", "qttt_time", res, lm, prompt)


def draw_answers(res: dict[str, Any]) -> None:
    with answer_slot:
        cols = st.columns(2)
        before, after = res.get("answer_before"), res.get("answer_after")
        cols[0].markdown(f"**Answer before adaptation:** `{before}`" if before is not None else "")
        if after is not None:
            cols[1].markdown(f"**Answer after adaptation:** `{after}`")
        elif res["status"] in ("stopped", "diverged") and SS.get(RUN_OBJ) is not None:
            if cols[1].button("Generate with the adapted weights so far", key="qttt_gen_after"):
                res["answer_after"] = SS[RUN_OBJ].generate(adapted=True)
                res["labels_after"] = SS[RUN_OBJ].label_distribution(adapted=True)
                cols[1].markdown(f"**Answer after adaptation:** `{res['answer_after']}`")
        if res.get("labels_before"):
            st.plotly_chart(fig := label_distribution_figure(res["labels_before"], res.get("labels_after"),
                                                             res.get("true_label")), key="qttt_labels_fig")
            if res["status"] != "running":
                figure_downloads(fig, "qttt_labels", lm, prompt, settings=res["settings"])
            how_to_read(r"p_y=\mathrm{softmax}(\ell_{\text{label tokens}})_y",
                        "The model's distribution over the label set at the query, restricted to the label tokens, "
                        "before and after adaptation.", "mass moves to the true label.",
                        "mass moves away from it.", "§7.1")
        if res.get("answer_expected"):
            st.caption(f"Expected answer: `{res['answer_expected']}`")


if run_clicked:
    settings = dict(mode=mode, steps=int(steps), heads=heads)
    if mode == "qttt":
        settings.update(span=int(span), lr=float(lr), seed=int(seed))
        config: Any = QTTTConfig(steps=int(steps), span=int(span), lr=float(lr), seed=int(seed), heads=heads,
                                 eval_context_nll=bool(track_ctx))
    else:
        settings.update(c=float(c_val), kind=kind)
        config = PaperConfig(steps=int(steps), c=float(c_val), kind=kind, heads=heads)
    res = {"settings": settings, "records": [], "status": "running", "reason": None,
           "true_label": prompt.query_y if few_shot else None,
           "answer_expected": None if few_shot else prompt.answer}
    SS[RESULT] = res
    try:
        run = make_run(lm, prompt, mode, config)
        SS[RUN_OBJ] = run
        with st.spinner("Prefill and the unadapted answer…"):
            base = run.prepare()
            res["answer_before"] = run.generate(adapted=False)
            res["labels_before"] = run.label_distribution(adapted=False)
        if mode == "paper":
            res["settings"].update(rho=run.rho, lambda_max=run.lambda_max, rho_source=run.rho_source)
        res["records"].append(base.to_dict())
        draw_answers(res)
        draw(res)
        for rec in run.steps():
            res["records"].append(rec.to_dict())
            draw(res)
        res["status"], res["reason"] = run.status, run.reason
        if run.status in ("done", "diverged"):
            res["answer_after"] = run.generate(adapted=True)
            res["labels_after"] = run.label_distribution(adapted=True)
        st.rerun()  # redraw everything once from the stored result (answers, final status)
    except Exception as exc:  # noqa: BLE001 — the app stays up; Streamlit's rerun/stop are BaseExceptions
        res["status"] = "error"
        if _is_oom(exc):
            res["reason"] = ("Out of memory: " + str(exc).splitlines()[0] + " — shorten the context (sidebar token "
                             "limit), the span length k, or choose a smaller model.")
        else:
            res["reason"] = f"{type(exc).__name__}: {exc}"

res = SS.get(RESULT)
if res is None:
    status_slot.caption("Press **Run** to adapt. Nothing is changed in the shared model: each run keeps its own "
                        "weight deltas.")
else:
    if res["status"] == "running":  # interrupted by a rerun we did not ask for (e.g. another widget)
        res["status"] = "stopped"
        res["reason"] = f"interrupted after {max(0, len(res['records']) - 1)} step(s)"
    if res["status"] == "error":
        st.error(f"The run failed: {res['reason']}")
    if res["settings"].get("mode") == "paper" and "rho" in res["settings"]:
        s = res["settings"]
        st.caption(f"ρ = {s['rho']:.3g} (λ_max = {s['lambda_max']:.3g} from the {s['rho_source']}, c = {s['c']}).")
    draw_answers(res)
    draw(res)

# ---------------------------------------------------------------- runs you can keep (issue 11.5)
qttt_runs_section(lm, prompt, SS.get(RESULT))
