"""Optimisers over per-run weight deltas (DESIGN §1, §3, §7.2).

A TTT run never touches the shared model: it keeps fp32 *master deltas* ΔW per logical projection
(layer, kind), shape (out_features, in_features), and the effective weight is W = W0 + ΔW
(applied through `ModelAdapter.apply`). Both optimisers here are *out of place*: a step returns
new tensors and never mutates the dicts it was given, so a run can keep its last good deltas by
reference (no copies) and restore them after a divergent step.

* `DeltaAdamW` — AdamW exactly as `torch.optim.AdamW` on a parameter W initialised at W0 (the
  qTTT optimiser, DESIGN §7.2), with the decoupled weight decay applied to the *effective* weight:

      m ← β1·m + (1−β1)·g,   v ← β2·v + (1−β2)·g²                       (t = 1, 2, …)
      Δ ← Δ − lr·wd·(W0 + Δ)            (decoupled decay of W = W0 + Δ, rows in the mask only)
      Δ ← Δ − (lr / (1−β1ᵗ)) · m / (√v / √(1−β2ᵗ) + eps)

  Because ∂L/∂Δ = ∂L/∂W, the sequence W0 + Δ_t equals torch.optim.AdamW's W_t bit-for-bit up to
  float rounding. Rows outside the head mask get zero gradient (so a zero Adam update) and no decay.
* `clip_grad_norm` — global gradient-norm clipping as `torch.nn.utils.clip_grad_norm_`
  (coefficient max_norm / (‖g‖₂ + 1e-6), capped at 1).
* Plain gradient descent for paper mode is one line in the engine (Δ ← Δ − ρ·∇(½‖r‖²), DESIGN §3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Key = tuple[int, str]


@dataclass(frozen=True)
class AdamWConfig:
    """AdamW hyper-parameters (defaults: the qTTT paper's App. D, DESIGN §7.2)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01


def global_grad_norm(grads: dict[Key, torch.Tensor]) -> float:
    """‖g‖₂ over all tensors together; inf/nan propagate. Per-tensor norms come from one fused
    `torch._foreach_norm` (fp32 accumulation inside a tensor) and are combined in float64."""
    if not grads:
        return 0.0
    norms = torch._foreach_norm([g.detach() for g in grads.values()])
    total = torch.stack([n.double().cpu() for n in norms]).pow(2).sum()
    return float(total.sqrt())


def clip_grad_norm(grads: dict[Key, torch.Tensor], max_norm: float,
                   norm: float | None = None) -> tuple[dict[Key, torch.Tensor], float]:
    """Scale all gradients by min(1, max_norm / (‖g‖₂ + 1e-6)) (torch's rule). Returns (clipped
    gradients (new tensors), the norm before clipping). `norm`: ‖g‖₂ when the caller has it."""
    norm = global_grad_norm(grads) if norm is None else float(norm)
    if not math.isfinite(norm) or max_norm is None or max_norm <= 0:
        return dict(grads), norm
    coef = min(1.0, float(max_norm) / (norm + 1e-6))
    if coef >= 1.0:
        return dict(grads), norm
    keys = list(grads)
    return dict(zip(keys, torch._foreach_mul([grads[k] for k in keys], coef))), norm


class DeltaAdamW:
    """AdamW over master deltas Δ (fp32) of weights W0 (see module docstring for the update).

    Args:
        base: W0 per key, shape (out, in); cast to fp32 once (needed for the decoupled decay).
        config: AdamWConfig.
        masks: per key an (out, 1) {0,1} fp32 row mask (the selected heads' rows) or None (all rows).
    """

    def __init__(self, base: dict[Key, torch.Tensor], config: AdamWConfig,
                 masks: dict[Key, torch.Tensor | None] | None = None) -> None:
        self.config = config
        self.base = {k: w.detach().float() for k, w in base.items()}
        self.masks = masks or {}
        self.t = 0
        self.m = {k: torch.zeros_like(w) for k, w in self.base.items()}
        self.v = {k: torch.zeros_like(w) for k, w in self.base.items()}

    def step(self, deltas: dict[Key, torch.Tensor], grads: dict[Key, torch.Tensor]) -> dict[Key, torch.Tensor]:
        """One AdamW step; returns new deltas (the inputs are not modified)."""
        c = self.config
        b1, b2 = c.betas
        self.t += 1
        bc1 = 1.0 - b1 ** self.t
        bc2 = 1.0 - b2 ** self.t
        step_size = c.lr / bc1
        sqrt_bc2 = math.sqrt(bc2)
        keys = list(deltas)
        g = [grads[k].float() for k in keys]
        m = [self.m[k] for k in keys]
        v = [self.v[k] for k in keys]
        # the moment buffers belong to this optimiser: update them in place (fused over all tensors)
        torch._foreach_lerp_(m, g, 1.0 - b1)                       # m ← β1·m + (1−β1)·g
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, g, g, 1.0 - b2)                 # v ← β2·v + (1−β2)·g²
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, sqrt_bc2)
        torch._foreach_add_(denom, c.eps)                          # √v / √(1−β2ᵗ) + eps
        new = torch._foreach_addcdiv([deltas[k] for k in keys], m, denom, -step_size)
        if c.weight_decay:
            decay = torch._foreach_add([self.base[k] for k in keys], [deltas[k] for k in keys])
            torch._foreach_mul_(decay, c.lr * c.weight_decay)     # lr·wd·(W0 + Δ)
            for i, k in enumerate(keys):
                mask = self.masks.get(k)
                if mask is not None:
                    decay[i].mul_(mask)
            torch._foreach_sub_(new, decay)
        return dict(zip(keys, new))
