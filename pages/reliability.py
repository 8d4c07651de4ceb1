"""Reliability: is the diagnosis right? The calibration suite's saved result (issue 16; DESIGN
§10) — regret of every step rule against the oracle, the reliability of P(TTT beats ICL), head
choice against random heads, the learned controller on held-out prompts, the recommended rule per
prompt family — and a button for a small fresh run beside it. UI only: the suite is
ttt_core.experiments.calibration_suite, the numbers ttt_core.experiments.calibration_report, the
figures ttt_core.figures.reliability."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from pages.common import get_model, how_to_read, page_header, provenance_text, recheck_text, saved_calibration
from pages.downloads import figure_downloads, table_download
from ttt_core.experiments.calibration_report import POOLED, level_label, recommended_rule
from ttt_core.experiments.calibration_suite import (
    calibration_dir,
    published_calibration_dir,
    run_calibration,
    saved_calibrations,
)
from ttt_core.experiments.calibration_tasks import FAMILY_GROUPS, prompt_family, quick_settings
from ttt_core.experiments.stats import VERDICT_RULE
from ttt_core.figures import reliability as figs
from ttt_core.prompts import parse_prompt

page_header("Reliability",
            "Is the diagnosis right? How often do its step count, its adapt-or-not verdict and its top heads "
            "match what real TTT does on prompts like yours?")



def _sidebar_level(levels: list[str]) -> str:
    """The level of the family the sidebar's prompt resembles (POOLED when none fits)."""
    try:
        fam = prompt_family(parse_prompt(st.session_state.get("prompt_text") or ""))
    except Exception:  # noqa: BLE001 — an unparsable prompt just means "all prompts"
        return POOLED
    if fam in levels:
        return fam
    members = [m for m in FAMILY_GROUPS.get(fam, ()) if m in levels]
    return members[0] if len(members) == 1 else POOLED


found = saved_calibrations()
if not found:
    st.info(f"No calibration result yet: nothing in `{calibration_dir()}` nor in `{published_calibration_dir()}`. "
            "Make one with `python -m ttt_core calibrate` (`--quick` for a small one; `--help` lists the options), "
            "or press the button at the bottom of this page for a small run now.")
