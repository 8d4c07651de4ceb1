"""The run template shared by both live TTT engines (DESIGN §3, §7): a run is a generator
that yields a `StepRecord` after every step. `ttt_core.qttt` (query-only TTT, DESIGN §7.2) and
`ttt_core.paper_gd` (the paper's leave-one-out gradient descent, DESIGN §3, §7.1) fill it in;
`make_run` picks one by mode.

Isolation (DESIGN §1). The shared model is never mutated. A run keeps fp32 *master deltas*
ΔW[(layer, kind)] of shape (out_features, in_features) and runs every forward inside
``lm.adapter.apply(deltas=…)`` (per-thread contextvars), so W_eff = W0 + ΔW for that thread only.
Two runs in two threads with different settings give exactly what each gives alone.

Divergence rule (both modes). A step is *divergent* when its loss or gradient norm is not finite,
when its loss exceeds `divergence_factor` (10) × the unadapted loss of the same data — for qTTT
the same span's base NLL, known for free from the prefill logits, floored at 0.1 nat per token so
near-zero references cannot trigger on noise; for paper mode the unadapted LOO loss n/2 — or when
the evaluation after the update is not finite. The run then stops, discards the update that
produced the bad state and reports the last good deltas (those that gave a sane loss), and the
record says why. A run also stops when `stop` (a threading.Event or a callable) is set.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch
from transformers import DynamicCache

from ttt_core import cpu_threads
from ttt_core.models import LoadedModel
from ttt_core.optim import global_grad_norm
from ttt_core.prompts import Prompt, parse_prompt
from ttt_core.types import HeadSel, Key, StopLike, should_stop


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



def head_masks(lm: LoadedModel, kind: str, heads: HeadSel) -> dict[Key, torch.Tensor | None]:
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


def effective_deltas(deltas: dict[Key, torch.Tensor], masks: dict[Key, torch.Tensor | None]) -> dict[Key, torch.Tensor]:
    return {k: (d if masks.get(k) is None else d * masks[k]) for k, d in deltas.items()}


def _layer_norms_checked(n_layers: int, deltas: dict[Key, torch.Tensor]) -> tuple[list[float], bool]:
    """(‖ΔW_l‖_F per layer (0 for layers without a delta), whether every entry of every delta is
    finite), from one fused fp32 norm over all deltas and one host sync: a norm is finite iff its
    entries are, except when finite entries overflow fp32 — then that norm is redone in float64."""
    out = [0.0] * n_layers
    keys = list(deltas)
    if not keys:
        return out, True
    norms = torch.stack(torch._foreach_norm([deltas[k].detach().float() for k in keys])).tolist()
    finite = True
    for key, n in zip(keys, norms):
        if not math.isfinite(n):
            d = deltas[key]
            if bool(torch.isfinite(d).all()):    # finite entries whose fp32 ‖·‖ overflows
                n = float(d.detach().double().norm())
            else:
                finite = False
        out[key[0]] = n
    return out, finite


def _layer_norms(n_layers: int, deltas: dict[Key, torch.Tensor]) -> list[float]:
    return _layer_norms_checked(n_layers, deltas)[0]


def _finite(x: Any) -> bool:
    """None, or a finite number; lists and dicts (label_probs, prompt_predictions): every value."""
    if x is None:
        return True
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(_finite(v) for v in x)
    return not isinstance(x, (int, float)) or math.isfinite(x)  # other values (text) are not numbers



def greedy_decode(lm: LoadedModel, prompt_ids: torch.Tensor, deltas: dict[Key, torch.Tensor] | None, template: Any,
                  max_new_tokens: int) -> str:
    """Greedy decode of up to `max_new_tokens`. `template` is a DynamicCache of prompt_ids[:, :-1]
    computed with the base weights; a deep copy is extended, so the context's K/V stay frozen and
    only the last prompt token and new tokens are computed with the (adapted) weights. Stops at
    EOS or at a newline after some text; returns the stripped first line."""
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


class EngineRun:
    """Skeleton shared by both modes: prepare → loop of (loss+grad, update, evaluate) with the
    divergence rule and the stop flag (module docstring). Subclasses implement `_prepare`,
    `_loss_grads`, `_update`, `_evaluate`, `_reference_loss`.

    Look-ahead: the metrics after step t's update and the loss of step t+1 are computed at the
    same deltas, so `_evaluate(new, lookahead=True)` may run both in ONE forward (with the graph
    kept) and leave it in `_pending`; step t+1's `_loss_grads` then only back-propagates. Results
    are those of separate passes (the same rows at the same deltas); a step's forward is then
    timed in the previous record's `eval_s`."""

    mode = ""
    #: run the step loop's compute inside `cpu_threads.gemm_threads_only` (fewer OpenMP wake-ups): on for
    #: qTTT, whose steps are thousands of small ops (≈7 % on the 16-step needle task, `cpu_threads` docstring);
    #: off for paper GD, whose batched LOO ops are large (the same bench measured it 1.4× slower inside: 4.65 → 6.49 s)
    gemm_threads_only = False

    def __init__(self, lm: LoadedModel, prompt: Prompt | str, config: Any, stop: StopLike = None) -> None:
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

    def _threads(self) -> Any:
        """The step loop's thread context (class attribute `gemm_threads_only`)."""
        return cpu_threads.gemm_threads_only() if self.gemm_threads_only else contextlib.nullcontext()

    # ------------------------------------------------------------------ public
    def request_stop(self) -> None:
        """Ask a running `steps()` loop to stop before its next step (thread-safe)."""
        self._stop_event.set()

    def prepare(self) -> StepRecord:
        """Prefill / set-up (idempotent); returns the step-0 record of unadapted metrics."""
        if not self._prepared:
            self._t0 = time.perf_counter()
            self._prepare()                    # the prefill's large element-wise ops gain from all threads
            self._prepared = True
            with self._threads():
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
        # (deltas, metrics at them, step that produced them) for the current and the previous state,
        # so a divergence reports the numbers of the deltas it keeps (a resumed run starts at its last record)
        prev = cur = self.deltas
        last_metrics = self._metrics_of(self.records[-1] if self.records else self.baseline)
        prev_metrics, prev_step = last_metrics, len(self.records)
        for t in range(len(self.records) + 1, self.config.steps + 1):
            if self._stop_event.is_set() or should_stop(self._stop_external):
                self.status, self.reason = "stopped", f"stopped on request after {t - 1} step(s)"
                return
            ts = time.perf_counter()
            with self._threads():              # fewer OpenMP wake-ups (ttt_core.cpu_threads); not across a yield
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
                if prev_step < t - 1:
                    why += f"; the update of step {t - 1} led there and was discarded"
                yield self._diverged(t, lossf, None, why, prev, prev_metrics, ts, info, prev_step)
                return
            self.deltas = cur  # verified: gave a sane loss
            gnorm = global_grad_norm(grads) if grads else 0.0
            self._gnorm = gnorm
            if not math.isfinite(gnorm):
                yield self._diverged(t, lossf, gnorm, f"step {t}: the gradient norm is {gnorm} (not finite)",
                                     cur, last_metrics, ts, info, t - 1)
                return
            with self._threads():
                new = self._update(cur, grads)
            new_norms, finite = _layer_norms_checked(n_layers, new)   # the record's delta_norms below
            if not finite:
                yield self._diverged(t, lossf, gnorm, f"step {t}: the update produced non-finite weights",
                                     cur, last_metrics, ts, info, t - 1)
                return
            step_s = time.perf_counter() - ts
            te = time.perf_counter()
            ahead = self.lookahead and t < self.config.steps and not self._stop_event.is_set()
            with self._threads():
                metrics = self._evaluate(new, lookahead=ahead)
            eval_s = time.perf_counter() - te
            # every metric, not only those with a target: without '# answer:' a NaN query prediction
            # (or LOO prediction, label probability, needle mass) must stop the run too
            bad = [k for k, v in metrics.items() if not _finite(v)]
            if bad:
                yield self._diverged(t, lossf, gnorm, f"step {t}: after the update {bad[0]} is not finite",
                                     cur, last_metrics, ts, info, t - 1)
                return
            prev, cur = cur, new
            self.deltas = cur
            prev_metrics, prev_step, last_metrics = last_metrics, t - 1, metrics
            rec = StepRecord(step=t, mode=self.mode, loss=lossf, loss_per_token=info.get("per_token", lossf),
                             span_start=info.get("start"), span_len=info.get("span"), grad_norm=gnorm,
                             step_s=step_s, eval_s=eval_s, wall_s=step_s + eval_s,
                             elapsed_s=time.perf_counter() - self._t0, delta_norms=new_norms,   # cur is new
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
                  metrics: dict[str, Any], ts: float, info: dict[str, Any], kept_step: int) -> StepRecord:
        """The record of divergent step t: `keep` (the deltas after step `kept_step`) are the run's
        deltas from now on, and `metrics` (evaluated at `keep`) are the record's metrics."""
        self.deltas = keep
        metrics = {k: copy.copy(v) if isinstance(v, (list, dict)) else v for k, v in metrics.items()}  # own copies
        kept = "the unadapted weights" if kept_step == 0 else f"the deltas after step {kept_step}"
        self.status, self.reason = "diverged", f"{why}; the run stopped and kept the last good deltas ({kept})"
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
