"""The paper's TTT: leave-one-out gradient descent on a few-shot prompt (Wakayama, Sec. 9 /
App. I; DESIGN §3, §7.1), on the shared run template (`ttt_core.engine`).

For a few-shot prompt with n demonstrations, s_i(θ) is the expected label value under the softmax
restricted to the label tokens (first token of label_prefix()+y after whitespace tokens shared by
all labels, as `encoding.encode_few_shot` resolves them) at the last position of
leave-one-out prompt i (batched with the query prompt, right-padded, gathered at the last real
position); residual
r_i = v(y_i) − s_i; loss L(θ) = ‖r(θ)‖² / (2σ̂²) with σ̂² = ‖r(0)‖²/n (plug-in, unadapted
residuals). Plain gradient descent with η = ρσ̂²:

       Δ ← Δ − η ∇L = Δ + ρ Σ_i r_i ∇s_i,         ρ = c / λ_max(K),  K = ΦΦᵀ, Φ_i = ∇_θ s_i

over the selected heads of W_V (the paper's choice) or W_Q. To first order one step moves the
prompt predictions by ρKr (DESIGN §3). λ_max comes from `lambda_max` / `rho` if given, else from
the exact LOO prompt kernel of the selected blocks (`selected_kernel`). Label tokens and LOO
token sequences are `encoding.encode_few_shot`'s, so s_i here is the s_i of that kernel.

Speed (the sweeps' path and the dashboard's are one path):
* the query prompt rides in the same batch as the n leave-one-out prompts, so one forward per step
  gives the loss, its gradient, the prompt residuals and the query's label distribution
  (look-ahead: the forward after step t's update is step t+1's forward, `engine.EngineRun`);
* the hidden states entering the first updated layer do not change during a run: where the
  adapter offers a `PartialForward` (Llama family) they are computed once and each step runs only
  the updated layers and above (`LooBatch(..., partial=False)` runs the whole model: the slow
  reference the tests compare against). A `shared` dict passed to several runs on the same
  prompt shares those hidden states between them (Exp2 runs dozens of block sets per prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ttt_core import memory_guard
from ttt_core.encoding import FewShotEncoding, encode_few_shot, padded_batch
from ttt_core.engine import EngineRun, effective_deltas, greedy_decode, head_masks
from ttt_core.models import LoadedModel
from ttt_core.partial_forward import PackedLoo, PartialForward, shared_partial_forward
from ttt_core.prompt_kernel import compute_prompt_kernel
from ttt_core.prompts import FewShotPrompt, Prompt
from ttt_core.readout import FewShotReadout
from ttt_core.types import Block, HeadSel, Key, StopLike

PAPER_KINDS = ("v", "q")


@dataclass
class PaperConfig:
    """Paper-mode settings (DESIGN §3, §7.1). ρ = rho if given, else c / lambda_max (λ_max of the
    selected blocks' LOO kernel, computed when not given). kind: "v" (the paper) or "q".
    partial: run only the updated layers and above where the adapter allows (same numbers)."""

    steps: int = 8
    c: float = 0.1
    rho: float | None = None
    lambda_max: float | None = None
    kind: str = "v"
    heads: HeadSel = None
    divergence_factor: float = 10.0
    max_new_tokens: int = 8
    partial: bool = True


class LooBatch:
    """The n leave-one-out prompts and the query prompt of `enc` as one right-padded batch
    (ids (n+1, N), mask (n+1, N), last real position (n+1,)); `logits(eff)` gives the (n+1, V)
    logits at each prompt's last position with W0 + eff (differentiable in eff). With `first_layer` and a `PartialForward`, layers below
    `first_layer` run once (module docstring)."""

    def __init__(self, lm: LoadedModel, enc: FewShotEncoding, first_layer: int = 0, partial: bool = True,
                 shared: dict | None = None, packed: bool = True) -> None:
        self.lm = lm
        seqs = enc.seqs
        dev = lm.device
        self.ids, self.mask, self.last = padded_batch(lm, seqs)
        self.rows = torch.arange(len(seqs), device=dev)
        self.first_layer = int(first_layer)
        self.partial: PartialForward | None = None
        self.packed: PackedLoo | None = None
        use_packed = partial and packed and PackedLoo.supports(lm.model, int(self.ids.shape[1])) \
            if lm.adapter.family == "llama" else False
        if partial and (self.first_layer > 0 or use_packed):
            self.partial = shared_partial_forward(lm.adapter, seqs, self.ids, self.mask, shared)
            if self.partial is not None and use_packed:
                self.packed = self._shared(shared, ("packed_loo", self.first_layer, tuple(tuple(s) for s in seqs)),
                                           lambda: PackedLoo(self.partial, seqs, self.first_layer))
            elif self.partial is not None:
                self.h0 = self.partial.hidden_entering(self.first_layer)

    @staticmethod
    def _shared(shared: dict | None, key: tuple, make: Any) -> Any:
        if shared is not None and key in shared:
            return shared[key]
        value = make()
        if shared is not None and value is not None:
            shared[key] = value
        return value

    @property
    def path(self) -> str:
        """Which forward runs each step: "packed" (shared prefixes, `PackedLoo`), "partial"
        (padded batch from the first updated layer) or "full" (the whole model)."""
        return "packed" if self.packed is not None else "partial" if self.partial is not None else "full"

    def logits(self, eff: dict[Key, torch.Tensor], cols: torch.Tensor | None = None) -> torch.Tensor:
        """(n+1, V) last-position logits at W0 + eff; with `cols`, only those vocabulary columns
        ((n+1, len(cols)); the packed path then forms only those rows of the LM head)."""
        with self.lm.adapter.apply(deltas=eff):
            if self.packed is not None:
                return self.packed.logits(cols)
            elif self.partial is not None:
                logits = self.partial.logits_from(self.first_layer, self.h0, self.rows, self.last)
            else:
                out = self.lm.model(input_ids=self.ids, attention_mask=self.mask, use_cache=False,
                                    logits_to_keep=self.last[:, None])
                logits = out.logits[:, 0]
        return logits if cols is None else logits.index_select(-1, cols)


def selected_kernel(lm: LoadedModel, prompt: FewShotPrompt, kind: str = "v", heads: HeadSel = None) -> tuple[np.ndarray, np.ndarray]:
    """The prompt kernel of the selected blocks (exact LOO autograd route, DESIGN §2):
    K = Σ_{(l,h) selected} K^(l,h) (n, n) float64, and the unadapted residuals r (n,).
    heads None = every head of `kind` in every layer."""
    ev = compute_prompt_kernel(lm, prompt, subspace=kind)
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


class PaperRun(EngineRun):
    """The paper's TTT: plain GD on the squared LOO loss of a few-shot prompt (module docstring;
    DESIGN §3, §7.1). run.rho, run.lambda_max, run.sigma2, run.eta say what was used;
    run.rho_source says where ρ came from. `shared`: a dict shared by runs on the same prompt."""

    mode = "paper"

    def __init__(self, lm: LoadedModel, prompt: Prompt | str, config: PaperConfig | None = None, stop: StopLike = None,
                 shared: dict | None = None) -> None:
        super().__init__(lm, prompt, config or PaperConfig(), stop)
        if not isinstance(self.prompt, FewShotPrompt):
            raise ValueError("paper mode needs a few-shot prompt (x -> y lines): its loss is the leave-one-out "
                             "squared error of the demonstrations (DESIGN §7.1). Use qTTT for long contexts.")
        if self.config.kind not in PAPER_KINDS:
            raise ValueError("paper mode updates W_V (the paper) or W_Q: kind must be 'v' or 'q'")
        self._shared = shared

    def _prepare(self) -> None:
        lm, cfg = self.lm, self.config
        p: FewShotPrompt = self.prompt
        self.enc = encode_few_shot(lm, p)
        self.readout = FewShotReadout(self.enc, lm.device)
        # expected-value frame: the prediction reads only the label tokens' logits, so the forward
        # forms only those columns (`cols`) and a reader of such logits (`_reader`) takes them
        restrict = self.readout.frame == "expected_value"
        self.cols = self.readout.label_ids if restrict else None
        self._reader = self.readout.restricted() if restrict else self.readout
        self.masks = head_masks(lm, cfg.kind, cfg.heads)
        first = min(layer for layer, _ in self.masks)
        # refuse a LOO batch that cannot fit before any of it is built (MemoryBudgetError names
        # fewer layers or demonstrations that fit); an OOM later still ends in that message
        self._mem = memory_guard.check_paper_gd(lm, self.enc, first if cfg.partial else 0, cfg.kind)
        with memory_guard.oom_guard(*self._mem):
            self.batch = LooBatch(lm, self.enc, first, partial=cfg.partial, shared=self._shared)
        how = "layers below the first updated one run once" if self.batch.partial is not None else "full forward"
        self.backend, self.backend_label = "torch-sdpa", f"PyTorch SDPA (paper mode: {how}, no frozen cache)"
        self.y = self.readout.targets
        self.deltas = {k: torch.zeros(lm.adapter.spec(*k).out_features, lm.adapter.spec(*k).in_features,
                                      device=lm.device) for k in self.masks}
        self.query_ids = torch.tensor([self.enc.ids], device=lm.device)
        with torch.no_grad():
            s0 = self._reader.scalars(self.batch.logits({}, self.cols))
        r0 = self.y - s0[: self.enc.n]
        self.n = int(r0.shape[0])
        self.sigma2 = max(float((r0 ** 2).sum()) / self.n, 1e-12)  # σ̂² = ‖r0‖²/n (plug-in)
        if cfg.rho is not None:
            self.rho, self.lambda_max, self.rho_source = float(cfg.rho), cfg.lambda_max, "given ρ"
        else:
            lam, src = cfg.lambda_max, "given λ_max"
            if lam is None:
                K, _ = selected_kernel(lm, p, cfg.kind, cfg.heads)
                lam, src = float(np.linalg.eigvalsh(K)[-1]), "prompt kernel of the selected blocks"
            self.lambda_max, self.rho_source = float(lam), src
            self.rho = float(cfg.c) / max(self.lambda_max, 1e-30)
        self.eta = self.rho * self.sigma2

    def _baseline_loss(self) -> float:
        return self.n / 2.0  # ‖r0‖²/(2σ̂²) = n/2

    def _baseline_loss_per_token(self) -> float:
        return self.sigma2

    def _reference_loss(self, info: dict[str, Any]) -> float:
        return self.n / 2.0

    def _forward(self, deltas: dict[Key, torch.Tensor], grad: bool) -> dict[str, Any]:
        """One batched forward at `deltas`: last-position logits (n+1, V), s (n+1,), ½‖r‖²; with
        `grad` the graph is kept (leaves = the deltas)."""
        leaves = {k: d.detach().requires_grad_(grad) for k, d in deltas.items()}
        with memory_guard.oom_guard(*self._mem), torch.enable_grad() if grad else torch.no_grad():
            logits = self.batch.logits(effective_deltas(leaves, self.masks), self.cols)
            s = self._reader.scalars(logits)
            half_sq = 0.5 * ((self.y - s[: self.n]) ** 2).sum()  # ½‖r‖²; L = ½‖r‖²/σ̂²
        return {"deltas": deltas, "leaves": leaves, "logits": logits, "s": s, "half_sq": half_sq}

    def _loss_grads(self, deltas, t):
        pend, self._pending = self._pending, None
        fw = pend if pend is not None and pend["deltas"] is deltas else self._forward(deltas, grad=True)
        s, half_sq = fw["s"][: self.n], fw["half_sq"]
        r = (self.y - s).detach()
        loss = half_sq.detach() / self.sigma2
        if not torch.isfinite(loss):
            return loss, None, {"per_token": float("nan")}
        with memory_guard.oom_guard(*self._mem):
            grads = torch.autograd.grad(half_sq, list(fw["leaves"].values()))
        info = {"per_token": float((r ** 2).mean()), "s": s.detach().cpu().tolist()}
        return loss, {k: g for k, g in zip(fw["leaves"], grads)}, info

    def _update(self, deltas, grads):
        # Δ ← Δ − η∇L = Δ − ρ∇(½‖r‖²) = Δ + ρ Σ r_i ∇s_i   (DESIGN §3)
        return {k: d - self.rho * grads[k].float() for k, d in deltas.items()}

    def _evaluate(self, deltas, lookahead: bool = False) -> dict[str, Any]:
        """Query metrics and the LOO predictions at `deltas` from one forward; with `lookahead`
        its graph is kept for the next step's gradient (class `EngineRun` docstring)."""
        fw = self._forward(deltas, grad=lookahead)
        if lookahead:
            self._pending = fw
        res = self._reader.query_metrics(fw["logits"][self.n].detach())
        res["prompt_predictions"] = fw["s"][: self.n].detach().cpu().tolist()
        return res

    def predictions(self, eff: dict[Key, torch.Tensor]) -> torch.Tensor:
        """s (n+1,) fp32 at W0 + eff (eff already masked; differentiable in eff): the n LOO
        predictions, then the query's."""
        self.prepare()
        return self._reader.scalars(self.batch.logits(eff, self.cols))

    def loo_predictions(self, deltas: dict[Key, torch.Tensor] | None = None) -> torch.Tensor:
        """s (n,) at W0 + Δ (default: the run's last good deltas)."""
        self.prepare()
        return self._forward(self.deltas if deltas is None else deltas, grad=False)["s"][: self.n]

    def generate(self, adapted: bool = True, max_new_tokens: int | None = None) -> str:
        """Greedy answer with W0 + Δ everywhere (W_V changes the K/V, so no frozen cache here)."""
        self.prepare()
        deltas = effective_deltas(self.deltas, self.masks) if adapted else None
        return greedy_full_decode(self.lm, self.query_ids, deltas, max_new_tokens or self.config.max_new_tokens)

    def label_distribution(self, adapted: bool = True) -> dict[str, float]:
        self.prepare()
        return self._evaluate(self.deltas if adapted else {})["label_probs"]


