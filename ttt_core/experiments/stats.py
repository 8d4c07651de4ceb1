"""Statistics shared by the experiments: paired comparisons (SciPy's BCa bootstrap CI and paired
sign-flip permutation p-value), mean ± standard error, percentile bootstrap CIs, Spearman ρ, and
the one rule that words a verdict about a suite (`suite_verdict`, DESIGN §10)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

#: A suite verdict sentence needs at least this many paired tasks (DESIGN §10) …
MIN_SUITE_TASKS = 20
#: … a 95 % paired CI that excludes 0 and a permutation p below this.
SUITE_ALPHA = 0.05
#: Resamples of `paired_stats` are processed in batches of this many (memory O(batch · m)).
_BATCH = 2000


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


def _mean_diff(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x - y, axis=axis)


def _bootstrap_ci(d: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float, str]:
    """95 % one-sample bootstrap CI of mean(d): BCa, or the percentile interval where BCa is
    degenerate (fewer than 3 values, or a non-finite BCa endpoint)."""
    m = d.size
    if m < 2:
        return float("nan"), float("nan"), "none"
    if np.ptp(d) == 0:                      # every resample has the same mean
        return float(d[0]), float(d[0]), "degenerate"
    kw = dict(n_resamples=int(n_boot), confidence_level=0.95, batch=_BATCH, vectorized=True)
    if m >= 3:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DegenerateDataWarning / invalid divide: handled below
            ci = sps.bootstrap((d,), np.mean, method="BCa", rng=rng, **kw).confidence_interval
        if np.isfinite(ci.low) and np.isfinite(ci.high):
            return float(ci.low), float(ci.high), "BCa"
    ci = sps.bootstrap((d,), np.mean, method="percentile", rng=rng, **kw).confidence_interval
    return float(ci.low), float(ci.high), "percentile"


def paired_stats(base: np.ndarray, method: np.ndarray, n_boot: int = 10_000, seed: int = 0) -> dict[str, float]:
    """Improvement d = base − method (positive = method better) over m paired tasks.

    Returns mean, se (std(d, ddof=1)/√m), ci_low/ci_high — the 95 % one-sample bootstrap CI of
    mean(d) (`scipy.stats.bootstrap`, BCa; the percentile interval where BCa is degenerate: m < 3
    or a non-finite BCa endpoint; [d, d] when all d are equal; NaN for m < 2) — p, the two-sided
    paired permutation p-value of mean(d) (`scipy.stats.permutation_test`,
    permutation_type="samples" on (base, method): swapping the two values of a pair flips the sign
    of its d, i.e. the sign-flip test; exact when 2^m ≤ n_boot; 1 when all d are 0 or m = 1), and n = m.
    Both use `n_boot` resamples and generators seeded from `seed`."""
    b = np.asarray(base, dtype=float).ravel()
    t = np.asarray(method, dtype=float).ravel()
    if b.shape != t.shape:
        raise ValueError(f"paired samples need equal lengths, got {b.size} and {t.size}")
    d = b - t
    m = d.size
    if m == 0:
        nan = float("nan")
        return {"mean": nan, "se": nan, "ci_low": nan, "ci_high": nan, "p": 1.0, "n": 0}
    rng_boot, rng_perm = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(2))
    lo, hi, _ = _bootstrap_ci(d, n_boot, rng_boot)
    if np.all(d == 0) or m < 2:          # one pair: both signs reach |mean|, p = 1 exactly
        p = 1.0
    else:
        p = float(sps.permutation_test((b, t), _mean_diff, permutation_type="samples", vectorized=True,
                                       n_resamples=int(n_boot), batch=_BATCH, alternative="two-sided",
                                       rng=rng_perm).pvalue)
    return {"mean": float(d.mean()), "se": sem(d), "ci_low": lo, "ci_high": hi, "p": min(p, 1.0), "n": int(m)}


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

BETTER, WORSE, TOO_FEW, UNDECIDED = "better", "worse", "too few tasks", "not distinguishable"
TOO_FEW_TEXT = "too few tasks to decide"
#: The rule in words, for captions.
VERDICT_RULE = (f"a verdict needs ≥ {MIN_SUITE_TASKS} paired tasks, a 95 % paired bootstrap CI that excludes 0 "
                f"and a paired permutation p < {SUITE_ALPHA:g} (DESIGN §10)")
NOT_DISTINGUISHABLE_TEXT = "not distinguishable from"


@dataclass(frozen=True)
class SuiteVerdict:
    """The verdict about a suite: `outcome` is BETTER / WORSE (decided), TOO_FEW or UNDECIDED;
    `text` is the sentence to show (also `str(verdict)`)."""

    outcome: str
    text: str

    @property
    def decided(self) -> bool:
        return self.outcome in (BETTER, WORSE)

    def __str__(self) -> str:
        return self.text


def _num(st: dict, key: str) -> float:
    v = st.get(key)
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def suite_verdict(st: dict[str, float], m: int | None, better: str, worse: str, ref: str, note: str = "", *,
                  min_tasks: int = MIN_SUITE_TASKS, alpha: float = SUITE_ALPHA) -> SuiteVerdict:
    """The one rule for a verdict sentence about a suite (DESIGN §10).

    `st` is a `paired_stats` result (d = reference − method, positive = the method is better),
    `m` the number of paired tasks (default ``st["n"]``). The claim `better` (e.g. "… reproduces",
    "beats …") is written only with m ≥ `min_tasks`, a 95 % CI above 0 and p < `alpha`; `worse`
    (e.g. "… does not reproduce", "worse than …") only with m ≥ `min_tasks`, a CI below 0 and
    p < `alpha`. Otherwise: "too few tasks to decide (m < 20)" when m < `min_tasks`, else
    "not distinguishable from `ref` (CI includes 0 / p ≥ 0.05)" naming what failed. `note` (e.g.
    what the paper found) is appended to the undecided sentences."""
    if m is None:
        m = int(st.get("n", 0) or 0)
    lo, hi, p = _num(st, "ci_low"), _num(st, "ci_high"), _num(st, "p")
    tail = f"; {note}" if note else ""
    if m >= min_tasks and p < alpha:      # NaN compares False: a missing CI or p decides nothing
        if lo > 0:
            return SuiteVerdict(BETTER, better)
        if hi < 0:
            return SuiteVerdict(WORSE, worse)
    if m < min_tasks:
        return SuiteVerdict(TOO_FEW, f"{TOO_FEW_TEXT} ({m} < {min_tasks} paired tasks){tail}")
    why = []
    if not (lo > 0 or hi < 0):
        why.append("CI includes 0" if np.isfinite(lo) and np.isfinite(hi) else "no CI")
    if not p < alpha:
        why.append(f"p = {p:.3g} ≥ {alpha:g}" if np.isfinite(p) else "no p-value")
    return SuiteVerdict(UNDECIDED, f"{NOT_DISTINGUISHABLE_TEXT} {ref} ({' and '.join(why)}){tail}")


def ci_text(st: dict[str, float]) -> str:
    """``+0.0123 [+0.0010, +0.0234]``: mean and 95 % CI of a `paired_stats` result."""
    return f"{st['mean']:+.4f} [{st['ci_low']:+.4f}, {st['ci_high']:+.4f}]"


def improvement_text(st: dict[str, float]) -> str:
    """``improvement +0.0123 (95% CI [+0.0010, +0.0234], p = 0.01)``."""
    return f"improvement {st['mean']:+.4f} (95% CI [{st['ci_low']:+.4f}, {st['ci_high']:+.4f}], p = {st['p']:.3g})"
