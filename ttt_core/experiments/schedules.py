"""Step schedules and their evaluation on a suite (issue 7; DESIGN §4, §5, §7): every schedule
reads its error off the ONE measured trajectory per task of `suite.Suite`.

Schedules: fixed T (every grid value, and T = 0 = ICL); random T (expected error of a uniform
draw from {0} ∪ grid — exact, no sampling noise); evidence T_MAP with fixed σ̂² and with σ²
profiled (DESIGN §5; any T in 0…T_max); skip rule (DESIGN §4: skip when the plug-in verdict at the
profiled T_MAP says ICL is better, else that T); a learned step policy (`controller.Controller`,
anything with ``decide(suite)``); and the per-task oracle (best action in hindsight — a reference,
not a schedule). Cost of a decision = query error + λ · steps.

Measured vs linearised: every error, probability and second in the tables is *measured* on an
engine run. Only the *decisions* of the evidence and skip schedules come from the linearised model
(the kernel in DESIGN §2–§5); for qTTT (AdamW on next-token NLL) the map between the theory's
GD step T and an AdamW step is an assumption, not a theorem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from ttt_core.experiments.stats import (
    BETTER,
    NOT_DISTINGUISHABLE_TEXT,
    TOO_FEW,
    TOO_FEW_TEXT,
    WORSE,
    ci_text,
    paired_stats,
    sem,
    suite_verdict,
)
from ttt_core.experiments.suite import Suite

#: Default latency trade-off: cost = error + λ·steps. 1e-3 per step makes 8 steps worth an
#: error reduction of 0.008 (≈ 5–10 % of a typical digit-shift query error of SmolLM2).
DEFAULT_LAMBDA = 1e-3


class StepPolicy(Protocol):
    """A learned schedule: the chosen T (0 = skip) for every task of a suite."""

    def decide(self, suite: Suite) -> np.ndarray: ...


@dataclass
class ScheduleResult:
    """One schedule on a set of tasks: chosen steps, measured errors/seconds per task."""

    name: str
    kind: str            # "fixed" | "random" | "evidence" | "skip" | "controller" | "oracle"
    decided_by: str      # "measured trajectory" / "linearised model (kernel)" / "learned controller"
    steps: np.ndarray    # (n,) chosen T (expected T for random)
    errors: np.ndarray   # (n,) measured error at the chosen T
    seconds: np.ndarray  # (n,) measured adaptation seconds (+ decision overhead where needed)
    overhead: np.ndarray  # (n,) seconds of the prompt statistics (0 for fixed/random)
    reference: bool = False  # oracle: not a real schedule

    def cost(self, lam: float) -> np.ndarray:
        return self.errors + lam * self.steps

    def summary(self, lam: float) -> dict[str, Any]:
        n = len(self.errors)
        se = sem(self.errors)
        return {"schedule": self.name, "kind": self.kind, "decided by": self.decided_by,
                "mean error": float(self.errors.mean()) if n else float("nan"), "SE": se,
                "mean steps": float(self.steps.mean()) if n else float("nan"),
                "mean seconds": float(self.seconds.mean()) if n else float("nan"),
                "overhead s": float(self.overhead.mean()) if n else float("nan"),
                "mean cost": float(self.cost(lam).mean()) if n else float("nan"), "tasks": n}


def _at(suite: Suite, T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.clip(np.asarray(T, dtype=int), 0, suite.settings.t_max)
    rows = np.arange(len(suite))
    return suite.errors[rows, idx], suite.seconds[rows, idx]


def fixed_schedule(suite: Suite, T: int) -> ScheduleResult:
    """Fixed T: the trajectory's error at T (DESIGN: all fixed-T schedules from one run)."""
    T_arr = np.full(len(suite), int(T))
    e, s = _at(suite, T_arr)
    name = "ICL (T = 0)" if T == 0 else f"fixed T = {T}"
    return ScheduleResult(name, "fixed", "measured trajectory", T_arr.astype(float), e, s, np.zeros(len(suite)))


