"""Schedules and the learned controller (issue 7): splits, schedule evaluation math, Pareto front,
controller training (reduces validation loss, never touches test data), persistence, the task
generators, one engine trajectory on a tiny model, and the train-controller CLI at tiny size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ttt_core.experiments import controller as C
from ttt_core.experiments import schedules as S
from ttt_core.experiments import suite_tasks as ST
from ttt_core.experiments.suite import Suite

ROOT = Path(__file__).resolve().parents[3]


# ------------------------------------------------------------------------------------ splits
def test_split_seeds_are_disjoint_and_families_balanced() -> None:
    specs = ST.make_specs(50)
    seeds = {s: {t.seed for t in specs if t.split == s} for s in ST.SPLITS}
    assert not seeds["train"] & seeds["val"] and not seeds["train"] & seeds["test"] and not seeds["val"] & seeds["test"]
    sizes = ST.split_sizes(50)
    assert sizes == {"train": 25, "val": 10, "test": 15}
    assert all(len(seeds[s]) == sizes[s] for s in ST.SPLITS)
    train_fams = [t.family for t in specs if t.split == "train"]
    assert {f: train_fams.count(f) for f in ST.FAMILIES} == {f: 5 for f in ST.FAMILIES}
    # growing the suite keeps the earlier tasks (same ids and seeds)
    small = {t.task_id: t for t in ST.make_specs(10)}
    big = {t.task_id: t for t in ST.make_specs(40)}
    assert all(big[k] == v for k, v in small.items())
    with pytest.raises(ValueError):
        ST.split_sizes(2)


# ------------------------------------------------------------------------------------ synthetic suites
def _stats(rng: np.random.Generator, good: bool) -> dict:
    """Statistics where `good` (adapting helps) is visible in the confidence and verdict."""
    return {"n_positions": 10, "lambda_max": float(rng.uniform(1, 2)), "lambda_2_ratio": 0.5, "lambda_3_ratio": 0.2,
            "eff_rank_entropy": 3.0, "participation_ratio": 2.0, "tau2": 1.0, "sigma2": 0.1, "lambda_star": 0.1,
            "alignment_top3": 0.5, "residual_ms": 0.1, "t_map_fixed": 4.0 if good else 0.0,
            "t_map_profiled": 8.0 if good else 1.0, "gap_ratio_at_t_map": 0.5 if good else 2.0,
            "verdict_beats": good, "confidence": float(rng.uniform(0.1, 0.4) if good else rng.uniform(0.6, 0.9)),
            "n_tokens": 30, "long_context": False}


def synthetic_suite(n_per_split: dict[str, int], seed: int = 0) -> Suite:
    """Tasks whose best action is T = 8 when `good` and skip otherwise."""
    rng = np.random.default_rng(seed)
    st = ST.SuiteSettings(model="synthetic", grid=(1, 2, 4, 8))
    tasks = []
    for split, n in n_per_split.items():
        for i, s in enumerate(ST.split_seeds(split, n)):
            good = bool(i % 2)
            T = np.arange(9)
            err = 0.3 - 0.03 * T if good else 0.1 + 0.02 * T
            err = err + rng.normal(scale=0.002, size=9)
            tasks.append({"task_id": f"{split}-{i:04d}", "split": split, "index": i, "seed": s,
                          "family": "digit_shift" if good else "trap_noise", "meta": {}, "errors": err.tolist(),
                          "seconds": (0.5 * T).tolist(), "stats_seconds": 0.25, "stats": _stats(rng, good)})
    return Suite(st, tasks)


def test_schedule_evaluation_math() -> None:
    suite = synthetic_suite({"test": 6})
    E, sec = suite.errors, suite.seconds
    for T in (0, 1, 2, 4, 8):
        r = S.fixed_schedule(suite, T)
        np.testing.assert_array_equal(r.errors, E[:, T])  # fixed-T error = trajectory at T
        np.testing.assert_array_equal(r.seconds, sec[:, T])
        assert np.all(r.steps == T) and np.all(r.overhead == 0)
    rnd = S.random_schedule(suite)
    np.testing.assert_allclose(rnd.errors, E[:, [0, 1, 2, 4, 8]].mean(axis=1))
    assert rnd.steps[0] == pytest.approx(3.0)
    ev = S.chosen_schedule(suite, S.evidence_steps(suite, "profiled"), "e", "evidence", "")
    T_ev = suite.stat("t_map_profiled").astype(int)
    np.testing.assert_array_equal(ev.errors, E[np.arange(6), T_ev])
    np.testing.assert_allclose(ev.seconds, sec[np.arange(6), T_ev] + 0.25)  # kernel seconds are overhead
    skip = S.skip_steps(suite)
    beats = np.array([t["stats"]["verdict_beats"] for t in suite.tasks])
    np.testing.assert_array_equal(skip, np.where(beats, T_ev, 0))
    lam = 1e-3
    C_ = S.action_costs(suite, lam)
    np.testing.assert_allclose(C_, E[:, [0, 1, 2, 4, 8]] + lam * np.array([0, 1, 2, 4, 8]))
    orc = S.oracle_steps(suite, lam)
    np.testing.assert_array_equal(orc, np.array([0, 1, 2, 4, 8])[C_.argmin(1)])
    assert S.best_fixed_T(suite, lam) == [0, 1, 2, 4, 8][int(C_.mean(0).argmin())]
    rows = S.results_table(S.all_schedules(suite, lam), lam)
    assert rows[0]["schedule"] == "ICL (T = 0)" and rows[0]["mean error"] == pytest.approx(E[:, 0].mean())
    assert rows[0]["SE"] == pytest.approx(E[:, 0].std(ddof=1) / np.sqrt(6))
    assert rows[-1]["kind"] == "oracle" and rows[-1]["mean cost"] <= min(r["mean cost"] for r in rows[:-1]) + 1e-12


def test_pareto_front() -> None:
    x = [0, 1, 2, 3, 1.5, 2]
    y = [5, 3, 4, 1, 3, 2]
    # (0,5) (1,3) (2,2) (3,1) are non-dominated; (1.5,3) is dominated by (1,3); (2,4) by (2,2)
    assert S.pareto_front(x, y) == [0, 1, 5, 3]
    assert S.pareto_front([1, 1], [2, 2]) == [0]
    assert S.pareto_front([], []) == []


# ------------------------------------------------------------------------------------ controller
CFG = C.ControllerConfig(lam=1e-3, epochs=150, patience=40, restarts=2)


def test_controller_training_reduces_validation_loss_and_generalises() -> None:
    suite = synthetic_suite({"train": 20, "val": 10, "test": 10})
    ctrl = C.train_controller(suite, CFG)
    assert ctrl.info["val_loss_best"] < ctrl.info["val_loss_init"]
    assert min(ctrl.history["val"]) < ctrl.history["val"][0]
    test = suite.split("test")
    chosen = ctrl.decide(test)
    best = S.oracle_steps(test, CFG.lam)
    assert np.mean(chosen == best) >= 0.8
    cmp = S.compare_controller(suite, ctrl, CFG.lam, n_boot=2000)
    # a clear gain on 10 test tasks is still too few to decide (DESIGN §10: ≥ 20 tasks)
    assert cmp["n_test"] == 10 and cmp["cost_diff"]["ci_low"] > 0 and cmp["verdict"] == "too few tasks to decide"
    assert "On the test split (10 tasks" in cmp["sentence"]
    assert "too few tasks to decide (10 < 20 paired tasks)" in cmp["sentence"] and "beats" not in cmp["sentence"]


def test_controller_verdict_needs_twenty_test_tasks_ci_and_p() -> None:
    suite = synthetic_suite({"train": 20, "val": 10, "test": 24})
    ctrl = C.train_controller(suite, CFG)
    cmp = S.compare_controller(suite, ctrl, CFG.lam, n_boot=2000)
    st = cmp["cost_diff"]
    assert cmp["n_test"] == 24 and st["ci_low"] > 0 and st["p"] < 0.05 and cmp["verdict"] == "beats"
    assert f"the learned controller beats the best fixed schedule (T = {cmp['best_fixed_T']})" in cmp["sentence"]

    class Fixed:  # the best fixed T itself: every paired difference is 0
        def decide(self, s: Suite) -> np.ndarray:
            return np.full(len(s), cmp["best_fixed_T"])

    same = S.compare_controller(suite, Fixed(), CFG.lam, n_boot=2000)
    assert same["verdict"] == "not distinguishable from" and same["cost_diff"]["p"] == 1.0
    assert (f"not distinguishable from the best fixed schedule (T = {cmp['best_fixed_T']}) (CI includes 0 and "
            "p = 1 ≥ 0.05)") in same["sentence"] and "beats" not in same["sentence"]


def test_controller_never_uses_test_data(tmp_path) -> None:
    suite = synthetic_suite({"train": 12, "val": 6, "test": 6})
    ctrl = C.train_controller(suite, CFG)
    test_seeds = set(suite.split("test").seeds.tolist())
    assert not test_seeds & set(ctrl.info["train_seeds"]) and not test_seeds & set(ctrl.info["val_seeds"])
    assert set(ctrl.info["train_seeds"]) == set(ST.split_seeds("train", 12))
    # scrambling every test task changes nothing in training
    for t in suite.tasks:
        if t["split"] == "test":
            t["errors"] = list(np.random.default_rng(1).uniform(size=9))
            t["stats"]["confidence"] = 123.0
    ctrl2 = C.train_controller(suite, CFG)
    for k, v in ctrl.net.state_dict().items():
        torch.testing.assert_close(v, ctrl2.net.state_dict()[k], rtol=0, atol=0)
    np.testing.assert_array_equal(ctrl.mean, ctrl2.mean)
    # persistence: JSON config + safetensors tensors
    ctrl.save(tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "controller.json").read_text())
    assert meta["config"]["lam"] == CFG.lam and meta["features"] == list(C.FEATURE_NAMES)
    loaded = C.load_controller(tmp_path / "c")
    np.testing.assert_array_equal(loaded.decide(suite), ctrl.decide(suite))
    np.testing.assert_allclose(loaded.logits(C.feature_matrix(suite)), ctrl.logits(C.feature_matrix(suite)), rtol=1e-6)


def test_features_have_no_label_inputs() -> None:
    assert len(C.features({}, 8)) == len(C.FEATURE_NAMES)
    for name in C.FEATURE_NAMES:
        assert "error" not in name and "answer" not in name and "label" not in name
    x = C.features({"lambda_star": None, "tau2": 0.0, "confidence": float("nan")}, 8)
    assert np.all(np.isfinite(x))


# ------------------------------------------------------------------------------------ task generators
def test_trap_generators() -> None:
    st = ST.SuiteSettings()
    p, meta = ST.make_task(ST.TaskSpec("train", 2, 1_000_002, "trap_shift"), st)
    assert all((int(x) + meta["demo_shift"]) % 10 == int(y) for x, y in p.demos)
    assert int(p.query_y) == (int(p.query_x) + meta["shift"]) % 10 and meta["shift"] != meta["demo_shift"]
    p, meta = ST.make_task(ST.TaskSpec("train", 3, 1_000_003, "trap_noise"), st)
    assert meta["noise"] == 1.0
    p, meta = ST.make_task(ST.TaskSpec("train", 4, 1_000_004, "trap_needle"), st)
    (a, b), = p.needle_spans
    assert p.context[a:b] == f"The secret number is {p.answer}."
    fakes = sum(p.context.count(f.split("{v}")[0]) for f in ST.FAKE_NEEDLES)
    assert fakes >= st.n_fakes
    p2, _ = ST.make_task(ST.TaskSpec("train", 4, 1_000_004, "trap_needle"), st)
    assert p2.context == p.context  # deterministic in the seed


# ------------------------------------------------------------------------------------ engine + CLI
TINY = dict(model="tiny-random-llama", grid=(1, 2), fewshot_n=(4, 5), needle_words=(20,), max_positions=12,
            span_long=12)


def test_run_task_records_one_trajectory_on_tiny_model() -> None:
    from ttt_core.models import build_tiny_model
    from ttt_core.qttt import QTTTConfig, QTTTRun

    lm = build_tiny_model("llama")
    st = ST.SuiteSettings(**TINY)
    for fam in ("digit_shift", "needle"):
        spec = ST.TaskSpec("train", 0, 1_000_000, fam)
        rec = ST.run_task(lm, spec, st)
        assert isinstance(rec, ST.SuiteTaskRecord) and rec.to_dict()["task_id"] == rec.task_id
        assert len(rec.errors) == len(rec.seconds) == 3 and rec.seconds[0] == 0.0
        assert rec.steps_done == 2 and np.all(np.diff(rec.seconds) >= 0)
        prompt, _ = ST.make_task(spec, st)
        span = st.span_fewshot if fam == "digit_shift" else st.span_long
        run = QTTTRun(lm, prompt, QTTTConfig(steps=2, span=span, lr=st.lr_fewshot, seed=spec.seed))
        recs = [run.prepare()] + run.run_to_end()
        if fam == "digit_shift":
            ref = [r.query_error for r in recs]
        else:
            ref = [1 - np.exp(-r.answer_nll / run.enc.answer_len) for r in recs]
        np.testing.assert_allclose(rec.errors, ref, rtol=1e-5)
        assert {"t_map_fixed", "t_map_profiled", "verdict_beats", "confidence", "tau2"} <= set(rec.stats)


def test_train_controller_cli_tiny(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "ttt_core", "train-controller", "--model", "tiny-random-llama",
                          "--tasks", "5", "--tiny", "--grid", "1,2", "--epochs", "30", "--restarts", "1",
                          "--lambda", "0.002", "--out", str(tmp_path / "ctrl"), "--suite-dir", str(tmp_path / "suite")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert res["split_sizes"] == {"train": 2, "val": 1, "test": 2} and res["lambda"] == 0.002
    assert "On the test split (2 tasks" in res["comparison"]["sentence"]
    assert "too few tasks to decide (2 < 20 paired tasks)" in res["comparison"]["sentence"]
    assert res["comparison"]["sentence"] in out.stderr  # printed by train-controller
    assert (tmp_path / "ctrl" / "controller.safetensors").exists()
    meta = json.loads((tmp_path / "ctrl" / "controller.json").read_text())
    assert not set(meta["info"]["train_seeds"]) & set(ST.split_seeds("test", 2))
    assert len(list((tmp_path / "suite" / "tasks").glob("*.json"))) == 5


def test_train_controller_cli_rejects_bad_sizes(capsys) -> None:
    from ttt_core.cli import main

    assert main(["train-controller", "--tasks", "2"]) != 0
    err = capsys.readouterr()
    assert "error:" in err.err and "--tasks" in err.err and err.out == ""
