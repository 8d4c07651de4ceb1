"""The calibration report (issue 16; DESIGN §10) on hand-made records: regret against the oracle,
the reliability bins, balanced accuracy, head choice and the recommended rule equal a hand
computation. No model needed. `synthetic_records` is shared with the Reliability page test."""

from __future__ import annotations

import numpy as np
import pytest

from ttt_core.experiments import calibration_report as R
from ttt_core.experiments.calibration_tasks import CalibrationSettings, oracle_of
from ttt_core.experiments.suite_tasks import split_seeds

SETTINGS = CalibrationSettings(model="synthetic", grid=(1, 2, 4, 8))


def _stats(t_fix: int, t_pro: int, p: float, beats: bool, t_max: int, rng: np.random.Generator) -> dict:
    nu = rng.dirichlet(np.ones(t_max + 1))
    prob = [0.0] + [float(p)] * t_max
    return {"n_positions": 8, "lambda_max": 1.0, "lambda_2_ratio": 0.5, "lambda_3_ratio": 0.2, "eff_rank_entropy": 3.0,
            "participation_ratio": 2.0, "tau2": 1.0, "sigma2": 0.1, "lambda_star": 0.1, "alignment_top3": 0.5,
            "residual_ms": 0.1, "t_map_fixed": float(t_fix), "t_map_profiled": float(t_pro), "gap_ratio_at_t_map": 0.5,
            "verdict_beats": bool(beats), "confidence": float(rng.uniform(0.2, 0.8)), "n_tokens": 30,
            "long_context": False, "prob_grid": prob, "gibbs": nu.tolist(), "gibbs_beta": 1.0}


def synthetic_records(n_per_split: dict[str, int] | None = None, seed: int = 0, heads: int = 0) -> list[dict]:
    """Records of two families: "shift_clean_arrow" (adapting helps: error falls with T) and
    "trap_noise" (error rises with T), with statistics that point the right way most of the time;
    the first `heads` records get head runs (top-k better than random better than bottom-k)."""
    n_per_split = n_per_split or {"train": 20, "val": 8, "test": 12}
    rng = np.random.default_rng(seed)
    t_max = SETTINGS.t_max
    T = np.arange(t_max + 1)
    recs = []
    for split, n in n_per_split.items():
        for i, s in enumerate(split_seeds(split, n)):
            good = i % 2 == 0
            err = (0.3 - 0.02 * T if good else 0.1 + 0.01 * T) + rng.normal(scale=0.003, size=T.size)
            t_fix = int(rng.choice([4, 8])) if good else int(rng.choice([0, 1]))
            st = _stats(t_fix, t_fix, rng.uniform(0.6, 1.0) if good else rng.uniform(0.0, 0.5), good, t_max, rng)
            recs.append({"task_id": f"{split}-{i:04d}", "split": split, "index": i, "seed": s,
                         "family": "shift_clean_arrow" if good else "trap_noise", "meta": {},
                         "errors": err.tolist(), "seconds": (0.1 * T).tolist(), "stats_seconds": 0.1, "stats": st,
                         "oracle": oracle_of(err), "task_seconds": 1.0})
    for rec in recs[:heads]:
        g_top, g_rand, g_bot = rng.normal(0.02, 0.005), rng.normal(0.0, 0.005, size=5), rng.normal(-0.02, 0.005)
        gains = [g_top, g_bot, *g_rand]
        subsets = [{"blocks": [[0, j]], "error_start": 0.3, "error_end": 0.3 - g, "change": -g,
                    "score_values": {"Query-Aware": float(10 * g + rng.normal(0, 0.01)), "Trace": float(rng.normal())},
                    "status": "done", "seconds": 0.1} for j, g in enumerate(gains)]
        rec["heads"] = {"k": 1, "steps": 2, "subspace": "v", "subsets": subsets, "random": [2, 3, 4, 5, 6],
                        "picks": {"Query-Aware": {"top": 0, "bottom": 1}, "Trace": {"top": 1, "bottom": 0}},
                        "head_seconds": 0.5}
    return recs


