"""The prompt kernel of a real transformer: supervised outputs, residuals, per-block kernels and the
query coupling for one prompt and one update subspace (DESIGN §2, §7; paper A.1, A.2, A.7).

Scalar outputs (what the kernel is a kernel *of*)
-------------------------------------------------
* Few-shot (DESIGN §7.1): s_i = Σ_y v(y) p(y), the expected label value under the softmax
  restricted to the label tokens, at the last position of leave-one-out prompt i (demonstration i
  removed, x_i as the query). r_i = v(y_i) − s_i. The query output s_x is the same scalar on the
  full prompt; its error is (s_x − v(query_y))² when the true label is known.
  Label token = first token of ``label_prefix() + y``. Whitespace-only leading tokens that *every*
  label shares (SmolLM2 writes " 5" as [" ", "5"]) are appended to every prompt instead, so the
  label token is the first token that can differ; two labels sharing it is an error.
* Long context / free text (DESIGN §7.2): supervised positions are the next-token predictions
  inside the context, capped to the last ``max_positions`` positions (default 256); the scalar is
  the probability p of the observed next token with target 1 and residual 1 − p. This puts free
  text in the paper's squared-loss frame (the kernel regime needs a scalar output per position).
  Query: with a question *and* an answer, s_x = probability of the answer's first token after
  "…Answer:" (leading whitespace tokens of " answer" are appended to the query, as for labels);
  error = 1 − s_x, and the NLL −log s_x is reported too. Without an answer there is no query
  target: k_x is None and ``query_note`` says why.

Routes: `ttt_core.kernel_routes` (loo-exact, qttt-frozen-kv, exact-per-output).

Subspaces (DESIGN §11, `ttt_core.target_kernels`): q/k/v/o per head; mlp_up, mlp_gate (Llama
family), mlp_down; norm gains norm_attn/norm_mlp and biases norm_attn_bias/norm_mlp_bias (LayerNorm
models); LoRA ``lora:<kind>:<rank>`` (B at init, A seeded by ``lora_seed``) — one block per layer
for all but q/k/v/o. Every prompt kind supports every target: few-shot through ``loo-exact``;
long context through ``exact-per-output``, or ``qttt-frozen-kv`` for q and LoRA on q with qttt.

Memory: per-layer factors are kept, never all per-head n × n kernels (`PromptKernel.head_kernel`
materialises one on demand).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ttt_core import memory_guard
from ttt_core.attention import record_attention
from ttt_core.encoding import DEFAULT_MAX_POSITIONS, EncodingError, FewShotEncoding, decoded_tokens, encode
from ttt_core.kernel_factors import LayerFactors, RowFactors
from ttt_core.kernel_routes import (
    CHUNK_ROWS,
    OUTPUT_CHUNK,
    blocks_per_layer,
    exact_per_output_route,
    frozen_kv_refusal,
    frozen_kv_route,
    frozen_kv_target_ok,
    loo_exact_route,
    report,
)
from ttt_core.models import LoadedModel
from ttt_core.prompts import Prompt
from ttt_core.target_kernels import (  # noqa: F401  (re-exported for the pages)
    PAGE_SUBSPACES,
    SUBSPACES,
    Target,
    available_subspaces,
    is_per_layer,
    resolve_target,
    subspace_label,
)
from ttt_core.types import Block, Progress


class PromptKernelError(ValueError):
    """The prompt kernel cannot be computed for this prompt; the message says why, for the UI."""


class KernelMemoryError(PromptKernelError, memory_guard.MemoryBudgetError):
    """The kernel would not fit (or ran out of) memory; the message names a setting that fits."""


class KernelContextLengthError(PromptKernelError, memory_guard.ContextLengthError):
    """The prompt has more tokens than the model has positions; the message says how to truncate."""


KV_MODES = ("auto", "frozen", "full")


def _frozen(target: Target, qttt: bool, kv: str = "auto") -> bool:
    """Long context: whether the frozen-K/V route serves `target`. kv "auto": W_Q and LoRA on W_Q
    when `qttt` (qTTT), every other target through the full-context route; "frozen": every target
    but W_K/W_V (the kernel of the frozen-K/V update of that target); "full": none."""
    if kv not in KV_MODES:
        raise PromptKernelError(f"kv must be one of {list(KV_MODES)}, got {kv!r}")
    if kv == "frozen":
        if not frozen_kv_target_ok(target):
            raise PromptKernelError(frozen_kv_refusal(target.subspace))
        return True
    if kv == "full":
        return False
    return qttt and target.kind == "q" and target.form in ("linear", "lora")


def _memory_plan(lm: LoadedModel, enc: Any, target: str | Target, qttt: bool, row_chunk: int, chunk: int,
                 max_positions: int, kv: str = "auto") -> tuple[memory_guard.MemoryEstimate, Any]:
    """(estimate, advice) of this kernel job (`memory_guard` docstring has the formulas)."""
    target = resolve_target(lm, target)
    subspace = target.subspace
    if isinstance(enc, FewShotEncoding):
        lengths = [len(s) for s in enc.seqs]
        return (memory_guard.loo_exact_estimate(lm, lengths, subspace), memory_guard.fewshot_advice(enc.n))
    n = len(enc.positions)
    wanted = list(enc.positions) + ([enc.query_position] if enc.query_position is not None else [])
    T = len(enc.ids)
    if _frozen(target, qttt, kv):
        span = wanted[-1] + 1 - wanted[0]
        est = memory_guard.frozen_kv_kernel_estimate(lm, T, n, span, row_chunk, target.kind)
        adv = memory_guard.kernel_advice(lm, T, n, "qttt-frozen-kv", row_chunk=row_chunk, span_extra=span - n)
    else:
        est = memory_guard.exact_per_output_estimate(lm, T, len(wanted), subspace, chunk)
        adv = memory_guard.kernel_advice(lm, T, n, "exact-per-output", kind=subspace, chunk=chunk)
    return est, adv


# --------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------


@dataclass
class QueryOutcome:
    """Prediction at the query: value s_x, target, error ((s_x − v)² few-shot, 1 − p long
    context), NLL (long context) and a label saying what is predicted."""

    value: float
    target: float | None
    error: float | None
    nll: float | None
    label: str


@dataclass
class PromptKernel:
    """Everything the spectrum, steps and heads views need for one prompt and subspace.

    values/targets/residuals: (n,) float64 (r = target − value); K: (n, n) full kernel Σ_b K^(b);
    head_couplings: (L, H, n) k_x^(b) per block or None; k_x: (n,) = Σ_b k_x^(b) or None;
    factors[l]: per-layer factor store (`kernel_factors`); H blocks per layer (heads of the
    subspace, 1 for MLP); output_labels: text per supervised output; tokens: decoded tokens of the
    full prompt (query prompt for few-shot), ids: their ids.

    first_layer = l > 0 (experiments only, `compute_prompt_kernel(first_layer=l)`): only layers
    l … L−1 were computed; factors[:l] are None, K and k_x sum layers ≥ l only and
    head_couplings[:l] are NaN. Per-block views (`steps.block_kernel` of blocks in layers ≥ l,
    `experiments.reproduce._restrict`) are exact; the all-layer methods below refuse."""

    prompt_kind: str
    subspace: str
    route: str
    route_note: str
    model_name: str
    n_layers: int
    n_blocks_per_layer: int
    values: np.ndarray
    targets: np.ndarray
    residuals: np.ndarray
    output_labels: list[str]
    query: QueryOutcome | None
    query_note: str | None
    factors: list[LayerFactors | None]
    K: np.ndarray
    head_couplings: np.ndarray | None
    k_x: np.ndarray | None
    tokens: list[str]
    ids: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    first_layer: int = 0

    @property
    def n(self) -> int:
        return int(self.values.shape[0])

    def blocks(self) -> list[Block]:
        """All blocks (layer, head) of the subspace, layer-major."""
        return [(l, h) for l in range(self.n_layers) for h in range(self.n_blocks_per_layer)]

    def block_label(self, block: Block) -> str:
        l, h = block
        return f"L{l} {self.subspace}" if is_per_layer(self.subspace) else f"L{l}.{self.subspace}H{h}"

    def head_kernel(self, layer: int, head: int) -> np.ndarray:
        """K^(b) of one block, materialised on demand: (n, n)."""
        return self.factors[layer].head_kernels([head])[0].cpu().numpy()

    def layer_kernel(self, layer: int) -> np.ndarray:
        """Σ over the layer's blocks: (n, n)."""
        return self.factors[layer].layer_kernel().cpu().numpy()

    def _all_factors(self) -> list[LayerFactors]:
        if self.first_layer:
            raise ValueError(f"this kernel holds layers {self.first_layer}–{self.n_layers - 1} only "
                             "(first_layer > 0); restrict it to those layers first")
        return self.factors  # type: ignore[return-value]

    def head_traces(self) -> np.ndarray:
        """tr(K^(b)) for every block: (L, H)."""
        return np.stack([f.head_traces().cpu().numpy() for f in self._all_factors()])

    def trace_scores(self, M: np.ndarray) -> np.ndarray:
        """tr(K^(b) M) for every block (M symmetric (n, n)): (L, H)."""
        Mt = torch.as_tensor(M, dtype=torch.float64)
        return np.stack([f.trace_scores(Mt.to(_dev(f))).cpu().numpy() for f in self._all_factors()])

    def quad_forms(self, Z: np.ndarray, U: np.ndarray) -> np.ndarray:
        """z_rᵀ K^(b) u_r for every block and column r: (L, H, R)."""
        Zt, Ut = torch.as_tensor(Z, dtype=torch.float64), torch.as_tensor(U, dtype=torch.float64)
        return np.stack([f.quad_forms(Zt.to(_dev(f)), Ut.to(_dev(f))).cpu().numpy() for f in self._all_factors()])


