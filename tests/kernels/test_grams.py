"""Per-head kernel matrices K_h = (A Aᵀ) ⊙ (B_h B_hᵀ) (DESIGN §2 "Linear layers factorise")."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference


def make(n, d_in, n_heads, d_head, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d_in, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n_heads * d_head, generator=g).to(device=device, dtype=dtype)
    return a, b


def brute_force_phi_grams(a, b, n_heads):
    """Build each position's gradient feature vec(b_{h,i} a_iᵀ) explicitly (the gradient of
    s_i = b_{h,i}ᵀ W_h a_i w.r.t. W_h) and take Φ_h Φ_hᵀ, in fp64."""
    n = a.shape[0]
    d_head = b.shape[1] // n_heads
    a64, b64 = a.double(), b.double()
    out = []
    for h in range(n_heads):
        bh = b64[:, h * d_head:(h + 1) * d_head]
        phi = torch.stack([torch.outer(bh[i], a64[i]).reshape(-1) for i in range(n)])   # (n, d_head·d_in)
        out.append(phi @ phi.T)
    return torch.stack(out)


def tolerance(dtype, ref):
    scale = ref.abs().max().item()
    # inputs are exact in every dtype, products accumulate in fp32: only fp32 rounding remains
    return 1e-5 * scale


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n,d_in,n_heads,d_head", [(37, 20, 3, 8), (16, 20, 2, 8), (5, 7, 4, 3)])
def test_head_grams_vs_phi_gram_and_reference(backend, dtype, n, d_in, n_heads, d_head, device):
    a, b = make(n, d_in, n_heads, d_head, dtype, device)
    truth = brute_force_phi_grams(a, b, n_heads)
    ref = reference.head_grams(a, b, n_heads)
    out = kernels.head_grams(a, b, n_heads)
    assert out.shape == (n_heads, n, n) and out.dtype == torch.float32
    tol = tolerance(dtype, truth)
    assert (ref.double() - truth).abs().max().item() <= tol, "reference vs Φ-Gram"
    assert (out.double() - truth).abs().max().item() <= tol, "kernel vs Φ-Gram"
    torch.testing.assert_close(out, ref, atol=tol, rtol=0)


def test_hadamard_factorisation_is_not_trivial(device):
    """Guard against a test that passes for any symmetric output: the Φ-Gram of one head differs
    from the plain product of full Grams and from another head's kernel."""
    a, b = make(9, 5, 2, 4, torch.float64, device, seed=3)
    truth = brute_force_phi_grams(a, b, 2)
    wrong = (a @ a.T) * (b @ b.T)                       # ignores the head split
    assert (truth[0] - wrong).abs().max() > 1.0 and (truth[0] - truth[1]).abs().max() > 1.0


@pytest.mark.parametrize("block_t,head_groups", [(16, 2), (16, 3), (32, 1), (64, None)])
def test_triton_grams_tiles_and_head_groups(block_t, head_groups, device):
    from kernels import triton_grams

    a, b = make(37, 20, 3, 24, torch.float32, device, seed=1)
    ref = reference.head_grams(a, b, 3)
    out = triton_grams.head_grams(a, b, 3, block_t=block_t, head_groups=head_groups)
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
    assert torch.allclose(out, out.transpose(1, 2), atol=1e-5 * ref.abs().max().item())


def test_triton_grams_bf16_and_strided(device, monkeypatch):
    a_full, b_full = make(33, 40, 2, 16, torch.bfloat16, device, seed=2)
    a = a_full[:, ::2]                                   # non-unit column stride
    b = b_full
    ref = reference.head_grams(a, b, 2)
    monkeypatch.setenv("TTT_LENS_KERNELS", "triton")
    out = kernels.head_grams(a, b, 2)
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_head_grams_validation(backend, device):
    a, b = make(6, 4, 3, 2, torch.float32, device)
    with pytest.raises(ValueError, match="multiple of n_heads"):
        kernels.head_grams(a, b, 4)
    with pytest.raises(ValueError, match="same number of rows"):
        kernels.head_grams(a[:5], b, 3)
