"""Plain PyTorch references for the TTT Lens kernels (DESIGN §9).

These are the ground truth the Triton kernels are tested against and the backend used on CPU.
They accumulate in fp32 (fp64 when the inputs are fp64, so `torch.autograd.gradcheck` can run on
them), process query rows in chunks so the M×N score matrix stays bounded for long caches, and
never expand grouped K/V heads in memory (query heads are viewed as (Hkv, group) instead).

Semantics shared with the Triton kernels
----------------------------------------
* q (B, Hq, M, D): new query rows at absolute positions q_offset … q_offset+M−1.
* k, v (B, Hkv, N, D): the frozen cache; Hq = G·Hkv, query head h reads kv head h // G.
* causal with offset: row i sees key j iff j ≤ q_offset + i (and j < N).
* scale defaults to 1/sqrt(D); lse (B, Hq, M) fp32 is the natural-log log-sum-exp of the
  scaled, masked scores of each row.
"""

from __future__ import annotations

import math

import torch

# Upper bound on the number of score entries (rows × keys × heads × batch) held at once.
_SCORE_BUDGET = 1 << 24


def check_attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int,
                         scale: float | None) -> tuple[int, float]:
    """Validate shapes/devices; return (q_offset as int, scale as float)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, M, D = q.shape
    Bk, Hkv, N, Dk = k.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if Bk != B or Dk != D:
        raise ValueError(f"batch/head-dim mismatch: q {tuple(q.shape)} vs k {tuple(k.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"Hq ({Hq}) must be a positive multiple of Hkv ({Hkv})")
    if N == 0:
        raise ValueError("the key/value cache is empty (N = 0)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    q_offset = int(q_offset)
    if q_offset < 0:
        raise ValueError(f"q_offset must be ≥ 0, got {q_offset}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    return q_offset, scale


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunk(B: int, Hq: int, M: int, N: int) -> int:
    return max(1, min(M, _SCORE_BUDGET // max(1, B * Hq * N)))


def _masked_scores(qc: torch.Tensor, kt: torch.Tensor, row0: int, q_offset: int, scale: float) -> torch.Tensor:
    """qc (B, Hkv, G, m, D), kt (B, Hkv, D, N) -> scaled scores (B, Hkv, G, m, N), -inf where masked.
    The G query heads of a kv head are stacked as rows of one batched matmul (no K expansion).
    Keys j < q_offset + row0 are visible to every row of the chunk, so only the trailing columns
    are masked."""
    B, Hkv, G, m, D = qc.shape
    N = kt.shape[-1]
    s = torch.matmul(qc.reshape(B, Hkv, G * m, D), kt).view(B, Hkv, G, m, N)
    s.mul_(scale)
    c0 = q_offset + row0
    if c0 < N:
        rows = torch.arange(m, device=s.device)[:, None] + c0
        cols = torch.arange(c0, N, device=s.device)[None, :]
        s[..., c0:].masked_fill_(cols > rows, float("-inf"))
    return s


def _visible_keys(N: int, q_offset: int, M: int) -> int:
    """Keys any of the M rows can see: j ≤ q_offset + M − 1 (keys beyond are never read)."""
    return min(N, q_offset + M)


def attention_with_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int,
                         scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference forward: returns (o in q.dtype, lse fp32 (B, Hq, M))."""
    q_offset, scale = check_attention_args(q, k, v, q_offset, scale)
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    N = _visible_keys(N, q_offset, M)
    acc = _acc_dtype(q.dtype)
    qf = q.to(acc).reshape(B, Hkv, G, M, D)
    kt, vf = k[:, :, :N].to(acc).transpose(-1, -2), v[:, :, :N].to(acc)
    o = torch.empty(B, Hkv, G, M, D, dtype=acc, device=q.device)
    lse = torch.empty(B, Hkv, G, M, dtype=acc, device=q.device)
    step = _row_chunk(B, Hq, M, N)
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        m = r1 - r0
        s = _masked_scores(qf[..., r0:r1, :], kt, r0, q_offset, scale)
        mx = s.amax(dim=-1, keepdim=True)          # finite: every row sees key 0
        p = s.sub_(mx).exp_()
        l = p.sum(dim=-1, keepdim=True)
        pv = torch.matmul(p.view(B, Hkv, G * m, N), vf).view(B, Hkv, G, m, D)
        o[..., r0:r1, :] = pv / l
        lse[..., r0:r1] = (mx + torch.log(l)).squeeze(-1)
    out_lse = lse.reshape(B, Hq, M)
    if acc != torch.float64:
        out_lse = out_lse.float()
    return o.reshape(B, Hq, M, D).to(q.dtype), out_lse


