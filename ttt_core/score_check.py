"""Per-prompt check of the head scores against real TTT (DESIGN §6 "a score is only worth showing if
it predicts something", §10 head choice; GitHub issue 13 point 5).

For one prompt, its prompt kernel and its block scores, adapt exactly one k-subset of blocks for
`steps` steps of real TTT and measure how the query error changed, for

* the top-k blocks of the chosen score (the first k of ``scores.ranked(score)``),
* the bottom-k (its last k),
* ``random_subsets`` random k-subsets (``numpy.random.default_rng(seed)``; subset i is
  ``sorted(rng.choice(#blocks, k, replace=False))`` over ``ev.blocks()`` in layer-major order,
  drawn one after the other).

Real TTT (the engine) and what is measured:

* few-shot prompt with a known answer, subspace "v" or "q": paper GD (`paper_gd.gd_trajectory`) on
  the subset's heads with ρ = c/λ_max(K_S), K_S = Σ_{b∈S} K^(b) the subset's own kernel (as paper GD
  and the Steps page use); measured = change of the query's squared error (s_x − v(y))² after
  `steps` steps;
* long context with a question and an answer, subspace "q": qTTT (`qttt.QTTTRun`, heads = the
  subset, the same steps, span, lr and span seed for every subset: a paired comparison);
  measured = change of the answer NLL.

Linearised prediction of the same change, from the kernel only (`steps.block_kernel` +
`steps.theory_curves` at T = steps with ρ = c/λ_max(K_S)): few-shot, the change of the linearised
query squared error — the same quantity as measured, so the two agree to first order in ρ; long
context, the change of the first answer token's probability error 1 − p under linearised GD —
a different quantity on a different scale from qTTT's answer-NLL change (``same_scale`` False),
so only ranks (Spearman) compare there.

When the check is not possible (no query or no known answer; a subspace the engine does not update:
paper GD updates W_V / W_Q only, qTTT W_Q only; free text) the result has ``possible`` False, no
subsets and a ``note`` saying why.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from ttt_core.models import LoadedModel
from ttt_core.paper_gd import PAPER_KINDS, gd_trajectory
from ttt_core.prompt_kernel import PromptKernel, subspace_label
from ttt_core.prompts import FewShotPrompt, LongContextPrompt, Prompt
from ttt_core.qttt import DEFAULT_LR, QTTTConfig, QTTTRun
from ttt_core.scores import BlockScores
from ttt_core.steps import block_kernel, theory_curves
from ttt_core.types import Block, Progress, block_label

DEFAULT_K = 3
DEFAULT_STEPS = 4
DEFAULT_C = 0.1
DEFAULT_RANDOM = 5
DEFAULT_QTTT_SPAN = 128

PAPER_ENGINE = "paper GD"
QTTT_ENGINE = "qTTT"


@dataclass
class SubsetResult:
    """One adapted k-subset.

    label: "top-k", "bottom-k" or "random i"; blocks: canonical labels (``L2.vH1``); measured: the
    measured change (query squared error for paper GD, answer NLL for qTTT; None when not finite);
    measured_start / measured_end: that metric at T = 0 and T = steps; predicted: the linearised
    change (module docstring); rho: c/λ_max(K_S); status: "done" or "diverged"; seconds: wall
    time of this subset's run and prediction."""

    label: str
    blocks: list[str]
    measured: float | None
    predicted: float | None
    measured_start: float | None = None
    measured_end: float | None = None
    rho: float | None = None
    status: str = "done"
    seconds: float = 0.0


