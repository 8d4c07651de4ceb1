"""Triton kernel: per-head kernel matrices K_h = (A Aᵀ) ⊙ (B_h B_hᵀ) for all heads in one launch.

DESIGN §2 "Linear layers factorise": a head's slice of a linear map y = W a has per-position
gradient features vec(b_{h,i} a_iᵀ), whose Gram is the Hadamard product of the input Gram A Aᵀ
(a: (n, d_in)) and the output-gradient Gram B_h B_hᵀ (b: (n, H·d_head), b_h its h-th column block).

Design
* K_h is symmetric, so only lower-triangular tile pairs (ti ≥ tj) are launched (a 1-D triangular
  index decoded in-kernel); each program writes its tile and, off the diagonal, the transposed
  tile.
* The input Gram tile is shared by every head: a program computes it once and then loops over a
  group of heads, computing each b_h Gram tile and storing the elementwise product. When there are
  too few tiles to fill the GPU, heads are split into `head_groups` groups (second grid axis), at
  the price of recomputing the input-Gram tile once per group.
* fp16/bf16 feed tl.dot natively (exact products, fp32 accumulation); fp32 uses IEEE (no TF32:
  these Grams feed an eigendecomposition). bf16 is upcast after loading under the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import check_gram_args


@triton.jit
def _head_gram_kernel(A, Bm, OUT, n, d_in, n_heads, d_head, heads_per_prog,
                      san, sad, sbn, sbd, soh, soi, soj,
                      BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DH: tl.constexpr,
                      UPCAST: tl.constexpr, PREC: tl.constexpr):
    """One lower-triangular (ti, tj) tile pair × one group of heads.

    Work (n rows, H heads, T = ⌈n/BLOCK_T⌉ tiles, Tri = T(T+1)/2 launched tile pairs, Gr head groups):
      FLOPs  ≈ 2·Tri·BLOCK_T²·(Gr·d_in + H·d_head) + Tri·BLOCK_T²·H
             ≈ n²·(Gr·d_in + H·d_head) for large n (symmetry halves the 2·n²·(…) of a full Gram;
             without the shared input Gram it would be n²·H·(d_in + d_head)).
      bytes  ≈ 4·H·n² written (fp32 output, both triangles)
               + 2·Tri·BLOCK_T·(Gr·d_in + H·d_head)·itemsize read (A and B tiles, mostly L2);
               compulsory reads (n·d_in + n·H·d_head)·itemsize.
    """
    pid = tl.program_id(0)
    pid_g = tl.program_id(1)
    # decode pid -> (ti, tj), ti ≥ tj, pid = ti(ti+1)/2 + tj; fix float rounding of the sqrt
    ti = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    ti = tl.where((ti + 1) * (ti + 2) // 2 <= pid, ti + 1, ti)
    ti = tl.where(ti * (ti + 1) // 2 > pid, ti - 1, ti)
    tj = pid - ti * (ti + 1) // 2

    rows = ti * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tj * BLOCK_T + tl.arange(0, BLOCK_T)
    r_ok = rows < n
    c_ok = cols < n
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)

    offs_k = tl.arange(0, BLOCK_K)
    ga = tl.zeros([BLOCK_T, BLOCK_T], tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < d_in
        ai = tl.load(A + rows64[:, None] * san + kk[None, :] * sad, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        ajt = tl.load(A + cols64[None, :] * san + kk[:, None] * sad, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        if UPCAST:
            ai = ai.to(tl.float32)
            ajt = ajt.to(tl.float32)
        ga = tl.dot(ai, ajt, ga, input_precision=PREC)

    offs_e = tl.arange(0, BLOCK_DH)
    out_mask = r_ok[:, None] & c_ok[None, :]
    h0 = pid_g * heads_per_prog
    h1 = tl.minimum(n_heads, h0 + heads_per_prog)
    base = OUT + h0.to(tl.int64) * soh            # loop-carried int64 pointer to head h's matrix
    for h in range(h0, h1):
        gb = tl.zeros([BLOCK_T, BLOCK_T], tl.float32)
        for e0 in range(0, d_head, BLOCK_DH):
            ee = e0 + offs_e
            e_ok = ee < d_head
            col = h * d_head + ee
            bi = tl.load(Bm + rows64[:, None] * sbn + col[None, :] * sbd, mask=r_ok[:, None] & e_ok[None, :], other=0.0)
            bjt = tl.load(Bm + cols64[None, :] * sbn + col[:, None] * sbd, mask=e_ok[:, None] & c_ok[None, :], other=0.0)
            if UPCAST:
                bi = bi.to(tl.float32)
                bjt = bjt.to(tl.float32)
            gb = tl.dot(bi, bjt, gb, input_precision=PREC)
        kt = ga * gb
        tl.store(base + rows64[:, None] * soi + cols64[None, :] * soj, kt, mask=out_mask)
        if ti != tj:
            tl.store(base + cols64[:, None] * soi + rows64[None, :] * soj, tl.trans(kt),
                     mask=c_ok[:, None] & r_ok[None, :])
        base += soh


INTERPRETED = type(_head_gram_kernel).__name__ == "InterpretedFunction"

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def head_grams(a: torch.Tensor, b: torch.Tensor, n_heads: int, *, block_t: int | None = None,
               head_groups: int | None = None) -> torch.Tensor:
    """Triton head Grams: fp32 (n_heads, n, n), K_h = (a aᵀ) ⊙ (b_h b_hᵀ). One launch for all heads.
    Keyword overrides are for tests."""
    d_head = check_gram_args(a, b, n_heads)
    n_heads = int(n_heads)
    n, d_in = a.shape
    out = torch.empty((n_heads, n, n), dtype=torch.float32, device=a.device)
    if n == 0:
        return out
    if a.dtype not in _SUPPORTED or b.dtype not in _SUPPORTED:
        raise TypeError(f"Triton head_grams supports fp16/bf16/fp32 inputs, got {a.dtype}, {b.dtype}")
    if a.dtype != b.dtype:                      # tl.dot needs one operand dtype per Gram; use the wider
        wide = torch.float32
        a, b = a.to(wide), b.to(wide)
    on_gpu = a.device.type == "cuda" and not INTERPRETED
    half = a.dtype in (torch.float16, torch.bfloat16)
    if on_gpu:
        bt, bk, warps, stages = 64, (64 if half else 32), 4, 3
    else:
        bt, bk, warps, stages = 16, 16, 4, 1
    if block_t is not None:
        bt = int(block_t)
    block_dh = min(max(16, _next_pow2(d_head)), 128 if half else 64)
    if d_in == 0 or d_head == 0:
        return out.zero_()
    T = triton.cdiv(n, bt)
    n_pairs = T * (T + 1) // 2
    if head_groups is None:
        head_groups = 1
        if on_gpu:
            n_sm = torch.cuda.get_device_properties(a.device).multi_processor_count
            if n_pairs < 2 * n_sm:
                head_groups = min(n_heads, triton.cdiv(2 * n_sm, n_pairs))
    head_groups = max(1, min(int(head_groups), n_heads))
    per_prog = triton.cdiv(n_heads, head_groups)
    head_groups = triton.cdiv(n_heads, per_prog)
    grid = (n_pairs, head_groups)
    _head_gram_kernel[grid](
        a, b, out, n, d_in, n_heads, d_head, per_prog,
        *a.stride(), *b.stride(), *out.stride(),
        BLOCK_T=bt, BLOCK_K=bk, BLOCK_DH=block_dh,
        UPCAST=INTERPRETED and a.dtype == torch.bfloat16,
        PREC="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages)
    return out


__all__ = ["head_grams", "INTERPRETED"]
