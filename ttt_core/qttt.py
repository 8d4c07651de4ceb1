"""The live TTT engine: query-only TTT (qTTT, DESIGN §7.2) and the paper's leave-one-out gradient
descent (paper mode, DESIGN §3, §7.1). One engine, two modes; each run is a generator that yields
a `StepRecord` after every step.

Isolation (DESIGN §1). The shared model is never mutated. A run keeps fp32 *master deltas*
ΔW[(layer, kind)] of shape (out_features, in_features) and runs every forward inside
``lm.adapter.apply(deltas=…)`` (per-thread contextvars), so W_eff = W0 + ΔW for that thread only.
Two runs in two threads with different settings give exactly what each gives alone.

qTTT mode (Bansal et al., Alg. 1; DESIGN §2, §7.2)
----------------------------------------------------
1. One prefill of the whole token sequence (context ‖ question ‖ expected answer) with the base
   weights caches every layer's K/V (B=1, Hkv, N, D). It is never recomputed.
2. Step t samples a span start s ~ U{0, …, n_ctx−1−k} (seeded `torch.Generator`; k clamped to
   n_ctx − 1) and computes the *summed* next-token NLL of the span

       L_t(Δ) = − Σ_{i=s}^{s+k−1} log p_{W0+Δ}(x_{i+1} | frozen K/V, row i)

   with `attention.forward_with_frozen_kv` — the span tokens' own keys/values are the frozen
   prefill ones too (DESIGN §2 "qTTT makes positions independent"), so only the k query rows are
   recomputed, attending to keys ≤ their absolute position. Cost ≈ 2(C_quad·k·T + (2+2r)L·k·d²)
   (DESIGN §8) instead of a full T-token forward+backward.
3. Only W_Q is updated (all layers, or the rows of chosen (layer, head) blocks: the gradient is
   masked through Δ ⊙ M, and decay is masked too). Gradients are clipped to global norm 1.0, then
   AdamW (β 0.9/0.999, eps 1e-8, decoupled weight decay 0.01 on the *effective* weight:
   Δ ← Δ − lr·wd·(W0 + Δ), see `ttt_core.optim.DeltaAdamW`).
4. Learning rate. The paper's range is 1e-6…1e-5 for billion-scale bf16 models (App. D). AdamW
   moves every weight by ≈ lr per step whatever its gradient's scale, so what matters is lr
   relative to the weights: SmolLM2-135M's W_Q entries have RMS ≈ 0.2 (layers 0–25), so 1e-5
   barely moves it in 32 steps. Measured (`bench/qttt_step.py --lr-sweep-only`: 32 default steps,
   k = 128, two ~1024-token needle prompts, change of the expected answer's NLL, seeds 0 / 1):
   1e-5: −0.035 / −0.026; 3e-5: −0.089 / −0.073; 1e-4: −0.127 / −0.183; 3e-4: −0.054 / −0.166;
   1e-3: −1.264 / +0.887 (whole-context NLL 1.16 → 0.39–0.53: it memorises the context and is
   erratic). DEFAULT_LR = 1e-4: the largest mean gain (−0.155) among the rates that helped on
   both prompts (2 prompts × 1 span seed: a coarse choice); the page offers 1e-6…1e-2.

Paper mode (Wakayama, Sec. 9 / App. I; DESIGN §3, §7.1)
--------------------------------------------------------
For a few-shot prompt with n demonstrations, s_i(θ) is the expected label value under the softmax
restricted to the label tokens (first token of label_prefix()+y after whitespace tokens shared by
all labels, as `evidence.fewshot_inputs` resolves them) at the last position of
leave-one-out prompt i (batched, right-padded, gathered at the last real position); residual
r_i = v(y_i) − s_i; loss L(θ) = ‖r(θ)‖² / (2σ̂²) with σ̂² = ‖r(0)‖²/n (plug-in, unadapted
residuals). Plain gradient descent with η = ρσ̂²:

       Δ ← Δ − η ∇L = Δ + ρ Σ_i r_i ∇s_i,         ρ = c / λ_max(K),  K = ΦΦᵀ, Φ_i = ∇_θ s_i

over the selected heads of W_V (the paper's choice) or W_Q. To first order one step moves the
prompt predictions by ρKr (DESIGN §3). λ_max comes from `lambda_max` / `rho` if given, else from
the evidence module's exact LOO kernel of the selected blocks (`selected_kernel`). Label tokens and
LOO token sequences are `evidence.fewshot_inputs`'s, so s_i here is the s_i of that kernel.

Divergence rule (both modes). A step is *divergent* when its loss or gradient norm is not finite,
when its loss exceeds `divergence_factor` (10) × the unadapted loss of the same data — for qTTT
the same span's base NLL, known for free from the prefill logits, floored at 0.1 nat per token so
near-zero references cannot trigger on noise; for paper mode the unadapted LOO loss n/2 — or when
the evaluation after the update is not finite. The run then stops, discards the update that
produced the bad state and reports the last good deltas (those that gave a sane loss), and the
record says why. A run also stops when `stop` (a threading.Event or a callable) is set.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from contextlib import nullcontext

from ttt_core.attention import FrozenKV, forward_rows_with_frozen_kv, forward_with_frozen_kv, record_attention
from ttt_core.optim import AdamWConfig, DeltaAdamW, clip_grad_norm, global_grad_norm
from ttt_core.prompts import FewShotPrompt, LongContextPrompt, Prompt, parse_prompt

Key = tuple[int, str]
HeadSel = Sequence[tuple[int, int]] | None
StopLike = threading.Event | Callable[[], bool] | None

#: Default qTTT learning rate for the embedded SmolLM2-135M (measured; see module docstring, item 4).
DEFAULT_LR = 1e-4
#: The paper's learning-rate range for billion-scale models (App. D of Bansal et al.).
PAPER_LR_RANGE = (1e-6, 1e-5)
LOSS_FLOOR_PER_TOKEN = 0.1


# ============================================================================================
# Configuration and records
# ============================================================================================


@dataclass
class QTTTConfig:
    """qTTT settings (DESIGN §7.2). heads: (layer, query head) blocks of W_Q to update, None = all."""

    steps: int = 32
    span: int = 128
    lr: float = DEFAULT_LR
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip: float = 1.0
    heads: HeadSel = None
    seed: int = 0
    divergence_factor: float = 10.0
    max_new_tokens: int = 16
    eval_context_nll: bool = False  # one extra frozen-KV forward of the whole context per step


@dataclass
class PaperConfig:
    """Paper-mode settings (DESIGN §3, §7.1). ρ = rho if given, else c / lambda_max (λ_max of the
    selected blocks' LOO kernel, computed when not given). kind: "v" (the paper) or "q"."""

    steps: int = 8
    c: float = 0.1
    rho: float | None = None
    lambda_max: float | None = None
    kind: str = "v"
    heads: HeadSel = None
    divergence_factor: float = 10.0
    max_new_tokens: int = 8


@dataclass
class StepRecord:
    """What one step did. Step 0 (`run.baseline`) holds the unadapted metrics.

    loss: qTTT — summed span NLL at the deltas *before* this step's update; paper — ‖r‖²/(2σ̂²)
      before the update (n/2 at step 0). loss_per_token: qTTT loss / k (paper: ‖r‖²/n).
    Metrics (query_*, answer_*, needle_mass, context_nll) are evaluated *after* the update.
    delta_norms: ‖ΔW_l‖_F for every layer l (0 for layers not trained), after the update (after a
      divergence: of the restored last good deltas).
    step_s: seconds of the gradient and update (the span's forward too, unless the previous step's
      look-ahead ran it); eval_s: seconds of the metric forward after the update (with look-ahead it
      also runs the next step's span forward); wall_s = step_s + eval_s;
    elapsed_s: since the run began (prefill included).
    """

    step: int
    mode: str
    loss: float | None
    loss_per_token: float | None = None
    span_start: int | None = None
    span_len: int | None = None
    grad_norm: float | None = None
    step_s: float = 0.0
    eval_s: float = 0.0
    wall_s: float = 0.0
    elapsed_s: float = 0.0
    delta_norms: list[float] = field(default_factory=list)
    query_prediction: float | None = None
    query_error: float | None = None
    label_probs: dict[str, float] | None = None
    answer_nll: float | None = None
    answer_prob: float | None = None
    needle_mass: float | None = None
    context_nll: float | None = None
    prompt_predictions: list[float] | None = None
    backend: str = ""
    backend_label: str = ""
    status: str = "ok"  # "ok" | "diverged"
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DivergenceError(RuntimeError):
    """Raised by `run_to_end(..., raise_on_divergence=True)`."""


# ============================================================================================
# Tokenisation of a prompt into the pieces the engine needs
# ============================================================================================


@dataclass
class EncodedPrompt:
    """ids (1, N) = prompt tokens ‖ answer tokens. n_ctx: tokens of the context (qTTT spans live
    in rows 0 … n_ctx−2); n_prompt: tokens of the model input (context + question); answer_len:
    expected-answer tokens after it; needle: token indices overlapping marked needles."""

    ids: torch.Tensor
    n_ctx: int
    n_prompt: int
    answer_len: int
    needle: list[int]
    text: str


def encode_prompt(lm: Any, prompt: Prompt) -> EncodedPrompt:
    """Few-shot: the full prompt exactly as `evidence.fewshot_inputs` tokenises it (render() plus
    the labels' shared whitespace lead tokens). Long context: full_text() with
    `add_special_tokens=False` as the Home page does (offsets give the context/question boundary
    and the needle tokens), then " " + answer tokenised separately."""
    tok = lm.tokenizer
    if isinstance(prompt, FewShotPrompt):
        from ttt_core.evidence import fewshot_inputs

        text = prompt.render()
        ids = list(fewshot_inputs(lm, prompt).seqs[-1])  # the full prompt (+ shared label lead tokens)
        n_ctx = n_prompt = len(ids)
        needle: list[int] = []
        answer: list[int] = []
    else:
        text = prompt.full_text()
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offs = enc["offset_mapping"]
        n_prompt = len(ids)
        clen = len(prompt.context)
        n_ctx = sum(1 for s, e in offs if e <= clen) if prompt.question is not None else n_prompt
        needle = [i for i, (s, e) in enumerate(offs) if any(s < ne and e > ns for ns, ne in prompt.needle_spans)]
        answer = list(tok(" " + prompt.answer, add_special_tokens=False)["input_ids"]) if prompt.answer else []
    if n_ctx < 2:
        raise ValueError("the context has fewer than 2 tokens: nothing to adapt on")
    all_ids = torch.tensor([ids + answer], dtype=torch.long, device=lm.device)
    return EncodedPrompt(ids=all_ids, n_ctx=n_ctx, n_prompt=n_prompt, answer_len=len(answer), needle=needle, text=text)


def label_tokens(lm: Any, prompt: FewShotPrompt) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(labels, token ids (n_labels,), values (n_labels,) fp32): the label token of every label y
    and its value v(y) ∈ [0, 1] (DESIGN §7.1), resolved exactly as `evidence.fewshot_inputs` does
    (first token of label_prefix()+y after whitespace tokens shared by all labels, which are
    appended to every prompt instead), so paper mode's s_i is the evidence kernel's s_i."""
    from ttt_core.evidence import fewshot_inputs

    fs = fewshot_inputs(lm, prompt)
    return (list(fs.labels), torch.tensor(fs.label_ids, device=lm.device),
            torch.tensor(fs.label_values, dtype=torch.float32, device=lm.device))


# ============================================================================================
# Pieces shared by both modes
# ============================================================================================


def head_masks(lm: Any, kind: str, heads: HeadSel) -> dict[Key, torch.Tensor | None]:
    """Trained keys → (out, 1) fp32 row mask of the selected heads (None = the whole layer).
    heads None = every head of every layer."""
    a = lm.adapter
    n_heads = a.heads_of(kind)
    if heads is None:
        return {(layer, kind): None for layer in range(a.n_layers)}
    by_layer: dict[int, set[int]] = {}
    for layer, head in heads:
        if not 0 <= int(layer) < a.n_layers or not 0 <= int(head) < n_heads:
            raise ValueError(f"head L{layer}.H{head} out of range ({a.n_layers} layers × {n_heads} {kind} heads)")
        by_layer.setdefault(int(layer), set()).add(int(head))
    if not by_layer:
        raise ValueError("no heads selected")
    out: dict[Key, torch.Tensor | None] = {}
    for layer, hs in sorted(by_layer.items()):
        if len(hs) == n_heads:
            out[(layer, kind)] = None
            continue
        m = torch.zeros(a.spec(layer, kind).out_features, 1, device=lm.device)
        for h in hs:
            m[a.head_slice(kind, h)] = 1.0
        out[(layer, kind)] = m
    return out


def _effective(deltas: dict[Key, torch.Tensor], masks: dict[Key, torch.Tensor | None]) -> dict[Key, torch.Tensor]:
    return {k: (d if masks.get(k) is None else d * masks[k]) for k, d in deltas.items()}


def _layer_norms(n_layers: int, deltas: dict[Key, torch.Tensor]) -> list[float]:
    out = [0.0] * n_layers
    for (layer, _), d in deltas.items():
        out[layer] = float(d.detach().float().norm())
    return out


def _finite(x: float | None) -> bool:
    return x is None or math.isfinite(x)


def _all_finite(deltas: dict[Key, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(d).all()) for d in deltas.values())


def _backend(device: torch.device) -> tuple[str, str]:
    """(backend, label) of the frozen-KV kernel for tensors on `device`."""
    from kernels import backend_label, current_backend

    backend, label = current_backend(), backend_label()
    if device.type != "cuda" and backend == "triton":
        import os

        if os.environ.get("TTT_LENS_KERNELS", "auto").strip().lower() in ("", "auto"):
            backend, label = "torch", "PyTorch reference on CPU"
    return backend, label


def _should_stop(stop: StopLike) -> bool:
    if stop is None:
        return False
    if isinstance(stop, threading.Event):
        return stop.is_set()
    return bool(stop())


def span_loss_and_grads(lm: Any, cache: FrozenKV, ids: torch.Tensor, start: int, span: int,
                        deltas: dict[Key, torch.Tensor], masks: dict[Key, torch.Tensor | None] | None = None,
                        need_grad: bool = True) -> tuple[torch.Tensor, dict[Key, torch.Tensor] | None]:
    """The qTTT span loss and its W_Q gradient (DESIGN §7.2).

    ids (1, N) with the frozen `cache` of all N tokens; rows start … start+span−1 predict tokens
    start+1 … start+span. Returns (L = Σ NLL (fp32 scalar), {key: ∂L/∂Δ (out, in) fp32}) — the
    gradient is None when `need_grad` is False or L is not finite. Gradients of rows outside the
    mask are exactly 0 (Δ enters as Δ ⊙ M)."""
    masks = masks or {}
    leaves = {k: d.detach().requires_grad_(need_grad) for k, d in deltas.items()}
    rows = ids[:, start:start + span]
    targets = ids[0, start + 1:start + span + 1]
    with torch.enable_grad() if need_grad else torch.no_grad():
        with lm.adapter.apply(deltas=_effective(leaves, masks)):
            out = forward_with_frozen_kv(lm.model, rows, cache, start)
        loss = F.cross_entropy(out.logits[0].float(), targets, reduction="sum")
        if not need_grad or not torch.isfinite(loss):
            return loss.detach(), None
        grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), {k: g for k, g in zip(leaves, grads)}


def _greedy(lm: Any, prompt_ids: torch.Tensor, deltas: dict[Key, torch.Tensor] | None, template: Any,
            max_new_tokens: int) -> str:
    """Greedy decode of up to `max_new_tokens`. `template` is a DynamicCache of prompt_ids[:, :-1]
    computed with the base weights; a deep copy is extended, so the context's K/V stay frozen and
    only the last prompt token and new tokens are computed with the (adapted) weights. Stops at
    EOS or at a newline after some text; returns the stripped first line."""
    from transformers import DynamicCache

    tok = lm.tokenizer
    eos = tok.eos_token_id
    cache = copy.deepcopy(template) if template is not None else DynamicCache()
    pos = prompt_ids.shape[1] - 1
    cur = prompt_ids[:, -1:]
    new: list[int] = []
    with torch.no_grad(), lm.adapter.apply(deltas=deltas or {}):
        for _ in range(max_new_tokens):
            out = lm.model(input_ids=cur, past_key_values=cache, use_cache=True,
                           position_ids=torch.tensor([[pos]], device=prompt_ids.device))
            nxt = int(out.logits[0, -1].argmax())
            if eos is not None and nxt == eos:
                break
            new.append(nxt)
            text = tok.decode(new, skip_special_tokens=True)
            if "\n" in text.lstrip():
                break
            cur = torch.tensor([[nxt]], device=prompt_ids.device)
            pos += 1
    return tok.decode(new, skip_special_tokens=True).strip().split("\n")[0].strip()


# ============================================================================================
# The run skeleton (both modes)
# ============================================================================================


class _Run:
    """Skeleton shared by both modes: prepare → loop of (loss+grad, update, evaluate) with the
    divergence rule and the stop flag (module docstring). Subclasses implement `_prepare`,
    `_loss_grads`, `_update`, `_evaluate`, `_reference_loss`.

    Look-ahead: the metrics after step t's update and the loss of step t+1 are computed at the
    same deltas, so `_evaluate(new, lookahead=True)` may run both in ONE forward (with the graph
    kept) and leave it in `_pending`; step t+1's `_loss_grads` then only back-propagates. Results
    are those of separate passes (the same rows at the same deltas); a step's forward is then
    timed in the previous record's `eval_s`."""

    mode = ""

    def __init__(self, lm: Any, prompt: Prompt | str, config: Any, stop: StopLike = None) -> None:
        self.lm = lm
        self.prompt: Prompt = parse_prompt(prompt) if isinstance(prompt, str) else prompt
        self.config = config
        self._stop_external = stop
        self._stop_event = threading.Event()
        self.records: list[StepRecord] = []
        self.baseline: StepRecord | None = None
        self.status = "new"  # new | running | done | stopped | diverged
        self.reason: str | None = None
        self.deltas: dict[Key, torch.Tensor] = {}  # last good deltas (fp32 master copies)
        self.masks: dict[Key, torch.Tensor | None] = {}
        self._prepared = False
        self._pending: Any = None  # look-ahead: the next step's forward, run with the evaluation
        self.lookahead = True      # False: every step runs its own forward (same results, slower)
        self._gnorm: float | None = None  # this step's gradient norm, reused by the clipping
        self._t0 = 0.0
        self.backend, self.backend_label = "", ""

    # ------------------------------------------------------------------ public
    def request_stop(self) -> None:
        """Ask a running `steps()` loop to stop before its next step (thread-safe)."""
        self._stop_event.set()

    def prepare(self) -> StepRecord:
        """Prefill / set-up (idempotent); returns the step-0 record of unadapted metrics."""
        if not self._prepared:
            self._t0 = time.perf_counter()
            self._prepare()
            self._prepared = True
            metrics = self._evaluate({})
            self.baseline = StepRecord(step=0, mode=self.mode, loss=self._baseline_loss(),
                                       loss_per_token=self._baseline_loss_per_token(),
                                       delta_norms=[0.0] * self.lm.adapter.n_layers,
                                       elapsed_s=time.perf_counter() - self._t0, backend=self.backend,
                                       backend_label=self.backend_label, **metrics)
        assert self.baseline is not None
        return self.baseline

    def steps(self) -> Iterator[StepRecord]:
        """Run the configured number of steps, yielding a StepRecord after each. Stops early on a
        stop request or a divergent step (then `status`/`reason` say why)."""
        try:
            yield from self._steps()
        finally:
            self._pending = None  # a look-ahead forward nobody will back-propagate

    def _steps(self) -> Iterator[StepRecord]:
        self.prepare()
        if self.status == "diverged":
            return
        self.status = "running"
        n_layers = self.lm.adapter.n_layers
        prev = cur = self.deltas
        last_metrics = self._metrics_of(self.baseline)
        for t in range(len(self.records) + 1, self.config.steps + 1):
            if self._stop_event.is_set() or _should_stop(self._stop_external):
                self.status, self.reason = "stopped", f"stopped on request after {t - 1} step(s)"
                return
            ts = time.perf_counter()
            loss, grads, info = self._loss_grads(cur, t)
            lossf = float(loss)
            ref = self._reference_loss(info)
            why = None
            if not math.isfinite(lossf):
                why = f"step {t}: the loss is {lossf} (not finite)"
            elif lossf > self.config.divergence_factor * ref:
                why = (f"step {t}: the loss {lossf:.4g} exceeds {self.config.divergence_factor:g}× the unadapted "
                       f"loss of the same data ({ref:.4g})")
            if why is not None:  # `cur` is bad: discard the update that produced it
                self.deltas = prev
                yield self._diverged(t, lossf, None, why, prev, last_metrics, ts, info)
                return
            self.deltas = cur  # verified: gave a sane loss
            gnorm = global_grad_norm(grads) if grads else 0.0
            self._gnorm = gnorm
            if not math.isfinite(gnorm):
                yield self._diverged(t, lossf, gnorm, f"step {t}: the gradient norm is {gnorm} (not finite)",
                                     cur, last_metrics, ts, info)
                return
            new = self._update(cur, grads)
            if not _all_finite(new):
                yield self._diverged(t, lossf, gnorm, f"step {t}: the update produced non-finite weights",
                                     cur, last_metrics, ts, info)
                return
            step_s = time.perf_counter() - ts
            te = time.perf_counter()
            ahead = self.lookahead and t < self.config.steps and not self._stop_event.is_set()
            metrics = self._evaluate(new, lookahead=ahead)
            eval_s = time.perf_counter() - te
            bad = [k for k in ("answer_nll", "query_error", "context_nll") if not _finite(metrics.get(k))]
            if bad:
                yield self._diverged(t, lossf, gnorm, f"step {t}: after the update {bad[0]} is not finite",
                                     cur, last_metrics, ts, info)
                return
            prev, cur = cur, new
            self.deltas = cur
            last_metrics = metrics
            rec = StepRecord(step=t, mode=self.mode, loss=lossf, loss_per_token=info.get("per_token", lossf),
                             span_start=info.get("start"), span_len=info.get("span"), grad_norm=gnorm,
                             step_s=step_s, eval_s=eval_s, wall_s=step_s + eval_s,
                             elapsed_s=time.perf_counter() - self._t0, delta_norms=_layer_norms(n_layers, cur),
                             backend=self.backend, backend_label=self.backend_label, **metrics)
            self.records.append(rec)
            yield rec
        self.status = "done"

    __iter__ = steps

    def run_to_end(self, raise_on_divergence: bool = False) -> list[StepRecord]:
        """Consume `steps()`; returns the records (DivergenceError if asked and it diverged)."""
        for _ in self.steps():
            pass
        if raise_on_divergence and self.status == "diverged":
            raise DivergenceError(self.reason or "diverged")
        return self.records

    def delta_norms(self) -> list[float]:
        return _layer_norms(self.lm.adapter.n_layers, self.deltas)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _metrics_of(rec: StepRecord | None) -> dict[str, Any]:
        keys = ("query_prediction", "query_error", "label_probs", "answer_nll", "answer_prob", "needle_mass",
                "context_nll", "prompt_predictions")
        return {k: getattr(rec, k) for k in keys} if rec is not None else {}

    def _diverged(self, t: int, loss: float, gnorm: float | None, why: str, keep: dict[Key, torch.Tensor],
                  metrics: dict[str, Any], ts: float, info: dict[str, Any]) -> StepRecord:
        self.deltas = keep
        self.status, self.reason = "diverged", why + "; the run stopped and kept the last good deltas"
        step_s = time.perf_counter() - ts
        rec = StepRecord(step=t, mode=self.mode, loss=loss, loss_per_token=info.get("per_token"),
                         span_start=info.get("start"), span_len=info.get("span"), grad_norm=gnorm, step_s=step_s,
                         wall_s=step_s, elapsed_s=time.perf_counter() - self._t0,
                         delta_norms=_layer_norms(self.lm.adapter.n_layers, keep), backend=self.backend,
                         backend_label=self.backend_label, status="diverged", reason=self.reason, **metrics)
        self.records.append(rec)
        return rec

    # subclasses
    def _prepare(self) -> None: ...
    def _loss_grads(self, deltas: dict[Key, torch.Tensor], t: int) -> tuple[torch.Tensor, dict | None, dict]: ...
    def _update(self, deltas: dict[Key, torch.Tensor], grads: dict) -> dict[Key, torch.Tensor]: ...
    def _evaluate(self, deltas: dict[Key, torch.Tensor], lookahead: bool = False) -> dict[str, Any]: ...
    def _reference_loss(self, info: dict[str, Any]) -> float: ...
    def _baseline_loss(self) -> float | None: ...
    def _baseline_loss_per_token(self) -> float | None: ...


# ============================================================================================
# qTTT mode
# ============================================================================================


class QTTTRun(_Run):
    """Query-only TTT on one prompt (module docstring; DESIGN §7.2).

    Usage::

        run = QTTTRun(lm, prompt, QTTTConfig(steps=32, span=128, lr=1e-4))
        base = run.prepare()                 # prefill + step-0 metrics
        for rec in run.steps(): ...          # one StepRecord per step
        run.deltas                           # {(layer, "q"): ΔW_Q (out, in) fp32}
        run.generate(adapted=False), run.generate(adapted=True)
    """

    mode = "qttt"

    def __init__(self, lm: Any, prompt: Prompt | str, config: QTTTConfig | None = None, stop: StopLike = None) -> None:
        super().__init__(lm, prompt, config or QTTTConfig(), stop)

    @property
    def span(self) -> int:
        """k clamped to the context: at most n_ctx − 1 rows have a next token inside the context."""
        return max(1, min(int(self.config.span), self.enc.n_ctx - 1))

    def _prepare(self) -> None:
        lm = self.lm
        self.backend, self.backend_label = _backend(lm.device)
        self.enc = encode_prompt(lm, self.prompt)
        self.masks = head_masks(lm, "q", self.config.heads)
        base = {k: lm.adapter.logical_weight(*k) for k in self.masks}
        self.deltas = {k: torch.zeros(w.shape, dtype=torch.float32, device=lm.device) for k, w in base.items()}
        self.opt = DeltaAdamW(base, AdamWConfig(lr=self.config.lr, betas=tuple(self.config.betas),
                                                eps=self.config.eps, weight_decay=self.config.weight_decay), self.masks)
        self._gen = torch.Generator().manual_seed(int(self.config.seed))
        ids = self.enc.ids
        with torch.no_grad():
            out = lm.model.get_decoder()(input_ids=ids, use_cache=True)
            pkv = out.past_key_values
            self.cache = FrozenKV(keys=[layer.keys for layer in pkv.layers], values=[layer.values for layer in pkv.layers])
            head = lm.model.get_output_embeddings()
            hidden = out.last_hidden_state[0, : self.enc.n_ctx - 1]
            targets = ids[0, 1:self.enc.n_ctx]
            nll = [F.cross_entropy(head(hidden[i:i + 512]).float(), targets[i:i + 512], reduction="none")
                   for i in range(0, hidden.shape[0], 512)]
            self.base_token_nll = torch.cat(nll).cpu()  # (n_ctx − 1,) per-token NLL of the unadapted model
            template = copy.deepcopy(pkv)
            template.crop(-(ids.shape[1] - (self.enc.n_prompt - 1)))
            self._decode_template = template
        if isinstance(self.prompt, FewShotPrompt):
            self.labels, self.label_ids, self.label_values = label_tokens(lm, self.prompt)

    def _baseline_loss(self) -> float:
        return float(self.base_token_nll.mean()) * self.span

    def _baseline_loss_per_token(self) -> float:
        return float(self.base_token_nll.mean())

    def _reference_loss(self, info: dict[str, Any]) -> float:
        s, k = info["start"], info["span"]
        ref = float(self.base_token_nll[s:s + k].sum())
        return max(ref, LOSS_FLOOR_PER_TOKEN * k)

    def _draw_start(self) -> int:
        hi = self.enc.n_ctx - 1 - self.span  # start ∈ {0, …, hi}: the last target is token n_ctx − 1
        return int(torch.randint(0, hi + 1, (1,), generator=self._gen))

    def _loss_grads(self, deltas, t):
        k = self.span
        pend, self._pending = self._pending, None
        if pend is not None and pend["deltas"] is deltas:   # forward already run by the look-ahead
            start, loss = pend["start"], pend["loss"]
            grads = None
            if torch.isfinite(loss):
                g = torch.autograd.grad(loss, list(pend["leaves"].values()))
                grads = dict(zip(pend["leaves"], g))
            loss = loss.detach()
        else:
            start = pend["start"] if pend is not None else self._draw_start()
            loss, grads = span_loss_and_grads(self.lm, self.cache, self.enc.ids, start, k, deltas, self.masks)
        return loss, grads, {"start": start, "span": k, "per_token": float(loss) / k}

    def _update(self, deltas, grads):
        clipped, _ = clip_grad_norm(grads, self.config.clip, norm=self._gnorm)
        return self.opt.step(deltas, clipped)

    def _eval_rows(self) -> tuple[int, int] | None:
        """(first row, rows) of the forward behind the metrics, None when no metric needs one:
        the query row (few-shot), or the rows predicting the answer (≥ 1) when the prompt has a
        question or a marked needle."""
        row0 = self.enc.n_prompt - 1
        if isinstance(self.prompt, FewShotPrompt):
            return row0, 1
        if self.prompt.question is not None or self.enc.needle:
            return row0, max(1, self.enc.answer_len)
        return None

    def _row_metrics(self, logits: torch.Tensor, rec: dict | None) -> dict[str, Any]:
        """Metrics from the evaluation rows' logits (m, V) and, for a marked needle, the attention
        probabilities recorded for those rows."""
        enc, res = self.enc, {}
        if isinstance(self.prompt, FewShotPrompt):
            res.update(_label_metrics(logits[-1], self.labels, self.label_ids, self.label_values, self.prompt))
            return res
        if rec is not None:
            idx = torch.tensor(enc.needle, device=logits.device)
            layers = [v for key, v in rec.items() if isinstance(key, int)]
            mass = [probs[0, :, 0].index_select(-1, idx).sum(-1).mean() for probs in layers]
            res["needle_mass"] = float(torch.stack(mass).mean()) if mass else None
        if enc.answer_len:
            tgt = enc.ids[0, enc.n_prompt:enc.n_prompt + enc.answer_len]
            nll = float(F.cross_entropy(logits[:enc.answer_len].float(), tgt, reduction="sum"))
            res["answer_nll"] = nll
            res["answer_prob"] = math.exp(-nll) if math.isfinite(nll) else float("nan")
        return res

    @torch.no_grad()
    def _evaluate(self, deltas, lookahead: bool = False) -> dict[str, Any]:
        """Metrics with the (adapted) W_Q against the frozen cache of the full text. With
        `lookahead`, the same forward also runs the next step's span (class `_Run` docstring)."""
        lm, enc = self.lm, self.enc
        res: dict[str, Any] = {}
        rows = self._eval_rows()
        want_needle = bool(enc.needle) and not isinstance(self.prompt, FewShotPrompt)
        if rows is not None and lookahead:
            k, start = self.span, self._draw_start()
            leaves = {key: d.detach().requires_grad_(True) for key, d in deltas.items()}
            with torch.enable_grad(), lm.adapter.apply(deltas=_effective(leaves, self.masks)):
                with record_attention() if want_needle else nullcontext() as rec:
                    out = forward_rows_with_frozen_kv(lm.model, enc.ids, self.cache, [(start, k), rows])
                loss = F.cross_entropy(out.logits[0, :k].float(), enc.ids[0, start + 1:start + k + 1], reduction="sum")
            self._pending = {"deltas": deltas, "start": start, "loss": loss, "leaves": leaves}
            res.update(self._row_metrics(out.logits[0, k:].detach(), rec))
        elif rows is not None:
            with lm.adapter.apply(deltas=_effective(deltas, self.masks)):
                with record_attention() if want_needle else nullcontext() as rec:
                    out = forward_with_frozen_kv(lm.model, enc.ids[:, rows[0]:rows[0] + rows[1]], self.cache, rows[0])
            res.update(self._row_metrics(out.logits[0], rec))
        if self.config.eval_context_nll:
            res["context_nll"] = self.context_nll(deltas)
        return res

    @torch.no_grad()
    def context_nll(self, deltas: dict[Key, torch.Tensor] | None = None, chunk: int = 256) -> float:
        """Mean next-token NLL over the whole context with W_Q + Δ against the frozen cache."""
        eff = _effective(deltas if deltas is not None else self.deltas, self.masks)
        ids, n = self.enc.ids, self.enc.n_ctx - 1
        total = 0.0
        with self.lm.adapter.apply(deltas=eff):
            for s in range(0, n, chunk):
                m = min(chunk, n - s)
                out = forward_with_frozen_kv(self.lm.model, ids[:, s:s + m], self.cache, s)
                total += float(F.cross_entropy(out.logits[0].float(), ids[0, s + 1:s + m + 1], reduction="sum"))
        return total / n

    def generate(self, adapted: bool = True, max_new_tokens: int | None = None) -> str:
        """Greedy answer: context prefilled with the base weights (frozen K/V), decoding with the
        adapted W_Q when `adapted` (the run's last good deltas)."""
        self.prepare()
        prompt_ids = self.enc.ids[:, : self.enc.n_prompt]
        deltas = _effective(self.deltas, self.masks) if adapted else None
        return _greedy(self.lm, prompt_ids, deltas, self._decode_template,
                       max_new_tokens or self.config.max_new_tokens)

    def label_distribution(self, adapted: bool = True) -> dict[str, float] | None:
        """Few-shot only: label → probability at the query (restricted softmax), before/after."""
        if not isinstance(self.prompt, FewShotPrompt):
            return None
        self.prepare()
        return self._evaluate(self.deltas if adapted else {})["label_probs"]


def _label_metrics(logits: torch.Tensor, labels: list[str], label_ids: torch.Tensor, values: torch.Tensor,
                   prompt: FewShotPrompt) -> dict[str, Any]:
    """Restricted softmax over the label tokens → label_probs, expected value s_x and, when the
    query's label is known, the squared error (s_x − v(y_x))² (DESIGN §7.1)."""
    p = torch.softmax(logits.float().index_select(-1, label_ids), dim=-1)
    s = float((p * values).sum())
    res: dict[str, Any] = {"label_probs": {y: float(q) for y, q in zip(labels, p)}, "query_prediction": s}
    target = prompt.target_value(prompt.query_y)
    if target is not None:
        res["query_error"] = (s - target) ** 2
    return res


# ============================================================================================
# Paper mode
# ============================================================================================


def loo_batch(lm: Any, prompt: FewShotPrompt) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The n leave-one-out prompts (tokenised by `evidence.fewshot_inputs`), right-padded:
    (ids (n, L), attention mask (n, L), index of the last real token (n,))."""
    from ttt_core.evidence import fewshot_inputs

    tok = lm.tokenizer
    seqs = fewshot_inputs(lm, prompt).seqs[:-1]
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids = torch.full((len(seqs), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    last = torch.tensor([len(s) - 1 for s in seqs])
    return ids.to(lm.device), mask.to(lm.device), last.to(lm.device)


def loo_predictions(lm: Any, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], label_ids: torch.Tensor,
                    values: torch.Tensor, deltas: dict[Key, torch.Tensor]) -> torch.Tensor:
    """s (n,) fp32: s_i = Σ_y v(y)·softmax(logits[label tokens])_y at the last real position of
    LOO prompt i, with W0 + Δ (differentiable in the deltas)."""
    ids, mask, last = batch
    with lm.adapter.apply(deltas=deltas):
        logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    rows = logits[torch.arange(ids.shape[0], device=ids.device), last].float()
    p = torch.softmax(rows.index_select(-1, label_ids), dim=-1)
    return p @ values


def selected_kernel(lm: Any, prompt: FewShotPrompt, kind: str = "v", heads: HeadSel = None) -> tuple[np.ndarray, np.ndarray]:
    """The prompt kernel of the selected blocks from the evidence module (exact LOO autograd
    route, DESIGN §2): K = Σ_{(l,h) selected} K^(l,h) (n, n) float64, and the unadapted residuals
    r (n,). heads None = every head of `kind` in every layer."""
    from ttt_core.evidence import compute_evidence

    ev = compute_evidence(lm, prompt, subspace=kind)
    K = np.zeros((ev.n, ev.n))
    if heads is None:
        for layer in range(ev.n_layers):
            K += ev.layer_kernel(layer)
    else:
        by_layer: dict[int, list[int]] = {}
        for layer, h in heads:
            by_layer.setdefault(int(layer), []).append(int(h))
        for layer, hs in by_layer.items():
            K += ev.factors[layer].head_kernels(sorted(set(hs))).sum(0).double().cpu().numpy()
    return 0.5 * (K + K.T), np.asarray(ev.residuals, dtype=float)


class PaperRun(_Run):
    """The paper's TTT: plain GD on the squared LOO loss of a few-shot prompt (module docstring;
    DESIGN §3, §7.1). run.rho, run.lambda_max, run.sigma2, run.eta say what was used;
    run.rho_source says where ρ came from."""

    mode = "paper"

    def __init__(self, lm: Any, prompt: Prompt | str, config: PaperConfig | None = None, stop: StopLike = None) -> None:
        super().__init__(lm, prompt, config or PaperConfig(), stop)
        if not isinstance(self.prompt, FewShotPrompt):
            raise ValueError("paper mode needs a few-shot prompt (x -> y lines): its loss is the leave-one-out "
                             "squared error of the demonstrations (DESIGN §7.1). Use qTTT for long contexts.")
        if self.config.kind not in ("v", "q"):
            raise ValueError("paper mode updates W_V (the paper) or W_Q: kind must be 'v' or 'q'")

    def _prepare(self) -> None:
        lm, cfg = self.lm, self.config
        p: FewShotPrompt = self.prompt
        self.backend, self.backend_label = "torch-sdpa", "PyTorch SDPA (paper mode: full forward, no frozen cache)"
        self.labels, self.label_ids, self.label_values = label_tokens(lm, p)
        self.batch = loo_batch(lm, p)
        self.y = self.label_values.new_tensor([p.label_values()[y] for _, y in p.demos])
        self.masks = head_masks(lm, cfg.kind, cfg.heads)
        self.deltas = {k: torch.zeros(lm.adapter.spec(*k).out_features, lm.adapter.spec(*k).in_features,
                                      device=lm.device) for k in self.masks}
        from ttt_core.evidence import fewshot_inputs

        self.query_ids = torch.tensor([fewshot_inputs(lm, p).seqs[-1]], device=lm.device)
        with torch.no_grad():
            s0 = loo_predictions(lm, self.batch, self.label_ids, self.label_values, {})
        r0 = self.y - s0
        self.n = int(r0.shape[0])
        self.sigma2 = max(float((r0 ** 2).sum()) / self.n, 1e-12)  # σ̂² = ‖r0‖²/n (plug-in)
        if cfg.rho is not None:
            self.rho, self.lambda_max, self.rho_source = float(cfg.rho), cfg.lambda_max, "given ρ"
        else:
            lam, src = cfg.lambda_max, "given λ_max"
            if lam is None:
                K, _ = selected_kernel(lm, p, cfg.kind, cfg.heads)
                lam, src = float(np.linalg.eigvalsh(K)[-1]), "evidence kernel of the selected blocks"
            self.lambda_max, self.rho_source = float(lam), src
            self.rho = float(cfg.c) / max(self.lambda_max, 1e-30)
        self.eta = self.rho * self.sigma2

    def _baseline_loss(self) -> float:
        return self.n / 2.0  # ‖r0‖²/(2σ̂²) = n/2

    def _baseline_loss_per_token(self) -> float:
        return self.sigma2

    def _reference_loss(self, info: dict[str, Any]) -> float:
        return self.n / 2.0

    def _loo_forward(self, deltas) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """LOO predictions s (n,) at deltas with the graph kept: (leaves, s, ½‖r‖²)."""
        leaves = {k: d.detach().requires_grad_(True) for k, d in deltas.items()}
        with torch.enable_grad():
            s = loo_predictions(self.lm, self.batch, self.label_ids, self.label_values, _effective(leaves, self.masks))
            half_sq = 0.5 * ((self.y - s) ** 2).sum()  # ½‖r‖²; L = ½‖r‖²/σ̂²
        return leaves, s, half_sq

    def _loss_grads(self, deltas, t):
        pend, self._pending = self._pending, None
        if pend is not None and pend["deltas"] is deltas:   # forward already run by the look-ahead
            leaves, s, half_sq = pend["leaves"], pend["s"], pend["half_sq"]
        else:
            leaves, s, half_sq = self._loo_forward(deltas)
        r = (self.y - s).detach()
        loss = half_sq.detach() / self.sigma2
        if not torch.isfinite(loss):
            return loss, None, {"per_token": float("nan")}
        grads = torch.autograd.grad(half_sq, list(leaves.values()))
        info = {"per_token": float((r ** 2).mean()), "s": s.detach().cpu().tolist()}
        return loss, {k: g for k, g in zip(leaves, grads)}, info

    def _update(self, deltas, grads):
        # Δ ← Δ − η∇L = Δ − ρ∇(½‖r‖²) = Δ + ρ Σ r_i ∇s_i   (DESIGN §3)
        return {k: d - self.rho * grads[k].float() for k, d in deltas.items()}

    @torch.no_grad()
    def _evaluate(self, deltas, lookahead: bool = False) -> dict[str, Any]:
        """Query metrics and the LOO predictions at `deltas`; with `lookahead` the LOO forward keeps
        its graph for the next step's gradient (class `_Run` docstring)."""
        eff = _effective(deltas, self.masks)
        with self.lm.adapter.apply(deltas=eff):
            logits = self.lm.model(input_ids=self.query_ids, use_cache=False).logits[0, -1]
        res = _label_metrics(logits, self.labels, self.label_ids, self.label_values, self.prompt)
        if lookahead:
            leaves, s, half_sq = self._loo_forward(deltas)
            self._pending = {"deltas": deltas, "leaves": leaves, "s": s, "half_sq": half_sq}
            res["prompt_predictions"] = s.detach().cpu().tolist()
        else:
            res["prompt_predictions"] = loo_predictions(self.lm, self.batch, self.label_ids, self.label_values,
                                                        eff).cpu().tolist()
        return res

    def loo_predictions(self, deltas: dict[Key, torch.Tensor] | None = None) -> torch.Tensor:
        """s (n,) at W0 + Δ (default: the run's last good deltas)."""
        self.prepare()
        with torch.no_grad():
            return loo_predictions(self.lm, self.batch, self.label_ids, self.label_values,
                                   _effective(self.deltas if deltas is None else deltas, self.masks))

    def generate(self, adapted: bool = True, max_new_tokens: int | None = None) -> str:
        """Greedy answer with W0 + Δ everywhere (W_V changes the K/V, so no frozen cache here)."""
        self.prepare()
        deltas = _effective(self.deltas, self.masks) if adapted else None
        return _greedy_full(self.lm, self.query_ids, deltas, max_new_tokens or self.config.max_new_tokens)

    def label_distribution(self, adapted: bool = True) -> dict[str, float]:
        self.prepare()
        return self._evaluate(self.deltas if adapted else {})["label_probs"]


