"""The prompts of the calibration suite and ONE task's record (issue 16; DESIGN §10): is the
diagnosis right, measured against real TTT on seeded prompts with known answers?

Families (`CAL_FAMILIES`), each task drawn from its own seed (``suite_tasks`` seed ranges: disjoint
train / validation / test splits, families cycling within each split):

* ``shift_{clean,noisy}_{arrow,colon}`` — the paper's digit shift (DESIGN §7.1) in both templates
  ("x->y" = arrow, "x:y" = colon), clean (p = 0) or noisy (p drawn from `NOISY_LEVELS`);
* ``word_map`` — a categorical few-shot map: English word → its category word ("pear -> fruit"),
  three of `WORD_CATEGORIES` per prompt, the query a word not among the demonstrations;
* ``needle_{short,mid,long}`` — needle in a haystack at the three `needle_words` lengths;
* ``kv_recall`` — several "key: value" lines and a question for one key (`generators.kv_recall`);
* ``trap_shift``, ``trap_noise``, ``trap_needle`` — the schedule suite's trap prompts, where
  fitting the prompt harder moves the query away from the truth (`suite_tasks.make_task`).

One task (`run_calibration_task`):

* the prompt kernel of the engine's subspace (`prompt_kernel.compute_prompt_kernel`; few-shot:
  W_V of every head, the statistics use the kernel of the last `last_layers` layers, which the
  engine updates; long context: W_Q of every layer, the query output being the model's OWN greedy
  answer — nothing the diagnosis sees uses the true answer);
* the statistics the step rules and the controller read (`suite_tasks.kernel_statistics`), plus
  P(TTT beats ICL at T) over the §5.1 posterior for T = 0…T_max (`prob_grid`) and the Gibbs
  posterior ν_β(T) ∝ exp(−β n ℓ_T) (fixed σ̂, β = 1, uniform prior);
* the oracle: ONE measured trajectory of real TTT to T_max with the error at every step — paper GD
  on the LOO loss (W_V of the last `last_layers` layers, ρ = c/λ_max) for few-shot prompts (error
  = squared error of the query output against the clean label), qTTT (W_Q, AdamW) for long
  contexts (error = 1 − exp(−NLL/len) of the expected answer); oracle T = argmin, "TTT helps" =
  min over T > 0 below the T = 0 error;
* for the head-choice subset (`head_subset`), the measured error change after `head_steps` steps of
  the same engine on the top-k and bottom-k blocks of each score (Query-Aware, Trace, greedy
  Query-Aware — `scores.score_blocks` of the whole subspace, ranked among the candidates: the
  blocks of the last `head_layers` layers) and on `head_random` random k-subsets of the candidates
  (drawn as `score_check.choose_subsets` does, seed 0); a subset shared by several scores runs once.
"""

from __future__ import annotations

import math
import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from ttt_core import theory
from ttt_core.experiments.suite_tasks import (
    SPLITS,
    GridSettings,
    SuiteSettings,
    TaskSpec,
    _answer_row_confidence,
    _fill,
    _needle_error,
    kernel_statistics,
    make_specs,
    make_task,
)
from ttt_core.fused_head import LM_HEAD_MODES, lm_head_mode
from ttt_core.generators import digit_shift_task, kv_recall, needle_haystack
from ttt_core.models import EMBEDDED_MODEL, LoadedModel
from ttt_core.paper_gd import PaperConfig, PaperRun
from ttt_core.prompt_kernel import compute_prompt_kernel
from ttt_core.prompts import FewShotPrompt, LongContextPrompt, Prompt
from ttt_core.qttt import QTTTConfig, QTTTRun
from ttt_core.scores import score_blocks
from ttt_core.steps import block_kernel, select_blocks

CAL_FAMILIES: tuple[str, ...] = (
    "shift_clean_arrow", "shift_clean_colon", "shift_noisy_arrow", "shift_noisy_colon", "word_map",
    "needle_short", "needle_mid", "needle_long", "kv_recall", "trap_shift", "trap_noise", "trap_needle")
