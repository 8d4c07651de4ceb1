"""Adaptive step schedules: a task suite, one engine trajectory per task, and every schedule
(fixed T, random T, evidence T_MAP, the plug-in "TTT beats ICL" skip rule, a learned controller)
evaluated on the same trajectories (issue 7; DESIGN §4, §5, §7).

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
Every task gets ONE run of the engine (`ttt_core.qttt`) to T_max = max(grid) steps; the error is
recorded after every step (step 0 = the unadapted model, i.e. ICL), so every fixed-T schedule —
and every schedule choosing some T ≤ T_max — reads its error off the same trajectory. The wall
seconds of every step (`StepRecord.step_s`: forward + backward + update, evaluation excluded) are
recorded too. By default both families run qTTT (frozen-KV, W_Q of every layer, AdamW); few-shot
tasks can run the paper's LOO gradient descent instead (``fewshot_engine="paper"``: W_V of every
head, ρ = c/λ_max of the same kernel) — faithful to the linearised theory but ~10× slower per step.
A run that diverges keeps its last good deltas (engine rule), so later steps repeat the last good
error and no further seconds are spent.

Prompt statistics (what the controller and the theory schedules see)
--------------------------------------------------------------------
From the prompt kernel of the updated subspace (`evidence.compute_evidence`, `spectrum`): top
eigenvalues, effective ranks, τ̂², σ̂², λ⋆ = σ̂²/τ̂², query-alignment mass, the evidence T_MAP of
both variants, the plug-in query Bayes gap ratio; plus the prompt length and the base model's
confidence (few-shot: max label probability; long context: max next-token probability at the
answer position). Nothing uses the query's true label: for long context the query output whose
coupling k_x is computed is the model's *own* greedy answer, not the expected one. The seconds
this costs are recorded as the decision overhead of the schedules that need it.

Schedules (`SCHEDULE_KINDS`)
----------------------------
fixed T (every grid value, and T = 0 = ICL); random T (expected error of a uniform draw from
{0} ∪ grid — exact, no sampling noise); evidence T_MAP with fixed σ̂² and with σ² profiled
(DESIGN §5; any T in 0…T_max); skip rule (DESIGN §4: skip when the plug-in verdict at the
profiled T_MAP says ICL is better, else that T); the learned controller (`ttt_core.controller`);
and the per-task oracle (best action in hindsight — a reference, not a schedule).
Cost of a decision = query error + λ · steps.

Measured vs linearised: every error, probability and second in the tables is *measured* on an
engine run. Only the *decisions* of the evidence and skip schedules come from the linearised model
(the kernel in DESIGN §2–§5); for qTTT (AdamW on next-token NLL) the map between the theory's
GD step T and an AdamW step is an assumption, not a theorem.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

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
#: Default latency trade-off: cost = error + λ·steps. 1e-3 per step makes 8 steps worth an
#: error reduction of 0.008 (≈ 5–10 % of a typical digit-shift query error of SmolLM2).
DEFAULT_LAMBDA = 1e-3
DEFAULT_GRID: tuple[int, ...] = (1, 2, 4, 8)
FAKE_NEEDLES = (
    "The secret numbr is {v}.",
    "The old secret number was {v}.",
    "The secret number is not {v}.",
    "A fake secret number is {v}.",
    "The secret code is {v}.",
    "The secret number was once {v}.",
)
Progress = Callable[[float, str], None] | None


# ============================================================================================
# settings, specs, splits
# ============================================================================================


@dataclass(frozen=True)
class SuiteSettings:
    """Everything that determines a task's result (n_tasks excluded: suites of different sizes
    share their common tasks). `key()` hashes these settings for the cache folder."""

    model: str = "SmolLM2-135M-Instruct (embedded)"
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

    @property
    def t_max(self) -> int:
        return int(max(self.grid))

    @property
    def actions(self) -> tuple[int, ...]:
        """Controller actions: skip (T = 0) and every grid value."""
        return tuple(sorted({0, *map(int, self.grid)}))

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, default=list)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

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


def insert_fake_needles(prompt: Any, rng: np.random.Generator, n_fakes: int) -> Any:
    """A copy of a needle-haystack prompt with `n_fakes` near-identical fake needles inserted at
    sentence boundaries outside the real needle (the needle span is moved accordingly)."""
    from ttt_core.prompts import LongContextPrompt

    ctx = prompt.context
    (ns, ne), = prompt.needle_spans
    answer = int(prompt.answer)
    bounds = [m.end() for m in re.finditer(r"\. ", ctx) if m.end() <= ns or m.end() > ne]
    bounds = [0] + bounds
    picks = sorted(rng.choice(len(bounds), size=min(n_fakes, len(bounds)), replace=False).tolist())
    out, pos, shift, spans = [], 0, 0, []
    new_ns = ns
    for j, b in enumerate(bounds[i] for i in picks):
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


def make_task(spec: TaskSpec, settings: SuiteSettings) -> tuple[Any, dict[str, Any]]:
    """(prompt, description) of a task; deterministic in (spec.seed, spec.family, settings)."""
    from ttt_core.generators import digit_shift_task, needle_haystack
    from ttt_core.prompts import FewShotPrompt

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


def _answer_row_confidence(lm: Any, run: Any) -> float:
    """Max next-token probability at the answer position (last prompt token), base weights."""
    import torch

    from ttt_core.attention import forward_with_frozen_kv

    row = run.enc.n_prompt - 1
    with torch.no_grad():
        out = forward_with_frozen_kv(lm.model, run.enc.ids[:, row:row + 1], run.cache, row)
    return float(torch.softmax(out.logits[0, -1].float(), -1).max())


def prompt_statistics(lm: Any, stats_prompt: Any, subspace: str, settings: SuiteSettings) -> dict[str, Any]:
    """Spectrum summary, τ̂², σ̂², λ⋆, alignment, evidence T_MAP (both variants) and the plug-in
    verdict of the prompt kernel (DESIGN §2–§5), plus the seconds they took."""
    from ttt_core import theory
    from ttt_core.evidence import compute_evidence
    from ttt_core.spectrum import compute_spectrum

    t0 = time.perf_counter()
    ev = compute_evidence(lm, stats_prompt, subspace, max_positions=settings.max_positions)
    K = ev.K
    grid = np.arange(settings.t_max + 1, dtype=float)
    rep = compute_spectrum(K, ev.residuals, ev.k_x, T=0.0, c=settings.c, T_grid=grid)
    lam, rt = rep.lam, rep.r_tilde
    rho = rep.rho
    t_fixed = float(theory.select_steps(lam, rt, rho, grid, "fixed"))
    t_mle = float(theory.select_steps(lam, rt, rho, grid, "mle"))
    ver = compute_spectrum(K, ev.residuals, ev.k_x, T=t_mle, c=settings.c, T_grid=grid,
                           tau2_sigma2=(rep.tau2, rep.sigma2))
    beats = bool(ver.beats) and t_mle > 0
    ratio = ver.gap_ttt / ver.gap_icl if ver.gap_icl > 0 else 1.0
    tot = float(lam.sum())
    lmax = float(lam[0]) if lam.size else 0.0
    align = None
    if rep.k_tilde is not None:
        kt2 = rep.k_tilde ** 2
        align = float(kt2[:3].sum() / kt2.sum()) if kt2.sum() > 0 else 0.0
    stats = {
        "n_positions": int(ev.n),
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
        "residual_ms": float(np.mean(ev.residuals ** 2)),
        "rho": float(rho),
        "t_map_fixed": t_fixed,
        "t_map_profiled": t_mle,
        "gap_ratio_at_t_map": float(ratio),
        "verdict_beats": beats,
        "verdict_criterion": ver.criterion,
    }
    return {"stats": stats, "seconds": time.perf_counter() - t0}


def run_task(lm: Any, spec: TaskSpec, settings: SuiteSettings) -> dict[str, Any]:
    """ONE engine run of the task to T_max (error and seconds at every step) plus the prompt
    statistics. Returns a JSON-ready dict (see module docstring)."""
    from ttt_core.prompts import FewShotPrompt, LongContextPrompt
    from ttt_core.qttt import PaperConfig, PaperRun, QTTTConfig, QTTTRun

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
        run = PaperRun(lm, prompt, PaperConfig(steps=T, c=settings.c, lambda_max=max(lam_max, 1e-30), kind="v"))
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
        n_tokens = int(run.enc.ids.shape[1]) if hasattr(run, "enc") else int(run.query_ids.shape[1])
        extra["prediction"] = [base.query_prediction]
    else:
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
    return {
        "task_id": spec.task_id, "split": spec.split, "index": spec.index, "seed": spec.seed,
        "family": spec.family, "meta": meta, "engine": engine, "subspace": subspace,
        "errors": [float(e) for e in err], "seconds": [float(s) for s in seconds],
        "prep_seconds": prep_s, "stats_seconds": float(stats_part["seconds"]),
        "steps_done": steps_done, "status": run.status, "reason": run.reason,
        "stats": stats, "extra": extra,
    }


# ============================================================================================
# the suite (cached under artifacts/schedules/<settings key>/)
# ============================================================================================


def artifacts_root() -> Path:
    """$TTT_LENS_ARTIFACTS, else <repo>/artifacts (git-ignored)."""
    env = os.environ.get("TTT_LENS_ARTIFACTS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "artifacts"


def suite_dir(settings: SuiteSettings, root: str | Path | None = None) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", settings.model).strip("-").lower()[:40]
    return Path(root) if root is not None else artifacts_root() / "schedules" / f"{slug}-{settings.key()}"


@dataclass
class Suite:
    """Results of a suite: settings plus one record per task (see `run_task`)."""

    settings: SuiteSettings
    tasks: list[dict[str, Any]]
    folder: str | None = None

    # ------------------------------------------------------------------ selection
    def split(self, name: str | Sequence[str]) -> "Suite":
        names = {name} if isinstance(name, str) else set(name)
        return Suite(self.settings, [t for t in self.tasks if t["split"] in names], self.folder)

    def families(self, names: Sequence[str]) -> "Suite":
        return Suite(self.settings, [t for t in self.tasks if t["family"] in set(names)], self.folder)

    def __len__(self) -> int:
        return len(self.tasks)

    # ------------------------------------------------------------------ arrays
    @property
    def errors(self) -> np.ndarray:
        """(n_tasks, T_max + 1) measured error after T steps."""
        return np.array([t["errors"] for t in self.tasks], dtype=float).reshape(len(self.tasks), -1)

    @property
    def seconds(self) -> np.ndarray:
        """(n_tasks, T_max + 1) measured cumulative adaptation seconds after T steps."""
        return np.array([t["seconds"] for t in self.tasks], dtype=float).reshape(len(self.tasks), -1)

    @property
    def stats_seconds(self) -> np.ndarray:
        return np.array([t["stats_seconds"] for t in self.tasks], dtype=float)

    @property
    def family(self) -> np.ndarray:
        return np.array([t["family"] for t in self.tasks])

    @property
    def seeds(self) -> np.ndarray:
        return np.array([t["seed"] for t in self.tasks], dtype=np.int64)

    def stat(self, name: str) -> np.ndarray:
        return np.array([np.nan if t["stats"].get(name) is None else float(t["stats"][name]) for t in self.tasks])

    def to_json(self) -> dict[str, Any]:
        return {"settings": asdict(self.settings), "tasks": self.tasks}


def settings_from_json(d: dict[str, Any]) -> SuiteSettings:
    kw = dict(d)
    for k in ("grid", "fewshot_n", "needle_words", "families"):
        if k in kw:
            kw[k] = tuple(kw[k])
    return SuiteSettings(**kw)


def load_cached_suite(settings: SuiteSettings, n_tasks: int, root: str | Path | None = None) -> Suite | None:
    """The suite of `n_tasks` from the cache if every task is there, else None."""
    folder = suite_dir(settings, root)
    tasks = []
    for spec in make_specs(n_tasks, settings.families):
        f = folder / "tasks" / f"{spec.task_id}.json"
        if not f.exists():
            return None
        tasks.append(json.loads(f.read_text()))
    return Suite(settings, tasks, str(folder))


def build_suite(lm: Any, settings: SuiteSettings, n_tasks: int, *, root: str | Path | None = None,
                progress: Progress = None, use_cache: bool = True, workers: int = 1) -> Suite:
    """Run (or read from the cache) every task of a suite of `n_tasks` tasks.

    Each task's record is written to <suite dir>/tasks/<task id>.json as soon as it is done, so
    an interrupted build resumes where it stopped and larger suites reuse smaller ones.
    workers > 1 runs tasks in that many single-threaded processes (each loads `settings.model`;
    `lm` may then be None)."""
    settings.validate()
    if lm is not None and getattr(lm, "name", settings.model) != settings.model:
        raise ValueError(f"the suite settings are for model {settings.model!r}, not {lm.name!r}")
    folder = suite_dir(settings, root)
    (folder / "tasks").mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(asdict(settings), indent=1))
    specs = make_specs(n_tasks, settings.families)
    todo = [s for s in specs if not (use_cache and (folder / "tasks" / f"{s.task_id}.json").exists())]
    t0 = time.perf_counter()

    def report(done: int) -> None:
        if progress is not None:
            progress(done / max(len(todo), 1), f"{done}/{len(todo)} tasks run ({len(specs) - len(todo)} cached) — "
                                               f"{time.perf_counter() - t0:.0f} s")

    report(0)
    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=int(workers), mp_context=mp.get_context("spawn"),
                                 initializer=_worker_init, initargs=(settings.model,)) as pool:
            futs = [pool.submit(_worker_task, spec, settings, str(folder)) for spec in todo]
            for done, fut in enumerate(as_completed(futs), 1):
                fut.result()
                report(done)
    else:
        if todo and lm is None:
            raise ValueError("a model is needed to run the tasks that are not cached")
        for done, spec in enumerate(todo, 1):
            _write_task(folder, run_task(lm, spec, settings))
            report(done)
    tasks = [json.loads((folder / "tasks" / f"{s.task_id}.json").read_text()) for s in specs]
    suite = Suite(settings, tasks, str(folder))
    (folder / f"suite-{n_tasks}.json").write_text(json.dumps(suite.to_json(), default=_json_default))
    return suite


def _write_task(folder: Path, rec: dict[str, Any]) -> None:
    f = Path(folder) / "tasks" / f"{rec['task_id']}.json"
    tmp = f.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(rec, default=_json_default))
    os.replace(tmp, f)


_WORKER_LM: Any = None


def _worker_init(model: str) -> None:
    global _WORKER_LM
    import torch

    from ttt_core.models import load_model

    torch.set_num_threads(1)
    _WORKER_LM = load_model(model)


def _worker_task(spec: TaskSpec, settings: SuiteSettings, folder: str) -> str:
    rec = run_task(_WORKER_LM, spec, settings)
    _write_task(Path(folder), rec)
    return rec["task_id"]


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ============================================================================================
# schedules and their evaluation
# ============================================================================================


@dataclass
class ScheduleResult:
    """One schedule on a set of tasks: chosen steps, measured errors/seconds per task."""

    name: str
    kind: str            # "fixed" | "random" | "evidence" | "skip" | "controller" | "oracle"
    decided_by: str      # "measured trajectory" / "linearised model (kernel)" / "learned controller"
    steps: np.ndarray    # (n,) chosen T (expected T for random)
    errors: np.ndarray   # (n,) measured error at the chosen T
    seconds: np.ndarray  # (n,) measured adaptation seconds (+ decision overhead where needed)
    overhead: np.ndarray  # (n,) seconds of the prompt statistics (0 for fixed/random)
    reference: bool = False  # oracle: not a real schedule

    def cost(self, lam: float) -> np.ndarray:
        return self.errors + lam * self.steps

    def summary(self, lam: float) -> dict[str, Any]:
        n = len(self.errors)
        se = float(self.errors.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
        return {"schedule": self.name, "kind": self.kind, "decided by": self.decided_by,
                "mean error": float(self.errors.mean()) if n else float("nan"), "SE": se,
                "mean steps": float(self.steps.mean()) if n else float("nan"),
                "mean seconds": float(self.seconds.mean()) if n else float("nan"),
                "overhead s": float(self.overhead.mean()) if n else float("nan"),
                "mean cost": float(self.cost(lam).mean()) if n else float("nan"), "tasks": n}


def _at(suite: Suite, T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.clip(np.asarray(T, dtype=int), 0, suite.settings.t_max)
    rows = np.arange(len(suite))
    return suite.errors[rows, idx], suite.seconds[rows, idx]


def fixed_schedule(suite: Suite, T: int) -> ScheduleResult:
    """Fixed T: the trajectory's error at T (DESIGN: all fixed-T schedules from one run)."""
    T_arr = np.full(len(suite), int(T))
    e, s = _at(suite, T_arr)
    name = "ICL (T = 0)" if T == 0 else f"fixed T = {T}"
    return ScheduleResult(name, "fixed", "measured trajectory", T_arr.astype(float), e, s, np.zeros(len(suite)))


