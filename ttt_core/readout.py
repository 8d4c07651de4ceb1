"""The scalar output of a few-shot prompt, read off the logits at a prompt's last position
(DESIGN §7.1). One reader for the prompt kernel, paper-mode GD and qTTT's few-shot metrics.

* ``expected_value`` frame (numeric labels): s = Σ_y v(y) p(y), p the softmax restricted to the
  label tokens, v(y) ∈ [0, 1] the label value; target v(y_i).
* ``probability`` frame (categorical labels): s_i = p(first token of y_i) under the full softmax,
  target 1, residual 1 − s_i; the query output is p(first token of the true answer), error
  (1 − p)². No order of the labels enters anywhere, and an answer that no demonstration shows is
  scored the same way.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ttt_core.encoding import FewShotEncoding


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def expected_label_value(logits: torch.Tensor, label_ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """s = Σ_y v(y) softmax(logits[label_ids])_y: logits (..., V) → (...)."""
    logits = _upcast(logits)
    p = torch.softmax(logits.index_select(-1, label_ids), dim=-1)
    return p @ values.to(logits.dtype)


def token_prob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """softmax(logits)[target]: logits (B, V), targets (B,) → (B,)."""
    return torch.log_softmax(_upcast(logits), -1).gather(-1, targets[:, None]).squeeze(-1).exp()


class FewShotReadout:
    """Scalars of the n leave-one-out prompts and the query prompt of `enc` (module docstring).

    `scalars(logits)` maps the (n+1, V) last-position logits (LOO rows, then the query row) to
    s (n+1,), differentiably. `query_metrics(logits_q)` gives the displayed label distribution, the
    query prediction s_x and, when the query has a target, its squared error."""

    def __init__(self, enc: FewShotEncoding, device: torch.device | str) -> None:
        self.enc = enc
        self.frame = enc.frame
        self.labels = list(enc.labels)
        self.label_ids = torch.tensor(enc.label_ids, device=device)
        self.values = torch.tensor(enc.label_values, dtype=torch.float32, device=device)
        qt = enc.query_target_id if enc.query_target_id is not None else enc.label_ids[0]  # placeholder row
        self.row_targets = torch.tensor(list(enc.target_ids) + [qt], device=device)
        self.targets = torch.tensor(enc.targets, dtype=torch.float32, device=device)
        self.query_target = enc.query_target

    def restricted(self) -> "FewShotReadout":
        """The same reader for logits that hold only the label tokens' columns, in `label_ids`
        order ((…, k) instead of (…, V)): exact in the expected-value frame, whose softmax is
        restricted to the labels anyway (so the LM head need only form k of its V rows)."""
        if self.frame != "expected_value":
            raise ValueError("only the expected-value frame reads nothing but the label tokens' logits")
        view = copy.copy(self)
        view.label_ids = torch.arange(len(self.labels), device=self.label_ids.device)
        return view

    def scalars(self, logits: torch.Tensor) -> torch.Tensor:
        return self.scalars_of(logits, self.row_targets[: logits.shape[0]])

    def scalar(self, logits_row: torch.Tensor, i: int) -> torch.Tensor:
        """s_i of row i alone (0 ≤ i < n: LOO prompt i; i = n: the query): logits (V,) → ()."""
        return self.scalars_of(logits_row[None], self.row_targets[i:i + 1])[0]

    def scalars_of(self, logits: torch.Tensor, row_targets: torch.Tensor) -> torch.Tensor:
        if self.frame == "expected_value":
            return expected_label_value(logits, self.label_ids, self.values)
        return token_prob(logits, row_targets)

    def label_distribution(self, logits_q: torch.Tensor) -> torch.Tensor:
        """(k,) fp32: the restricted softmax (expected-value frame) or each label's first-token
        probability under the full softmax (probability frame)."""
        lq = logits_q.float()
        if self.frame == "expected_value":
            return torch.softmax(lq.index_select(-1, self.label_ids), dim=-1)
        return torch.softmax(lq, dim=-1).index_select(-1, self.label_ids)

    def query_metrics(self, logits_q: torch.Tensor) -> dict[str, Any]:
        """label_probs, query_prediction s_x and query_error (s_x − target)² when known."""
        p = self.label_distribution(logits_q)
        res: dict[str, Any] = {"label_probs": {y: float(q) for y, q in zip(self.labels, p)}}
        if self.frame == "expected_value":
            s = float((p * self.values).sum())
        elif self.enc.query_target_id is not None:
            s = float(torch.softmax(logits_q.float(), dim=-1)[self.enc.query_target_id])
        else:
            s = None
        res["query_prediction"] = s
        if s is not None and self.query_target is not None:
            res["query_error"] = (s - self.query_target) ** 2
        return res