CAL_FAMILY_LABELS: dict[str, str] = {
    "shift_clean_arrow": 'digit shift, clean, "x->y"',
    "shift_clean_colon": 'digit shift, clean, "x:y"',
    "shift_noisy_arrow": 'digit shift, noisy, "x->y"',
    "shift_noisy_colon": 'digit shift, noisy, "x:y"',
    "word_map": "word → category (categorical)",
    "needle_short": "needle in a haystack, short",
    "needle_mid": "needle in a haystack, medium",
    "needle_long": "needle in a haystack, long",
    "kv_recall": "key–value recall",
    "trap_shift": "trap: consistent wrong shift",
    "trap_noise": "trap: all-noise labels",
    "trap_needle": "trap: fake needles",
}
#: Families pooled into groups (reported beside the families and the whole suite).
FAMILY_GROUPS: dict[str, tuple[str, ...]] = {
    "digit shift": ("shift_clean_arrow", "shift_clean_colon", "shift_noisy_arrow", "shift_noisy_colon"),
    "word map": ("word_map",),
    "needle": ("needle_short", "needle_mid", "needle_long"),
    "key–value recall": ("kv_recall",),
    "trap": ("trap_shift", "trap_noise", "trap_needle"),
}
LONG_FAMILIES: tuple[str, ...] = ("needle_short", "needle_mid", "needle_long", "kv_recall", "trap_needle")
NOISY_LEVELS: tuple[float, ...] = (0.3, 0.55, 0.75)
WORD_CATEGORIES: dict[str, tuple[str, ...]] = {
    "animal": ("dog", "cat", "horse", "sheep", "lion", "tiger", "rabbit", "goat", "mouse", "bear"),
    "fruit": ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon"),
    "tool": ("hammer", "wrench", "saw", "drill", "chisel", "shovel", "pliers", "axe", "rake", "spanner"),
    "vehicle": ("car", "bus", "truck", "train", "bicycle", "boat", "tram", "van", "plane", "scooter"),
    "country": ("France", "Japan", "Brazil", "Kenya", "Canada", "Norway", "Peru", "Egypt", "India", "Chile"),
}
HEAD_SCORES: tuple[str, ...] = ("Query-Aware", "Trace", "Greedy")
GIBBS_BETA = 1.0
#: Fields of a record that are wall-clock measurements (everything else is reproducible).
TIMING_FIELDS = ("seconds", "prep_seconds", "stats_seconds", "task_seconds", "head_seconds")


