"""Autograd wrapper for attention against a frozen K/V cache (the qTTT engine's attention).

Forward: `attention_with_cache` (saves o and lse). Backward: `attention_with_cache_dq` — dQ only;
K and V are frozen prefill tensors and get no gradient (they must not require grad).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import dispatch


class FrozenKVAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_offset, scale):
        o, lse = dispatch.attention_with_cache(q, k, v, q_offset, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.q_offset = q_offset
        ctx.scale = scale
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq = None
        if ctx.needs_input_grad[0]:
            dq = dispatch.attention_with_cache_dq(q, k, v, o, lse, do, ctx.q_offset, ctx.scale)
        return dq, None, None, None, None


def frozen_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int,
                        scale: float | None = None) -> torch.Tensor:
    """o = softmax(scale·q kᵀ + causal-offset mask) v, differentiable in q only.

    q (B, Hq, M, D) at absolute positions q_offset … q_offset+M−1; k, v (B, Hkv, N, D) frozen.
    Raises ValueError if k or v requires grad (detach the cache: qTTT never trains it)."""
    if k.requires_grad or v.requires_grad:
        raise ValueError("frozen_kv_attention: k and v are a frozen KV cache and must not require "
                         "grad (the backward computes dQ only); pass k.detach(), v.detach()")
    return FrozenKVAttention.apply(q, k, v, int(q_offset), None if scale is None else float(scale))
