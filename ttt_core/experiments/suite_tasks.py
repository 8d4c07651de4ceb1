"""The tasks of the schedule suite (issue 7; DESIGN §4, §5, §7): five task families, disjoint
seed ranges per split, and ONE engine trajectory plus the prompt statistics per task. The cached
suite of these records is `suite`; the schedules evaluated on it are `schedules`.

The suite
---------
Tasks come in five families (`FAMILIES`); each task is identified by (split, index) and drawn
from its own seed, ``seed = SPLIT_SEED_BASE[split] + index``, so the train / validation / test
seed ranges are disjoint by construction (`split_seeds`, asserted by `make_specs`):

* ``digit_shift`` — the paper's digit-shift task (DESIGN §7.1) with n demonstrations drawn from
  `SuiteSettings.fewshot_n` and label noise p drawn from `NOISE_LEVELS` (0 … 0.9). Error = squared
  error of the expected label value at the query against the *clean* label.
* ``needle`` — needle in a haystack (`generators.needle_haystack`) at a length drawn from
  `SuiteSettings.needle_words` and a uniform position. Error = 1 − exp(−NLL/len), one minus the
  geometric-mean probability of the expected answer's tokens (in [0, 1] like the few-shot error).
* ``trap_shift`` — *adversarial demonstrations*: every demonstration follows a consistent wrong
  shift s′ ≠ s while the query is judged by the true rule s. Fitting the prompt harder moves the
  query further from the truth.
* ``trap_noise`` — *all-noise labels* (p = 1): the demonstrations carry no information about s.
* ``trap_needle`` — a needle plus `SuiteSettings.n_fakes` near-identical fake needles ("The secret
  numbr is …", "The old secret number was …") scattered through the filler.

One engine run per task
-----------------------
Every task gets ONE run of the engine (`run_task`: `ttt_core.qttt`) to T_max = max(grid) steps; the
error is recorded after every step (step 0 = the unadapted model, i.e. ICL), so every fixed-T schedule —
and every schedule choosing some T ≤ T_max — reads its error off the same trajectory. The wall
seconds of every step (`StepRecord.step_s`: forward + backward + update, evaluation excluded) are
recorded too. By default both families run qTTT (frozen-KV, W_Q of every layer, AdamW); few-shot
tasks can run the paper's LOO gradient descent instead (``fewshot_engine="paper"``: W_V of every
head, ρ = c/λ_max of the same kernel) — faithful to the linearised theory but ~10× slower per step.
A run that diverges keeps its last good deltas (engine rule), so later steps repeat the last good
error and no further seconds are spent.

Prompt statistics (what the controller and the theory schedules see)
--------------------------------------------------------------------
From the prompt kernel of the updated subspace (`prompt_kernel.compute_prompt_kernel`,
`spectrum`): top eigenvalues, effective ranks, τ̂², σ̂², λ⋆ = σ̂²/τ̂², query-alignment mass, the evidence T_MAP of
both variants, the plug-in query Bayes gap ratio; plus the prompt length and the base model's
confidence (few-shot: max label probability; long context: max next-token probability at the
answer position). Nothing uses the query's true label: for long context the query output whose
coupling k_x is computed is the model's *own* greedy answer, not the expected one. The seconds
this costs are recorded as the decision overhead of the schedules that need it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ttt_core import theory
from ttt_core.attention import forward_with_frozen_kv
from ttt_core.generators import digit_shift_task, needle_haystack
from ttt_core.models import EMBEDDED_MODEL, LoadedModel
from ttt_core.paper_gd import PaperConfig, PaperRun
from ttt_core.prompt_kernel import compute_prompt_kernel
from ttt_core.prompts import FewShotPrompt, LongContextPrompt, Prompt
from ttt_core.qttt import QTTTConfig, QTTTRun
from ttt_core.spectrum import compute_spectrum

FAMILIES: tuple[str, ...] = ("digit_shift", "needle", "trap_shift", "trap_noise", "trap_needle")
FAMILY_LABELS: dict[str, str] = {
    "digit_shift": "digit shift (noise 0–0.9)",
    "needle": "needle in a haystack",
    "trap_shift": "trap: consistent wrong shift",
    "trap_noise": "trap: all-noise labels",
    "trap_needle": "trap: fake needles",
}
TRAP_FAMILIES: tuple[str, ...] = ("trap_shift", "trap_noise", "trap_needle")
NOISE_LEVELS: tuple[float, ...] = (0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9)
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Seeds of split s are SPLIT_SEED_BASE[s] + index, index < SPLIT_SEED_SPAN: disjoint ranges.
SPLIT_SEED_BASE: dict[str, int] = {"train": 1_000_000, "val": 2_000_000, "test": 3_000_000}
SPLIT_SEED_SPAN = 1_000_000
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.5, "val": 0.2, "test": 0.3}
DEFAULT_GRID: tuple[int, ...] = (1, 2, 4, 8)
FAKE_NEEDLES = (
    "The secret numbr is {v}.",
    "The old secret number was {v}.",
    "The secret number is not {v}.",
    "A fake secret number is {v}.",
    "The secret code is {v}.",
    "The secret number was once {v}.",
)


# ============================================================================================
# settings, specs, splits
# ============================================================================================


class GridSettings:
    """What every suite's settings share (no fields, so a subclass hashes exactly its own fields):
    the step grid's largest T, the controller's actions and the cache key. Subclasses are
    dataclasses with a `grid` field."""

    grid: tuple[int, ...]

    @property
    def t_max(self) -> int:
        return int(max(self.grid))

    @property
    def actions(self) -> tuple[int, ...]:
        """Controller actions: skip (T = 0) and every grid value."""
        return tuple(sorted({0, *map(int, self.grid)}))

    def key(self) -> str:
        """12 hex digits of the SHA-1 of the settings' JSON (sorted keys): the cache folder's name."""
        blob = json.dumps(asdict(self), sort_keys=True, default=list)  # type: ignore[call-overload]
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class SuiteSettings(GridSettings):
    """Everything that determines a task's result (n_tasks excluded: suites of different sizes
    share their common tasks). `key()` hashes these settings for the cache folder."""

    model: str = EMBEDDED_MODEL
    grid: tuple[int, ...] = DEFAULT_GRID
    fewshot_engine: str = "qttt"          # "qttt" | "paper"
    lr_fewshot: float = 1e-3
    lr_long: float = 1e-3
    span_fewshot: int = 128               # clamped by the engine to the prompt length
    span_long: int = 64
    c: float = 0.5                        # ρ = c/λ_max for the theory (and the paper engine)
    fewshot_n: tuple[int, int] = (6, 12)  # inclusive range of demonstrations
    needle_words: tuple[int, ...] = (80, 150, 250)
    n_fakes: int = 4
    max_positions: int = 64               # long context: supervised positions in the kernel
    families: tuple[str, ...] = FAMILIES

    def validate(self) -> None:
        if not self.grid or min(self.grid) < 1:
            raise ValueError("the step grid must hold positive step counts")
        if self.fewshot_engine not in ("qttt", "paper"):
            raise ValueError("fewshot_engine must be 'qttt' or 'paper'")
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise ValueError(f"unknown task families {bad}; choose from {FAMILIES}")
        if not 0 < self.c < 1:
            raise ValueError("c must lie in (0, 1)")
        lo, hi = self.fewshot_n
        if not 2 <= lo <= hi:
            raise ValueError("fewshot_n must be a range (lo, hi) with 2 ≤ lo ≤ hi")


@dataclass(frozen=True)
class TaskSpec:
    """One task of the suite: its split, index within the split, seed and family."""

    split: str
    index: int
    seed: int
    family: str

    @property
    def task_id(self) -> str:
        return f"{self.split}-{self.index:04d}"


def split_sizes(n_tasks: int) -> dict[str, int]:
    """Tasks per split (≈ 50/20/30 %, each split at least one task; n_tasks ≥ 3)."""
    if n_tasks < 3:
        raise ValueError("a suite needs at least 3 tasks (one per split)")
    n_val = max(1, int(round(SPLIT_FRACTIONS["val"] * n_tasks)))
    n_test = max(1, int(round(SPLIT_FRACTIONS["test"] * n_tasks)))
    n_train = n_tasks - n_val - n_test
    if n_train < 1:
        n_train, n_val, n_test = 1, 1, n_tasks - 2
    return {"train": n_train, "val": n_val, "test": n_test}


def split_seeds(split: str, count: int) -> list[int]:
    """Seeds of the first `count` tasks of `split` (disjoint ranges per split)."""
    if count > SPLIT_SEED_SPAN:
        raise ValueError("too many tasks for one split")
    base = SPLIT_SEED_BASE[split]
    return [base + i for i in range(count)]


def make_specs(n_tasks: int, families: Sequence[str] = FAMILIES) -> list[TaskSpec]:
    """The suite's task specs: families cycle within each split (balanced), seeds per split."""
    sizes = split_sizes(n_tasks)
    specs = [TaskSpec(s, i, seed, families[i % len(families)])
             for s in SPLITS for i, seed in enumerate(split_seeds(s, sizes[s]))]
    seeds = {s: {t.seed for t in specs if t.split == s} for s in SPLITS}
    assert not (seeds["train"] & seeds["test"]) and not (seeds["val"] & seeds["test"]) \
        and not (seeds["train"] & seeds["val"]), "split seed ranges overlap"
    return specs


