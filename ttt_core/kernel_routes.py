"""How the per-position gradients behind a prompt kernel are obtained (DESIGN §2; paper A.1, A.2).

Each route returns a `RouteResult`: the n supervised outputs' values, the per-layer factor stores
(`kernel_factors`) and the query output's value. `prompt_kernel.compute_prompt_kernel` picks the
route and assembles the `PromptKernel`.

Routes (how the per-position gradients b are obtained)
------------------------------------------------------
Every route takes a subspace name or a resolved `target_kernels.Target` (DESIGN §11: linear
blocks, LoRA B at init, norm gains and biases); the captured inputs/output gradients of the
target's adapter kind become its factors through `target_kernels.row_target_factors` (rows) or
the per-output features below.

* ``loo-exact`` (few-shot, every subspace): the n LOO prompts and the full prompt form one
  right-padded batch (causal attention makes right padding harmless; each prompt's last real
  position is gathered). Samples are independent, so ONE backward of Σ_i s_i + s_x gives every
  b_{i,t} = ∂s_i/∂y_{i,t} at every position t exactly (adapter output probes), and the kernel is
  K_ij = Σ_{t,t'} (a_{i,t}·a_{j,t'})(b_{i,t}·b_{j,t'}) (DESIGN §2), stored as `RowFactors`.
* ``qttt-frozen-kv`` (long context, W_Q, and LoRA on W_Q: its B sits in the query path, so the
  same frozen-KV rows give its features with input rows s·x Aᵀ): keys/values held at their
  unadapted values, so positions are independent and one backward of Σ_i s_i (+ s_x) gives every
  b_i exactly; K^(h) = (AAᵀ) ⊙ (B_h B_hᵀ) is the *qTTT* kernel (the kernel of the update qTTT
  actually makes), not the exact-model W_Q kernel. With ``kv="frozen"`` (`prompt_kernel`) the
  same route serves every other target except W_K/W_V: with all keys and values frozen, a row's
  W_O, MLP and norm parameters change only that row's output, so the kernel of the frozen-K/V
  update of that target (the update `targets.engine`'s ``frozen_kv`` route makes) also comes from
  one backward; W_K/W_V make the keys and values and get no gradient there. A no-grad prefill of the tokens before the first row only, then the
  rows in order: in one pass when they span at most ``row_chunk`` tokens, else in chunks of
  ``row_chunk`` rows (default `CHUNK_ROWS` = 128). A chunk's forward appends its own (base-weight)
  K/V to the growing cache, as a prefill would, and attends to the cache through the dQ-only
  frozen attention (`attention.frozen_kv` on a live view of that cache: no repeated K/V heads
  saved for the backward, unlike SDPA with a mask); one backward per chunk, then the cache is
  detached and the chunk's graph freed. Every token is run forward once (the earlier
  form prefilled the whole text and then ran the rows again: one extra forward over all tokens),
  and the autograd graph holds one chunk. Factor rows go straight into preallocated stores.
  Memory (SmolLM2, measured, `ttt_core.memory_guard` has the formula): graph ≈ 1.3 MB per chunk
  row, factors n·(d_in + d_out)·4 bytes per layer, K/V cache 46 KB per token.
  Both long-context routes read the LM head through `fused_head.HeadPath`: the decoder runs, and
  s_i = exp(−nll_i) with ∂nll_i/∂h_i formed in the forward, so no (rows, V) logits graph is kept
  (where the family's head is a plain bias-free linear; elsewhere the model's own logits).
* ``exact-per-output`` (long context, W_K/W_V/W_O/MLP, or W_Q with ``qttt=False``): positions
  are not independent (s_i depends on the block at every t ≤ i), so each output needs its own
  backward. Outputs go in chunks of ``chunk`` (16), last positions first; a chunk runs ONE forward
  of the tokens up to its last output (causality: b_{i,t} = 0 for t > p_i, so later tokens are
  never run) and one backward per output through that graph (the graph is kept between them).
  Per-output features G_i = B_iᵀ A (rows compressed to an orthonormal basis of the input row space
  when the sequence is shorter than the input width) are stored as `FeatureFactors` for every
  layer from the same passes (LoRA: G_i = B_iᵀ (s·X Aᵀ), (out, r); norm targets:
  f_i = Σ_t b_{i,t} ⊙ x̂_t or Σ_t b_{i,t}, (d,), as `DiagFactors`). Memory: the features,
  n·out·min(N, in)·4 bytes per layer, plus one sequence's graph (`memory_guard.
  exact_per_output_estimate` checks both before the job). Cost: ⌈(n+1)/chunk⌉ forwards and n+1
  backwards, chunk i's over its first p_max(i) tokens — far more than the other two routes (one
  backward of the sequence per output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ttt_core.attention import FrozenKV, frozen_kv
from ttt_core.encoding import FewShotEncoding, LongContextEncoding, padded_batch
from ttt_core.fused_head import HeadPath
from ttt_core.kernel_factors import DiagFactors, FeatureFactors, LayerFactors
from ttt_core.models import LoadedModel
from ttt_core.partial_forward import shared_partial_forward
from ttt_core.readout import FewShotReadout
from ttt_core.target_kernels import Target, diag_rows, lora_inputs, resolve_target, row_target_factors
from ttt_core.types import Progress

#: Default rows per chunk of the frozen-KV route (`row_chunk`). Measured on SmolLM2 at
#: n = 2,048 (2 CPU threads, CPU seconds of the route on a loaded machine): 128 rows 19–21 s,
#: 192: 22–24 s, 256: 22–23 s, 384: 21–23 s; at 128 rows × ≤ 2,048 keys the frozen attention
#: keeps its probabilities for the backward (`kernels.dispatch.saves_probs`), and the graph
#: stays small (~170 MB).
CHUNK_ROWS = 128

#: Default outputs per forward of the exact per-output route (`chunk`): one forward, then one
#: backward per output through its graph.
OUTPUT_CHUNK = 16


@dataclass
class RouteResult:
    """route / route_note: the route's name and a sentence for the UI; values (n,) float64: the
    supervised outputs s_i; factors[l]: layer l's factor store; query_value: s_x, or None
    without a query output."""

    route: str
    route_note: str
    values: np.ndarray
    factors: list[LayerFactors]
    query_value: float | None


def _store(t: torch.Tensor) -> torch.Tensor:
    """Factor storage dtype: fp64 stays fp64 (exact tests), everything else becomes fp32."""
    t = t.detach()
    return t if t.dtype == torch.float64 else t.float()


def _keys(lm: LoadedModel, kind: str, layers: Sequence[int] | None = None) -> list[tuple[int, str]]:
    layers = range(lm.adapter.n_layers) if layers is None else layers
    return [(l, kind) for l in layers]


def blocks_per_layer(lm: LoadedModel, kind: str | Target) -> int:
    """Blocks per layer of a subspace: heads for q/k/v/o, 1 for MLP, LoRA and norm targets."""
    return resolve_target(lm, kind).n_blocks(lm)


def _probes(lm: LoadedModel, keys: list, batch: int, length: int) -> dict:
    return {k: torch.zeros(batch, length, lm.adapter.spec(*k).out_features, device=lm.device,
                           dtype=lm.dtype, requires_grad=True) for k in keys}


def loo_exact_route(lm: LoadedModel, fs: FewShotEncoding, kind: str | Target, progress: Progress = None,
                    first_layer: int = 0, shared: dict | None = None) -> RouteResult:
    """The ``loo-exact`` route (module docstring): one batched forward/backward over the n LOO
    prompts and the query prompt.

    With ``first_layer`` = l > 0 only the blocks of layers l … L−1 get factors (the others are
    None): the backward stops at layer l, and on the Llama family the hidden states entering
    layer l come from a `PartialForward` of the padded batch (no grad), shared through ``shared``
    under the same key as `paper_gd.LooBatch`, so a paper-GD run on the same prompt reuses them.
    The factors of layers ≥ l are the same numbers as with l = 0 (the outputs and their gradients
    above layer l do not depend on probes below it)."""
    target = resolve_target(lm, kind)
    n = fs.n
    L = lm.adapter.n_layers
    first = int(first_layer)
    if not 0 <= first < L:
        raise ValueError(f"first_layer must be in 0 … {L - 1}, got {first_layer}")
    lengths = [len(s) for s in fs.seqs]
    ids, mask, last = padded_batch(lm, fs.seqs)
    keys = _keys(lm, target.kind, range(first, L))
    probes = _probes(lm, keys, n + 1, ids.shape[1])
    pf = shared_partial_forward(lm.adapter, fs.seqs, ids, mask, shared) if first > 0 else None
    layers_note = "" if first == 0 else f" (layers {first}–{L - 1} only)"
    report(progress, 0.1, f"One batched forward/backward over {n} leave-one-out prompts + the query prompt{layers_note}")
    with lm.adapter.apply(probes=probes, capture=set(keys)) as st:
        if pf is not None:
            logits = pf.logits_from(first, pf.hidden_entering(first), torch.arange(n + 1, device=lm.device), last)
        else:
            logits = lm.model(input_ids=ids, attention_mask=mask, logits_to_keep=last[:, None]).logits[:, 0]
        s = FewShotReadout(fs, lm.device).scalars(logits)
        grads = torch.autograd.grad(s.sum(), [probes[k] for k in keys])
    s = s.detach().double().cpu().numpy()
    seg = torch.cat([torch.full((lengths[i],), i, dtype=torch.long) for i in range(n)]).to(lm.device)
    factors: list[LayerFactors | None] = [None] * first
    for k, g in zip(keys, grads):
        a = st.capture_in[k].detach()
        A = torch.cat([a[i, :lengths[i]] for i in range(n)])
        B = torch.cat([g[i, :lengths[i]] for i in range(n)])
        Ax, Bx = a[n, :lengths[n]], g[n, :lengths[n]]
        factors.append(row_target_factors(lm, target, k[0], A, B, n, seg, Ax, Bx, store=_store))
    return RouteResult("loo-exact", "Exact autograd through each leave-one-out prompt (one batched backward)"
                       + layers_note + ".", s[:n], factors, float(s[n]))


@torch.no_grad()
def _prefill_cache(model: Any, ids: torch.Tensor) -> FrozenKV:
    """Per-layer K/V of one forward over `ids` (as `attention.prefill`, but keeping only the last
    position's logits: a 2048-token prefill would otherwise hold 2048 × vocab floats)."""
    cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
    return FrozenKV(keys=[layer.keys for layer in cache.layers], values=[layer.values for layer in cache.layers])


class _LiveKV:
    """A `FrozenKV` look-alike over a growing transformers cache: keys[l] / values[l] are the
    cache's current layer-l tensors, detached. Inside a forward that passes the same cache as
    `past_key_values`, each attention layer appends the chunk's own keys/values before it attends,
    so under `attention.frozen_kv` the chunk's rows read exactly what a prefill would have cached."""

    class _Side:
        def __init__(self, cache: Any, attr: str) -> None:
            self.cache, self.attr = cache, attr

        def __getitem__(self, layer: int) -> torch.Tensor:
            return getattr(self.cache.layers[layer], self.attr).detach()

    def __init__(self, cache: Any) -> None:
        self.keys, self.values = self._Side(cache, "keys"), self._Side(cache, "values")

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[-2])


