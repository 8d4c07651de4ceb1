"""The paper reproduction (ttt_core.experiments.reproduce): tasks, the sweep GD against the engine,
statistics, files, and identical numbers on the process-pool and Ray backends."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from ttt_core import theory
from ttt_core.experiments import stats as ST
from ttt_core.experiments.paper_tasks import PaperDigitPrompt, ReproSettings, paper_task
from ttt_core.experiments.reproduce import _exp2, _restrict, run_reproduction
from ttt_core.experiments.reproduce_report import (
    LINEARISED_LABEL,
    findings,
    latest_results,
    summarize,
    to_markdown,
    write_results,
)
from ttt_core.experiments.stats import paired_stats, suite_verdict
from ttt_core.models import build_tiny_model
from ttt_core.noise_posterior import noise_posterior
from ttt_core.paper_gd import PaperConfig, PaperRun, gd_trajectory
from ttt_core.prompt_kernel import compute_prompt_kernel
from ttt_core.scores import resolvent
from ttt_core.steps import block_kernel, select_blocks

TINY = ReproSettings(model="tiny-random-llama", tasks=2, grid_max=4, fixed_T=2, exp2="both", exp2_layers=2,
                     exp2_budgets=(1, 2), exp2_random_draws=2, exp2_gd_tasks=1, n_boot=500)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model("llama", seed=0)


def test_tasks_are_seeded_and_use_all_ten_digits():
    a, b, c = paper_task(7, 3), paper_task(7, 3), paper_task(7, 4)
    assert a.prompt.to_text() == b.prompt.to_text() != c.prompt.to_text()
    assert isinstance(a.prompt, PaperDigitPrompt) and a.prompt.labels == [str(d) for d in range(10)]
    assert a.prompt.label_values()["9"] == 1.0 and a.prompt.label_values()["3"] == pytest.approx(3 / 9)
    assert a.prompt.n == 10 and a.noise in (0.0, 0.55) and a.prompt.sep in ("->", ":")


def _engine_vs_sweep(lm, kind, last, steps=4, c=0.2):
    p = paper_task(11, 0).prompt
    ev = compute_prompt_kernel(lm, p, kind)
    blocks = select_blocks(ev, last)
    K, _ = block_kernel(ev, blocks)
    lmax = float(np.linalg.eigvalsh(K)[-1])
    rho = c / lmax
    fast = gd_trajectory(lm, p, kind, blocks, rho, steps)   # layers below the first updated one run once
    run = PaperRun(lm, p, PaperConfig(steps=steps, rho=rho, lambda_max=lmax, kind=kind, heads=blocks, partial=False))
    base = run.prepare()
    recs = run.run_to_end()
    eng = np.array([base.query_prediction] + [r.query_prediction for r in recs])
    err = np.array([base.query_error] + [r.query_error for r in recs])
    pm = np.array([np.mean((ev.targets - np.array(r.prompt_predictions)) ** 2) for r in [base] + recs])
    np.testing.assert_allclose(fast["prediction"], eng, atol=2e-6)
    np.testing.assert_allclose(fast["error"], err, atol=4e-6)
    np.testing.assert_allclose(fast["prompt_mse"], pm, atol=4e-6)
    assert np.abs(eng[-1] - eng[0]) > 1e-3  # the run moved


@pytest.mark.parametrize("kind", ["v", "q"])
def test_sweep_gd_equals_the_engine_tiny(tiny, kind):
    _engine_vs_sweep(tiny, kind, last=2)


def test_sweep_gd_without_prefix_cache_gpt2():
    _engine_vs_sweep(build_tiny_model("gpt2", seed=0), "v", last=1)


@pytest.mark.smollm2
def test_sweep_gd_equals_the_engine_smollm2():
    from ttt_core.models import load_model

    _engine_vs_sweep(load_model(), "v", last=4, steps=2, c=0.1)


def test_paired_stats():
    rng = np.random.default_rng(0)
    base = rng.normal(1.0, 0.1, 200)
    better = base - 0.05 + rng.normal(0, 0.01, 200)
    s = paired_stats(base, better, 2000, seed=1)
    assert s["mean"] == pytest.approx(np.mean(base - better))
    assert 0 < s["ci_low"] < s["mean"] < s["ci_high"] and s["p"] < 0.01
    same = paired_stats(base, base + rng.normal(0, 0.01, 200), 2000, seed=1)
    assert same["ci_low"] < 0 < same["ci_high"] and same["p"] > 0.01
    assert paired_stats(base, base, 100)["p"] == 1.0


def _paired_stats_handwritten(base, method, n_boot=10_000, seed=0):
    """The hand-written implementation `paired_stats` had before SciPy (the reference): percentile
    bootstrap of mean(d) and a two-sided sign-flip permutation p = (1 + #{|mean*| ≥ |mean|})/(B + 1)."""
    d = np.asarray(base, dtype=float) - np.asarray(method, dtype=float)
    m = d.size
    rng = np.random.default_rng(seed)
    mean = float(d.mean())
    se = float(d.std(ddof=1) / np.sqrt(m))
    idx = rng.integers(0, m, size=(n_boot, m))
    boots = d[idx].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n_boot, m))
    perm = (signs * d).mean(axis=1)
    p = (1 + int(np.sum(np.abs(perm) >= abs(mean) - 1e-15))) / (n_boot + 1)
    if np.all(d == 0):
        p = 1.0
    return {"mean": mean, "se": se, "ci_low": float(lo), "ci_high": float(hi), "p": float(p)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scipy_paired_stats_agree_with_the_handwritten_reference(seed):
    """m = 40 seeded normal differences with a moderate effect (p ≈ 0.1–0.3). B = 10 000 resamples
    each. CI endpoints: the Monte-Carlo SE of a 2.5 %/97.5 % bootstrap quantile is
    √(q(1−q)/B)/φ(1.96) · se ≈ 0.027 se; BCa (SciPy) and percentile (reference) differ by
    O(skewness/√m) beyond that, so the endpoints must agree within 4 MC SEs of the difference of two
    independent estimates (≈ 0.15 se). p-values: within 3 MC SEs, √(2p(1−p)/B)."""
    rng = np.random.default_rng(seed)
    d = rng.normal(0.25, 1.0, 40)
    base = rng.normal(1.0, 0.3, 40)
    method = base - d
    B = 10_000
    ref = _paired_stats_handwritten(base, method, B, seed=0)
    new = paired_stats(base, method, B, seed=0)
    assert set(new) >= {"mean", "se", "ci_low", "ci_high", "p"} and new["n"] == 40
    assert new["mean"] == pytest.approx(ref["mean"], rel=1e-12) and new["se"] == pytest.approx(ref["se"], rel=1e-12)
    q = 0.025
    mc_endpoint = np.sqrt(q * (1 - q) / B) / (np.exp(-1.96 ** 2 / 2) / np.sqrt(2 * np.pi)) * ref["se"]
    tol = 4 * np.sqrt(2) * mc_endpoint
    assert abs(new["ci_low"] - ref["ci_low"]) < tol and abs(new["ci_high"] - ref["ci_high"]) < tol
    assert new["ci_low"] < new["mean"] < new["ci_high"]
    mc_p = np.sqrt(2 * ref["p"] * (1 - ref["p"]) / B)
    assert 0.01 < ref["p"] < 0.9 and abs(new["p"] - ref["p"]) < 3 * mc_p


def test_paired_stats_degenerate_cases():
    z = np.linspace(0, 1, 30)
    zero = paired_stats(z, z, 1000)
    assert zero["p"] == 1.0 and zero["mean"] == 0.0 and zero["ci_low"] == zero["ci_high"] == 0.0
    const = paired_stats(np.full(30, 0.75), np.full(30, 0.25), 1000)   # all d equal: BCa degenerate
    assert const["ci_low"] == const["ci_high"] == 0.5 and const["p"] == pytest.approx(2 / 1001)  # 2·(1/(B+1))
    two = paired_stats([1.0, 2.0], [0.5, 1.5], 1000)            # m < 3: percentile, exact p over 4 sign flips
    assert two["p"] == pytest.approx(0.5) and two["ci_low"] == two["ci_high"] == pytest.approx(0.5)
    three = paired_stats([1.0, 2.0, 3.0], [0.0, 0.0, 2.9], 1000)  # exact: 2 of 8 sign patterns reach |mean|
    assert three["p"] == pytest.approx(0.25) and np.isfinite(three["ci_low"]) and np.isfinite(three["ci_high"])
    one = paired_stats([1.0], [0.0], 1000)
    assert one["p"] == 1.0 and np.isnan(one["ci_low"]) and one["n"] == 1
    a, b = paired_stats(z, z[::-1], 500, seed=3), paired_stats(z, z[::-1], 500, seed=3)
    assert a == b                                               # seeded


# ------------------------------------------------------------------------------------ verdict wording


def test_suite_verdict_rule():
    clear = {"mean": 0.1, "se": 0.01, "ci_low": 0.05, "ci_high": 0.15, "p": 0.001}
    v = suite_verdict(clear, 25, "the claim reproduces", "the claim does not reproduce", "T = 8")
    assert v.outcome == ST.BETTER and v.decided and str(v) == "the claim reproduces"
    neg = {**clear, "mean": -0.1, "ci_low": -0.15, "ci_high": -0.05}
    assert suite_verdict(neg, 25, "a", "worse than T = 8", "T = 8").text == "worse than T = 8"
    few = suite_verdict(clear, 19, "a", "b", "T = 8", "the paper found more")
    assert few.outcome == ST.TOO_FEW and few.text == "too few tasks to decide (19 < 20 paired tasks); the paper found more"
    p_big = suite_verdict({**clear, "p": 0.06}, 25, "a", "b", "T = 8")
    assert p_big.outcome == ST.UNDECIDED and p_big.text == "not distinguishable from T = 8 (p = 0.06 ≥ 0.05)"
    ci0 = suite_verdict({**clear, "ci_low": -0.01}, 25, "a", "b", "ICL")
    assert ci0.text == "not distinguishable from ICL (CI includes 0)"
    both = suite_verdict({**clear, "ci_low": -0.01, "p": 0.5}, 25, "a", "b", "ICL")
    assert both.text == "not distinguishable from ICL (CI includes 0 and p = 0.5 ≥ 0.05)"
    assert suite_verdict({"mean": 0.1}, 30, "a", "b", "ICL").outcome == ST.UNDECIDED   # no CI, no p: no claim
    assert suite_verdict({**clear, "n": 40}, None, "a", "b", "ICL").decided            # m from paired_stats


def _synthetic_tasks(m: int, effect: bool, seed: int = 0) -> tuple[list[dict], ReproSettings]:
    """Per-task records shaped like `run_task`'s: Exp1 (W_V) trajectories on grid 0..4 with T_MAP = 4
    and Exp2 (measured GD) at budgets 1, 2. With `effect` the query error falls clearly with T and
    Query-Aware beats Trace-TopK; without, every compared pair differs by exactly ±δ in alternation
    (mean difference 0)."""
    s = ReproSettings(model="synthetic", tasks=m, grid_max=4, fixed_T=2, exp1_kinds=("v",), exp2="gd",
                      exp2_budgets=(1, 2), exp2_random_draws=2, n_boot=2000)
    rng = np.random.default_rng(seed)
    tasks = []
    for i in range(m):
        sign = 1.0 if i % 2 else -1.0
        if effect:
            err = 0.2 - 0.02 * np.arange(5) + rng.normal(0, 0.004, 5)
        else:
            err = np.full(5, 0.2)
            err[[0, 4]] += sign * 0.01   # ICL and T_MAP: ±δ around T = 2
        gd = lambda q, f: {"gd": {"query_error": float(q), "prompt_mse": float(f), "status": "done"}}  # noqa: E731
        qa = 0.1 + (-0.03 + rng.normal(0, 0.005) if effect else sign * 0.01)
        budgets = {str(b): {"query_aware": gd(qa, 0.05), "trace_topk": gd(0.1, 0.05 + (0.0 if effect else sign * 0.01)),
                            "trace_bottomk": gd(0.12, 0.06), "random_0": gd(0.11, 0.05), "random_1": gd(0.11, 0.05)}
                   for b in (1, 2)}
        tasks.append({"index": i, "noise": 0.0, "exp1": {"v": {
            "blocks": 4, "first_layer": 0, "last_layer": 1, "t_map_fixed": 4, "t_map_profiled": 4, "status": "done",
            "measured_error": err.tolist(), "linear_error": err.tolist()}},
            "exp2": {"candidates": 4, "candidate_layers": [0, 1], "ridge": 0.1, "budgets": budgets}})
    return tasks, s


def test_two_tasks_are_too_few_to_decide():
    tasks, s = _synthetic_tasks(2, effect=True)
    lines = findings(summarize(tasks, s))
    text = " ".join(lines)
    assert "too few tasks to decide (2 < 20 paired tasks)" in text
    for claim in ("reproduces", "beats", "worse", "fits the prompt better"):
        assert claim not in text


def test_twenty_tasks_with_a_clear_effect_reproduce():
    tasks, s = _synthetic_tasks(24, effect=True)
    summ = summarize(tasks, s)
    lines = findings(summ)
    ev = next(x for x in lines if x.startswith("W_V heads: evidence fixed-σ"))
    assert "better than T = 2: the paper's claim reproduces here" in ev and summ["exp1"]["v"]["rows"][3]["vs_T8"]["p"] < 0.05
    assert "TTT at T = 2 beats ICL, as in the paper" in lines[0]
    exp2 = next(x for x in lines if x.startswith("Exp2 (measured GD): query MSE"))
    assert "budget 1: " in exp2 and "Query-Aware beats Trace-TopK" in exp2 and "too few" not in exp2
    assert "Budgets where the rule decides: 2 for Query-Aware, 0 for Trace-TopK, 0 undecided, of 2" in exp2


def test_twenty_tasks_without_an_effect_are_not_distinguishable():
    tasks, s = _synthetic_tasks(24, effect=False)
    lines = findings(summarize(tasks, s))
    text = " ".join(lines)
    assert "not distinguishable from T = 2 (CI includes 0 and p = 1 ≥ 0.05)" in text
    assert "not distinguishable from ICL" in lines[0] and "not distinguishable from Trace-TopK" in text
    assert "reproduces" not in text and "beats" not in text and "too few" not in text
    assert "Budgets where the rule decides: 0 for Query-Aware, 0 for Trace-TopK, 2 undecided" in text


def test_settings_default_to_real_gd_on_every_task():
    s = ReproSettings()
    assert s.exp2 == "gd" and s.exp2_gd_tasks is None and s.runs_exp2_gd(0) and s.runs_exp2_gd(10 ** 6)
    assert not ReproSettings(exp2="linear").runs_exp2_gd(0)
    assert ReproSettings(exp2="both", exp2_gd_tasks=1).runs_exp2_gd(0) and not ReproSettings(exp2_gd_tasks=1).runs_exp2_gd(1)
    assert ReproSettings(**s.to_dict()) == s
    from ttt_core.cli import build_parser

    args = build_parser().parse_args(["reproduce"])
    assert args.exp2 == "gd" and args.exp2_gd_tasks is None
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["reproduce"].format_help().split())
    assert "linearised" in help_text and "greedy rule maximises" in help_text and "default: all tasks" in help_text


