"""The live TTT engine (ttt_core.qttt, ttt_core.optim) on tiny random models (DESIGN §1, §2, §3, §7.2)."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ttt_core.qttt as qttt
from ttt_core.attention import forward_rows_with_frozen_kv, forward_with_frozen_kv, prefill, record_attention
from ttt_core.engine import head_masks
from ttt_core.figures.qttt import (
    delta_heatmap,
    label_distribution_figure,
    loss_figure,
    needle_figure,
    quality_figure,
    step_time_figure,
)
from ttt_core.generators import digit_shift_task, needle_haystack
from ttt_core.models import build_tiny_model
from ttt_core.optim import AdamWConfig, DeltaAdamW, clip_grad_norm
from ttt_core.paper_gd import PaperConfig, PaperRun, selected_kernel
from ttt_core.prompts import LongContextPrompt
from ttt_core.qttt import QTTTConfig, QTTTRun, span_loss_and_grads
from ttt_core.token_view import greedy_answer

REPETITIVE = LongContextPrompt(context="abcdefgh " * 40)


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP's
    spin-waiting makes 2-thread runs ~15× slower; restore the setting afterwards."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def llama():
    return build_tiny_model("llama", seed=1)


@pytest.fixture(scope="module")
def needle():
    return needle_haystack(0, n_words=60)


def _zeros(lm, keys):
    return {k: torch.zeros(lm.adapter.spec(*k).out_features, lm.adapter.spec(*k).in_features) for k in keys}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------ frozen-KV forward and gradient
@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
def test_frozen_kv_forward_with_zero_deltas_matches_forward(family):
    lm = build_tiny_model(family, seed=2)
    ids = torch.randint(0, 256, (1, 57), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = lm.model(ids).logits
        _, cache = prefill(lm.model, ids)
        zero = _zeros(lm, [(l, "q") for l in range(lm.adapter.n_layers)])
        with lm.adapter.apply(deltas=zero):
            full = forward_with_frozen_kv(lm.model, ids, cache, 0).logits
            span = forward_with_frozen_kv(lm.model, ids[:, 20:45], cache, 20).logits
    assert (full - ref).abs().max() < 1e-4
    assert (span - ref[:, 20:45]).abs().max() < 1e-4


def _reference_span_loss(lm, cache, ids, start, k, deltas):
    """Explicit Llama forward of rows start…start+k−1: embeddings, RMSNorm, Q = x(W_Q+Δ)ᵀ, RoPE,
    softmax attention against the *detached* prefill K/V with the causal offset, O, MLP, LM head."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inner = lm.model.model
    a = lm.adapter
    H, Hkv, D = a.n_heads, a.n_kv_heads, a.head_dim
    rows = ids[:, start:start + k]
    h = inner.embed_tokens(rows)
    pos = torch.arange(start, start + k)[None]
    cos, sin = inner.rotary_emb(h, pos)
    allowed = torch.arange(cache.length)[None, :] <= (torch.arange(k)[:, None] + start)
    for l, layer in enumerate(inner.layers):
        x = layer.input_layernorm(h)
        at = layer.self_attn
        q = x @ (at.q_proj.weight + deltas[(l, "q")]).T
        q = q.view(1, k, H, D).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        K = cache.keys[l].detach().repeat_interleave(H // Hkv, dim=1)
        V = cache.values[l].detach().repeat_interleave(H // Hkv, dim=1)
        s = (q @ K.transpose(-1, -2)) * D ** -0.5
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        o = (p @ V).transpose(1, 2).reshape(1, k, H * D)
        h = h + at.o_proj(o)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    logits = lm.model.lm_head(inner.norm(h))
    return F.cross_entropy(logits[0], ids[0, start + 1:start + k + 1], reduction="sum")


@pytest.mark.parametrize("heads", [None, [(0, 1), (2, 0), (2, 3)]])
def test_span_gradient_matches_explicit_reference(llama, heads):
    lm = llama
    ids = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(1))
    _, cache = prefill(lm.model, ids)
    masks = head_masks(lm, "q", heads)
    g = torch.Generator().manual_seed(5)
    deltas = {k: 0.05 * torch.randn(lm.adapter.spec(*k).out_features, lm.adapter.spec(*k).in_features, generator=g)
              for k in masks}
    deltas = {k: d if masks[k] is None else d * masks[k] for k, d in deltas.items()}
    loss, grads = span_loss_and_grads(lm, cache, ids, 30, 24, deltas, masks)
    leaves = {(l, "q"): (deltas.get((l, "q"), torch.zeros(lm.adapter.spec(l, "q").out_features,
                                                          lm.adapter.spec(l, "q").in_features))).clone().requires_grad_(True)
              for l in range(lm.adapter.n_layers)}
    ref_loss = _reference_span_loss(lm, cache, ids, 30, 24, leaves)
    ref = dict(zip(leaves, torch.autograd.grad(ref_loss, list(leaves.values()))))
    assert abs(float(loss) - ref_loss.item()) / ref_loss.item() < 1e-5
    for key, gk in grads.items():
        want = ref[key] if masks[key] is None else ref[key] * masks[key]
        assert _rel(gk, want) <= 1e-4, key
        if masks[key] is not None:
            assert torch.all(gk[masks[key][:, 0] == 0] == 0)


# ------------------------------------------------------------------ optimiser
def test_delta_adamw_matches_torch_adamw_on_the_effective_weight():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(12, 7, generator=g)
    grads = [torch.randn(12, 7, generator=g) for _ in range(6)]
    cfg = AdamWConfig(lr=3e-2, weight_decay=0.01)
    opt = DeltaAdamW({(0, "q"): w0}, cfg)
    delta = {(0, "q"): torch.zeros_like(w0)}
    param = torch.nn.Parameter(w0.clone())
    topt = torch.optim.AdamW([param], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    for gr in grads:
        old = delta
        delta = opt.step(delta, {(0, "q"): gr})
        assert old is not delta and torch.equal(old[(0, "q")], old[(0, "q")])  # out of place
        param.grad = gr.clone()
        topt.step()
        torch.testing.assert_close(w0 + delta[(0, "q")], param.detach(), rtol=0, atol=2e-6)


def test_delta_adamw_masked_rows_stay_zero():
    w0 = torch.randn(8, 3)
    mask = torch.zeros(8, 1)
    mask[2:4] = 1
    opt = DeltaAdamW({(0, "q"): w0}, AdamWConfig(lr=0.1), {(0, "q"): mask})
    d = {(0, "q"): torch.zeros(8, 3)}
    for _ in range(3):
        d = opt.step(d, {(0, "q"): torch.randn(8, 3) * mask})
    assert torch.all(d[(0, "q")][mask[:, 0] == 0] == 0)
    assert torch.all(d[(0, "q")][2:4] != 0)


def test_clip_matches_torch():
    grads = {(0, "q"): torch.randn(5, 4) * 3, (1, "q"): torch.randn(5, 4) * 3}
    clipped, norm = clip_grad_norm(grads, 1.0)
    ps = [torch.nn.Parameter(torch.zeros(5, 4)) for _ in grads]
    for p, gr in zip(ps, grads.values()):
        p.grad = gr.clone()
    tnorm = torch.nn.utils.clip_grad_norm_(ps, 1.0)
    assert abs(norm - float(tnorm)) < 1e-5
    for p, gr in zip(ps, clipped.values()):
        torch.testing.assert_close(p.grad, gr)


# ------------------------------------------------------------------ qTTT runs
def test_qttt_loss_decreases_on_repetitive_text(llama):
    run = QTTTRun(llama, REPETITIVE, QTTTConfig(steps=15, span=64, lr=1e-2))
    run.prepare()
    before = run.context_nll({})
    recs = run.run_to_end()
    assert run.status == "done" and len(recs) == 15
    assert run.context_nll() < before - 0.05
    assert np.mean([r.loss for r in recs[-4:]]) < np.mean([r.loss for r in recs[:4]])
    assert all(r.backend == "torch" and r.backend_label for r in recs)
    assert all(len(r.delta_norms) == llama.adapter.n_layers for r in recs)
    assert all(r.context_nll is None for r in recs)  # eval_context_nll is off by default


def test_qttt_records_needle_answer_and_span_clamp(llama, needle):
    run = QTTTRun(llama, needle, QTTTConfig(steps=3, span=10_000, lr=1e-3))
    base = run.prepare()
    assert base.answer_nll is not None and 0 < base.answer_prob <= 1
    assert 0 < base.needle_mass < 1
    recs = run.run_to_end()
    assert all(r.span_len == run.enc.n_ctx - 1 and r.span_start == 0 for r in recs)
    assert all(r.needle_mass is not None and r.answer_prob is not None for r in recs)
    assert recs[-1].elapsed_s >= recs[0].elapsed_s


def test_generate_before_equals_plain_greedy(llama, needle):
    run = QTTTRun(llama, needle, QTTTConfig(steps=2, span=32, lr=1e-3))
    assert run.generate(adapted=False) == greedy_answer(llama, needle)
    assert run.generate(adapted=True) == run.generate(adapted=False)  # zero deltas before any step
    run.run_to_end()
    assert isinstance(run.generate(adapted=True), str)


def test_qttt_few_shot_label_distribution(llama):
    p = digit_shift_task(3).prompt
    run = QTTTRun(llama, p, QTTTConfig(steps=2, span=16, lr=1e-2))
    before = run.label_distribution(adapted=False)
    assert abs(sum(before.values()) - 1) < 1e-5
    recs = run.run_to_end()
    assert recs[-1].query_error is not None
    after = run.label_distribution(adapted=True)
    assert after != before


# ------------------------------------------------------------------ look-ahead (one forward per step)
def test_row_segments_forward_equals_separate_forwards(llama, needle):
    ids = torch.tensor([llama.tokenizer(needle.full_text()).input_ids])
    _, cache = prefill(llama.model, ids)
    n = ids.shape[1]
    segs = [(3, 7), (n - 4, 4)]
    with record_attention([1]) as rec:
        joint = forward_rows_with_frozen_kv(llama.model, ids, cache, segs).logits[0]
    parts = [forward_with_frozen_kv(llama.model, ids[:, s:s + m], cache, s).logits[0] for s, m in segs]
    torch.testing.assert_close(joint, torch.cat(parts), rtol=1e-5, atol=1e-5)
    with record_attention([1]) as rec_last:
        forward_with_frozen_kv(llama.model, ids[:, n - 4:], cache, n - 4)
    torch.testing.assert_close(rec[1], rec_last[1])          # probabilities of the last segment only
    with pytest.raises(ValueError, match="outside the cache"):
        forward_rows_with_frozen_kv(llama.model, ids, cache, [(n - 2, 4)])


def test_grad_segments_leave_logits_and_span_gradient_unchanged(llama, needle):
    """grad_segments=1 (evaluation rows riding along a training forward): the same logits for every
    row and the same W_Q gradient of the first segment's loss as with every segment in autograd —
    to the last bit — while the second segment's rows carry no gradient back to W_Q."""
    ids = torch.tensor([llama.tokenizer(needle.full_text()).input_ids])
    _, cache = prefill(llama.model, ids)
    n = ids.shape[1]
    segs = [(3, 8), (n - 4, 4)]
    keys = [(l, "q") for l in range(llama.adapter.n_layers)]
    torch.manual_seed(0)
    deltas = {k: 1e-2 * torch.randn_like(d) for k, d in _zeros(llama, keys).items()}
    outs = []
    for grad_segments in (None, 1):
        leaves = {k: d.clone().requires_grad_(True) for k, d in deltas.items()}
        with torch.enable_grad(), llama.adapter.apply(deltas=leaves):
            logits = forward_rows_with_frozen_kv(llama.model, ids, cache, segs, grad_segments=grad_segments).logits[0]
            loss = F.cross_entropy(logits[:8].float(), ids[0, 4:12], reduction="sum")
        outs.append((logits.detach(), torch.autograd.grad(loss, list(leaves.values()), retain_graph=True)))
        # the evaluation rows' logits depend on W_Q through their attention only: cut with grad_segments=1
        probe = torch.autograd.grad(logits[8:].sum(), list(leaves.values()), allow_unused=True)
        biggest = max(0.0 if g is None else float(g.abs().max()) for g in probe)
        assert (biggest == 0.0) == (grad_segments == 1), (grad_segments, biggest)
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="grad_segments"):
        forward_rows_with_frozen_kv(llama.model, ids, cache, segs, grad_segments=3)


def _same_records(a, b, keys):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.span_start == rb.span_start
        for k in keys:
            va, vb = getattr(ra, k), getattr(rb, k)
            assert va == pytest.approx(vb, rel=1e-4, abs=1e-6), (ra.step, k, va, vb)


@pytest.mark.parametrize("kind", ["needle", "few_shot"])
def test_qttt_lookahead_equals_separate_passes(llama, needle, kind, monkeypatch):
    """The metrics forward that also runs the next step's span gives the records and deltas of a
    run that does every pass separately (same spans, same losses, same metrics)."""
    real, joint = qttt.forward_rows_with_frozen_kv, []
    monkeypatch.setattr(qttt, "forward_rows_with_frozen_kv", lambda *a, **kw: joint.append(1) or real(*a, **kw))
    prompt = needle if kind == "needle" else digit_shift_task(5).prompt
    keys = ["loss", "answer_nll", "needle_mass"] if kind == "needle" else ["loss", "query_error", "query_prediction"]
    runs = []
    for ahead in (True, False):
        run = QTTTRun(llama, prompt, QTTTConfig(steps=5, span=12, lr=1e-2, seed=4))
        run.lookahead = ahead
        run.run_to_end()
        assert run.status == "done" and run._pending is None
        assert len(joint) == (4 if ahead else 0)           # steps 2…5 reused the look-ahead forward
        joint.clear()
        runs.append(run)
    _same_records(runs[0].records, runs[1].records, keys)
    for k in runs[0].deltas:
        assert _rel(runs[0].deltas[k], runs[1].deltas[k]) < 1e-4


def test_paper_lookahead_equals_separate_passes(llama):
    p = digit_shift_task(4, noise=0.0).prompt
    runs = []
    for ahead in (True, False):
        run = PaperRun(llama, p, PaperConfig(steps=4, c=0.05, kind="v", heads=[(1, 0), (2, 1)]))
        run.lookahead = ahead
        run.run_to_end()
        runs.append(run)
    _same_records(runs[0].records, runs[1].records, ["loss", "query_error", "query_prediction"])
    for ra, rb in zip(runs[0].records, runs[1].records):
        np.testing.assert_allclose(ra.prompt_predictions, rb.prompt_predictions, rtol=1e-5, atol=1e-7)


def test_lookahead_nan_metrics_stop_and_keep_last_good(llama, needle, monkeypatch):
    """A non-finite forward inside the look-ahead (metrics and next loss) stops the run at that step."""
    real = qttt.forward_rows_with_frozen_kv
    calls = {"n": 0}

    def faulty(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] == 2:
            out.logits = out.logits * float("nan")
        return out

    monkeypatch.setattr(qttt, "forward_rows_with_frozen_kv", faulty)
    run = QTTTRun(llama, needle, QTTTConfig(steps=5, span=12, lr=1e-2))
    recs = run.run_to_end()
    assert [r.status for r in recs] == ["ok", "diverged"] and "not finite" in run.reason
    assert run.status == "diverged" and run._pending is None
    assert recs[-1].delta_norms == recs[0].delta_norms      # the update of step 2 was discarded


# ------------------------------------------------------------------ divergence and stop
def test_injected_nan_loss_stops_and_restores_last_good(llama, monkeypatch):
    real = qttt.span_loss_and_grads
    calls = {"n": 0}

    def faulty(*args, **kwargs):
        calls["n"] += 1
        loss, grads = real(*args, **kwargs)
        return (torch.tensor(float("nan")), None) if calls["n"] == 3 else (loss, grads)

    monkeypatch.setattr(qttt, "span_loss_and_grads", faulty)
    run = QTTTRun(llama, REPETITIVE, QTTTConfig(steps=6, span=32, lr=1e-2))
    recs = run.run_to_end()
    assert run.status == "diverged" and "not finite" in run.reason
    assert [r.status for r in recs] == ["ok", "ok", "diverged"]
    assert "not finite" in recs[-1].reason
    # the loss at θ2 was bad → the update of step 2 is discarded: the reported deltas are θ1
    assert recs[-1].delta_norms == recs[0].delta_norms
    assert run.delta_norms() == recs[0].delta_norms
    assert all(torch.isfinite(d).all() for d in run.deltas.values())


def test_injected_nan_gradient_stops(llama, monkeypatch):
    real = qttt.span_loss_and_grads

    def nan_grads(*args, **kwargs):
        loss, grads = real(*args, **kwargs)
        return loss, {k: torch.full_like(g, float("nan")) for k, g in grads.items()}

    monkeypatch.setattr(qttt, "span_loss_and_grads", nan_grads)
    run = QTTTRun(llama, REPETITIVE, QTTTConfig(steps=4, span=32, lr=1e-2))
    recs = run.run_to_end()
    assert run.status == "diverged" and "gradient norm" in run.reason and len(recs) == 1
    assert all(float(d.abs().max()) == 0 for d in run.deltas.values())


def test_huge_learning_rate_diverges_with_finite_deltas(llama):
    run = QTTTRun(llama, REPETITIVE, QTTTConfig(steps=30, span=32, lr=1e30))
    recs = run.run_to_end()
    assert run.status == "diverged", [r.loss for r in recs]
    assert recs[-1].status == "diverged" and recs[-1].reason
    assert all(torch.isfinite(d).all() for d in run.deltas.values())


def test_loss_ratio_rule(llama, monkeypatch):
    """A loss above 10× the same span's unadapted loss (known from the prefill) is a divergence."""
    real = qttt.span_loss_and_grads
    calls = {"n": 0}

    def blow_up(*args, **kwargs):
        calls["n"] += 1
        loss, grads = real(*args, **kwargs)
        return (loss * 11, grads) if calls["n"] == 2 else (loss, grads)

    monkeypatch.setattr(qttt, "span_loss_and_grads", blow_up)
    run = QTTTRun(llama, REPETITIVE, QTTTConfig(steps=5, span=32, lr=1e-3))
    recs = run.run_to_end()
    assert run.status == "diverged" and "exceeds 10×" in run.reason and len(recs) == 2
    assert all(float(d.abs().max()) == 0 for d in run.deltas.values())  # θ0 restored


def test_stop_event_and_callable(llama):
    ev = threading.Event()
    run = QTTTRun(llama, REPETITIVE, QTTTConfig(steps=10, span=16, lr=1e-3), stop=ev)
    n = 0
    for rec in run.steps():
        n += 1
        if rec.step == 2:
            ev.set()
    assert n == 2 and run.status == "stopped" and "after 2" in run.reason
    run2 = QTTTRun(llama, REPETITIVE, QTTTConfig(steps=10, span=16, lr=1e-3))
    for rec in run2.steps():
        if rec.step == 3:
            run2.request_stop()
    assert len(run2.records) == 3 and run2.status == "stopped"
    counter = {"n": 0}
    run3 = QTTTRun(llama, REPETITIVE, QTTTConfig(steps=10, span=16, lr=1e-3),
                   stop=lambda: counter.__setitem__("n", counter["n"] + 1) or counter["n"] > 1)
    assert len(run3.run_to_end()) == 1


# ------------------------------------------------------------------ isolation
def test_base_model_bit_for_bit_unchanged(llama, needle):
    saved = {n: t.detach().clone() for n, t in llama.model.state_dict(keep_vars=False).items()}
    run = QTTTRun(llama, needle, QTTTConfig(steps=3, span=32, lr=1e-2))
    run.run_to_end()
    run.generate(adapted=True)
    PaperRun(llama, digit_shift_task(1).prompt, PaperConfig(steps=2, c=0.5)).run_to_end()
    now = llama.model.state_dict(keep_vars=False)
    assert set(now) == set(saved)
    for n, t in now.items():
        assert torch.equal(t, saved[n]), n
    assert all(not p.requires_grad for p in llama.model.parameters())


def _fingerprint(run):
    return [r.loss for r in run.records], {k: v.clone() for k, v in run.deltas.items()}


def test_parallel_threads_equal_runs_alone(llama, needle):
    configs = [QTTTConfig(steps=4, span=24, lr=1e-2, seed=1),
               QTTTConfig(steps=4, span=40, lr=3e-3, seed=7, heads=[(0, 1), (2, 3)])]
    alone = []
    for cfg in configs:
        run = QTTTRun(llama, needle, cfg)
        run.run_to_end()
        alone.append(_fingerprint(run))
    barrier = threading.Barrier(len(configs))
    out: list = [None] * len(configs)
    errors: list = []

    def work(i):
        try:
            run = QTTTRun(llama, needle, configs[i])
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
    assert alone[0][0] != alone[1][0]


# ------------------------------------------------------------------ paper mode
def test_paper_mode_loss_decreases_and_first_step_is_rho_K_r(llama):
    p = digit_shift_task(4, noise=0.0).prompt
    heads = [(1, 0), (2, 1)]
    run = PaperRun(llama, p, PaperConfig(steps=6, c=0.05, kind="v", heads=heads))
    base = run.prepare()
    assert run.rho_source.startswith("prompt kernel") and run.rho > 0
    K, r = selected_kernel(llama, p, "v", heads)
    assert abs(run.rho - 0.05 / np.linalg.eigvalsh(K)[-1]) < 1e-9 * run.rho
    s0 = np.array(base.prompt_predictions)
    np.testing.assert_allclose(r, np.array([p.label_values()[y] for _, y in p.demos]) - s0, atol=1e-5)
    recs = run.run_to_end()
    losses = [base.loss] + [rec.loss for rec in recs]
    assert losses[0] == pytest.approx(p.n / 2)
    assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0]
    # first step: Δs ≈ ρ K r (linearisation, DESIGN §3); the error is second order in ρ
    ds = np.array(recs[0].prompt_predictions) - s0
    pred = run.rho * K @ r
    assert np.linalg.norm(ds - pred) <= 0.05 * np.linalg.norm(pred)


