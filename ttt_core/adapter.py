"""Per-head projection adapter: where each layer's Q/K/V/O (and MLP) projections live, how to
slice one head out of them, and how to run the model with weight deltas applied functionally.

Supported families (DESIGN §1, issue 2):

* ``llama``: separate ``q_proj/k_proj/v_proj/o_proj`` Linear layers (Llama, Qwen2/3, Mistral,
  SmolLM2; grouped-query heads);
* ``gpt2``: fused ``c_attn`` Conv1D (output columns [q | k | v], each head-contiguous) and
  ``c_proj``;
* ``neox``: fused ``query_key_value`` Linear whose output is interleaved per head
  ([q_h | k_h | v_h] for h = 0..H-1) and ``dense``.

Every projection is presented in one *logical* layout, y = W x (+ b) with W of shape
(out_features, in_features), whatever the storage (Conv1D stores Wᵀ; fused modules store several
projections in one matrix). Logical output rows of q/k/v are grouped per head: head h owns rows
[h·d_head, (h+1)·d_head). For "o" the head split is on the *input* side: head h owns input
columns [h·d_head, (h+1)·d_head).

Deltas, output probes and captures are applied by forward hooks installed once when the adapter
is built; the hooks read per-thread state (contextvars), so the shared model's parameters are
never touched and concurrent sessions cannot see each other's deltas. A delta ΔW on a logical
projection changes its output by x Δᵀ, exactly as running with W + ΔW (DESIGN §1).

Folding: for a plain fp32/fp64 `nn.Linear` that holds one whole logical projection, a delta with
no probe or capture on it is applied as F.linear(x, W + ΔW, b) (one matmul instead of two, and
one instead of two in the backward) by a per-instance `forward` installed beside the hook; the
hook then skips that delta. Lower-precision weights are never folded (W + ΔW would round small
deltas away in bf16/fp16); there the hook adds x ΔWᵀ computed in the activation dtype.

Kinds (DESIGN §11; `available_kinds()` says which ones a model has):

* linear projections q, k, v, o, mlp_up, mlp_gate (Llama family only: ``mlp.gate_proj``),
  mlp_down — deltas (out, in) as above;
* norm gains norm_attn / norm_mlp — the norm before attention / before the MLP of each layer
  (llama: input_layernorm / post_attention_layernorm RMSNorm; gpt2: ln_1 / ln_2; neox:
  input_layernorm / post_attention_layernorm LayerNorm). A delta dγ of shape (d,) runs the model
  as if γ_eff = γ0 + dγ: the hook adds dγ ⊙ x̂, with x̂ recomputed from the norm's input exactly as
  the module normalises it (module's own eps; RMSNorm in fp32 then cast back, as HF does; never
  dividing by γ), differentiable in dγ;
* norm biases norm_attn_bias / norm_mlp_bias (LayerNorm families only): a delta dβ (d,) adds
  dβ to the norm's output (β_eff = β0 + dβ).
For norm kinds a probe (B, L, d) is added to the norm's output (its gradient is b = ∂objective/
∂(norm output)); `capture_in` holds x̂ (B, L, d) and `capture_out` the norm's output (B, L, d).
"""

from __future__ import annotations

import contextvars
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ttt_core.partial_forward import PartialForward, supports_partial_forward
from ttt_core.types import Key

#: Linear projections (logical weight (out, in)); mlp_gate exists in the Llama family only.
LINEAR_KINDS: tuple[str, ...] = ("q", "k", "v", "o", "mlp_up", "mlp_gate", "mlp_down")
#: Norm gains γ (delta shape (d,)): the norm before attention / before the MLP of each layer.
NORM_KINDS: tuple[str, ...] = ("norm_attn", "norm_mlp")
#: Norm biases β (delta shape (d,)), where the norm has one (LayerNorm: gpt2, neox).
NORM_BIAS_KINDS: tuple[str, ...] = ("norm_attn_bias", "norm_mlp_bias")
#: Every kind the adapter knows; a given model has `ModelAdapter.available_kinds()` of them.
KINDS: tuple[str, ...] = LINEAR_KINDS + NORM_KINDS + NORM_BIAS_KINDS
SUPPORTED = (
    "Llama family with separate q_proj/k_proj/v_proj/o_proj (Llama, Qwen2, Qwen3, Mistral, SmolLM2), "
    "GPT-2 family (fused c_attn), GPT-NeoX (fused query_key_value)"
)