def test_exp2_trace_ranking_uses_the_lambda_star_ridge(tiny):
    s = ReproSettings(model="tiny-random-llama", tasks=1, grid_max=4, fixed_T=2, exp2="linear", exp2_layers=2,
                      exp2_budgets=(1, 2), exp2_random_draws=1)
    p = paper_task(5, 0).prompt
    ev = compute_prompt_kernel(tiny, p, "v")
    rec = _exp2(tiny, p, ev, s, 0.1, 0)
    L, H = ev.n_layers, ev.n_blocks_per_layer
    first = max(0, L - s.exp2_layers)
    cands = [(l, h) for l in range(first, L) for h in range(H)]
    K_cand, _ = block_kernel(ev, cands)
    lam, U = theory.eigh_psd(K_cand)
    ridge = float(noise_posterior(lam, U.T @ ev.residuals).lambda_star.median)
    assert "sigma2_hat" not in rec and rec["ridge"] == pytest.approx(ridge, rel=1e-12)
    assert rec["ridge"] != pytest.approx(float(ev.residuals @ ev.residuals) / ev.n)  # not σ̂² = ‖r‖²/n
    trace = _restrict(ev, range(first, L)).trace_scores(resolvent(lam, U, ridge)).reshape(-1)
    top = [cands[i] for i in np.argsort(-trace, kind="stable")]
    from ttt_core.types import block_label

    assert rec["budgets"]["2"]["trace_topk"]["blocks"] == [block_label(l, h, "v") for l, h in top[:2]]
    assert rec["budgets"]["2"]["trace_bottomk"]["blocks"] == [block_label(l, h, "v") for l, h in top[::-1][:2]]


