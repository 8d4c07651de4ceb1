"""How far to adapt: error against step count next to the evidence and PAC-Bayes curves
(DESIGN §3, §5; paper A.3, A.6). Issue 6.

For one prompt, one update subspace (a set of blocks = heads of one projection kind, by default
those of the last ``last_layers`` layers) and one step axis T ∈ {0, …, grid_max}:

* **Measured** (nonlinear) TTT — ONE engine run records the whole trajectory
  (`ttt_core.qttt`):
  - few-shot, subspace v or q: paper mode, plain gradient descent on the squared leave-one-out
    loss over the selected heads, with the engine's ρ set to the theory's ρ = c/λ_max of the
    *same* kernel K (so the measured and linearised curves are comparable step for step); the
    query prediction, its squared error and the prompt residuals are recorded at every step;
  - long context with a question and an answer, subspace q: qTTT (AdamW on the span NLL, W_Q of
    the selected heads); the answer NLL and probability are recorded at every step. qTTT's
    optimiser and loss are not the linearised GD on the squared loss, so that curve is shown as
    what qTTT does, not as a test of the linearisation (``comparable`` is False).
* **Linearised** prediction from the kernel (DESIGN §3): query f_T(x) = f_0(x) + k_xᵀ q_T(K) r =
  f_0 + Σ_i ã_i q_T(λ_i) r̃_i, error (f_T(x) − y)²; prompt residual (I − ρK)^T r, mean square
  ‖(I − ρK)^T r‖²/n.
* **Evidence** ℓ_T with fixed σ̂² = ‖r‖²/n and with σ² profiled out (both on the ℓ scale),
  T_MAP of each (DESIGN §5).
* **PAC-Bayes bound** ℓ_T + sqrt(v̄ (log|grid| + log 1/δ)/n) for the point-mass posterior, with
  v̄ computed under the **plug-in** Σ̂⋆ = τ̂²K + σ̂²I (τ̂², σ̂² maximise the GP evidence,
  `theory.fit_signal_noise`). On a real prompt Σ⋆ is unknown, so this is an *estimate*, never a
  certificate; every output carries ``plug_in: True``. The plug-in population risk 𝓛̂(T|K) is
  returned beside it.
* **Gibbs posterior** over T, ν_β(T) ∝ exp(−β n ℓ_T) (uniform prior), its KL to the prior and the
  general PAC-Bayes bound E_ν𝓛 ≤ E_νℓ + (KL + log 1/δ)/(βn) + βv̄/4 (same plug-in v̄).
* **Verdict**: T* = T_MAP (fixed σ̂); "adapt" iff T* > 0 and the plug-in query Bayes gap at T*
  is below ICL's (DESIGN §4; prompt-value excess risk when there is no query).

Curves that cannot be drawn for a prompt are listed in ``StepsReport.unavailable`` with the reason
(no answer, free text, a subspace the engine does not update, …).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from ttt_core import theory
from ttt_core.measured import Measured, measure_fewshot, measure_long
from ttt_core.models import LoadedModel
from ttt_core.noise_posterior import ADAPT, DONT_ADAPT, UNDETERMINED, NoisePosterior, noise_posterior
from ttt_core.posterior_verdict import posterior_dict, slack_interval, verdict_probability
from ttt_core.prompt_kernel import PromptKernel, compute_prompt_kernel, subspace_label
from ttt_core.prompts import FewShotPrompt, LongContextPrompt
from ttt_core.types import Block, Progress, block_label

DEFAULT_GRID_MAX = 30
DEFAULT_C = theory.DEFAULT_C
DEFAULT_DELTA = 0.05
DEFAULT_BETA = 1.0
DEFAULT_LAST_LAYERS = 4
PLUG_IN_LABEL = "plug-in PAC-Bayes bound (estimate)"


# --------------------------------------------------------------------------------------------
# blocks and kernels of a subset of the subspace
# --------------------------------------------------------------------------------------------


def select_blocks(ev: PromptKernel, last_layers: int | None = DEFAULT_LAST_LAYERS) -> list[Block]:
    """Every block (layer, head) of the evidence's subspace in its last `last_layers` layers
    (None or ≥ number of layers: all layers)."""
    L = int(ev.n_layers)
    first = 0 if last_layers is None or last_layers >= L else L - int(last_layers)
    if last_layers is not None and last_layers < 1:
        raise ValueError("last_layers must be ≥ 1 (or None for all layers)")
    return [(l, h) for l in range(first, L) for h in range(int(ev.n_blocks_per_layer))]


def block_kernel(ev: PromptKernel, blocks: Sequence[Block]) -> tuple[np.ndarray, np.ndarray | None]:
    """K_S = Σ_{b∈S} K^(b) (n, n) and k_x,S = Σ_{b∈S} k_x^(b) (n,) (None without a query).
    Kernels and couplings of disjoint blocks add (DESIGN §2)."""
    n = ev.n
    K = np.zeros((n, n))
    by_layer: dict[int, list[int]] = {}
    for l, h in blocks:
        by_layer.setdefault(int(l), []).append(int(h))
    if not by_layer:
        raise ValueError("no blocks selected")
    for l, hs in by_layer.items():
        hs = sorted(set(hs))
        if len(hs) == ev.n_blocks_per_layer:
            K += ev.layer_kernel(l)
        else:
            K += ev.factors[l].head_kernels(hs).sum(0).double().cpu().numpy()
    kx = None
    if ev.head_couplings is not None:
        kx = np.zeros(n)
        for l, hs in by_layer.items():
            kx += ev.head_couplings[l, sorted(set(hs))].sum(0)
    return 0.5 * (K + K.T), kx


def blocks_label(ev: PromptKernel, blocks: Sequence[Block]) -> str:
    """Human description of a block set, e.g. "W_V heads of layers 26–29 (12 blocks)"."""
    layers = sorted({l for l, _ in blocks})
    span = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}–{layers[-1]}"
    if len(layers) > 1 and layers != list(range(layers[0], layers[-1] + 1)):
        span = "layers " + ", ".join(map(str, layers))
    return f"{subspace_label(ev.subspace)}, {span} ({len(blocks)} blocks)"


# --------------------------------------------------------------------------------------------
# pure spectral part (numpy only): linearised curves, evidence, bounds
# --------------------------------------------------------------------------------------------


@dataclass
class BoundPart:
    """PAC-Bayes quantities under the plug-in Σ̂⋆ = τ̂²K + σ̂²I (arrays over the grid)."""
    delta: float
    beta: float
    v_T: np.ndarray
    v_bar: float
    slack: float
    bound: np.ndarray           # ℓ_T (fixed σ̂) + slack, point-mass posterior
    population_risk: np.ndarray  # plug-in 𝓛̂(T|K)
    gibbs: np.ndarray           # ν_β over the grid
    gibbs_kl: float
    gibbs_mean_T: float
    gibbs_bound: float          # general bound for ν_β
    beta_star: float            # β⋆ for the point mass (KL = log|grid|)
    slack_ci: tuple[float, float] = (math.nan, math.nan)  # 90 % interval of the slack over the λ⋆ posterior
    plug_in: bool = True


def bound_part(lam: np.ndarray, r_tilde: np.ndarray, rho: float, T_grid: np.ndarray, delta: float, beta: float,
               tau2: float, sigma2_star: float, ell_fixed: np.ndarray | None = None,
               posterior: NoisePosterior | None = None) -> BoundPart:
    """PAC-Bayes slack and bound curves (DESIGN §5, Thm. 7.2, Lemma E.13) with the plug-in
    Σ̂⋆ = τ̂²K + σ̂⋆²I (τ̂², σ̂⋆² the posterior medians); with the §5.1 `posterior` the slack's
    90 % interval over it is reported too. The evidence family's σ² is σ̂² = ‖r‖²/n (the
    fixed-σ̂ score ℓ_T)."""
    if not 0.0 < delta < 1.0:
        raise ValueError("delta must lie in (0, 1)")
    if not beta > 0:
        raise ValueError("beta must be positive")
    n = lam.shape[0]
    s2 = max(float(np.sum(r_tilde**2)) / n, theory.VAR_FLOOR)
    if ell_fixed is None:
        ell_fixed = theory.evidence_scores(lam, r_tilde, rho, T_grid, noise="fixed")
    s2_star = max(float(sigma2_star), theory.VAR_FLOOR)
    v_T = theory.pac_bayes_variance(lam, rho, T_grid, s2, tau2, s2_star)
    v_bar, slack = theory.pac_bayes_slack(lam, rho, T_grid, s2, tau2, s2_star, delta)
    pop = theory.population_evidence_risk(lam, rho, T_grid, s2, tau2, s2_star)
    nu = theory.gibbs_posterior(ell_fixed, beta, n=n)
    kl = float(theory.kl_to_prior(nu))
    gb = theory.pac_bayes_general_bound(ell_fixed, nu, beta, n, v_bar, delta)
    beta_star = theory.optimal_beta(v_bar, n, delta, kl=math.log(len(T_grid))) if v_bar > 0 else float("inf")
    ci = (math.nan, math.nan)
    if posterior is not None and s2 > theory.VAR_FLOOR:
        si = slack_interval(posterior, lam, r_tilde, rho, T_grid, delta, evidence_sigma2=s2)
        ci = (float(si.posterior.lo), float(si.posterior.hi))
    return BoundPart(slack_ci=ci, delta=float(delta), beta=float(beta), v_T=v_T, v_bar=float(v_bar), slack=float(slack),
                     bound=ell_fixed + slack, population_risk=pop, gibbs=nu, gibbs_kl=kl,
                     gibbs_mean_T=float(nu @ T_grid), gibbs_bound=float(gb), beta_star=float(beta_star))


@dataclass
class TheoryCurves:
    """Everything the kernel predicts on the step grid (no model needed)."""
    T_grid: np.ndarray
    c: float
    rho: float
    lam: np.ndarray
    U: np.ndarray
    r_tilde: np.ndarray
    k_tilde: np.ndarray | None
    linear_prediction: np.ndarray | None
    linear_error: np.ndarray | None
    linear_prompt_mse: np.ndarray
    sigma2_hat: float
    ell_fixed: np.ndarray
    ell_profiled: np.ndarray
    t_map_fixed: int
    t_map_profiled: int
    posterior: NoisePosterior
    tau2: float                  # posterior medians (DESIGN §5.1)
    sigma2: float
    lambda_star: float
    loglik: float                # of the maximum-likelihood point fit (reference only)


def theory_curves(K: np.ndarray, r: np.ndarray, k_x: np.ndarray | None, f0: float | None, y: float | None,
                  c: float, T_grid: np.ndarray) -> TheoryCurves:
    """Linearised query/prompt curves, evidence curves and the λ⋆ posterior for kernel K (n, n),
    residuals r (n,), coupling k_x (n,) or None, base query value f0 and target y (or None),
    ρ = c/λ_max(K) (DESIGN §3, §5, §5.1)."""
    T_grid = np.asarray(T_grid, dtype=float)
    lam, U = theory.eigh_psd(K)
    r = np.asarray(r, dtype=float)
    rt = U.T @ r
    rho = theory.rho_from_c(lam, c)
    n = lam.shape[0]
    decay = theory.gd_filter(lam, rho, T_grid)                      # g_T (G, n)
    prompt_mse = ((1.0 - decay) ** 2 * rt**2).sum(axis=1) / n        # ‖(I − ρK)^T r‖²/n
    kt = pred = err = None
    if k_x is not None and f0 is not None:
        kt = U.T @ np.asarray(k_x, dtype=float)
        q = theory.gd_query_filter(lam, rho, T_grid)                  # (G, n)
        pred = float(f0) + q @ (kt * rt)
        err = None if y is None else (pred - float(y)) ** 2
    ell_f = theory.evidence_scores(lam, rt, rho, T_grid, noise="fixed")
    ell_p = theory.profiled_scores(lam, rt, rho, T_grid)
    post = noise_posterior(lam, rt)
    ll = theory.gaussian_loglik(lam, rt, post.ml.tau2, post.ml.sigma2)
    return TheoryCurves(posterior=post, 
        T_grid=T_grid, c=float(c), rho=float(rho), lam=lam, U=U, r_tilde=rt, k_tilde=kt, linear_prediction=pred,
        linear_error=err, linear_prompt_mse=prompt_mse, sigma2_hat=float(r @ r) / n, ell_fixed=ell_f,
        ell_profiled=ell_p, t_map_fixed=int(T_grid[int(np.argmin(ell_f))]),
        t_map_profiled=int(T_grid[int(np.argmin(ell_p))]), tau2=float(post.tau2.median),
        sigma2=float(post.sigma2.median), lambda_star=float(post.lambda_star.median), loglik=float(ll))


def verdict(tc: TheoryCurves, T_star: int | None = None, gibbs_mean_T: float | None = None) -> dict[str, Any]:
    """"Adapt / don't adapt / undetermined" at the evidence's T_MAP (fixed σ̂), from
    P(TTT beats ICL at T_MAP) over the λ⋆ posterior (DESIGN §4, §5, §5.1): adapt only when the
    probability is ≥ 0.9, don't adapt when ≤ 0.1 (or when T_MAP = 0)."""
    T = tc.t_map_fixed if T_star is None else int(T_star)
    vp = verdict_probability(tc.posterior, tc.lam, tc.k_tilde, tc.rho, float(T))
    criterion = "query Bayes gap" if tc.k_tilde is not None else "prompt-value excess risk (no query)"
    gib = "" if gibbs_mean_T is None else f" (Gibbs posterior over T: mean {gibbs_mean_T:.1f})"
    if T == 0:
        decision, adapt = DONT_ADAPT, False
        text = f"Don't adapt: the evidence prefers T = 0 (ICL){gib}."
    else:
        decision = vp.decision
        adapt = decision == ADAPT
        head = {ADAPT: f"Adapt: T* = {T} steps", DONT_ADAPT: f"Don't adapt at T = {T}",
                UNDETERMINED: f"Undetermined on this prompt at T = {T}"}[decision]
        text = (f"{head} (evidence T_MAP, fixed σ̂{gib}): P(TTT beats ICL) = {vp.prob:.2f} over the λ⋆ posterior; "
                f"expected {criterion} {vp.gap_ttt.mean:.3g} [{vp.gap_ttt.lo:.3g}, {vp.gap_ttt.hi:.3g}] vs ICL's "
                f"{vp.gap_icl.mean:.3g} [{vp.gap_icl.lo:.3g}, {vp.gap_icl.hi:.3g}].")
    if tc.posterior.flag_text:
        text += f" Note: {tc.posterior.flag_text}."
    return {"adapt": bool(adapt), "decision": decision, "T_star": int(T if adapt else 0), "t_map": int(T),
            "prob_ttt_beats_icl": vp.prob, "text": text, "gap_ttt": vp.gap_ttt.mean, "gap_icl": vp.gap_icl.mean,
            "gap_ttt_ci90": [vp.gap_ttt.lo, vp.gap_ttt.hi], "gap_icl_ci90": [vp.gap_icl.lo, vp.gap_icl.hi],
            "criterion": criterion, "gibbs_mean_T": gibbs_mean_T, "flag": tc.posterior.flag_text,
            "basis": "posterior over λ⋆ (DESIGN §5.1)"}