def random_schedule(suite: Suite) -> ScheduleResult:
    """T uniform on {0} ∪ grid, reported as the exact expectation over the draw."""
    acts = suite.settings.actions
    E = np.stack([_at(suite, np.full(len(suite), a))[0] for a in acts])
    S = np.stack([_at(suite, np.full(len(suite), a))[1] for a in acts])
    return ScheduleResult("random T (expected)", "random", "uniform draw", np.full(len(suite), float(np.mean(acts))),
                          E.mean(0), S.mean(0), np.zeros(len(suite)))


def chosen_schedule(suite: Suite, T: np.ndarray, name: str, kind: str, decided_by: str,
                    overhead: bool = True) -> ScheduleResult:
    e, s = _at(suite, T)
    ov = suite.stats_seconds if overhead else np.zeros(len(suite))
    return ScheduleResult(name, kind, decided_by, np.asarray(T, dtype=float), e, s + ov, ov)


def evidence_steps(suite: Suite, variant: str) -> np.ndarray:
    """T_MAP of the evidence (DESIGN §5): variant "fixed" (σ̂² = ‖r‖²/n) or "profiled"."""
    return suite.stat("t_map_fixed" if variant == "fixed" else "t_map_profiled").astype(int)


def skip_steps(suite: Suite) -> np.ndarray:
    """Skip rule (DESIGN §4): T = 0 where the plug-in verdict at the profiled T_MAP says ICL is
    better (or T_MAP = 0), else the profiled T_MAP."""
    T = evidence_steps(suite, "profiled")
    beats = np.array([bool(t["stats"]["verdict_beats"]) for t in suite.tasks], dtype=bool)
    return np.where(beats, T, 0)


