"""The adaptation targets of DESIGN §11 as trainable parameters (issue 12, items 2–3).

A target is named by its kernel subspace (`prompt_kernel.compute_prompt_kernel`'s `subspace`):

* per-head linear kinds ``q``, ``k``, ``v``, ``o`` and the per-layer MLP projections ``mlp_up``,
  ``mlp_gate`` (Llama family only), ``mlp_down``: a full-projection delta ΔW (out, in) per layer
  (every head of the layer moves; the kernel's blocks are its heads);
* LoRA ``lora:<kind>:<rank>`` (`ttt_core.lora`): A (r, in) at the seeded standard init and B = 0
  (out, r) per layer, both trained; the model runs with ΔW = s·B·A on (layer, kind);
* norm gains ``norm_attn``, ``norm_mlp`` (γ of the norm before attention / the MLP) and, where the
  norm is a LayerNorm, its biases ``norm_attn_bias``, ``norm_mlp_bias``: a delta (d,) per layer.

Every trainable tensor is kept as a *delta from its initial value* (fp32, zeros at step 0) beside
that initial value (`TargetParams.base`), so `optim.DeltaAdamW` (decoupled decay on the effective
value base + Δ) trains all targets with the same optimiser and the engine's step records measure
how far each moved. `TargetParams.deltas(params)` turns them into the adapter deltas
``{(layer, kind): tensor}`` that `ModelAdapter.apply` runs with (differentiable in the params);
the shared model is never touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ttt_core.lora import LoraSpec, lora_delta, lora_init, parse_lora_subspace
from ttt_core.models import LoadedModel
from ttt_core.types import Key

LINEAR_TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "mlp_up", "mlp_gate", "mlp_down")
NORM_TARGETS: tuple[str, ...] = ("norm_attn", "norm_mlp", "norm_attn_bias", "norm_mlp_bias")
#: Targets that sit in the query path only: qTTT's frozen-KV span loss is exact for them.
QUERY_PATH_KINDS: tuple[str, ...] = ("q",)
#: The default comparison: every family of the survey (DESIGN §11), at LoRA rank 8.
DEFAULT_TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "mlp_up", "mlp_gate", "mlp_down", "lora:q:8", "lora:v:8",
                                    "norm_attn", "norm_mlp")

_LABELS = {
    "q": "W_Q (qTTT)", "k": "W_K", "v": "W_V (paper)", "o": "W_O", "mlp_up": "MLP up", "mlp_gate": "MLP gate",
    "mlp_down": "MLP down", "norm_attn": "norm gain before attention (Tent)",
    "norm_mlp": "norm gain before the MLP (Tent)", "norm_attn_bias": "norm bias before attention",
    "norm_mlp_bias": "norm bias before the MLP",
}


class TargetUnavailableError(ValueError):
    """This model (or this build of the adapter) cannot train the target; the message says why."""


@dataclass(frozen=True)
class Target:
    """A parsed target name. kind: the adapter kind it changes; lora: its LoraSpec or None."""

    name: str
    kind: str
    lora: LoraSpec | None = None

    @property
    def label(self) -> str:
        if self.lora is not None:
            return f"LoRA r={self.lora.rank} on {_LABELS.get(self.kind, self.kind)}"
        return _LABELS.get(self.kind, self.kind)

    @property
    def query_path(self) -> bool:
        """True when only the query path moves (W_Q or LoRA on W_Q): frozen K/V are exact."""
        return self.kind in QUERY_PATH_KINDS

    @property
    def stochastic(self) -> bool:
        """True when the target's init depends on the seed (LoRA's A)."""
        return self.lora is not None

    @property
    def family(self) -> str:
        if self.lora is not None:
            return "lora"
        return "norm" if self.kind in NORM_TARGETS else ("mlp" if self.kind.startswith("mlp") else "attention")


def parse_target(name: str, seed: int = 0, alpha: float | None = None) -> Target:
    """``"v"`` → Target("v", "v"); ``"lora:q:8"`` → LoRA rank 8 on W_Q (A seeded by `seed`).
    Raises ValueError for an unknown name."""
    name = str(name).strip()
    spec = parse_lora_subspace(name, seed=seed, alpha=alpha)
    if spec is not None:
        return Target(name, spec.kind, spec)
    if name in LINEAR_TARGETS or name in NORM_TARGETS:
        return Target(name, name)
    raise ValueError(f"unknown target {name!r}; choose one of {list(LINEAR_TARGETS + NORM_TARGETS)} or "
                     "'lora:<kind>:<rank>' (e.g. 'lora:q:8')")


def layers_of(lm: LoadedModel, last_layers: int | None) -> list[int]:
    """Every layer (None), or the last `last_layers` layers."""
    n = lm.adapter.n_layers
    if last_layers is None or last_layers >= n:
        return list(range(n))
    if last_layers < 1:
        raise ValueError("last_layers must be ≥ 1")
    return list(range(n - int(last_layers), n))


def _check_kind(lm: LoadedModel, kind: str) -> None:
    a = lm.adapter
    avail = getattr(a, "available_kinds", None)
    if avail is not None:
        kinds = tuple(avail())
        if kind not in kinds:
            raise TargetUnavailableError(f"{lm.name} has no {kind!r} parameters (it has {list(kinds)})")
        return
    try:
        a.spec(0, kind)
    except (ValueError, KeyError) as exc:
        raise TargetUnavailableError(f"the adapter cannot apply {kind!r} deltas yet ({exc})") from None


def base_tensor(lm: LoadedModel, layer: int, kind: str) -> torch.Tensor:
    """The unadapted value of (layer, kind): the logical weight (out, in) of a linear kind, γ or
    β (d,) of a norm kind (detached; never written to)."""
    a = lm.adapter
    try:
        return a.logical_weight(layer, kind).detach()
    except (ValueError, KeyError, AttributeError, IndexError, TypeError, RuntimeError):
        if kind not in NORM_TARGETS:
            raise
    mod = a.module(layer, kind)
    t = mod.bias if kind.endswith("_bias") else mod.weight
    if t is None:
        raise TargetUnavailableError(f"layer {layer}'s {kind} has no parameter on {lm.name}")
    return t.detach()


@dataclass
class TargetParams:
    """The trainable tensors of one target on one model.

    base: initial value per param key (fp32); init: the params at step 0 (zeros: deltas from base);
    to_deltas: params → adapter deltas (differentiable); n_params: trainable scalars."""

    target: Target
    layers: list[int]
    base: dict[Key, torch.Tensor]
    to_deltas: Callable[[dict[Key, torch.Tensor]], dict[Key, torch.Tensor]]
    n_params: int
    notes: list[str] = field(default_factory=list)

    def init(self) -> dict[Key, torch.Tensor]:
        return {k: torch.zeros_like(b) for k, b in self.base.items()}

    def deltas(self, params: dict[Key, torch.Tensor]) -> dict[Key, torch.Tensor]:
        return self.to_deltas(params)


def _identity(params: dict[Key, torch.Tensor]) -> dict[Key, torch.Tensor]:
    return dict(params)


def build_params(lm: LoadedModel, target: Target | str, last_layers: int | None = None, seed: int = 0) -> TargetParams:
    """The trainable parameters of `target` on every layer (or the last `last_layers`).
    Raises TargetUnavailableError when the model has no such parameters."""
    t = parse_target(target, seed=seed) if isinstance(target, str) else target
    layers = layers_of(lm, last_layers)
    _check_kind(lm, t.kind)
    dev = lm.device
    if t.lora is not None:
        spec = t.lora if t.lora.seed == seed else LoraSpec(t.lora.kind, t.lora.rank, t.lora.alpha, seed)
        ab = lora_init(lm, spec, layers)
        base: dict[Key, torch.Tensor] = {}
        for (layer, kind), (A, B) in ab.items():
            base[(layer, f"lora_A:{kind}")] = A.float()
            base[(layer, f"lora_B:{kind}")] = B.float()
        s = spec.scaling

        def to_deltas(params: dict[Key, torch.Tensor]) -> dict[Key, torch.Tensor]:
            if not params:  # the unadapted state (B = 0): no delta at all
                return {}
            out = {}
            for layer in layers:
                A = base[(layer, f"lora_A:{spec.kind}")] + params[(layer, f"lora_A:{spec.kind}")]
                B = base[(layer, f"lora_B:{spec.kind}")] + params[(layer, f"lora_B:{spec.kind}")]
                out[(layer, spec.kind)] = lora_delta(A, B, s)
            return out

        n = sum(int(b.numel()) for b in base.values())
        return TargetParams(Target(t.name, t.kind, spec), layers, base, to_deltas, n,
                            [f"A at the seeded standard init (seed {seed}), B = 0, ΔW = {s:g}·B·A"])
    base = {(layer, t.kind): base_tensor(lm, layer, t.kind).float().to(dev) for layer in layers}
    n = sum(int(b.numel()) for b in base.values())
    return TargetParams(t, layers, base, _identity, n)


def param_count(lm: LoadedModel, target: Target | str, last_layers: int | None = None) -> int:
    """Trainable scalars of `target` without building it (LoRA: r·(in + out) per layer)."""
    t = parse_target(target) if isinstance(target, str) else target
    a = lm.adapter
    total = 0
    for layer in layers_of(lm, last_layers):
        spec = a.spec(layer, t.kind)
        if t.lora is not None:
            total += t.lora.rank * (spec.in_features + spec.out_features)
        elif t.kind in NORM_TARGETS:
            total += int(spec.out_features)
        else:
            total += int(spec.in_features) * int(spec.out_features)
    return total


def describe(lm: LoadedModel, names: list[str]) -> list[dict]:
    """Name, label, family and availability of each target name on `lm` (for pages and the CLI)."""
    rows = []
    for name in names:
        t = parse_target(name)
        try:
            _check_kind(lm, t.kind)
            ok, why = True, None
        except TargetUnavailableError as exc:
            ok, why = False, str(exc)
        rows.append({"target": name, "label": t.label, "family": t.family, "available": ok, "why": why,
                     "query_path": t.query_path, "stochastic": t.stochastic})
    return rows


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)
