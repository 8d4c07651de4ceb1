"""LoRA adapters as a TTT target (DESIGN §11): ΔW = s · B A on one logical projection per layer.

Shapes: for a projection of logical shape (out, in) (`ModelAdapter.spec(layer, kind)`), A is
(r, in) and B is (out, r); s = alpha / r (the usual LoRA scaling; alpha defaults to r, so s = 1).

Init (the standard one, as in peft's default): B = 0 and A ~ U(−1/√in, 1/√in) — that is
``kaiming_uniform_(A, a=√5)``, whose bound is gain·√3/√fan_in with gain = √(2/(1+a²)) = √(1/3).
Seeded per (seed, layer, kind) through ``np.random.SeedSequence``, so the kernel (which needs A)
and the engine (which trains A and B) draw the same A for the same seed, on any device.

At this init only B moves at first: ∂s_i/∂B = s · b_i (A x_i)ᵀ, so the kernel of B is the kernel
of a linear layer whose input is s · X Aᵀ (DESIGN §11): K = S(((XAᵀ)(XAᵀ)ᵀ) ⊙ (OOᵀ))Sᵀ · s².
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from ttt_core.types import Key

#: Projections a LoRA adapter may sit on (adapter kinds).
LORA_KINDS: tuple[str, ...] = ("q", "k", "v", "o", "mlp_up", "mlp_gate", "mlp_down")
#: Ranks offered by the pages and the CLI.
LORA_RANKS: tuple[int, ...] = (4, 8, 16)

_SUBSPACE = re.compile(r"^lora:(?P<kind>[a-z_]+):(?P<rank>\d+)$")


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA target: rank `rank` adapters on projection `kind` of every chosen layer."""

    kind: str
    rank: int
    alpha: float | None = None
    seed: int = 0

    @property
    def scaling(self) -> float:
        """s = alpha / r (1 when alpha is None)."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    @property
    def subspace(self) -> str:
        """The subspace name of this target, ``lora:<kind>:<rank>`` (e.g. ``lora:q:8``)."""
        return f"lora:{self.kind}:{self.rank}"


def parse_lora_subspace(name: str, seed: int = 0, alpha: float | None = None) -> LoraSpec | None:
    """``"lora:q:8"`` → LoraSpec("q", 8); None when `name` is not a LoRA subspace.

    Raises ValueError for a LoRA name with an unknown projection or a rank < 1."""
    m = _SUBSPACE.match(name)
    if m is None:
        return None
    kind, rank = m.group("kind"), int(m.group("rank"))
    if kind not in LORA_KINDS:
        raise ValueError(f"LoRA cannot sit on {kind!r}; choose one of {list(LORA_KINDS)}.")
    if rank < 1:
        raise ValueError(f"LoRA rank must be ≥ 1 (got {rank}).")
    return LoraSpec(kind, rank, alpha, seed)


def lora_a(in_features: int, rank: int, seed: int, layer: int, kind: str,
           dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The seeded standard-init A of one adapter: (rank, in_features), U(−1/√in, 1/√in)."""
    kind_code = LORA_KINDS.index(kind) if kind in LORA_KINDS else len(LORA_KINDS)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(layer), kind_code, int(rank)]))
    bound = 1.0 / math.sqrt(in_features)
    a = rng.uniform(-bound, bound, size=(rank, in_features))
    return torch.as_tensor(a, dtype=dtype, device=device)


def lora_init(lm, spec: LoraSpec, layers: list[int] | None = None,
              dtype: torch.dtype = torch.float32) -> dict[Key, tuple[torch.Tensor, torch.Tensor]]:
    """A and B (= 0) for every chosen layer: {(layer, kind): (A (r, in), B (out, r))}."""
    a = lm.adapter
    chosen = list(range(a.n_layers)) if layers is None else list(layers)
    out: dict[Key, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in chosen:
        ps = a.spec(layer, spec.kind)
        A = lora_a(ps.in_features, spec.rank, spec.seed, layer, spec.kind, dtype=dtype, device=lm.device)
        B = torch.zeros(ps.out_features, spec.rank, dtype=dtype, device=lm.device)
        out[(layer, spec.kind)] = (A, B)
    return out


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """ΔW = s · B A: (out, in) from A (r, in) and B (out, r); differentiable in both."""
    return (B @ A) * scaling
