"""Adaptation targets × signals (ttt_core.targets; DESIGN §11, issue 12) on tiny random models:
every target really changes the measured query error, the first GD step matches the kernel's
linear prediction, divergence stops with a message, the shared model is never mutated and two
threads give what each gives alone."""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest
import torch

from ttt_core.encoding import encode_few_shot
from ttt_core.generators import digit_shift_task, needle_haystack
from ttt_core.models import build_tiny_model
from ttt_core.paper_gd import LooBatch
from ttt_core.prompt_kernel import compute_prompt_kernel
from ttt_core.readout import FewShotReadout
from ttt_core.targets import (
    TargetConfig,
    TargetRun,
    TargetUnavailableError,
    build_params,
    compare_targets,
    measured_error,
    param_count,
    parse_target,
)
from ttt_core.targets import comparison as C

LLAMA_TARGETS = ["q", "k", "v", "o", "mlp_up", "mlp_gate", "mlp_down", "lora:q:4", "lora:v:4", "norm_attn", "norm_mlp"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def llama():
    return build_tiny_model("llama", seed=1)


@pytest.fixture(scope="module")
def gpt2():
    return build_tiny_model("gpt2", seed=1)


@pytest.fixture(scope="module")
def fewshot():
    return digit_shift_task(3).prompt


@pytest.fixture(scope="module")
def needle():
    return needle_haystack(0, n_words=40)


# ------------------------------------------------------------------ registry
def test_parse_and_param_counts(llama):
    a = llama.adapter
    t = parse_target("lora:q:4")
    assert t.stochastic and t.query_path and t.kind == "q" and t.family == "lora"
    assert param_count(llama, "lora:q:4") == a.n_layers * 4 * (a.spec(0, "q").in_features + a.spec(0, "q").out_features)
    assert param_count(llama, "norm_attn") == a.n_layers * a.hidden_size
    assert param_count(llama, "v", last_layers=1) == a.spec(0, "v").in_features * a.spec(0, "v").out_features
    for name in LLAMA_TARGETS:
        assert build_params(llama, name).n_params == param_count(llama, name)
    with pytest.raises(ValueError, match="unknown target"):
        parse_target("w_z")
    with pytest.raises(TargetUnavailableError, match="no 'mlp_gate'"):
        build_params(build_tiny_model("gpt2", seed=0), "mlp_gate")


# ------------------------------------------------------------------ engines change the measured error
@pytest.mark.parametrize("prompt_name", ["fewshot", "needle"])
def test_every_target_changes_the_measured_error(llama, prompt_name, request):
    p = request.getfixturevalue(prompt_name)
    for name in LLAMA_TARGETS:
        run = TargetRun(llama, p, TargetConfig(target=name, steps=2, span=16, lr=1e-2))
        base = run.prepare()
        recs = run.run_to_end()
        assert run.status == "done", (name, run.reason)
        e0, e2 = measured_error(base), measured_error(recs[-1])
        assert e0 is not None and e2 is not None
        assert abs(e2 - e0) > 1e-7, name
        assert run.route == ("frozen_kv" if name in ("q", "lora:q:4") else "full")


@pytest.mark.parametrize("signal", ["entropy", "syttta"])
def test_other_signals_run_and_change_the_error(gpt2, fewshot, signal):
    for name in ["v", "norm_attn", "norm_mlp_bias", "lora:o:4"]:
        run = TargetRun(gpt2, fewshot, TargetConfig(target=name, signal=signal, steps=2, span=16, lr=1e-2))
        base = run.prepare()
        recs = run.run_to_end()
        assert run.status == "done", run.reason
        assert abs(measured_error(recs[-1]) - measured_error(base)) > 1e-7, name


def test_entropy_signal_lowers_the_query_entropy(llama, fewshot):
    run = TargetRun(llama, fewshot, TargetConfig(target="mlp_down", signal="entropy", steps=4, lr=3e-3))
    base = run.prepare()
    recs = run.run_to_end()
    assert recs[-1].loss < base.loss


# ------------------------------------------------------------------ one GD step = the kernel's linear prediction
@pytest.mark.parametrize("target", ["lora:v:4", "norm_attn", "mlp_gate"])
def test_one_gd_step_matches_kernel_prediction(llama, fewshot, target):
    try:
        ev = compute_prompt_kernel(llama, fewshot, target)
    except Exception as exc:  # noqa: BLE001 — the kernel of this target has not landed
        pytest.skip(f"kernel of {target} unavailable: {exc}")
    tp = build_params(llama, target, seed=0)
    enc = encode_few_shot(llama, fewshot)
    ro = FewShotReadout(enc, llama.device)
    batch = LooBatch(llama, enc, 0, partial=False)
    n = enc.n
    params = {k: v.detach().clone().requires_grad_(True) for k, v in tp.init().items()}
    s0 = ro.scalars(batch.logits(tp.deltas(params)))
    half = 0.5 * ((ro.targets - s0[:n]) ** 2).sum()
    grads = torch.autograd.grad(half, list(params.values()))
    r = ev.residuals
    np.testing.assert_allclose((ro.targets - s0[:n]).detach().double().numpy(), r, atol=1e-5)
    lam_max = float(np.linalg.eigvalsh(ev.K)[-1])
    eta = 1e-3 / lam_max
    new = {k: -eta * g for k, g in zip(params, grads)}
    with torch.no_grad():
        s1 = ro.scalars(batch.logits(tp.deltas(new))).double().numpy()
    ds = s1 - s0.detach().double().numpy()
    pred = eta * ev.K @ r
    assert np.linalg.norm(ds[:n] - pred) <= 3e-2 * np.linalg.norm(pred)
    if ev.k_x is not None:
        assert ds[n] == pytest.approx(eta * float(ev.k_x @ r), rel=3e-2, abs=1e-9)


# ------------------------------------------------------------------ divergence and isolation
@pytest.mark.parametrize("target", ["norm_attn", "lora:v:4"])
def test_divergence_stops_with_a_message(llama, needle, target):
    # lr 1e3: AdamW moves every entry by ~1e3 a step and the decay (lr·wd = 10) multiplies the
    # deltas by −9 a step, so numbers overflow within ~20 steps (measured: norm_attn step 9, LoRA 17)
    run = TargetRun(llama, needle, TargetConfig(target=target, steps=40, span=16, lr=1e3))
    recs = run.run_to_end()
    assert run.status == "diverged" and recs[-1].status == "diverged"
    assert re.search(r"^step \d+: .*not finite.*; the run stopped and kept the last good deltas", run.reason)
    assert len(recs) < 40 and all(r.status == "ok" for r in recs[:-1])
    assert all(torch.isfinite(d).all() for d in run.deltas.values())
    assert isinstance(run.generate(max_new_tokens=2), str)


def test_model_is_never_mutated(llama, fewshot, needle):
    before = llama.weights_fingerprint()
    for name in ["norm_attn", "lora:q:4", "mlp_gate", "o"]:
        for p in (fewshot, needle):
            run = TargetRun(llama, p, TargetConfig(target=name, steps=2, span=16, lr=1e-2))
            run.run_to_end()
            run.generate(adapted=True, max_new_tokens=2)
    assert llama.weights_fingerprint() == before
    assert all(not p.requires_grad for p in llama.model.parameters())


def _fingerprint(run):
    return [r.loss for r in run.records], {k: v.clone() for k, v in run.deltas.items()}


def test_parallel_threads_equal_runs_alone(llama, needle):
    configs = [TargetConfig(target="norm_attn", steps=3, span=16, lr=1e-2, seed=1),
               TargetConfig(target="lora:v:4", steps=3, span=24, lr=3e-3, seed=7, signal="syttta")]
    alone = []
    for cfg in configs:
        run = TargetRun(llama, needle, cfg)
        run.run_to_end()
        alone.append(_fingerprint(run))
    barrier = threading.Barrier(len(configs))
    out: list = [None] * len(configs)
    errors: list = []

    def work(i):
        try:
            run = TargetRun(llama, needle, configs[i])
            run.prepare()
            barrier.wait()
            run.run_to_end()
            out[i] = _fingerprint(run)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(configs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (la, da), (lb, db) in zip(alone, out):
        assert la == lb
        assert set(da) == set(db) and all(torch.equal(da[k], db[k]) for k in da)


# ------------------------------------------------------------------ comparison
def test_compare_targets_rows_and_winner(llama, needle, monkeypatch):
    real = C.compute_prompt_kernel

    def fake(lm, prompt, subspace, **kw):
        if subspace == "norm_attn":
            raise ValueError("not landed")
        return real(lm, prompt, subspace, **kw)

    monkeypatch.setattr(C, "compute_prompt_kernel", fake)
    cmp = compare_targets(llama, needle, ["q", "lora:q:4", "norm_attn"], ["nll", "entropy"], steps=2,
                          seeds=[0, 1, 2], lr=1e-2, span=16, max_positions=16)
    assert len(cmp.rows) == 6
    r = cmp.row("norm_attn", "nll")
    assert r.kernel.status == "unavailable" and "kernel unavailable: not landed" in r.kernel.note
    assert r.delta_mean is not None                      # the run still happened
    q = cmp.row("q", "nll")
    assert q.kernel.status == "ok" and q.kernel.lambda_star is not None and q.kernel.top_blocks
    assert q.kernel.decision in ("adapt", "don't adapt", "undetermined on this prompt")
    assert q.params == param_count(llama, "q") and q.flops_per_step > 0 and q.seeds_run == 3
    assert len(q.errors) == 3 and len(q.deltas) == 3
    assert cmp.row("q", "entropy").deterministic and cmp.row("q", "entropy").seeds_run == 1
    assert cmp.winner is not None and cmp.winner.split(" / ")[0] in cmp.sentence or "No target" in cmp.sentence
    d = json.loads(json.dumps(cmp.to_dict()))
    assert d["table"][0]["target"] == "q" and "flops_method" in d


def test_winner_sentence_says_when_there_are_too_few_seeds():
    rows = [C.TargetRow("a", "A", "x", "nll", None, 1, C.KernelSummary("ok"), deltas=[-0.2, -0.1], delta_mean=-0.15),
            C.TargetRow("b", "B", "x", "nll", None, 1, C.KernelSummary("ok"), deltas=[-0.1, 0.0], delta_mean=-0.05)]
    _, text, st = C.winner_sentence(rows, [0, 1], "error", 4)
    assert st is None and "too few for a confidence interval" in text
    rows[0].deltas, rows[1].deltas = [-0.2] * 6, [0.1, 0.0, 0.05, 0.1, 0.0, 0.05]
    _, text, st = C.winner_sentence(rows, list(range(6)), "error", 4)
    assert st is not None and st["n"] == 6 and "Paired over 6 seeds" in text


# ------------------------------------------------------------------ suite and CLI
def test_suite_is_cached_and_resumable(tmp_path, monkeypatch):
    from ttt_core.experiments import targets_suite as TS

    lm = build_tiny_model("llama", seed=0)
    s = TS.TargetsSuiteSettings(model=lm.name, targets=("q", "norm_attn"), signals=("nll",), steps=2, lr=1e-2,
                                span=16, needle_words=20, n_demos=4)
    summ = TS.build_suite(lm, s, 2, root=tmp_path)
    assert summ["n_prompts"] == {"digit_shift": 2, "needle": 2}
    assert summ["folder"] == TS.suite_name(s) and "/" not in summ["folder"]   # no machine path in a summary
    assert len(list((tmp_path / "prompts").glob("*.json"))) == 4
    rows = {(r["target"], r["signal"]): r for r in summ["families"]["needle"]}
    assert rows[("norm_attn", "nll")]["vs_reference"] is not None and rows[("q", "nll")]["n"] == 2
    assert "too few tasks" in rows[("norm_attn", "nll")]["vs_reference"]["verdict"]
    monkeypatch.setattr(TS, "run_prompt", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = TS.build_suite(lm, s, 2, root=tmp_path)
    assert again["families"] == summ["families"]
    rec = json.loads((tmp_path / "prompts" / "needle-0000.json").read_text())
    assert rec["provenance"]["command"] and rec["prompt_text"]


def test_suite_with_frozen_kv_is_its_own_suite_and_runs_frozen(tmp_path):
    """kv="frozen" passes through to compare_targets (W_V unavailable, MLP up on the frozen-K/V
    route) and gets its own folder; kv="auto" keeps the hash suites had before kv existed."""
    import hashlib

    from ttt_core.experiments import targets_suite as TS

    auto = TS.TargetsSuiteSettings()
    old = {k: v for k, v in auto.to_dict().items() if k != "kv"}
    assert auto.key() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:12]
    lm = build_tiny_model("llama", seed=0)
    s = TS.TargetsSuiteSettings(model=lm.name, targets=("mlp_up", "v"), signals=("nll",), steps=2, lr=1e-2,
                                span=16, needle_words=20, n_demos=4, families=("needle",), kv="frozen")
    assert s.key() != TS.TargetsSuiteSettings(**{**s.to_dict(), "kv": "auto"}).key()
    TS.build_suite(lm, s, 1, root=tmp_path)
    rec = json.loads((tmp_path / "prompts" / "needle-0000.json").read_text())
    rows = {r["target"]: r for r in rec["comparison"]["rows"]}
    assert rec["settings"]["kv"] == "frozen"
    assert rows["v"]["status"] != "ok" and "keys and values" in json.dumps(rows["v"])
    assert rows["mlp_up"]["status"] == "ok" and "frozen" in rows["mlp_up"]["route"]
    with pytest.raises(ValueError, match="kv must be"):
        TS.TargetsSuiteSettings(kv="full")


def test_a_kernel_suite_records_its_lm_head_mode_and_runs_in_it(tmp_path, head_path_modes):
    """Only the kernel columns read the LM head path, so `lm_head` is in a suite's settings (and its
    key) only with kernels: the committed suites without kernels keep their folders; a kernel
    suite's records are computed in its mode."""
    from ttt_core.experiments import targets_suite as TS

    plain = TS.TargetsSuiteSettings()
    assert "lm_head" not in plain.to_dict()
    assert plain.key() == TS.TargetsSuiteSettings(lm_head="logits").key()
    kern = dict(targets=("q",), signals=("nll",), steps=1, lr=1e-2, span=16, needle_words=20, n_demos=4,
                families=("needle",), kernels=True)
    lm = build_tiny_model("llama", seed=0)
    fused, logits = (TS.TargetsSuiteSettings(model=lm.name, lm_head=m, **kern) for m in ("fused", "logits"))
    assert fused.to_dict()["lm_head"] == "fused" and fused.key() != logits.key()
    seen = head_path_modes
    for s in (fused, logits):
        seen.clear()
        summ = TS.build_suite(lm, s, 1, root=tmp_path / s.lm_head)
        assert seen and set(seen) == {s.lm_head == "fused"}
        check = summ["kernel_check"]["families"]["needle"]            # the kernel columns are checked against the run
        assert check["q"]["n"] == check["all"]["n"] == 1 and 0.0 <= check["q"]["brier"] <= 1.0
    with pytest.raises(ValueError, match="lm_head"):
        TS.TargetsSuiteSettings(lm_head="soft")


def _kernel_record(family, rows):
    return {"family": family, "comparison": {"rows": [
        {"target": t, "signal": sig, "delta_mean": d,
         "kernel": {"status": st, "prob_ttt_beats_icl": p, "decision": dec, "effective_rank": er, "lambda_star": lam,
                    "verdict_T": T}} for t, sig, d, st, p, dec, er, lam, T in rows]}}


def test_kernel_check_scores_the_verdicts_against_the_measured_change():
    """Brier, balanced accuracy and firm-verdict agreement by hand on four prompts; entropy rows,
    rows without a kernel and non-finite changes are left out; a suite without kernels has no check."""
    from ttt_core.experiments import targets_suite as TS
    from ttt_core.noise_posterior import ADAPT, DONT_ADAPT, UNDETERMINED

    probs, deltas = [0.95, 0.8, 0.2, 0.05], [-0.1, 0.05, 0.1, -0.2]      # helped: yes, no, no, yes
    decs = [ADAPT, UNDETERMINED, UNDETERMINED, DONT_ADAPT]
    recs = [_kernel_record("needle", [("q", "nll", d, "ok", p, dec, 2.0 + i, 10.0 * (i + 1), 4.0),
                                      ("q", "entropy", d, "ok", p, dec, 1.0, 1.0, 1.0),
                                      ("o", "nll", d, "skipped", None, None, None, None, None)])
            for i, (p, d, dec) in enumerate(zip(probs, deltas, decs))]
    recs.append(_kernel_record("needle", [("q", "nll", float("nan"), "ok", 0.5, ADAPT, 1.0, 1.0, 1.0)]))
    q = TS.kernel_check(recs)["families"]["needle"]["q"]
    assert q["n"] == 4 and q["helped"] == 2 and set(TS.kernel_check(recs)["families"]["needle"]) == {"q", "all"}
    assert q["brier"] == pytest.approx((0.05 ** 2 + 0.8 ** 2 + 0.2 ** 2 + 0.95 ** 2) / 4)
    assert q["brier_base_rate"] == pytest.approx(0.25)
    assert q["balanced_accuracy"] == pytest.approx(0.5)                  # P ≥ 0.5 on prompts 0, 1
    assert q["firm_agreement"] == pytest.approx(0.5) and q["firm_n"] == 2
    assert (q["adapt"], q["dont_adapt"], q["undetermined"]) == (1, 1, 2)
    assert q["effective_rank_median"] == pytest.approx(3.5) and q["lambda_star_median"] == pytest.approx(25.0)
    assert sum(b["count"] for b in q["reliability"]) == 4
    assert all(b["mean_p"] is None for b in q["reliability"] if b["count"] == 0)   # JSON-safe empty bins
    plain = [_kernel_record("needle", [("q", "nll", -0.1, "skipped", None, None, None, None, None)])]
    assert TS.kernel_check(plain) is None and "kernel_check" not in TS.summarise(
        [{**r, "comparison": {**r["comparison"], "winner": None}} for r in plain])


def test_kernel_transfer_reads_the_newest_suite_with_kernel_columns(tmp_path):
    """The sentence the Steps page shows comes from the first suite (newest first) whose summary has
    a kernel check, with its pooled numbers; suites without one are passed over; none: None."""
    from ttt_core.experiments import targets_suite as TS

    def summary(fams):
        return {"settings": {"targets": ["q", "o"], "signals": ["nll"], "steps": 8, "lr": 1e-4, "kv": "frozen"},
                "n_prompts": {"needle": 3}, "provenance": {"created": "2026-12-03T10:00:00+00:00"},
                **({"kernel_check": {"signal": "nll", "families": fams}} if fams else {})}
    good = {"needle": {"q": {}, "all": {"n": 6, "brier": 0.30, "brier_base_rate": 0.20, "balanced_accuracy": 0.45}}}
    plain = (tmp_path / "a" / "summary.json", summary(None))
    kern = (tmp_path / "b" / "summary.json", summary(good))
    out = TS.kernel_transfer([plain, kern])
    assert out["folder"] == "b" and out["families"]["needle"]["brier"] == 0.30
    assert "did no better than the base rate" in out["sentence"]
    assert "Brier 0.30 against the base rate's 0.20, balanced accuracy 0.45 (6 prompt × target pairs)" in out["sentence"]
    assert "3 prompts, 2 targets, 8 AdamW steps at lr 0.0001 on next-token NLL on a context span (qTTT), keys and values frozen" in out["sentence"]
    better = {"needle": {"all": {"n": 6, "brier": 0.10, "brier_base_rate": 0.20, "balanced_accuracy": None}}}
    out = TS.kernel_transfer([(tmp_path / "c" / "summary.json", summary(better))])
    assert "better than the base rate" in out["sentence"] and "balanced accuracy" not in out["sentence"]
    assert TS.kernel_transfer([plain]) is None


def test_suite_on_worker_processes_matches_the_serial_suite(tmp_path):
    """--workers 2: the same records as in-process (the measured error changes, not the timings),
    and the summary names the worker count."""
    from ttt_core.experiments import targets_suite as TS

    lm = build_tiny_model("llama", seed=0)
    s = TS.TargetsSuiteSettings(model=lm.name, targets=("q", "norm_attn"), signals=("nll",), steps=2, lr=1e-2,
                                span=16, needle_words=20, n_demos=4)
    serial = TS.build_suite(lm, s, 2, root=tmp_path / "serial")
    pooled = TS.build_suite(None, s, 2, root=tmp_path / "pooled", workers=2)
    assert pooled["workers"] == 2 and pooled["provenance"]["machine"]["torch_threads_per_worker"] == 1
    for f in ("digit_shift-0000", "digit_shift-0001", "needle-0000", "needle-0001"):
        a, b = (json.loads((tmp_path / k / "prompts" / f"{f}.json").read_text())["comparison"]
                for k in ("serial", "pooled"))
        assert [r["deltas"] for r in a["rows"]] == [r["deltas"] for r in b["rows"]] and a["winner"] == b["winner"]
    assert [r["mean_delta"] for r in pooled["families"]["needle"]] == [r["mean_delta"] for r in serial["families"]["needle"]]
    with pytest.raises(ValueError, match="a model is needed"):
        TS.build_suite(None, s, 3, root=tmp_path / "other")


def test_latest_summary_falls_back_to_the_published_suite(tmp_path, monkeypatch):
    from ttt_core.experiments import targets_suite as TS

    pub, local = tmp_path / "published", tmp_path / "art"
    monkeypatch.setattr(TS, "published_targets_dir", lambda: pub)
    monkeypatch.setattr(TS, "artifacts_root", lambda: local)
    assert TS.latest_summary() is None
    (pub / "m-1").mkdir(parents=True)
    (pub / "m-1" / "summary.json").write_text(json.dumps({"kind": "ttt_lens_targets_suite", "provenance": {"created": "a"}}))
    path, _ = TS.latest_summary()
    assert path.parent.name == "m-1" and TS.is_published(path)
    (local / "targets" / "m-2").mkdir(parents=True)
    (local / "targets" / "m-2" / "summary.json").write_text(json.dumps({"kind": "ttt_lens_targets_suite",
                                                                        "provenance": {"created": "0"}}))
    path, _ = TS.latest_summary()
    assert path.parent.name == "m-2" and not TS.is_published(path)   # a suite built here wins over the committed one


def test_cli_compare_targets_json(tmp_path, capsys):
    from ttt_core.cli import main

    f = tmp_path / "p.txt"
    f.write_text(digit_shift_task(2, n=4).prompt.to_text())
    rc = main(["compare-targets", str(f), "--model", "tiny-random-llama", "--targets", "q,norm_attn",
               "--steps", "2", "--lr", "1e-2", "--json", "--quiet"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    d = json.loads(out.out)
    assert [r["target"] for r in d["table"]] == ["q", "norm_attn"] and d["sentence"] in out.err
    assert main(["compare-targets", "--model", "tiny-random-llama"]) == 2
    g = tmp_path / "long.txt"
    g.write_text("The cat sat on the mat. " * 8 + "\nQuestion: Where did the cat sit?\nAnswer: mat")
    rc = main(["compare-targets", str(g), "--model", "tiny-random-llama", "--targets", "mlp_down,k", "--steps", "1",
               "--max-positions", "12", "--kv", "frozen", "--json", "--quiet"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    d = json.loads(out.out)
    rows = {r["target"]: r for r in d["rows"]}
    assert d["settings"]["kv"] == "frozen" and rows["mlp_down"]["kernel"]["route"] == "qttt-frozen-kv"
    assert rows["mlp_down"]["route"] == "frozen_kv" and rows["k"]["status"] == "unavailable"


def test_compare_targets_refuses_an_unknown_kv_mode(tiny_llama_for_kv):
    from ttt_core.targets import compare_targets

    with pytest.raises(ValueError, match="kv must be one of"):
        compare_targets(tiny_llama_for_kv, "some text here", ["q"], kv="sometimes")


@pytest.fixture(scope="module")
def tiny_llama_for_kv():
    from ttt_core.models import build_tiny_model

    return build_tiny_model("llama", seed=0)


def test_suite_figure_gives_each_family_its_own_y_axis():
    # would catch: families with different error units (squared error vs nats) drawn on one axis,
    # where the small one's bars are invisible
    from ttt_core.figures.targets import suite_figure

    row = {"target": "q", "signal": "nll", "mean_delta": -0.01, "ci_low": -0.02, "ci_high": 0.0}
    summary = {"families": {"digit_shift": [row], "needle": [{**row, "mean_delta": -5.0, "ci_low": -6.0}]}}
    fig = suite_figure(summary)
    assert [t.name for t in fig.data] == ["digit_shift", "needle"]
    assert [t.yaxis for t in fig.data] == ["y", "y2"] and list(fig.data[1].y) == [-5.0]


def test_kernel_check_figure_has_one_panel_per_family_and_a_trace_per_target():
    """The reliability figure of a suite's kernel check: a panel per family titled with its pooled
    Brier, one legend entry per target (not per panel), the pooled bins in black."""
    from ttt_core.experiments import targets_suite as TS
    from ttt_core.figures.targets import kernel_check_figure
    from ttt_core.noise_posterior import ADAPT

    recs = [_kernel_record(fam, [(t, "nll", d, "ok", p, ADAPT, 1.0, 1.0, 1.0) for t in ("q", "o")])
            for fam in ("digit_shift", "needle") for p, d in ((0.9, -0.1), (0.2, 0.1), (0.6, -0.2))]
    check = TS.kernel_check(recs)
    fig = kernel_check_figure(check).to_dict()
    titles = [a["text"] for a in fig["layout"]["annotations"]]
    assert len(titles) == 2 and f"pooled Brier {check['families']['needle']['all']['brier']:.2f}" in titles[1]
    shown = [tr["name"] for tr in fig["data"] if tr.get("showlegend")]
    assert shown == ["calibrated", "q", "o", "all targets (pooled)"]
    pooled = [tr for tr in fig["data"] if tr["name"] == "all targets (pooled)"]
    assert len(pooled) == 2 and all(tr["marker"]["color"] == "#000000" for tr in pooled)
    assert sum(len(tr["x"]) for tr in pooled) == 6                 # 3 occupied bins per family
