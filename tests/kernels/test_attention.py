"""Frozen-cache attention: forward (o, lse), dQ-only backward and the autograd Function.

Ground truth is float64 autograd through torch.nn.functional.scaled_dot_product_attention with an
explicit causal-offset mask and expanded kv heads (K, V requires_grad=False). Tolerances follow
the FlashAttention rule: kernel error vs truth ≤ 2 × (error of the same math done by PyTorch in the
input dtype) + a small dtype-dependent atol.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import reference

# (name, B, Hq, Hkv, M, N, D, q_offset)
CASES = [
    ("span_at_end_gqa", 1, 6, 2, 19, 45, 24, 45 - 19),      # q_offset = N − M, the qTTT span
    ("from_start_mha", 2, 2, 2, 21, 37, 16, 0),
    ("middle_gqa9_3", 1, 9, 3, 13, 50, 16, 17),             # rows cannot see keys ≥ 30
    ("past_cache_end_d48", 1, 2, 1, 9, 20, 48, 15),         # rows 5.. see all 20 keys
]
DTYPES = [torch.float32, torch.float16]
ATOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def make_inputs(B, Hq, Hkv, M, N, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, M, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, Hkv, N, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, Hkv, N, D, generator=g).to(device=device, dtype=dtype)
    do = torch.randn(B, Hq, M, D, generator=g).to(device=device, dtype=dtype)
    return q, k, v, do


def causal_mask(M, N, q_offset, device):
    rows = torch.arange(M, device=device)[:, None] + q_offset
    cols = torch.arange(N, device=device)[None, :]
    return cols <= rows                                   # True = may attend


def sdpa_truth(q, k, v, do, q_offset, scale=None, dtype=torch.float64):
    """(o, lse, dq) by autograd through SDPA in `dtype`; k, v never require grad."""
    G = q.shape[1] // k.shape[1]
    qq = q.detach().to(dtype).requires_grad_(True)
    kk = k.detach().to(dtype).repeat_interleave(G, dim=1)
    vv = v.detach().to(dtype).repeat_interleave(G, dim=1)
    mask = causal_mask(q.shape[2], k.shape[2], q_offset, q.device)
    o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale)
    (o * do.to(dtype)).sum().backward()
    s = (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    scores = (qq.detach() @ kk.transpose(-1, -2)) * s
    lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return o.detach(), lse, qq.grad


def lowprec_baseline(q, k, v, do, q_offset, scale=None):
    """Same math done by PyTorch in the input dtype (scores, softmax and PV all in q.dtype)."""
    G = q.shape[1] // k.shape[1]
    qq = q.detach().clone().requires_grad_(True)
    kk = k.repeat_interleave(G, dim=1)
    vv = v.repeat_interleave(G, dim=1)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (qq @ kk.transpose(-1, -2)) * s
    mask = causal_mask(q.shape[2], k.shape[2], q_offset, q.device)
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    o = p @ vv
    (o * do).sum().backward()
    return o.detach(), qq.grad


def err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def assert_close_rule(name, x, truth, baseline, dtype):
    e, eb = err(x, truth), err(baseline, truth)
    bound = 2.0 * eb + ATOL[dtype]
    assert e <= bound, f"{name}: error {e:.3g} > 2×{eb:.3g} + {ATOL[dtype]:g}"


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_and_dq_vs_sdpa_autograd(backend, dtype, case, device):
    _, B, Hq, Hkv, M, N, D, off = case
    q, k, v, do = make_inputs(B, Hq, Hkv, M, N, D, dtype, device)
    o_t, lse_t, dq_t = sdpa_truth(q, k, v, do, off)
    o_b, dq_b = lowprec_baseline(q, k, v, do, off)

    o, lse = kernels.attention_with_cache(q, k, v, off)
    assert o.dtype == dtype and o.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, M)
    assert_close_rule("o", o, o_t, o_b, dtype)
    assert err(lse, lse_t) <= 2e-5 * max(1.0, lse_t.abs().max().item()), "lse"

    dq = kernels.attention_with_cache_dq(q, k, v, o, lse, do, off)
    assert dq.dtype == dtype and dq.shape == q.shape
    assert_close_rule("dq", dq, dq_t, dq_b, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES[:3], ids=[c[0] for c in CASES[:3]])
def test_triton_matches_reference(dtype, case, device, monkeypatch):
    _, B, Hq, Hkv, M, N, D, off = case
    q, k, v, do = make_inputs(B, Hq, Hkv, M, N, D, dtype, device, seed=1)
    ro, rlse = reference.attention_with_cache(q, k, v, off)
    rdq = reference.attention_with_cache_dq(q, k, v, ro, rlse, do, off)
    monkeypatch.setenv("TTT_LENS_KERNELS", "triton")
    o, lse = kernels.attention_with_cache(q, k, v, off)
    dq = kernels.attention_with_cache_dq(q, k, v, ro, rlse, do, off)   # same (o, lse) as the reference
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(o.float(), ro.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, rlse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dq.float(), rdq.float(), atol=2 * tol, rtol=2 * tol)


def test_reference_dq_formula_matches_autograd_fp64(device):
    """The reference dq is an explicit formula; check it against autograd independently (fp64)."""
    q, k, v, do = make_inputs(1, 6, 2, 11, 29, 24, torch.float64, device, seed=2)
    o, lse = reference.attention_with_cache(q, k, v, 18)
    o_t, lse_t, dq_t = sdpa_truth(q, k, v, do, 18)
    dq = reference.attention_with_cache_dq(q, k, v, o, lse, do, 18)
    torch.testing.assert_close(o, o_t, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, lse_t, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(dq, dq_t, atol=1e-12, rtol=1e-10)


def test_reference_row_chunking(device, monkeypatch):
    """A tiny score budget forces many row chunks; results must not change."""
    q, k, v, do = make_inputs(1, 6, 2, 19, 45, 24, torch.float32, device, seed=3)
    o1, l1 = reference.attention_with_cache(q, k, v, 26)
    dq1 = reference.attention_with_cache_dq(q, k, v, o1, l1, do, 26)
    monkeypatch.setattr(reference, "_SCORE_BUDGET", 45 * 6 * 4)        # 4 rows per chunk
    o2, l2 = reference.attention_with_cache(q, k, v, 26)
    dq2 = reference.attention_with_cache_dq(q, k, v, o1, l1, do, 26)
    torch.testing.assert_close(o2, o1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(l2, l1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dq2, dq1, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_middle_span_ignores_later_keys(backend, device):
    """Rows of a span in the middle must not see keys after their own position: changing keys and
    values after position q_offset+M−1 leaves (o, lse, dq) bit-identical; changing the key at
    exactly that position changes the last row only."""
    off, M, N = 17, 13, 50
    q, k, v, do = make_inputs(1, 6, 2, M, N, 16, torch.float32, device, seed=4)
    o, lse = kernels.attention_with_cache(q, k, v, off)
    dq = kernels.attention_with_cache_dq(q, k, v, o, lse, do, off)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, off + M:] = 100.0 * torch.randn_like(k2[:, :, off + M:])
    v2[:, :, off + M:] = -7.0
    o2, lse2 = kernels.attention_with_cache(q, k2, v2, off)
    dq2 = kernels.attention_with_cache_dq(q, k2, v2, o2, lse2, do, off)
    assert torch.equal(o, o2) and torch.equal(lse, lse2) and torch.equal(dq, dq2)
    k3 = k.clone()
    k3[:, :, off + M - 1] += 1.0
    o3, _ = kernels.attention_with_cache(q, k3, v, off)
    changed = (o3 - o).abs().amax(dim=(0, 1, 3)) > 0
    assert changed[-1] and not changed[:-1].any()


@pytest.mark.parametrize("num_splits,block_m,block_n", [(3, 16, 16), (2, 32, 16), (1, 16, 32), (None, 32, 32)])
def test_triton_splits_and_blocks(num_splits, block_m, block_n, device):
    """Split-KV partials + torch combine, and other tile sizes, give the reference answer."""
    from kernels import triton_attention as ta

    q, k, v, do = make_inputs(1, 4, 2, 23, 70, 24, torch.float32, device, seed=5)
    off = 30
    ro, rl = reference.attention_with_cache(q, k, v, off)
    rdq = reference.attention_with_cache_dq(q, k, v, ro, rl, do, off)
    kw = dict(num_splits=num_splits, block_m=block_m, block_n=block_n)
    o, lse = ta.attention_with_cache(q, k, v, off, **kw)
    dq = ta.attention_with_cache_dq(q, k, v, o, lse, do, off, **kw)
    torch.testing.assert_close(o, ro, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, rl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dq, rdq, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_strided_inputs_and_scale(backend, device):
    """q in the (B, M, H, D)-transposed layout HF uses, k/v slices of a longer cache, custom scale."""
    B, Hq, Hkv, M, N, D, off = 1, 4, 2, 10, 33, 24, 23
    g = torch.Generator().manual_seed(6)
    q = torch.randn(B, M, Hq, D, generator=g).to(device).transpose(1, 2)
    kbig = torch.randn(B, Hkv, N + 7, D, generator=g).to(device)
    vbig = torch.randn(B, Hkv, N + 7, D, generator=g).to(device)
    k, v = kbig[:, :, :N], vbig[:, :, 3:N + 3]
    do = torch.randn(B, Hq, M, D, generator=g).to(device)
    assert not q.is_contiguous() and not k.is_contiguous()
    scale = 0.3
    o_t, lse_t, dq_t = sdpa_truth(q, k, v, do, off, scale=scale)
    o, lse = kernels.attention_with_cache(q, k, v, off, scale=scale)
    dq = kernels.attention_with_cache_dq(q, k, v, o, lse, do, off, scale=scale)
    assert err(o, o_t) < 2e-5 and err(lse, lse_t) < 2e-5 and err(dq, dq_t) < 2e-5


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("M,N,off", [(1, 1, 0), (1, 40, 39), (17, 17, 0), (20, 40, 1)])
def test_edge_shapes(backend, M, N, off, device):
    q, k, v, do = make_inputs(1, 2, 1, M, N, 16, torch.float32, device, seed=7)
    o_t, lse_t, dq_t = sdpa_truth(q, k, v, do, off)
    o, lse = kernels.attention_with_cache(q, k, v, off)
    dq = kernels.attention_with_cache_dq(q, k, v, o, lse, do, off)
    assert err(o, o_t) < 2e-5 and err(lse, lse_t) < 2e-5 and err(dq, dq_t) < 2e-5


def test_triton_bf16(device, monkeypatch):
    """bf16 runs (upcast after load under the interpreter) with bf16-level error."""
    q, k, v, do = make_inputs(1, 4, 2, 13, 29, 24, torch.bfloat16, device, seed=8)
    off = 16
    o_t, lse_t, dq_t = sdpa_truth(q, k, v, do, off)
    o_b, dq_b = lowprec_baseline(q.float(), k.float(), v.float(), do.float(), off)
    o_b, dq_b = o_b.bfloat16(), dq_b.bfloat16()        # fp32 math rounded to bf16 once
    monkeypatch.setenv("TTT_LENS_KERNELS", "triton")
    o, lse = kernels.attention_with_cache(q, k, v, off)
    dq = kernels.attention_with_cache_dq(q, k, v, o, lse, do, off)
    assert o.dtype == torch.bfloat16 and dq.dtype == torch.bfloat16
    assert_close_rule("o", o, o_t, o_b, torch.bfloat16)
    assert err(lse, lse_t) < 1e-4
    assert_close_rule("dq", dq, dq_t, dq_b, torch.bfloat16)


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_argument_validation(backend, device):
    q, k, v, _ = make_inputs(1, 5, 2, 4, 8, 16, torch.float32, device)
    with pytest.raises(ValueError, match="multiple"):
        kernels.attention_with_cache(q, k, v, 0)
    q, k, v, _ = make_inputs(1, 4, 2, 4, 8, 16, torch.float32, device)
    with pytest.raises(ValueError, match="q_offset"):
        kernels.attention_with_cache(q, k, v, -1)
    with pytest.raises(ValueError, match="same shape"):
        kernels.attention_with_cache(q, k, v[:, :, :5], 0)


# ---- autograd Function -----------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_frozen_kv_attention_grad_matches_sdpa(backend, dtype, device):
    B, Hq, Hkv, M, N, D, off = 1, 6, 2, 19, 45, 24, 26
    q, k, v, do = make_inputs(B, Hq, Hkv, M, N, D, dtype, device, seed=9)
    o_t, _, dq_t = sdpa_truth(q, k, v, do, off)
    o_b, dq_b = lowprec_baseline(q, k, v, do, off)
    # q produced by a small differentiable op, like q_proj in the model
    w = torch.eye(D, dtype=dtype, device=device).requires_grad_(True)
    qq = q @ w
    o = kernels.frozen_kv_attention(qq, k, v, off)
    assert o.requires_grad and o.dtype == dtype
    (o * do).sum().backward()
    assert k.grad is None and v.grad is None
    assert_close_rule("o", o.detach(), o_t, o_b, dtype)
    # dL/dw = qᵀ dq summed over batch/heads: check the chain rule reached w with the right dq
    dw_t = torch.einsum("bhmd,bhme->de", q.double(), dq_t)
    dw_b = torch.einsum("bhmd,bhme->de", q.double(), dq_b.double())
    assert_close_rule("dw", w.grad, dw_t, dw_b, dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_frozen_kv_attention_dq_direct(backend, device):
    q, k, v, do = make_inputs(1, 9, 3, 13, 50, 16, torch.float32, device, seed=10)
    _, _, dq_t = sdpa_truth(q, k, v, do, 17)
    qq = q.clone().requires_grad_(True)
    o = kernels.frozen_kv_attention(qq, k, v, 17)
    (dq,) = torch.autograd.grad(o, qq, do)
    assert err(dq, dq_t) < 2e-5


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_keep_p_forward_and_dq_vs_sdpa_autograd(case, device):
    """The CPU training path (P kept from the forward) against float64 SDPA autograd."""
    _, B, Hq, Hkv, M, N, D, off = case
    q, k, v, do = make_inputs(B, Hq, Hkv, M, N, D, torch.float32, device, seed=12)
    o_t, _, dq_t = sdpa_truth(q, k, v, do, off)
    o_b, dq_b = lowprec_baseline(q, k, v, do, off)
    o, p = reference.attention_with_cache_probs(q, k, v, off)
    assert p.shape == (B, Hkv, Hq // Hkv, M, min(N, off + M))
    dq = reference.attention_dq_from_probs(p, k, v, o, do)
    assert_close_rule("o", o, o_t, o_b, torch.float32)
    assert_close_rule("dq", dq, dq_t, dq_b, torch.float32)


@pytest.mark.parametrize("budget", [0, 1 << 30], ids=["recompute", "keep_p"])
def test_frozen_kv_attention_gradcheck_fp64(monkeypatch, device, budget):
    monkeypatch.setenv("TTT_LENS_KERNELS", "torch")
    monkeypatch.setattr(kernels.dispatch, "SAVED_PROBS_BUDGET", budget)
    q, k, v, _ = make_inputs(1, 4, 2, 5, 9, 8, torch.float64, device, seed=11)
    q.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: kernels.frozen_kv_attention(x, k, v, 3), (q,))


@pytest.mark.parametrize("which", ["k", "v"])
def test_frozen_kv_attention_rejects_trainable_cache(which, device):
    q, k, v, _ = make_inputs(1, 2, 1, 3, 6, 16, torch.float32, device)
    (k if which == "k" else v).requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        kernels.frozen_kv_attention(q, k, v, 2)