def random_schedule(suite: Suite) -> ScheduleResult:
    """T uniform on {0} ∪ grid, reported as the exact expectation over the draw."""
    acts = suite.settings.actions
    E = np.stack([_at(suite, np.full(len(suite), a))[0] for a in acts])
    S = np.stack([_at(suite, np.full(len(suite), a))[1] for a in acts])
    return ScheduleResult("random T (expected)", "random", "uniform draw", np.full(len(suite), float(np.mean(acts))),
                          E.mean(0), S.mean(0), np.zeros(len(suite)))


def chosen_schedule(suite: Suite, T: np.ndarray, name: str, kind: str, decided_by: str,
                    overhead: bool = True) -> ScheduleResult:
    e, s = _at(suite, T)
    ov = suite.stats_seconds if overhead else np.zeros(len(suite))
    return ScheduleResult(name, kind, decided_by, np.asarray(T, dtype=float), e, s + ov, ov)


def evidence_steps(suite: Suite, variant: str) -> np.ndarray:
    """T_MAP of the evidence (DESIGN §5): variant "fixed" (σ̂² = ‖r‖²/n) or "profiled"."""
    return suite.stat("t_map_fixed" if variant == "fixed" else "t_map_profiled").astype(int)


def skip_steps(suite: Suite) -> np.ndarray:
    """Skip rule (DESIGN §4): T = 0 where the plug-in verdict at the profiled T_MAP says ICL is
    better (or T_MAP = 0), else the profiled T_MAP."""
    T = evidence_steps(suite, "profiled")
    beats = np.array([bool(t["stats"]["verdict_beats"]) for t in suite.tasks], dtype=bool)
    return np.where(beats, T, 0)


def oracle_steps(suite: Suite, lam: float) -> np.ndarray:
    acts = np.array(suite.settings.actions)
    C = action_costs(suite, lam)
    return acts[np.argmin(C, axis=1)]


def action_costs(suite: Suite, lam: float) -> np.ndarray:
    """(n_tasks, n_actions) measured error at each action's T + λ·T."""
    acts = np.array(suite.settings.actions)
    return suite.errors[:, acts] + lam * acts[None, :]


def all_schedules(suite: Suite, lam: float, controller: StepPolicy | None = None) -> list[ScheduleResult]:
    """Every schedule on the tasks of `suite` (pass one split)."""
    out = [fixed_schedule(suite, 0)] + [fixed_schedule(suite, T) for T in suite.settings.grid]
    out.append(random_schedule(suite))
    lin = "linearised model (kernel)"
    out.append(chosen_schedule(suite, evidence_steps(suite, "fixed"), "evidence T_MAP (fixed σ̂²)", "evidence", lin))
    out.append(chosen_schedule(suite, evidence_steps(suite, "profiled"), "evidence T_MAP (σ profiled)", "evidence", lin))
    out.append(chosen_schedule(suite, skip_steps(suite), "skip rule (TTT-vs-ICL verdict)", "skip", lin))
    if controller is not None and len(suite):
        out.append(chosen_schedule(suite, controller.decide(suite), "learned controller", "controller",
                                   "learned controller (prompt statistics)"))
    out.append(chosen_schedule(suite, oracle_steps(suite, lam), "oracle (best action in hindsight)", "oracle",
                               "measured trajectory (hindsight)", overhead=False))
    out[-1].reference = True
    return out


def results_table(results: list[ScheduleResult], lam: float) -> list[dict[str, Any]]:
    return [r.summary(lam) for r in results]