def _detach_cache(cache: Any) -> None:
    """Cut the growing cache from the chunk's autograd graph (frees the graph's saved tensors)."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.detach(), layer.values.detach()


def _frozen_kv_rows(lm: LoadedModel, li: LongContextEncoding, wanted: list[int], targets: list[int],
                   chunk_rows: int, progress: Progress, kind: str = "q") -> tuple[dict, dict, torch.Tensor]:
    """The supervised rows in chunks of `chunk_rows` against a cache that grows chunk by chunk
    (module docstring), probing adapter kind `kind` (default "q"). Returns ({key: A (len(wanted),
    d_in)}, {key: B (len(wanted), d_out)}, s)."""
    from transformers import DynamicCache

    ids = torch.tensor(li.ids, device=lm.device)[None]
    start, stop = wanted[0], wanted[-1] + 1
    keys = _keys(lm, kind)
    a = lm.adapter
    store = torch.float64 if lm.dtype == torch.float64 else torch.float32
    n_w = len(wanted)
    A = {k: torch.empty(n_w, a.spec(*k).in_features, dtype=store, device=lm.device) for k in keys}
    B = {k: torch.empty(n_w, a.spec(*k).out_features, dtype=store, device=lm.device) for k in keys}
    vals = torch.empty(n_w, dtype=torch.float64)
    cache: Any = DynamicCache()
    if start > 0:
        report(progress, 0.05, f"Prefill of the {start} tokens before the supervised rows")
        with torch.no_grad():
            cache = lm.model(input_ids=ids[:, :start], use_cache=True, logits_to_keep=1).past_key_values
    live = _LiveKV(cache)
    head = HeadPath(lm.model)          # the LM head without a (rows, V) autograd graph where it can (`fused_head`)
    pos_t = torch.tensor(wanted)
    chunks = list(range(start, stop, chunk_rows))
    for ci, r0 in enumerate(chunks):
        r1 = min(stop, r0 + chunk_rows)
        j0, j1 = int(torch.searchsorted(pos_t, r0)), int(torch.searchsorted(pos_t, r1))
        report(progress, 0.1 + 0.8 * ci / len(chunks),
               f"qTTT rows {r0}…{r1 - 1}: forward (frozen K/V) + one backward, chunk {ci + 1} of {len(chunks)}")
        rows = (pos_t[j0:j1] - r0).to(lm.device)
        tg = torch.tensor(targets[j0:j1], dtype=torch.long, device=lm.device)
        probes = _probes(lm, keys, 1, r1 - r0)
        pos = torch.arange(r0, r1, device=lm.device)[None]
        kw = {} if head.fused else {"logits_to_keep": rows if j1 > j0 else 1}
        with frozen_kv(live, r0), lm.adapter.apply(probes=probes, capture=set(keys)) as st:
            out = head.module(input_ids=ids[:, r0:r1], position_ids=pos, past_key_values=cache, use_cache=True, **kw)
            if j1 > j0:
                s = head.prob(out, rows if head.fused else slice(None), tg)
                grads = torch.autograd.grad(s.sum(), [probes[k] for k in keys])
        _detach_cache(cache)
        if j1 > j0:
            vals[j0:j1] = s.detach().double().cpu()
            for k, g in zip(keys, grads):
                A[k][j0:j1] = st.capture_in[k][0].detach().index_select(0, rows)
                B[k][j0:j1] = g[0].index_select(0, rows)
            del s, grads
        del out, probes, st
    del cache, live
    return A, B, vals


def _frozen_kv_single_pass(lm: LoadedModel, li: LongContextEncoding, wanted: list[int], targets: list[int],
                          progress: Progress, kind: str = "q") -> tuple[dict, dict, torch.Tensor]:
    """All rows in one pass: a no-grad prefill of the tokens before the first row, then one forward
    of the rows (their own keys/values appended to the cache, attention through the dQ-only
    frozen kernel) and one backward. Same features as a prefill of the whole text followed by the
    rows against its frozen cache (the rows' K/V are the values a prefill would cache)."""
    return _frozen_kv_rows(lm, li, wanted, targets, wanted[-1] + 1 - wanted[0], progress, kind)


#: Adapter kinds that make the keys and values themselves: with K/V frozen they get no gradient.
KV_KINDS = ("k", "v")


def frozen_kv_target_ok(target: Target) -> bool:
    """Whether `target` has a frozen-K/V kernel: every target except W_K, W_V and LoRA on them
    (they make the keys and values, which the frozen-K/V update holds fixed)."""
    return target.kind not in KV_KINDS


def frozen_kv_refusal(name: str) -> str:
    """Why target `name` (W_K, W_V or a LoRA on them) has no frozen-K/V kernel or update."""
    return (f"{name!r} makes the keys and values: with K/V frozen it gets no gradient, so it has no frozen-K/V "
            "kernel or update (use full-context K/V)")


def frozen_kv_route(lm: LoadedModel, li: LongContextEncoding, row_chunk: int = CHUNK_ROWS,
                   progress: Progress = None, target: str | Target = "q") -> RouteResult:
    """The ``qttt-frozen-kv`` route (module docstring): one pass when the rows span at most
    `row_chunk` tokens, else chunks of `row_chunk` rows. `target`: W_Q or a LoRA on W_Q (qTTT),
    or any other target except W_K/W_V (`frozen_kv_target_ok`): the kernel of the frozen-K/V
    (qTTT-style) update of that target — with every key and value held at its prefill value, a
    row's W_O, MLP and norm parameters change only that row's output, so one backward again
    gives every position's features exactly (for the update the frozen-K/V engine makes, not
    for a full-context update of the same target)."""
    target = resolve_target(lm, target)
    if not frozen_kv_target_ok(target):
        raise ValueError(frozen_kv_refusal(target.subspace))
    wanted = list(li.positions) + ([li.query_position] if li.query_position is not None else [])
    targets = list(li.targets) + ([li.query_token] if li.query_token is not None else [])
    if wanted[-1] + 1 - wanted[0] <= row_chunk:
        A, B, s = _frozen_kv_single_pass(lm, li, wanted, targets, progress, target.kind)
    else:
        A, B, s = _frozen_kv_rows(lm, li, wanted, targets, max(1, int(row_chunk)), progress, target.kind)
    return _frozen_kv_result(lm, li, {k: [a] for k, a in A.items()}, {k: [b] for k, b in B.items()}, [s],
                            target)


def _frozen_kv_result(lm: LoadedModel, li: LongContextEncoding, A_parts: dict, B_parts: dict, vals: list,
                     target: str | Target = "q") -> RouteResult:
    target = resolve_target(lm, target)
    keys = list(A_parts)
    s_all = torch.cat(vals).double().cpu().numpy()
    n = len(li.positions)
    factors = []
    for k in keys:
        A = A_parts[k][0] if len(A_parts[k]) == 1 else torch.cat(A_parts[k])
        B = B_parts[k][0] if len(B_parts[k]) == 1 else torch.cat(B_parts[k])
        A_parts[k] = B_parts[k] = None
        Ax = A[n:] if li.query_position is not None else None
        Bx = B[n:] if li.query_position is not None else None
        factors.append(row_target_factors(lm, target, k[0], A[:n], B[:n], n, None, Ax, Bx))
    what = "W_Q" if target.kind == "q" and target.form == "linear" else target.subspace
    return RouteResult("qttt-frozen-kv",
                       f"Frozen-K/V (qTTT-style) kernel: keys/values held at their unadapted (prefill) values, so "
                       f"each position's {what} features come from its own row (one backward for all positions).",
                       s_all[:n], factors, float(s_all[n]) if li.query_position is not None else None)


def _feature_inputs(lm: LoadedModel, target: Target, layer: int, A: torch.Tensor,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The input side of one layer's per-output features from its captured block inputs A
    (P_max, in): (rows, basis). Norm targets: the rows x̂_t themselves; LoRA: s·X Aᵀ (P_max, r);
    linear blocks: A, or A V with V (in, P_max) an orthonormal basis of A's row space (A = U S Vᵀ)
    when the sequence is shorter than the input width (not for W_O, whose head axis is its input)."""
    A = A.double()
    if target.diagonal:
        return A.to(dtype), None
    if target.form == "lora":
        return lora_inputs(lm, target, layer, A).to(dtype), None
    if target.kind != "o" and A.shape[0] < A.shape[1]:
        _, _, Vh = torch.linalg.svd(A, full_matrices=False)
        V = Vh.T.contiguous()
        return (A @ V).to(dtype), V
    return A.to(dtype), None


def _feature_shape(target: Target, out_features: int, rows: torch.Tensor) -> tuple[int, ...]:
    """One output's feature shape: (out,) for norm targets, else (out, width of the input rows)."""
    return (out_features,) if target.diagonal else (out_features, rows.shape[1])


def exact_per_output_route(lm: LoadedModel, li: LongContextEncoding, kind: str | Target, chunk: int = OUTPUT_CHUNK,
                           progress: Progress = None) -> RouteResult:
    """The ``exact-per-output`` route (module docstring).

    Outputs are taken in chunks of at most `chunk`, last positions first. A chunk runs ONE forward
    of the tokens up to its last output (causal: s_i does not depend on tokens after p_i, so
    b_{i,t} = 0 for t > p_i) and then one backward per output through that graph. The first chunk
    reaches the last output, so its captured block inputs cover every row a later chunk needs;
    every layer's features come from that one set of inputs, row-truncated."""
    target = resolve_target(lm, kind)
    kind = target.kind
    chunk = max(1, int(chunk))
    ids = torch.tensor(li.ids, device=lm.device)[None]
    outs = list(li.positions) + ([li.query_position] if li.query_position is not None else [])
    tgts = list(li.targets) + ([li.query_token] if li.query_token is not None else [])
    n_out = len(outs)
    a = lm.adapter
    spec0 = a.spec(0, kind)
    keys = _keys(lm, kind)
    H = target.n_blocks(lm)
    fdtype = torch.float64 if lm.dtype == torch.float64 else torch.float32
    F: dict[int, torch.Tensor] = {}
    basis: dict[int, torch.Tensor | None] = {}
    rows_in: dict[int, torch.Tensor] = {}       # layer → the feature's input side, rows 0 … P_max − 1
    vals = torch.zeros(n_out, dtype=torch.float64)
    order = sorted(range(n_out), key=lambda j: outs[j], reverse=True)
    head = HeadPath(lm.model)
    chunks = [order[c0:c0 + chunk] for c0 in range(0, n_out, chunk)]
    for ci, sel in enumerate(chunks):
        P = max(outs[j] for j in sel) + 1                     # tokens this chunk's outputs read
        report(progress, 0.05 + 0.9 * ci / len(chunks),
               f"Exact per-output backward: chunk {ci + 1} of {len(chunks)} ({len(sel)} outputs, first {P} tokens)")
        probes = _probes(lm, keys, 1, P)
        plist = [probes[k] for k in keys]
        pos = torch.tensor([outs[j] for j in sel], device=lm.device)
        with lm.adapter.apply(probes=probes, capture=set(keys)) as st:
            if head.fused:
                out = head.module(input_ids=ids[:, :P])
            else:
                out = head.module(input_ids=ids[:, :P], logits_to_keep=pos)
            s = head.prob(out, pos if head.fused else slice(None),
                          torch.tensor([tgts[j] for j in sel], device=lm.device))
        vals[sel] = s.detach().double().cpu()
        if not rows_in:                                                       # first chunk: P = P_max
            for l, _ in keys:
                rows_in[l], basis[l] = _feature_inputs(lm, target, l, st.capture_in[(l, kind)].detach()[0], fdtype)
                F[l] = torch.zeros(n_out, *_feature_shape(target, spec0.out_features, rows_in[l]),
                                   device=lm.device, dtype=fdtype)
        del st
        for c, j in enumerate(sel):                                           # one backward per output
            grads = torch.autograd.grad(s[c], plist, retain_graph=c < len(sel) - 1)
            for (l, _), g in zip(keys, grads):
                g, X = g[0].to(fdtype), rows_in[l][:P]                        # b_{j,t}: (P, out)
                if target.diagonal:                                           # f_j = Σ_t b_{j,t} ⊙ x̂_t (or Σ_t b)
                    F[l][j] = diag_rows(target, X, g).sum(0)
                else:                                                         # G_j = B_jᵀ A V, LoRA: B_jᵀ (s·X Aᵀ)
                    F[l][j] = g.T @ X
            del grads
        del out, s, probes, plist
    n = len(li.positions)
    factors = []
    for l in range(a.n_layers):
        Fl = F.pop(l)
        fx = Fl[n] if li.query_position is not None else None
        if target.diagonal:
            factors.append(DiagFactors(F=Fl[:n].clone(), fx=None if fx is None else fx.clone()))
            continue
        V = basis.get(l)
        axis = 2 if kind == "o" and target.form == "linear" else 1
        factors.append(FeatureFactors(F=Fl[:n].clone(), n_heads=H, head_axis=axis,
                                      fx=None if fx is None else fx.clone(), basis=V))
    v = vals.numpy()
    return RouteResult("exact-per-output",
                       f"Exact autograd: one backward per output ({n_out} backward passes through {len(chunks)} "
                       f"forwards, each cut at its chunk's last output).",
                       v[:n], factors, float(v[n]) if li.query_position is not None else None)


def report(progress: Progress, frac: float, text: str) -> None:
    if progress is not None:
        progress(min(max(frac, 0.0), 1.0), text)