def _dev(f: LayerFactors) -> torch.device:
    return f.H.device if isinstance(f, RowFactors) else f.F.device


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def compute_prompt_kernel(
    lm: LoadedModel,
    prompt: Prompt,
    subspace: str = "q",
    *,
    max_positions: int = DEFAULT_MAX_POSITIONS,
    qttt: bool = True,
    chunk: int = OUTPUT_CHUNK,
    row_chunk: int = CHUNK_ROWS,
    progress: Progress = None,
    lora_seed: int = 0,
    first_layer: int = 0,
    shared: dict | None = None,
    kv: str = "auto",
) -> PromptKernel:
    """Supervised outputs, residuals, factorised per-block kernels and query couplings.

    Args:
        lm: LoadedModel (never mutated; gradients come from adapter output probes).
        prompt: FewShotPrompt or LongContextPrompt.
        subspace: "q" (default, qTTT), "k", "v", "o" (per head); per layer: "mlp_up", "mlp_gate"
            (Llama family), "mlp_down", norm gains "norm_attn"/"norm_mlp", norm biases
            "norm_attn_bias"/"norm_mlp_bias" (LayerNorm models), LoRA "lora:<kind>:<rank>"
            (DESIGN §11; `target_kernels` has the kernels).
        max_positions: long context: keep the last this-many supervised positions.
        qttt: long context + "q" or a LoRA on q: use the frozen-KV qTTT kernel (default) instead
            of the exact per-output route.
        chunk: outputs per forward (one backward each) in the exact long-context route (default
            kernel_routes.OUTPUT_CHUNK = 16).
        row_chunk: rows per forward in the frozen-KV route (default kernel_routes.CHUNK_ROWS = 128;
            rows spanning at most this many tokens run in one pass).
        progress: optional callback(fraction, text).
        kv: long context only: "auto" (default: the qTTT frozen-K/V kernel for W_Q and LoRA on W_Q
            when `qttt`, the exact full-context kernel for every other target), "frozen" (the kernel
            of the frozen-K/V, qTTT-style update of any target except W_K/W_V: one backward for all
            positions, route "qttt-frozen-kv") or "full" (the exact per-output route for every target).
            Few-shot prompts always take the exact LOO route.
        lora_seed: seed of the LoRA A matrices (`ttt_core.lora.lora_a`), LoRA subspaces only.
        first_layer: few-shot only, for experiments that use only the last layers' blocks: compute
            layers first_layer … L−1 only (the backward stops there; see `PromptKernel`).
        shared: few-shot with first_layer > 0: a dict shared with `paper_gd` runs on the same
            prompt (the hidden states entering first_layer are computed once for both).
    Returns:
        PromptKernel with K = Σ_b K^(b) (n, n), per-block couplings k_x^(b) (L, H, n) or None.
    Raises:
        PromptKernelError: unknown subspace or one the model lacks (mlp_gate on gpt2/neox, a norm
            bias on an RMSNorm model: the message names the family), labels sharing a first
            token, no supervised positions;
        KernelContextLengthError (also a memory_guard.ContextLengthError): more tokens than the
            model's maximum positions (8,192 for SmolLM2);
        KernelMemoryError (also a memory_guard.MemoryBudgetError): the estimated peak does not
            fit the memory available, or the job ran out of memory; the message names a setting
            that fits (fewer positions, a shorter context).
    """
    try:
        target = resolve_target(lm, subspace, lora_seed=lora_seed)
    except ValueError as exc:
        raise PromptKernelError(str(exc)) from exc
    t0 = time.perf_counter()
    try:
        enc = encode(lm, prompt, max_positions)
    except EncodingError as exc:
        raise PromptKernelError(str(exc)) from exc
    if first_layer and not isinstance(enc, FewShotEncoding):
        raise PromptKernelError("first_layer > 0 is offered for few-shot prompts only")
    n_tokens = max(len(s) for s in enc.seqs) if isinstance(enc, FewShotEncoding) else len(enc.ids)
    memory_guard.check_context_length(lm, n_tokens, "The prompt", error=KernelContextLengthError)
    est, advice = _memory_plan(lm, enc, target, qttt, row_chunk, chunk, max_positions, kv)
    memory_guard.check(est, advice, error=KernelMemoryError)
    with memory_guard.oom_guard(est, advice, error=KernelMemoryError):
        return _assemble(lm, prompt, enc, target, qttt=qttt, chunk=chunk, row_chunk=row_chunk,
                         max_positions=max_positions, progress=progress, t0=t0, first_layer=int(first_layer),
                         shared=shared, kv=kv)