@dataclass(frozen=True)
class CalibrationSettings(GridSettings):
    """Everything that determines a calibration record (suite size excluded: suites of different
    sizes share their common prompts). `key()` hashes these settings for the cache folder; `t_max`
    and `actions` (from `GridSettings`, as for the schedule suite) make it usable wherever the
    schedules read suite settings."""

    model: str = EMBEDDED_MODEL
    grid: tuple[int, ...] = (1, 2, 4, 8, 16)   # the fixed-T rules; the oracle trajectory runs to max(grid)
    c: float = 0.1                           # ρ = c/λ_max (paper GD, the theory, the head subsets)
    last_layers: int | None = 4              # few-shot: paper GD on W_V of the last N layers
    lr_long: float = 1e-3                    # qTTT (long contexts): AdamW learning rate
    span_long: int = 64
    max_positions: int = 64                  # long context: supervised positions of the kernel
    fewshot_n: tuple[int, int] = (6, 12)     # demonstrations (inclusive range), digit shift and traps
    word_n: tuple[int, int] = (6, 10)        # demonstrations of the word map
    needle_words: tuple[int, int, int] = (150, 400, 800)  # short, mid, long haystacks
    kv_pairs: tuple[int, int] = (8, 16)      # key–value lines (inclusive range)
    n_fakes: int = 4
    head_k: int = 3
    head_steps: int = 4
    head_random: int = 5
    head_layers: int | None = 8              # head-choice candidates: the blocks of the last N layers
    greedy_budget: int | None = None         # None: rank every block (bottom-k and Spearman need it)
    families: tuple[str, ...] = CAL_FAMILIES
    #: how long-context kernels read the LM head (`fused_head.lm_head_mode`): "fused", or "logits",
    #: the path of every record made before 2026-12-03 (`settings_from_dict` reads a missing key so)
    lm_head: str = "fused"

    def key(self) -> str:
        """`GridSettings.key`, with lm_head = "logits" (the only path before the field existed) left
        out, so suites made before it keep their folder names."""
        d = asdict(self)
        if d["lm_head"] == "logits":
            d.pop("lm_head")
        blob = json.dumps(d, sort_keys=True, default=list)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def suite_settings(self) -> SuiteSettings:
        """The schedule-suite settings whose `make_task` draws the trap prompts."""
        return SuiteSettings(model=self.model, grid=self.grid, fewshot_engine="paper", c=self.c,
                             fewshot_n=self.fewshot_n, needle_words=(int(self.needle_words[1]),),
                             n_fakes=self.n_fakes, max_positions=self.max_positions)

    def validate(self) -> None:
        if not self.grid or min(self.grid) < 1:
            raise ValueError("the step grid must hold positive step counts")
        bad = [f for f in self.families if f not in CAL_FAMILIES]
        if bad or not self.families:
            raise ValueError(f"unknown calibration families {bad}; choose from {CAL_FAMILIES}")
        if not 0 < self.c < 1:
            raise ValueError("c must lie in (0, 1)")
        if self.head_k < 1 or self.head_steps < 1 or self.head_random < 0:
            raise ValueError("head_k and head_steps must be ≥ 1, head_random ≥ 0")
        if len(self.needle_words) != 3:
            raise ValueError("needle_words needs three lengths (short, mid, long)")
        if self.lm_head not in LM_HEAD_MODES:
            raise ValueError(f"lm_head must be one of {LM_HEAD_MODES}")
        for lo, hi in (self.fewshot_n, self.word_n, self.kv_pairs):
            if not 2 <= lo <= hi:
                raise ValueError("ranges must be (lo, hi) with 2 ≤ lo ≤ hi")


def quick_settings(model: str, **overrides: Any) -> CalibrationSettings:
    """Small prompts and a short grid (tests, the page's fresh run, `calibrate --quick`)."""
    kw: dict[str, Any] = dict(model=model, grid=(1, 2, 4), fewshot_n=(4, 6), word_n=(4, 6), needle_words=(20, 30, 40),
                              kv_pairs=(3, 5), max_positions=16, span_long=16, head_steps=2, n_fakes=2)
    kw.update(overrides)
    return CalibrationSettings(**kw)


def prompt_family(prompt: Prompt) -> str:
    """The `FAMILY_GROUPS` group a user's prompt most resembles (for `calibration_report.
    recommended_rule`): few-shot with numeric labels → "digit shift", other labels → "word map";
    a long context of mostly "key: value" lines → "key–value recall", else "needle"."""
    if isinstance(prompt, FewShotPrompt):
        ys = [y for _, y in prompt.demos]
        return "digit shift" if ys and all(y.strip().lstrip("-").isdigit() for y in ys) else "word map"
    lines = [ln for ln in getattr(prompt, "context", "").splitlines() if ln.strip()]
    kv = sum(1 for ln in lines if re.match(r"^\s*[\w -]{1,40}:\s*\S+\s*$", ln))
    return "key–value recall" if lines and kv >= max(3, 0.6 * len(lines)) else "needle"


def calibration_specs(n_prompts: int, families: Sequence[str] = CAL_FAMILIES) -> list[TaskSpec]:
    """The suite's prompts (`suite_tasks.make_specs`: splits by seed, families cycling)."""
    return make_specs(n_prompts, families)


