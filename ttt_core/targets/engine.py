"""One engine for every adaptation target and signal (DESIGN §11; issue 12 item 2), on the run
template of `ttt_core.engine` (step records, divergence rule, stop flag) and qTTT's prefill,
span sampling and query metrics (`ttt_core.qttt.QTTTRun`).

* Same optimiser and budget for all: AdamW on fp32 deltas from each tensor's initial value
  (`optim.DeltaAdamW`, decoupled decay on the effective value), global gradient clipping 1.0,
  `steps` steps, lr shared by every target (default qTTT's `DEFAULT_LR`); the config is qTTT's.
* Routes. ``frozen_kv`` (qTTT, DESIGN §2/§7.2): every row attends to the base model's frozen K/V
  from the prefill — exact for targets in the query path only (W_Q, LoRA on W_Q), where it is the
  route qTTT takes. ``full``: an ordinary causal forward of the tokens up to the last row needed
  and a backward through it (every other target changes keys and values of later positions).
  ``auto`` picks frozen_kv for query-path targets and full otherwise.
* Signals (`targets.signals`): span NLL (the same seeded span starts for every target), Tent's
  query entropy, SyTTA's perplexity + entropy.
* Measured quantity after every step: the query error exactly as the engines define it today —
  few-shot: (s_x − v(y))² from `readout.FewShotReadout` (label_probs and query_prediction too);
  long context with an answer: the answer's summed NLL (answer_nll / answer_prob). On the full
  route the metric forward is a full causal forward at the adapted weights (no needle mass there:
  it would record every layer's full attention matrix).
* Isolation: parameters live in the run (`targets.registry.TargetParams`); every forward runs in
  ``lm.adapter.apply(deltas=…)`` (per-thread), so the shared model is never mutated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ttt_core.attention import forward_rows_with_frozen_kv, forward_with_frozen_kv, record_attention
from ttt_core.encoding import encode_few_shot
from ttt_core.engine import greedy_decode
from ttt_core.models import LoadedModel
from ttt_core.optim import AdamWConfig, DeltaAdamW
from ttt_core.paper_gd import greedy_full_decode
from ttt_core.prompts import FewShotPrompt, Prompt
from ttt_core.qttt import LOSS_FLOOR_PER_TOKEN, QTTTConfig, QTTTRun
from ttt_core.readout import FewShotReadout
from ttt_core.targets.registry import Target, TargetParams, build_params, parse_target
from ttt_core.targets.signals import NEEDS_QUERY, NEEDS_SPAN, check_signal, entropy, per_token, signal_loss
from ttt_core.types import StopLike

ROUTES = ("auto", "frozen_kv", "full")


@dataclass
class TargetConfig(QTTTConfig):
    """qTTT's settings (steps, span, lr, betas, eps, weight_decay, clip, seed, divergence_factor)
    plus: target (a `registry.parse_target` name), signal ("nll" | "entropy" | "syttta"), route
    ("auto" | "frozen_kv" | "full"), last_layers (train the last N layers only; None = all),
    lora_alpha (LoRA scaling α/r; None = 1). seed: span starts and the LoRA init."""

    target: str = "q"
    signal: str = "nll"
    route: str = "auto"
    last_layers: int | None = None
    lora_alpha: float | None = None


def resolve_route(route: str, target: Target) -> str:
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; choose one of {list(ROUTES)}")
    if route == "auto":
        return "frozen_kv" if target.query_path else "full"
    return route


class TargetRun(QTTTRun):
    """TTT of one target with one signal on one prompt (module docstring).

        run = TargetRun(lm, prompt, TargetConfig(target="lora:q:8", signal="nll", steps=8))
        base = run.prepare(); recs = run.run_to_end()
        run.deltas      # the trained params (deltas from their init); run.adapter_deltas() for the model
    """

    mode = "targets"

    def __init__(self, lm: LoadedModel, prompt: Prompt | str, config: TargetConfig | None = None,
                 stop: StopLike = None) -> None:
        super().__init__(lm, prompt, config or TargetConfig(), stop)
        cfg = self.config
        check_signal(cfg.signal)
        self.target: Target = parse_target(cfg.target, seed=cfg.seed, alpha=cfg.lora_alpha)
        self.route = resolve_route(cfg.route, self.target)
        self.lookahead = False
        self.params: TargetParams | None = None

    # ------------------------------------------------------------------ set-up
    def _prefill(self) -> None:
        lm, cfg = self.lm, self.config
        self.params = build_params(lm, self.target, cfg.last_layers, seed=cfg.seed)
        self.masks = {}
        self.deltas = self.params.init()
        self.opt = DeltaAdamW(self.params.base, AdamWConfig(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                                            weight_decay=cfg.weight_decay))
        self._gen = torch.Generator().manual_seed(int(cfg.seed))
        self.label_ids = None
        if isinstance(self.prompt, FewShotPrompt):
            self.readout = FewShotReadout(encode_few_shot(lm, self.prompt), lm.device)
            if self.readout.frame == "expected_value":
                self.label_ids = self.readout.label_ids
        last_hidden = self._prefill_frozen_cache()
        with torch.no_grad():
            q_logits = lm.model.get_output_embeddings()(last_hidden[self.enc.n_prompt - 1])
            self.base_entropy = float(entropy(q_logits, self.label_ids))

    def adapter_deltas(self, params: dict | None = None) -> dict:
        """The adapter deltas {(layer, kind): tensor} of `params` (default: the run's last good ones)."""
        self.prepare()
        return self.params.deltas(self.deltas if params is None else params)

    # ------------------------------------------------------------------ losses
    def _base_parts(self) -> tuple[float, float]:
        return float(self.base_token_nll.mean()), self.base_entropy

    def _baseline_loss(self) -> float:
        nll, ent = self._base_parts()
        return {"nll": nll * self.span, "entropy": ent, "syttta": nll + ent}[self.config.signal]

    def _baseline_loss_per_token(self) -> float:
        return per_token(self.config.signal, self._baseline_loss(), self.span)

    def _reference_loss(self, info: dict[str, Any]) -> float:
        sig, k = self.config.signal, self.span
        if sig == "entropy":
            return max(self.base_entropy, LOSS_FLOOR_PER_TOKEN)
        s = info["start"]
        span_sum = float(self.base_token_nll[s:s + k].sum())
        if sig == "nll":
            return max(span_sum, LOSS_FLOOR_PER_TOKEN * k)
        return max(span_sum / k + self.base_entropy, LOSS_FLOOR_PER_TOKEN)

    def _rows_logits(self, start: int | None, k: int, need_query: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits of the span rows (k, V) and of the query row (V,) at the current adapter state."""
        ids, row0 = self.enc.ids, self.enc.n_prompt - 1
        segs = ([(start, k)] if start is not None else []) + ([(row0, 1)] if need_query else [])
        if self.route == "frozen_kv":
            logits = forward_rows_with_frozen_kv(self.lm.model, ids, self.cache, segs).logits[0]
            offs, o = [], 0
            for _, m in segs:
                offs.append(o)
                o += m
        else:
            first = min(s for s, _ in segs)
            end = max(s + m for s, m in segs)
            logits = self.lm.model(input_ids=ids[:, :end], use_cache=False, logits_to_keep=end - first).logits[0]
            offs = [s - first for s, _ in segs]
        span_l = logits[offs[0]:offs[0] + k] if start is not None else None
        query_l = logits[offs[-1]] if need_query else None
        return span_l, query_l

    def _span_loss_grads(self, deltas, t):
        sig, k = self.config.signal, self.span
        start = self._draw_start() if NEEDS_SPAN[sig] else None
        leaves = {key: d.detach().requires_grad_(True) for key, d in deltas.items()}
        with torch.enable_grad(), self.lm.adapter.apply(deltas=self.params.deltas(leaves)):
            span_l, query_l = self._rows_logits(start, k, NEEDS_QUERY[sig])
            tg = None if start is None else self.enc.ids[0, start + 1:start + k + 1]
            loss = signal_loss(sig, span_l, tg, query_l, self.label_ids)
            grads = None
            if torch.isfinite(loss):
                g = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
                grads = {key: (torch.zeros_like(leaves[key]) if gi is None else gi) for key, gi in zip(leaves, g)}
        lossf = float(loss.detach())
        info = {"start": start if start is not None else 0, "span": k if start is not None else 1,
                "per_token": per_token(sig, lossf, k) if math.isfinite(lossf) else float("nan")}
        return loss.detach(), grads, info

    # ------------------------------------------------------------------ metrics
    @torch.no_grad()
    def _evaluate_rows(self, deltas, lookahead: bool = False) -> dict[str, Any]:
        rows = self._eval_rows()
        if rows is None:
            return {}
        r0, m = rows
        lm, enc = self.lm, self.enc
        rec = None
        with lm.adapter.apply(deltas=self.params.deltas(deltas)):
            if self.route == "frozen_kv":
                want_needle = bool(enc.needle) and not isinstance(self.prompt, FewShotPrompt)
                if want_needle:
                    with record_attention() as rec:
                        logits = forward_with_frozen_kv(lm.model, enc.ids[:, r0:r0 + m], self.cache, r0).logits[0]
                else:
                    logits = forward_with_frozen_kv(lm.model, enc.ids[:, r0:r0 + m], self.cache, r0).logits[0]
            else:
                logits = lm.model(input_ids=enc.ids[:, :r0 + m], use_cache=False, logits_to_keep=m).logits[0]
        return self._row_metrics(logits, rec)

    def context_nll(self, deltas=None, chunk: int = 256) -> float:
        raise NotImplementedError("context NLL is not measured by the targets engine")

    def generate(self, adapted: bool = True, max_new_tokens: int | None = None) -> str:
        """Greedy answer with the adapted target: against the frozen base K/V on the frozen_kv route
        (as qTTT), with the adapted weights everywhere on the full route."""
        self.prepare()
        prompt_ids = self.enc.ids[:, : self.enc.n_prompt]
        n = max_new_tokens or self.config.max_new_tokens
        with torch.no_grad():
            deltas = self.params.deltas(self.deltas) if adapted else None
        if self.route == "frozen_kv":
            return greedy_decode(self.lm, prompt_ids, deltas, self._decode_template, n)
        return greedy_full_decode(self.lm, prompt_ids, deltas, n)


def measured_error(rec: Any) -> float | None:
    """The query error of a StepRecord as the engines define it: the query's squared error
    (few-shot) or the answer NLL (long context); None when the prompt has neither."""
    if rec is None:
        return None
    v = rec.query_error if rec.query_error is not None else rec.answer_nll
    return None if v is None or not math.isfinite(float(v)) else float(v)


def error_label(prompt: Prompt) -> str:
    return "query squared error (s_x − y)²" if isinstance(prompt, FewShotPrompt) else "answer NLL (nats)"
