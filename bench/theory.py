"""Benchmark: prompt-evidence scores on a step grid after the eigendecomposition (DESIGN §5).

Times ``ttt_core.theory.evidence_scores`` for n = 4096 on the 31-step grid {0..30} (median of
repeats), given (λ, r̃ = Uᵀr) — i.e. *after* the eigendecomposition, which is not timed (the
spectrum is generated directly: a power-law spectrum with zeros, as a rank-deficient K gives).
The baseline is the obvious dense computation (build Σ_T = σ²(I − ρK)^{−T}, then slogdet + solve
per T); it is O(|grid|·n³), so it is measured on a smaller n (``--dense-n``, default 128) and only
the eigen-route is timed at both sizes.  Prints human-readable lines, then one JSON line.

    python bench/theory.py [--n 4096] [--repeats 50] [--dense-n 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ttt_core import theory  # noqa: E402

TARGET_MS = 20.0


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _spectrum(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    lam = np.arange(1, n + 1, dtype=float) ** -1.3
    lam[int(0.9 * n):] = 0.0  # rank-deficient, like real prompt kernels
    r_tilde = np.sqrt(0.5 * lam + 0.1) * rng.standard_normal(n)
    return lam, r_tilde


def _dense_scores(K: np.ndarray, r: np.ndarray, rho: float, grid: np.ndarray, sigma2: float) -> np.ndarray:
    n = K.shape[0]
    M = np.eye(n) - rho * K
    out = np.empty(grid.size)
    for j, T in enumerate(grid):
        Sigma = sigma2 * np.linalg.inv(np.linalg.matrix_power(M, int(T)))
        _, logdet = np.linalg.slogdet(Sigma)
        out[j] = (logdet + r @ np.linalg.solve(Sigma, r)) / (2 * n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--dense-n", type=int, default=128)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    grid = np.arange(31, dtype=float)

    lam, rt = _spectrum(args.n, rng)
    rho = theory.rho_from_c(lam, 0.5)
    per_mode = {}
    for noise in ("fixed", "mle", 0.1):
        per_mode[str(noise)] = _median_ms(lambda: theory.evidence_scores(lam, rt, rho, grid, noise), args.repeats)
    evidence_ms = max(per_mode.values())
    print(f"evidence_scores n={args.n}, |grid|={grid.size}: " +
          ", ".join(f"{k}: {v:.3f} ms" for k, v in per_mode.items()) + f" (median of {args.repeats})")

    # dense baseline on a smaller n (same spectrum family, random eigenvectors)
    m = args.dense_n
    lam_s, rt_s = _spectrum(m, rng)
    U = np.linalg.qr(rng.standard_normal((m, m)))[0]
    K = (U * lam_s) @ U.T
    r = U @ rt_s
    rho_s = theory.rho_from_c(lam_s, 0.5)
    dense_ms = _median_ms(lambda: _dense_scores(K, r, rho_s, grid, 0.1), max(3, args.repeats // 10))
    eigen_small_ms = _median_ms(lambda: theory.evidence_scores(lam_s, rt_s, rho_s, grid, 0.1), args.repeats)
    err = float(np.max(np.abs(_dense_scores(K, r, rho_s, grid, 0.1) - theory.evidence_scores(lam_s, rt_s, rho_s, grid, 0.1))))
    print(f"dense slogdet/solve baseline at n={m} (n={args.n} would take ~(n/{m})^3 longer, not run): "
          f"{dense_ms:.1f} ms vs eigen route {eigen_small_ms:.3f} ms; max |difference| = {err:.2e}")

    result = {
        "bench": "theory",
        "n": args.n,
        "grid": int(grid.size),
        "evidence_ms": round(evidence_ms, 4),
        "evidence_ms_by_noise": {k: round(v, 4) for k, v in per_mode.items()},
        "target_ms": TARGET_MS,
        "pass": bool(evidence_ms < TARGET_MS),
        "includes_eigh": False,
        "dense_n": m,
        "dense_ms": round(dense_ms, 3),
        "eigen_ms_at_dense_n": round(eigen_small_ms, 4),
        "speedup_at_dense_n": round(dense_ms / eigen_small_ms, 1),
        "dense_max_abs_diff": err,
        "repeats": args.repeats,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