def attention_with_cache_dq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                            lse: torch.Tensor, do: torch.Tensor, q_offset: int,
                            scale: float | None = None) -> torch.Tensor:
    """Reference dQ by the explicit FlashAttention-2 formula (not autograd):
    Δ = rowsum(dO∘O), P = exp(s·QKᵀ − lse), dP = dO Vᵀ, dS = P∘(dP − Δ), dQ = s·dS K."""
    q_offset, scale = check_attention_args(q, k, v, q_offset, scale)
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    if o.shape != q.shape or do.shape != q.shape or lse.shape != (B, Hq, M):
        raise ValueError(f"o/do must be {tuple(q.shape)} and lse {(B, Hq, M)}; got "
                         f"{tuple(o.shape)}, {tuple(do.shape)}, {tuple(lse.shape)}")
    G = Hq // Hkv
    acc = _acc_dtype(q.dtype)
    qf = q.to(acc).reshape(B, Hkv, G, M, D)
    dof = do.to(acc).reshape(B, Hkv, G, M, D)
    delta = (dof * o.to(acc).reshape(B, Hkv, G, M, D)).sum(-1)
    lsef = lse.to(acc).reshape(B, Hkv, G, M)
    N = _visible_keys(N, q_offset, M)
    kf = k[:, :, :N].to(acc)
    kt, vt = kf.transpose(-1, -2), v[:, :, :N].to(acc).transpose(-1, -2)
    dq = torch.empty(B, Hkv, G, M, D, dtype=acc, device=q.device)
    step = _row_chunk(B, Hq, M, N)
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        m = r1 - r0
        s = _masked_scores(qf[..., r0:r1, :], kt, r0, q_offset, scale)
        p = s.sub_(lsef[..., r0:r1].unsqueeze(-1)).exp_()                 # P; exactly 0 where masked
        dp = torch.matmul(dof[..., r0:r1, :].reshape(B, Hkv, G * m, D), vt).view(B, Hkv, G, m, N)
        ds = dp.sub_(delta[..., r0:r1].unsqueeze(-1)).mul_(p)            # dS = P∘(dP − Δ)
        dq[..., r0:r1, :] = torch.matmul(ds.view(B, Hkv, G * m, N), kf).view(B, Hkv, G, m, D) * scale
    return dq.reshape(B, Hq, M, D).to(q.dtype)


