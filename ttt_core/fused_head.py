"""Next-token NLL through the LM head without an autograd graph of the (rows, V) logits.

The qTTT span loss (DESIGN §7.2, L = −Σ_i log softmax(W h_i)[x_{i+1}]) and the frozen-K/V kernel's
supervised outputs (DESIGN §2, s_i = softmax(W h_i)[y_i] = exp(−nll_i)) read the LM head at up to
a few hundred rows. Through autograd, each row costs a (V,)-wide logits tensor, its float copy,
the log-softmax and, in the backward, zero-filled (rows, V) gradient buffers (for SmolLM2, V =
49,152: 25 MB per 128 rows, freshly page-faulted each step) before the one product that matters,
dL/dh = (softmax − onehot) W.

`head_nll` computes the per-row NLL and, when `hidden` needs a gradient, the per-row gradient
D_i = ∂nll_i/∂h_i = (p_i − e_{y_i}) W in the same pass (vocabulary in chunks of `VOCAB_CHUNK`
columns into one buffer, so each chunk's product stays in cache; the logits are overwritten by
their softmax in place). The backward of any function of the NLLs is then g_i · D_i: exact, since
D does not depend on g. `naive_head_nll` is the plain-autograd reference the tests compare with.

`plain_head(model)` returns the head's weight only where logits = hidden · Wᵀ exactly: a
bias-free linear head on a family whose forward applies nothing after it (no soft-capping or
logit scaling); elsewhere callers keep the model's own logits.

`lm_head_mode("fused" | "logits")` chooses the path for the code it wraps (a context variable, so
one browser session's choice never reaches another's thread). A saved result names the mode it was
made with (e.g. `CalibrationSettings.lm_head`): the two paths agree to float32 round-off, but an
ill-conditioned fit downstream (an evidence-maximising τ² on a flat likelihood) can magnify that
round-off past the 1e-6 at which committed records are recomputed, so records are recomputed in
their own mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F

#: Vocabulary columns per product (measured on SmolLM2's 49,152 × 576 head, 128 rows, 2 threads:
#: 2,048 columns 107 ms for NLL + gradient, against 141 ms through autograd; 1,024: 116 ms; 4,096: 132 ms).
VOCAB_CHUNK = 2048
#: Rows per block: the softmax buffer holds rows × V numbers (256 × 49,152 fp32 = 50 MB).
BLOCK_ROWS = 256

#: How `HeadPath` reads the head: "fused" (`head_nll` where `plain_head` allows it) or "logits"
#: (the model's own logits, the only path before 2026-12-03).
LM_HEAD_MODES = ("fused", "logits")
_MODE: ContextVar[str | None] = ContextVar("ttt_lens_lm_head_mode", default=None)


@contextmanager
def lm_head_mode(mode: str) -> Iterator[None]:
    """Inside the block, `HeadPath(model)` (without an explicit `fused=`) reads the head as `mode`
    says, whatever TTT_LENS_FUSED_HEAD says; nested blocks restore the outer mode on exit."""
    if mode not in LM_HEAD_MODES:
        raise ValueError(f"lm_head must be one of {LM_HEAD_MODES}, not {mode!r}")
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def fused_by_default() -> bool:
    """Whether a `HeadPath` built without `fused=` tries the fused path: the innermost
    `lm_head_mode`, else TTT_LENS_FUSED_HEAD ("0" turns it off), else yes."""
    import os

    mode = _MODE.get()
    if mode is not None:
        return mode == "fused"
    return os.environ.get("TTT_LENS_FUSED_HEAD", "1") != "0"


#: Families whose causal-LM forward is logits = lm_head(hidden) (transformers 5.x source), nothing after it.
PLAIN_HEAD_FAMILIES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                       "GPT2LMHeadModel", "GPTNeoXForCausalLM")


def plain_head(model: Any) -> torch.Tensor | None:
    """The head weight W (V, d) when model(...).logits = decoder(...).last_hidden_state @ Wᵀ exactly,
    else None (unknown family, a head bias, or logit soft-capping/scaling in the config)."""
    if type(model).__name__ not in PLAIN_HEAD_FAMILIES:
        return None
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return None
    cfg = model.config
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return None
    return head.weight


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.no_grad()
def _nll_and_grad(x: torch.Tensor, W: torch.Tensor, targets: torch.Tensor, need_grad: bool,
                  chunk: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One block of rows: x (m, d), W (V, d), targets (m,) → nll (m,) and D (m, d) or None.

    Logits are formed in x's dtype (as the model's Linear would) and reduced in fp32 (float64 for
    float64 inputs), as `F.cross_entropy(logits.float(), …)` does."""
    m, V = x.shape[0], W.shape[0]
    cd = _compute_dtype(x)
    n_chunks = -(-V // chunk)
    buf = torch.empty(n_chunks, m, chunk, dtype=cd, device=x.device)
    rem = V - (n_chunks - 1) * chunk
    for c in range(n_chunks):
        w = W[c * chunk:c * chunk + (chunk if c < n_chunks - 1 else rem)]
        dst = buf[c] if c < n_chunks - 1 or rem == chunk else buf[c, :, :rem]
        if x.dtype == cd and dst.is_contiguous():
            torch.mm(x, w.T, out=dst)
        else:
            dst.copy_(x @ w.T)
    if rem != chunk:
        buf[-1, :, rem:] = float("-inf")
    rows = torch.arange(m, device=x.device)
    tc, tcol = targets // chunk, targets % chunk
    target_logit = buf[tc, rows, tcol].clone()
    mx = buf.amax(dim=(0, 2))
    buf.sub_(mx[None, :, None]).exp_()
    total = buf.sum(dim=(0, 2))
    nll = mx + total.log() - target_logit
    if not need_grad:
        return nll, None
    buf.div_(total[None, :, None])
    buf[tc, rows, tcol] -= 1.0
    D = torch.zeros(m, W.shape[1], dtype=cd, device=x.device)
    for c in range(n_chunks):
        w = W[c * chunk:c * chunk + (chunk if c < n_chunks - 1 else rem)].to(cd)
        p = buf[c] if c < n_chunks - 1 else buf[c, :, :rem]
        D.addmm_(p, w)
    return nll, D


class _HeadNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, W: torch.Tensor, targets: torch.Tensor, chunk: int,
                block_rows: int, need_grad: bool) -> torch.Tensor:
        parts, grads = [], []
        for r in range(0, hidden.shape[0], block_rows):
            nll, D = _nll_and_grad(hidden[r:r + block_rows], W, targets[r:r + block_rows], need_grad, chunk)
            parts.append(nll)
            grads.append(D)
        if need_grad:
            ctx.save_for_backward(torch.cat(grads) if len(grads) > 1 else grads[0])
        ctx.hidden_dtype = hidden.dtype
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        (D,) = ctx.saved_tensors
        return (g[:, None].to(D.dtype) * D).to(ctx.hidden_dtype), None, None, None, None, None