def _numbers(res):
    """Everything computed per task and in the summary, minus timings."""
    tasks = [{k: v for k, v in t.items() if k != "seconds"} for t in res["tasks"]]
    return json.dumps({"tasks": tasks, "summary": res["summary"], "findings": res["findings"]}, sort_keys=True)


def test_process_pool_and_ray_give_identical_numbers(tmp_path):
    pool = run_reproduction(TINY, backend="process", workers=2)
    ray_ = run_reproduction(TINY, backend="ray", workers=2)
    assert pool["summary"]["tasks_ok"] == ray_["summary"]["tasks_ok"] == 2
    assert not pool["summary"]["tasks_failed"]
    assert _numbers(pool) == _numbers(ray_)
    # the result has every table the Markdown needs, and files round-trip
    s = pool["summary"]
    rows = [r["method"] for r in s["exp1"]["v"]["rows"]]
    assert rows == ["icl", "fixed_8", "best_fixed", "evidence_fixed", "evidence_profiled"]
    assert set(s["exp1"]) == {"v", "q"} and s["exp2"]["gd"]["1"]["tasks"] == 1 and s["exp2"]["linear"]["2"]["tasks"] == 2
    e = np.array([t["exp1"]["v"]["measured_error"] for t in pool["tasks"]])
    assert s["exp1"]["v"]["rows"][0]["mse"] == pytest.approx(e[:, 0].mean())
    assert s["exp1"]["v"]["rows"][1]["mse"] == pytest.approx(e[:, 2].mean())
    md = to_markdown(pool)
    assert "| ICL (T = 0) |" in md and "oracle" in md and "The paper's Table 1" in md and "0.0719 ± 0.0029" in md
    jp, mp = write_results(pool, tmp_path)
    assert jp.exists() and mp.read_text() == md
    found = latest_results(tmp_path)
    assert found is not None and found[0] == jp and _numbers(found[1]) == _numbers(pool)
    # 2 tasks: every verdict says so, and both Exp2 sources are labelled
    text = " ".join(pool["findings"])
    assert "too few tasks to decide (2 < 20 paired tasks)" in text and "reproduces here" not in text
    assert f"Exp2 ({LINEARISED_LABEL})" in text and "Exp2 (measured GD)" in text
    assert f"## Exp2 — block selection ({LINEARISED_LABEL}" in md and "Rule: a verdict needs ≥ 20 paired tasks" in md
    assert all("ridge" in t["exp2"] and t["exp2"]["ridge"] > 0 for t in pool["tasks"])