def greedy_full_decode(lm: LoadedModel, prompt_ids: torch.Tensor, deltas: dict[Key, torch.Tensor] | None,
                       max_new_tokens: int) -> str:
    """Greedy decode with the deltas active for every token (prefill included)."""
    template = None
    if prompt_ids.shape[1] > 1:
        with torch.no_grad(), lm.adapter.apply(deltas=deltas or {}):
            template = lm.model.get_decoder()(input_ids=prompt_ids[:, :-1], use_cache=True).past_key_values
    return greedy_decode(lm, prompt_ids, deltas, template, max_new_tokens)


def gd_trajectory(lm: LoadedModel, prompt: FewShotPrompt, kind: str, blocks: Sequence[Block], rho: float, steps: int,
                  shared: dict | None = None) -> dict[str, Any]:
    """Paper-mode GD on `blocks` at scaled step ρ for `steps` steps, for sweeps: arrays over
    T = 0…steps of the query prediction, its squared error (None without a target) and the prompt
    MSE ‖r_T‖²/n. Only a non-finite state stops the run (no loss-ratio rule); later steps then
    repeat the last good values and status is "diverged"."""
    cfg = PaperConfig(steps=int(steps), rho=float(rho), kind=kind, heads=[tuple(b) for b in blocks],
                      divergence_factor=float("inf"))
    run = PaperRun(lm, prompt, cfg, shared=shared)
    recs = [run.prepare()] + [r for r in run.steps() if r.status == "ok"]
    y = run.y.cpu().numpy().astype(float)
    pred = [r.query_prediction for r in recs]
    pmse = [float(np.mean((y - np.asarray(r.prompt_predictions)) ** 2)) for r in recs]
    status = "done" if run.status == "done" else "diverged"
    pred += [pred[-1]] * (int(steps) + 1 - len(pred))
    pmse += [pmse[-1]] * (int(steps) + 1 - len(pmse))
    pred_a = np.array(pred, dtype=float)
    target = run.enc.query_target
    err = None if target is None else (pred_a - float(target)) ** 2
    return {"prediction": pred_a, "error": err, "prompt_mse": np.array(pmse), "status": status}