# ============================================================================================
# task generation
# ============================================================================================


def insert_fake_needles(prompt: LongContextPrompt, rng: np.random.Generator, n_fakes: int) -> LongContextPrompt:
    """A copy of a needle-haystack prompt with `n_fakes` near-identical fake needles inserted at
    sentence boundaries outside the real needle (the needle span is moved accordingly)."""
    ctx = prompt.context
    (ns, ne), = prompt.needle_spans
    answer = int(prompt.answer)
    bounds = [m.end() for m in re.finditer(r"\. ", ctx) if m.end() <= ns or m.end() > ne]
    bounds = [0] + bounds
    picks = sorted(rng.choice(len(bounds), size=min(n_fakes, len(bounds)), replace=False).tolist())
    out: list[str] = []
    pos, new_ns = 0, ns
    for b in (bounds[i] for i in picks):
        fake_val = answer
        while fake_val == answer:
            fake_val = int(rng.integers(1000, 10000))
        text = FAKE_NEEDLES[int(rng.integers(len(FAKE_NEEDLES)))].format(v=fake_val) + " "
        out.append(ctx[pos:b])
        out.append(text)
        pos = b
        if b <= ns:
            new_ns += len(text)
    out.append(ctx[pos:])
    new_ctx = "".join(out)
    spans = [(new_ns, new_ns + (ne - ns))]
    assert new_ctx[spans[0][0]:spans[0][1]] == ctx[ns:ne]
    return LongContextPrompt(context=new_ctx, question=prompt.question, answer=prompt.answer, needle_spans=spans)


