"""Kernels of the DESIGN §11 adaptation targets against per-output autograd in float64.

Targets: MLP gate (Llama family), norm gains γ and biases β (Tent), LoRA B at its init (r ∈ {4,
8, 16}). Reference: one backward per supervised output with the target's own parameters θ (zero,
requires_grad) put into the model through `adapter.apply` — ΔW = θ for mlp_gate, ΔW = θ A for
LoRA (θ = B, A the seeded standard init), dγ = θ / dβ = θ for norms — Φ_l = [∂s_i/∂θ_l] flattened,
K = Σ_l Φ_l Φ_lᵀ, k_x = Σ_l Φ_l φ_{x,l}. Also: the norm-delta hook equals a deep copy whose norm
weights were actually changed, and the shared model is never mutated.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ttt_core.adapter import NORM_BIAS_KINDS, NORM_KINDS
from ttt_core.attention import forward_with_frozen_kv, prefill
from ttt_core.encoding import encode_few_shot, encode_long_context
from ttt_core.generators import digit_shift_task
from ttt_core.lora import lora_a
from ttt_core.models import build_tiny_model, load_model
from ttt_core.prompt_kernel import (
    SUBSPACES,
    PromptKernelError,
    available_subspaces,
    compute_prompt_kernel,
    subspace_label,
)
from ttt_core.prompts import parse_prompt
from ttt_core.readout import FewShotReadout, token_prob
from ttt_core.scores import score_blocks
from ttt_core.spectrum import kernel_spectrum
from ttt_core.target_kernels import resolve_kind, resolve_target

FAMILIES = ["llama", "gpt2", "neox"]
TOL = 1e-6
LONG_TEXT = ("The river bends twice before it reaches the old mill. Farmers grow barley there."
             "\nQuestion: What do farmers grow?\nAnswer: barley")
NORMS = list(NORM_KINDS) + list(NORM_BIAS_KINDS)


def rel(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _double(lm):
    lm.model.double()
    return lm


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    return _double(build_tiny_model(request.param, seed=3))


@pytest.fixture(scope="module")
def tiny_fp32():
    return {f: build_tiny_model(f, seed=5) for f in FAMILIES}


@pytest.fixture(scope="module")
def smol():
    return _double(load_model())


def _skip_missing(lm, subspace):
    kind = resolve_kind(subspace)
    if kind not in lm.adapter.available_kinds():
        pytest.skip(f"{lm.adapter.family} has no {kind}")


# ------------------------------------------------------------------ reference


def _params(lm, subspace, seed=0):
    """{layer: (θ, make_delta)} for every layer; make_delta(θ) is what goes into apply(deltas=…)."""
    t = resolve_target(lm, subspace, lora_seed=seed)
    a = lm.adapter
    out = {}
    for l in range(a.n_layers):
        spec = a.spec(l, t.kind)
        if t.form == "lora":
            A = lora_a(spec.in_features, t.lora.rank, seed, l, t.kind, dtype=lm.dtype)
            theta = torch.zeros(spec.out_features, t.lora.rank, dtype=lm.dtype, requires_grad=True)
            out[l] = (theta, lambda B, A=A: (B @ A) * t.lora.scaling)
        elif t.diagonal:
            out[l] = (torch.zeros(spec.out_features, dtype=lm.dtype, requires_grad=True), lambda g: g)
        else:
            out[l] = (torch.zeros(spec.out_features, spec.in_features, dtype=lm.dtype, requires_grad=True),
                      lambda w: w)
    return t.kind, out


def _deltas(kind, params):
    return {(l, kind): make(theta) for l, (theta, make) in params.items()}


def _kernels(grads, n):
    """grads: per output (n supervised, then the query if present) a {layer: ∂s/∂θ_l}."""
    res = {}
    for l in grads[0]:
        Phi = torch.stack([g[l].reshape(-1).double() for g in grads])
        res[l] = ((Phi[:n] @ Phi[:n].T).numpy(), (Phi[:n] @ Phi[n]).numpy() if len(grads) > n else None)
    return res


def reference_fewshot(lm, prompt, subspace, seed=0):
    fs = encode_few_shot(lm, prompt)
    readout = FewShotReadout(fs, lm.device)
    grads, vals = [], []
    for i, seq in enumerate(fs.seqs):
        kind, params = _params(lm, subspace, seed)
        with lm.adapter.apply(deltas=_deltas(kind, params)):
            s = readout.scalar(lm.model(input_ids=torch.tensor(seq)[None]).logits[0, -1], i)
        g = torch.autograd.grad(s, [p for p, _ in params.values()])
        grads.append(dict(zip(params, g)))
        vals.append(float(s.detach()))
    return _kernels(grads, prompt.n), np.array(vals)


def reference_long(lm, prompt, subspace, max_positions, frozen=False):
    li = encode_long_context(lm, prompt, max_positions)
    ids = torch.tensor(li.ids)[None]
    outs = list(li.positions) + ([li.query_position] if li.query_position is not None else [])
    tg = list(li.targets) + ([li.query_token] if li.query_token is not None else [])
    kind, params = _params(lm, subspace)
    with lm.adapter.apply(deltas=_deltas(kind, params)):
        if frozen:
            _, cache = prefill(lm.model, ids)
            logits = forward_with_frozen_kv(lm.model, ids, cache, 0).logits[0]
        else:
            logits = lm.model(input_ids=ids).logits[0]
        s = token_prob(logits[outs], torch.tensor(tg))
    grads = []
    for j in range(len(outs)):
        g = torch.autograd.grad(s[j], [p for p, _ in params.values()], retain_graph=True)
        grads.append(dict(zip(params, g)))
    return _kernels(grads, len(li.positions)), s.detach().numpy()


def check(ev, ref, vals, tol=TOL):
    np.testing.assert_allclose(ev.values, vals[:ev.n], rtol=1e-8, atol=1e-10)
    assert np.linalg.norm(ev.K) > 1e-12 and ev.K.dtype == np.float64
    assert ev.n_blocks_per_layer == 1
    assert rel(ev.K, sum(K for K, _ in ref.values())) <= tol
    for l, (Kl, kxl) in ref.items():
        assert rel(ev.head_kernel(l, 0), Kl) <= tol, l
        assert rel(ev.layer_kernel(l), Kl) <= tol, l
        np.testing.assert_allclose(ev.factors[l].head_traces().numpy(), [np.trace(Kl)], rtol=1e-9)
        if kxl is not None:
            assert rel(ev.head_couplings[l, 0], kxl) <= tol, l
    if ev.k_x is not None:
        assert rel(ev.k_x, sum(kx for _, kx in ref.values())) <= tol


# ------------------------------------------------------------------ tiny families, float64

FEWSHOT_TARGETS = (["mlp_gate", *NORMS] + [f"lora:{k}:{r}" for k in ("q", "mlp_up") for r in (4, 8, 16)]
                   + ["lora:o:4", "lora:mlp_gate:4"])


@pytest.mark.parametrize("subspace", FEWSHOT_TARGETS)
def test_fewshot_target_kernels_match_autograd(tiny, subspace):
    _skip_missing(tiny, subspace)
    prompt = digit_shift_task(1, n=5).prompt
    ev = compute_prompt_kernel(tiny, prompt, subspace)
    ref, vals = reference_fewshot(tiny, prompt, subspace)
    assert ev.route == "loo-exact"
    check(ev, ref, vals)


@pytest.mark.parametrize("subspace", ["mlp_gate", "norm_attn", "norm_mlp", "norm_attn_bias", "lora:q:8",
                                      "lora:mlp_up:4", "lora:v:16"])
def test_long_context_target_kernels_match_autograd(tiny, subspace):
    _skip_missing(tiny, subspace)
    prompt = parse_prompt(LONG_TEXT)
    ev = compute_prompt_kernel(tiny, prompt, subspace, max_positions=7, qttt=False, chunk=3)
    assert ev.route == "exact-per-output" and ev.n == 7
    ref, vals = reference_long(tiny, prompt, subspace, 7)
    check(ev, ref, vals)


@pytest.mark.parametrize("rank", [4, 16])
def test_lora_q_frozen_kv_kernel_matches_frozen_reference(tiny, rank):
    """LoRA on W_Q sits in the query path: with qttt the kernel is the frozen-KV one."""
    prompt = parse_prompt(LONG_TEXT)
    ev = compute_prompt_kernel(tiny, prompt, f"lora:q:{rank}", max_positions=8, row_chunk=5)
    assert ev.route == "qttt-frozen-kv"
    ref, vals = reference_long(tiny, prompt, f"lora:q:{rank}", 8, frozen=True)
    check(ev, ref, vals)


FROZEN_KV_TARGETS = ["mlp_up", "mlp_gate", "mlp_down", "norm_attn", "norm_mlp", "norm_mlp_bias", "lora:o:4",
                     "lora:mlp_down:8"]


@pytest.mark.parametrize("subspace", FROZEN_KV_TARGETS)
def test_frozen_kv_kernels_of_other_targets_match_the_frozen_reference(tiny, subspace):
    """kv="frozen": the kernel of the frozen-K/V (qTTT-style) update of W_O / MLP / norm / LoRA
    targets, one backward for all positions, against per-output autograd through the frozen cache."""
    _skip_missing(tiny, subspace)
    prompt = parse_prompt(LONG_TEXT)
    ev = compute_prompt_kernel(tiny, prompt, subspace, max_positions=8, row_chunk=5, kv="frozen")
    assert ev.route == "qttt-frozen-kv" and ev.settings["kv"] == "frozen" and ev.n == 8
    ref, vals = reference_long(tiny, prompt, subspace, 8, frozen=True)
    check(ev, ref, vals)


def test_frozen_kv_w_o_kernel_per_head_matches_the_frozen_reference(tiny):
    prompt = parse_prompt(LONG_TEXT)
    ev = compute_prompt_kernel(tiny, prompt, "o", max_positions=6, kv="frozen")
    ref, vals = reference_long(tiny, prompt, "o", 6, frozen=True)
    np.testing.assert_allclose(ev.values, vals[:ev.n], rtol=1e-8, atol=1e-10)
    assert ev.route == "qttt-frozen-kv" and rel(ev.K, sum(K for K, _ in ref.values())) <= TOL
    for l, (Kl, _) in ref.items():
        assert rel(ev.layer_kernel(l), Kl) <= TOL, l


@pytest.mark.parametrize("subspace", ["o", "mlp_up", "norm_mlp"])
def test_frozen_kv_kernel_equals_the_full_context_kernel_in_the_last_layer(tiny, subspace):
    """Nothing above the last layer reads other positions, so its W_O / MLP / post-attention norm
    change only their own row's output: there the frozen-K/V kernel IS the exact full-context one
    (an independent check of the frozen route against the exact per-output route); below it they
    differ (later rows read the changed rows through attention)."""
    _skip_missing(tiny, subspace)
    prompt = parse_prompt(LONG_TEXT)
    fro = compute_prompt_kernel(tiny, prompt, subspace, max_positions=7, kv="frozen")
    full = compute_prompt_kernel(tiny, prompt, subspace, max_positions=7, kv="full", chunk=3)
    assert full.route == "exact-per-output"
    last = tiny.adapter.n_layers - 1
    assert rel(fro.layer_kernel(last), full.layer_kernel(last)) <= TOL
    assert rel(fro.layer_kernel(0), full.layer_kernel(0)) > 1e-3


@pytest.mark.parametrize("subspace", ["k", "v", "lora:v:4"])
def test_keys_and_values_have_no_frozen_kv_kernel(tiny, subspace):
    with pytest.raises(PromptKernelError, match="makes the keys and values"):
        compute_prompt_kernel(tiny, parse_prompt(LONG_TEXT), subspace, max_positions=6, kv="frozen")
    with pytest.raises(PromptKernelError, match="kv must be one of"):
        compute_prompt_kernel(tiny, parse_prompt(LONG_TEXT), "q", max_positions=6, kv="sometimes")


def test_free_text_norm_kernel_without_query(tiny):
    prompt = parse_prompt("Just some free text without any question at all, a few words long.")
    ev = compute_prompt_kernel(tiny, prompt, "norm_mlp", max_positions=6, qttt=False)
    assert ev.k_x is None and ev.head_couplings is None
    ref, vals = reference_long(tiny, prompt, "norm_mlp", 6)
    check(ev, ref, vals)


def test_lora_seed_changes_a_and_is_recorded(tiny):
    prompt = digit_shift_task(2, n=4).prompt
    e0 = compute_prompt_kernel(tiny, prompt, "lora:q:4")
    e1 = compute_prompt_kernel(tiny, prompt, "lora:q:4", lora_seed=1)
    assert e0.settings["lora_seed"] == 0 and e1.settings["lora_seed"] == 1
    assert rel(e1.K, e0.K) > 1e-3
    ref, vals = reference_fewshot(tiny, prompt, "lora:q:4", seed=1)
    check(e1, ref, vals)


def test_factor_consumers_accept_new_targets(tiny):
    """Scores, spectra and weighted gradients work on diagonal and LoRA factors."""
    prompt = digit_shift_task(3, n=6).prompt
    for sub in ("norm_attn", "lora:mlp_up:4"):
        ev = compute_prompt_kernel(tiny, prompt, sub)
        sc = score_blocks(ev)
        assert np.asarray(sc.trace).shape == (ev.n_layers, 1)
        assert kernel_spectrum(ev, (1, 0)).lam.shape == (ev.n,)
        M = np.eye(ev.n)
        np.testing.assert_allclose(ev.trace_scores(M)[:, 0], ev.head_traces()[:, 0], rtol=1e-9)
        Z = np.random.default_rng(0).standard_normal((ev.n, 3))
        Q = ev.quad_forms(Z, Z)
        np.testing.assert_allclose(Q[1, 0], np.einsum("ir,ij,jr->r", Z, ev.head_kernel(1, 0), Z), rtol=1e-9)
        w = torch.as_tensor(ev.residuals)
        g = ev.factors[1].weighted_gradient(w, 0)
        shape = tiny.adapter.spec(1, resolve_target(tiny, sub).kind)
        want = (shape.out_features,) if sub.startswith("norm") else (shape.out_features, 4)
        assert tuple(g.shape) == want
        assert ev.block_label((1, 0)) == f"L1 {sub}"


# ------------------------------------------------------------------ adapter contract


@pytest.mark.parametrize("family", FAMILIES)
def test_norm_delta_equals_edited_copy_and_never_mutates(tiny_fp32, family):
    lm = tiny_fp32[family]
    a = lm.adapter
    ids = lm.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    fp0 = lm.weights_fingerprint()
    g = torch.Generator().manual_seed(0)
    deltas = {(l, k): 0.3 * torch.randn(a.hidden_size, generator=g) for l in (0, 2)
              for k in NORMS if k in a.available_kinds()}
    with a.apply(deltas=deltas), torch.no_grad():
        hooked = lm.model(ids).logits
    edited = copy.deepcopy(lm.model)
    mods = dict(edited.named_modules())
    with torch.no_grad():
        for (l, k), d in deltas.items():
            mod = mods[a.spec(l, k).module_name]
            (mod.bias if k in NORM_BIAS_KINDS else mod.weight).add_(d)
        want = edited(ids).logits
        base = lm.model(ids).logits
    torch.testing.assert_close(hooked, want, rtol=1e-5, atol=1e-5)
    assert (hooked - base).abs().max() > 1e-3
    # differentiable in dγ, the shared weights untouched and without gradients
    dg = torch.zeros(a.hidden_size, requires_grad=True)
    with a.apply(deltas={(1, "norm_attn"): dg}):
        lm.model(ids).logits.square().mean().backward()
    assert dg.grad is not None and dg.grad.abs().sum() > 0
    assert all(p.grad is None for p in lm.model.parameters())
    assert lm.weights_fingerprint() == fp0


@pytest.mark.parametrize("family", FAMILIES)
def test_available_kinds_and_readable_errors(tiny_fp32, family):
    lm = tiny_fp32[family]
    a = lm.adapter
    kinds = a.available_kinds()
    assert {"q", "k", "v", "o", "mlp_up", "mlp_down", "norm_attn", "norm_mlp"} <= set(kinds)
    assert ("mlp_gate" in kinds) == (family == "llama")
    assert ("norm_attn_bias" in kinds) == (family != "llama")
    with pytest.raises(ValueError, match="expected"):
        with a.apply(deltas={(0, "norm_attn"): torch.zeros(a.hidden_size, 2)}):
            pass
    assert tuple(a.logical_weight(0, "norm_mlp").shape) == (a.hidden_size,)
    prompt = digit_shift_task(0, n=3).prompt
    if family != "llama":
        with pytest.raises(ValueError, match=family):
            a.spec(0, "mlp_gate")
        with pytest.raises(PromptKernelError, match=f"{family} family has no MLP gate"):
            compute_prompt_kernel(lm, prompt, "mlp_gate")
        with pytest.raises(PromptKernelError, match="gate"):
            compute_prompt_kernel(lm, prompt, "lora:mlp_gate:4")
    else:
        with pytest.raises(PromptKernelError, match="no bias"):
            compute_prompt_kernel(lm, prompt, "norm_attn_bias")
    subs = available_subspaces(lm)
    assert ("mlp_gate" in subs) == (family == "llama") and "lora:q:8" in subs and "norm_attn" in subs


def test_subspace_names_and_labels():
    for name in ("mlp_gate", "norm_attn", "norm_mlp", "norm_attn_bias", "norm_mlp_bias",
                 "lora:q:4", "lora:q:8", "lora:q:16", "lora:mlp_up:8", "lora:mlp_down:16"):
        assert name in SUBSPACES and subspace_label(name) == SUBSPACES[name]
    assert "r=32" in subspace_label("lora:v:32") and "W_V" in subspace_label("lora:v:32")
    assert subspace_label("nonsense") == "nonsense"


# ------------------------------------------------------------------ SmolLM2, float64

SMOL_FEWSHOT = "3 -> 5\n8 -> 0\n6 ->\n# answer: 8"


@pytest.mark.smollm2
@pytest.mark.parametrize("subspace", ["mlp_gate", "norm_attn", "norm_mlp", "lora:q:8", "lora:mlp_up:4"])
def test_fewshot_target_kernels_match_autograd_smollm2(smol, subspace):
    prompt = parse_prompt(SMOL_FEWSHOT)
    ev = compute_prompt_kernel(smol, prompt, subspace)
    ref, vals = reference_fewshot(smol, prompt, subspace)
    check(ev, ref, vals, tol=1e-5)


@pytest.mark.smollm2
def test_long_context_target_kernels_match_autograd_smollm2(smol):
    prompt = parse_prompt(LONG_TEXT)
    for subspace, qttt in (("norm_mlp", False), ("lora:q:16", True), ("lora:mlp_up:8", False)):
        ev = compute_prompt_kernel(smol, prompt, subspace, max_positions=3, qttt=qttt, chunk=4)
        ref, vals = reference_long(smol, prompt, subspace, 3, frozen=qttt)
        check(ev, ref, vals, tol=1e-5)


@pytest.mark.smollm2
def test_frozen_kv_kernels_of_other_targets_match_the_frozen_reference_smollm2(smol):
    prompt = parse_prompt(LONG_TEXT)
    for subspace in ("mlp_down", "norm_mlp"):
        ev = compute_prompt_kernel(smol, prompt, subspace, max_positions=3, kv="frozen")
        assert ev.route == "qttt-frozen-kv"
        ref, vals = reference_long(smol, prompt, subspace, 3, frozen=True)
        check(ev, ref, vals, tol=1e-5)
