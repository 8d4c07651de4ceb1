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
Keys `score_rank_spearman_under_rescale` and `label_permutation_max_abs_diff` are left for
measurements that need other modules.

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


def main() -> None:
    shared = {"draws": gp_draws()}
    result: dict = {"device": "cpu", "load_avg_1min": round(os.getloadavg()[0], 2)}
    for fn in MEASUREMENTS:
        result.update(fn(shared))
    result["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
