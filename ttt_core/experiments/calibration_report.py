"""What the calibration suite says about the diagnosis (issue 16; DESIGN §10), computed from the
records of `calibration_tasks` only (a pure function of them: `calibration_report`).

Step rules (each picks T per prompt, or a distribution over T; its measured error is read off the
prompt's ONE oracle trajectory): ICL (T = 0); every fixed T of the grid; evidence T_MAP with fixed
σ̂² and with σ² profiled (DESIGN §5); the Gibbs posterior over T (ν ∝ exp(−n ℓ_T), β = 1: the
expected error of T ~ ν); the §5.1 posterior verdict (T_MAP with fixed σ̂ when P(TTT beats ICL
at that T) ≥ 0.9, else T = 0); the skip rule (the plug-in verdict at the profiled T_MAP, as in
the schedules); and the learned controller (`controller`: trained on the train split with early
stopping on the validation split from the diagnosis statistics only, evaluated on the test split).

* Regret of a rule on a prompt = its measured error − the oracle's (min over T = 0…T_max).
  Tables per family, per family group and pooled, on all prompts and on the held-out test split:
  mean regret with its 95 % paired bootstrap CI (`stats.paired_stats(rule, oracle)`), and the
  paired comparison with fixed T = 8 (worded by `stats.suite_verdict`).
* The verdict: P(TTT beats ICL) at T⋆ = max(T_MAP fixed σ̂, 1) over the §5.1 posterior, against the
  measured outcome error(T⋆) < error(0): balanced accuracy of P ≥ 0.5, accuracy and coverage of
  the decided verdicts (P ≥ 0.9 or ≤ 0.1), the reliability diagram (`reliability_bins`) and the
  Brier score; plus the base rate of DESIGN §10's "TTT helps" (some T > 0 beats T = 0).
  `verdict_recalibration`: Platt scaling of that probability (`platt_fit`: P' = σ(a·logit P + b),
  maximum likelihood with a small ridge) fitted on the train split, pooled, and judged on the test
  split (Brier and reliability before and after, against a constant base rate), so the dashboard
  can say what a probability of the verdict has meant on held-out prompts.
* Head choice (prompts with head runs): per score, the measured gain (minus the error change after
  the head steps) of its top-k over the mean of the random k-subsets and over its bottom-k (paired
  over prompts), and the Spearman correlation, within a prompt, of a subset's score (the sum of its
  blocks' scores) and its measured gain, averaged over prompts (bootstrap CI).
* `recommended_rule(report, family)`: the rule with the lowest held-out (test-split) regret for
  the family, with its regret and fixed T = 8's, as a sentence.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ttt_core.experiments.calibration_tasks import CAL_FAMILY_LABELS, FAMILY_GROUPS, CalibrationSettings
from ttt_core.experiments.stats import boot_ci, paired_stats, spearman, suite_verdict
from ttt_core.figure_data import json_clean

POOLED = "all prompts"
REFERENCE_T = 8
ADAPT_P, DONT_ADAPT_P = 0.9, 0.1
RULE_T_MAP_FIXED = "T_MAP (fixed σ̂²)"
RULE_T_MAP_PROFILED = "T_MAP (σ² profiled)"
RULE_GIBBS = "Gibbs average over T (β = 1)"
RULE_POSTERIOR = "posterior verdict (T_MAP if P ≥ 0.9, else ICL)"
RULE_SKIP = "skip rule (plug-in verdict)"
RULE_CONTROLLER = "learned controller"


def fixed_name(T: int) -> str:
    return "ICL (T = 0)" if int(T) == 0 else f"fixed T = {int(T)}"


def level_label(level: str) -> str:
    """A family's label, a group's name, or "all prompts"."""
    return CAL_FAMILY_LABELS.get(level, level)


# ============================================================================================
# arrays from the records
# ============================================================================================


def error_matrix(tasks: Sequence[dict[str, Any]]) -> np.ndarray:
    """(n, T_max + 1) measured error after T steps."""
    return np.array([t["errors"] for t in tasks], dtype=float).reshape(len(tasks), -1)


def oracle_errors(tasks: Sequence[dict[str, Any]]) -> np.ndarray:
    E = error_matrix(tasks)
    return np.nanmin(E, axis=1) if E.size else np.zeros(0)


def _stat(tasks: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([float(t["stats"][key]) for t in tasks])


def verdict_T(tasks: Sequence[dict[str, Any]], t_max: int) -> np.ndarray:
    """T⋆ = max(T_MAP fixed σ̂, 1), at most T_max: the step count the verdict is judged at."""
    return np.clip(_stat(tasks, "t_map_fixed").astype(int), 1, t_max) if tasks else np.zeros(0, int)


def verdict_prob(tasks: Sequence[dict[str, Any]], t_max: int) -> np.ndarray:
    """P(TTT beats ICL at T⋆) over the §5.1 posterior, per prompt."""
    T = verdict_T(tasks, t_max)
    return np.array([float(t["stats"]["prob_grid"][int(T[i])]) for i, t in enumerate(tasks)])


def rule_choices(tasks: Sequence[dict[str, Any]], settings: CalibrationSettings) -> dict[str, dict[str, Any]]:
    """{rule: {"errors" (n,), "steps" (n,), "decided_by"}} of every rule except the controller."""
    E = error_matrix(tasks)
    n, t_max = len(tasks), settings.t_max
    rows = np.arange(n)

    def at(T: np.ndarray) -> np.ndarray:
        return E[rows, np.clip(np.asarray(T, dtype=int), 0, t_max)] if n else np.zeros(0)

    out: dict[str, dict[str, Any]] = {}
    for T in settings.actions:
        out[fixed_name(T)] = {"errors": at(np.full(n, T)), "steps": np.full(n, float(T)), "decided_by": "fixed"}
    lin = "linearised model (kernel)"
    t_fix = _stat(tasks, "t_map_fixed").astype(int) if n else np.zeros(0, int)
    t_pro = _stat(tasks, "t_map_profiled").astype(int) if n else np.zeros(0, int)
    out[RULE_T_MAP_FIXED] = {"errors": at(t_fix), "steps": t_fix.astype(float), "decided_by": lin}
    out[RULE_T_MAP_PROFILED] = {"errors": at(t_pro), "steps": t_pro.astype(float), "decided_by": lin}
    nu = np.array([t["stats"]["gibbs"] for t in tasks], dtype=float).reshape(n, -1)
    grid = np.arange(nu.shape[1], dtype=float)
    out[RULE_GIBBS] = {"errors": (nu * E[:, : nu.shape[1]]).sum(1) if n else np.zeros(0), "steps": nu @ grid,
                       "decided_by": lin + ", expected error of T ~ ν"}
    p = np.array([float(t["stats"]["prob_grid"][min(int(t_fix[i]), t_max)]) for i, t in enumerate(tasks)])
    t_post = np.where((p >= ADAPT_P) & (t_fix > 0), t_fix, 0) if n else np.zeros(0, int)
    out[RULE_POSTERIOR] = {"errors": at(t_post), "steps": t_post.astype(float), "decided_by": "§5.1 posterior"}
    beats = np.array([bool(t["stats"]["verdict_beats"]) for t in tasks], dtype=bool)
    t_skip = np.where(beats, t_pro, 0) if n else np.zeros(0, int)
    out[RULE_SKIP] = {"errors": at(t_skip), "steps": t_skip.astype(float), "decided_by": "plug-in verdict"}
    return out


def levels(tasks: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """{family / group / POOLED: boolean mask over tasks} for the levels present."""
    fam = np.array([t["family"] for t in tasks])
    out: dict[str, np.ndarray] = {}
    for f in dict.fromkeys(fam.tolist()):
        out[f] = fam == f
    for g, members in FAMILY_GROUPS.items():
        m = np.isin(fam, members)
        if m.any() and not any(np.array_equal(m, v) for v in out.values()):
            out[g] = m
    out[POOLED] = np.ones(len(tasks), dtype=bool)
    return out


# ============================================================================================
# regret
# ============================================================================================


def _ref_T(settings: CalibrationSettings) -> int:
    """Fixed T = 8 when on the grid, else the grid value nearest to it."""
    grid = list(settings.grid)
    return REFERENCE_T if REFERENCE_T in grid else min(grid, key=lambda g: (abs(g - REFERENCE_T), g))


def regret_rows(choices: dict[str, dict[str, Any]], oracle: np.ndarray, mask: np.ndarray, level: str, ref: str,
                n_boot: int, seed: int = 0) -> list[dict[str, Any]]:
    """One row per rule on the prompts of `mask`: mean regret with its paired CI, mean T, and the
    paired comparison with the reference rule `ref` (fixed T = 8)."""
    rows = []
    m = int(mask.sum())
    for name, ch in choices.items():
        e = ch["errors"][mask]
        st = paired_stats(e, oracle[mask], n_boot=n_boot, seed=seed)
        row = {"rule": name, "level": level, "n": m, "regret": st["mean"], "ci_low": st["ci_low"],
               "ci_high": st["ci_high"], "mean_error": float(e.mean()) if m else float("nan"),
               "mean_T": float(ch["steps"][mask].mean()) if m else float("nan"), "decided_by": ch["decided_by"]}
        if name != ref and ref in choices:
            vs = paired_stats(choices[ref]["errors"][mask], e, n_boot=n_boot, seed=seed)
            v = suite_verdict(vs, m, f"{name} beats {ref}", f"{name} is worse than {ref}", ref)
            row.update({"vs_ref_mean": vs["mean"], "vs_ref_ci_low": vs["ci_low"], "vs_ref_ci_high": vs["ci_high"],
                        "vs_ref_p": vs["p"], "vs_ref_verdict": v.text, "vs_ref_outcome": v.outcome})
        rows.append(row)
    return rows


def regret_tables(tasks: Sequence[dict[str, Any]], settings: CalibrationSettings, *, controller_steps:
                  np.ndarray | None = None, n_boot: int = 2000) -> dict[str, list[dict[str, Any]]]:
    """{"all": rows, "test": rows}: `regret_rows` for every level, on all prompts (rules without
    training) and on the test split (every rule; the controller's steps on the test prompts in
    `controller_steps`, in test-record order)."""
    ref = fixed_name(_ref_T(settings))
    out: dict[str, list[dict[str, Any]]] = {}
    for split in ("all", "test"):
        part = [t for t in tasks if split == "all" or t["split"] == "test"]
        if not part:
            out[split] = []
            continue
        choices = rule_choices(part, settings)
        if split == "test" and controller_steps is not None and len(controller_steps) == len(part):
            E = error_matrix(part)
            T = np.clip(np.asarray(controller_steps, dtype=int), 0, settings.t_max)
            choices[RULE_CONTROLLER] = {"errors": E[np.arange(len(part)), T], "steps": T.astype(float),
                                        "decided_by": "learned controller (diagnosis statistics)"}
        orc = oracle_errors(part)
        rows: list[dict[str, Any]] = []
        for level, mask in levels(part).items():
            rows += regret_rows(choices, orc, mask, level, ref, n_boot)
        out[split] = rows
    return out


# ============================================================================================
# verdict reliability
# ============================================================================================


def reliability_bins(p: np.ndarray, y: np.ndarray, n_bins: int = 10) -> list[dict[str, Any]]:
    """Equal-width bins of the predicted probability over [0, 1] (the last bin includes 1): per bin
    its edges, count, mean predicted probability and measured frequency of y (NaN when empty)."""
    p, y = np.asarray(p, dtype=float), np.asarray(y, dtype=float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        m = idx == b
        c = int(m.sum())
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": c,
                    "mean_p": float(p[m].mean()) if c else float("nan"),
                    "freq": float(y[m].mean()) if c else float("nan")})
    return out


def balanced_accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    """(TPR + TNR)/2 of boolean predictions (NaN when a class is absent from y)."""
    pred, y = np.asarray(pred, dtype=bool), np.asarray(y, dtype=bool)
    if not y.any() or y.all():
        return float("nan")
    return 0.5 * (float(pred[y].mean()) + float((~pred[~y]).mean()))


def verdict_calibration(tasks: Sequence[dict[str, Any]], settings: CalibrationSettings,
                        n_bins: int = 10) -> dict[str, dict[str, Any]]:
    """Per level: P(TTT beats ICL at T⋆) against the measured error(T⋆) < error(0) (module docstring)."""
    if not tasks:
        return {}
    E = error_matrix(tasks)
    T = verdict_T(tasks, settings.t_max)
    p = verdict_prob(tasks, settings.t_max)
    y = E[np.arange(len(tasks)), T] < E[:, 0]
    helps = np.array([bool(t["oracle"]["helps"]) for t in tasks])
    out = {}
    for level, m in levels(tasks).items():
        pm, ym = p[m], y[m]
        decided = (pm >= ADAPT_P) | (pm <= DONT_ADAPT_P)
        out[level] = {
            "n": int(m.sum()), "balanced_accuracy": balanced_accuracy(pm >= 0.5, ym),
            "accuracy": float(((pm >= 0.5) == ym).mean()), "coverage_decided": float(decided.mean()),
            "accuracy_decided": float(((pm[decided] >= 0.5) == ym[decided]).mean()) if decided.any() else float("nan"),
            "brier": float(np.mean((pm - ym) ** 2)), "mean_p": float(pm.mean()), "freq_beats": float(ym.mean()),
            "freq_helps_any_T": float(helps[m].mean()), "bins": reliability_bins(pm, ym, n_bins)}
    return out


P_CLIP = 1e-4   # logit(P) of P clipped to [P_CLIP, 1 − P_CLIP] (a posterior P can be exactly 0 or 1)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), P_CLIP, 1.0 - P_CLIP)
    return np.log(p) - np.log1p(-p)


def platt_fit(p: np.ndarray, y: np.ndarray, l2: float = 1e-2, iters: int = 100) -> tuple[float, float]:
    """Platt scaling of predicted probabilities: (a, b) of P' = σ(a·logit(P) + b) maximising the
    Bernoulli log-likelihood of the outcomes y plus a small ridge ½·l2·(a² + b²) (so a separable or
    one-class sample still has a finite fit), by Newton's method on the convex objective.
    p, y: (n,). With no information in P (a → 0), P' → the base rate of y."""
    z, y = _logit(p), np.asarray(y, dtype=float)
    X = np.stack([z, np.ones_like(z)], axis=1)
    w = np.zeros(2)
    for _ in range(iters):
        q = 1.0 / (1.0 + np.exp(-(X @ w)))
        grad = X.T @ (q - y) + l2 * w
        H = (X * (q * (1 - q))[:, None]).T @ X + l2 * np.eye(2)
        step = np.linalg.solve(H, grad)
        w = w - step
        if np.max(np.abs(step)) < 1e-10:
            break
    return float(w[0]), float(w[1])