# --------------------------------------------------------------------------------------------
# measured trajectory (the engine)
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------


@dataclass
class StepsSettings:
    """Settings of one steps/bounds computation. δ and β only affect the cheap bound part."""
    subspace: str = "q"
    c: float = DEFAULT_C
    grid_max: int = DEFAULT_GRID_MAX
    delta: float = DEFAULT_DELTA
    beta: float = DEFAULT_BETA
    last_layers: int | None = DEFAULT_LAST_LAYERS
    measure: bool = True
    qttt_lr: float = 1e-4
    qttt_span: int = 128
    seed: int = 0

    def heavy_key(self) -> tuple:
        """What the expensive part (evidence + engine run) depends on."""
        return (self.subspace, float(self.c), int(self.grid_max), self.last_layers, bool(self.measure),
                float(self.qttt_lr), int(self.qttt_span), int(self.seed))


@dataclass
class StepsReport:
    """Steps & bounds for one prompt (see module docstring). Arrays are over `T_grid`."""
    prompt_kind: str
    subspace: str
    model_name: str
    blocks: list[Block]
    blocks_label: str
    n: int
    settings: StepsSettings
    theory: TheoryCurves
    bounds: BoundPart
    measured: Measured | None
    has_query: bool
    query_target: float | None
    f0: float | None
    query_label: str | None
    verdict: dict[str, Any]
    unavailable: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def T_grid(self) -> np.ndarray:
        return self.theory.T_grid

    @property
    def icl_error(self) -> float | None:
        """Error at T = 0 (ICL): measured if available, else the base prediction's."""
        if self.measured is not None and self.measured.error is not None and np.isfinite(self.measured.error[0]):
            return float(self.measured.error[0])
        if self.theory.linear_error is not None:
            return float(self.theory.linear_error[0])
        return None

    def with_bounds(self, delta: float, beta: float) -> "StepsReport":
        """A copy with δ and β changed (only the cheap bound part is recomputed)."""
        tc = self.theory
        b = bound_part(tc.lam, tc.r_tilde, tc.rho, tc.T_grid, delta, beta, tc.tau2, tc.sigma2, tc.ell_fixed,
                       tc.posterior)
        s = dataclasses.replace(self.settings, delta=float(delta), beta=float(beta))
        return dataclasses.replace(self, bounds=b, settings=s)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (lists instead of arrays; NaN → None)."""
        tc, b, m = self.theory, self.bounds, self.measured
        out: dict[str, Any] = {
            "prompt_kind": self.prompt_kind, "subspace": self.subspace, "model": self.model_name,
            "blocks": [block_label(l, h, self.subspace) for l, h in self.blocks], "blocks_label": self.blocks_label,
            "n": self.n,
            "settings": asdict(self.settings), "T_grid": _j(tc.T_grid), "c": tc.c, "rho": tc.rho,
            "lambda_max": float(tc.lam[0]) if tc.lam.size else 0.0,
            "query": {"has_query": self.has_query, "target": self.query_target, "f0": self.f0, "label": self.query_label},
            "linearised": {"prediction": _j(tc.linear_prediction), "error": _j(tc.linear_error),
                           "prompt_mse": _j(tc.linear_prompt_mse)},
            "measured": None if m is None else {
                "engine": m.engine, "comparable": m.comparable, "note": m.note, "prediction": _j(m.prediction),
                "error": _j(m.error), "prompt_mse": _j(m.prompt_mse), "answer_nll": _j(m.nll), "answer_prob": _j(m.prob),
                "steps_run": m.steps_run, "status": m.status, "reason": m.reason, "seconds": m.seconds},
            "icl_error": self.icl_error,
            "evidence": {"sigma2_hat": tc.sigma2_hat, "ell_fixed": _j(tc.ell_fixed), "ell_profiled": _j(tc.ell_profiled),
                         "t_map_fixed": tc.t_map_fixed, "t_map_profiled": tc.t_map_profiled},
            "posterior": posterior_dict(tc.posterior),
            "pac_bayes": {"plug_in": True, "label": PLUG_IN_LABEL, "delta": b.delta, "v_T": _j(b.v_T), "v_bar": b.v_bar,
                          "slack": b.slack, "slack_ci90": [_f(x) for x in b.slack_ci], "bound": _j(b.bound), "population_risk_plug_in": _j(b.population_risk),
                          "beta": b.beta, "beta_star": _f(b.beta_star), "gibbs": _j(b.gibbs), "gibbs_kl": b.gibbs_kl,
                          "gibbs_mean_T": b.gibbs_mean_T, "gibbs_bound": b.gibbs_bound},
            "verdict": self.verdict, "unavailable": dict(self.unavailable), "timings": dict(self.timings),
        }
        return out


def _f(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _j(a: np.ndarray | None) -> list | None:
    if a is None:
        return None
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(a, dtype=float).ravel()]


def _with_measured_best(v: dict[str, Any], measured: "Measured | None", grid: np.ndarray) -> dict[str, Any]:
    """Add the measured best T (argmin of the engine's query error, or answer NLL) beside T_MAP."""
    curve = None if measured is None else (measured.error if measured.error is not None else measured.nll)
    if curve is not None and np.any(np.isfinite(curve)):
        v = dict(v, measured_best_T=int(grid[int(np.nanargmin(curve))]))
    return v


def compute_steps(lm: LoadedModel, prompt: FewShotPrompt | LongContextPrompt, settings: StepsSettings | None = None, *,
                  ev: PromptKernel | None = None, progress: Progress = None) -> StepsReport:
    """The steps & bounds report for `prompt` (see module docstring).

    Args:
        lm: LoadedModel (never mutated).
        prompt: parsed prompt.
        settings: StepsSettings (subspace, c, grid_max, δ, β, last_layers, measure, qTTT lr/span/seed).
        ev: a PromptKernel of the same prompt and subspace to reuse (optional).
        progress: callback(fraction, text).
    Raises:
        PromptKernelError (from the evidence module) or ValueError for impossible settings.
    """
    s = settings or StepsSettings()
    if int(s.grid_max) < 1:
        raise ValueError("grid_max must be ≥ 1")
    t0 = time.perf_counter()
    if ev is None:
        ev = compute_prompt_kernel(lm, prompt, s.subspace,
                              progress=None if progress is None else (lambda f, t: progress(0.3 * f, t)))
    t1 = time.perf_counter()
    blocks = select_blocks(ev, s.last_layers)
    K, kx = block_kernel(ev, blocks)
    q = ev.query
    f0 = None if q is None else float(q.value)
    y = None if q is None else q.target
    is_few = isinstance(prompt, FewShotPrompt)
    if is_few and prompt.query_y is None:
        y = None
    grid = np.arange(int(s.grid_max) + 1, dtype=float)
    tc = theory_curves(K, ev.residuals, kx, f0, y, s.c, grid)
    b = bound_part(tc.lam, tc.r_tilde, tc.rho, grid, s.delta, s.beta, tc.tau2, tc.sigma2, tc.ell_fixed, tc.posterior)
    unavailable: dict[str, str] = {}
    if kx is None:
        why = ev.query_note or "This prompt has no query output."
        unavailable["linearised query prediction"] = why
        unavailable["query error (measured and linearised)"] = why
    elif y is None:
        unavailable["query error (measured and linearised)"] = (
            ev.query_note or "No known answer (add '# answer: y'): the query prediction is drawn, its error is not.")
    measured = None
    t2 = time.perf_counter()
    if not s.measure:
        unavailable["measured trajectory"] = "Not requested (measure=False)."
    elif is_few and s.subspace in ("v", "q"):
        measured = measure_fewshot(lm, prompt, s.subspace, blocks, tc.rho, float(tc.lam[0]), s.grid_max,
                                   None if progress is None else (lambda f, t: progress(0.3 + 0.7 * f, t)))
    elif is_few:
        unavailable["measured trajectory"] = (f"The engine's paper mode updates W_V or W_Q heads only; subspace "
                                              f"{s.subspace!r} has linearised and evidence curves only.")
    elif s.subspace != "q":
        unavailable["measured trajectory"] = ("qTTT updates W_Q only; choose subspace 'q' for a measured run on a long "
                                              "context.")
    elif prompt.question is None or not prompt.answer:
        unavailable["measured trajectory"] = ("No 'Question:' with an 'Answer:' line: qTTT has no answer NLL to record "
                                              "(free text has no query).")
    else:
        measured = measure_long(lm, prompt, blocks, s.grid_max, s.qttt_lr, s.qttt_span, s.seed,
                                None if progress is None else (lambda f, t: progress(0.3 + 0.7 * f, t)))
        unavailable["measured query error on the linearised scale"] = measured.note
    if measured is not None and measured.status == "diverged":
        unavailable["measured steps after divergence"] = measured.reason or "the run diverged"
    t3 = time.perf_counter()
    return StepsReport(
        prompt_kind=ev.prompt_kind, subspace=s.subspace, model_name=lm.name, blocks=blocks,
        blocks_label=blocks_label(ev, blocks), n=ev.n, settings=s, theory=tc, bounds=b, measured=measured,
        has_query=kx is not None, query_target=y, f0=f0, query_label=None if q is None else q.label,
        verdict=_with_measured_best(verdict(tc, gibbs_mean_T=b.gibbs_mean_T), measured, grid), unavailable=unavailable,
        timings={"evidence_s": t1 - t0, "theory_s": t2 - t1, "engine_s": t3 - t2, "total_s": t3 - t0})
