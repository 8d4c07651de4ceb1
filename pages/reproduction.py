"""Paper reproduction page: the latest reproduction results (ttt_core.experiments.reproduce)
beside the paper's published numbers, a computed sentence on what did and did not reproduce, and
a button that runs a small reproduction now. UI only; every number shown comes from a results file or is
the paper's published value, labelled as such."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from pages.common import get_model, how_to_read, page_header, provenance_text, recheck_text
from pages.downloads import figure_downloads
from ttt_core.experiments.exp2_gd import latest_supplement
from ttt_core.experiments.paper_tasks import PAPER_EXP1, ReproSettings
from ttt_core.experiments.reproduce import run_reproduction
from ttt_core.experiments.reproduce_report import (
    EXP2_METHODS,
    EXP2_SOURCES,
    LINEARISED_LABEL,
    findings,
    latest_results,
    write_results,
)
from ttt_core.experiments.stats import VERDICT_RULE
from ttt_core.experiments.store import reproduction_dir
from ttt_core.figures.steps import reproduction_figure

page_header("Paper reproduction",
            "Do the decision-theoretic paper's experiments (evidence-selected horizon, alignment-aware heads) "
            "reproduce on the model in front of you?")


def _exp1_table(block: dict) -> pd.DataFrame:
    rows = []
    for r in block["rows"]:
        v = r.get("vs_T8")
        rows.append({"Method": r["label"], "Query MSE": r["mse"], "SE": r["se"], "Mean T": r["mean_T"],
                     "Improvement vs T = 8": None if v is None else v["mean"],
                     "95% CI low": None if v is None else v["ci_low"], "95% CI high": None if v is None else v["ci_high"],
                     "p (permutation)": None if v is None else v["p"]})
    return pd.DataFrame(rows)


def _paper_table() -> pd.DataFrame:
    return pd.DataFrame([{"Method": r["label"], "Query MSE": r["mse"], "SE": r["se"], "Mean T": r["mean_T"]}
                         for r in PAPER_EXP1["rows"]])


def _agreement_table(agree: dict) -> pd.DataFrame:
    rows = []
    for b, e in agree["budgets"].items():
        lin, gd = e["qa_vs_topk_linear"], e["qa_vs_topk_gd"]
        rows.append({"Budget": int(b), "Tasks": e["tasks"], "QA − TopK, linearised": lin.get("delta", lin.get("mean")),
                     "p (linearised)": lin.get("p"), "QA − TopK, real GD": gd.get("delta", gd.get("mean")),
                     "p (real GD)": gd.get("p"), "Mean |linearised − GD|": e["mean_abs_diff"],
                     "r (QA gain over Random)": e["qa_gain_correlation"]})
    return pd.DataFrame(rows)


def _exp2_table(rows: dict) -> pd.DataFrame:
    out = []
    for b, e in rows.items():
        row = {"Budget": int(b), "Tasks": e["tasks"]}
        for key, name in EXP2_METHODS:
            row[f"{name} ΔMSE"] = e[key]["query_error"]["delta"]
            row[f"{name} SEM"] = e[key]["query_error"]["sem"]
        row["Random query MSE"] = e["random_query_error"]
        q = e.get("qa_vs_topk", {}).get("query_error", {})
        row["QA − TopK (paired)"] = q.get("delta")
        row["QA − TopK 95% CI low"] = q.get("ci_low")
        row["QA − TopK 95% CI high"] = q.get("ci_high")
        row["QA − TopK p (permutation)"] = q.get("p")
        out.append(row)
    return pd.DataFrame(out)


def _show_gd_supplement(sup: dict, s: dict) -> None:
    """Exp2 with real GD on the first tasks of the file above (`exp2_gd` supplement): its tables
    beside the linearised numbers of the same tasks, and what the real GD says."""
    ex2 = sup["summary"]["exp2"]
    ts = sup["task_seconds"]
    st.markdown(f"#### Exp2 — real GD on {sup['tasks']} of the {sup['base_tasks']} tasks above (T = {s['fixed_T']}, "
                f"{ex2.get('candidates')} candidates)")
    span = f"tasks 0…{sup['tasks'] - 1}" if sup["contiguous"] else "a non-contiguous set of tasks"
    st.caption(f"A supplement computed task by task from this file's block sets and step sizes ({span}; "
               f"{sup['gd_runs']} GD runs, {ts['sum'] / 3600:.1f} CPU-hours, median {ts['median']:.0f} s per task; "
               f"record commits {', '.join(c[:7] for c in sup['record_commits'])}; machines "
               f"{'; '.join(sup['record_machines'])}; summary made {sup['created']}). Resume or extend it with "
               f"`python -m ttt_core reproduce-gd --tasks N`; tests/unit/experiments/test_published.py recomputes GD "
               "runs of 3 random records and checks the summary against the records.")
    if ex2.get("gd"):
        st.caption("Measured GD: ΔMSE = MSE(Random) − MSE(method), positive = better than Random; QA − TopK paired.")
        st.dataframe(_exp2_table(ex2["gd"]), hide_index=True, key="repro_sup_gd")
    if ex2.get("linear_vs_gd"):
        st.caption("Linearised against real GD on these same tasks:")
        st.dataframe(_agreement_table(ex2["linear_vs_gd"]), hide_index=True, key="repro_sup_agreement")
    said = [x for x in sup.get("findings", []) if x.startswith("Exp2 (measured GD)") or x.startswith("Exp2, linearised")]
    if said:
        st.markdown("**What the real GD says** (computed from these numbers):\n\n" + "\n".join(f"* {x}" for x in said))


found = latest_results()
if found is None:
    st.info(f"No reproduction results yet in `{reproduction_dir()}`. Make one with "
            "`python -m ttt_core reproduce` (8 tasks; Exp2's real GD takes ~10 CPU-minutes per task, "
            "`--exp2 linear` is quick; `--help` lists the options, the "
            "module docstring of `ttt_core/experiments/reproduce.py` the full-size command), or press the button "
            "below.")
else:
    path, res = found
    s = res["settings"]
    summ = res["summary"]
    st.subheader("Latest results")
    m = st.columns(5)
    m[0].metric("Tasks", summ.get("tasks_ok", 0))
    m[1].metric("Grid", f"0…{s['grid_max']}")
    m[2].metric("c (ρ = c/λ_max)", f"{s['c']:g}", help=f"source: {res.get('c_source', 'given')}")
    m[3].metric("Backend", f"{res['backend']} × {res['workers']}")
    task_s = sum(float(t.get("seconds", 0.0)) for t in res.get("tasks", []) if isinstance(t, dict))
    m[4].metric("Wall time (last invocation)", f"{res['wall_seconds'] / 60:.1f} min",
                help="A run that resumes from a task cache (--cache) times only the tasks it computed. Σ of every "
                     f"task record's compute seconds (all runs, per worker): {task_s / 60:.1f} min.")
    st.caption(f"File `{path.name}` · model {s['model']} · seed {s['seed']} · created {res['created']} · "
               f"failed tasks: {len(summ.get('tasks_failed', []))}")
    prov = res.get("provenance") or {}
    if prov.get("command"):
        st.caption(provenance_text(prov) + "; each task record in the file can be recomputed from these settings. "
                   + recheck_text(path))
    sentences = findings(summ)
    if sentences:
        st.markdown("**What did and did not reproduce** (computed from these numbers):\n\n"
                    + "\n".join(f"* {x}" for x in sentences))
        st.caption(f"Rule for every verdict sentence: {VERDICT_RULE}; otherwise it says \"too few tasks to decide\" "
                   "or \"not distinguishable\".")
    for kind, block in (summ.get("exp1") or {}).items():
        st.markdown(f"#### Exp1 — {block['subspace']} heads of layers {block['first_layer']}–{block.get('last_layer')} "
                    f"({block['blocks']} blocks)")
        left, right = st.columns([3, 2])
        left.caption("This run (measured nonlinear GD; the best fixed T is chosen on the same tasks: optimistic)")
        left.dataframe(_exp1_table(block), hide_index=True, key=f"repro_exp1_{kind}")
        right.caption(f"The paper's Table 1 (published: {PAPER_EXP1['model']}, {PAPER_EXP1['subspace']}, "
                      f"{PAPER_EXP1['tasks']} tasks)")
        right.dataframe(_paper_table(), hide_index=True, key=f"repro_paper_{kind}")
    if summ.get("exp1"):
        st.plotly_chart(fig := reproduction_figure(summ), key="repro_fig_exp1")
        figure_downloads(fig, "repro_fig_exp1", settings=s, model=s.get("model"))
        how_to_read(r"\overline{\mathrm{MSE}}(T)=\frac1m\sum_{j=1}^m (f_T(x_j)-y_j)^2",
                    "Mean query MSE over the tasks after a fixed number of GD steps T (T = 0 is ICL), one line per "
                    "update subspace; the star is the evidence-selected horizon (profiled σ) at its mean selected T.",
                    "the star below the curve at T = 8: choosing T per prompt beats one fixed horizon.",
                    "the star on or above the curve: the evidence does not beat a fixed T on these tasks.", "§5, §7.1")
    ex2 = summ.get("exp2") or {}
    for src, what in EXP2_SOURCES:
        if ex2.get(src):
            st.markdown(f"#### Exp2 — block selection ({what}, T = {s['fixed_T']}, {ex2.get('candidates')} candidates)")
            st.caption("ΔMSE = MSE(Random) − MSE(method), mean and SEM over tasks; positive = better than Random. "
                       "QA − TopK = MSE(Trace-TopK) − MSE(Query-Aware), paired over tasks (positive = Query-Aware "
                       "better)." + (" Linearised: the kernel's first-order query error — the same quantity the "
                                     "greedy rule maximises, so Query-Aware is favoured by construction; the "
                                     "measured-GD table is the test." if src == "linear" else ""))
            st.dataframe(_exp2_table(ex2[src]), hide_index=True, key=f"repro_exp2_{src}")
    agree = ex2.get("linear_vs_gd")
    if agree:
        st.markdown(f"#### Exp2 — does the linearised comparison predict real GD? ({agree['tasks']} tasks with both)")
        st.caption("On the same tasks: Query-Aware − Trace-TopK (MSE(TopK) − MSE(QA), paired; positive = Query-Aware "
                   "better) under each source, the mean |linearised − GD| query error over every selection of the "
                   "budget, and the Pearson r over tasks of Query-Aware's gain over Random under the two sources.")
        st.dataframe(_agreement_table(agree), hide_index=True, key="repro_exp2_agreement")
    sup = latest_supplement(path)
    if sup and sup["tasks"]:
        _show_gd_supplement(sup, s)

st.divider()
st.subheader("Run a small reproduction now")
st.caption("Runs here, in this process, with the sidebar's model (serial backend); results are written to "
           f"`{reproduction_dir()}` and shown above. Larger runs: the command line (`python -m ttt_core reproduce`).")
c1, c2, c3 = st.columns(3)
n_tasks = c1.number_input("Tasks", min_value=1, max_value=50, value=2, step=1, key="repro_tasks")
grid = c2.number_input("Grid max T", min_value=8, max_value=30, value=8, step=1, key="repro_grid")
EXP2_MODES = {"gd": "real GD (default)", "linear": LINEARISED_LABEL, "both": "both", "off": "off"}
exp2 = c3.selectbox("Exp2 query error", list(EXP2_MODES), key="repro_exp2", format_func=EXP2_MODES.get,
                    help="Real GD runs every (budget, method) block set: ~4.5 CPU-minutes per task on SmolLM2 (255–294 s "
                         "per task on one thread, measured 2026-12-02). "
                         f"'{LINEARISED_LABEL}' is cheap but favours Query-Aware by construction.")
if st.button("Run reproduction", key="repro_run"):
    lm = get_model()
    if lm is not None:
        bar = st.progress(0.0, text="Starting…")
        try:
            settings = ReproSettings(model=lm.name, tasks=int(n_tasks), grid_max=int(grid), exp2=exp2)
            res = run_reproduction(settings, backend="serial", lm=lm,
                                   progress=lambda d, t, txt: bar.progress(d / max(t, 1), text=txt))
            if not res["summary"].get("tasks_ok"):
                st.error("Every task failed: " + "; ".join(t["error"] for t in res["summary"].get("tasks_failed", [])))
            else:
                jp, _ = write_results(res)
                bar.empty()
                st.success(f"Done: {res['summary']['tasks_ok']} task(s) in {res['wall_seconds']:.0f} s → `{jp.name}`.")
                st.rerun()
        except Exception as exc:  # the app stays up
            bar.empty()
            st.error(f"The reproduction failed: {exc}")
