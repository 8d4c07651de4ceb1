"""TTT Lens kernels (DESIGN §9): Triton kernels with a PyTorch reference beside each, chosen at
every call by `TTT_LENS_KERNELS` (auto | triton | torch); see `kernels.dispatch`.

Public API
* attention_with_cache(q, k, v, q_offset, scale=None) -> (o, lse)
* attention_with_cache_dq(q, k, v, o, lse, do, q_offset, scale=None) -> dq   (no dK/dV work)
* head_grams(a, b, n_heads) -> (n_heads, n, n) fp32, K_h = (a aᵀ) ⊙ (b_h b_hᵀ)
* frozen_kv_attention(q, k, v, q_offset, scale=None) -> o   (autograd; gradient for q only)
* current_backend() -> "triton" | "torch";  backend_label() -> UI badge text

Importing this package never imports triton; the Triton modules load on first use.
"""

from .autograd import frozen_kv_attention
from .dispatch import (attention_with_cache, attention_with_cache_dq, backend_label, current_backend,
                       head_grams)

__all__ = ["attention_with_cache", "attention_with_cache_dq", "head_grams", "frozen_kv_attention",
           "current_backend", "backend_label"]