def test_regret_equals_hand_computation() -> None:
    recs = synthetic_records({"test": 10})
    E = np.array([r["errors"] for r in recs])
    orc = E.min(axis=1)
    ch = R.rule_choices(recs, SETTINGS)
    rows = np.arange(len(recs))
    t_fix = np.array([int(r["stats"]["t_map_fixed"]) for r in recs])
    np.testing.assert_allclose(ch["ICL (T = 0)"]["errors"], E[:, 0])
    np.testing.assert_allclose(ch["fixed T = 4"]["errors"], E[:, 4])
    np.testing.assert_allclose(ch[R.RULE_T_MAP_FIXED]["errors"], E[rows, t_fix])
    nu = np.array([r["stats"]["gibbs"] for r in recs])
    np.testing.assert_allclose(ch[R.RULE_GIBBS]["errors"], (nu * E).sum(1))
    p = np.array([r["stats"]["prob_grid"][t] for r, t in zip(recs, t_fix)])
    t_post = np.where((p >= 0.9) & (t_fix > 0), t_fix, 0)
    np.testing.assert_allclose(ch[R.RULE_POSTERIOR]["errors"], E[rows, t_post])
    beats = np.array([r["stats"]["verdict_beats"] for r in recs])
    np.testing.assert_allclose(ch[R.RULE_SKIP]["errors"], E[rows, np.where(beats, t_fix, 0)])

    tables = R.regret_tables(recs, SETTINGS, n_boot=200)
    by = {(r["rule"], r["level"]): r for r in tables["all"]}
    fam = np.array([r["family"] for r in recs])
    for rule in ("ICL (T = 0)", "fixed T = 8", R.RULE_T_MAP_FIXED, R.RULE_GIBBS):
        e = ch[rule]["errors"]
        assert by[(rule, R.POOLED)]["regret"] == pytest.approx(float((e - orc).mean()), abs=1e-12)
        m = fam == "trap_noise"
        assert by[(rule, "trap_noise")]["regret"] == pytest.approx(float((e[m] - orc[m]).mean()), abs=1e-12)
        assert by[(rule, "trap_noise")]["n"] == int(m.sum())
        assert by[(rule, R.POOLED)]["ci_low"] <= by[(rule, R.POOLED)]["regret"] <= by[(rule, R.POOLED)]["ci_high"]
    # the comparison with fixed T = 8 is worded by stats.suite_verdict (10 < 20 prompts: no verdict)
    assert by[("ICL (T = 0)", R.POOLED)]["vs_ref_verdict"].startswith("too few tasks to decide (10 < 20")
    assert "vs_ref_verdict" not in by[("fixed T = 8", R.POOLED)]
    # "test" table = the test records only; the group of one family is not repeated
    assert {r["level"] for r in tables["test"]} == {"shift_clean_arrow", "trap_noise", R.POOLED}
    assert all(r["n"] == 10 for r in tables["test"] if r["level"] == R.POOLED)


def test_reliability_bins_and_balanced_accuracy_by_hand() -> None:
    p = np.array([0.05, 0.08, 0.15, 0.5, 0.55, 0.92, 0.97, 1.0])
    y = np.array([0, 1, 0, 1, 0, 1, 1, 1], dtype=bool)
    bins = R.reliability_bins(p, y, n_bins=10)
    assert [b["count"] for b in bins] == [2, 1, 0, 0, 0, 2, 0, 0, 0, 3]
    assert bins[0]["mean_p"] == pytest.approx(0.065) and bins[0]["freq"] == pytest.approx(0.5)
    assert bins[5]["mean_p"] == pytest.approx(0.525) and bins[5]["freq"] == pytest.approx(0.5)
    assert bins[9]["mean_p"] == pytest.approx((0.92 + 0.97 + 1.0) / 3) and bins[9]["freq"] == 1.0
    assert np.isnan(bins[2]["mean_p"]) and bins[2]["lo"] == pytest.approx(0.2)
    pred = p >= 0.5
    tpr = pred[y].mean()
    tnr = (~pred[~y]).mean()
    assert R.balanced_accuracy(pred, y) == pytest.approx(0.5 * (tpr + tnr))
    assert np.isnan(R.balanced_accuracy(pred, np.ones(8, bool)))

    recs = synthetic_records({"test": 12})
    ver = R.verdict_calibration(recs, SETTINGS)[R.POOLED]
    E = np.array([r["errors"] for r in recs])
    Ts = np.clip([int(r["stats"]["t_map_fixed"]) for r in recs], 1, SETTINGS.t_max)
    pp = np.array([r["stats"]["prob_grid"][t] for r, t in zip(recs, Ts)])
    yy = E[np.arange(12), Ts] < E[:, 0]
    assert ver["brier"] == pytest.approx(float(np.mean((pp - yy) ** 2)))
    assert ver["balanced_accuracy"] == pytest.approx(R.balanced_accuracy(pp >= 0.5, yy))
    assert sum(b["count"] for b in ver["bins"]) == 12