def _greedy_full(lm: Any, prompt_ids: torch.Tensor, deltas: dict[Key, torch.Tensor] | None, max_new_tokens: int) -> str:
    """Greedy decode with the deltas active for every token (prefill included)."""
    template = None
    if prompt_ids.shape[1] > 1:
        with torch.no_grad(), lm.adapter.apply(deltas=deltas or {}):
            template = lm.model.get_decoder()(input_ids=prompt_ids[:, :-1], use_cache=True).past_key_values
    return _greedy(lm, prompt_ids, deltas, template, max_new_tokens)


# ============================================================================================
# Convenience entry points
# ============================================================================================


def make_run(lm: Any, prompt: Prompt | str, mode: str = "qttt", config: QTTTConfig | PaperConfig | None = None,
             stop: StopLike = None) -> QTTTRun | PaperRun:
    """A run of `mode` ("qttt" | "paper")."""
    if mode == "qttt":
        return QTTTRun(lm, prompt, config, stop)  # type: ignore[arg-type]
    if mode == "paper":
        return PaperRun(lm, prompt, config, stop)  # type: ignore[arg-type]
    raise ValueError(f"unknown mode {mode!r}: use 'qttt' or 'paper'")


def run_qttt(lm: Any, prompt: Prompt | str, config: QTTTConfig | None = None, stop: StopLike = None) -> Iterator[StepRecord]:
    """Generator of qTTT StepRecords (see QTTTRun for access to the deltas and generation)."""
    yield from QTTTRun(lm, prompt, config, stop).steps()


def run_paper(lm: Any, prompt: Prompt | str, config: PaperConfig | None = None, stop: StopLike = None) -> Iterator[StepRecord]:
    """Generator of paper-mode StepRecords (see PaperRun)."""
    yield from PaperRun(lm, prompt, config, stop).steps()


def parse_head_label(label: str) -> tuple[int, int]:
    """"L{layer}.H{head}" → (layer, head)."""
    try:
        a, b = label.strip().upper().split(".")
        assert a[0] == "L" and b[0] == "H"
        return int(a[1:]), int(b[1:])
    except Exception as exc:
        raise ValueError(f"not a head label {label!r}; expected 'L<layer>.H<head>'") from exc


def head_label(layer: int, head: int) -> str:
    return f"L{layer}.H{head}"
