"""Adaptation targets of the prompt kernel (DESIGN §11): which parameters a subspace name means, and
how the per-position quantities the routes capture become that target's factors.

Subspace names (`SUBSPACES` lists the fixed ones and the offered LoRA ranks; `available_subspaces`
filters them for one model):

* ``q``, ``k``, ``v``, ``o`` — W_Q / W_O per head, W_K / W_V per kv head (linear blocks);
* ``mlp_up``, ``mlp_gate`` (Llama family only), ``mlp_down`` — one block per layer;
* ``norm_attn``, ``norm_mlp`` — the gain γ of the norm before attention / before the MLP (Tent);
  ``norm_attn_bias``, ``norm_mlp_bias`` — its bias β where the norm has one (LayerNorm);
* ``lora:<kind>:<rank>`` — LoRA of rank r on projection <kind> (``ttt_core.lora``), B at its init
  B = 0, A seeded (`lora_seed`); one block per layer.

Kernels (per layer l; rows p = (output, token) pairs, seg maps rows to outputs, S the segment sum):

* linear block y = W a: features Σ_{p ∈ i} b_p a_pᵀ, K = S((AAᵀ) ⊙ (BBᵀ))Sᵀ (`RowFactors`);
* LoRA B at B = 0, ΔW = s·B A: ∂s_i/∂B = s Σ_p b_p (A a_p)ᵀ — a linear block whose input is
  s·a Aᵀ: K = S((s²·X AᵀA Xᵀ) ⊙ (BBᵀ))Sᵀ, rows (N, r) on the input side (`RowFactors`, one head);
* norm gain, y = γ ⊙ x̂ + β: features f_i = Σ_{p ∈ i} b_p ⊙ x̂_p (d,), K = F Fᵀ; bias: f_i = Σ_p b_p
  (`DiagFactors`). b_p = ∂s/∂(norm output)_p, x̂_p the normalised input (adapter captures).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ttt_core.adapter import NORM_BIAS_KINDS, NORM_KINDS
from ttt_core.kernel_factors import DiagFactors, LayerFactors, RowFactors, segment_sum
from ttt_core.lora import LORA_KINDS, LORA_RANKS, LoraSpec, lora_a, parse_lora_subspace

_KIND_WORDS = {"q": "W_Q", "k": "W_K", "v": "W_V", "o": "W_O", "mlp_up": "MLP up", "mlp_gate": "MLP gate",
               "mlp_down": "MLP down"}

SUBSPACES: dict[str, str] = {
    "q": "W_Q per head (qTTT)",
    "k": "W_K per kv head",
    "v": "W_V per kv head (paper)",
    "o": "W_O per head",
    "mlp_up": "MLP up, one block per layer",
    "mlp_gate": "MLP gate (Llama family), one block per layer",
    "mlp_down": "MLP down, one block per layer",
    "norm_attn": "Norm gain γ before attention (Tent), one block per layer",
    "norm_mlp": "Norm gain γ before the MLP (Tent), one block per layer",
    "norm_attn_bias": "Norm bias β before attention (LayerNorm models), one block per layer",
    "norm_mlp_bias": "Norm bias β before the MLP (LayerNorm models), one block per layer",
}
#: The LoRA subspaces offered by the pages (any ``lora:<kind>:<rank>`` with rank ≥ 1 is accepted).
LORA_SUBSPACES: tuple[str, ...] = tuple(f"lora:{k}:{r}" for k in LORA_KINDS for r in LORA_RANKS)


def _lora_label(spec: LoraSpec) -> str:
    return f"LoRA r={spec.rank} on {_KIND_WORDS.get(spec.kind, spec.kind)} (B at init, seeded A), one block per layer"


SUBSPACES.update({name: _lora_label(parse_lora_subspace(name)) for name in LORA_SUBSPACES})

#: The subspaces the Spectrum, Heads and Steps pages (and their links) offer: the attention
#: projections and the two MLP projections every family has. The other targets are compared on
#: the Targets page (and accepted by `compute_prompt_kernel` and the CLI everywhere).
PAGE_SUBSPACES: dict[str, str] = {k: SUBSPACES[k] for k in ("q", "k", "v", "o", "mlp_up", "mlp_down")}


def subspace_label(name: str) -> str:
    """A sentence naming subspace `name` for the pages (any valid LoRA name too; else the name)."""
    if name in SUBSPACES:
        return SUBSPACES[name]
    try:
        spec = parse_lora_subspace(name)
    except ValueError:
        return name
    return name if spec is None else _lora_label(spec)


def is_per_layer(name: str) -> bool:
    """True when the subspace has one block per layer (everything but q/k/v/o heads)."""
    return name not in ("q", "k", "v", "o")


@dataclass(frozen=True)
class Target:
    """One resolved subspace: `kind` is the adapter kind whose inputs/output gradients are
    captured; form: "linear" (q/k/v/o/MLP), "lora", "gain" (norm γ) or "bias" (norm β)."""

    subspace: str
    kind: str
    form: str
    lora: LoraSpec | None = None

    def n_blocks(self, lm) -> int:
        """Blocks per layer: heads for q/k/v/o, else 1."""
        return (lm.adapter.heads_of(self.kind) or 1) if self.form == "linear" else 1

    @property
    def diagonal(self) -> bool:
        """Norm gain/bias: per-output features are (d,) vectors (`DiagFactors`)."""
        return self.form in ("gain", "bias")


def resolve_target(lm, subspace: str | Target, lora_seed: int = 0, lora_alpha: float | None = None) -> Target:
    """The Target of `subspace` for this model. Raises ValueError with a readable message for an
    unknown name or a kind the model lacks (e.g. mlp_gate on gpt2/neox, a norm bias on RMSNorm)."""
    if isinstance(subspace, Target):
        return subspace
    lora = parse_lora_subspace(subspace, seed=lora_seed, alpha=lora_alpha)
    if lora is not None:
        t = Target(subspace, lora.kind, "lora", lora)
    elif subspace in SUBSPACES:
        form = "gain" if subspace in NORM_KINDS else "bias" if subspace in NORM_BIAS_KINDS else "linear"
        t = Target(subspace, subspace, form)
    else:
        raise ValueError(f"Unknown subspace {subspace!r}; choose one of {list(SUBSPACES)} "
                         "(or any lora:<kind>:<rank>).")
    a = lm.adapter
    if t.kind not in a.available_kinds():
        a.spec(0, t.kind)                      # raises the adapter's ValueError naming the family
    return t


def available_subspaces(lm) -> list[str]:
    """The `SUBSPACES` names this model supports (its adapter's `available_kinds()`)."""
    kinds = set(lm.adapter.available_kinds())
    return [name for name in SUBSPACES if resolve_kind(name) in kinds]


def resolve_kind(name: str) -> str:
    """The adapter kind behind a subspace name (the projection of a LoRA name)."""
    spec = parse_lora_subspace(name)
    return name if spec is None else spec.kind


def lora_inputs(lm, target: Target, layer: int, X: torch.Tensor) -> torch.Tensor:
    """s · X Aᵀ: the LoRA-B input rows (N, r) from the projection inputs X (N, in)."""
    spec = target.lora
    A = lora_a(X.shape[-1], spec.rank, spec.seed, layer, spec.kind, dtype=X.dtype, device=X.device)
    return (X @ A.T) * spec.scaling


def diag_rows(target: Target, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Per-row features of a norm target: b ⊙ x̂ (gain) or b (bias); A = x̂, B = b, both (N, d)."""
    return B * A if target.form == "gain" else B


def row_target_factors(lm, target: Target, layer: int, A: torch.Tensor, B: torch.Tensor, n: int,
                       seg: torch.Tensor | None, Ax: torch.Tensor | None, Bx: torch.Tensor | None,
                       store=lambda t: t) -> LayerFactors:
    """Layer factors from row-form captures: A inputs (N, in) (x̂ for norms), B output gradients
    (N, out), seg (N,) row → output (None: row p is output p), query rows Ax, Bx or None.
    `store` converts factor tensors to their storage dtype. Formulas: module docstring."""
    if target.diagonal:
        P = diag_rows(target, A.double(), B.double())
        F = segment_sum(P, seg, n)
        fx = None if Ax is None else diag_rows(target, Ax.double(), Bx.double()).sum(0)
        return DiagFactors(F=store(F), fx=None if fx is None else store(fx))
    if target.form == "lora":
        A = store(lora_inputs(lm, target, layer, A))
        Ax = None if Ax is None else store(lora_inputs(lm, target, layer, Ax))
        return RowFactors(H=store(B), O=A, n_heads=1, n=n, seg=seg, Hx=None if Bx is None else store(Bx), Ox=Ax)
    H = target.n_blocks(lm)
    A, B = store(A), store(B)
    Ax, Bx = (None if Ax is None else store(Ax)), (None if Bx is None else store(Bx))
    if target.kind == "o":
        return RowFactors(H=A, O=B, n_heads=H, n=n, seg=seg, Hx=Ax, Ox=Bx, head_on_output=False)
    return RowFactors(H=B, O=A, n_heads=H, n=n, seg=seg, Hx=Bx, Ox=Ax, head_on_output=True)