def test_a_cached_sweep_resumes_without_recomputing(tiny, tmp_path, monkeypatch):
    import ttt_core.experiments.reproduce as R

    s = dataclasses.replace(TINY, exp2="off", tasks=2)
    first = run_reproduction(s, backend="serial", lm=tiny, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.glob("task-*.json"))
    assert len(files) == 2

    def boom(*a, **k):
        raise AssertionError("a cached task was recomputed")

    monkeypatch.setattr(R, "run_task", boom)
    again = run_reproduction(s, backend="serial", lm=tiny, cache_dir=tmp_path)
    assert json.dumps(again["tasks"], default=float) == json.dumps(first["tasks"], default=float)
    # a changed setting does not read the old records
    monkeypatch.undo()
    other = run_reproduction(dataclasses.replace(s, c=0.2), backend="serial", lm=tiny, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("task-*.json"))) == 4
    assert other["tasks"][0]["c"] == 0.2
    # more tasks with the same settings: the first two come from the cache, only the third runs
    monkeypatch.setattr(R, "run_task", lambda lm, i, s, c=None: (_ for _ in ()).throw(AssertionError("cached"))
                        if i < 2 else {"index": i, "c": c, "exp1": {}, "exp2": None})
    more = R._map_cached([("task", i, dataclasses.replace(s, tasks=3).to_dict(), first["tasks"][0]["c"])
                          for i in range(3)], tmp_path, "tasks", model=s.model, backend="serial", lm=tiny)
    assert [t["index"] for t in more] == [0, 1, 2] and more[0] == first["tasks"][0]