def platt_apply(p: np.ndarray, a: float, b: float) -> np.ndarray:
    """P' = σ(a·logit(P) + b), elementwise (the `platt_fit` map)."""
    return 1.0 / (1.0 + np.exp(-(a * _logit(p) + b)))


def verdict_recalibration(tasks: Sequence[dict[str, Any]], settings: CalibrationSettings,
                          n_bins: int = 10) -> dict[str, Any] | None:
    """Platt scaling of P(TTT beats ICL) fitted on the **train** split (all families pooled) and judged
    on the held-out **test** split: the map (a, b), and per level of the test split the Brier score,
    balanced accuracy and reliability bins of P and of P'. None when a split lacks prompts or the
    train split has one outcome only. The same outcome as `verdict_calibration`:
    error(T⋆) < error(0) on the measured trajectory."""
    if not tasks:
        return None
    E = error_matrix(tasks)
    T = verdict_T(tasks, settings.t_max)
    p = verdict_prob(tasks, settings.t_max)
    y = (E[np.arange(len(tasks)), T] < E[:, 0]).astype(float)
    split = np.array([t["split"] for t in tasks])
    train, test = split == "train", split == "test"
    if train.sum() < 10 or not test.any() or y[train].min() == y[train].max():
        return None
    a, b = platt_fit(p[train], y[train])
    q = platt_apply(p, a, b)
    out: dict[str, Any] = {"a": a, "b": b, "n_train": int(train.sum()), "train_base_rate": float(y[train].mean()),
                           "fitted_on": "train split, all families pooled", "judged_on": "test split",
                           "levels": {}}
    for level, m in levels(tasks).items():
        mt = m & test
        if not mt.any():
            continue
        out["levels"][level] = {
            "n": int(mt.sum()), "freq_beats": float(y[mt].mean()),
            "brier_raw": float(np.mean((p[mt] - y[mt]) ** 2)), "brier_recalibrated": float(np.mean((q[mt] - y[mt]) ** 2)),
            "brier_base_rate": float(np.mean((y[train].mean() - y[mt]) ** 2)),
            "mean_p_raw": float(p[mt].mean()), "mean_p_recalibrated": float(q[mt].mean()),
            "balanced_accuracy_raw": balanced_accuracy(p[mt] >= 0.5, y[mt].astype(bool)),
            "balanced_accuracy_recalibrated": balanced_accuracy(q[mt] >= 0.5, y[mt].astype(bool)),
            "bins_raw": reliability_bins(p[mt], y[mt], n_bins), "bins_recalibrated": reliability_bins(q[mt], y[mt], n_bins)}
    return json_clean(out)