def make_task(spec: TaskSpec, settings: SuiteSettings) -> tuple[Prompt, dict[str, Any]]:
    """(prompt, description) of a task; deterministic in (spec.seed, spec.family, settings)."""
    rng = np.random.default_rng(spec.seed)
    lo, hi = settings.fewshot_n
    fam = spec.family
    if fam in ("digit_shift", "trap_noise", "trap_shift"):
        n = int(rng.integers(lo, hi + 1))
        template = int(rng.integers(2))
        if fam == "digit_shift":
            noise = float(rng.choice(NOISE_LEVELS))
            task = digit_shift_task(rng, n=n, noise=noise, template=template)
            return task.prompt, {"n": n, "noise": noise, "shift": task.shift, "template": template}
        if fam == "trap_noise":
            task = digit_shift_task(rng, n=n, noise=1.0, template=template)
            return task.prompt, {"n": n, "noise": 1.0, "shift": task.shift, "template": template}
        true_shift = int(rng.integers(10))
        wrong = (true_shift + int(rng.integers(1, 10))) % 10
        task = digit_shift_task(rng, n=n, noise=0.0, template=template, shift=wrong)
        p = task.prompt
        qy = str((int(p.query_x) + true_shift) % 10)
        prompt = FewShotPrompt(demos=p.demos, query_x=p.query_x, query_y=qy, sep=p.sep, spaced=p.spaced)
        return prompt, {"n": n, "noise": 0.0, "shift": true_shift, "demo_shift": wrong, "template": template}
    if fam in ("needle", "trap_needle"):
        words = int(rng.choice(settings.needle_words))
        position = float(rng.uniform(0.05, 0.95))
        prompt = needle_haystack(rng, n_words=words, position=position)
        meta = {"n_words": words, "position": position}
        if fam == "trap_needle":
            prompt = insert_fake_needles(prompt, rng, settings.n_fakes)
            meta["n_fakes"] = settings.n_fakes
        return prompt, meta
    raise ValueError(f"unknown task family {fam!r}")


# ============================================================================================
# one task: engine trajectory + prompt statistics
# ============================================================================================


def _needle_error(nll: float | None, length: int) -> float:
    if nll is None or not math.isfinite(nll) or length < 1:
        return float("nan")
    return 1.0 - math.exp(-nll / length)


