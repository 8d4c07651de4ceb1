"""Statistics shared by the experiments: paired comparisons (bootstrap CI and sign-flip
permutation p-value), mean ± standard error, percentile bootstrap CIs, Spearman ρ, and the
wording of a verdict read off a confidence interval."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps


def sem(x: np.ndarray, axis: int | None = None) -> float | np.ndarray:
    """Standard error of the mean, std(ddof=1)/√m (NaN for fewer than two values); with `axis`
    an array over the other axes."""
    x = np.asarray(x, dtype=float)
    m = x.size if axis is None else x.shape[axis]
    if axis is None:
        return float(x.std(ddof=1) / math.sqrt(m)) if m > 1 else float("nan")
    if m > 1:
        return x.std(axis=axis, ddof=1) / math.sqrt(m)
    return np.full(np.delete(x.shape, axis), np.nan)


def mean_se(x: np.ndarray) -> tuple[float, float]:
    """(mean, standard error) of `x`."""
    x = np.asarray(x, dtype=float)
    return float(x.mean()), sem(x)  # type: ignore[return-value]


def paired_stats(base: np.ndarray, method: np.ndarray, n_boot: int = 10_000, seed: int = 0) -> dict[str, float]:
    """Improvement d = base − method (positive = method better): mean, SE, 95 % paired bootstrap CI
    and the two-sided paired sign-flip permutation p-value ((1 + #{|mean*| ≥ |mean|})/(B + 1))."""
    d = np.asarray(base, dtype=float) - np.asarray(method, dtype=float)
    m = d.size
    rng = np.random.default_rng(seed)
    mean = float(d.mean())
    se = sem(d)
    idx = rng.integers(0, m, size=(n_boot, m))
    boots = d[idx].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n_boot, m))
    perm = (signs * d).mean(axis=1)
    p = (1 + int(np.sum(np.abs(perm) >= abs(mean) - 1e-15))) / (n_boot + 1)
    if np.all(d == 0):
        p = 1.0
    return {"mean": mean, "se": se, "ci_low": float(lo), "ci_high": float(hi), "p": float(p)}


def boot_ci(x: np.ndarray, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95 % CI of the mean of the finite values of `x` (NaN, NaN below two)."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(reps, x.size))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (NaN when either side is constant)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(sps.spearmanr(a, b).statistic)


# ------------------------------------------------------------------ wording


def ci_verdict(st: dict[str, float], better: str, worse: str, neither: str) -> str:
    """`better` when the 95 % CI of a `paired_stats` result lies above 0, `worse` below 0, else `neither`."""
    if st["ci_low"] > 0:
        return better
    if st["ci_high"] < 0:
        return worse
    return neither


def ci_text(st: dict[str, float]) -> str:
    """``+0.0123 [+0.0010, +0.0234]``: mean and 95 % CI of a `paired_stats` result."""
    return f"{st['mean']:+.4f} [{st['ci_low']:+.4f}, {st['ci_high']:+.4f}]"


def improvement_text(st: dict[str, float]) -> str:
    """``improvement +0.0123 (95% CI [+0.0010, +0.0234], p = 0.01)``."""
    return f"improvement {st['mean']:+.4f} (95% CI [{st['ci_low']:+.4f}, {st['ci_high']:+.4f}], p = {st['p']:.3g})"
