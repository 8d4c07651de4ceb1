"""FLOP accounting of qTTT against thinking tokens (DESIGN §8; qTTT paper Sec. 3.3, App. C).

Dense Transformer with L layers, width d, MLP ratio r (d_ff = r·d):

* C_quad = 2·L·d (attention score + value FLOPs per query-key pair),
  C_tok = (4 + 2r)·L·d² (projections and MLP per token);
* prefill F_prefill(T) = C_quad·T² + C_tok·T;
* thinking with a KV cache, F_gen(T_think; T) = C_quad·(T_think·T + T_think(T_think − 1)/2) + C_tok·T_think;
* one qTTT step on a span of k tokens against the frozen cache of T tokens,
  G(k; T) ≈ 2·(C_quad·k·T + (2 + 2r)·L·k·d²)  (+ C_quad·k² + 2·L·k·d² inside the bracket when the
  span also attends within itself);
* FLOP-matched thinking budget: solve F_gen(T_think; T) = N·G(k; T) for T_think (a quadratic with
  one positive root, `matched_thinking_tokens`); for T ≫ d and k ≪ T it is ≈ 2·N·k (Eq. 3.2).

These are the paper's dense-model formulas: a SwiGLU MLP (three matrices) or grouped-query K/V
change the true per-token cost; `FlopModel.from_model` takes L, d and r = d_ff/d from the model and
says so in its `note`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from ttt_core.generators import needle_haystack
from ttt_core.models import LoadedModel
from ttt_core.qttt import QTTTConfig, QTTTRun


@dataclass(frozen=True)
class FlopModel:
    """Cost coefficients of a dense Transformer (L layers, width d, MLP ratio r)."""
    L: int
    d: int
    r: float
    note: str = ""

    @property
    def c_quad(self) -> float:
        """C_quad = 2Ld."""
        return 2.0 * self.L * self.d

    @property
    def c_tok(self) -> float:
        """C_tok = (4 + 2r)Ld²."""
        return (4.0 + 2.0 * self.r) * self.L * self.d ** 2

    @classmethod
    def from_model(cls, lm: LoadedModel) -> "FlopModel":
        """L, d, r = d_ff/d of a loaded model (ttt_core.models.LoadedModel)."""
        a = lm.adapter
        r = a.intermediate_size / a.hidden_size
        note = (f"{lm.name}: L = {a.n_layers}, d = {a.hidden_size}, d_ff = {a.intermediate_size} (r = {r:.3g}); "
                f"{a.n_heads} query / {a.n_kv_heads} key-value heads. The paper's dense formula assumes two MLP "
                "matrices and full-width K/V.")
        return cls(L=int(a.n_layers), d=int(a.hidden_size), r=float(r), note=note)

    # ------------------------------------------------------------------ costs
    def prefill(self, T: float) -> float:
        """F_prefill(T) = C_quad T² + C_tok T."""
        return self.c_quad * T * T + self.c_tok * T

    def generation(self, T_think: float, T: float) -> float:
        """F_gen(T_think; T) = C_quad (T_think·T + T_think(T_think−1)/2) + C_tok T_think."""
        return self.c_quad * (T_think * T + T_think * (T_think - 1.0) / 2.0) + self.c_tok * T_think

    def qttt_step(self, k: float, T: float, span_self_attention: bool = False) -> float:
        """G(k; T) ≈ 2(C_quad k T + (2 + 2r) L k d²) (+ C_quad k² + 2Lkd² with span self-attention)."""
        inner = self.c_quad * k * T + (2.0 + 2.0 * self.r) * self.L * k * self.d ** 2
        if span_self_attention:
            inner += self.c_quad * k * k + 2.0 * self.L * k * self.d ** 2
        return 2.0 * inner

    def qttt(self, N: int, k: float, T: float, span_self_attention: bool = False) -> float:
        """N steps: N·G(k; T) (the prefill, shared with plain decoding, excluded)."""
        return N * self.qttt_step(k, T, span_self_attention)

    def matched_thinking_tokens(self, N: int, k: float, T: float, span_self_attention: bool = False) -> float:
        """Exact T_think with F_gen(T_think; T) = N·G(k; T): the positive root of
        (C_quad/2) x² + (C_quad (T − ½) + C_tok) x − N·G = 0."""
        budget = self.qttt(N, k, T, span_self_attention)
        a = self.c_quad / 2.0
        b = self.c_quad * (T - 0.5) + self.c_tok
        # numerically stable positive root: 2c / (b + sqrt(b² + 4ac)) with c = budget
        return 2.0 * budget / (b + math.sqrt(b * b + 4.0 * a * budget))


def approx_thinking_tokens(N: int, k: float) -> float:
    """The paper's approximation T_think ≈ 2·N·k (Eq. 3.2)."""
    return 2.0 * N * k


def steps_for_thinking_budget(fm: FlopModel, T_think: float, k: float, T: float) -> float:
    """N (real-valued) whose qTTT cost equals F_gen(T_think; T)."""
    return fm.generation(T_think, T) / fm.qttt_step(k, T)


# --------------------------------------------------------------------------------------------
# measured seconds on this machine
# --------------------------------------------------------------------------------------------


def filler_prompt(lm: LoadedModel, n_tokens: int, seed: int = 0) -> Any:
    """A needle-haystack prompt of about `n_tokens` context tokens (for timing)."""
    words = max(10, int(n_tokens * 0.75))
    for _ in range(6):
        p = needle_haystack(seed, n_words=words)
        n = len(lm.tokenizer(p.context, add_special_tokens=False)["input_ids"])
        if abs(n - n_tokens) <= max(8, 0.05 * n_tokens):
            break
        words = max(10, int(words * n_tokens / max(n, 1)))
    return p


def measure_seconds(lm: LoadedModel, T_tokens: int, N: int, k: int, T_think: int, lr: float = 1e-4,
                    seed: int = 0) -> dict[str, float]:
    """Wall seconds on this machine of (a) N qTTT steps of span k with the engine against the
    frozen cache of a ~T_tokens context (step time only, metrics excluded) and (b) greedy
    generation of T_think tokens with a KV cache after the same context (decode only; EOS ignored).
    The prefill of the context is timed separately (shared by both)."""

    prompt = filler_prompt(lm, T_tokens, seed)
    run = QTTTRun(lm, prompt, QTTTConfig(steps=int(N), span=int(k), lr=lr, seed=seed))
    run.prepare()
    step_s = sum(rec.step_s for rec in run.steps())
    ids = run.enc.ids[:, : run.enc.n_prompt]
    with torch.no_grad():
        t0 = time.perf_counter()
        out = lm.model(input_ids=ids, use_cache=True)
        prefill_s = time.perf_counter() - t0
        cache = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        pos = ids.shape[1]
        t1 = time.perf_counter()
        for _ in range(int(T_think)):
            o = lm.model(input_ids=nxt, past_key_values=cache, use_cache=True,
                         position_ids=torch.tensor([[pos]], device=ids.device))
            cache = o.past_key_values
            nxt = o.logits[:, -1:].argmax(-1)
            pos += 1
        gen_s = time.perf_counter() - t1
    return {"context_tokens": int(ids.shape[1]), "qttt_steps": int(len(run.records)), "span": int(run.span),
            "qttt_seconds": float(step_s), "thinking_tokens": int(T_think), "generation_seconds": float(gen_s),
            "prefill_seconds": float(prefill_s)}