def head_nll(hidden: torch.Tensor, W: torch.Tensor, targets: torch.Tensor, chunk: int = VOCAB_CHUNK,
             block_rows: int = BLOCK_ROWS) -> torch.Tensor:
    """nll_i = logsumexp(W h_i) − (W h_i)[y_i]: hidden (m, d), W (V, d) (no gradient), targets (m,)
    int64 → (m,) fp32 (float64 for float64 hidden). Differentiable in `hidden` (module docstring);
    W gets no gradient. Equal to `naive_head_nll` up to float round-off."""
    if W.requires_grad and torch.is_grad_enabled():
        raise ValueError("head_nll gives no gradient for the head weight; detach it or use the model's logits")
    if hidden.ndim != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (m, d) and targets (m,), got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=_compute_dtype(hidden))
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _HeadNLL.apply(hidden, W.detach(), targets, int(chunk), max(1, int(block_rows)), need_grad)


def naive_head_nll(hidden: torch.Tensor, W: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain-autograd reference of `head_nll`: cross-entropy of the upcast logits, per row."""
    logits = hidden @ W.T
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits, targets, reduction="none")


class HeadPath:
    """How a caller reads the LM head of `causal_lm` at some rows: through `head_nll` on the
    decoder's hidden states where `plain_head` allows it (`fused`), else through the model's own
    logits. `module` is what to run (the decoder, or the causal LM); `nll(out, rows, targets)`
    and `logits(out, rows)` read its output at `rows` (a slice or an index tensor of the
    sequence axis of batch row 0).

    `fused=None` follows `fused_by_default()` (`lm_head_mode`, then TTT_LENS_FUSED_HEAD=0, which
    benchmarks use to time the plain path)."""

    def __init__(self, causal_lm: Any, fused: bool | None = None) -> None:
        if fused is None:
            fused = fused_by_default()
        self.weight = plain_head(causal_lm) if fused else None
        self.fused = self.weight is not None
        self.head = causal_lm.get_output_embeddings()
        self.module = causal_lm.get_decoder() if self.fused else causal_lm

    def _rows(self, t: torch.Tensor, rows: Any) -> torch.Tensor:
        return t[0].index_select(0, rows) if isinstance(rows, torch.Tensor) else t[0, rows]

    def nll(self, out: Any, rows: Any, targets: torch.Tensor) -> torch.Tensor:
        """(m,) next-token NLL of the chosen rows (fp32; float64 on the fused path for float64 models)."""
        if self.fused:
            return head_nll(self._rows(out.last_hidden_state, rows), self.weight, targets)
        logits = self._rows(out.logits, rows)
        return F.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), targets, reduction="none")

    def prob(self, out: Any, rows: Any, targets: torch.Tensor) -> torch.Tensor:
        """(m,) softmax probability of each row's target, exp(−nll) (as `readout.token_prob`)."""
        if self.fused:
            return torch.exp(-self.nll(out, rows, targets))
        logits = self._rows(out.logits, rows)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1).exp()

    def logits(self, out: Any, rows: Any) -> torch.Tensor:
        """(m, V) logits of the chosen rows, in the model's dtype."""
        if self.fused:
            return self.head(self._rows(out.last_hidden_state, rows))
        return self._rows(out.logits, rows)