def test_linearised_against_real_gd_uses_only_the_tasks_with_both():
    """`--exp2 both --exp2-gd-tasks N`: the agreement table compares the two sources on the N tasks
    that carry both. Here the linearised error is the GD error + 0.002 for every selection of the
    first 10 tasks, so the mean |difference| is 0.002 and Query-Aware's gain over Random is the same
    under both (r = 1); the other 14 tasks (GD only) are left out."""
    tasks, s = _synthetic_tasks(24, effect=True)
    s = dataclasses.replace(s, exp2="both", exp2_gd_tasks=10)
    for t in tasks[:10]:
        for row in t["exp2"]["budgets"].values():
            for sel in row.values():
                sel["linear"] = {"query_error": sel["gd"]["query_error"] + 0.002, "prompt_mse": sel["gd"]["prompt_mse"]}
    summ = summarize(tasks, s)
    agree = summ["exp2"]["linear_vs_gd"]
    assert agree["tasks"] == 10 and set(agree["budgets"]) == {"1", "2"}
    for e in agree["budgets"].values():
        assert e["tasks"] == 10 and e["mean_abs_diff"] == pytest.approx(0.002, abs=1e-12)
        assert e["qa_gain_correlation"] == pytest.approx(1.0, abs=1e-9)
        assert e["qa_vs_topk_linear"]["mean"] == pytest.approx(e["qa_vs_topk_gd"]["mean"], abs=1e-12)
    line = next(x for x in findings(summ) if x.startswith("Exp2, linearised against real GD"))
    assert "same 10 tasks" in line and "too few" not in line
    assert "# Paper" in to_markdown({"settings": s.to_dict(), "summary": summ, "c_source": "given", "backend": "serial",
                                     "workers": 1, "wall_seconds": 1.0, "created": "now", "findings": findings(summ)})
    only_gd, _ = _synthetic_tasks(4, effect=True)
    assert summarize(only_gd, s)["exp2"]["linear_vs_gd"] is None
