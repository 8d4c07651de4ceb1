"""Targets page: which parameters and which signal should TTT touch on this prompt, and at what
cost (DESIGN §11; issue 12). One row per target × signal, the measured query error against steps
and against FLOPs, the winner and how sure, and the suite beside it. UI only: the computation is
`ttt_core.targets.compare_targets`, the figures `ttt_core.figures.targets`."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from pages.common import get_model, get_prompt, how_to_read, page_header, provenance_text, recheck_text
from pages.downloads import figure_downloads, table_download
from ttt_core.experiments.targets_suite import FAMILY_LABELS, all_summaries, is_published, suite_label
from ttt_core.figures import targets as figs
from ttt_core.qttt import DEFAULT_LR
from ttt_core.targets import DEFAULT_TARGETS, SIGNALS, compare_targets, describe
from ttt_core.targets.report import comparison_markdown

RESULT_KEY = "_tgt_results"

page_header("Targets", "Which parameters should test-time training touch on this prompt — W_Q, W_K, W_V, W_O, "
                       "the MLP, LoRA or norm gains — with which signal, and at what cost?")

lm = get_model()
prompt = get_prompt(lm) if lm is not None else None
if lm is None or prompt is None:
    st.stop()

avail = {r["target"]: r for r in describe(lm, list(DEFAULT_TARGETS) + ["norm_attn_bias", "norm_mlp_bias", "lora:q:4",
                                                                      "lora:q:16", "lora:o:8", "lora:mlp_down:8"])}
options = [t for t, r in avail.items() if r["available"]]
c1, c2 = st.columns([3, 2])
targets = c1.multiselect("Targets", options, default=[t for t in DEFAULT_TARGETS if t in options], key="tgt_targets",
                         format_func=lambda t: f"{t} — {avail[t]['label']}")
signals = c2.multiselect("Signals", list(SIGNALS), default=["nll"], key="tgt_signals",
                         format_func=lambda s: f"{s} — {SIGNALS[s]}")
missing: dict[str, list[str]] = {}
for t, r in avail.items():
    if not r["available"]:
        missing.setdefault(str(r["why"]).rstrip("."), []).append(t)
if missing:   # one clause per reason: "norm_attn_bias, norm_mlp_bias — <why>"
    st.caption("Not on this model: " + "; ".join(f"{', '.join(ts)} — {why}" for why, ts in missing.items()) + ".")
c1, c2, c3, c4, c5 = st.columns(5)
steps = int(c1.number_input("Steps (same for all)", 1, 64, 8, key="tgt_steps"))
lr = float(c2.number_input("AdamW lr (same for all)", 1e-7, 1.0, DEFAULT_LR, format="%.1e", key="tgt_lr"))
span = int(c3.number_input("Span k (NLL)", 2, 2048, 128, key="tgt_span"))
seeds_text = c4.text_input("Seeds", "0, 1, 2", key="tgt_seeds",
                           help="Span starts and LoRA init. With ≥ 3 seeds the winner gets a paired CI.")
last = int(c5.number_input("Last layers (0 = all)", 0, 256, 0, key="tgt_last"))
KV_LABELS = {"auto": "qTTT for W_Q / LoRA q, full context for the rest",
             "frozen": "frozen for every target (qTTT-style; fast)"}
kv = st.radio("Keys and values during TTT", list(KV_LABELS), format_func=KV_LABELS.get, horizontal=True, key="tgt_kv",
              help="Frozen: every target is adapted with all keys and values held at the unadapted model's values "
                   "(qTTT's rule, now for W_O, MLP, norms and LoRA too), and its kernel is the kernel of that "
                   "update — one backward for all positions on a long prompt instead of one per position. "
                   "W_K and W_V make the keys and values, so their rows are marked unavailable there. Full "
                   "context: every target but W_Q / LoRA q changes the keys and values of later positions, as "
                   "in ordinary TTT; exact, and slow on long prompts.")
k1, k2 = st.columns([3, 2])
kernels = k1.checkbox("Kernel columns (effective rank, λ⋆, verdict, top blocks)", value=True, key="tgt_kernels")
positions = int(k2.number_input(
    "Kernel positions (long context)", 8, 2048, 64, step=8, key="tgt_positions", disabled=not kernels,
    help="The kernel keeps the last N supervised positions. W_Q and LoRA on q (and every target with frozen keys "
         "and values) take one backward for all of them; every other target takes one backward of the text per "
         "position (on 2 CPU cores about 0.4 s each for a 300-token text: 256 positions ≈ 2–3 min per target)."))
try:
    seeds = [int(s) for s in seeds_text.replace(" ", "").split(",") if s]
except ValueError:
    st.error("Seeds must be whole numbers separated by commas.")
    st.stop()

settings = (lm.name, prompt.to_text(), tuple(targets), tuple(signals), steps, lr, span, tuple(seeds), last, kernels,
            positions, kv)
store = st.session_state.setdefault(RESULT_KEY, {})
if st.button("Compare targets", key="tgt_run", icon=":material/compare_arrows:", type="primary",
             disabled=not targets or not signals):
    bar = st.progress(0.0, text="Starting…")
    try:
        cmp = compare_targets(lm, prompt, targets, signals, steps=steps, seeds=seeds or [0], lr=lr, span=span,
                              last_layers=last or None, kernels=kernels, max_positions=positions, kv=kv,
                              progress=lambda f, t: bar.progress(f, text=t))
    except Exception as exc:  # noqa: BLE001 — the page stays up
        bar.empty()
        st.error(f"The comparison failed: {type(exc).__name__}: {exc}")
        st.stop()
    bar.empty()
    store.clear()
    store[settings] = cmp.to_dict()
res = store.get(settings)

if res is None:
    st.info("Choose targets and signals, then press **Compare targets** (each target's kernel, then real TTT runs "
            "with the same optimiser and step budget for every target).")
else:
    st.success(res["sentence"])
    df = pd.DataFrame(res["table"])
    st.dataframe(df, hide_index=True, key="tgt_table")
    table_download(df, "tgt_table", lm, prompt)
    st.caption(f"Measured: {res['error_label']} after each step, mean over seeds. FLOPs: {res['flops_method']}. "
               f"Memory: {res['memory_method']}. Optimiser: {res['settings']['optimiser']}, lr {res['settings']['lr']:g}. "
               "Kernel columns are the squared-loss frame of the prompt kernel (DESIGN §7); for entropy signals they "
               "describe one step only (DESIGN §11). Keys and values during TTT: "
               + ("frozen for every target (qTTT-style updates, and the kernels of those updates)."
                  if res["settings"].get("kv") == "frozen" else
                  "frozen for W_Q and LoRA on q (qTTT), full context for every other target.")
               + (" On a few-shot prompt the kernel columns are the exact leave-one-out kernels of every target "
                  "(full context) in either mode." if res.get("prompt_kind") == "FewShotPrompt" else ""))
    fig = figs.error_vs_steps_figure(res)
    st.plotly_chart(fig, key="tgt_fig_steps")
    figure_downloads(fig, "tgt_fig_steps", lm, prompt)
    fig2 = figs.error_vs_flops_figure(res)
    st.plotly_chart(fig2, key="tgt_fig_flops")
    figure_downloads(fig2, "tgt_fig_flops", lm, prompt)
    how_to_read(None, "Each line is one target (colour) and signal (solid NLL, dashed entropy, dotted SyTTA): the "
                "measured query error after each real TTT step. The second chart puts the same points at the FLOPs "
                "the training steps cost, so a cheap target that reaches the same error sits to the left.",
                good="a line that drops below its start early and stays there", bad="lines that rise: adapting hurts",
                section="§11")
    st.download_button("Download the comparison (Markdown)", comparison_markdown(res), file_name="ttt_lens_targets.md",
                       mime="text/markdown", key="dl_tgt_md", on_click="ignore", icon=":material/download:")
    st.code("ttt-lens compare-targets prompt.txt --model " + lm.name + " --targets " + ",".join(targets)
            + " --signals " + ",".join(signals) + f" --steps {steps} --lr {lr:g} --span {span} --seeds "
            + ",".join(str(s) for s in seeds) + (f" --last-layers {last}" if last else "")
            + (f" --max-positions {positions}" if kernels else " --no-kernels")
            + (" --kv frozen" if kv == "frozen" else "") + " --json",
            language="bash")

st.subheader("Over many prompts: the suite")
suites = all_summaries()
if not suites:
    st.info("No targets suite found. Build one with `ttt-lens compare-targets --suite 50` (digit shift and needle "
            "prompts, cached per prompt and resumable).")
else:
    pick = 0
    if len(suites) > 1:
        labels = [suite_label(p, d) for p, d in suites]
        pick = st.selectbox("Suite", range(len(suites)), format_func=lambda i: labels[i], key="tgt_suite_pick",
                            help="Suites built on this machine come first, then the committed ones; newest first.")
    path, summary = suites[pick]
    n = summary.get("n_prompts", {})
    st_ = summary.get("settings", {})
    where = "the committed suite" if is_published(path) else "a suite built on this machine"
    kv_text = ("keys and values frozen for every target (qTTT-style), so W_K/W_V have no rows"
               if st_.get("kv") == "frozen" else "W_Q and LoRA-q as qTTT (frozen K/V), the rest on the full context")
    st.caption(f"**Saved result** ({where}): " + ", ".join(f"{FAMILY_LABELS.get(f, f)}: {k} prompts" for f, k in n.items())
               + f"; {len(st_.get('targets', []))} targets × signals {', '.join(st_.get('signals', []))}, "
               f"{st_.get('steps', '?')} steps, lr {st_.get('lr', '?')}, seeds {st_.get('seeds', '?')}; {kv_text}. "
               + provenance_text(summary.get("provenance"), model=st_.get("model"),
                                 created=(summary.get("provenance") or {}).get("created"), file=f"{path.parent.name}/{path.name}")
               + ". Each prompt record can be recomputed from these settings. " + recheck_text(path)
               + ("" if st_.get("model") in (None, lm.name) else f" It was made with {st_.get('model')}, not the model "
                  f"loaded now ({lm.name}): its numbers are about that model."))
    fig3 = figs.suite_figure(summary)
    st.plotly_chart(fig3, key="tgt_fig_suite")
    figure_downloads(fig3, "tgt_fig_suite", None, None, model=summary.get("settings", {}).get("model"))
    rows = [{"family": f, **{k: v for k, v in r.items() if k != "vs_reference"},
             "vs qTTT": None if r["vs_reference"] is None else r["vs_reference"]["verdict"]}
            for f, rs in summary.get("families", {}).items() for r in rs]
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="tgt_suite_table")
    check = summary.get("kernel_check")
    if check:
        st.markdown("**Did each target's kernel foresee its run?** For every prompt and target the kernel's verdict "
                    "(P(TTT beats ICL) at T_MAP over the λ⋆ posterior) is set against whether the measured "
                    f"{check.get('signal', 'nll')} run lowered the query error after {st_.get('steps', '?')} steps.")
        how_to_read(r"\mathrm{Brier} = \tfrac{1}{n}\sum_i \big(P_i - \mathbb{1}[\Delta_i < 0]\big)^2",
                    "P_i is the kernel's P(TTT beats ICL) on prompt i and Δ_i the measured error change of the same "
                    "target there. The kernel speaks of gradient descent in the kernel regime for T_MAP steps; the "
                    f"run is {st_.get('steps', '?')} AdamW steps at lr {st_.get('lr', '?')}, a different update, so "
                    "this measures how far the kernel's answer carries over to the real run, not whether the kernel "
                    "is computed right (that is tested against autograd). 'Brier (base rate)' is the score of always "
                    "saying the share that helped; balanced accuracy of P ≥ 0.5 is 0.5 by chance; firm verdicts are "
                    "the adapt / don't adapt ones only.",
                    good="Brier below its base rate, points near the diagonal of the reliability plot.",
                    bad="Brier at or above the base rate: on prompts like these the verdict tells you nothing the "
                        "share of helped prompts would not.", section="§4, §5.1")
        krow = [{"family": f, "target": t, "prompts": g["n"], "helped": g["helped"],
                 "Brier": g["brier"], "Brier (base rate)": g["brier_base_rate"],
                 "balanced accuracy": g["balanced_accuracy"],
                 "firm verdicts right": None if g["firm_agreement"] is None else f"{g['firm_agreement']:.0%} of {g['firm_n']}",
                 "adapt / don't / undetermined": f"{g['adapt']} / {g['dont_adapt']} / {g['undetermined']}",
                 "mean P(TTT beats ICL)": g["mean_prob"], "median eff. rank": g["effective_rank_median"],
                 "median λ⋆": g["lambda_star_median"], "median T_MAP": g["verdict_T_median"]}
                for f, by_t in check.get("families", {}).items() for t, g in by_t.items()]
        st.dataframe(pd.DataFrame(krow), hide_index=True, key="tgt_kernel_check_table")
        fig4 = figs.kernel_check_figure(check)
        st.plotly_chart(fig4, key="tgt_fig_kernel_check")
        figure_downloads(fig4, "tgt_fig_kernel_check", None, None, model=st_.get("model"))
