"""Run a decoder from layer l on, with the hidden states entering layer l computed once.

When only layers ≥ l are updated (paper-mode GD on the last layers, DESIGN §7.1), the hidden states
entering layer l never change during a run, so each step need only run layers l … L−1. This needs
the model's internals (causal mask, rotary embeddings, the layer list, the final norm), so it is
offered only for the Llama family and only through `ModelAdapter.partial_forward`; other families
get None and run the whole model (same numbers, slower).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers.masking_utils import create_causal_mask


class PartialForward:
    """The Llama decoder of `model` on one right-padded batch `ids` (B, N) with `mask` (B, N).

    `hidden_entering(l)` (no grad, cached per layer and reused from the nearest cached lower layer)
    gives the (B, N, d) hidden states entering layer l; `logits_from(l, h, rows, cols)` runs layers
    l … L−1 on them (differentiable), applies the final norm at positions (rows, cols) and returns
    the (len(rows), V) logits."""

    def __init__(self, model: Any, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.base = model.model
        self.head = model.get_output_embeddings()
        with torch.no_grad():
            emb = self.base.embed_tokens(ids)
            self.pos = torch.arange(ids.shape[1], device=ids.device)[None]
            self.mask4 = create_causal_mask(config=self.base.config, inputs_embeds=emb, attention_mask=mask,
                                            past_key_values=None, position_ids=self.pos)
            self.pe = self.base.rotary_emb(emb, position_ids=self.pos)
        self._hidden: dict[int, torch.Tensor] = {0: emb}

    @property
    def n_layers(self) -> int:
        return len(self.base.layers)

    def _layer(self, l: int, h: torch.Tensor) -> torch.Tensor:
        return self.base.layers[l](h, attention_mask=self.mask4, position_embeddings=self.pe, position_ids=self.pos)

    @torch.no_grad()
    def hidden_entering(self, layer: int) -> torch.Tensor:
        start = max(l for l in self._hidden if l <= layer)
        h = self._hidden[start]
        for l in range(start, layer):
            h = self._layer(l, h)
        self._hidden[layer] = h
        return h

    def logits_from(self, layer: int, h: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        for l in range(layer, self.n_layers):
            h = self._layer(l, h)
        return self.head(self.base.norm(h[rows, cols]))


def shared_partial_forward(adapter: Any, seqs: Sequence[Sequence[int]], ids: torch.Tensor, mask: torch.Tensor,
                           shared: dict | None) -> PartialForward | None:
    """`adapter.partial_forward(ids, mask)` of the padded batch of `seqs`, kept in `shared` (when
    given) under one key per prompt set, so the kernel route and every paper-GD run on the same
    prompt compute the hidden states below their first layer once. None where the family has none."""
    key = ("partial_forward", tuple(tuple(s) for s in seqs))
    if shared is not None and key in shared:
        return shared[key]
    pf = adapter.partial_forward(ids, mask)
    if shared is not None and pf is not None:
        shared[key] = pf
    return pf


def supports_partial_forward(model: Any, family: str) -> bool:
    """True for a Llama-family model exposing the parts `PartialForward` needs."""
    return (family == "llama" and hasattr(model, "model") and all(
        hasattr(model.model, a) for a in ("rotary_emb", "layers", "norm", "embed_tokens")))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k


class PackedLoo:
    """The n leave-one-out prompts and the query prompt as ONE packed sequence that shares their
    common prefixes (paper-mode GD, DESIGN §7.1), run from layer `first_layer` on.

    LOO prompt i keeps demonstrations 0 … i−1 of the query prompt unchanged, and under causal
    attention its hidden states at those positions equal the query prompt's in every layer
    (adapted or not). So each of its tokens before c_i = min(common prefix with the query prompt,
    len_i − 1) is computed once, in the query prompt; only its suffix (positions c_i … len_i − 1)
    is packed as its own tokens. Packed token a (row ρ_a, position p_a) attends to packed token b iff

        (ρ_b = ρ_a and p_b ≤ p_a)   or   (ρ_b = query row, ρ_a ≠ query row and p_b < c_{ρ_a}),

    with rotary embeddings at the true positions p_a: the same attention as the right-padded batch
    of `LooBatch`, on Σ_i (len_i − c_i) + len_q tokens instead of (n+1)·max len (≈ half for the
    paper's prompts). The hidden states entering `first_layer` come from `pf` (no grad, once). In the
    last layer only each row's last token needs its query, attention output and MLP (`_last_layer`;
    its keys and values are formed for every token).

    `logits(rows_last)`: (n+1, V) logits at each prompt's last position (LOO rows, then the query),
    differentiable in the adapter's deltas. Only for plain Llama attention (no q/k norms, no sliding
    window shorter than the prompts): `PackedLoo.supports` says whether it applies."""

    def __init__(self, pf: PartialForward, seqs: Sequence[Sequence[int]], first_layer: int) -> None:
        self.pf = pf
        self.first_layer = int(first_layer)
        q = list(seqs[-1])
        n = len(seqs) - 1
        self.prefix = [min(_common_prefix(s, q), len(s) - 1) for s in seqs[:-1]] + [0]
        rows, cols = [], []
        for i, s in enumerate(seqs):
            for p in range(self.prefix[i], len(s)):
                rows.append(i)
                cols.append(p)
        dev = pf.pos.device
        self.rows = torch.tensor(rows, device=dev)
        self.cols = torch.tensor(cols, device=dev)
        r, p = self.rows, self.cols
        c = torch.tensor(self.prefix, device=dev)[r]
        same = (r[:, None] == r[None, :]) & (p[None, :] <= p[:, None])
        shared = (r[None, :] == n) & (r[:, None] != n) & (p[None, :] < c[:, None])
        self.mask4 = (same | shared)[None, None]
        ends = torch.tensor([len(s) - 1 for s in seqs], device=dev)
        self.last = torch.stack([torch.nonzero((r == i) & (p == ends[i]))[0, 0] for i in range(n + 1)])
        h_in = pf.hidden_entering(self.first_layer)
        self.h0 = h_in[r, p][None]                                     # (1, N_packed, d)
        self.pos = p[None]
        self.pe = pf.base.rotary_emb(self.h0, position_ids=self.pos)

    @property
    def n_tokens(self) -> int:
        return int(self.rows.shape[0])

    @staticmethod
    def supports(model: Any, max_len: int) -> bool:
        """Plain Llama attention (q/k/v/o only, no q/k norms) and no sliding window below max_len."""
        from transformers.models.llama.modeling_llama import LlamaAttention

        cfg = model.config
        window = getattr(cfg, "sliding_window", None)
        if window is not None and getattr(cfg, "use_sliding_window", True) and int(window) < max_len:
            return False
        return all(type(layer.self_attn) is LlamaAttention for layer in model.model.layers)

    def _last_layer(self, layer: Any, h: torch.Tensor) -> torch.Tensor:
        """The last decoder layer at each row's last token only: keys/values of every token, the
        query, attention, o_proj and MLP of the (n+1) last tokens. (1, N, d) → (1, n+1, d)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

        attn = layer.self_attn
        hd = attn.head_dim
        N, idx = h.shape[1], self.last
        xn = layer.input_layernorm(h)
        k = attn.k_proj(xn).view(1, N, -1, hd).transpose(1, 2)
        v = attn.v_proj(xn).view(1, N, -1, hd).transpose(1, 2)
        qx = attn.q_proj(xn[:, idx]).view(1, idx.shape[0], -1, hd).transpose(1, 2)
        cos, sin = self.pe
        k, _ = apply_rotary_pos_emb(k, k, cos, sin)
        qx, _ = apply_rotary_pos_emb(qx, qx, cos[:, idx], sin[:, idx])
        g = attn.num_key_value_groups
        out = torch.nn.functional.scaled_dot_product_attention(
            qx, repeat_kv(k, g), repeat_kv(v, g), attn_mask=self.mask4[:, :, idx], scale=attn.scaling)
        out = attn.o_proj(out.transpose(1, 2).reshape(1, idx.shape[0], -1))
        h = h[:, idx] + out
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def logits(self, cols: torch.Tensor | None = None) -> torch.Tensor:
        """(n+1, V) logits, or (n+1, len(cols)) of the vocabulary entries `cols` only (the LM head's
        rows `cols`: the same dot products, a fraction of the head's cost)."""
        base = self.pf.base
        h = self.h0
        L = len(base.layers)
        for l in range(self.first_layer, L - 1):
            h = base.layers[l](h, attention_mask=self.mask4, position_embeddings=self.pe, position_ids=self.pos)
        h = self._last_layer(base.layers[L - 1], h)
        h = base.norm(h[0])
        head = self.pf.head
        if cols is None:
            return head(h)
        bias = None if getattr(head, "bias", None) is None else head.bias[cols]
        return torch.nn.functional.linear(h, head.weight[cols], bias)