class UnsupportedArchitectureError(ValueError):
    """The model's architecture is not one the adapter knows how to slice."""


@dataclass(frozen=True)
class ProjectionSpec:
    """Where logical projection (layer, kind) lives.

    module_name: dotted name of the storing module. layout: "linear" (weight is (out, in)),
    "conv1d" (weight is (in, out)) or "norm" (a norm's gain or bias, (d,); in = out = d).
    out_index: positions of the logical output features inside the
    module's output features (None = all, in order). in_features/out_features: logical sizes.
    """

    layer: int
    kind: str
    module_name: str
    layout: str
    in_features: int
    out_features: int
    out_index: tuple[int, ...] | None = None


@dataclass
class _HookState:
    deltas: dict[Key, torch.Tensor] = field(default_factory=dict)
    probes: dict[Key, torch.Tensor] = field(default_factory=dict)
    capture_in: dict[Key, torch.Tensor] | None = None
    capture_out: dict[Key, torch.Tensor] | None = None
    capture_keys: set[Key] | None = None


_STATE: contextvars.ContextVar[_HookState | None] = contextvars.ContextVar("ttt_lens_adapter", default=None)
_FOLD_DTYPES = (torch.float32, torch.float64)


def _folds(module: Any, state: _HookState, key: Key, delta: torch.Tensor) -> bool:
    """Whether `module` applies `delta` by folding it into its weight (module docstring)."""
    return (getattr(module, "_ttt_lens_fold_key", None) == key and module.weight.dtype in _FOLD_DTYPES
            and key not in state.probes and not (state.capture_keys and key in state.capture_keys))


def _folding_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward with this thread's delta folded in: F.linear(x, W + ΔW, b)."""
    state = _STATE.get()
    if state is not None:
        key = self._ttt_lens_fold_key
        delta = state.deltas.get(key)
        if delta is not None and _folds(self, state, key, delta):
            return F.linear(x, self.weight + delta.to(self.weight.dtype), self.bias)
    return torch.nn.Linear.forward(self, x)


def normalized_input(module: Any, x: torch.Tensor) -> torch.Tensor:
    """x̂ of a norm module on input x (…, d), computed as the module does before its affine step:
    LayerNorm: (x − mean)/√(var + eps) (in fp32 for lower-precision inputs); RMSNorm (HF): in fp32,
    x · rsqrt(mean(x²) + eps), cast back to x's dtype. Same shape and dtype as x."""
    if isinstance(module, torch.nn.LayerNorm):
        xf = x if x.dtype in _FOLD_DTYPES else x.float()
        return F.layer_norm(xf, module.normalized_shape, None, None, module.eps).to(x.dtype)
    eps = getattr(module, "variance_epsilon", None)
    eps = getattr(module, "eps", 1e-6) if eps is None else eps
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h.to(x.dtype)


