"""Factorised prompt kernels against a slow plain-autograd reference (DESIGN §2, §7).

Reference: one backward per supervised output with a zero weight delta (requires_grad) on every
layer's block, Φ built explicitly per block slice, K = ΦΦᵀ and k_x = Φ φ_x.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ttt_core.attention import forward_with_frozen_kv, prefill
from ttt_core.encoding import encode_few_shot, encode_long_context
from ttt_core.fused_head import HeadPath
from ttt_core.generators import digit_shift_task
from ttt_core.models import build_tiny_model, load_model
from ttt_core.prompt_kernel import PromptKernelError, compute_prompt_kernel
from ttt_core.prompts import FewShotPrompt, LongContextPrompt, parse_prompt
from ttt_core.readout import FewShotReadout, token_prob

FAMILIES = ["llama", "gpt2", "neox"]
KINDS = ["q", "k", "v", "o", "mlp_up", "mlp_down"]
TOL = 1e-4
LONG_TEXT = ("The river bends twice before it reaches the old mill. Farmers grow barley there."
             "\nQuestion: What do farmers grow?\nAnswer: barley")


def rel(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    return build_tiny_model(request.param, seed=3)


@pytest.fixture(scope="module")
def smol():
    """A private float64 copy of SmolLM2 (this test's own instance): the reference and the
    factorised route then agree to round-off, so 1e-4 tests the algebra, not fp32 summation order.
    (In fp32, heads whose kernel is ~1e-9 of the largest differ by ~1e-4 between a padded batch
    and a single sequence — see test_fewshot_full_kernel_smollm2_fp32.)"""
    lm = load_model()
    lm.model.double()
    return lm


def _deltas(lm, kind):
    a = lm.adapter
    return {(l, kind): torch.zeros(a.spec(l, kind).out_features, a.spec(l, kind).in_features,
                                   dtype=lm.dtype, requires_grad=True) for l in range(a.n_layers)}


def _block_slices(lm, kind):
    """[(layer, head, slicer)] with slicer(G (out, in)) → flattened block gradient."""
    a = lm.adapter
    out = []
    for l in range(a.n_layers):
        if kind.startswith("mlp"):
            out.append((l, 0, lambda G: G.reshape(-1)))
        else:
            for h in range(a.heads_of(kind)):
                s = a.head_slice(kind, h)
                out.append((l, h, (lambda G, s=s: G[s].reshape(-1)) if a.head_axis(kind) == 0
                            else (lambda G, s=s: G[:, s].reshape(-1))))
    return out


def _kernels_from_grads(lm, kind, grads, n):
    """grads: list over outputs (n supervised then optional query) of {layer: G (out, in)}."""
    res = {}
    for l, h, sl in _block_slices(lm, kind):
        Phi = torch.stack([sl(g[l]).double() for g in grads])
        res[(l, h)] = ((Phi[:n] @ Phi[:n].T).numpy(), (Phi[:n] @ Phi[n]).numpy() if len(grads) > n else None)
    return res


def reference_fewshot(lm, prompt, kind):
    fs = encode_few_shot(lm, prompt)
    grads, vals = [], []
    readout = FewShotReadout(fs, lm.device)
    for i, seq in enumerate(fs.seqs):         # n LOO prompts then the full prompt
        d = _deltas(lm, kind)
        with lm.adapter.apply(deltas=d):
            logits = lm.model(input_ids=torch.tensor(seq)[None]).logits[0, -1]
            s = readout.scalar(logits, i)
        g = torch.autograd.grad(s, list(d.values()))
        grads.append({k[0]: gi for k, gi in zip(d, g)})
        vals.append(float(s.detach()))
    return _kernels_from_grads(lm, kind, grads, prompt.n), np.array(vals)


def reference_long(lm, prompt, kind, max_positions, frozen):
    li = encode_long_context(lm, prompt, max_positions)
    ids = torch.tensor(li.ids)[None]
    outs = list(li.positions) + ([li.query_position] if li.query_position is not None else [])
    tg = list(li.targets) + ([li.query_token] if li.query_token is not None else [])
    d = _deltas(lm, kind)
    with lm.adapter.apply(deltas=d):
        if frozen:
            _, cache = prefill(lm.model, ids)
            logits = forward_with_frozen_kv(lm.model, ids, cache, 0).logits[0]
        else:
            logits = lm.model(input_ids=ids).logits[0]
        s = token_prob(logits[outs], torch.tensor(tg))
    grads = []
    for j in range(len(outs)):                 # one backward per output
        g = torch.autograd.grad(s[j], list(d.values()), retain_graph=True)
        grads.append({k[0]: gi for k, gi in zip(d, g)})
    return _kernels_from_grads(lm, kind, grads, len(li.positions)), s.detach().numpy()


def check_against_reference(ev, ref, vals_ref, has_query=True):
    n = ev.n
    np.testing.assert_allclose(ev.values, vals_ref[:n], rtol=1e-5, atol=1e-6)
    K_ref = sum(K for K, _ in ref.values())
    assert rel(ev.K, K_ref) <= TOL
    for (l, h), (Kb, kxb) in ref.items():
        assert rel(ev.head_kernel(l, h), Kb) <= TOL, (l, h)
        if has_query:
            assert rel(ev.head_couplings[l, h], kxb) <= TOL, (l, h)
    if has_query:
        assert rel(ev.k_x, sum(kx for _, kx in ref.values())) <= TOL
    # per-block kernels add up to the layer kernels and to the full kernel
    layer_sum = sum(ev.layer_kernel(l) for l in range(ev.n_layers))
    assert rel(layer_sum, ev.K) <= 1e-10
    for l in range(ev.n_layers):
        hk = ev.factors[l].head_kernels().numpy()
        assert rel(hk.sum(0), ev.layer_kernel(l)) <= 1e-10
        np.testing.assert_allclose(np.trace(hk, axis1=1, axis2=2), ev.factors[l].head_traces().numpy(), rtol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_fewshot_kernels_match_reference_tiny(tiny, kind):
    prompt = digit_shift_task(1, n=6).prompt
    ev = compute_prompt_kernel(tiny, prompt, kind)
    ref, vals = reference_fewshot(tiny, prompt, kind)
    assert ev.route == "loo-exact"
    check_against_reference(ev, ref, vals)
    assert ev.query is not None and ev.query.value == pytest.approx(vals[-1], rel=1e-5)


def test_fewshot_residual_signs_and_query_error(tiny):
    task = digit_shift_task(2, n=5)
    ev = compute_prompt_kernel(tiny, task.prompt, "q")
    vals = task.prompt.label_values()
    targets = np.array([vals[y] for _, y in task.prompt.demos])
    np.testing.assert_allclose(ev.targets, targets)
    np.testing.assert_allclose(ev.residuals, targets - ev.values)
    assert np.all(np.sign(ev.residuals) == np.sign(targets - ev.values))
    assert ev.query.target == pytest.approx(vals[task.prompt.query_y])
    assert ev.query.error == pytest.approx((ev.query.value - ev.query.target) ** 2)
    assert np.all((ev.values >= 0) & (ev.values <= 1))


@pytest.mark.parametrize("kind", ["q", "v", "o", "mlp_down"])
def test_long_context_exact_route_matches_reference_tiny(tiny, kind):
    prompt = parse_prompt(LONG_TEXT)
    ev = compute_prompt_kernel(tiny, prompt, kind, max_positions=12, qttt=False, chunk=5)
    assert ev.route == "exact-per-output" and ev.n == 12
    ref, vals = reference_long(tiny, prompt, kind, 12, frozen=False)
    check_against_reference(ev, ref, vals)
    assert ev.query.value == pytest.approx(vals[-1], rel=1e-5)
    np.testing.assert_allclose(ev.residuals, 1.0 - ev.values)
    assert np.all(ev.residuals > 0)


def test_long_context_exact_route_cuts_each_chunk_at_its_last_output(tiny):
    """Each chunk runs ONE forward of only the tokens up to its last output (causality), last
    outputs first, and the kernel still equals one full-sequence backward per output."""
    prompt = parse_prompt(LONG_TEXT)
    li = encode_long_context(tiny, prompt, 10)
    outs = sorted(list(li.positions) + [li.query_position])
    runs = HeadPath(tiny.model).module          # what the route runs: the decoder under the fused head
    lengths, real = [], runs.forward

    def spy(*args, **kw):
        lengths.append(tuple(kw["input_ids"].shape))
        return real(*args, **kw)

    runs.forward = spy
    try:
        ev = compute_prompt_kernel(tiny, prompt, "k", max_positions=10, qttt=False, chunk=3)
    finally:
        del runs.forward
    expect = [(1, c[0] + 1) for c in (outs[::-1][i:i + 3] for i in range(0, len(outs), 3))]
    assert lengths == expect and lengths[-1][1] < len(li.ids)
    ref, vals = reference_long(tiny, prompt, "k", 10, frozen=False)
    check_against_reference(ev, ref, vals)


@pytest.mark.parametrize("row_chunk", [7, 384], ids=["chunked_frozen_cache", "single_pass_detached_kv"])
def test_long_context_qttt_route_matches_frozen_reference(tiny, row_chunk, monkeypatch):
    """Both W_Q routes (rows in chunks against a frozen prefill cache; one pass with the rows' own
    K/V detached after a prefill of the tokens before them) against per-position backward passes."""
    import ttt_core.kernel_routes as routes_mod

    used = []
    real = routes_mod._frozen_kv_single_pass
    monkeypatch.setattr(routes_mod, "_frozen_kv_single_pass", lambda *a, **k: used.append(1) or real(*a, **k))
    prompt = parse_prompt(LONG_TEXT)
    ev = compute_prompt_kernel(tiny, prompt, "q", max_positions=8, row_chunk=row_chunk)
    assert ev.route == "qttt-frozen-kv" and ev.n == 8
    assert len(used) == (1 if row_chunk == 384 else 0)
    ref, vals = reference_long(tiny, prompt, "q", 8, frozen=True)
    check_against_reference(ev, ref, vals)


def test_free_text_has_no_query(tiny):
    prompt = parse_prompt("Just some free text without any question at all, a few words long.")
    ev = compute_prompt_kernel(tiny, prompt, "q", max_positions=16)
    assert ev.k_x is None and ev.head_couplings is None and ev.query is None
    assert "k_x" in ev.query_note
    ref, vals = reference_long(tiny, prompt, "q", 16, frozen=True)
    check_against_reference(ev, ref, vals, has_query=False)


def test_errors_are_readable(tiny):
    shared = FewShotPrompt(demos=[("a", "good"), ("b", "great"), ("c", "good")], query_x="d", spaced=True)
    with pytest.raises(PromptKernelError, match="share their first token"):
        compute_prompt_kernel(tiny, shared, "q")
    with pytest.raises(PromptKernelError, match="No supervised positions"):
        compute_prompt_kernel(tiny, LongContextPrompt(context="x"), "q")
    with pytest.raises(PromptKernelError, match="Unknown subspace"):
        compute_prompt_kernel(tiny, digit_shift_task(0).prompt, "W_Z")


def test_model_is_not_mutated(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    compute_prompt_kernel(tiny, digit_shift_task(4, n=4).prompt, "v")
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in tiny.model.parameters())


def test_large_row_count_is_blocked(tiny):
    """Row blocking (N > block_rows) gives the same kernels, couplings and traces."""
    prompt = digit_shift_task(5, n=6).prompt
    ev = compute_prompt_kernel(tiny, prompt, "o")
    K0, hk0, kx0 = ev.K.copy(), ev.factors[1].head_kernels().numpy(), ev.factors[1].query_couplings().numpy()
    M = np.random.default_rng(0).standard_normal((ev.n, ev.n))
    M = M @ M.T
    tr0 = ev.trace_scores(M)
    for f in ev.factors:
        f.block_rows = 37
        f.__post_init__()
    assert rel(sum(ev.layer_kernel(l) for l in range(ev.n_layers)), K0) <= 1e-12
    assert rel(ev.factors[1].head_kernels().numpy(), hk0) <= 1e-12
    assert rel(ev.factors[1].query_couplings().numpy(), kx0) <= 1e-12
    assert rel(ev.trace_scores(M), tr0) <= 1e-12


# ------------------------------------------------------------------ SmolLM2 (short prompts)

SMOL_FEWSHOT = "3 -> 5\n8 -> 0\n1 -> 3\n6 ->\n# answer: 8"


@pytest.mark.smollm2
@pytest.mark.parametrize("kind", ["q", "k", "v", "o", "mlp_up", "mlp_down"])
def test_fewshot_kernels_match_reference_smollm2(smol, kind):
    prompt = parse_prompt(SMOL_FEWSHOT)
    ev = compute_prompt_kernel(smol, prompt, kind)
    ref, vals = reference_fewshot(smol, prompt, kind)
    check_against_reference(ev, ref, vals)


@pytest.mark.smollm2
def test_long_context_kernels_match_reference_smollm2(smol):
    prompt = parse_prompt(LONG_TEXT)
    ev = compute_prompt_kernel(smol, prompt, "q", max_positions=8)
    ref, vals = reference_long(smol, prompt, "q", 8, frozen=True)
    check_against_reference(ev, ref, vals)
    ev = compute_prompt_kernel(smol, prompt, "v", max_positions=6, qttt=False, chunk=7)
    ref, vals = reference_long(smol, prompt, "v", 6, frozen=False)
    check_against_reference(ev, ref, vals)


@pytest.mark.smollm2
def test_fewshot_full_kernel_smollm2_fp32():
    """The shipped fp32 model: full kernel and query coupling within 1e-4 of the reference."""
    lm = load_model()
    prompt = parse_prompt(SMOL_FEWSHOT)
    ev = compute_prompt_kernel(lm, prompt, "q")
    ref, vals = reference_fewshot(lm, prompt, "q")
    assert rel(ev.K, sum(K for K, _ in ref.values())) <= TOL
    assert rel(ev.k_x, sum(kx for _, kx in ref.values())) <= TOL
    for l in range(ev.n_layers):
        assert rel(ev.layer_kernel(l), sum(ref[(l, h)][0] for h in range(ev.n_blocks_per_layer))) <= TOL


@pytest.mark.parametrize("kind", ["q", "v", "mlp_down"])
def test_first_layer_kernel_equals_the_full_kernel_above_it(tiny, kind):
    """compute_prompt_kernel(first_layer=l): the blocks of layers ≥ l are the all-layer kernel's
    numbers (the Llama family through the shared PartialForward, the others through the full
    model with probes above l only); layers below l are absent and all-layer views refuse."""
    from ttt_core.paper_gd import gd_trajectory
    from ttt_core.steps import block_kernel, select_blocks

    prompt = digit_shift_task(4, n=6).prompt
    full = compute_prompt_kernel(tiny, prompt, kind)
    L = tiny.adapter.n_layers
    first = L - 1
    shared: dict = {}
    part = compute_prompt_kernel(tiny, prompt, kind, first_layer=first, shared=shared)
    assert part.first_layer == first and part.factors[:first] == [None] * first
    assert ("layers" in part.route_note) and (bool(shared) == (tiny.adapter.family == "llama"))
    np.testing.assert_allclose(part.values, full.values, rtol=1e-6, atol=1e-7)
    for l in range(first, L):
        assert rel(part.layer_kernel(l), full.layer_kernel(l)) <= 1e-5
        assert rel(part.head_couplings[l], full.head_couplings[l]) <= 1e-5
    assert np.isnan(part.head_couplings[:first]).all()
    blocks = select_blocks(full, 1)
    (Kf, kf), (Kp, kp) = block_kernel(full, blocks), block_kernel(part, blocks)
    assert rel(Kp, Kf) <= 1e-5 and rel(kp, kf) <= 1e-5
    assert rel(part.K, Kf) <= 1e-5 and rel(part.k_x, kf) <= 1e-5
    with pytest.raises(ValueError, match="layers"):
        part.head_traces()
    # a paper-GD trajectory reusing the kernel's shared hidden states gives the same numbers
    if kind != "mlp_down":
        a = gd_trajectory(tiny, prompt, kind, blocks, 0.05, 3, shared)
        b = gd_trajectory(tiny, prompt, kind, blocks, 0.05, 3)
        np.testing.assert_allclose(a["prediction"], b["prediction"], rtol=1e-6, atol=1e-7)


def test_first_layer_is_few_shot_only(tiny):
    with pytest.raises(PromptKernelError, match="few-shot"):
        compute_prompt_kernel(tiny, parse_prompt(LONG_TEXT), "q", max_positions=8, first_layer=1)