else:
    def _label(i: int) -> str:
        p, d = found[i]
        src = "published" if published_calibration_dir() in p.parents else "saved"
        return f"{d.get('created', '?')} · {d.get('model', '?')} · {d.get('n_prompts', '?')} prompts · {src}"

    pick = st.selectbox("Result shown (newest first)", list(range(len(found))), format_func=_label, key="rel_result")
    path, res = found[int(pick or 0)]
    rep, prov, s = res["report"], res.get("provenance", {}), res.get("settings", {})
    m = st.columns(5)
    m[0].metric("Prompts", res.get("n_prompts", 0))
    m[1].metric("Head-choice prompts", res.get("n_head_prompts", 0))
    m[2].metric("Step grid", f"0…{max(s.get('grid', [0]))}")
    m[3].metric("Backend", f"{res.get('backend', '?')} × {res.get('workers', 1)}")
    _, compute_s = saved_calibration(path)
    m[4].metric("Wall time (last invocation)", f"{res.get('wall_seconds', 0.0) / 60:.1f} min",
                help="A run that resumes from cached records times only the prompts it computed. "
                     + ("" if compute_s is None else f"Σ of every record's compute seconds (all runs, per worker): "
                        f"{compute_s / 60:.1f} min."))
    st.caption(provenance_text(prov, model=res.get("model"), created=res.get("created"), file=path.name)
               + f" · splits {rep.get('splits')} (disjoint seed ranges; seeds listed in the file). " + recheck_text(path))

    levels = list(dict.fromkeys(r["level"] for r in rep["regret"].get("all", [])))
    like = _sidebar_level(levels)
    level = st.selectbox("Prompt family", levels, index=levels.index(like) if like in levels else 0,
                         format_func=level_label, key="rel_level",
                         help="Default: the family the sidebar's prompt resembles (its labels, or key: value lines).")

    # ---------------------------------------------------------------------- the recommendation
    st.subheader("Which step rule to trust on prompts like this")
    rec = recommended_rule(rep, level)
    if rec is None:
        st.warning("No held-out (test-split) prompts in this result: no rule can be recommended.")
    else:
        st.markdown(f"**{rec['sentence']}**")
        st.caption("The recommended rule is the one with the lowest regret on the held-out test split of this family "
                   f"(the dashboard's step count follows it). Rule for every verdict sentence: {VERDICT_RULE}.")

    # ---------------------------------------------------------------------- regret
    st.subheader("Regret of every step rule")
    split = st.radio("Prompts", ["test", "all"], horizontal=True, key="rel_split",
                     format_func={"test": "held-out test split (every rule, the controller included)",
                                  "all": "all prompts (rules without training)"}.get)
    rows = [r for r in rep["regret"].get(split, []) if r["level"] == level]
    if not rows:
        st.info("No prompts of this family in this split.")
    else:
        df = pd.DataFrame([{"rule": r["rule"], "prompts": r["n"], "mean regret": r["regret"], "95% CI low": r["ci_low"],
                            "95% CI high": r["ci_high"], "mean T": r["mean_T"], "mean error": r["mean_error"],
                            f"vs {rep['reference_rule']}": r.get("vs_ref_verdict", "(reference)"),
                            "decided by": r["decided_by"]} for r in rows])
        st.dataframe(df, hide_index=True, width="stretch", key="rel_regret_table",
                     column_config={c: st.column_config.NumberColumn(format="%.4f")
                                    for c in ("mean regret", "95% CI low", "95% CI high", "mean error")})
        table_download(df, "rel_tab_regret", settings={"result": path.name, "split": split, "level": level})
        st.plotly_chart(fig := figs.regret_figure(rows, f"Regret against the oracle — {level_label(level)} ({split})"),
                        key="rel_fig_regret")
        figure_downloads(fig, "rel_fig_regret", settings={"result": path.name, "split": split, "level": level},
                         model=res.get("model"))
        how_to_read(r"\mathrm{regret}_i = \mathrm{err}_i(T_{\mathrm{rule}}) - \min_{T \le T_{\max}} \mathrm{err}_i(T)",
                    "Mean over prompts of the measured error at the rule's step count minus the best error on the "
                    "same measured trajectory (the oracle), with a 95 % paired bootstrap CI. Every error is "
                    "measured on one run of real TTT per prompt; only the rules' decisions come from the diagnosis.",
                    good="an adaptive rule (T_MAP, the posterior verdict, the controller) with a lower regret than "
                         "every fixed T", bad="the adaptive rules no better than one fixed T: the diagnosis carries "
                         "no information about how far to adapt on these prompts", section="§10")
        all_rows = pd.DataFrame(rep["regret"].get(split, []))
        st.caption("Every family and group in one table:")
        table_download(all_rows, "rel_tab_regret_all", settings={"result": path.name, "split": split})

    # ---------------------------------------------------------------------- verdict
    st.subheader("Is P(TTT beats ICL) calibrated?")
    ver = rep.get("verdict", {}).get(level)
    if not ver:
        st.info("No verdict data for this family.")
    else:
        def _f(v: float | None, fmt: str = "{:.2f}") -> str:
            return "n/a" if v is None else fmt.format(v)

        c = st.columns(4)
        c[0].metric("Balanced accuracy (P ≥ 0.5)", _f(ver["balanced_accuracy"]))
        c[1].metric("Brier score", _f(ver["brier"], "{:.3f}"))
        c[2].metric("Decided (P ≥ 0.9 or ≤ 0.1)", _f(ver["coverage_decided"], "{:.0%}"))
        c[3].metric("Accuracy when decided", _f(ver["accuracy_decided"]))
        st.caption(f"{ver['n']} prompts; measured: TTT beat ICL at T⋆ in {_f(ver['freq_beats'], '{:.0%}')}, some T > 0 "
                   f"beat T = 0 in {_f(ver['freq_helps_any_T'], '{:.0%}')}. {rep['definitions']['verdict']}.")
        st.plotly_chart(fig := figs.reliability_figure(ver["bins"], f"Reliability of P(TTT beats ICL) — "
                                                                    f"{level_label(level)}"), key="rel_fig_reliability")
        figure_downloads(fig, "rel_fig_reliability", settings={"result": path.name, "level": level},
                         model=res.get("model"))
        how_to_read(r"\mathrm{Brier} = \frac1m\sum_i \big(P_i - \mathbb 1[\mathrm{err}_i(T^\star) < \mathrm{err}_i(0)]\big)^2",
                    "Prompts binned by the predicted probability that T⋆ steps beat in-context learning (the §5.1 "
                    "posterior verdict); the line is the measured share of each bin where they did, the bars count "
                    "the prompts per bin.", good="points on the diagonal, many prompts in the outer bins",
                    bad="points far from the diagonal (over- or under-confident), or every prompt in the middle "
                        "bins (the verdict never decides)", section="§5.1, §10")
        bins = pd.DataFrame(ver["bins"])
        table_download(bins, "rel_tab_bins", settings={"result": path.name, "level": level})

    recal = rep.get("verdict_recalibration")
    rl = (recal or {}).get("levels", {}).get(level)
    st.markdown("**Recalibrated on the train split** (what a probability of the verdict has meant on held-out prompts)")
    if recal is None:
        st.info("This result has no recalibration of the verdict (made before it existed, or its train split has "
                "one outcome only). `python -m ttt_core calibrate --resume` on the same settings rewrites the "
                "summary from the cached records with it.")
    elif rl is None:
        st.info("No held-out (test-split) prompts of this family.")
    else:
        c = st.columns(4)
        c[0].metric("Platt map", f"σ({recal['a']:.2f}·logit P {recal['b']:+.2f})",
                    help=f"Fitted on the {recal['n_train']} train prompts, all families pooled (maximum likelihood, "
                         "small ridge). A slope near 0 means P carries little information about the outcome.")
        c[1].metric("Test Brier, posterior P", f"{rl['brier_raw']:.3f}")
        c[2].metric("Test Brier, recalibrated", f"{rl['brier_recalibrated']:.3f}",
                    delta=f"{rl['brier_recalibrated'] - rl['brier_raw']:+.3f}", delta_color="inverse")
        c[3].metric("Test Brier, constant base rate", f"{rl['brier_base_rate']:.3f}",
                    help=f"Always predicting the train split's frequency {recal['train_base_rate']:.2f}.")
        st.caption(f"{rl['n']} held-out prompts of this family: mean P {rl['mean_p_raw']:.2f} → {rl['mean_p_recalibrated']:.2f} "
                   f"recalibrated, measured frequency {rl['freq_beats']:.2f}. {rep['definitions'].get('verdict_recalibration', '')}. "
                   "Steps & bounds shows the recalibrated probability of the prompt in front of it beside the posterior's.")
        st.plotly_chart(fig := figs.recalibration_figure(rl["bins_raw"], rl["bins_recalibrated"], recal["train_base_rate"]),
                        key="rel_fig_recalibration")
        figure_downloads(fig, "rel_fig_recalibration", settings={"result": path.name, "level": level},
                         model=res.get("model"))

    # ---------------------------------------------------------------------- controller
    ctrl = rep.get("controller")
    st.subheader("The learned controller on held-out prompts")
    if ctrl is None:
        st.info("This result has no controller evaluation (a split was empty).")
    else:
        st.markdown(ctrl["comparison"]["sentence"])
        st.caption("Trained on the train split with early stopping on the validation split, from the diagnosis "
                   "statistics only (never the answer); the best fixed T is chosen on train + validation. λ = "
                   f"{ctrl.get('lambda', 0):g} (error only).")

    # ---------------------------------------------------------------------- heads
    st.subheader("Do the head scores pick better heads than chance?")
    hrows = [r for r in rep.get("heads", []) if r["level"] == level]
    if not hrows:
        st.info("No head-choice runs for this family in this result.")
    else:
        hdf = pd.DataFrame([{"score": r["score"], "prompts": r["n"], "gain top-k": r["gain_top"],
                             "gain random k": r["gain_random"], "gain bottom-k": r["gain_bottom"],
                             "top − random": r["top_minus_random"], "95% CI low": r["top_minus_random_ci_low"],
                             "95% CI high": r["top_minus_random_ci_high"], "p": r["top_minus_random_p"],
                             "verdict": r["verdict"], "Spearman (score, gain)": r["spearman_mean"],
                             "Spearman CI low": r["spearman_ci_low"], "Spearman CI high": r["spearman_ci_high"]}
                            for r in hrows])
        st.dataframe(hdf, hide_index=True, width="stretch", key="rel_heads_table")
        table_download(hdf, "rel_tab_heads", settings={"result": path.name, "level": level})
        st.plotly_chart(fig := figs.head_gain_figure(hrows), key="rel_fig_heads")
        figure_downloads(fig, "rel_fig_heads", settings={"result": path.name, "level": level}, model=res.get("model"))
        how_to_read(None, f"Measured gain (minus the error change) after {s.get('head_steps')} steps of real TTT on "
                    f"k = {s.get('head_k')} blocks: each score's top-k and bottom-k, and the mean of "
                    f"{s.get('head_random')} random k-subsets. Spearman: within a prompt, a subset's score (sum of "
                    "its blocks') against its measured gain, averaged over prompts.",
                    good="top-k above random above bottom-k, Spearman clearly positive",
                    bad="top-k no better than random: the score does not predict which heads to adapt", section="§6, §10")