@dataclass
class ScoreCheck:
    """The check of one score on one prompt (module docstring). Changes are "after − before":
    negative = the error went down (better)."""

    possible: bool
    note: str | None
    score: str
    subspace: str
    k: int
    steps: int
    c: float
    seed: int
    random_subsets: int
    engine: str | None = None
    measured_label: str | None = None
    predicted_label: str | None = None
    same_scale: bool = True
    subsets: list[SubsetResult] = field(default_factory=list)
    random_mean: float | None = None
    top_beats_random: bool | None = None
    top_beats_bottom: bool | None = None
    spearman: float | None = None
    summary: str = ""
    seconds: float = 0.0

    def subset(self, label: str) -> SubsetResult:
        """The subset called `label` ("top-k", "bottom-k", "random 1", …)."""
        for s in self.subsets:
            if s.label == label:
                return s
        raise KeyError(label)

    @property
    def randoms(self) -> list[SubsetResult]:
        return [s for s in self.subsets if s.label.startswith("random")]

    def table_rows(self) -> list[dict[str, Any]]:
        """One row per subset for a table: subset, blocks, measured and linearised change, status, seconds."""
        m = f"measured Δ ({self.measured_label})" if self.measured_label else "measured Δ"
        p = f"linearised Δ ({self.predicted_label})" if self.predicted_label else "linearised Δ"
        return [{"subset": s.label, "blocks": ", ".join(s.blocks), m: s.measured, p: s.predicted,
                 "status": s.status, "seconds": round(s.seconds, 3)} for s in self.subsets]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able after `diagnosis.json_clean`)."""
        return asdict(self)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _finite(x: Any) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def default_score(scores: BlockScores) -> str:
    """"Query-Aware" when the scores have it (a query exists), else "Trace"."""
    return "Query-Aware" if scores.query_aware is not None else "Trace"


def _why_not(prompt: Prompt, ev: PromptKernel) -> str | None:
    """Why the check cannot run on this prompt and subspace (None when it can)."""
    sub = ev.subspace
    if isinstance(prompt, FewShotPrompt):
        if sub not in PAPER_KINDS:
            return (f"Paper GD updates W_V or W_Q heads only; the {subspace_label(sub)} scores cannot be "
                    "checked against real TTT (choose subspace 'v' or 'q').")
        if ev.query is None or ev.head_couplings is None:
            return ev.query_note or "This prompt has no query output, so there is no query error to change."
        if ev.query.target is None or prompt.query_y is None:
            return ("No known answer (add '# answer: y'): without it the query error, and so its measured change, "
                    "is unknown.")
        return None
    if isinstance(prompt, LongContextPrompt):
        if prompt.question is None or not prompt.answer:
            return ("No 'Question:' with an 'Answer:' line: qTTT has no answer NLL to change (free text has no "
                    "query), so the scores cannot be checked.")
        if sub != "q":
            return (f"qTTT updates W_Q only; the {subspace_label(sub)} scores of a long context cannot be "
                    "checked against real TTT (choose subspace 'q').")
        if ev.query is None or ev.head_couplings is None:
            return ev.query_note or "This prompt has no query output."
        return None
    return "Unknown prompt type: only few-shot prompts and long contexts can be checked."


def choose_subsets(ev: PromptKernel, scores: BlockScores, score: str, k: int, random_subsets: int,
                   seed: int) -> list[tuple[str, list[Block]]]:
    """(label, blocks) of the top-k, bottom-k and random k-subsets (module docstring)."""
    ranked = [(int(r["layer"]), int(r["head"])) for r in scores.ranked(score)]
    all_blocks = ev.blocks()
    out = [("top-k", ranked[:k]), ("bottom-k", ranked[-k:])]
    rng = np.random.default_rng(int(seed))
    for i in range(int(random_subsets)):
        idx = np.sort(rng.choice(len(all_blocks), size=k, replace=False))
        out.append((f"random {i + 1}", [all_blocks[int(j)] for j in idx]))
    return out


def _spearman(pred: Sequence[float | None], meas: Sequence[float | None]) -> float | None:
    pairs = [(p, m) for p, m in zip(pred, meas) if p is not None and m is not None]
    if len(pairs) < 3:
        return None
    a, b = np.array(pairs).T
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return _finite(spearmanr(a, b).statistic)


def _summary(chk: ScoreCheck) -> str:
    if not chk.possible:
        return f"Check of the {chk.score} scores not possible: {chk.note}"
    k = chk.k
    top, bot = chk.subset("top-k"), chk.subset("bottom-k")

    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:+.3g}"

    what = {PAPER_ENGINE: f"paper GD on the subset's heads, ρ = c/λ_max(K_S), c = {chk.c:g}",
            QTTT_ENGINE: "qTTT on the subset's W_Q heads"}[chk.engine]
    rand = (f"the {len(chk.randoms)} random {k}-subsets by {f(chk.random_mean)} on average and "
            if chk.randoms else "")
    text = (f"Check of the {chk.score} scores against real TTT ({what}; {chk.steps} steps, k = {k}): the top-{k} "
            f"changed the {chk.measured_label} by {f(top.measured)}, {rand}the bottom-{k} by {f(bot.measured)} "
            "(lower is better).")
    if not chk.randoms and chk.top_beats_bottom is not None:
        text += (f" Measured, the top-{k} {'beats' if chk.top_beats_bottom else 'does not beat'} the bottom-{k} "
                 "(no random subsets).")
    elif chk.top_beats_random is None or chk.top_beats_bottom is None:
        text += " A measured change is missing, so top-k vs random/bottom-k is undecided."
    else:
        verdict = {(True, True): f"beats both the random mean and the bottom-{k}",
                   (True, False): f"beats the random mean but not the bottom-{k}",
                   (False, True): f"beats the bottom-{k} but not the random mean",
                   (False, False): f"beats neither the random mean nor the bottom-{k}"}
        text += f" Measured, the top-{k} {verdict[(chk.top_beats_random, chk.top_beats_bottom)]}."
    n = sum(1 for s in chk.subsets if s.measured is not None and s.predicted is not None)
    if chk.spearman is None:
        text += f" Spearman of linearised vs measured change: undefined ({n} usable subsets or a constant column)."
    else:
        text += f" Spearman of linearised vs measured change over {n} subsets: {chk.spearman:.2f}."
    if not chk.same_scale:
        text += (f" Scales differ: measured is the {chk.measured_label} under qTTT, linearised is the "
                 f"{chk.predicted_label} under GD; compare ranks, not values.")
    div = [s.label for s in chk.subsets if s.status != "done"]
    if div:
        text += f" Diverged (last good values kept): {', '.join(div)}."
    if set(top.blocks) & set(bot.blocks):
        text += " The top-k and bottom-k overlap (few blocks)."
    return text


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def check_scores(lm: LoadedModel, prompt: Prompt, ev: PromptKernel, scores: BlockScores, *, k: int = DEFAULT_K,
                 steps: int = DEFAULT_STEPS, c: float = DEFAULT_C, random_subsets: int = DEFAULT_RANDOM, seed: int = 0,
                 score: str | None = None, qttt_lr: float = DEFAULT_LR, qttt_span: int = DEFAULT_QTTT_SPAN,
                 progress: Progress = None) -> ScoreCheck:
    """Measured vs linearised query-error change of the top-k, bottom-k and random k-subsets.

    Args:
        lm: the model the kernel was computed with (never mutated).
        prompt: the prompt of `ev`.
        ev: its PromptKernel (the subspace is ev.subspace).
        scores: `score_blocks(ev)`.
        k: blocks per subset (clamped to the number of blocks).
        steps: TTT steps per subset (≥ 1).
        c: ρ = c/λ_max(K_S), 0 < c < 1 (paper GD and the linearised prediction).
        random_subsets: number of random k-subsets (≥ 0).
        seed: seeds the random subsets (numpy Generator) and qTTT's span draws.
        score: the score to check (default "Query-Aware", or "Trace" without a query).
        qttt_lr, qttt_span: qTTT settings for a long context.
        progress: callback(fraction, text) after every subset's run.
    Returns:
        ScoreCheck (``possible`` False with a ``note`` when the check cannot run).
    Raises:
        ValueError: bad k/steps/c, an unknown score, or scores not of this kernel.
    """
    t0 = time.perf_counter()
    score = score or default_score(scores)
    avail = scores.available()
    if score not in avail:
        raise ValueError(f"score {score!r} is not available; choose one of {list(avail)}")
    if scores.trace.shape != (ev.n_layers, ev.n_blocks_per_layer):
        raise ValueError("the scores are not of this prompt kernel (block grid differs)")
    if int(steps) < 1:
        raise ValueError("steps must be ≥ 1")
    if not 0.0 < float(c) < 1.0:
        raise ValueError("c must lie in (0, 1)")
    if int(k) < 1 or int(random_subsets) < 0:
        raise ValueError("k must be ≥ 1 and random_subsets ≥ 0")
    n_blocks = len(ev.blocks())
    k = min(int(k), n_blocks)
    chk = ScoreCheck(possible=False, note=None, score=score, subspace=ev.subspace, k=k, steps=int(steps), c=float(c),
                     seed=int(seed), random_subsets=int(random_subsets))
    note = _why_not(prompt, ev)
    if note is None and len(scores.ranked(score)) < n_blocks:
        note = (f"{score} ranks only {len(scores.ranked(score))} of the {n_blocks} blocks (its picks), so there is "
                "no bottom-k; check Query-Aware or Trace instead.")
    if note is not None:
        chk.note = note
        chk.summary = _summary(chk)
        chk.seconds = time.perf_counter() - t0
        return chk

    few = isinstance(prompt, FewShotPrompt)
    chk.possible = True
    chk.engine = PAPER_ENGINE if few else QTTT_ENGINE
    chk.measured_label = "query squared error" if few else "answer NLL"
    chk.predicted_label = "query squared error" if few else "1 − p of the first answer token"
    chk.same_scale = few
    q = ev.query
    f0, y = float(q.value), (float(q.target) if q.target is not None else None)
    grid = np.array([0.0, float(steps)])
    subsets = choose_subsets(ev, scores, score, k, random_subsets, seed)
    shared: dict = {}
    for i, (label, blocks) in enumerate(subsets):
        ts = time.perf_counter()
        K_S, kx_S = block_kernel(ev, blocks)
        tc = theory_curves(K_S, ev.residuals, kx_S, f0, y, float(c), grid)
        if few:
            predicted = float(tc.linear_error[-1] - tc.linear_error[0])
            traj = gd_trajectory(lm, prompt, ev.subspace, blocks, tc.rho, int(steps), shared=shared)
            err = traj["error"]
            start, end, status = float(err[0]), float(err[-1]), traj["status"]
        else:
            predicted = float(-(tc.linear_prediction[-1] - tc.linear_prediction[0]))   # Δ(1 − p)
            run = QTTTRun(lm, prompt, QTTTConfig(steps=int(steps), span=int(qttt_span), lr=float(qttt_lr),
                                                 heads=list(blocks), seed=int(seed)))
            recs = [run.prepare()] + [r for r in run.steps() if r.status == "ok"]
            start, end = recs[0].answer_nll, recs[-1].answer_nll
            start = math.nan if start is None else float(start)
            end = math.nan if end is None else float(end)
            status = "done" if run.status == "done" else "diverged"
        measured = _finite(end - start)
        chk.subsets.append(SubsetResult(
            label=label, blocks=[block_label(l, h, ev.subspace) for l, h in blocks], measured=measured,
            predicted=_finite(predicted), measured_start=_finite(start), measured_end=_finite(end),
            rho=float(tc.rho), status=status, seconds=time.perf_counter() - ts))
        if progress is not None:
            progress((i + 1) / len(subsets), f"{chk.engine} on the {label} blocks: {i + 1}/{len(subsets)} runs done")

    top, bot = chk.subset("top-k").measured, chk.subset("bottom-k").measured
    rand = [s.measured for s in chk.randoms]
    if rand and all(v is not None for v in rand):
        chk.random_mean = float(np.mean(rand))
    if top is not None and chk.random_mean is not None:
        chk.top_beats_random = bool(top < chk.random_mean)
    if top is not None and bot is not None:
        chk.top_beats_bottom = bool(top < bot)
    chk.spearman = _spearman([s.predicted for s in chk.subsets], [s.measured for s in chk.subsets])
    chk.summary = _summary(chk)
    chk.seconds = time.perf_counter() - t0
    return chk