def _fill(values: list[float], length: int) -> list[float]:
    """Pad a trajectory cut short (divergence) with its last value."""
    out = list(values)
    while len(out) < length:
        out.append(out[-1])
    return out


def _answer_row_confidence(lm: LoadedModel, run: QTTTRun) -> float:
    """Max next-token probability at the answer position (last prompt token), base weights."""
    row = run.enc.n_prompt - 1
    with torch.no_grad():
        out = forward_with_frozen_kv(lm.model, run.enc.ids[:, row:row + 1], run.cache, row)
    return float(torch.softmax(out.logits[0, -1].float(), -1).max())


def prompt_statistics(lm: LoadedModel, stats_prompt: Prompt, subspace: str, settings: SuiteSettings) -> dict[str, Any]:
    """Spectrum summary, τ̂², σ̂², λ⋆, alignment, evidence T_MAP (both variants) and the plug-in
    verdict of the prompt kernel (DESIGN §2–§5), plus the seconds they took."""
    t0 = time.perf_counter()
    ev = compute_prompt_kernel(lm, stats_prompt, subspace, max_positions=settings.max_positions)
    stats, _ = kernel_statistics(ev.K, ev.residuals, ev.k_x, int(ev.n), settings.c, settings.t_max)
    return {"stats": stats, "seconds": time.perf_counter() - t0}


def kernel_statistics(K: np.ndarray, residuals: np.ndarray, k_x: np.ndarray | None, n_positions: int, c: float,
                      t_max: int) -> tuple[dict[str, Any], Any]:
    """The statistics of `prompt_statistics` from a kernel K (n, n), its residuals and query
    coupling (None without a query), on the step grid 0…t_max; also returns the spectrum report
    at T = 0 (`spectrum.compute_spectrum`: posterior, prob_grid = P(TTT beats ICL) on that grid)."""
    grid = np.arange(int(t_max) + 1, dtype=float)
    rep = compute_spectrum(K, residuals, k_x, T=0.0, c=c, T_grid=grid)
    lam, rt = rep.lam, rep.r_tilde
    rho = rep.rho
    t_fixed = float(theory.select_steps(lam, rt, rho, grid, "fixed"))
    t_mle = float(theory.select_steps(lam, rt, rho, grid, "mle"))
    ver = compute_spectrum(K, residuals, k_x, T=t_mle, c=c, T_grid=grid, posterior=rep.posterior)
    beats = bool(ver.beats) and t_mle > 0
    ratio = ver.gap_ttt / ver.gap_icl if ver.gap_icl > 0 else 1.0
    tot = float(lam.sum())
    lmax = float(lam[0]) if lam.size else 0.0
    align = None
    if rep.k_tilde is not None:
        kt2 = rep.k_tilde ** 2
        align = float(kt2[:3].sum() / kt2.sum()) if kt2.sum() > 0 else 0.0
    stats = {
        "n_positions": int(n_positions),
        "lambda_max": lmax,
        "lambda_2_ratio": float(lam[1] / lmax) if lam.size > 1 and lmax > 0 else 0.0,
        "lambda_3_ratio": float(lam[2] / lmax) if lam.size > 2 and lmax > 0 else 0.0,
        "top_eigenvalues": [float(x) for x in lam[:5]],
        "trace": tot,
        "eff_rank_entropy": float(rep.eff_rank_entropy),
        "participation_ratio": float(rep.participation_ratio),
        "tau2": float(rep.tau2),
        "sigma2": float(rep.sigma2),
        "lambda_star": float(rep.lam_star) if math.isfinite(rep.lam_star) else None,
        "alignment_top3": align,
        "has_query": rep.k_tilde is not None,
        "residual_ms": float(np.mean(np.asarray(residuals) ** 2)),
        "rho": float(rho),
        "t_map_fixed": t_fixed,
        "t_map_profiled": t_mle,
        "gap_ratio_at_t_map": float(ratio),
        "verdict_beats": beats,
        "verdict_criterion": ver.criterion,
    }
    return stats, rep


