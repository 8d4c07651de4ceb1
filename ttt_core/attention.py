"""The "ttt_lens" attention implementation and its per-thread contexts.

Every model TTT Lens loads uses `attn_implementation="ttt_lens"`. With no context active it is
exactly transformers' SDPA path. Two context managers change what it does, for the current
thread only (contextvars), so the shared cached model is never mutated and concurrent sessions
never see each other's state:

* `frozen_kv(cache, q_offset)`: queries attend to a *frozen* key/value cache from a prefill
  (DESIGN §2 "qTTT makes positions independent", §7.2). The keys/values the model computes for
  the current tokens are ignored; row i of the current chunk sits at absolute position
  q_offset + i and sees cached keys j ≤ q_offset + i. The attention runs through
  `kernels.frozen_kv_attention` (Triton on GPU, PyTorch reference on CPU; dQ-only backward).
* `record_attention(layers)`: additionally stores the attention probabilities of the chosen
  layers (B, Hq, M, N) for drill-down views and needle attention mass.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kernels import frozen_kv_attention

ATTN_IMPLEMENTATION = "ttt_lens"


@dataclass
class FrozenKV:
    """Per-layer frozen keys/values of a prefill: keys[l], values[l] have shape (B, Hkv, N, D)
    (keys already position-rotated where the model uses RoPE)."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[-2])


@dataclass
class _FrozenState:
    cache: FrozenKV
    q_offset: int
    segments: tuple[tuple[int, int], ...] | None = None  # (rows, absolute offset) per row segment
    grad_segments: int | None = None  # only the first N segments' attention takes part in autograd


_FROZEN: contextvars.ContextVar[_FrozenState | None] = contextvars.ContextVar("ttt_lens_frozen", default=None)
_RECORD: contextvars.ContextVar[dict | None] = contextvars.ContextVar("ttt_lens_record", default=None)
_DETACH_KV: contextvars.ContextVar[bool] = contextvars.ContextVar("ttt_lens_detach_kv", default=False)


@contextmanager
def detached_kv() -> Iterator[None]:
    """Within this block (this thread only), ordinary attention uses its keys and values (cached
    and new) detached from autograd: gradients reach the model through the queries only. With the
    current rows' K/V equal to what a prefill would have cached (no deltas on the K/V path), this
    is the frozen-KV gradient of every row (DESIGN §2 "qTTT makes positions independent") without
    a separate prefill of those rows."""
    token = _DETACH_KV.set(True)
    try:
        yield
    finally:
        _DETACH_KV.reset(token)


@contextmanager
def frozen_kv(cache: FrozenKV, q_offset: int,
              segments: tuple[tuple[int, int], ...] | None = None, grad_segments: int | None = None) -> Iterator[None]:
    """Within this block (this thread only), attention reads keys/values from `cache`.

    segments: optional ((rows, offset), …): the current chunk is the concatenation of row
    segments, segment s holding `rows` rows at absolute positions offset … offset+rows−1 (each
    segment runs its own frozen-cache attention; `record_attention` then keeps the last segment's
    probabilities only). grad_segments: with segments, only the first N segments' attention is
    recorded by autograd; later segments attend with detached queries (evaluation rows riding along
    a training forward: under frozen K/V no other row reads them, so for an objective of the first
    N segments' rows their gradient is exactly zero and the backward can skip them)."""
    if q_offset < 0 or (segments is not None and any(o < 0 or r <= 0 for r, o in segments)):
        raise ValueError(f"offsets must be ≥ 0 and segments non-empty; got {q_offset}, {segments}")
    if grad_segments is not None and (segments is None or not 0 <= grad_segments <= len(segments)):
        raise ValueError(f"grad_segments={grad_segments} needs that many row segments; got {segments}")
    token = _FROZEN.set(_FrozenState(cache, int(q_offset),
                                     None if segments is None else tuple((int(r), int(o)) for r, o in segments),
                                     None if grad_segments is None else int(grad_segments)))
    try:
        yield
    finally:
        _FROZEN.reset(token)


@contextmanager
def record_attention(layers: list[int] | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Within this block, store attention probabilities (B, Hq, M, N) per layer index into the
    yielded dict (all layers when `layers` is None). Costs an explicit softmax per layer."""
    store: dict[Any, Any] = {"__layers__": None if layers is None else set(layers)}
    token = _RECORD.set(store)
    try:
        yield store
    finally:
        _RECORD.reset(token)
        store.pop("__layers__", None)


def _expand_kv(x: torch.Tensor, n_q_heads: int) -> torch.Tensor:
    groups = n_q_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _explicit_probs(query: torch.Tensor, key: torch.Tensor, scaling: float, q_offset: int,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scaling·QKᵀ) with causal offset (row i sees keys ≤ q_offset+i) and optional mask."""
    k = _expand_kv(key, query.shape[1])
    scores = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scaling
    m, n = scores.shape[-2:]
    rows = torch.arange(m, device=scores.device)[:, None] + q_offset
    cols = torch.arange(n, device=scores.device)[None, :]
    allowed = cols <= rows
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            scores = scores + mask.float()
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1)


