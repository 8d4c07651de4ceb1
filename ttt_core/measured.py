"""The measured side of Steps & bounds: one real TTT run over the step grid (DESIGN §3, §5, §7).

Few-shot prompts run paper-mode GD (`paper_gd.PaperRun`) at the theory's ρ, so its curves compare
step for step with the kernel's linearised prediction; a long context with an answer runs qTTT
(`qttt.QTTTRun`), whose answer NLL is what qTTT does rather than a test of the linearised curve.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ttt_core.engine import EngineRun, StepRecord
from ttt_core.models import LoadedModel
from ttt_core.paper_gd import PaperConfig, PaperRun
from ttt_core.prompts import FewShotPrompt, LongContextPrompt
from ttt_core.qttt import QTTTConfig, QTTTRun
from ttt_core.types import Block, Progress


@dataclass
class Measured:
    """One engine run over the grid: arrays (G,) with NaN after a divergence or early stop."""
    engine: str
    comparable: bool
    note: str
    prediction: np.ndarray | None = None
    error: np.ndarray | None = None
    prompt_mse: np.ndarray | None = None
    nll: np.ndarray | None = None
    prob: np.ndarray | None = None
    steps_run: int = 0
    status: str = "done"
    reason: str | None = None
    seconds: float = 0.0


def _record(run: EngineRun, grid_max: int, put: Callable[[StepRecord], None], what: str,
            progress: Progress) -> None:
    """Feed the step-0 record and every good step's record to `put`, reporting progress."""
    put(run.prepare())
    for rec in run.steps():
        if rec.status != "ok":
            break
        put(rec)
        if progress is not None:
            progress(rec.step / max(grid_max, 1), f"{what} step {rec.step}/{grid_max}")


def measure_fewshot(lm: LoadedModel, prompt: FewShotPrompt, subspace: str, blocks: Sequence[Block], rho: float,
                    lambda_max: float, grid_max: int, progress: Progress = None) -> Measured:
    """Paper-mode GD (`paper_gd.PaperRun`) with ρ = the theory's ρ; records every step."""
    t0 = time.perf_counter()
    cfg = PaperConfig(steps=int(grid_max), rho=float(rho), lambda_max=float(lambda_max), kind=subspace,
                      heads=[tuple(b) for b in blocks])
    run = PaperRun(lm, prompt, cfg)
    G = int(grid_max) + 1
    pred, err, pmse = np.full(G, np.nan), np.full(G, np.nan), np.full(G, np.nan)

    def put(rec: StepRecord) -> None:
        t = rec.step
        pred[t] = rec.query_prediction if rec.query_prediction is not None else np.nan
        err[t] = rec.query_error if rec.query_error is not None else np.nan
        if rec.prompt_predictions is not None:
            y = run.y.cpu().numpy().astype(float)   # the readout's targets (1 for categorical labels)
            pmse[t] = float(np.mean((y - np.asarray(rec.prompt_predictions)) ** 2))

    _record(run, grid_max, put, "Paper-mode GD", progress)
    has_err = bool(np.isfinite(err).any())
    return Measured(engine=f"paper-mode GD on the squared LOO loss (ρ = {rho:.4g} = c/λ_max of the same K)",
                    comparable=True, note="Engine step ρ equals the theory's ρ: curves are comparable step for step.",
                    prediction=pred, error=err if has_err else None, prompt_mse=pmse, steps_run=len(run.records),
                    status=run.status, reason=run.reason, seconds=time.perf_counter() - t0)


def measure_long(lm: LoadedModel, prompt: LongContextPrompt, blocks: Sequence[Block], grid_max: int, lr: float,
                 span: int, seed: int, progress: Progress = None) -> Measured:
    """qTTT (`qttt.QTTTRun`, W_Q of the selected heads); records the answer NLL/prob every step."""
    t0 = time.perf_counter()
    run = QTTTRun(lm, prompt, QTTTConfig(steps=int(grid_max), span=int(span), lr=float(lr),
                                         heads=[tuple(b) for b in blocks], seed=int(seed)))
    G = int(grid_max) + 1
    nll, prob = np.full(G, np.nan), np.full(G, np.nan)

    def put(rec: StepRecord) -> None:
        nll[rec.step] = np.nan if rec.answer_nll is None else rec.answer_nll
        prob[rec.step] = np.nan if rec.answer_prob is None else rec.answer_prob

    _record(run, grid_max, put, "qTTT", progress)
    return Measured(engine=f"qTTT (AdamW lr {lr:g}, span {span}, W_Q of the selected heads)", comparable=False,
                    note=("qTTT optimises the span NLL with AdamW, not the squared loss with GD at step ρ: its "
                          "answer NLL is what qTTT does, not a test of the linearised curve."),
                    nll=nll, prob=prob, steps_run=len(run.records), status=run.status, reason=run.reason,
                    seconds=time.perf_counter() - t0)
