"""Query-only TTT, qTTT (Bansal et al., Alg. 1; DESIGN §2, §7.2), on the shared run template
(`ttt_core.engine`: isolation, step records, the divergence rule).

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
"""

from __future__ import annotations

import copy
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kernels import backend_label, current_backend
from ttt_core import memory_guard
from ttt_core.attention import FrozenKV, forward_rows_with_frozen_kv, forward_with_frozen_kv, record_attention
from ttt_core.encoding import FewShotEncoding, encode, encode_few_shot
from ttt_core.engine import EngineRun, effective_deltas, greedy_decode, head_masks
from ttt_core.models import LoadedModel
from ttt_core.optim import AdamWConfig, DeltaAdamW, clip_grad_norm
from ttt_core.prompts import FewShotPrompt, Prompt
from ttt_core.readout import FewShotReadout
from ttt_core.types import HeadSel, Key, StopLike

#: Default qTTT learning rate for the embedded SmolLM2-135M (measured; see module docstring, item 4).
DEFAULT_LR = 1e-4
#: The paper's learning-rate range for billion-scale models (App. D of Bansal et al.).
PAPER_LR_RANGE = (1e-6, 1e-5)
LOSS_FLOOR_PER_TOKEN = 0.1


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


def kernel_backend(device: torch.device) -> tuple[str, str]:
    """(backend, label) of the frozen-KV kernel for tensors on `device`."""
    backend, label = current_backend(), backend_label()
    if device.type != "cuda" and backend == "triton":
        if os.environ.get("TTT_LENS_KERNELS", "auto").strip().lower() in ("", "auto"):
            backend, label = "torch", "PyTorch reference on CPU"
    return backend, label


@dataclass
class QTTTInputs:
    """What the engine trains on, from `encoding.encode`: ids (1, N) = prompt ‖ expected answer;
    n_ctx: context tokens (spans live in rows 0 … n_ctx − 2); n_prompt: tokens of the model input
    (context + question); answer_len: expected-answer tokens after it; needle: token indices of a
    marked needle; text: the model input text."""

    ids: torch.Tensor
    n_ctx: int
    n_prompt: int
    answer_len: int
    needle: list[int]
    text: str


def qttt_inputs(lm: LoadedModel, prompt: Prompt) -> QTTTInputs:
    """The engine's view of `encode(lm, prompt)`: a few-shot prompt is all context (its full
    prompt's ids); a long context trains on its context rows and scores the answer rows."""
    enc = encode(lm, prompt)
    if isinstance(enc, FewShotEncoding):
        ids, n_ctx, n_prompt, answer, needle = enc.ids, len(enc.ids), len(enc.ids), 0, []
    else:
        ids, n_ctx, n_prompt, answer, needle = enc.train_ids, enc.n_context, enc.n_prompt, len(enc.answer_ids), enc.needle
    if n_ctx < 2:
        raise ValueError("the context has fewer than 2 tokens: nothing to adapt on")
    memory_guard.check_context_length(lm, len(ids), "The prompt with its expected answer")
    return QTTTInputs(ids=torch.tensor([ids], dtype=torch.long, device=lm.device), n_ctx=n_ctx, n_prompt=n_prompt,
                      answer_len=answer, needle=list(needle), text=enc.text)


def span_loss_and_grads(lm: LoadedModel, cache: FrozenKV, ids: torch.Tensor, start: int, span: int,
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
        with lm.adapter.apply(deltas=effective_deltas(leaves, masks)):
            out = forward_with_frozen_kv(lm.model, rows, cache, start)
        loss = F.cross_entropy(out.logits[0].float(), targets, reduction="sum")
        if not need_grad or not torch.isfinite(loss):
            return loss.detach(), None
        grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), {k: g for k, g in zip(leaves, grads)}



