"""How far can a verdict on one prompt be trusted? (DESIGN §5.1, GitHub issue 13.)

Measurements (each one function registered with @measurement; add a key by adding a function):
1. `lambda_star_ci90_coverage`: coverage of the §5.1 posterior's 90 % interval of λ⋆ on exact GP
   draws, n = 10, spectrum λ_i = 10·i⁻², τ² = 1, σ² = λ⋆ ∈ {0.01, 0.1, 1}, DRAWS_COVERAGE seeded
   draws each (target ≥ 0.85).
2. `undetermined_fraction`: on the first DRAWS_VERDICT of those draws per λ⋆, the fraction whose
   posterior verdict at T = 8, ρ = 0.1/λ_max, with a random query coupling k̃ ~ N(0, diag λ)
   (k_x = Φφ(x) with φ(x) ~ N(0, I) gives k_x ~ N(0, K)) is "undetermined on this prompt".
3. `ml_boundary_fraction`: fraction of the same draws where theory.fit_signal_noise lands on
   σ² < 1e-8·‖r‖²/n or τ² = 0 (the degenerate point fits the posterior replaces).
4. `posterior_seconds_n256`: median of 20 repeats of noise_posterior + verdict_probability_curve
   over T ∈ {0,…,30} at n = 256 (target ≤ 0.2 s).
5. `score_rank_spearman_under_rescale`: Spearman correlation of every block's Query-Aware and
   Trace score (scores.score_blocks, ridge λ⋆) between a real prompt kernel (SmolLM2, W_Q heads,
   the clean digit-shift example) and the same kernel with Φ rescaled by c ∈ {1e-3, 1e3} (must be
   1.0); `score_rank_spearman_fixed_ridge` is the same with the ridge held at its c = 1 value (what
   a σ²-only ridge does), for contrast.
6. `label_permutation_max_abs_diff`: max |ΔK|, |Δr|, |Δk_x| when the internal order of a categorical
   label set is permuted (tiny llama in float64; DESIGN §7.1 requires 0 up to round-off).
7. `diagnose_posterior_seconds_n256`: seconds `diagnose` spends in the §5.1 posterior, its verdicts,
   the slack interval and the top-k frequencies on a 256-position SmolLM2 prompt (target ≤ 0.2 s),
   beside `diagnose_total_seconds_n256`.

The last line printed is one JSON object.
Usage: python bench/trust.py
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

from ttt_core import noise_posterior as npo
from ttt_core import posterior_verdict as pv
from ttt_core import theory

N_SMALL = 10
LAMBDA_STARS = (0.01, 0.1, 1.0)
DRAWS_COVERAGE = 1000
DRAWS_VERDICT = 300
SEED = 13

Measurement = Callable[[dict], dict]
MEASUREMENTS: list[Measurement] = []


def measurement(fn: Measurement) -> Measurement:
    """Register a measurement: fn(shared) -> {json_key: value}; it may print human-readable lines."""
    MEASUREMENTS.append(fn)
    return fn


def spectrum(n: int) -> np.ndarray:
    return 10.0 * np.arange(1, n + 1, dtype=float) ** -2.0


def gp_draws() -> dict[float, np.ndarray]:
    """r̃ = Uᵀr with r = U(√(τ²λ + σ²) z), τ² = 1, σ² = λ⋆; shape (DRAWS_COVERAGE, n) per λ⋆."""
    rng = np.random.default_rng(SEED)
    lam = spectrum(N_SMALL)
    U, _ = np.linalg.qr(rng.standard_normal((N_SMALL, N_SMALL)))
    out = {}
    for ls in LAMBDA_STARS:
        r = (np.sqrt(lam + ls) * rng.standard_normal((DRAWS_COVERAGE, N_SMALL))) @ U.T
        out[ls] = r @ U
    return out


@measurement
def coverage(shared: dict) -> dict:
    lam = spectrum(N_SMALL)
    cov = {}
    for ls, rt in shared["draws"].items():
        b = npo.lambda_star_posterior_batch(lam, rt)
        c = float(np.mean((b.lo <= ls) & (ls <= b.hi)))
        width = float(np.median(np.log10(b.hi / b.lo)))
        cov[f"{ls:g}"] = round(c, 4)
        print(f"lambda*={ls:g}: 90% CI coverage {c:.3f} over {rt.shape[0]} draws at n={N_SMALL} "
              f"(median width {width:.2f} decades)")
    return {"lambda_star_ci90_coverage": cov, "coverage_draws_per_lambda_star": DRAWS_COVERAGE}


@measurement
def verdicts_and_point_fits(shared: dict) -> dict:
    lam = spectrum(N_SMALL)
    rho = theory.rho_from_c(lam, 0.1)
    rng = np.random.default_rng(SEED + 1)
    undetermined = boundary = total = 0
    for ls, rt in shared["draws"].items():
        und_ls = bnd_ls = 0
        for r in rt[:DRAWS_VERDICT]:
            k = np.sqrt(lam) * rng.standard_normal(N_SMALL)
            v = pv.verdict_probability(npo.noise_posterior(lam, r), lam, k, rho, 8)
            und_ls += v.decision == npo.UNDETERMINED
            tau2, sigma2, _ = theory.fit_signal_noise(lam, r)
            bnd_ls += (sigma2 < 1e-8 * float(np.mean(r**2))) or tau2 == 0.0
        print(f"lambda*={ls:g}: verdict at T=8 undetermined in {und_ls}/{DRAWS_VERDICT}; "
              f"ML point fit on the boundary in {bnd_ls}/{DRAWS_VERDICT}")
        undetermined += und_ls
        boundary += bnd_ls
        total += DRAWS_VERDICT
    return {"undetermined_fraction": round(undetermined / total, 4),
            "ml_boundary_fraction": round(boundary / total, 4), "verdict_draws": total}


@measurement
def posterior_timing(shared: dict) -> dict:
    n = 256
    lam = spectrum(n)
    rng = np.random.default_rng(SEED + 2)
    r = np.sqrt(lam + 0.1) * rng.standard_normal(n)
    k = np.sqrt(lam) * rng.standard_normal(n)
    rho = theory.rho_from_c(lam, 0.1)
    T = np.arange(31, dtype=float)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        post = npo.noise_posterior(lam, r)
        pv.verdict_probability_curve(post, lam, k, rho, T)
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    print(f"noise_posterior + verdict over 31 T at n={n}: median {med * 1e3:.1f} ms over 20 repeats")
    return {"posterior_seconds_n256": round(med, 4)}


def _rescaled(ev, c: float):
    """ev with every feature φ multiplied by c (float64 factors): K → c²K, k_x → c²k_x."""
    import dataclasses

    fs = [dataclasses.replace(f, H=f.H.double() * c, O=f.O.double(), Hx=None if f.Hx is None else f.Hx.double() * c,
                              Ox=None if f.Ox is None else f.Ox.double()) for f in ev.factors]
    hc = None if ev.head_couplings is None else ev.head_couplings * c * c
    return dataclasses.replace(ev, factors=fs, K=ev.K * c * c, head_couplings=hc,
                               k_x=None if ev.k_x is None else ev.k_x * c * c)


@measurement
def rescale_invariance(shared: dict) -> dict:
    from scipy import stats

    from ttt_core.examples import DEFAULT_EXAMPLE, load_example
    from ttt_core.prompt_kernel import compute_prompt_kernel
    from ttt_core.prompts import parse_prompt
    from ttt_core.scores import score_blocks

    lm = shared["smollm2"]
    ev = _rescaled(compute_prompt_kernel(lm, parse_prompt(load_example(DEFAULT_EXAMPLE)), "q"), 1.0)
    base = score_blocks(ev)
    rhos, fixed = [], []
    for c in (1e-3, 1e3):
        ev_c = _rescaled(ev, c)
        sc = score_blocks(ev_c)
        held = score_blocks(ev_c, base.ridge)
        for name in ("query_aware", "trace"):
            a, b, h = getattr(base, name).ravel(), getattr(sc, name).ravel(), getattr(held, name).ravel()
            rhos.append(float(stats.spearmanr(a, b)[0]))
            fixed.append(float(stats.spearmanr(a, h)[0]))
    print(f"Spearman of block scores under Φ → cΦ (c = 1e-3, 1e3; QA and Trace): ridge λ⋆ {min(rhos):.6f}; "
          f"ridge held fixed {min(fixed):.3f}")
    return {"score_rank_spearman_under_rescale": round(min(rhos), 6),
            "score_rank_spearman_fixed_ridge": round(min(fixed), 4)}


@measurement
def label_permutation(shared: dict) -> dict:
    from ttt_core.models import build_tiny_model
    from ttt_core.prompt_kernel import compute_prompt_kernel
    from ttt_core.prompts import FewShotPrompt, parse_prompt

    text = ("stripes -> zebra\nwhiskers -> cat\nmane -> lion\ntrunk -> elephant\npurr -> cat\nroar -> lion\n"
            "hooves -> zebra\nbark ->\n# answer: dog")
    lm = build_tiny_model("llama", seed=3)
    lm.model.double()
    p = parse_prompt(text)
    base = compute_prompt_kernel(lm, p, "q")
    worst = 0.0
    rng = np.random.default_rng(SEED + 3)

    class Reordered(FewShotPrompt):
        order: tuple = ()

        @property
        def labels(self) -> list[str]:  # type: ignore[override]
            return list(self.order)

    for _ in range(5):
        q = Reordered(demos=list(p.demos), query_x=p.query_x, query_y=p.query_y, sep=p.sep, spaced=p.spaced)
        q.order = tuple(rng.permutation(p.labels))
        ev = compute_prompt_kernel(lm, q, "q")
        worst = max(worst, float(np.abs(ev.K - base.K).max()), float(np.abs(ev.residuals - base.residuals).max()),
                    float(np.abs(ev.k_x - base.k_x).max()))
    print(f"categorical label order permuted 5 times: max |ΔK|, |Δr|, |Δk_x| = {worst:.3g}")
    return {"label_permutation_max_abs_diff": worst}


@measurement
def diagnose_posterior_time(shared: dict) -> dict:
    import ttt_core.diagnosis as diag
    import ttt_core.posterior_verdict as pvm
    import ttt_core.scores as scm
    import ttt_core.spectrum as spm
    import ttt_core.steps as stm
    from ttt_core.generators import needle_haystack

    lm = shared["smollm2"]
    prompt = needle_haystack(np.random.default_rng(SEED + 4), n_words=700)
    spent = [0.0]

    def timed(fn):
        def wrap(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t0
        return wrap

    patches = [(stm, "noise_posterior"), (stm, "slack_interval"), (stm, "verdict_probability"),
               (spm, "noise_posterior"), (spm, "verdict_probability_curve"), (scm, "noise_posterior"),
               (scm, "qa_over_posterior")]
    saved = [(m, name, getattr(m, name)) for m, name in patches]
    for m, name, fn in saved:
        setattr(m, name, timed(fn))
    try:
        t0 = time.perf_counter()
        rep = diag.diagnose_report(lm, prompt, max_positions=256)
        total = time.perf_counter() - t0
    finally:
        for m, name, fn in saved:
            setattr(m, name, fn)
    assert pvm is not None
    print(f"diagnose on a {rep['n_positions']}-position needle prompt: {total:.2f} s in all, "
          f"{spent[0]:.3f} s in the posterior, its verdicts, the slack interval and top-k frequencies")
    return {"diagnose_posterior_seconds_n256": round(spent[0], 4), "diagnose_total_seconds_n256": round(total, 2),
            "diagnose_positions": rep["n_positions"]}


def main() -> None:
    from ttt_core.models import load_model

    shared = {"draws": gp_draws(), "smollm2": load_model()}
    result: dict = {"device": "cpu", "load_avg_1min": round(os.getloadavg()[0], 2)}
    for fn in MEASUREMENTS:
        result.update(fn(shared))
    result["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