def oracle_steps(suite: Suite, lam: float) -> np.ndarray:
    acts = np.array(suite.settings.actions)
    C = action_costs(suite, lam)
    return acts[np.argmin(C, axis=1)]


def action_costs(suite: Suite, lam: float) -> np.ndarray:
    """(n_tasks, n_actions) measured error at each action's T + λ·T."""
    acts = np.array(suite.settings.actions)
    return suite.errors[:, acts] + lam * acts[None, :]


def all_schedules(suite: Suite, lam: float, controller: Any = None) -> list[ScheduleResult]:
    """Every schedule on the tasks of `suite` (pass one split)."""
    out = [fixed_schedule(suite, 0)] + [fixed_schedule(suite, T) for T in suite.settings.grid]
    out.append(random_schedule(suite))
    lin = "linearised model (kernel)"
    out.append(chosen_schedule(suite, evidence_steps(suite, "fixed"), "evidence T_MAP (fixed σ̂²)", "evidence", lin))
    out.append(chosen_schedule(suite, evidence_steps(suite, "profiled"), "evidence T_MAP (σ profiled)", "evidence", lin))
    out.append(chosen_schedule(suite, skip_steps(suite), "skip rule (TTT-vs-ICL verdict)", "skip", lin))
    if controller is not None and len(suite):
        out.append(chosen_schedule(suite, controller.decide(suite), "learned controller", "controller",
                                   "learned controller (prompt statistics)"))
    out.append(chosen_schedule(suite, oracle_steps(suite, lam), "oracle (best action in hindsight)", "oracle",
                               "measured trajectory (hindsight)", overhead=False))
    out[-1].reference = True
    return out