# ------------------------------------------------------------------------------ fresh run
st.divider()
st.subheader("Add a small fresh run")
st.caption(f"Runs here with the sidebar's model, on small prompts (the quick settings) in this process; the result is "
           f"written to `{calibration_dir()}` and listed above beside the saved ones. Full-size runs: "
           "`python -m ttt_core calibrate --workers N`.")
c1, c2 = st.columns(2)
n_prompts = int(c1.number_input("Prompts", min_value=12, max_value=120, value=24, step=12, key="rel_fresh_prompts"))
n_head = int(c2.number_input("Head-choice prompts", min_value=0, max_value=120, value=12, step=6, key="rel_fresh_heads"))
if st.button("Run a small calibration", key="rel_fresh_run"):
    lm = get_model()
    if lm is not None:
        bar = st.progress(0.0, text="Starting…")
        try:
            out = run_calibration(lm, quick_settings(lm.name), n_prompts, min(n_head, n_prompts),
                                  command="Reliability page: small fresh run (quick settings)", n_boot=1000,
                                  progress=lambda d, t, txt: bar.progress(min(d / max(t, 1), 1.0), text=txt))
            bar.empty()
            st.success(f"Done: {out['n_prompts']} prompts in {out['wall_seconds']:.0f} s.")
            st.session_state.pop("rel_result", None)
            st.rerun()
        except Exception as exc:  # the page stays up
            bar.empty()
            st.error(f"The calibration failed: {type(exc).__name__}: {exc}")