class QTTTRun(EngineRun):
    """Query-only TTT on one prompt (module docstring; DESIGN §7.2).

    Usage::

        run = QTTTRun(lm, prompt, QTTTConfig(steps=32, span=128, lr=1e-4))
        base = run.prepare()                 # prefill + step-0 metrics
        for rec in run.steps(): ...          # one StepRecord per step
        run.deltas                           # {(layer, "q"): ΔW_Q (out, in) fp32}
        run.generate(adapted=False), run.generate(adapted=True)
    """

    mode = "qttt"
    gemm_threads_only = True    # ttt_core.cpu_threads: the span steps are many small ops (EngineRun)

    def __init__(self, lm: LoadedModel, prompt: Prompt | str, config: QTTTConfig | None = None, stop: StopLike = None) -> None:
        super().__init__(lm, prompt, config or QTTTConfig(), stop)

    @property
    def span(self) -> int:
        """k clamped to the context: at most n_ctx − 1 rows have a next token inside the context."""
        return max(1, min(int(self.config.span), self.enc.n_ctx - 1))

    def _prepare(self) -> None:
        lm = self.lm
        self.backend, self.backend_label = kernel_backend(lm.device)
        self.enc = qttt_inputs(lm, self.prompt)
        # memory guard (ttt_core.memory_guard): refuse before the prefill if prefill + step cannot fit
        T = int(self.enc.ids.shape[1])
        self._mem = (memory_guard.qttt_estimate(lm, T, self.span), memory_guard.qttt_advice(lm, T, self.span))
        memory_guard.check(*self._mem)
        with memory_guard.oom_guard(*self._mem):
            self._prefill()

    def _prefill(self) -> None:
        lm = self.lm
        self.masks = head_masks(lm, "q", self.config.heads)
        base = {k: lm.adapter.logical_weight(*k) for k in self.masks}
        self.deltas = {k: torch.zeros(w.shape, dtype=torch.float32, device=lm.device) for k, w in base.items()}
        self.opt = DeltaAdamW(base, AdamWConfig(lr=self.config.lr, betas=tuple(self.config.betas),
                                                eps=self.config.eps, weight_decay=self.config.weight_decay), self.masks)
        self._gen = torch.Generator().manual_seed(int(self.config.seed))
        self._prefill_frozen_cache()
        if isinstance(self.prompt, FewShotPrompt):
            self.readout = FewShotReadout(encode_few_shot(lm, self.prompt), lm.device)

    @torch.no_grad()
    def _prefill_frozen_cache(self) -> torch.Tensor:
        """One no-grad forward of the whole text: the frozen K/V cache, the unadapted per-token NLL
        of the context (`base_token_nll`, (n_ctx − 1,), in 512-row blocks of the LM head) and the
        decoding template (the cache cropped to the prompt). Returns the last hidden states (T, d)."""
        lm, ids = self.lm, self.enc.ids
        out = lm.model.get_decoder()(input_ids=ids, use_cache=True)
        pkv = out.past_key_values
        self.cache = FrozenKV(keys=[layer.keys for layer in pkv.layers], values=[layer.values for layer in pkv.layers])
        head = lm.model.get_output_embeddings()
        hidden = out.last_hidden_state[0, : self.enc.n_ctx - 1]
        targets = ids[0, 1:self.enc.n_ctx]
        nll = [F.cross_entropy(head(hidden[i:i + 512]).float(), targets[i:i + 512], reduction="none")
               for i in range(0, hidden.shape[0], 512)]
        self.base_token_nll = torch.cat(nll).cpu()
        template = copy.deepcopy(pkv)
        template.crop(-(ids.shape[1] - (self.enc.n_prompt - 1)))
        self._decode_template = template
        return out.last_hidden_state[0]

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
        with memory_guard.oom_guard(*self._mem):
            return self._span_loss_grads(deltas, t)

    def _span_loss_grads(self, deltas, t):
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
            res.update(self.readout.query_metrics(logits[-1]))
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

    def _evaluate(self, deltas, lookahead: bool = False) -> dict[str, Any]:
        with memory_guard.oom_guard(*self._mem):
            return self._evaluate_rows(deltas, lookahead)

    @torch.no_grad()
    def _evaluate_rows(self, deltas, lookahead: bool = False) -> dict[str, Any]:
        """Metrics with the (adapted) W_Q against the frozen cache of the full text. With
        `lookahead`, the same forward also runs the next step's span (class `EngineRun` docstring)."""
        lm, enc = self.lm, self.enc
        res: dict[str, Any] = {}
        rows = self._eval_rows()
        want_needle = bool(enc.needle) and not isinstance(self.prompt, FewShotPrompt)
        if rows is not None and lookahead:
            k, start = self.span, self._draw_start()
            leaves = {key: d.detach().requires_grad_(True) for key, d in deltas.items()}
            with torch.enable_grad(), lm.adapter.apply(deltas=effective_deltas(leaves, self.masks)):
                with record_attention() if want_needle else nullcontext() as rec:
                    out = forward_rows_with_frozen_kv(lm.model, enc.ids, self.cache, [(start, k), rows], grad_segments=1)
                loss = F.cross_entropy(out.logits[0, :k].float(), enc.ids[0, start + 1:start + k + 1], reduction="sum")
            self._pending = {"deltas": deltas, "start": start, "loss": loss, "leaves": leaves}
            res.update(self._row_metrics(out.logits[0, k:].detach(), rec))
        elif rows is not None:
            with lm.adapter.apply(deltas=effective_deltas(deltas, self.masks)):
                with record_attention() if want_needle else nullcontext() as rec:
                    out = forward_with_frozen_kv(lm.model, enc.ids[:, rows[0]:rows[0] + rows[1]], self.cache, rows[0])
            res.update(self._row_metrics(out.logits[0], rec))
        if self.config.eval_context_nll:
            res["context_nll"] = self.context_nll(deltas)
        return res

    @torch.no_grad()
    def context_nll(self, deltas: dict[Key, torch.Tensor] | None = None, chunk: int = 256) -> float:
        """Mean next-token NLL over the whole context with W_Q + Δ against the frozen cache."""
        eff = effective_deltas(deltas if deltas is not None else self.deltas, self.masks)
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
        deltas = effective_deltas(self.deltas, self.masks) if adapted else None
        return greedy_decode(self.lm, prompt_ids, deltas, self._decode_template,
                       max_new_tokens or self.config.max_new_tokens)

    def label_distribution(self, adapted: bool = True) -> dict[str, float] | None:
        """Few-shot only: label → probability at the query (restricted softmax), before/after."""
        if not isinstance(self.prompt, FewShotPrompt):
            return None
        self.prepare()
        return self._evaluate(self.deltas if adapted else {})["label_probs"]