def attention_with_cache_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int,
                               scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward that keeps the probabilities for a recompute-free backward (the CPU training path).

    Same semantics as `attention_with_cache`; returns (o in q.dtype, P) with
    P = softmax(scale·q kᵀ + mask) of shape (B, Hkv, G, M, N_vis) in the accumulation dtype,
    N_vis = min(N, q_offset + M) (later keys are never visible). Memory: B·Hq·M·N_vis floats."""
    q_offset, scale = check_attention_args(q, k, v, q_offset, scale)
    B, Hq, M, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    N = _visible_keys(k.shape[2], q_offset, M)
    acc = _acc_dtype(q.dtype)
    s = _masked_scores(q.to(acc).reshape(B, Hkv, G, M, D), k[:, :, :N].to(acc).transpose(-1, -2), 0, q_offset, scale)
    p = torch.softmax(s, dim=-1)
    o = torch.matmul(p.view(B, Hkv, G * M, N), v[:, :, :N].to(acc)).view(B, Hq, M, D)
    return o.to(q.dtype), p


def attention_dq_from_probs(p: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                            do: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """dQ from saved probabilities P (B, Hkv, G, M, N_vis) of `attention_with_cache_probs`:
    Δ = rowsum(dO∘O), dP = dO Vᵀ, dS = P∘(dP − Δ), dQ = scale·dS K (FlashAttention-2's formula
    without recomputing P). o, do (B, Hq, M, D); k, v (B, Hkv, N, D) with N ≥ N_vis."""
    B, Hkv, G, M, N = p.shape
    D = k.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    acc = p.dtype
    dof = do.to(acc).reshape(B, Hkv, G, M, D)
    delta = (dof * o.to(acc).reshape(B, Hkv, G, M, D)).sum(-1, keepdim=True)
    dp = torch.matmul(dof.reshape(B, Hkv, G * M, D), v[:, :, :N].to(acc).transpose(-1, -2)).view(B, Hkv, G, M, N)
    ds = dp.sub_(delta).mul_(p)
    dq = torch.matmul(ds.view(B, Hkv, G * M, N), k[:, :, :N].to(acc)).mul_(scale)
    return dq.view(B, Hkv * G, M, D).to(do.dtype)


def check_gram_args(a: torch.Tensor, b: torch.Tensor, n_heads: int) -> int:
    """Validate head_grams inputs; return d_head."""
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"a and b must be 2-D; got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have the same number of rows; got {a.shape[0]} and {b.shape[0]}")
    n_heads = int(n_heads)
    if n_heads <= 0 or b.shape[1] % n_heads != 0:
        raise ValueError(f"b's width {b.shape[1]} must be a positive multiple of n_heads={n_heads}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on one device; got {a.device} and {b.device}")
    return b.shape[1] // n_heads


def head_grams(a: torch.Tensor, b: torch.Tensor, n_heads: int) -> torch.Tensor:
    """K_h = (a aᵀ) ⊙ (b_h b_hᵀ) for every head h; returns fp32 (n_heads, n, n)
    (fp64 when both inputs are fp64)."""
    d_head = check_gram_args(a, b, n_heads)
    acc = torch.float64 if (a.dtype == torch.float64 and b.dtype == torch.float64) else torch.float32
    af = a.to(acc)
    bh = b.to(acc).reshape(b.shape[0], int(n_heads), d_head)
    ga = af @ af.T
    gb = torch.einsum("ihd,jhd->hij", bh, bh)
    return ga.unsqueeze(0) * gb


def attention_flops(B: int, Hq: int, M: int, N: int, D: int, q_offset: int) -> dict[str, float]:
    """Model FLOPs of frozen-cache attention (matmuls only, 2 per MAC):
    fwd 4·B·Hq·M·N_eff·D, dQ-only backward 6·B·Hq·M·N_eff·D, a full FA-2 backward 10·B·Hq·M·N_eff·D,
    where N_eff = (1/M)·Σ_i min(N, q_offset+i+1) is the mean number of keys a row sees."""
    full = max(0, min(M, N - q_offset))                # rows whose causal limit is inside the cache
    n_eff_sum = full * (q_offset + 1) + full * (full - 1) // 2 + (M - full) * N
    base = float(B * Hq * n_eff_sum * D)
    return {"fwd": 4.0 * base, "dq": 6.0 * base, "fa2_full_bwd": 10.0 * base, "n_eff": n_eff_sum / max(1, M)}


def gram_flops(n: int, d_in: int, n_heads: int, d_head: int) -> float:
    """Model FLOPs of head_grams without symmetry: 2·n²·(d_in + H·d_head) + H·n² (the Triton kernel
    does about half of the Gram part by computing only lower-triangular tiles)."""
    return 2.0 * n * n * (d_in + n_heads * d_head) + n_heads * n * n