def _assemble(lm: LoadedModel, prompt: Prompt, enc: Any, target: Target, *, qttt: bool, chunk: int, row_chunk: int,
              max_positions: int, progress: Progress, t0: float, first_layer: int = 0,
              shared: dict | None = None, kv: str = "auto") -> PromptKernel:
    """The route and the assembly of `compute_prompt_kernel` (inside its memory guard)."""
    tok = lm.tokenizer
    subspace = target.subspace
    if isinstance(enc, FewShotEncoding):
        rr = loo_exact_route(lm, enc, target, progress, first_layer=first_layer, shared=shared)
        targets = enc.targets
        qt = enc.query_target
        has_query = enc.frame == "expected_value" or enc.query_target_id is not None
        note = enc.query_note
        if enc.frame == "expected_value":
            label = f"E[label value | {prompt.query_x!r}]"
            note = None if note is None else note.replace("unknown.", "unknown (k_x is still computed).")
        else:
            label = f"p({prompt.query_y!r} | {prompt.query_x!r})"
            if not has_query:
                note = ("No '# answer:' line: with categorical labels the query output is the probability of the "
                        "true answer, so without it there is no query output and k_x is unavailable.")
        query = None if not has_query else QueryOutcome(
            value=rr.query_value, target=qt, error=None if qt is None else (rr.query_value - qt) ** 2, nll=None,
            label=label)
        output_labels = [f"{x} → {y}" for x, y in prompt.demos]
    else:
        if _frozen(target, qttt, kv):
            rr = frozen_kv_route(lm, enc, row_chunk, progress, target=target)
        else:
            rr = exact_per_output_route(lm, enc, target, chunk, progress)
        targets = np.ones(len(enc.positions))
        qv = rr.query_value
        query = None if qv is None else QueryOutcome(
            value=qv, target=1.0, error=1.0 - qv, nll=float(-np.log(max(qv, 1e-300))),
            label=f"p(answer token {tok.decode([enc.query_token])!r})")
        note = enc.query_note
        output_labels = [f"@{p}: {tok.decode([enc.ids[p]])!r}→{tok.decode([t])!r}"
                         for p, t in zip(enc.positions, enc.targets)]
        has_query = enc.query_position is not None
    ids = list(enc.ids)
    t1 = time.perf_counter()
    report(progress, 0.95, "Summing block kernels and query couplings")
    factors = rr.factors
    computed = [f for f in factors if f is not None]
    Kt = torch.zeros(rr.values.shape[0], rr.values.shape[0], dtype=torch.float64, device=_dev(computed[0]))
    for f in computed:                                  # summed in place: one n × n float64 buffer
        if isinstance(f, RowFactors):
            f.add_layer_kernel_to(Kt)
        else:
            Kt += f.layer_kernel()
    K = Kt.cpu().numpy()
    del Kt
    K = 0.5 * (K + K.T)
    hc = None
    if has_query:
        done = [f.query_couplings().cpu().numpy() for f in computed]
        hc = np.stack([np.full_like(done[0], np.nan)] * first_layer + done)
    values = np.asarray(rr.values, dtype=float)
    ev = PromptKernel(
        prompt_kind=enc.kind, subspace=subspace, route=rr.route, route_note=rr.route_note,
        model_name=lm.name, n_layers=lm.adapter.n_layers, n_blocks_per_layer=blocks_per_layer(lm, target),
        values=values, targets=np.asarray(targets, dtype=float), residuals=np.asarray(targets, dtype=float) - values,
        output_labels=output_labels, query=query, query_note=note, factors=factors, K=K,
        head_couplings=hc, k_x=None if hc is None else hc[first_layer:].sum(axis=(0, 1)), tokens=decoded_tokens(lm, ids), ids=ids,
        timings={"gradients_s": t1 - t0, "kernel_s": time.perf_counter() - t1},
        settings={"max_positions": max_positions, "qttt": qttt, "kv": kv,
                  **({"lora_seed": target.lora.seed} if target.lora is not None else {})},
        first_layer=first_layer,
    )
    report(progress, 1.0, "Prompt kernel ready")
    return ev


def attention_pattern(lm: LoadedModel, ev: PromptKernel, layer: int, head: int, max_tokens: int = 96) -> tuple[np.ndarray, list[str]]:
    """Attention probabilities of query head `head` at `layer` on the prompt's last `max_tokens`
    tokens (the full few-shot prompt / the full long-context text): ((m, m) array, token labels).
    For kv-head subspaces (k, v) pass a query head that reads that kv head."""
    with torch.no_grad(), record_attention([layer]) as rec:
        lm.model(input_ids=torch.tensor(ev.ids, device=lm.device)[None])
    m = min(max_tokens, len(ev.ids))
    P = rec[layer][0, head, -m:, -m:].float().cpu().numpy()
    return P, [t.replace("\n", "↵") for t in ev.tokens[-m:]]