def _attr(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


class ModelAdapter:
    """Architecture knowledge for one loaded causal LM (see module docstring).

    Attributes:
        family: "llama" | "gpt2" | "neox".
        n_layers, n_heads, n_kv_heads, head_dim, hidden_size, intermediate_size.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        cfg = model.config
        self.family = self._detect_family(model)
        if self.family == "llama":
            self._layers_path = "model.layers"
            self.n_heads = int(cfg.num_attention_heads)
            self.n_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
            self.hidden_size = int(cfg.hidden_size)
            self.head_dim = int(getattr(cfg, "head_dim", None) or self.hidden_size // self.n_heads)
            self.intermediate_size = int(cfg.intermediate_size)
        elif self.family == "gpt2":
            self._layers_path = "transformer.h"
            self.n_heads = self.n_kv_heads = int(cfg.n_head)
            self.hidden_size = int(cfg.n_embd)
            self.head_dim = self.hidden_size // self.n_heads
            self.intermediate_size = int(cfg.n_inner or 4 * self.hidden_size)
        else:
            self._layers_path = "gpt_neox.layers"
            self.n_heads = self.n_kv_heads = int(cfg.num_attention_heads)
            self.hidden_size = int(cfg.hidden_size)
            self.head_dim = self.hidden_size // self.n_heads
            self.intermediate_size = int(cfg.intermediate_size)
        self.n_layers = len(_attr(model, self._layers_path))
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedArchitectureError("query heads must be a multiple of key/value heads")
        self._specs: dict[Key, ProjectionSpec] = {}
        self._missing: dict[str, str] = {}       # kind → why this model does not have it
        for layer in range(self.n_layers):
            for kind in KINDS:
                spec = self._make_spec(layer, kind)
                if spec is not None:
                    self._specs[(layer, kind)] = spec
        self._available = tuple(k for k in KINDS if all((l, k) in self._specs for l in range(self.n_layers)))
        self._specs = {key: sp for key, sp in self._specs.items() if key[1] in self._available}
        self._by_module: dict[str, list[ProjectionSpec]] = {}
        for spec in self._specs.values():
            self._by_module.setdefault(spec.module_name, []).append(spec)
        self._install_hooks()

    # ---------------------------------------------------------------- architecture detection
    @staticmethod
    def _detect_family(model: Any) -> str:
        names = {n for n, _ in model.named_modules()}
        if any(n.endswith("self_attn.q_proj") for n in names) and any(n.endswith("self_attn.o_proj") for n in names):
            if any(n.startswith("model.layers.") for n in names):
                return "llama"
        if any(n.endswith("attn.c_attn") for n in names) and any(n.startswith("transformer.h.") for n in names):
            return "gpt2"
        if any(n.endswith("attention.query_key_value") for n in names) and any(n.startswith("gpt_neox.layers.") for n in names):
            return "neox"
        raise UnsupportedArchitectureError(
            f"TTT Lens cannot slice attention heads of {type(model).__name__} "
            f"(model_type={getattr(model.config, 'model_type', '?')!r}). Supported: {SUPPORTED}."
        )

    def _make_spec(self, layer: int, kind: str) -> ProjectionSpec | None:
        """The spec of (layer, kind), or None (reason in `_missing`) when this model lacks it."""
        if kind in NORM_KINDS or kind in NORM_BIAS_KINDS:
            return self._norm_spec(layer, kind)
        d, hd, H, Hkv = self.hidden_size, self.head_dim, self.n_heads, self.n_kv_heads
        base = f"{self._layers_path}.{layer}"
        if kind == "mlp_gate" and (self.family != "llama" or not hasattr(_attr(self.model, base).mlp, "gate_proj")):
            self._missing[kind] = (f"the {self.family} family has no MLP gate projection (its MLP is up → "
                                   "activation → down); mlp_gate exists in the Llama family only")
            return None
        if self.family == "llama":
            name = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                    "o": "self_attn.o_proj", "mlp_up": "mlp.up_proj", "mlp_gate": "mlp.gate_proj",
                    "mlp_down": "mlp.down_proj"}[kind]
            sizes = {"q": (d, H * hd), "k": (d, Hkv * hd), "v": (d, Hkv * hd), "o": (H * hd, d),
                     "mlp_up": (d, self.intermediate_size), "mlp_gate": (d, self.intermediate_size),
                     "mlp_down": (self.intermediate_size, d)}[kind]
            return ProjectionSpec(layer, kind, f"{base}.{name}", "linear", sizes[0], sizes[1])
        if self.family == "gpt2":
            if kind in ("q", "k", "v"):
                off = {"q": 0, "k": d, "v": 2 * d}[kind]
                return ProjectionSpec(layer, kind, f"{base}.attn.c_attn", "conv1d", d, d,
                                      tuple(range(off, off + d)))
            name, sizes = {"o": ("attn.c_proj", (d, d)), "mlp_up": ("mlp.c_fc", (d, self.intermediate_size)),
                           "mlp_down": ("mlp.c_proj", (self.intermediate_size, d))}[kind]
            return ProjectionSpec(layer, kind, f"{base}.{name}", "conv1d", sizes[0], sizes[1])
        # neox
        if kind in ("q", "k", "v"):
            j = {"q": 0, "k": 1, "v": 2}[kind]
            idx = tuple(h * 3 * hd + j * hd + t for h in range(H) for t in range(hd))
            return ProjectionSpec(layer, kind, f"{base}.attention.query_key_value", "linear", d, d, idx)
        name, sizes = {"o": ("attention.dense", (d, d)), "mlp_up": ("mlp.dense_h_to_4h", (d, self.intermediate_size)),
                       "mlp_down": ("mlp.dense_4h_to_h", (self.intermediate_size, d))}[kind]
        return ProjectionSpec(layer, kind, f"{base}.{name}", "linear", sizes[0], sizes[1])

    def _norm_spec(self, layer: int, kind: str) -> ProjectionSpec | None:
        """Norm gain/bias specs (module docstring): the norm feeding attention / the MLP."""
        base = f"{self._layers_path}.{layer}"
        blk = _attr(self.model, base)
        attn_side = kind.startswith("norm_attn")
        if self.family == "gpt2":
            name = "ln_1" if attn_side else "ln_2"
        elif self.family == "llama" and not attn_side and hasattr(blk, "pre_feedforward_layernorm"):
            name = "pre_feedforward_layernorm"     # sandwich-norm variants: the norm right before the MLP
        else:
            name = "input_layernorm" if attn_side else "post_attention_layernorm"
        mod = getattr(blk, name, None)
        if mod is None or getattr(mod, "weight", None) is None:
            self._missing[kind] = f"the {self.family} family has no affine norm {name!r} in its layers"
            return None
        if kind in NORM_BIAS_KINDS and getattr(mod, "bias", None) is None:
            self._missing[kind] = (f"the {self.family} family's norms ({type(mod).__name__}) have no bias; "
                                   f"use {kind[:-5]!r} (the gain) instead")
            return None
        d = int(mod.weight.shape[-1])
        return ProjectionSpec(layer, kind, f"{base}.{name}", "norm", d, d)

    def available_kinds(self) -> tuple[str, ...]:
        """The kinds this model has, in `KINDS` order (e.g. no mlp_gate for gpt2/neox, no norm
        biases for RMSNorm models)."""
        return self._available

    # ---------------------------------------------------------------- public structure queries
    def spec(self, layer: int, kind: str) -> ProjectionSpec:
        """The ProjectionSpec of logical projection (layer, kind)."""
        self._check(layer, kind)
        return self._specs[(layer, kind)]

    def heads_of(self, kind: str) -> int:
        """Number of head blocks of a projection kind: Hq for q/o, Hkv for k/v, 0 for MLP."""
        return {"q": self.n_heads, "o": self.n_heads, "k": self.n_kv_heads, "v": self.n_kv_heads}.get(kind, 0)

    def kv_head_of(self, head: int) -> int:
        """Key/value head that query head `head` reads (grouped-query attention)."""
        return head // (self.n_heads // self.n_kv_heads)

    def head_axis(self, kind: str) -> int:
        """Axis of the logical weight (out, in) along which heads are split: 0 for q/k/v, 1 for o."""
        if kind in ("q", "k", "v"):
            return 0
        if kind == "o":
            return 1
        raise ValueError(f"projection {kind!r} has no heads")

    def head_slice(self, kind: str, head: int) -> slice:
        """Slice of the head axis owned by `head` (rows for q/k/v, input columns for o)."""
        n = self.heads_of(kind)
        if not 0 <= head < n:
            raise IndexError(f"head {head} out of range for {kind!r} with {n} heads")
        return slice(head * self.head_dim, (head + 1) * self.head_dim)

    def module(self, layer: int, kind: str) -> Any:
        return _attr(self.model, self.spec(layer, kind).module_name)

    def logical_weight(self, layer: int, kind: str) -> torch.Tensor:
        """The logical weight W (out, in) of (layer, kind), detached (a copy for fused/Conv1D);
        for norm kinds the gain γ (d,) or the bias β (d,)."""
        spec = self.spec(layer, kind)
        if spec.layout == "norm":
            mod = self.module(layer, kind)
            return (mod.bias if kind in NORM_BIAS_KINDS else mod.weight).detach()
        w = self.module(layer, kind).weight.detach()
        w = w.t() if spec.layout == "conv1d" else w
        if spec.out_index is not None:
            w = w[torch.tensor(spec.out_index, device=w.device)]
        return w

    def head_weight(self, layer: int, kind: str, head: int) -> torch.Tensor:
        """One head's block of the logical weight: (d_head, in) for q/k/v, (out, d_head) for o."""
        w = self.logical_weight(layer, kind)
        s = self.head_slice(kind, head)
        return w[s] if self.head_axis(kind) == 0 else w[:, s]

    def head_delta(self, layer: int, kind: str, head: int, block: torch.Tensor) -> torch.Tensor:
        """Embed one head's block delta into a full logical delta (differentiable in `block`)."""
        spec = self.spec(layer, kind)
        axis = self.head_axis(kind)
        s = self.head_slice(kind, head)
        n_axis = spec.out_features if axis == 0 else spec.in_features
        before, after = s.start, n_axis - s.stop
        pad = (0, 0, before, after) if axis == 0 else (before, after, 0, 0)
        return F.pad(block, pad)

    def partial_forward(self, ids: torch.Tensor, mask: torch.Tensor) -> PartialForward | None:
        """A `PartialForward` of this model on the batch (ids, mask), or None when the family does
        not support running from a middle layer (then run the whole model)."""
        if not supports_partial_forward(self.model, self.family):
            return None
        return PartialForward(self.model, ids, mask)

    def _check(self, layer: int, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown projection kind {kind!r}; choose from {KINDS}")
        if kind not in self._available:
            why = self._missing.get(kind, f"the {self.family} family does not have it")
            raise ValueError(f"{kind!r} is not available for this model: {why}. "
                             f"Available: {list(self._available)}")
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range (model has {self.n_layers} layers)")

    # ---------------------------------------------------------------- hooks and contexts
    def _install_hooks(self) -> None:
        for module_name, specs in self._by_module.items():
            mod = _attr(self.model, module_name)
            if specs[0].layout == "norm":
                mod.register_forward_hook(self._make_norm_hook(specs))
                continue
            if (len(specs) == 1 and specs[0].layout == "linear" and specs[0].out_index is None
                    and type(mod) is torch.nn.Linear):
                mod._ttt_lens_fold_key = (specs[0].layer, specs[0].kind)
                # a bound method (not a closure) so that copy.deepcopy(model) rebinds it to the copy
                mod.forward = types.MethodType(_folding_forward, mod)
            mod.register_forward_hook(self._make_hook(specs))

    @staticmethod
    def _make_hook(specs: list[ProjectionSpec]):
        index_cache: dict[tuple[str, Any], torch.Tensor] = {}

        def hook(module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            state = _STATE.get()
            if state is None:
                return None
            x = args[0]
            out = output
            for spec in specs:
                key = (spec.layer, spec.kind)
                delta = state.deltas.get(key)
                if delta is not None and _folds(module, state, key, delta):
                    delta = None  # already inside the module's weight (`_folding_forward`)
                probe = state.probes.get(key)
                want = state.capture_keys is not None and key in state.capture_keys
                if delta is None and probe is None and not want:
                    continue
                add = None
                if delta is not None:
                    add = F.linear(x, delta.to(x.dtype))
                if probe is not None:
                    add = probe.to(out.dtype) if add is None else add + probe.to(out.dtype)
                if spec.out_index is None:
                    if add is not None:
                        out = out + add
                    logical = out
                else:
                    ck = (spec.kind, out.device)
                    idx = index_cache.get(ck)
                    if idx is None:
                        idx = torch.tensor(spec.out_index, device=out.device)
                        index_cache[ck] = idx
                    if add is not None:
                        out = out.index_add(-1, idx, add)
                    logical = out.index_select(-1, idx)
                if want:
                    if state.capture_in is not None:
                        state.capture_in[key] = x
                    if state.capture_out is not None:
                        state.capture_out[key] = logical
            return out

        return hook

    @staticmethod
    def _make_norm_hook(specs: list[ProjectionSpec]):
        """Hook of one norm module carrying a gain kind and possibly a bias kind (module docstring):
        out + dγ ⊙ x̂ + dβ + probes; captures x̂ (in) and the final output (out)."""

        def hook(module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            state = _STATE.get()
            if state is None:
                return None
            keys = [(spec.layer, spec.kind) for spec in specs]
            want = [k for k in keys if state.capture_keys is not None and k in state.capture_keys]
            active = [k for k in keys if k in state.deltas or k in state.probes]
            if not active and not want:
                return None
            x, out = args[0], output
            xhat = None
            for key in active:
                delta, probe = state.deltas.get(key), state.probes.get(key)
                if delta is not None:
                    if key[1] in NORM_KINDS:
                        xhat = normalized_input(module, x) if xhat is None else xhat
                        out = out + delta.to(out.dtype) * xhat
                    else:
                        out = out + delta.to(out.dtype)
                if probe is not None:
                    out = out + probe.to(out.dtype)
            for key in want:
                if state.capture_in is not None:
                    xhat = normalized_input(module, x) if xhat is None else xhat
                    state.capture_in[key] = xhat
                if state.capture_out is not None:
                    state.capture_out[key] = out
            return out

        return hook

    @contextmanager
    def apply(
        self,
        deltas: dict[Key, torch.Tensor] | None = None,
        probes: dict[Key, torch.Tensor] | None = None,
        capture: set[Key] | list[Key] | None = None,
    ) -> Iterator[_HookState]:
        """Run forwards inside this block with, for this thread only:

        * deltas[(layer, kind)]: logical weight delta ΔW (out, in) — output becomes (W+ΔW)x + b;
          for a norm gain kind dγ (d,) — γ_eff = γ0 + dγ; for a norm bias kind dβ (d,) —
          β_eff = β0 + dβ (differentiable; the shared weights are never touched);
        * probes[(layer, kind)]: a tensor (B, L, out) added to the logical output — its gradient
          is ∂(objective)/∂(projection output), the b_i of DESIGN §2 (norm kinds: the norm output);
        * capture: keys whose inputs (B, L, in) and logical outputs (B, L, out) are stored in the
          yielded state's `capture_in` / `capture_out` (norm kinds: x̂ and the norm output).
        Nested blocks combine (inner entries override outer ones for the same key).
        """
        outer = _STATE.get()
        state = _HookState(
            deltas={**(outer.deltas if outer else {}), **(deltas or {})},
            probes={**(outer.probes if outer else {}), **(probes or {})},
        )
        if capture:
            state.capture_keys = set(capture)
            state.capture_in, state.capture_out = {}, {}
        for key, d in state.deltas.items():
            spec = self.spec(*key)
            want = (spec.out_features,) if spec.layout == "norm" else (spec.out_features, spec.in_features)
            if tuple(d.shape) != want:
                raise ValueError(f"delta for {key} has shape {tuple(d.shape)}, expected {want}")
        token = _STATE.set(state)
        try:
            yield state
        finally:
            _STATE.reset(token)