def test_head_choice_by_hand() -> None:
    recs = synthetic_records({"train": 30}, heads=24)
    rows = {(r["score"], r["level"]): r for r in R.head_choice_rows(recs, n_boot=500)}
    qa = rows[("Query-Aware", R.POOLED)]
    g = [np.array([-s["change"] for s in r["heads"]["subsets"]]) for r in recs[:24]]
    assert qa["n"] == 24
    assert qa["gain_top"] == pytest.approx(np.mean([x[0] for x in g]))
    assert qa["gain_random"] == pytest.approx(np.mean([x[2:].mean() for x in g]))
    assert qa["top_minus_random"] == pytest.approx(np.mean([x[0] - x[2:].mean() for x in g]))
    assert qa["top_minus_random_ci_low"] > 0 and qa["verdict"] == "Query-Aware's top-k beats random k-subsets"
    assert qa["spearman_mean"] > 0.5                  # the synthetic QA score tracks the gain
    tr = rows[("Trace", R.POOLED)]                    # Trace's top is the worst subset
    assert tr["top_minus_random"] < 0 and "worse than random" in tr["verdict"]


def test_recommended_rule_picks_the_lowest_regret() -> None:
    recs = synthetic_records({"train": 10, "val": 4, "test": 24})
    rep = R.calibration_report(recs, SETTINGS, n_boot=200, controller=False)
    for level in ("shift_clean_arrow", "trap_noise", R.POOLED):
        rows = [r for r in rep["regret"]["test"] if r["level"] == level]
        best = min(rows, key=lambda r: r["regret"])
        rec = R.recommended_rule(rep, level)
        assert rec["rule"] == best["rule"] and rec["regret"] == best["regret"]
        ref = next(r for r in rows if r["rule"] == "fixed T = 8")
        assert rec["reference_regret"] == ref["regret"]
        assert rec["sentence"].startswith("On ") and f"{best['regret']:.4f}" in rec["sentence"]
    # on the trap family ICL wins, and the sentence quotes fixed T = 8's regret beside it
    rec = R.recommended_rule(rep, "trap_noise")
    assert rec["rule"] == "ICL (T = 0)" and "fixed T = 8's" in rec["sentence"]
    assert "12 held-out prompts" in rec["sentence"] and "too few tasks to decide (12 < 20" in rec["sentence"]
    # an unknown family falls back to the pooled table
    assert R.recommended_rule(rep, "kv_recall")["level"] == R.POOLED
    # hand-made report: the lowest regret wins, ties by fewer steps
    fake = {"reference_rule": "fixed T = 8", "regret": {"test": [
        {"rule": "fixed T = 8", "level": "x", "n": 5, "regret": 0.3, "ci_low": 0.1, "ci_high": 0.5, "mean_T": 8},
        {"rule": "A", "level": "x", "n": 5, "regret": 0.1, "ci_low": 0.0, "ci_high": 0.2, "mean_T": 3},
        {"rule": "B", "level": "x", "n": 5, "regret": 0.1, "ci_low": 0.0, "ci_high": 0.2, "mean_T": 1}]}}
    assert R.recommended_rule(fake, "x")["rule"] == "B"


def test_report_with_controller_is_json_and_uses_test_split() -> None:
    import json

    recs = synthetic_records({"train": 20, "val": 8, "test": 12})
    rep = R.calibration_report(recs, SETTINGS, n_boot=200)
    json.dumps(rep, allow_nan=False)
    ctrl = rep["controller"]
    assert ctrl["comparison"]["n_test"] == 12 and len(ctrl["test_steps"]) == 12
    rules = {r["rule"] for r in rep["regret"]["test"]}
    assert R.RULE_CONTROLLER in rules and R.RULE_CONTROLLER not in {r["rule"] for r in rep["regret"]["all"]}
    assert "too few tasks to decide" in ctrl["comparison"]["sentence"]