# ============================================================================================
# head choice
# ============================================================================================


def head_outcomes(tasks: Sequence[dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """Per score, over the prompts with head runs: gain (minus the error change) of the top-k, of
    the bottom-k (NaN without one), the mean over the random subsets, and the within-prompt
    Spearman of subset score and gain; "family" the prompts' families."""
    recs = [t for t in tasks if "heads" in t]
    scores = list(dict.fromkeys(s for t in recs for s in t["heads"]["picks"]))
    out: dict[str, dict[str, Any]] = {}
    for s in scores:
        rows = [t for t in recs if s in t["heads"]["picks"]]
        top, bot, rnd, rho = [], [], [], []
        for t in rows:
            h = t["heads"]
            g = np.array([np.nan if r["change"] is None else -float(r["change"]) for r in h["subsets"]])
            pk = h["picks"][s]
            top.append(g[pk["top"]])
            bot.append(g[pk["bottom"]] if "bottom" in pk else np.nan)
            rnd.append(float(np.nanmean(g[h["random"]])) if h["random"] and np.isfinite(g[h["random"]]).any()
                       else np.nan)
            sv = np.array([r["score_values"].get(s, np.nan) for r in h["subsets"]], dtype=float)
            ok = np.isfinite(sv) & np.isfinite(g)
            rho.append(spearman(sv[ok], g[ok]) if ok.sum() >= 3 else np.nan)
        out[s] = {"family": np.array([t["family"] for t in rows]), "top": np.array(top, dtype=float),
                  "bottom": np.array(bot, dtype=float), "random": np.array(rnd, dtype=float),
                  "spearman": np.array(rho, dtype=float)}
    return out


def _paired_gain(a: np.ndarray, b: np.ndarray, n_boot: int) -> dict[str, float]:
    """a − b over the prompts where both are finite (paired_stats(b, a) with d = a − b)."""
    ok = np.isfinite(a) & np.isfinite(b)
    return paired_stats(a[ok], b[ok], n_boot=n_boot) if ok.any() else paired_stats(np.zeros(0), np.zeros(0))


def head_choice_rows(tasks: Sequence[dict[str, Any]], n_boot: int = 2000) -> list[dict[str, Any]]:
    """One row per (score, level): mean gains, top-k − random and top-k − bottom-k (paired CIs,
    verdict by `suite_verdict`), the mean within-prompt Spearman with its bootstrap CI."""
    rows = []
    for s, o in head_outcomes(tasks).items():
        fams = o["family"]
        lv = {f: fams == f for f in dict.fromkeys(fams.tolist())}
        for g, members in FAMILY_GROUPS.items():
            m = np.isin(fams, members)
            if m.any() and not any(np.array_equal(m, v) for v in lv.values()):
                lv[g] = m
        lv[POOLED] = np.ones(len(fams), dtype=bool)
        for level, m in lv.items():
            top, rnd, bot, rho = o["top"][m], o["random"][m], o["bottom"][m], o["spearman"][m]
            vr = _paired_gain(top, rnd, n_boot)
            vb = _paired_gain(top, bot, n_boot)
            verdict = suite_verdict(vr, int(vr["n"]), f"{s}'s top-k beats random k-subsets",
                                    f"{s}'s top-k is worse than random k-subsets", "random k-subsets")
            fin = rho[np.isfinite(rho)]
            lo, hi = boot_ci(fin)
            rows.append({"score": s, "level": level, "n": int(m.sum()),
                         "gain_top": _nanmean(top), "gain_random": _nanmean(rnd), "gain_bottom": _nanmean(bot),
                         "top_minus_random": vr["mean"], "top_minus_random_ci_low": vr["ci_low"],
                         "top_minus_random_ci_high": vr["ci_high"], "top_minus_random_p": vr["p"],
                         "top_minus_bottom": vb["mean"], "top_minus_bottom_ci_low": vb["ci_low"],
                         "top_minus_bottom_ci_high": vb["ci_high"], "verdict": verdict.text,
                         "frac_top_beats_random": float(np.mean(top[np.isfinite(top) & np.isfinite(rnd)] >
                                                                rnd[np.isfinite(top) & np.isfinite(rnd)]))
                         if (np.isfinite(top) & np.isfinite(rnd)).any() else float("nan"),
                         "spearman_mean": _nanmean(rho), "spearman_ci_low": lo, "spearman_ci_high": hi,
                         "spearman_prompts": int(fin.size)})
    return rows


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


# ============================================================================================
# learned controller, the whole report, the recommendation
# ============================================================================================


def controller_part(tasks: Sequence[dict[str, Any]], settings: CalibrationSettings, n_boot: int = 2000,
                    config: Any = None) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """Train the controller on the train split (early stopping on val; features = the diagnosis
    statistics, never the answer), compare it on the test split with the best fixed T chosen on
    train + val (`schedules.compare_controller`, error only: λ = 0). (None, None) when a split is
    empty."""
    from ttt_core.experiments.controller import ControllerConfig, train_controller
    from ttt_core.experiments.schedules import compare_controller
    from ttt_core.experiments.suite import Suite

    suite = Suite(settings, list(tasks))  # type: ignore[arg-type]
    if not all(len(suite.split(s)) for s in ("train", "val", "test")):
        return None, None
    cfg = config or ControllerConfig(lam=0.0)
    ctrl = train_controller(suite, cfg)
    cmp = compare_controller(suite, ctrl, cfg.lam, n_boot=n_boot)
    steps = ctrl.decide(suite.split("test"))
    info = {k: v for k, v in ctrl.info.items() if k not in ("suite_settings", "train_seeds", "val_seeds")}
    return {"comparison": cmp, "info": info, "test_steps": steps.tolist(), "lambda": cfg.lam}, steps


def calibration_report(tasks: Sequence[dict[str, Any]], settings: CalibrationSettings, *, n_boot: int = 2000,
                       controller: bool = True) -> dict[str, Any]:
    """The whole report (module docstring) as JSON-safe data: "regret" {"all", "test"} tables,
    "verdict" per level, "heads" rows, "controller", "recommended" per family, "families"."""
    tasks = list(tasks)
    ctrl, steps = controller_part(tasks, settings, n_boot) if controller else (None, None)
    regret = regret_tables(tasks, settings, controller_steps=steps, n_boot=n_boot)
    report: dict[str, Any] = {
        "n_prompts": len(tasks), "splits": {s: sum(t["split"] == s for t in tasks) for s in ("train", "val", "test")},
        "families": list(dict.fromkeys(t["family"] for t in tasks)), "reference_rule": fixed_name(_ref_T(settings)),
        "regret": regret, "verdict": verdict_calibration(tasks, settings),
        "verdict_recalibration": verdict_recalibration(tasks, settings),
        "heads": head_choice_rows(tasks, n_boot), "controller": ctrl,
        "oracle": {"mean_T": float(np.mean([t["oracle"]["T"] for t in tasks])) if tasks else float("nan"),
                   "frac_helps": float(np.mean([t["oracle"]["helps"] for t in tasks])) if tasks else float("nan")},
        "definitions": {
            "regret": "measured error of the rule's T − the oracle's (min over T = 0…T_max of the same trajectory)",
            "verdict": "P(TTT beats ICL at T⋆ = max(T_MAP fixed σ̂, 1)) over the §5.1 posterior vs measured "
                       "error(T⋆) < error(0)",
            "verdict_recalibration": "Platt scaling P' = σ(a·logit P + b) of that probability, fitted on the train "
                                     "split (all families pooled), judged on the test split",
            "head_gain": "minus the measured error change after the head steps on the subset",
            "held_out": "the test split (disjoint seeds; the controller is trained on train, early-stopped on val)"},
    }
    report = json_clean(report)
    report["recommended"] = {lv: recommended_rule(report, lv)
                             for lv in dict.fromkeys(r["level"] for r in report["regret"].get("test", []))}
    return report


def recommended_rule(report: dict[str, Any], family: str, split: str = "test") -> dict[str, Any] | None:
    """The rule with the lowest held-out regret (the `split` table) on `family` (a family, a group
    or POOLED; POOLED when the family has no rows), with its regret and the reference rule's
    (fixed T = 8), and the sentence the dashboard shows. None when there is no such table."""
    table = report.get("regret", {}).get(split, [])
    level = family
    present = [m for m in FAMILY_GROUPS.get(family, ()) if any(r["level"] == m for r in table)]
    if not any(r["level"] == family for r in table) and len(present) == 1:
        level = present[0]                        # a group of one present family is reported as that family
    rows = [r for r in table if r["level"] == level]
    if not rows:
        rows = [r for r in table if r["level"] == POOLED]
        level = POOLED
    rows = [r for r in rows if r.get("regret") is not None and r.get("n")]
    if not rows:
        return None
    best = min(rows, key=lambda r: (r["regret"], r.get("mean_T") or 0.0))
    ref_name = report.get("reference_rule", fixed_name(REFERENCE_T))
    ref = next((r for r in rows if r["rule"] == ref_name), None)

    def ci(r: dict[str, Any]) -> str:
        if r.get("ci_low") is None or r.get("ci_high") is None:
            return f"{r['regret']:.4f}"
        return f"{r['regret']:.4f} (95 % CI [{r['ci_low']:.4f}, {r['ci_high']:.4f}])"

    where = "all prompts" if level == POOLED else f"prompts like this ({level_label(level)})"
    held = "held-out" if split == "test" else split
    text = f"On {where}, {best['rule']}'s regret was {ci(best)} over {best['n']} {held} prompts"
    if ref is None:
        text += "."
    elif best["rule"] == ref_name:
        text += " — the lowest of every rule."
    else:
        text += f", {ref_name}'s {ci(ref)}."
        if best.get("vs_ref_verdict"):
            text += f" {best['rule']} vs {ref_name}: {best['vs_ref_verdict']}."
    return {"level": level, "asked": family, "rule": best["rule"], "regret": best["regret"],
            "ci_low": best.get("ci_low"), "ci_high": best.get("ci_high"), "n": best["n"], "split": split,
            "reference_rule": ref_name, "reference_regret": None if ref is None else ref["regret"],
            "verdict_vs_reference": best.get("vs_ref_verdict"), "sentence": text}
