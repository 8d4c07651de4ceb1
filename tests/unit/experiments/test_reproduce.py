"""The paper reproduction (ttt_core.experiments.reproduce): tasks, the sweep GD against the engine,
statistics, files, and identical numbers on the process-pool and Ray backends."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ttt_core.experiments.paper_tasks import PaperDigitPrompt, ReproSettings, paper_task
from ttt_core.experiments.reproduce import run_reproduction
from ttt_core.experiments.reproduce_report import latest_results, to_markdown, write_results
from ttt_core.experiments.stats import paired_stats
from ttt_core.models import build_tiny_model
from ttt_core.paper_gd import PaperConfig, PaperRun, gd_trajectory
from ttt_core.prompt_kernel import compute_prompt_kernel
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
