"""Score validation: does a block score predict anything? (DESIGN §6: "validate that top-scored
heads give larger measured query-error reductions than random heads (rank correlation), and
report it".)

Protocol, per generated digit-shift task (DESIGN §7.1, paper's task):
1. The prompt kernel of the subspace (`prompt_kernel.compute_prompt_kernel`: LOO residuals r,
   per-block kernels, couplings) and the Query-Aware / Trace scores (ridge λ⋆ = the posterior median, DESIGN §5.1, §6).
2. For EVERY block b: one gradient-descent step on the LOO squared loss restricted to b,
   ΔW_b = ρ_b Σ_i r_i ∂s_i/∂W_b (= −η∇L with L = ‖r(θ)‖²/2σ², ρ = η/σ²), ρ_b = c/λ_max(K^(b)),
   c = 0.5 by default. Measured gain = (s_x − v_x)² − (s_x(W + ΔW_b) − v_x)² (positive = the query
   error went down), with the true clean query label v_x from the generator.
   The adapted query prediction is evaluated for all blocks in batched forwards: a delta on one
   layer's projection leaves that projection's own input unchanged, so adding the output probe
   x_l ΔW_bᵀ (x_l captured from the unadapted forward) to batch row b is exactly the forward with
   W + ΔW_b (checked against adapter deltas in tests).
3. Per task: a uniform random sample of `n_sample` blocks (all blocks when there are fewer) is
   evaluated, plus the top-k blocks by each score. Spearman ρ(score, gain) over the random sample
   (an unbiased sample of blocks); mean gain of the top-k blocks by each score; mean gain of k
   random blocks (the first k of the sample); mean gain over the sample (the expected gain of a
   random pick). Evaluating every block of SmolLM2 (270 heads × a full forward each) would cost
   ~10× more per task for little extra information.
Aggregates: means over tasks with percentile bootstrap 95% CIs (resampling tasks), paired for
top-k − random. The linearised one-step prediction ρ_b k_x^(b)ᵀ r of the query change is also
compared with the measured change (how well the kernel regime holds for one step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ttt_core.encoding import encode_few_shot
from ttt_core.experiments.stats import boot_ci, spearman
from ttt_core.generators import digit_shift_task
from ttt_core.models import LoadedModel
from ttt_core.prompt_kernel import PromptKernel, compute_prompt_kernel, is_per_layer
from ttt_core.prompts import FewShotPrompt
from ttt_core.readout import FewShotReadout
from ttt_core.scores import score_blocks
from ttt_core.types import CountProgress


@dataclass
class TaskOutcome:
    """One task: per-block scores (all blocks, flattened layer-major) and measured gains (NaN for
    blocks not evaluated); `sample`: the uniform random sample of blocks (Spearman, random picks);
    `random_pick`: its first k entries."""

    seed: int
    noise: float
    base_error: float
    query_aware: np.ndarray
    trace: np.ndarray
    gain: np.ndarray
    predicted_change: np.ndarray
    measured_change: np.ndarray
    sample: np.ndarray
    random_pick: np.ndarray


@dataclass
class ValidationResult:
    """Aggregates over tasks (see module docstring); `tasks` holds the raw per-task outcomes."""

    n_tasks: int
    subspace: str
    top_k: int
    c: float
    summary: dict[str, Any]
    tasks: list[TaskOutcome] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"n_tasks": self.n_tasks, "subspace": self.subspace, "top_k": self.top_k, "c": self.c, **self.summary}


def block_deltas(ev: PromptKernel, lm: LoadedModel, c: float = 0.5,
                 blocks: list[int] | None = None) -> tuple[dict[int, torch.Tensor], np.ndarray]:
    """One-GD-step logical deltas ΔW_b (full (out, in) of the block's projection) for the blocks
    with flat indices `blocks` (all by default), and ρ_b for every block.
    ΔW_b = ρ_b Σ_i r_i ∂s_i/∂W_b, ρ_b = c/λ_max(K^(b)) (ρ_b = 0 when K^(b) = 0)."""
    a = lm.adapter
    all_blocks = ev.blocks()
    chosen = range(len(all_blocks)) if blocks is None else blocks
    r = torch.as_tensor(ev.residuals, dtype=torch.float64)
    rhos = np.zeros(len(all_blocks))
    for i, (l, h) in enumerate(all_blocks):
        lmax = float(np.linalg.eigvalsh(ev.factors[l].head_kernels([h])[0].cpu().numpy())[-1])
        rhos[i] = c / lmax if lmax > 0 else 0.0
    deltas = {}
    for i in chosen:
        l, h = all_blocks[i]
        G = ev.factors[l].weighted_gradient(r, h) * rhos[i]
        full = G if is_per_layer(ev.subspace) else a.head_delta(l, ev.subspace, h, G)
        deltas[i] = full.to(device=lm.device, dtype=lm.dtype)
    return deltas, rhos


@torch.no_grad()
def adapted_query_values(lm: LoadedModel, ev: PromptKernel, prompt: FewShotPrompt, deltas: dict[int, torch.Tensor],
                         batch: int = 64) -> dict[int, float]:
    """s_x(W + ΔW_b) on the full prompt for every block index b in `deltas` (batched output-probe route)."""
    fs = encode_few_shot(lm, prompt)
    readout = FewShotReadout(fs, lm.device)
    query_row = readout.row_targets[fs.n:]                # the query prompt's target token (1,)
    ids = torch.tensor(fs.seqs[-1], device=lm.device)[None]
    kind = ev.subspace
    keys = [(l, kind) for l in range(ev.n_layers)]
    with lm.adapter.apply(capture=set(keys)) as st:
        lm.model(input_ids=ids, logits_to_keep=1)
    x = {k: st.capture_in[k][0] for k in keys}            # (L, in) per layer
    blocks = ev.blocks()
    order = list(deltas)
    out: dict[int, float] = {}
    for b0 in range(0, len(order), batch):
        sel = order[b0:b0 + batch]
        probes: dict = {}
        for j, bi in enumerate(sel):
            l = blocks[bi][0]
            if (l, kind) not in probes:
                probes[(l, kind)] = torch.zeros(len(sel), ids.shape[1], lm.adapter.spec(l, kind).out_features,
                                                dtype=lm.dtype, device=lm.device)
            probes[(l, kind)][j] = x[(l, kind)] @ deltas[bi].T
        with lm.adapter.apply(probes=probes):
            logits = lm.model(input_ids=ids.expand(len(sel), -1), logits_to_keep=1).logits[:, 0]
        vals = readout.scalars_of(logits, query_row.expand(len(sel))).double().cpu().numpy()
        out.update({bi: float(v) for bi, v in zip(sel, vals)})
    return out


def run_task(lm: LoadedModel, seed: int, subspace: str = "q", c: float = 0.5, top_k: int = 3,
             n_sample: int = 32) -> TaskOutcome:
    """Scores of every block and measured one-step gains of the evaluated blocks on digit-shift
    task `seed` (see module docstring)."""
    task = digit_shift_task(np.random.default_rng(seed))
    ev = compute_prompt_kernel(lm, task.prompt, subspace)
    sc = score_blocks(ev)
    qa, tr = sc.query_aware.ravel(), sc.trace.ravel()
    nb = qa.size
    rng = np.random.default_rng(10_000 + seed)
    sample = rng.permutation(nb)[:min(n_sample, nb)]
    evaluate = sorted(set(sample.tolist()) | set(np.argsort(-qa)[:top_k].tolist()) | set(np.argsort(-tr)[:top_k].tolist()))
    deltas, rhos = block_deltas(ev, lm, c, evaluate)
    s_new = adapted_query_values(lm, ev, task.prompt, deltas)
    s0, v = ev.query.value, ev.query.target
    base = (s0 - v) ** 2
    measured = np.full(nb, np.nan)
    for i, val in s_new.items():
        measured[i] = val - s0
    gain = base - (s0 + measured - v) ** 2
    pred = rhos * (ev.head_couplings.reshape(nb, -1) @ ev.residuals)
    return TaskOutcome(seed=seed, noise=task.noise, base_error=base, query_aware=qa, trace=tr, gain=gain,
                       predicted_change=pred, measured_change=measured, sample=sample,
                       random_pick=sample[:min(top_k, sample.size)])


def summarize(tasks: list[TaskOutcome], top_k: int) -> dict[str, Any]:
    """Aggregate per-task outcomes (means with bootstrap CIs over tasks)."""
    rows: dict[str, list[float]] = {k: [] for k in (
        "spearman_qa", "spearman_trace", "spearman_qa_abs_change", "gain_top_qa", "gain_top_trace", "gain_random",
        "gain_all_mean", "diff_qa_random", "diff_trace_random", "diff_qa_all", "linear_corr")}
    for t in tasks:
        top_qa = np.argsort(-t.query_aware)[:top_k]
        top_tr = np.argsort(-t.trace)[:top_k]
        sm = t.sample
        rows["spearman_qa"].append(spearman(t.query_aware[sm], t.gain[sm]))
        rows["spearman_trace"].append(spearman(t.trace[sm], t.gain[sm]))
        rows["spearman_qa_abs_change"].append(spearman(t.query_aware[sm], np.abs(t.measured_change[sm])))
        rows["gain_top_qa"].append(t.gain[top_qa].mean())
        rows["gain_top_trace"].append(t.gain[top_tr].mean())
        rows["gain_random"].append(t.gain[t.random_pick].mean())
        rows["gain_all_mean"].append(t.gain[sm].mean())
        rows["diff_qa_random"].append(t.gain[top_qa].mean() - t.gain[t.random_pick].mean())
        rows["diff_trace_random"].append(t.gain[top_tr].mean() - t.gain[t.random_pick].mean())
        rows["diff_qa_all"].append(t.gain[top_qa].mean() - t.gain[sm].mean())
        pc, mc = t.predicted_change[sm], t.measured_change[sm]
        rows["linear_corr"].append(float(np.corrcoef(pc, mc)[0, 1]) if np.ptp(pc) > 0 and np.ptp(mc) > 0 else np.nan)
    out: dict[str, Any] = {}
    for k, v in rows.items():
        arr = np.asarray(v, dtype=float)
        out[f"{k}_mean"] = float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")
        out[f"{k}_ci95"] = boot_ci(arr)
    out["frac_tasks_top_qa_beats_random"] = float(np.mean(np.array(rows["diff_qa_random"]) > 0))
    out["mean_base_query_error"] = float(np.mean([t.base_error for t in tasks]))
    return out


def validate_scores(lm: LoadedModel, n_tasks: int = 50, subspace: str = "q", top_k: int = 3, c: float = 0.5,
                    seed: int = 0, n_sample: int = 32, progress: CountProgress = None) -> ValidationResult:
    """Run `run_task` on tasks seed … seed + n_tasks − 1 and summarize (see module docstring)."""
    tasks = []
    for i in range(n_tasks):
        tasks.append(run_task(lm, seed + i, subspace, c, top_k, n_sample))
        if progress is not None:
            progress(i + 1, n_tasks, f"{i + 1}/{n_tasks} tasks")
    return ValidationResult(n_tasks=n_tasks, subspace=subspace, top_k=top_k, c=c, summary=summarize(tasks, top_k),
                            tasks=tasks)