def head_subset(specs: Sequence[TaskSpec], n_head: int) -> set[str]:
    """Task ids of the head-choice subset: round-robin over the families (each family's prompts in
    (index, split) order), the first `n_head` of that order — families stay balanced and a larger
    subset contains a smaller one."""
    order = sorted(specs, key=lambda s: (s.index, SPLITS.index(s.split)))
    rank: dict[str, int] = {}
    keyed = []
    fams = list(dict.fromkeys(s.family for s in specs))
    for s in order:
        r = rank.get(s.family, 0)
        rank[s.family] = r + 1
        keyed.append(((r, fams.index(s.family)), s.task_id))
    return {tid for _, tid in sorted(keyed)[:max(0, int(n_head))]}


# ============================================================================================
# prompts
# ============================================================================================


def word_map_task(rng: np.random.Generator, n: int) -> tuple[FewShotPrompt, dict[str, Any]]:
    """`n` demonstrations "word -> category" from three categories (each at least once) and a query
    word of one of them that no demonstration shows."""
    cats = [str(c) for c in rng.choice(sorted(WORD_CATEGORIES), size=3, replace=False)]
    pool = [(w, c) for c in cats for w in WORD_CATEGORIES[c]]
    first = [(str(rng.choice(WORD_CATEGORIES[c])), c) for c in cats]
    rest = [p for p in pool if p not in first]
    pick = rng.choice(len(rest), size=max(0, n - len(first)), replace=False)
    demos = first + [rest[int(i)] for i in pick]
    demos = [demos[int(i)] for i in rng.permutation(len(demos))]
    seen = {w for w, _ in demos}
    candidates = [p for p in pool if p[0] not in seen]
    qw, qc = candidates[int(rng.integers(len(candidates)))]
    prompt = FewShotPrompt(demos=demos, query_x=qw, query_y=qc, sep="->", spaced=True)
    return prompt, {"n": n, "categories": cats, "query_category": qc}


def make_calibration_task(spec: TaskSpec, settings: CalibrationSettings) -> tuple[Prompt, dict[str, Any]]:
    """(prompt, description) of a calibration prompt; deterministic in (seed, family, settings)."""
    fam = spec.family
    if fam.startswith("trap_"):
        return make_task(spec, settings.suite_settings())
    rng = np.random.default_rng(spec.seed)
    if fam.startswith("shift_"):
        lo, hi = settings.fewshot_n
        n = int(rng.integers(lo, hi + 1))
        template = 0 if fam.endswith("arrow") else 1
        noise = 0.0 if "clean" in fam else float(rng.choice(NOISY_LEVELS))
        task = digit_shift_task(rng, n=n, noise=noise, template=template)
        return task.prompt, {"n": n, "noise": noise, "shift": task.shift, "template": template}
    if fam == "word_map":
        lo, hi = settings.word_n
        return word_map_task(rng, int(rng.integers(lo, hi + 1)))
    if fam.startswith("needle_"):
        words = int(settings.needle_words[("needle_short", "needle_mid", "needle_long").index(fam)])
        position = float(rng.uniform(0.05, 0.95))
        return needle_haystack(rng, n_words=words, position=position), {"n_words": words, "position": position}
    if fam == "kv_recall":
        lo, hi = settings.kv_pairs
        pairs = int(rng.integers(lo, hi + 1))
        return kv_recall(rng, n_pairs=pairs), {"n_pairs": pairs}
    raise ValueError(f"unknown calibration family {fam!r}")


# ============================================================================================
# one trajectory of real TTT
# ============================================================================================