def test_prompt_family_and_group_lookup() -> None:
    from ttt_core.experiments.calibration_tasks import prompt_family
    from ttt_core.generators import digit_shift_task, kv_recall, needle_haystack
    from ttt_core.prompts import parse_prompt

    assert prompt_family(digit_shift_task(1).prompt) == "digit shift"
    assert prompt_family(parse_prompt("dog -> animal\npear -> fruit\ncat ->")) == "word map"
    assert prompt_family(kv_recall(1)) == "key–value recall"
    assert prompt_family(needle_haystack(1)) == "needle"
    recs = synthetic_records({"train": 10, "val": 4, "test": 12})
    rep = R.calibration_report(recs, SETTINGS, n_boot=100, controller=False)
    # "digit shift" holds one family here, so it is reported (and looked up) as that family
    assert R.recommended_rule(rep, "digit shift")["level"] == "shift_clean_arrow"
    assert R.recommended_rule(rep, "needle")["level"] == R.POOLED        # no needle prompts: the pooled table


# ------------------------------------------------------------------ recalibrating the verdict
def test_platt_fit_recovers_a_known_map_by_simulation() -> None:
    """Monte-Carlo reference: outcomes drawn from σ(a₀·logit P + b₀) give back (a₀, b₀)."""
    rng = np.random.default_rng(3)
    z = rng.normal(0.0, 2.0, size=40_000)
    p = 1.0 / (1.0 + np.exp(-z))
    for a0, b0 in ((0.3, -0.5), (1.0, 0.0), (2.0, 0.7)):
        y = rng.random(z.size) < 1.0 / (1.0 + np.exp(-(a0 * z + b0)))
        a, b = R.platt_fit(p, y)
        assert a == pytest.approx(a0, abs=0.05) and b == pytest.approx(b0, abs=0.05)
    y = rng.random(z.size) < 0.62                      # outcomes unrelated to P: P' is the base rate
    a, b = R.platt_fit(p, y)
    q = R.platt_apply(p, a, b)
    assert abs(a) < 0.03 and np.allclose(q, y.mean(), atol=0.03)
    assert np.isfinite(R.platt_fit(np.ones(20), np.ones(20))).all()   # one outcome only: still finite (ridge)


def test_verdict_recalibration_fits_on_train_and_judges_on_test() -> None:
    """Train split: the fitted map's log-loss is no worse than the identity map's and the constant
    base rate's (both are candidates of the maximum-likelihood fit); test split numbers are the
    Brier scores of P and of the map applied to P, recomputed by hand."""
    recs = synthetic_records({"train": 40, "val": 8, "test": 20}, seed=5)
    rec = R.verdict_recalibration(recs, SETTINGS)
    a, b = rec["a"], rec["b"]
    E = R.error_matrix(recs)
    T = R.verdict_T(recs, SETTINGS.t_max)
    p = R.verdict_prob(recs, SETTINGS.t_max)
    y = (E[np.arange(len(recs)), T] < E[:, 0]).astype(float)
    split = np.array([r["split"] for r in recs])
    tr, te = split == "train", split == "test"

    def logloss(q, m):
        q = np.clip(q, 1e-12, 1 - 1e-12)
        return -np.mean(y[m] * np.log(q[m]) + (1 - y[m]) * np.log(1 - q[m]))

    fitted = R.platt_apply(p, a, b)
    assert logloss(fitted, tr) <= logloss(np.clip(p, R.P_CLIP, 1 - R.P_CLIP), tr) + 1e-3
    assert logloss(fitted, tr) <= logloss(np.full_like(p, y[tr].mean()), tr) + 1e-3
    pooled = rec["levels"][R.POOLED]
    assert pooled["n"] == te.sum() and rec["n_train"] == tr.sum()
    assert pooled["brier_raw"] == pytest.approx(np.mean((p[te] - y[te]) ** 2))
    assert pooled["brier_recalibrated"] == pytest.approx(np.mean((fitted[te] - y[te]) ** 2))
    assert pooled["brier_base_rate"] == pytest.approx(np.mean((y[tr].mean() - y[te]) ** 2))
    assert sum(b_["count"] for b_ in pooled["bins_recalibrated"]) == te.sum()
    rep = R.calibration_report(recs, SETTINGS, n_boot=100, controller=False)
    assert rep["verdict_recalibration"]["a"] == pytest.approx(a)
    one_sided = [r for r in recs if r["split"] != "train" or r["family"] == "shift_clean_arrow"]
    assert R.verdict_recalibration(one_sided[:5], SETTINGS) is None          # too few train prompts
