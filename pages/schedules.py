"""Schedules: how many steps should each prompt get? Fixed T, random T, evidence T_MAP, the plug-in
skip rule and a learned controller compared on one task suite (issue 7). UI only: the suite is
ttt_core.experiments.suite, the schedules ttt_core.experiments.schedules, the controller
ttt_core.experiments.controller, the figures ttt_core.figures.schedules."""

from __future__ import annotations

import json
from pathlib import Path

import streamlit as st

from pages.common import get_model, how_to_read, page_header, provenance_text, saved_calibration
from pages.downloads import figure_downloads
from ttt_core.experiments.calibration_suite import latest_calibration, settings_from_dict
from ttt_core.experiments.calibration_tasks import CAL_FAMILY_LABELS
from ttt_core.experiments.controller import Controller, ControllerConfig, load_controller, train_controller
from ttt_core.experiments.schedules import (
    DEFAULT_LAMBDA,
    all_schedules,
    choice_counts,
    compare_controller,
    family_trajectories,
    pareto_front,
    results_table,
)
from ttt_core.experiments.stats import VERDICT_RULE
from ttt_core.experiments.store import controller_dir
from ttt_core.experiments.suite import build_suite, load_cached_suite, suite_dir
from ttt_core.experiments.suite_tasks import FAMILY_LABELS, TRAP_FAMILIES, SuiteSettings, split_sizes
from ttt_core.figures import schedules as figs
from ttt_core.models import TINY_PREFIX

