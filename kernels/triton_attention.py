"""Triton kernels: attention of new query rows against a frozen K/V cache, and its dQ-only backward.

This is the qTTT hot path (DESIGN §2 "qTTT makes positions independent", §7.2, §9): a span of M
query rows at absolute positions q_offset … q_offset+M−1 attends to a frozen cache of N keys, and
only W_Q is trained, so the backward needs dQ alone. There is no dK/dV kernel, no dK/dV
accumulator and no atomics anywhere in this file.

Layout: q (B, Hq, M, D); k, v (B, Hkv, N, D), any strides; Hq = G·Hkv (grouped-query: query head h
reads kv head h // G). Row i sees key j iff j ≤ q_offset + i and j < N.

Design notes
* One program per (query-row block, batch·query-head, key split). Online softmax in fp32 with
  exp2 (scores pre-multiplied by scale·log2 e); the row log-sum-exp is saved in natural-log units.
* Causal early termination: a row block stops at key min(N, q_offset + block end); key tiles
  wholly visible to every row of the block run without masks, the rest (the diagonal band, the
  ragged end of N) run masked.
* Split-KV ("flash-decoding"): in the qTTT regime M is a short span (k = 128) against a long
  cache, so B·Hq·⌈M/BLOCK_M⌉ programs can be far fewer than the GPU's SMs. The key range is then
  cut into `num_splits` contiguous pieces; each writes fp32 partials (o, lse for the forward;
  dq for the backward) and a cheap torch reduction combines them. dQ is a plain sum over key
  tiles given the saved global lse, so splitting the backward is exact.
* D is padded to a power of two (≥ 16) with masks, so D = 24, 48, 80 … work.
* dtypes: fp16/bf16 feed tl.dot natively with fp32 accumulation (P and dS are cast to the input
  dtype for the second matmul, as in FlashAttention-2); fp32 inputs use input_precision="ieee"
  (no TF32). Under the Triton interpreter (TRITON_INTERPRET=1, CPU) bf16 is not supported, so bf16
  tiles are upcast to fp32 right after loading.
* No @triton.autotune: block sizes come from `_attn_config` (head dim, dtype, compute capability),
  and small fixed blocks (16×16) under the interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .reference import check_attention_args

LOG2E = 1.4426950408889634


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, lo, hi, pos_m, N, D, qk_scale,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
               UPCAST: tl.constexpr, PREC: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kt_ptrs = k_base + cols[None, :] * skn + offs_d[:, None] * skd
        v_ptrs = v_base + cols[:, None] * svn + offs_d[None, :] * svd
        if MASKED:
            col_ok = cols < N
            kt = tl.load(kt_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        if MASKED:
            ok = (cols[None, :] <= pos_m[:, None]) & (cols[None, :] < N)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows that have seen no key yet (possible inside a split) keep m = -inf; avoid inf - inf
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                     sos, sob, soh, som, sod, sls, slb, slh, slm,
                     H_Q, GROUP, M, N, D, q_offset, split_len, qk_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Forward of frozen-cache attention for one (row block, b·hq, key split).

    Work per call (N_eff = mean number of keys a row sees, = Σ_i min(N, q_offset+i+1) / M; the
    kernel touches whole tiles, so add ≤ one BLOCK_N per row block):
      FLOPs  ≈ 4·B·Hq·M·N_eff·D          (QKᵀ and PV, 2 flops per MAC each)
               + ~5·B·Hq·M·N_eff exp2/scale/max ops on the score tile.
      bytes  ≈ (|q| + |o|)·itemsize + 4·B·Hq·M (lse) compulsory,
               + ⌈M/BLOCK_M⌉·G·(|k| + |v|)_visible·itemsize of K/V streaming (mostly L2 hits:
               the G query heads of one kv head and neighbouring row blocks re-read the same tiles),
               + with S splits: 2·S·B·Hq·M·(D+1)·4 bytes of fp32 partials (write + combine read).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // H_Q).to(tl.int64)
    hq = (pid_bh % H_Q).to(tl.int64)
    hk = hq // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + hq * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    pos_m = q_offset + offs_m
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh

    row0 = q_offset + pid_m * BLOCK_M
    full = tl.minimum(N, row0 + 1)             # keys < full are visible to every row of the block
    lo = pid_s * split_len
    hi = tl.minimum(tl.minimum(N, row0 + BLOCK_M), lo + split_len)   # causal early termination
    mid = tl.minimum(lo + (tl.maximum(full - lo, 0) // BLOCK_N) * BLOCK_N, hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, lo, mid, pos_m,
                               N, D, qk_scale, BLOCK_N, BLOCK_D, False, UPCAST, PREC)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, mid, hi, pos_m,
                               N, D, qk_scale, BLOCK_N, BLOCK_D, True, UPCAST, PREC)

    l_ok = l_i > 0.0
    l_safe = tl.where(l_ok, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(l_ok, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    s64 = pid_s.to(tl.int64)
    tl.store(O + s64 * sos + b * sob + hq * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + s64 * sls + b * slb + hq * slh + offs_m * slm, lse, mask=m_ok)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, skn, skd, svn, svd, lo, hi, pos_m, N, D, qk_scale,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
              UPCAST: tl.constexpr, PREC: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_base + cols[:, None] * skn + offs_d[None, :] * skd
        vt_ptrs = v_base + cols[None, :] * svn + offs_d[:, None] * svd
        if MASKED:
            col_ok = cols < N
            k = tl.load(k_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            vt = tl.load(vt_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            vt = tl.load(vt_ptrs, mask=d_ok[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if MASKED:
            ok = (cols[None, :] <= pos_m[:, None]) & (cols[None, :] < N)
            s = tl.where(ok, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])                     # P = exp(s·qkᵀ − lse); 0 where masked
        dp = tl.dot(do, vt, input_precision=PREC)              # dP = dO Vᵀ
        ds = p * (dp - delta[:, None])                          # dS = P ∘ (dP − Δ)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)  # dQ += dS K
    return dq


@triton.jit
def _attn_dq_kernel(Q, K, V, O, DO, LSE, DQ,
                    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                    sob, soh, som, sod, sdb, sdh, sdm, sdd, slb, slh, slm,
                    sqs, sgb, sgh, sgm, sgd,
                    H_Q, GROUP, M, N, D, q_offset, split_len, qk_scale, sm_scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    UPCAST: tl.constexpr, PREC: tl.constexpr):
    """dQ-only backward for one (row block, b·hq, key split); Δ = rowsum(dO∘O) is fused in
    (each program owns its rows), so this is the only launch of the backward.

    Work per call (N_eff as in the forward):
      FLOPs  ≈ 6·B·Hq·M·N_eff·D   (recompute QKᵀ, dO Vᵀ, dS K) + 2·B·Hq·M·D for Δ.
               A full FlashAttention-2 backward costs ≈ 10·B·Hq·M·N_eff·D (adds dV = Pᵀ dO and
               dK = dSᵀ Q): dQ-only saves 40 % of the matmul work, all dK/dV stores and all
               atomics/second pass over keys.
      bytes  ≈ (|q| + |o| + |dO| + |dq|)·itemsize + 4·B·Hq·M (lse) compulsory,
               + ⌈M/BLOCK_M⌉·G·(|k| + |v|)_visible·itemsize of K/V streaming (mostly L2),
               + with S splits: 2·S·|dq|·4 bytes of fp32 partials.
      Nothing is written for K or V: they are frozen.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // H_Q).to(tl.int64)
    hq = (pid_bh % H_Q).to(tl.int64)
    hk = hq // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    d_ok = offs_d < D
    md_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + hq * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=md_ok, other=0.0)
    do = tl.load(DO + b * sdb + hq * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=md_ok, other=0.0)
    o = tl.load(O + b * sob + hq * soh + offs_m[:, None] * som + offs_d[None, :] * sod, mask=md_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse2 = tl.load(LSE + b * slb + hq * slh + offs_m * slm, mask=m_ok, other=0.0) * 1.4426950408889634
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    pos_m = q_offset + offs_m
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh

    row0 = q_offset + pid_m * BLOCK_M
    full = tl.minimum(N, row0 + 1)
    lo = pid_s * split_len
    hi = tl.minimum(tl.minimum(N, row0 + BLOCK_M), lo + split_len)
    mid = tl.minimum(lo + (tl.maximum(full - lo, 0) // BLOCK_N) * BLOCK_N, hi)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, skn, skd, svn, svd, lo, mid, pos_m, N, D,
                   qk_scale, BLOCK_N, BLOCK_D, False, UPCAST, PREC)
    dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, skn, skd, svn, svd, mid, hi, pos_m, N, D,
                   qk_scale, BLOCK_N, BLOCK_D, True, UPCAST, PREC)
    dq = dq * sm_scale
    tl.store(DQ + pid_s.to(tl.int64) * sqs + b * sgb + hq * sgh + offs_m[:, None] * sgm + offs_d[None, :] * sgd,
             dq.to(DQ.dtype.element_ty), mask=md_ok)


# True when the kernels above were decorated under TRITON_INTERPRET=1 (CPU interpreter).
INTERPRETED = type(_attn_fwd_kernel).__name__ == "InterpretedFunction"

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class AttnConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _attn_config(kind: str, D: int, dtype: torch.dtype, device: torch.device) -> AttnConfig:
    """Tile sizes per kernel kind ("fwd" | "dq"), head dim, dtype and GPU generation.

    Hopper (sm90, 228 KB smem/SM): fwd 128×128 tiles for D ≤ 64 and 128×64 for D ≤ 128 with 8 warps
    and 3 stages; dq keeps q, dO and the dq accumulator live, so it uses 128×32 (D ≤ 128) like
    the Triton fused-attention tutorial's dq pass. Ampere drops a stage. fp32 (IEEE, no tensor
    cores) and D > 128 use small tiles to stay within registers. Interpreter: 16×16 so the odd test
    shapes cross several tiles and the run stays fast."""
    if INTERPRETED or device.type != "cuda":
        return AttnConfig(16, 16, 4, 1)
    major, _ = torch.cuda.get_device_capability(device)
    half = dtype in (torch.float16, torch.bfloat16)
    if not half:
        return AttnConfig(64, 32, 4, 2) if D <= 64 else AttnConfig(32, 32, 4, 2)
    if D > 128:
        return AttnConfig(64, 32, 4, 2) if kind == "fwd" else AttnConfig(64, 16, 4, 2)
    stages = 3 if major >= 9 else 2
    if kind == "fwd":
        if D <= 64:
            return AttnConfig(128, 128 if major >= 9 else 64, 8 if major >= 9 else 4, stages)
        return AttnConfig(128, 64, 8, stages)
    return AttnConfig(128, 64 if D <= 64 else 32, 8, stages)


def _num_splits(n_programs: int, n_key_tiles: int, device: torch.device) -> int:
    """Split the key range when the (row block × head) programs cannot fill the GPU."""
    if INTERPRETED or device.type != "cuda":
        return 1
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    if n_programs >= n_sm:
        return 1
    return max(1, min(triton.cdiv(2 * n_sm, n_programs), n_key_tiles // 4))


def _plan(M: int, N: int, q_offset: int, bh: int, cfg: AttnConfig, device: torch.device,
          num_splits: int | None) -> tuple[int, int]:
    """(number of splits, keys per split) for a launch; split length is a multiple of BLOCK_N."""
    kv_hi = min(N, q_offset + M)                       # no row sees a key at or beyond this
    n_tiles = triton.cdiv(kv_hi, cfg.block_n)
    S = _num_splits(triton.cdiv(M, cfg.block_m) * bh, n_tiles, device) if num_splits is None else int(num_splits)
    S = max(1, min(S, n_tiles))
    split_len = triton.cdiv(n_tiles, S) * cfg.block_n
    return triton.cdiv(kv_hi, split_len), split_len


def _prep(q: torch.Tensor, block_m: int | None, block_n: int | None, kind: str) -> tuple[AttnConfig, int, bool, str]:
    if q.dtype not in _SUPPORTED:
        raise TypeError(f"Triton attention supports fp16/bf16/fp32 inputs, got {q.dtype}")
    D = q.shape[-1]
    cfg = _attn_config(kind, D, q.dtype, q.device)
    M = q.shape[2]
    if cfg.block_m > max(16, _next_pow2(M)):           # short spans: don't compute empty rows
        bm = max(16, _next_pow2(M))
        cfg = AttnConfig(bm, cfg.block_n, min(cfg.num_warps, 4 if bm <= 64 else 8), cfg.num_stages)
    if block_m is not None or block_n is not None:
        cfg = AttnConfig(block_m or cfg.block_m, block_n or cfg.block_n, cfg.num_warps, cfg.num_stages)
    block_d = max(16, _next_pow2(D))
    upcast = INTERPRETED and q.dtype == torch.bfloat16
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    return cfg, block_d, upcast, prec


def attention_with_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int,
                         scale: float | None = None, *, block_m: int | None = None,
                         block_n: int | None = None, num_splits: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: (o in q.dtype (B, Hq, M, D), lse fp32 (B, Hq, M)).
    FLOPs ≈ 4·B·Hq·M·N_eff·D; see `_attn_fwd_kernel` for bytes. Keyword overrides are for tests."""
    q_offset, scale = check_attention_args(q, k, v, q_offset, scale)
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    o = torch.empty((B, Hq, M, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, M), dtype=torch.float32, device=q.device)
    if M == 0 or B * Hq == 0:
        return o, lse
    cfg, block_d, upcast, prec = _prep(q, block_m, block_n, "fwd")
    S, split_len = _plan(M, N, q_offset, B * Hq, cfg, q.device, num_splits)
    if S == 1:
        o_buf, lse_buf, sos, sls = o, lse, 0, 0
        so, sl = o.stride(), lse.stride()
    else:
        o_buf = torch.empty((S, B, Hq, M, D), dtype=torch.float32, device=q.device)
        lse_buf = torch.empty((S, B, Hq, M), dtype=torch.float32, device=q.device)
        sos, sls = o_buf.stride(0), lse_buf.stride(0)
        so, sl = o_buf.stride()[1:], lse_buf.stride()[1:]
    grid = (triton.cdiv(M, cfg.block_m), B * Hq, S)
    _attn_fwd_kernel[grid](
        q, k, v, o_buf, lse_buf,
        *q.stride(), *k.stride(), *v.stride(),
        sos, *so, sls, *sl,
        Hq, Hq // Hkv, M, N, D, q_offset, split_len, scale * LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, UPCAST=upcast, PREC=prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if S > 1:
        torch.logsumexp(lse_buf, dim=0, out=lse)
        w = torch.exp(lse_buf - lse.unsqueeze(0))      # 0 for splits a row never reached
        o.copy_((w.unsqueeze(-1) * o_buf).sum(0))
    return o, lse


def attention_with_cache_dq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                            lse: torch.Tensor, do: torch.Tensor, q_offset: int, scale: float | None = None,
                            *, block_m: int | None = None, block_n: int | None = None,
                            num_splits: int | None = None) -> torch.Tensor:
    """Triton dQ-only backward (one launch; no dK/dV). Returns dq in q.dtype.
    FLOPs ≈ 6·B·Hq·M·N_eff·D; see `_attn_dq_kernel` for bytes."""
    q_offset, scale = check_attention_args(q, k, v, q_offset, scale)
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    if o.shape != q.shape or do.shape != q.shape or tuple(lse.shape) != (B, Hq, M):
        raise ValueError(f"o/do must be {tuple(q.shape)} and lse {(B, Hq, M)}; got "
                         f"{tuple(o.shape)}, {tuple(do.shape)}, {tuple(lse.shape)}")
    dq = torch.empty((B, Hq, M, D), dtype=q.dtype, device=q.device)
    if M == 0 or B * Hq == 0:
        return dq
    o = o.to(q.dtype)
    do = do.to(q.dtype)
    lse = lse.to(torch.float32)
    cfg, block_d, upcast, prec = _prep(q, block_m, block_n, "dq")
    S, split_len = _plan(M, N, q_offset, B * Hq, cfg, q.device, num_splits)
    if S == 1:
        buf, sqs, sg = dq, 0, dq.stride()
    else:
        buf = torch.empty((S, B, Hq, M, D), dtype=torch.float32, device=q.device)
        sqs, sg = buf.stride(0), buf.stride()[1:]
    grid = (triton.cdiv(M, cfg.block_m), B * Hq, S)
    _attn_dq_kernel[grid](
        q, k, v, o, do, lse, buf,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *lse.stride(),
        sqs, *sg,
        Hq, Hq // Hkv, M, N, D, q_offset, split_len, scale * LOG2E, scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, UPCAST=upcast, PREC=prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if S > 1:
        dq.copy_(buf.sum(0))
    return dq


__all__ = ["attention_with_cache", "attention_with_cache_dq", "INTERPRETED", "AttnConfig"]