def results_table(results: list[ScheduleResult], lam: float) -> list[dict[str, Any]]:
    return [r.summary(lam) for r in results]


def pareto_front(x: Sequence[float], y: Sequence[float]) -> list[int]:
    """Indices of the points not dominated in (x ↓, y ↓) — no other point has x' ≤ x and y' ≤ y
    with one strict — sorted by x (ties: lower y first)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    order = np.lexsort((y, x))
    front, best = [], np.inf
    for i in order:
        if y[i] < best:
            front.append(int(i))
            best = y[i]
    return front


def best_fixed_T(suite: Suite, lam: float) -> int:
    """The fixed T (0 or a grid value) with the lowest mean cost on `suite` (first on ties)."""
    acts = suite.settings.actions
    costs = action_costs(suite, lam).mean(axis=0)
    return int(acts[int(np.argmin(costs))])


def compare_controller(suite: Suite, controller: Any, lam: float, n_boot: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Does the controller beat the best fixed T on the TEST split at λ? Paired per-task cost
    difference (best fixed − controller; positive = controller better) with a bootstrap CI.
    The best fixed T is chosen on train + validation (honest); the test-oracle best fixed T is
    reported beside it."""
    from ttt_core.reproduce import paired_stats

    trval, test = suite.split(("train", "val")), suite.split("test")
    if not len(test):
        raise ValueError("the suite has no test tasks")
    T_sel = best_fixed_T(trval, lam) if len(trval) else 0
    T_orc = best_fixed_T(test, lam)
    ctrl = chosen_schedule(test, controller.decide(test), "learned controller", "controller", "")
    fixed = fixed_schedule(test, T_sel)
    orc = fixed_schedule(test, T_orc)
    st = paired_stats(fixed.cost(lam), ctrl.cost(lam), n_boot=n_boot, seed=seed)
    st_o = paired_stats(orc.cost(lam), ctrl.cost(lam), n_boot=n_boot, seed=seed)
    st_err = paired_stats(fixed.errors, ctrl.errors, n_boot=n_boot, seed=seed)
    if st["ci_low"] > 0:
        verdict = "beats"
    elif st["ci_high"] < 0:
        verdict = "loses to"
    else:
        verdict = "does not significantly differ from"
    sentence = (f"On the test split ({len(test)} tasks, λ = {lam:g} per step), the learned controller {verdict} the "
                f"best fixed schedule chosen on train+validation (T = {T_sel}): mean cost difference (fixed − "
                f"controller, positive = controller better) {st['mean']:+.4f}, 95 % paired bootstrap CI "
                f"[{st['ci_low']:+.4f}, {st['ci_high']:+.4f}]; against the best fixed T in hindsight on the test "
                f"split (T = {T_orc}) {st_o['mean']:+.4f} [{st_o['ci_low']:+.4f}, {st_o['ci_high']:+.4f}]. "
                f"Controller mean steps {ctrl.steps.mean():.2f} vs {T_sel}.")
    return {"n_test": len(test), "lambda": lam, "best_fixed_T": T_sel, "best_fixed_T_test_oracle": T_orc,
            "cost_diff": st, "cost_diff_vs_test_oracle": st_o, "error_diff": st_err, "verdict": verdict,
            "controller_mean_steps": float(ctrl.steps.mean()), "sentence": sentence}


def choice_counts(results: list[ScheduleResult], suite: Suite, names: Sequence[str]) -> dict[str, dict[str, dict[int, int]]]:
    """{schedule: {family: {T: count}}} of the chosen T per task family."""
    fam = suite.family
    out: dict[str, dict[str, dict[int, int]]] = {}
    for r in results:
        if r.name not in names:
            continue
        per: dict[str, dict[int, int]] = {}
        for f in dict.fromkeys(fam.tolist()):
            vals, counts = np.unique(r.steps[fam == f].astype(int), return_counts=True)
            per[f] = {int(v): int(c) for v, c in zip(vals, counts)}
        out[r.name] = per
    return out


def family_trajectories(suite: Suite) -> dict[str, dict[str, np.ndarray]]:
    """{family: {"mean", "se"}} of the measured error trajectories (T = 0 … T_max)."""
    out = {}
    E, fam = suite.errors, suite.family
    for f in dict.fromkeys(fam.tolist()):
        e = E[fam == f]
        se = e.std(axis=0, ddof=1) / math.sqrt(len(e)) if len(e) > 1 else np.full(e.shape[1], np.nan)
        out[f] = {"mean": e.mean(axis=0), "se": se, "n": np.array([len(e)])}
    return out
