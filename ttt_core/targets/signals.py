"""Training signals of test-time training (DESIGN §11; issue 12 item 2).

* ``nll`` (default; qTTT, TTT-E2E): the summed next-token NLL of a sampled span of k context rows,
  Σ_{i=s}^{s+k−1} −log p(x_{i+1} | x_{≤i}).
* ``entropy`` (Tent): the entropy of the prediction at the query row(s) — the last prompt row,
  whose output is the query's answer. Few-shot prompts with numeric labels read the query as an
  expected value under the softmax restricted to the label tokens (DESIGN §7.1), so their entropy
  is that restricted distribution's; every other prompt uses the full next-token softmax. No
  label or answer is used: it is unsupervised.
* ``syttta`` (SyTTA's combined signal): input perplexity plus output entropy — the span's mean
  next-token NLL (log-perplexity of the input) + the query row's entropy, both per token.

`signal_loss` computes a signal from the logits of the span rows (k, V) and of the query row (V,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIGNALS: dict[str, str] = {
    "nll": "next-token NLL on a context span (qTTT)",
    "entropy": "entropy minimisation at the query (Tent)",
    "syttta": "input perplexity + output entropy (SyTTA)",
}
#: Which rows a signal reads: the span's, the query row's, or both.
NEEDS_SPAN = {"nll": True, "entropy": False, "syttta": True}
NEEDS_QUERY = {"nll": False, "entropy": True, "syttta": True}


def check_signal(signal: str) -> str:
    if signal not in SIGNALS:
        raise ValueError(f"unknown signal {signal!r}; choose one of {list(SIGNALS)}")
    return signal


def entropy(logits: torch.Tensor, label_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) over the last axis, or over `label_ids` only."""
    lg = logits.float()
    if label_ids is not None:
        lg = lg.index_select(-1, label_ids)
    logp = torch.log_softmax(lg, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def signal_loss(signal: str, span_logits: torch.Tensor | None, span_targets: torch.Tensor | None,
                query_logits: torch.Tensor | None, label_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of `signal`: span_logits (k, V) with span_targets (k,), query_logits (V,)."""
    if signal == "nll":
        return F.cross_entropy(span_logits.float(), span_targets, reduction="sum")
    if signal == "entropy":
        return entropy(query_logits, label_ids)
    if signal == "syttta":
        ppl = F.cross_entropy(span_logits.float(), span_targets, reduction="mean")
        return ppl + entropy(query_logits, label_ids)
    raise ValueError(f"unknown signal {signal!r}")


def per_token(signal: str, loss: float, span: int) -> float:
    """The loss per supervised token (NLL: / k; the entropy signals already are)."""
    return loss / span if signal == "nll" else loss