SS = st.session_state
LAMBDAS = [0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
GRIDS = {"1, 2, 4, 8": (1, 2, 4, 8), "1, 2, 4": (1, 2, 4), "1, 2, 4, 8, 16": (1, 2, 4, 8, 16), "1, 2": (1, 2)}
LRS = [3e-4, 1e-3, 3e-3]

page_header("Schedules",
            "How many steps should each prompt get — and does a small controller that reads the prompt's "
            "statistics choose better than one fixed number of steps?")

lm = get_model()
if lm is None:
    st.stop()

# ------------------------------------------------------------------------------ which suite
saved_hit = latest_calibration()
SOURCES = {"saved": "the saved calibration suite (computed, with its provenance)",
           "build": "a schedules suite for the settings below (build or load from the cache)"}
source_kind = st.radio("Suite", list(SOURCES) if saved_hit is not None else ["build"], key="sch_source",
                       horizontal=True, format_func=SOURCES.get,
                       help="The saved suite is the calibration suite of `python -m ttt_core calibrate` (the newest "
                            "under artifacts/calibration, else the committed one): the controller below is trained "
                            "on its train split and judged on its test split.")

# ------------------------------------------------------------------------------ controls
c1, c2, c3, c4 = st.columns(4)
with c1:
    lam = st.select_slider("Latency trade-off λ (cost = error + λ·steps)", LAMBDAS, value=DEFAULT_LAMBDA,
                           key="sch_lambda", format_func=lambda v: f"{v:g}")
    split = st.selectbox("Split shown in the table and figures", ["test", "val", "train"], key="sch_split")

labels = FAMILY_LABELS
if source_kind == "saved":
    path, res, where = saved_hit
    settings = settings_from_dict(res["settings"])
    labels = {**FAMILY_LABELS, **CAL_FAMILY_LABELS}
    n_tasks = int(res.get("n_prompts", 0))
    suite, _ = saved_calibration(path)
    st.caption(f"**Saved suite** ({where}): {n_tasks} prompts of {len(settings.families)} families "
               f"({', '.join(labels[f] for f in settings.families)}), each with its measured error after T = 0…"
               f"{settings.t_max} steps (paper LOO GD on W_V for few-shot, qTTT for long contexts). "
               + provenance_text(res.get("provenance"), model=res.get("model"), created=res.get("created"),
                                 file=path.name)
               + f" · splits {res.get('report', {}).get('splits')}. "
               + ("" if res.get("model") == lm.name else f"It was made with {res.get('model')}, not the model "
                  f"loaded now ({lm.name}): its numbers are about that model."))
    if suite is None:
        st.error(f"The saved summary `{path.name}` names records that are missing under `{path.parent}`; "
                 "rebuild them with `python -m ttt_core calibrate --resume` or choose the other suite.")
        st.stop()
else:
    with c2:
        n_tasks = int(st.number_input("Suite size (tasks, ≈ 50/20/30 % train/val/test)", min_value=5, max_value=600,
                                      value=40, step=5, key="sch_tasks"))
        grid_label = st.selectbox("Step grid (actions: skip and these)", list(GRIDS), key="sch_grid")
    with c3:
        lr = st.select_slider("qTTT learning rate (AdamW)", LRS, value=1e-3, key="sch_lr",
                              format_func=lambda v: f"{v:g}")
        engine = st.radio("Few-shot engine", ["qttt", "paper"], key="sch_engine", horizontal=True,
                          format_func={"qttt": "qTTT (W_Q, fast)", "paper": "paper LOO GD (W_V, ~10× slower)"}.get)
    with c4:
        c_val = st.select_slider("Theory step c (ρ = c/λ_max)", [0.1, 0.25, 0.5, 0.75], value=0.5, key="sch_c")

    tiny = lm.name.startswith(TINY_PREFIX)
    base = SuiteSettings(model=lm.name, grid=GRIDS[grid_label], fewshot_engine=engine, lr_fewshot=float(lr),
                         lr_long=float(lr), c=float(c_val))
    settings = SuiteSettings(**{**base.__dict__, "fewshot_n": (4, 6), "needle_words": (20, 30), "max_positions": 16,
                                "span_long": 16}) if tiny else base
    if tiny:
        st.caption("Tiny random model: tiny prompts (4–6 demonstrations, 20–30-word haystacks) keep the suite fast; "
                   "its numbers mean nothing about real models.")
    sizes = split_sizes(n_tasks)
    st.caption(f"Families: {', '.join(FAMILY_LABELS[f] for f in settings.families)}. Splits by seed: train "
               f"{sizes['train']}, validation {sizes['val']}, test {sizes['test']} tasks (disjoint seed ranges). "
               f"Suite cache: `{suite_dir(settings)}`.")

    suite = load_cached_suite(settings, n_tasks)
    if st.button("Build the suite and train the controller" if suite is None else "Rebuild missing tasks and retrain",
                 key="sch_build", type="primary" if suite is None else "secondary"):
        bar = st.progress(0.0, text="Starting…")
        try:
            suite = build_suite(lm, settings, n_tasks,
                                progress=lambda f, t: bar.progress(min(max(f, 0.0), 1.0), text=t))
        except Exception as exc:  # the page stays up; the message says what failed
            st.error(f"Building the suite failed: {type(exc).__name__}: {exc}")
            suite = None
        SS.pop("sch_controller", None)

    if suite is None:
        st.info(f"No cached suite for these settings and size. Building it runs the engine once per task "
                f"({n_tasks} tasks × {settings.t_max} steps; on a shared 2-core CPU about 20–40 s per task with the "
                f"embedded SmolLM2), or run `python -m ttt_core train-controller --tasks {n_tasks}` once"
                + (" — or choose the saved suite above." if saved_hit is not None else "."))
        st.stop()


# ------------------------------------------------------------------------------ controller
def _saved_controller(folder: Path) -> Controller | None:
    """The CLI's controller when it was trained on exactly this suite's train/val tasks and λ."""
    try:
        meta = json.loads((folder / "controller.json").read_text())
        info = meta.get("info", {})
        train = sorted(int(s) for s in suite.split("train").seeds)
        val = sorted(int(s) for s in suite.split("val").seeds)
        if (info.get("suite_key") == settings.key() and abs(meta["config"]["lam"] - lam) < 1e-15
                and info.get("train_seeds") == train and info.get("val_seeds") == val):
            return load_controller(folder)
    except (OSError, KeyError, ValueError):
        return None
    return None


ckey = (source_kind, settings.key(), n_tasks, float(lam))
held = SS.get("sch_controller")
if held is None or held[0] != ckey:
    ctrl = _saved_controller(controller_dir())
    source = "loaded from artifacts/controller (trained by `python -m ttt_core train-controller`)"
    if ctrl is None:
        with st.spinner("Training the controller on the train split (early stopping on validation)…"):
            ctrl = train_controller(suite, ControllerConfig(lam=float(lam)))
        source = f"trained here in {ctrl.info['train_seconds']:.1f} s"
    SS["sch_controller"] = (ckey, ctrl, source)
_, ctrl, source = SS["sch_controller"]

# ------------------------------------------------------------------------------ the honest answer
cmp = compare_controller(suite, ctrl, float(lam))
st.subheader("Does the controller beat the best fixed T?")
st.markdown(f"**{cmp['sentence']}**")
st.caption(f"Controller {source}; best validation epoch {ctrl.info.get('best_epoch')} (restart "
           f"{ctrl.info.get('best_restart')}), validation regret {ctrl.info.get('val_loss_init', float('nan')):.4g} → "
           f"{ctrl.info.get('val_loss_best', float('nan')):.4g}. Cost differences are paired per test task; the CI is "
           "a 95 % bootstrap over test tasks, p a paired permutation test. With few test tasks the interval is wide: "
           f"read it before the mean. Rule: {VERDICT_RULE}; otherwise the sentence says \"too few tasks to decide\" "
           "or \"not distinguishable\".")
st.info("**Measured vs linearised.** Every error and every second below is *measured* on an engine run "
        "(one run per task to the largest grid value; fixed-T errors are that trajectory at T). Only the "
        "*decisions* of the evidence T_MAP and skip-rule schedules come from the *linearised* model (the prompt "
        "kernel, DESIGN §2–§5); for qTTT (AdamW on next-token NLL) mapping the theory's GD step to an AdamW step "
        "is an assumption. Seconds of schedules that need the kernel include its computation (decision overhead).")

# ------------------------------------------------------------------------------ table
part = suite.split(split)
if not len(part):
    st.warning(f"The {split} split is empty at this suite size.")
    st.stop()
results = all_schedules(part, float(lam), ctrl)
rows = results_table(results, float(lam))
if split != "test":
    st.warning(f"You are looking at the {split} split: the controller was "
               f"{'trained' if split == 'train' else 'early-stopped'} on it (in-sample). Only the test split is an "
               "honest evaluation.")
shown = [{**r, "schedule": r["schedule"] + (" (reference)" if r["kind"] == "oracle" else "")} for r in rows]
st.dataframe(shown, hide_index=True, width="stretch",
             column_config={k: st.column_config.NumberColumn(format="%.4f") for k in ("mean error", "SE", "mean cost")})
st.caption(f"{len(part)} {split} tasks; λ = {lam:g}. mean seconds = measured adaptation seconds (+ kernel seconds "
           "for evidence, skip rule and controller); overhead s = the kernel part. Random T is the exact expectation "
           "of a uniform draw from {0} ∪ grid. The oracle picks each task's best action in hindsight (not a schedule).")

# ------------------------------------------------------------------------------ figures
real = [i for i, r in enumerate(rows) if r["kind"] != "oracle"]
left, right = st.columns(2)
with left:
    front = pareto_front([rows[i]["mean seconds"] for i in real], [rows[i]["mean error"] for i in real])
    st.plotly_chart(fig := figs.latency_figure([rows[i] for i in real], front, "seconds"), key="sch_fig_latency_s")
    figure_downloads(fig, "sch_fig_latency_s", lm)
    how_to_read(r"\text{cost}=\text{error}(T)+\lambda\,T,\qquad \text{Pareto front: no other schedule is both faster and better}",
                "Each marker is one schedule: measured mean query error (± SE) against measured mean seconds per task "
                "(adaptation steps, plus the kernel computation for schedules that need it). The dotted line joins "
                "the schedules no other schedule beats on both axes.",
                good="the controller or an evidence schedule on the front, left of the fixed T with similar error",
                bad="adaptive schedules to the right of (slower than) a fixed T that is just as accurate — their "
                    "kernel overhead costs more than it saves", section="§5")
with right:
    front_s = pareto_front([rows[i]["mean steps"] for i in real], [rows[i]["mean error"] for i in real])
    st.plotly_chart(fig := figs.latency_figure([rows[i] for i in real], front_s, "steps"), key="sch_fig_latency_steps")
    figure_downloads(fig, "sch_fig_latency_steps", lm)
    how_to_read(None, "The same comparison with latency counted in engine steps (what λ prices).",
                good="adaptive schedules below the fixed-T curve at the same mean steps",
                bad="everything on the fixed-T curve: the decisions carry no information about the prompt")

ordinary = part.families([f for f in settings.families if f not in TRAP_FAMILIES])
trap = part.families([f for f in settings.families if f in TRAP_FAMILIES])
left, right = st.columns(2)
with left:
    if len(ordinary) and len(trap):
        ro = results_table([r for r in all_schedules(ordinary, float(lam), ctrl) if not r.reference], float(lam))
        rt = results_table([r for r in all_schedules(trap, float(lam), ctrl) if not r.reference], float(lam))
        st.plotly_chart(fig := figs.trap_figure(ro, rt), key="sch_fig_trap")
        figure_downloads(fig, "sch_fig_trap", lm)
        how_to_read(None, "Mean measured error of every schedule on ordinary tasks and on trap tasks (consistent "
                    "wrong shift, all-noise labels, fake needles), where fitting the prompt harder can move the "
                    "query away from the truth.",
                    good="on traps, the adaptive schedules stay near ICL (T = 0) while long fixed T get worse",
                    bad="adaptive schedules that adapt as much on traps as elsewhere", section="§4")
    else:
        st.caption("The trap comparison needs ordinary and trap tasks in this split.")
with right:
    names = ["learned controller", "evidence T_MAP (σ profiled)", "evidence T_MAP (fixed σ̂²)",
             "skip rule (TTT-vs-ICL verdict)"]
    st.plotly_chart(fig := figs.choices_figure(choice_counts(results, part, names), labels), key="sch_fig_choices")
    figure_downloads(fig, "sch_fig_choices", lm)
    how_to_read(None, "How many steps each adaptive schedule chose, per task family (T = 0 means skip: answer "
                "in context). Evidence T_MAP may choose any T up to the grid maximum; the controller chooses "
                "among skip and the grid.",
                good="different families get different T — fewer on traps", bad="one bar per panel: the schedule "
                "ignores the prompt")

left, right = st.columns(2)
with left:
    st.plotly_chart(fig := figs.trajectory_figure(family_trajectories(part), labels), key="sch_fig_traj")
    figure_downloads(fig, "sch_fig_traj", lm)
    how_to_read(None, "Measured mean error after T engine steps per family (T = 0 is ICL). Every fixed-T number "
                "in the table is a point of these curves.",
                good="a family whose curve has a clear minimum: the best T depends on the family",
                bad="flat curves: adaptation does nothing at this learning rate")
with right:
    st.plotly_chart(fig := figs.training_figure(ctrl.history), key="sch_fig_train")
    figure_downloads(fig, "sch_fig_train", lm)
    how_to_read(r"\frac1n\sum_i\sum_a \pi(a\mid x_i)\,\big(C_{ia}-\min_b C_{ib}\big)",
                "The controller's training objective (expected regret of its softmax policy) on the training and "
                "validation splits; the kept weights are those of the lowest validation value.",
                good="validation regret falls, then flattens", bad="validation regret rising from the start: "
                "the controller only memorises the training tasks")

with st.expander("Per-task decisions"):
    by = {r.name: r for r in results}
    table = []
    for i, t in enumerate(part.tasks):
        row = {"task": t["task_id"], "family": labels.get(t["family"], t["family"]),
               "details": ", ".join(f"{k}={v:.2g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["meta"].items()),
               "ICL error": t["errors"][0]}
        for name in ["learned controller", "evidence T_MAP (σ profiled)", "skip rule (TTT-vs-ICL verdict)",
                     "oracle (best action in hindsight)"]:
            if name in by:
                row[f"T {name.split(' (')[0]}"] = int(by[name].steps[i])
        table.append(row)
    st.dataframe(table, hide_index=True, width="stretch")