def _trajectory(lm: LoadedModel, prompt: Prompt, settings: CalibrationSettings, seed: int, steps: int,
                blocks: Sequence[tuple[int, int]] | None, lambda_max: float,
                shared: dict | None = None) -> dict[str, Any]:
    """Paper GD (few-shot, W_V `blocks`, ρ = c/λ_max) or qTTT (long context, W_Q `blocks`, None =
    every head) for `steps` steps: error and cumulative seconds at T = 0…steps."""
    few = isinstance(prompt, FewShotPrompt)
    heads = None if blocks is None else [tuple(int(x) for x in b) for b in blocks]
    if few:
        cfg = PaperConfig(steps=steps, c=settings.c, lambda_max=max(float(lambda_max), 1e-30), kind="v", heads=heads)
        run: QTTTRun | PaperRun = PaperRun(lm, prompt, cfg, shared=shared)
    else:
        run = QTTTRun(lm, prompt, QTTTConfig(steps=steps, span=settings.span_long, lr=settings.lr_long, heads=heads,
                                             seed=int(seed), max_new_tokens=8))
    t0 = time.perf_counter()
    base = run.prepare()
    prep_s = time.perf_counter() - t0
    out: dict[str, Any] = {"run": run, "prep_seconds": prep_s}
    if few:
        err, extra = [float(base.query_error)], {"prediction": [base.query_prediction]}
        out["confidence"] = max(base.label_probs.values()) if base.label_probs else float("nan")
    else:
        assert isinstance(run, QTTTRun)
        err = [_needle_error(base.answer_nll, run.enc.answer_len)]
        extra = {"answer_nll": [base.answer_nll]}
    seconds = [0.0]
    for rec in run.steps():
        seconds.append(seconds[-1] + rec.step_s)
        if rec.status != "ok":
            break
        if few:
            err.append(float(rec.query_error))
            extra["prediction"].append(rec.query_prediction)
        else:
            err.append(_needle_error(rec.answer_nll, run.enc.answer_len))
            extra["answer_nll"].append(rec.answer_nll)
    out.update(steps_done=len(err) - 1, errors=_fill(err, steps + 1), seconds=_fill(seconds, steps + 1)[: steps + 1],
               extra=extra, status=run.status, reason=run.reason)
    return out


def oracle_of(errors: Sequence[float]) -> dict[str, Any]:
    """Oracle T (first argmin of the measured error over T = 0…T_max), its error, and "TTT helps"
    (the minimum over T > 0 is below the T = 0 error)."""
    e = np.asarray(errors, dtype=float)
    e = np.where(np.isfinite(e), e, np.inf)
    T = int(np.argmin(e))
    return {"T": T, "error": float(e[T]), "helps": bool(e.size > 1 and float(e[1:].min()) < float(e[0]))}


def calibration_statistics(K: np.ndarray, residuals: np.ndarray, k_x: np.ndarray | None, n_positions: int,
                           settings: CalibrationSettings) -> dict[str, Any]:
    """`suite_tasks.kernel_statistics` plus P(TTT beats ICL at T) for T = 0…T_max over the §5.1
    posterior (`prob_grid`) and the Gibbs posterior over T (`gibbs`, β = GIBBS_BETA, fixed σ̂)."""
    stats, rep = kernel_statistics(K, residuals, k_x, n_positions, settings.c, settings.t_max)
    grid = np.arange(settings.t_max + 1, dtype=float)
    ell = theory.evidence_scores(rep.lam, rep.r_tilde, rep.rho, grid, noise="fixed")
    nu = theory.gibbs_posterior(ell, GIBBS_BETA, n=max(int(rep.lam.size), 1))
    stats.update({"prob_grid": [float(p) for p in rep.prob_grid], "gibbs": [float(v) for v in nu],
                  "gibbs_beta": GIBBS_BETA, "posterior_flag": rep.flag})
    return stats


# ============================================================================================
# one task
# ============================================================================================


