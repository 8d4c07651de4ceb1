"""Run a decoder from layer l on, with the hidden states entering layer l computed once.

When only layers ≥ l are updated (paper-mode GD on the last layers, DESIGN §7.1), the hidden states
entering layer l never change during a run, so each step need only run layers l … L−1. This needs
the model's internals (causal mask, rotary embeddings, the layer list, the final norm), so it is
offered only for the Llama family and only through `ModelAdapter.partial_forward`; other families
get None and run the whole model (same numbers, slower).
"""

from __future__ import annotations

from typing import Any

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


def supports_partial_forward(model: Any, family: str) -> bool:
    """True for a Llama-family model exposing the parts `PartialForward` needs."""
    return (family == "llama" and hasattr(model, "model") and all(
        hasattr(model.model, a) for a in ("rotary_emb", "layers", "norm", "embed_tokens")))