def test_paper_mode_first_step_matches_autograd_jacobian(llama):
    """Independent of the evidence module: K = ΦΦᵀ with Φ_i = ∇s_i from n explicit backward passes
    over the selected W_Q head rows; the first step's Δs ≈ ρKr and the update equals ρΦᵀr."""
    p = digit_shift_task(6, noise=0.0).prompt
    heads = [(2, 0), (0, 3)]
    run = PaperRun(llama, p, PaperConfig(steps=1, c=0.005, kind="q", heads=heads))
    base = run.prepare()
    masks = run.masks
    leaves = {k: torch.zeros(llama.adapter.spec(*k).out_features, llama.adapter.spec(*k).in_features,
                             requires_grad=True) for k in masks}
    eff = {k: v * masks[k] if masks[k] is not None else v for k, v in leaves.items()}
    s = run.predictions(eff)[:p.n]
    phi = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(s[i], list(leaves.values()),
                                                                            retain_graph=True)])
                       for i in range(p.n)]).double()
    K = (phi @ phi.T).numpy()
    r = (run.y - s.detach()).double().numpy()
    assert run.rho == pytest.approx(0.005 / np.linalg.eigvalsh(K)[-1], rel=1e-4)
    recs = run.run_to_end()
    update = torch.cat([run.deltas[k].reshape(-1) for k in leaves]).double()
    assert _rel(update, run.rho * phi.T @ torch.from_numpy(r)) <= 1e-4
    ds = np.array(recs[0].prompt_predictions) - np.array(base.prompt_predictions)
    pred = run.rho * K @ r
    assert np.linalg.norm(ds - pred) <= 0.05 * np.linalg.norm(pred)


def test_paper_mode_rejects_long_context(llama, needle):
    with pytest.raises(ValueError, match="few-shot"):
        PaperRun(llama, needle, PaperConfig())


# ------------------------------------------------------------------ figures
def test_figure_builders(llama, needle):
    run = QTTTRun(llama, needle, QTTTConfig(steps=3, span=16, lr=1e-3))
    recs = [run.prepare()] + run.run_to_end()
    dicts = [r.to_dict() for r in recs]
    for rs in (recs, dicts):
        assert list(loss_figure(rs).data[0].y) == [r.loss_per_token for r in recs[1:]]
        assert list(quality_figure(rs).data[0].y) == [r.answer_prob for r in recs]
        assert len(needle_figure(rs).data[0].y) == 4
        hm = delta_heatmap(rs).data[0]
        assert np.asarray(hm.z).shape == (llama.adapter.n_layers, 4)
        assert len(step_time_figure(rs).data) == 2
    assert needle_figure([{**d, "needle_mass": None} for d in dicts]) is None
    fig = label_distribution_figure({"1": 0.2, "2": 0.8}, {"1": 0.6, "2": 0.4}, "1")
    assert len(fig.data) == 2
    assert math.isclose(sum(fig.data[0].y), 1.0)