def _layer_index(module: Any) -> int:
    idx = getattr(module, "layer_idx", None)
    if idx is None:
        raise RuntimeError(f"{type(module).__name__} has no layer_idx; cannot use the frozen KV cache")
    return int(idx)


def ttt_lens_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None,
                       dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function. query (B, Hq, M, D); key/value (B, Hkv, N, D).
    Returns attn_output (B, M, Hq, D) as the interface expects."""
    frozen = _FROZEN.get()
    record = _RECORD.get()
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    if frozen is not None:

        layer = _layer_index(module)
        k = frozen.cache.keys[layer].to(query.dtype)
        v = frozen.cache.values[layer].to(query.dtype)
        if frozen.segments is None:
            out = frozen_kv_attention(query, k, v, frozen.q_offset, scale=scale)
            last_q, last_off = query, frozen.q_offset
        else:
            parts = torch.split(query, [r for r, _ in frozen.segments], dim=2)
            n_grad = len(parts) if frozen.grad_segments is None else frozen.grad_segments
            out = torch.cat([frozen_kv_attention(qp if i < n_grad else qp.detach(), k, v, off, scale=scale)
                             for i, (qp, (_, off)) in enumerate(zip(parts, frozen.segments))], dim=2)
            last_q, last_off = parts[-1], frozen.segments[-1][1]
        if record is not None and (record["__layers__"] is None or layer in record["__layers__"]):
            record[layer] = _explicit_probs(last_q.detach(), k, scale, last_off)
        return out.transpose(1, 2).contiguous(), None
    if _DETACH_KV.get():
        key, value = key.detach(), value.detach()
    if record is not None:
        layer = _layer_index(module)
        if record["__layers__"] is None or layer in record["__layers__"]:
            mask = attention_mask
            if mask is not None and mask.dim() == 4:
                mask = mask[..., -key.shape[-2]:] if mask.shape[-1] >= key.shape[-2] else None
            q_offset = key.shape[-2] - query.shape[-2]
            record[layer] = _explicit_probs(query.detach(), key.detach(), scale, q_offset, mask)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


_REGISTERED = False


def register_attention() -> None:
    """Register "ttt_lens" with transformers' attention and mask interfaces (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return

    AttentionInterface.register(ATTN_IMPLEMENTATION, ttt_lens_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    _REGISTERED = True


@torch.no_grad()
def prefill(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, FrozenKV]:
    """One forward pass over `input_ids` (B, N); returns (logits (B, N, V), frozen per-layer K/V)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
    cache = out.past_key_values
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return out.logits, FrozenKV(keys=keys, values=values)


def forward_with_frozen_kv(model: Any, input_ids: torch.Tensor, cache: FrozenKV, q_offset: int,
                           **kwargs: Any) -> Any:
    """Forward `input_ids` (B, M) as the tokens at absolute positions q_offset … q_offset+M−1,
    every layer's attention reading the frozen `cache` (DESIGN §2, §7.2).

    The model's own keys/values for these tokens are ignored, so the output at each row depends
    only on that row's query path: changing W_Q at row i changes only output i. With no deltas
    and the cache from `prefill` of the same tokens, the logits equal the ordinary forward's.
    """
    m = input_ids.shape[1]
    if q_offset + m > cache.length:
        raise ValueError(f"rows {q_offset}..{q_offset + m - 1} exceed the cache length {cache.length}")
    pos = torch.arange(q_offset, q_offset + m, device=input_ids.device).unsqueeze(0).expand(input_ids.shape[0], -1)
    with frozen_kv(cache, q_offset):
        return model(input_ids=input_ids, position_ids=pos, use_cache=False, **kwargs)


def forward_rows_with_frozen_kv(model: Any, ids: torch.Tensor, cache: FrozenKV,
                                segments: list[tuple[int, int]], grad_segments: int | None = None,
                                **kwargs: Any) -> Any:
    """One forward over several row segments of `ids` (1, N) against the frozen `cache`.

    segments: [(start, length), …]; the model sees the concatenated rows ids[:, start:start+length]
    at their absolute positions, each segment with the causal-offset mask of its own start, so row
    outputs equal those of separate `forward_with_frozen_kv` calls (DESIGN §7.2: rows are
    independent under frozen keys/values). Logits come back in segment order, (1, Σ length, V).
    grad_segments: the objective reads only the first N segments (`frozen_kv`): the attention of
    the others stays out of the backward; their logits are the same numbers."""
    if not segments:
        raise ValueError("no row segments")
    for s, m in segments:
        if s < 0 or m <= 0 or s + m > cache.length:
            raise ValueError(f"segment rows {s}..{s + m - 1} outside the cache of length {cache.length}")
    rows = torch.cat([ids[:, s:s + m] for s, m in segments], dim=1)
    pos = torch.cat([torch.arange(s, s + m, device=ids.device) for s, m in segments]).unsqueeze(0)
    with frozen_kv(cache, segments[0][0], segments=tuple((m, s) for s, m in segments), grad_segments=grad_segments):
        return model(input_ids=rows, position_ids=pos, use_cache=False, **kwargs)
