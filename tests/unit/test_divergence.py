"""Diverging updates (issue 15.6) on a tiny random Llama: a huge step stops the run at the first
non-finite loss / gradient / parameter / metric, with a reason naming the step and the cause, and
keeps the last good step's deltas *and* numbers; generation still works afterwards.

What the tiny model does with huge steps (measured, seed 1):
* qTTT, lr = 1e3: AdamW moves W_Q by ~lr a step and the decoupled decay (lr·wd = 10) multiplies
  ΔW by −9 a step, so ‖ΔW‖ ≈ 1e20 by step ~19 and the gradient norm overflows at step ~20.
* Paper mode on W_V, ρ = 1e3 (or any ρ up to ~1e38): the readout saturates (RMSNorm rescales the
  exploding residual stream), the loss stays near n/2 and every number stays finite, so the run
  ends "done" — there is no non-finite state to stop at. Paper mode on W_Q blows up from ρ ≈ 1e22.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import ttt_core.paper_gd as paper_gd
from ttt_core.engine import _layer_norms
from ttt_core.generators import needle_haystack
from ttt_core.models import build_tiny_model
from ttt_core.paper_gd import PaperConfig, PaperRun, gd_trajectory
from ttt_core.prompts import parse_prompt
from ttt_core.qttt import QTTTConfig, QTTTRun

FEWSHOT = parse_prompt("6->5\n6->5\n8->7\n5->4\n7->6\n2->1\n0->9\n3->2\n2->\n# answer: 1")
FEWSHOT_NO_ANSWER = parse_prompt("6->5\n6->5\n8->7\n5->4\n7->6\n2->1\n0->9\n3->2\n2->")
METRICS = ("query_prediction", "query_error", "label_probs", "answer_nll", "answer_prob", "needle_mass",
           "context_nll", "prompt_predictions")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def lm():
    return build_tiny_model("llama", seed=1)


def _numbers(rec) -> list[float]:
    out: list[float] = []
    for k in ("loss", "loss_per_token", "grad_norm", *METRICS, "delta_norms"):
        v = getattr(rec, k)
        vals = v if isinstance(v, list) else list(v.values()) if isinstance(v, dict) else [v]
        out += [float(x) for x in vals if x is not None]
    return out


def _metrics(rec) -> dict:
    return {k: getattr(rec, k) for k in METRICS}


def _kept_step(reason: str) -> int:
    m = re.search(r"kept the last good deltas \((the unadapted weights|the deltas after step (\d+))\)", reason)
    assert m, reason
    return 0 if m.group(2) is None else int(m.group(2))


def check_diverged(run, recs) -> int:
    """The contract of a diverged run; returns the step whose deltas were kept."""
    assert run.status == "diverged", [r.loss for r in recs]
    last = recs[-1]
    # only the last record is divergent, and its reason names that step and a cause
    assert [r.status for r in recs] == ["ok"] * (len(recs) - 1) + ["diverged"]
    assert last.reason == run.reason
    assert re.match(rf"step {last.step}: .*(not finite|non-finite|exceeds)", run.reason), run.reason
    # every number of every good record is finite — delta norms included (an fp32 norm of
    # finite 1e20 deltas overflowed to inf before)
    for r in [run.baseline, *recs[:-1]]:
        assert all(math.isfinite(x) for x in _numbers(r)), (r.step, _numbers(r))
    # the kept deltas are finite and are those of the step the reason names …
    assert all(bool(torch.isfinite(d).all()) for d in run.deltas.values())
    kept = _kept_step(run.reason)
    ref = run.baseline if kept == 0 else recs[kept - 1]
    assert ref.step == kept
    assert last.delta_norms == ref.delta_norms == run.delta_norms()
    assert all(math.isfinite(x) for x in last.delta_norms)
    # … and the divergent record's metrics are that step's (they describe the kept deltas)
    assert _metrics(last) == _metrics(ref)
    # a subsequent generation uses the kept deltas and works
    assert isinstance(run.generate(max_new_tokens=4), str)
    return kept


# ------------------------------------------------------------------------------------------ qTTT
@pytest.mark.parametrize("kind", ["few_shot", "needle"])
def test_qttt_lr_1e3_diverges_and_keeps_the_last_finite_step(lm, kind):
    # would catch: lr 1e3 running on with exploding/inf numbers, a reason without step and cause,
    # inf delta norms in the records, metrics that do not belong to the kept deltas, a broken generate()
    prompt = FEWSHOT if kind == "few_shot" else needle_haystack(0, n_words=60)
    run = QTTTRun(lm, prompt, QTTTConfig(steps=40, span=16, lr=1e3))
    recs = run.run_to_end()
    kept = check_diverged(run, recs)
    assert kept == recs[-1].step - 1          # the gradient / weights blew up: the previous step is kept
    if kind == "few_shot":
        probs = run.label_distribution()
        assert all(math.isfinite(p) for p in probs.values())


def test_qttt_discarded_update_reports_the_kept_deltas_metrics(lm, monkeypatch):
    # would catch: a loss that is bad AT the deltas of step 2 discarding them but reporting step 2's
    # metrics (the record then mixed step 2's metrics with step 1's deltas)
    import ttt_core.qttt as qttt

    real, calls = qttt.span_loss_and_grads, {"n": 0}

    def faulty(*args, **kwargs):
        calls["n"] += 1
        loss, grads = real(*args, **kwargs)
        return (torch.tensor(float("nan")), None) if calls["n"] == 3 else (loss, grads)

    monkeypatch.setattr(qttt, "span_loss_and_grads", faulty)
    prompt = needle_haystack(0, n_words=60)
    run = QTTTRun(lm, prompt, QTTTConfig(steps=6, span=16, lr=1e-2))
    run.lookahead = False  # every step runs its own span forward (so the fault hits step 3's loss)
    recs = run.run_to_end()
    assert check_diverged(run, recs) == 1 and recs[-1].step == 3
    assert "update of step 2" in run.reason and "discarded" in run.reason
    assert _metrics(recs[-1]) != _metrics(recs[1])   # not the discarded step's numbers
    fresh = run._evaluate(run.deltas)                 # the kept deltas, evaluated again
    assert fresh["answer_nll"] == pytest.approx(recs[-1].answer_nll, rel=1e-5)


def test_resumed_run_diverging_at_once_reports_its_last_record(lm, monkeypatch):
    # would catch: a run resumed after a stop that diverges on its first new step reporting the
    # unadapted (step-0) metrics next to the deltas of its last step
    checks = {"n": 0}

    def stop_once():
        checks["n"] += 1
        return checks["n"] == 3                       # stop before step 3, once

    run = QTTTRun(lm, FEWSHOT, QTTTConfig(steps=6, span=16, lr=1e-2), stop=stop_once)
    run.run_to_end()
    assert run.status == "stopped" and len(run.records) == 2
    # resume with an update that blows up: step 3 diverges at once
    monkeypatch.setattr(QTTTRun, "_update", lambda self, d, g: {k: v * float("inf") for k, v in d.items()})
    recs = run.run_to_end()
    assert check_diverged(run, recs) == 2
    assert _metrics(recs[-1]) == _metrics(recs[1]) != _metrics(run.baseline)


# ------------------------------------------------------------------------------------------ paper mode
def test_paper_rho_1e3_on_w_v_stays_finite_on_the_tiny_model(lm):
    # would catch: a huge ρ producing NaN/inf numbers in an 'ok' record (what the page plots) or a
    # broken generate(); on this model W_V saturates instead of blowing up (module docstring)
    run = PaperRun(lm, FEWSHOT, PaperConfig(steps=6, rho=1e3, kind="v"))
    recs = run.run_to_end()
    if run.status == "diverged":
        check_diverged(run, recs)
    else:
        assert run.status == "done" and len(recs) == 6
        assert all(math.isfinite(x) for r in [run.baseline, *recs] for x in _numbers(r))
        assert isinstance(run.generate(max_new_tokens=4), str)


@pytest.mark.parametrize("rho", [1e25, 1e30])
def test_paper_huge_rho_on_w_q_diverges_and_keeps_the_last_finite_step(lm, rho):
    # would catch: non-finite W_Q deltas kept or plotted, a reason without step and cause
    run = PaperRun(lm, FEWSHOT, PaperConfig(steps=6, rho=rho, kind="q"))
    recs = run.run_to_end()
    check_diverged(run, recs)
    assert torch.isfinite(run.loo_predictions()).all()


def test_paper_nan_prediction_without_answer_stops_the_run(lm, monkeypatch):
    # would catch: a NaN query / LOO prediction going unnoticed when the prompt has no '# answer:'
    # (no query error to check) — the record was 'ok' with NaN and the next step diverged with
    # those NaN metrics as its 'last good' numbers
    real, calls = PaperRun._evaluate, {"n": 0}

    def faulty(self, deltas, lookahead=False):
        res = real(self, deltas, lookahead=lookahead)
        calls["n"] += 1
        if calls["n"] == 3:                           # the evaluation after step 2's update
            res["query_prediction"] = float("nan")
            res["prompt_predictions"] = [float("nan")] * len(res["prompt_predictions"])
        return res

    monkeypatch.setattr(PaperRun, "_evaluate", faulty)
    run = PaperRun(lm, FEWSHOT_NO_ANSWER, PaperConfig(steps=5, rho=1e-3, kind="v"))
    recs = run.run_to_end()
    assert recs[-1].step == 2 and "query_prediction is not finite" in run.reason
    assert check_diverged(run, recs) == 1


# ------------------------------------------------------------------------------------------ sweeps
def _all_heads(lm, kind):
    return [(layer, h) for layer in range(lm.adapter.n_layers) for h in range(lm.adapter.heads_of(kind))]


def test_gd_trajectory_diverged_repeats_finite_values(lm):
    # would catch: the sweep returning NaN/inf after a blow-up instead of repeating the last good values
    steps = 6
    res = gd_trajectory(lm, FEWSHOT, "q", _all_heads(lm, "q"), rho=1e25, steps=steps)
    assert res["status"] == "diverged"
    for key in ("prediction", "error", "prompt_mse"):
        arr = np.asarray(res[key], dtype=float)
        assert arr.shape == (steps + 1,) and np.isfinite(arr).all(), (key, arr)
        assert len(set(arr[2:].tolist())) == 1, (key, arr)   # diverged at step 2: step 1 repeated


def test_gd_trajectory_rho_1e3_on_w_v_is_finite(lm):
    # would catch: non-finite sweep values at ρ = 1e3 (here W_V saturates: 'done', all finite)
    res = gd_trajectory(lm, FEWSHOT, "v", [(2, 0), (2, 1)], rho=1e3, steps=5)
    assert res["status"] in ("done", "diverged")
    for key in ("prediction", "error", "prompt_mse"):
        assert np.isfinite(np.asarray(res[key], dtype=float)).all()


def test_gd_trajectory_skips_a_nan_prediction_step(lm, monkeypatch):
    # would catch: a NaN prediction (no target to check) entering the sweep's arrays as an 'ok' step
    real, calls = PaperRun._evaluate, {"n": 0}

    def faulty(self, deltas, lookahead=False):
        res = real(self, deltas, lookahead=lookahead)
        calls["n"] += 1
        if calls["n"] == 3:
            res["query_prediction"] = float("nan")
        return res

    monkeypatch.setattr(paper_gd.PaperRun, "_evaluate", faulty)
    res = gd_trajectory(lm, FEWSHOT_NO_ANSWER, "v", [(2, 0), (2, 1)], rho=1e-3, steps=5)
    assert res["status"] == "diverged" and res["error"] is None
    pred = np.asarray(res["prediction"], dtype=float)
    assert np.isfinite(pred).all() and len(set(pred[1:].tolist())) == 1


def test_layer_norms_do_not_overflow_for_finite_deltas():
    # would catch: ‖ΔW‖ computed in fp32 overflowing to inf for finite entries of ~1e20
    d = {(0, "q"): torch.full((64, 64), 1e20), (1, "q"): torch.ones(2, 2)}
    norms = _layer_norms(3, d)
    assert norms[0] == pytest.approx(64e20, rel=1e-6) and norms[1] == pytest.approx(2.0) and norms[2] == 0.0
    assert math.isinf(_layer_norms(1, {(0, "q"): torch.full((2, 2), float("inf"))})[0])


def test_layer_norms_checked_flags_any_non_finite_entry():
    # would catch: the fused finiteness check (one norm over all deltas) missing a single NaN or inf,
    # or calling finite entries whose fp32 norm overflows non-finite
    from ttt_core.engine import _layer_norms_checked

    ok = {(0, "q"): torch.ones(4, 4), (2, "q"): torch.full((8, 8), 1e20)}
    norms, finite = _layer_norms_checked(3, ok)
    assert finite and norms[0] == pytest.approx(4.0) and norms[1] == 0.0 and norms[2] == pytest.approx(8e20, rel=1e-6)
    for bad in (float("nan"), float("inf"), -float("inf")):
        d = {k: v.clone() for k, v in ok.items()}
        d[(0, "q")][3, 1] = bad
        assert _layer_norms_checked(3, d)[1] is False


def test_qttt_update_with_a_non_finite_weight_stops_at_that_step(lm, monkeypatch):
    # would catch: an update that writes one NaN into ΔW_Q passing the engine's check (the run would
    # then go on with NaN weights), or the record of the last kept step being dropped
    import ttt_core.qttt as qttt

    real = qttt.QTTTRun._update

    def poisoned(self, deltas, grads):
        new = real(self, deltas, grads)
        if len(self.records) == 2:
            key = sorted(new)[len(new) // 2]
            new[key] = new[key].clone()
            new[key][0, 0] = float("nan")
        return new

    monkeypatch.setattr(qttt.QTTTRun, "_update", poisoned)
    run = QTTTRun(lm, needle_haystack(0, n_words=60), QTTTConfig(steps=6, span=16, lr=1e-3))
    recs = run.run_to_end()
    assert run.status == "diverged" and "non-finite weights" in run.reason and "step 3" in run.reason
    assert all(torch.isfinite(d).all() for d in run.deltas.values())
    assert recs[-1].step == 3 and all(math.isfinite(x) for x in recs[-1].delta_norms)