@dataclass
class SuiteTaskRecord:
    """One suite task's result (module docstring): errors[t] and cumulative seconds[t] for
    t = 0…T_max from ONE engine run, the prompt statistics the controller reads, and `extra`
    per-step traces (prediction, or answer NLL and needle mass). `to_dict()` is the JSON record
    cached under tasks/<task_id>.json."""

    task_id: str
    split: str
    index: int
    seed: int
    family: str
    meta: dict[str, Any]
    engine: str
    subspace: str
    errors: list[float]
    seconds: list[float]
    prep_seconds: float
    stats_seconds: float
    steps_done: int
    status: str
    reason: str | None
    stats: dict[str, Any]
    extra: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_task(lm: LoadedModel, spec: TaskSpec, settings: SuiteSettings) -> SuiteTaskRecord:
    """ONE engine run of the task to T_max (error and seconds at every step) plus the prompt
    statistics (see module docstring)."""
    prompt, meta = make_task(spec, settings)
    few = isinstance(prompt, FewShotPrompt)
    T = settings.t_max
    paper = few and settings.fewshot_engine == "paper"
    subspace = "v" if paper else "q"
    stats_prompt = prompt
    stats_part = None
    if paper:  # the paper engine's ρ = c/λ_max needs the kernel first (the same kernel as the stats)
        stats_part = prompt_statistics(lm, prompt, subspace, settings)
        lam_max = stats_part["stats"]["lambda_max"]
        config = PaperConfig(steps=T, c=settings.c, lambda_max=max(lam_max, 1e-30), kind="v")
        run: QTTTRun | PaperRun = PaperRun(lm, prompt, config)
        engine = f"paper-mode GD (W_V, ρ = c/λ_max, c = {settings.c:g})"
    else:
        lr = settings.lr_fewshot if few else settings.lr_long
        span = settings.span_fewshot if few else settings.span_long
        run = QTTTRun(lm, prompt, QTTTConfig(steps=T, span=span, lr=lr, seed=spec.seed, max_new_tokens=8))
        engine = f"qTTT (W_Q, AdamW lr {lr:g}, span {span})"
    t0 = time.perf_counter()
    base = run.prepare()
    prep_s = time.perf_counter() - t0
    extra: dict[str, Any] = {}
    if few:
        err = [float(base.query_error)]
        confidence = max(base.label_probs.values()) if base.label_probs else float("nan")
        n_tokens = int(run.enc.ids.shape[1]) if isinstance(run, QTTTRun) else int(run.query_ids.shape[1])
        extra["prediction"] = [base.query_prediction]
    else:
        assert isinstance(run, QTTTRun)  # long context always runs qTTT
        alen = run.enc.answer_len
        err = [_needle_error(base.answer_nll, alen)]
        extra["answer_nll"] = [base.answer_nll]
        extra["needle_mass"] = [base.needle_mass]
        confidence = _answer_row_confidence(lm, run)
        n_tokens = int(run.enc.n_prompt)
        greedy = run.generate(adapted=False, max_new_tokens=8)
        extra["base_answer"] = greedy
        extra["base_correct"] = bool(greedy.strip().startswith(str(prompt.answer)))
        # the query output of the statistics is the model's OWN answer (no label leak)
        stats_prompt = LongContextPrompt(context=prompt.context, question=prompt.question,
                                         answer=greedy.strip() or None, needle_spans=prompt.needle_spans)
    seconds = [0.0]
    for rec in run.steps():
        if rec.status != "ok":
            seconds.append(seconds[-1] + rec.step_s)
            break
        seconds.append(seconds[-1] + rec.step_s)
        if few:
            err.append(float(rec.query_error))
            extra["prediction"].append(rec.query_prediction)
        else:
            err.append(_needle_error(rec.answer_nll, run.enc.answer_len))
            extra["answer_nll"].append(rec.answer_nll)
            extra["needle_mass"].append(rec.needle_mass)
    steps_done = len(err) - 1
    err = _fill(err, T + 1)
    seconds = _fill(seconds, T + 1)[: T + 1]
    if stats_part is None:
        stats_part = prompt_statistics(lm, stats_prompt, subspace, settings)
    stats = dict(stats_part["stats"])
    stats.update({"n_tokens": n_tokens, "confidence": float(confidence), "long_context": not few})
    return SuiteTaskRecord(
        task_id=spec.task_id, split=spec.split, index=spec.index, seed=spec.seed, family=spec.family, meta=meta,
        engine=engine, subspace=subspace, errors=[float(e) for e in err], seconds=[float(s) for s in seconds],
        prep_seconds=prep_s, stats_seconds=float(stats_part["seconds"]), steps_done=steps_done, status=run.status,
        reason=run.reason, stats=stats, extra=extra)