def _scores_and_subsets(ev: Any, settings: CalibrationSettings) -> tuple[list[list[tuple[int, int]]],
                                                                          dict[str, dict[str, int]], list[int],
                                                                          dict[str, np.ndarray]]:
    """Distinct subsets to run; per score the indices of its top / bottom subsets; the indices of
    the random subsets; per score the value of every block (larger = adapt first; greedy: minus
    the pick rank)."""
    has_q = ev.head_couplings is not None
    cands = select_blocks(ev, settings.head_layers)
    allowed = set(cands)
    nb = len(cands)
    k = min(int(settings.head_k), nb)
    budget = len(ev.blocks()) if settings.greedy_budget is None else int(settings.greedy_budget)
    sc = score_blocks(ev, greedy_budget=budget if has_q else 0, greedy_c=settings.c, top_k=k)
    avail = sc.available()
    names = {"Query-Aware": "Query-Aware", "Trace": "Trace", "Greedy": "Greedy rank"}
    subsets: list[list[tuple[int, int]]] = []
    index: dict[tuple, int] = {}

    def add(blocks: Sequence[tuple[int, int]]) -> int:
        key = tuple(sorted((int(l), int(h)) for l, h in blocks))
        if key not in index:
            index[key] = len(subsets)
            subsets.append(list(key))
        return index[key]

    picks: dict[str, dict[str, int]] = {}
    values: dict[str, np.ndarray] = {}
    for score in HEAD_SCORES:
        if names[score] not in avail:
            continue
        ranked = [b for b in ((int(r["layer"]), int(r["head"])) for r in sc.ranked(names[score])) if b in allowed]
        arr = np.asarray(avail[names[score]], dtype=float)
        values[score] = -arr if score == "Greedy" else arr
        entry = {"top": add(ranked[:k])}
        if len(ranked) == nb:
            entry["bottom"] = add(ranked[-k:])
        picks[score] = entry
    # random k-subsets of the candidates (as `score_check.choose_subsets`, seed 0), shared by every score
    rng = np.random.default_rng(0)
    random = [add([cands[int(j)] for j in np.sort(rng.choice(nb, size=k, replace=False))])
              for _ in range(int(settings.head_random))]
    return subsets, picks, random, values


def head_runs(lm: LoadedModel, prompt: Prompt, ev: Any, settings: CalibrationSettings, seed: int) -> dict[str, Any]:
    """The head-choice record of one prompt (module docstring): every distinct subset's measured
    error change after `head_steps` steps (ρ = c/λ_max(K_S) of the subset's own kernel), and each
    score's value of every subset (the sum of its blocks' scores)."""
    t0 = time.perf_counter()
    subsets, picks, random, values = _scores_and_subsets(ev, settings)
    shared: dict = {}
    rows = []
    for blocks in subsets:
        ts = time.perf_counter()
        K_S, _ = block_kernel(ev, blocks)
        lmax = float(np.linalg.eigvalsh(0.5 * (K_S + K_S.T))[-1])
        tr = _trajectory(lm, prompt, settings, seed, settings.head_steps, blocks, lmax, shared=shared)
        e0, e1 = tr["errors"][0], tr["errors"][-1]
        change = e1 - e0 if math.isfinite(e0) and math.isfinite(e1) else None
        rows.append({"blocks": [list(b) for b in blocks], "error_start": e0, "error_end": e1, "change": change,
                     "lambda_max": lmax, "status": tr["status"], "seconds": time.perf_counter() - ts,
                     "score_values": {s: float(sum(v[l, h] for l, h in blocks)) for s, v in values.items()}})
    return {"k": min(settings.head_k, len(select_blocks(ev, settings.head_layers))), "steps": settings.head_steps, "subspace": ev.subspace,
            "subsets": rows, "picks": picks, "random": random, "head_seconds": time.perf_counter() - t0}


def run_calibration_task(lm: LoadedModel, spec: TaskSpec, settings: CalibrationSettings,
                         heads: bool = False) -> dict[str, Any]:
    """One calibration record (module docstring): statistics, oracle trajectory, and with `heads`
    the head-choice runs (under "heads"); the LM head read as `settings.lm_head` says."""
    with lm_head_mode(settings.lm_head):
        return _calibration_task(lm, spec, settings, heads)