def pareto_front(x: Sequence[float], y: Sequence[float]) -> list[int]:
    """Indices of the points not dominated in (x ↓, y ↓) — no other point has x' ≤ x and y' ≤ y
    with one strict — sorted by x (ties: lower y first)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    order = np.lexsort((y, x))
    front, best = [], np.inf
    for i in order:
        if y[i] < best:
            front.append(int(i))
            best = y[i]
    return front


def best_fixed_T(suite: Suite, lam: float) -> int:
    """The fixed T (0 or a grid value) with the lowest mean cost on `suite` (first on ties)."""
    acts = suite.settings.actions
    costs = action_costs(suite, lam).mean(axis=0)
    return int(acts[int(np.argmin(costs))])


def compare_controller(suite: Suite, controller: StepPolicy, lam: float, n_boot: int = 10_000,
                       seed: int = 0) -> dict[str, Any]:
    """Does the controller beat the best fixed T on the TEST split at λ? Paired per-task cost
    difference (best fixed − controller; positive = controller better) with a bootstrap CI and a
    permutation p; the sentence is worded by `stats.suite_verdict` (≥ 20 test tasks, CI excluding 0,
    p < 0.05, else "too few tasks to decide" / "not distinguishable"; DESIGN §10). `verdict` is
    "beats", "worse than", "too few tasks to decide" or "not distinguishable from".
    The best fixed T is chosen on train + validation (honest); the test-oracle best fixed T is
    reported beside it."""
    trval, test = suite.split(("train", "val")), suite.split("test")
    if not len(test):
        raise ValueError("the suite has no test tasks")
    T_sel = best_fixed_T(trval, lam) if len(trval) else 0
    T_orc = best_fixed_T(test, lam)
    ctrl = chosen_schedule(test, controller.decide(test), "learned controller", "controller", "")
    fixed = fixed_schedule(test, T_sel)
    orc = fixed_schedule(test, T_orc)
    st = paired_stats(fixed.cost(lam), ctrl.cost(lam), n_boot=n_boot, seed=seed)
    st_o = paired_stats(orc.cost(lam), ctrl.cost(lam), n_boot=n_boot, seed=seed)
    st_err = paired_stats(fixed.errors, ctrl.errors, n_boot=n_boot, seed=seed)
    v = suite_verdict(st, len(test), f"the learned controller beats the best fixed schedule (T = {T_sel})",
                      f"the learned controller is worse than the best fixed schedule (T = {T_sel})",
                      f"the best fixed schedule (T = {T_sel})")
    verdict = {BETTER: "beats", WORSE: "worse than", TOO_FEW: TOO_FEW_TEXT}.get(v.outcome, NOT_DISTINGUISHABLE_TEXT)
    sentence = (f"On the test split ({len(test)} tasks, λ = {lam:g} per step), learned controller vs the best fixed "
                f"schedule chosen on train+validation (T = {T_sel}): {v}. Mean cost difference (fixed − "
                f"controller, positive = controller better) {st['mean']:+.4f}, 95 % paired bootstrap CI "
                f"[{st['ci_low']:+.4f}, {st['ci_high']:+.4f}], permutation p = {st['p']:.3g}; against the best fixed "
                f"T in hindsight on the test split (T = {T_orc}) {ci_text(st_o)}, p = {st_o['p']:.3g}. "
                f"Controller mean steps {ctrl.steps.mean():.2f} vs {T_sel}.")
    return {"n_test": len(test), "lambda": lam, "best_fixed_T": T_sel, "best_fixed_T_test_oracle": T_orc,
            "cost_diff": st, "cost_diff_vs_test_oracle": st_o, "error_diff": st_err, "verdict": verdict,
            "verdict_text": v.text,
            "controller_mean_steps": float(ctrl.steps.mean()), "sentence": sentence}


def choice_counts(results: list[ScheduleResult], suite: Suite, names: Sequence[str]) -> dict[str, dict[str, dict[int, int]]]:
    """{schedule: {family: {T: count}}} of the chosen T per task family."""
    fam = suite.family
    out: dict[str, dict[str, dict[int, int]]] = {}
    for r in results:
        if r.name not in names:
            continue
        per: dict[str, dict[int, int]] = {}
        for f in dict.fromkeys(fam.tolist()):
            vals, counts = np.unique(r.steps[fam == f].astype(int), return_counts=True)
            per[f] = {int(v): int(c) for v, c in zip(vals, counts)}
        out[r.name] = per
    return out


def family_trajectories(suite: Suite) -> dict[str, dict[str, np.ndarray]]:
    """{family: {"mean", "se"}} of the measured error trajectories (T = 0 … T_max)."""
    out = {}
    E, fam = suite.errors, suite.family
    for f in dict.fromkeys(fam.tolist()):
        e = E[fam == f]
        out[f] = {"mean": e.mean(axis=0), "se": sem(e, axis=0), "n": np.array([len(e)])}
    return out
