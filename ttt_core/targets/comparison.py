"""Which parameters and which signal? One prompt, every target × signal side by side (DESIGN §11;
issue 12 item 3).

`compare_targets` returns one `TargetRow` per (target, signal):

* from the target's prompt kernel (`prompt_kernel.compute_prompt_kernel(lm, prompt, target)`, one
  per target, shared by its signals; the kernel is that of the squared-loss frame of DESIGN §7 —
  for the entropy signals it describes one step with the pseudo-residual only, DESIGN §11):
  effective rank (exp spectral entropy, `spectrum.effective_rank`), λ⋆ posterior median and 90 %
  interval (§5.1), the §4 verdict at T_MAP (fixed σ̂, as `diagnose` reports it) with
  P(TTT beats ICL) (`spectrum.compute_spectrum`), and the top blocks within the target
  (`scores.score_blocks`: Query-Aware with a query, else Trace). A kernel that cannot be built
  (a target whose kernel has not landed, an architecture without it) gives the row
  ``kernel_status = "unavailable"`` and the reason, never an exception;
* from real runs (`targets.engine.TargetRun`, the same AdamW settings and step budget for all):
  the measured query error at every step (few-shot: squared error; long context: answer NLL),
  its change after `steps` steps, seconds, counted FLOPs per training step (`targets.measure`)
  and the peak memory of the run.

Seeds: each seed sets the span starts and, for LoRA, the init of A. A target whose run cannot
depend on the seed (no random init and a span that covers the whole context, or a signal without
a span) runs once and its value is paired with every seed. The winner is the row with the lowest
mean error change; how sure is the paired difference to the runner-up over the seeds (95 %
bootstrap CI, `experiments.stats.paired_stats`), or a sentence saying why there is none.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from ttt_core import theory
from ttt_core.experiments.stats import paired_stats
from ttt_core.figure_data import json_clean
from ttt_core.kernel_routes import KV_KINDS, frozen_kv_refusal
from ttt_core.models import LoadedModel
from ttt_core.prompt_kernel import compute_prompt_kernel
from ttt_core.prompts import Prompt, parse_prompt
from ttt_core.qttt import DEFAULT_LR
from ttt_core.scores import score_blocks
from ttt_core.spectrum import T_GRID, compute_spectrum
from ttt_core.steps import block_kernel, select_blocks
from ttt_core.targets.engine import TargetConfig, TargetRun, error_label, measured_error
from ttt_core.targets.measure import FLOPS_METHOD, PeakMemory, count_step_flops
from ttt_core.targets.registry import DEFAULT_TARGETS, TargetUnavailableError, param_count, parse_target
from ttt_core.targets.signals import NEEDS_SPAN, SIGNALS, check_signal
from ttt_core.types import Progress, StopLike, should_stop

MIN_SEEDS_FOR_CI = 3
#: compare_targets' K/V modes (its docstring).
KV_CHOICES = ("auto", "frozen")


@dataclass
class KernelSummary:
    """The kernel columns of one target (module docstring); status "ok" | "unavailable"."""

    status: str
    note: str | None = None
    n: int = 0
    route: str | None = None
    effective_rank: float | None = None
    participation_ratio: float | None = None
    lambda_star: float | None = None
    lambda_star_ci90: tuple[float, float] | None = None
    verdict_T: float | None = None
    prob_ttt_beats_icl: float | None = None
    decision: str | None = None
    criterion: str | None = None
    top_blocks: list[str] = field(default_factory=list)
    ranked_by: str | None = None
    seconds: float = 0.0


@dataclass
class TargetRow:
    """One target × signal. errors: mean measured error over seeds at steps 0…steps; deltas: the
    error change after `steps` steps per seed (paired with `TargetComparison.seeds`)."""

    target: str
    label: str
    family: str
    signal: str
    route: str | None
    params: int | None
    kernel: KernelSummary
    status: str = "ok"          # ok | diverged | unavailable | stopped
    reason: str | None = None
    errors: list[float | None] = field(default_factory=list)
    deltas: list[float | None] = field(default_factory=list)
    delta_mean: float | None = None
    error_start: float | None = None
    error_end: float | None = None
    seeds_run: int = 0
    deterministic: bool = False
    seconds: float | None = None
    step_seconds: float | None = None
    flops_per_step: int | None = None
    peak_memory_bytes: int | None = None

    def flops_axis(self) -> list[float] | None:
        """Cumulative training FLOPs at steps 0…steps (None without a count)."""
        if self.flops_per_step is None:
            return None
        return [float(t * self.flops_per_step) for t in range(len(self.errors))]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TargetComparison:
    """The result of `compare_targets`: rows, the winner sentence and its statistics."""

    model: str
    prompt_kind: str
    error_label: str
    steps: int
    seeds: list[int]
    rows: list[TargetRow]
    winner: str | None
    sentence: str
    stats: dict[str, Any] | None
    settings: dict[str, Any]
    flops_method: str = FLOPS_METHOD
    memory_method: str = ""
    seconds: float = 0.0

    def row(self, target: str, signal: str = "nll") -> TargetRow:
        for r in self.rows:
            if r.target == target and r.signal == signal:
                return r
        raise KeyError((target, signal))

    def table(self) -> list[dict[str, Any]]:
        """Flat rows for a table or CSV."""
        out = []
        for r in self.rows:
            k = r.kernel
            ci = k.lambda_star_ci90 or (None, None)
            out.append({"target": r.target, "label": r.label, "signal": r.signal, "route": r.route,
                        "params": r.params, "kernel": k.status, "effective_rank": k.effective_rank,
                        "lambda_star": k.lambda_star, "lambda_star_lo": ci[0], "lambda_star_hi": ci[1],
                        "verdict": k.decision, "P(TTT beats ICL)": k.prob_ttt_beats_icl, "verdict_T": k.verdict_T,
                        "top_blocks": ", ".join(k.top_blocks), "error_start": r.error_start, "error_end": r.error_end,
                        "delta_error": r.delta_mean, "seeds": r.seeds_run, "seconds": r.seconds,
                        "step_seconds": r.step_seconds, "flops_per_step": r.flops_per_step,
                        "peak_memory_MB": None if r.peak_memory_bytes is None else r.peak_memory_bytes / 1e6,
                        "status": r.status, "note": r.reason or k.note})
        return out

    def to_dict(self) -> dict[str, Any]:
        return json_clean({"ttt_lens_targets": 1, **{k: v for k, v in asdict(self).items()}, "table": self.table()})


# --------------------------------------------------------------------------------------------
# kernel columns
# --------------------------------------------------------------------------------------------


def _kernel_kwargs(seed: int) -> dict[str, Any]:
    """Pass the LoRA seed to the kernel when its signature takes one (the kernel and the engine
    then draw the same A)."""
    try:
        params = inspect.signature(compute_prompt_kernel).parameters
    except (TypeError, ValueError):
        return {}
    for name in ("lora_seed", "seed"):
        if name in params:
            return {name: int(seed)}
    return {}


def kernel_summary(lm: LoadedModel, prompt: Prompt, target: str, *, c: float = 0.1, last_layers: int | None = None,
                   top_k: int = 3, max_positions: int = 256, seed: int = 0, kv: str = "auto") -> KernelSummary:
    """The kernel columns of `target` on `prompt` (module docstring); "unavailable" with the reason
    instead of raising. `kv`: `compute_prompt_kernel`'s K/V mode ("auto", "frozen", "full")."""
    t0 = time.perf_counter()
    try:
        kw = _kernel_kwargs(seed) if parse_target(target).stochastic else {}
        ev = compute_prompt_kernel(lm, prompt, target, max_positions=max_positions, kv=kv, **kw)
    except Exception as exc:  # noqa: BLE001 — a missing kernel marks the row, never fails the page
        return KernelSummary(status="unavailable", note=f"kernel unavailable: {exc}",
                             seconds=time.perf_counter() - t0)
    blocks = select_blocks(ev, last_layers)
    K, kx = block_kernel(ev, blocks)
    r = np.asarray(ev.residuals, dtype=float)
    lam, U = theory.eigh_psd(K)
    rho = theory.rho_from_c(lam, c)
    T = float(theory.select_steps(lam, U.T @ r, rho, T_GRID, noise="fixed")) if lam.size and lam[0] > 0 else 0.0
    spec = compute_spectrum(K, r, kx, T=T, c=c)
    sc = score_blocks(ev, posterior=spec.posterior if last_layers is None else None)
    rank_by = "Query-Aware" if ev.head_couplings is not None else "Trace"
    layers = {l for l, _ in blocks}
    top = [row["block"] for row in sc.ranked(rank_by) if row["layer"] in layers][:top_k]
    return KernelSummary(status="ok", n=ev.n, route=ev.route, effective_rank=spec.eff_rank_entropy,
                         participation_ratio=spec.participation_ratio, lambda_star=spec.lam_star,
                         lambda_star_ci90=tuple(spec.lam_star_ci), verdict_T=T, prob_ttt_beats_icl=spec.prob,
                         decision=spec.decision, criterion=spec.criterion, top_blocks=top, ranked_by=rank_by,
                         note=spec.flag, seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# measured columns
# --------------------------------------------------------------------------------------------


def _curve(base: Any, recs: list[Any], steps: int) -> list[float | None]:
    """Measured error at steps 0…steps; after an early stop the last good value is repeated (the
    run keeps its last good params)."""
    vals = [measured_error(base)]
    for rec in recs:
        vals.append(measured_error(rec) if rec.status == "ok" else vals[-1])
    while len(vals) < steps + 1:
        vals.append(vals[-1])
    return vals[: steps + 1]


def _one_run(lm: LoadedModel, prompt: Prompt, cfg: TargetConfig, count_flops: bool, stop: StopLike) -> dict[str, Any]:
    t0 = time.perf_counter()
    with PeakMemory(lm.device) as pm:
        run = TargetRun(lm, prompt, cfg, stop=stop)
        base = run.prepare()
        recs = run.run_to_end()
    seconds = time.perf_counter() - t0
    flops = count_step_flops(run) if count_flops and run.status != "diverged" else None
    ok = [r.step_s for r in recs if r.status == "ok"]
    span_free = not NEEDS_SPAN[cfg.signal] or run.enc.n_ctx - 1 - run.span <= 0
    return {"errors": _curve(base, recs, cfg.steps), "status": run.status, "reason": run.reason, "seconds": seconds,
            "step_seconds": float(np.median(ok)) if ok else None, "flops": flops, "memory": pm.bytes,
            "memory_method": pm.method, "route": run.route, "params": run.params.n_params,
            "deterministic": span_free and not run.target.stochastic}


def _nanmean(xs: Sequence[float | None]) -> float | None:
    v = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else None


def _measure_row(row: TargetRow, lm: LoadedModel, prompt: Prompt, base_cfg: dict[str, Any], seeds: list[int],
                 count_flops: bool, stop: StopLike) -> str:
    runs: list[dict[str, Any]] = []
    method = ""
    if base_cfg.get("route") == "frozen_kv" and parse_target(row.target).kind in KV_KINDS:
        row.status, row.reason = "unavailable", frozen_kv_refusal(row.target)
        return method
    for i, seed in enumerate(seeds):
        if should_stop(stop):
            break
        cfg = TargetConfig(**{**base_cfg, "target": row.target, "signal": row.signal, "seed": int(seed)})
        try:
            res = _one_run(lm, prompt, cfg, count_flops and i == 0, stop)
        except TargetUnavailableError as exc:
            row.status, row.reason = "unavailable", f"engine unavailable: {exc}"
            return method
        runs.append(res)
        method = res["memory_method"]
        if i == 0 and res["deterministic"]:
            break
    if not runs:
        row.status, row.reason = "stopped", "stopped before the first run"
        return method
    first = runs[0]
    row.route, row.params, row.deterministic = first["route"], first["params"], first["deterministic"]
    row.flops_per_step, row.seeds_run = first["flops"], len(runs)
    curves = [r["errors"] for r in runs]
    if first["deterministic"]:
        curves = curves * len(seeds)
    row.errors = [_nanmean([c[t] for c in curves]) for t in range(len(curves[0]))]
    row.deltas = [None if c[-1] is None or c[0] is None else c[-1] - c[0] for c in curves]
    row.delta_mean = _nanmean(row.deltas)
    row.error_start, row.error_end = row.errors[0], row.errors[-1]
    row.seconds = float(np.mean([r["seconds"] for r in runs]))
    steps_s = [r["step_seconds"] for r in runs if r["step_seconds"] is not None]
    row.step_seconds = float(np.median(steps_s)) if steps_s else None
    mems = [r["memory"] for r in runs if r["memory"] is not None]
    row.peak_memory_bytes = int(max(mems)) if mems else None
    bad = [r for r in runs if r["status"] != "done"]
    if bad:
        row.status = "diverged" if any(r["status"] == "diverged" for r in bad) else bad[0]["status"]
        row.reason = bad[0]["reason"]
    return method


# --------------------------------------------------------------------------------------------
# the winner
# --------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{x:+.4g}"


def winner_sentence(rows: list[TargetRow], seeds: list[int], label: str, steps: int) -> tuple[str | None, str, dict | None]:
    """(winner "target/signal", sentence, paired statistics or None) — module docstring."""
    ok = [r for r in rows if r.delta_mean is not None]
    if not ok:
        return None, (f"No {label} was measured on this prompt (it needs a known answer): no target can be "
                      "called the winner."), None
    ok.sort(key=lambda r: r.delta_mean)
    best = ok[0]
    name = f"{best.target} / {best.signal}"
    if best.delta_mean >= 0:
        head = (f"No target lowered the {label} in {steps} steps; the least harmful is {best.label} "
                f"({best.target}) with {best.signal} (change {_fmt(best.delta_mean)}).")
    else:
        head = (f"{best.label} ({best.target}) with {best.signal} wins on this prompt: the {label} changes by "
                f"{_fmt(best.delta_mean)} after {steps} steps")
        head += f" (runner-up {ok[1].target} / {ok[1].signal}: {_fmt(ok[1].delta_mean)})." if len(ok) > 1 else "."
    if len(ok) == 1:
        return name, head + " It is the only row with a measured error.", None
    run = ok[1]
    pairs = [(a, b) for a, b in zip(run.deltas, best.deltas) if a is not None and b is not None]
    if best.deterministic and run.deterministic:
        return name, head + (" Both runs are deterministic here (no random init, and the span covers the whole "
                             "context or the signal has none), so the margin is exact for this prompt and these "
                             "settings — it says nothing about other prompts (see the suite)."), None
    if len(pairs) < MIN_SEEDS_FOR_CI:
        return name, head + (f" How sure: only {len(pairs)} paired seed(s) — too few for a confidence interval "
                             f"(need ≥ {MIN_SEEDS_FOR_CI})."), None
    a = np.array([p[0] for p in pairs])
    b = np.array([p[1] for p in pairs])
    st = paired_stats(a, b, n_boot=2000)
    if st["ci_low"] > 0 and st["p"] < 0.05:
        tail = "the 95 % CI excludes 0 and p < 0.05: the win is clear over these seeds"
    elif st["ci_low"] > 0:
        tail = (f"the 95 % CI excludes 0 but p ≥ 0.05 (with {st['n']} seeds the smallest possible paired "
                f"permutation p is {2 / 2 ** st['n']:.3g}): suggestive, not sure")
    else:
        tail = "the 95 % CI includes 0: not sure — the runner-up may be as good"
    return name, head + (f" Paired over {st['n']} seeds, the margin over the runner-up is {_fmt(st['mean'])} "
                         f"[{_fmt(st['ci_low'])}, {_fmt(st['ci_high'])}] (p = {st['p']:.3g}); {tail}."), st


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def compare_targets(lm: LoadedModel, prompt: Prompt | str, targets: Sequence[str] = DEFAULT_TARGETS,
                    signals: Sequence[str] = ("nll",), steps: int = 8, seeds: Sequence[int] = (0,), *,
                    lr: float = DEFAULT_LR, span: int = 128, last_layers: int | None = None, c: float = 0.1,
                    top_k: int = 3, max_positions: int = 256, kernels: bool = True, count_flops: bool = True,
                    kv: str = "auto", progress: Progress = None, stop: StopLike = None) -> TargetComparison:
    """Every target × signal on one prompt (module docstring). `lr`, `span`, `steps` are shared by
    all runs (AdamW, qTTT's other settings); `last_layers` restricts both the kernel and the
    training to the last N layers; `kernels=False` skips the kernel columns. `kv`: "auto" (frozen
    K/V for the query-path targets, W_Q and LoRA on W_Q, as qTTT; full context for the others) or
    "frozen" (every target adapted with all keys and values frozen — the qTTT-style update — with
    the kernel of that update: one backward per kernel on long prompts; W_K/W_V rows are marked
    unavailable, they make the keys and values)."""
    if kv not in KV_CHOICES:
        raise ValueError(f"kv must be one of {list(KV_CHOICES)}, got {kv!r}")
    t0 = time.perf_counter()
    p = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    targets = [parse_target(t).name for t in targets]
    signals = [check_signal(s) for s in signals]
    seeds = [int(s) for s in seeds] or [0]
    base_cfg = dict(steps=int(steps), span=int(span), lr=float(lr), last_layers=last_layers,
                    **({"route": "frozen_kv"} if kv == "frozen" else {}))
    total = len(targets) * (1 + len(signals))
    done = 0

    def tell(text: str) -> None:
        if progress is not None:
            progress(min(done / max(total, 1), 1.0), text)

    rows: list[TargetRow] = []
    method = ""
    for name in targets:
        t = parse_target(name)
        tell(f"kernel of {name}")
        ks = (kernel_summary(lm, p, name, c=c, last_layers=last_layers, top_k=top_k, max_positions=max_positions,
                             seed=seeds[0], kv=kv) if kernels else KernelSummary(status="skipped", note="kernels not asked for"))
        done += 1
        try:
            n_params = param_count(lm, t, last_layers)
        except (ValueError, KeyError, IndexError):
            n_params = None
        for sig in signals:
            tell(f"TTT on {name} with {sig}")
            row = TargetRow(target=name, label=t.label, family=t.family, signal=sig, route=None, params=n_params,
                            kernel=ks)
            method = _measure_row(row, lm, p, base_cfg, seeds, count_flops, stop) or method
            rows.append(row)
            done += 1
    label = error_label(p)
    winner, sentence, st = winner_sentence(rows, seeds, label, int(steps))
    tell("done")
    return TargetComparison(model=lm.name, prompt_kind=type(p).__name__, error_label=label, steps=int(steps),
                            seeds=seeds, rows=rows, winner=winner, sentence=sentence, stats=st,
                            settings={**base_cfg, "kv": kv, "c": c, "top_k": top_k, "max_positions": max_positions,
                                      "targets": targets, "signals": signals,
                                      "signal_labels": {s: SIGNALS[s] for s in signals},
                                      "optimiser": "AdamW (β 0.9/0.999, eps 1e-8, wd 0.01), clip 1.0"},
                            memory_method=method, seconds=time.perf_counter() - t0)