def _calibration_task(lm: LoadedModel, spec: TaskSpec, settings: CalibrationSettings, heads: bool) -> dict[str, Any]:
    t_start = time.perf_counter()
    prompt, meta = make_calibration_task(spec, settings)
    few = isinstance(prompt, FewShotPrompt)
    T = settings.t_max
    subspace = "v" if few else "q"
    extra: dict[str, Any] = {}
    blocks = None
    t0 = time.perf_counter()
    if few:  # paper GD's ρ = c/λ_max needs the kernel first (the kernel of the updated blocks)
        ev = compute_prompt_kernel(lm, prompt, subspace, max_positions=settings.max_positions)
        blocks = select_blocks(ev, settings.last_layers)
        K, kx = block_kernel(ev, blocks)
        stats = calibration_statistics(K, ev.residuals, kx, int(ev.n), settings)
        stats_s = time.perf_counter() - t0
        tr = _trajectory(lm, prompt, settings, spec.seed, T, blocks, stats["lambda_max"])
        confidence = tr["confidence"]
        n_tokens = int(tr["run"].query_ids.shape[1])
    else:
        tr = _trajectory(lm, prompt, settings, spec.seed, T, None, 0.0)
        run = tr["run"]
        greedy = run.generate(adapted=False, max_new_tokens=8)
        extra["base_answer"] = greedy
        extra["base_correct"] = bool(greedy.strip().startswith(str(prompt.answer)))
        confidence = _answer_row_confidence(lm, run)
        n_tokens = int(run.enc.n_prompt)
        # the statistics' query output is the model's OWN answer (no label leak)
        stats_prompt = LongContextPrompt(context=prompt.context, question=prompt.question,
                                         answer=greedy.strip() or None, needle_spans=prompt.needle_spans)
        t0 = time.perf_counter()
        ev = compute_prompt_kernel(lm, stats_prompt, subspace, max_positions=settings.max_positions)
        stats = calibration_statistics(ev.K, ev.residuals, ev.k_x, int(ev.n), settings)
        stats_s = time.perf_counter() - t0
    extra.update(tr["extra"])
    stats.update({"n_tokens": n_tokens, "confidence": float(confidence), "long_context": not few})
    if few:
        engine = (f"paper GD (W_V, last {settings.last_layers or 'all'} layers, ρ = c/λ_max, c = {settings.c:g})")
    else:
        engine = f"qTTT (W_Q, AdamW lr {settings.lr_long:g}, span {settings.span_long})"
    rec: dict[str, Any] = {
        "task_id": spec.task_id, "split": spec.split, "index": spec.index, "seed": spec.seed, "family": spec.family,
        "meta": meta, "engine": engine, "subspace": subspace, "errors": [float(e) for e in tr["errors"]],
        "seconds": [float(s) for s in tr["seconds"]], "prep_seconds": float(tr["prep_seconds"]),
        "stats_seconds": float(stats_s), "steps_done": int(tr["steps_done"]), "status": tr["status"],
        "reason": tr["reason"], "oracle": oracle_of(tr["errors"]), "stats": stats, "extra": extra,
        "prompt_text": prompt.to_text()}
    if heads:
        rec["heads"] = head_runs(lm, prompt, ev, settings, spec.seed)
    rec["task_seconds"] = time.perf_counter() - t_start
    return rec


def strip_timings(rec: Any) -> Any:
    """A record without its wall-clock fields (`TIMING_FIELDS`, recursively): what must be
    identical when a task is recomputed."""
    if isinstance(rec, dict):
        return {k: strip_timings(v) for k, v in rec.items() if k not in TIMING_FIELDS}
    if isinstance(rec, list):
        return [strip_timings(v) for v in rec]
    return rec
