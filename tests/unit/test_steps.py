"""Steps & bounds (ttt_core.steps): measured TTT against the kernel's linearised prediction, the
evidence curves, the plug-in PAC-Bayes bound and the Gibbs posterior (DESIGN §3, §5)."""

from __future__ import annotations

import numpy as np
import pytest

from ttt_core import theory
from ttt_core.examples import load_example
from ttt_core.figures.steps import all_figures
from ttt_core.models import build_tiny_model
from ttt_core.prompt_kernel import compute_prompt_kernel
from ttt_core.prompts import FewShotPrompt, parse_prompt
from ttt_core.steps import (
    PLUG_IN_LABEL,
    StepsSettings,
    block_kernel,
    bound_part,
    compute_steps,
    select_blocks,
    theory_curves,
)

CLEAN = "Digit shift, clean labels"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model("llama", seed=1)


@pytest.fixture(scope="module")
def clean():
    return parse_prompt(load_example(CLEAN))


def _problem(seed: int = 0, n: int = 12):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5))
    K = X @ X.T + 0.05 * np.eye(n)
    r = rng.normal(size=n)
    kx = K @ rng.normal(size=n) / n
    return K, r, kx


# ------------------------------------------------------------------ linearised vs measured
def _gaps(lm, prompt, ev, subspace, cs, grid=3, last=4):
    out = []
    for c in cs:
        rep = compute_steps(lm, prompt, StepsSettings(subspace=subspace, c=c, grid_max=grid, last_layers=last), ev=ev)
        m, lin = rep.measured.prediction, rep.theory.linear_prediction
        assert rep.measured.comparable and rep.measured.status == "done"
        assert m[0] == pytest.approx(lin[0], abs=2e-6)          # T = 0: both are the ICL prediction
        out.append((np.abs(m - lin)[1:], np.abs(m - m[0])[1:]))
    return out


def _check_second_order(gaps):
    (d1, move1), (d2, move2) = gaps
    # first-order agreement: the disagreement is a small fraction of the move
    assert np.all(d2 < 0.05 * move2)
    # halving ρ shrinks the disagreement ~4× (O(ρ²)) at T = 1, 2, …, the move only ~2× (O(ρ))
    ratio = d1 / d2
    assert 3.0 < ratio[0] < 5.0, ratio
    assert np.all(ratio > 2.5), ratio
    assert np.all(np.abs(move1 / move2 - 2.0) < 0.3)


@pytest.mark.parametrize("subspace", ["v", "q"])
def test_measured_matches_linearised_to_first_order_tiny(tiny, clean, subspace):
    ev = compute_prompt_kernel(tiny, clean, subspace)
    _check_second_order(_gaps(tiny, clean, ev, subspace, [0.1, 0.05]))


@pytest.mark.smollm2
def test_measured_matches_linearised_to_first_order_smollm2(clean):
    from ttt_core.models import load_model

    lm = load_model()
    ev = compute_prompt_kernel(lm, clean, "v")
    _check_second_order(_gaps(lm, clean, ev, "v", [0.1, 0.05], grid=2))  # T = 1, 2 (each engine step: 3 forwards)


def test_engine_step_is_the_theory_rho(tiny, clean):
    """One engine step moves the query by ≈ ρ k_xᵀ r with ρ = c/λ_max of the same kernel."""
    ev = compute_prompt_kernel(tiny, clean, "q")
    rep = compute_steps(tiny, clean, StepsSettings(subspace="q", c=0.05, grid_max=1, last_layers=2), ev=ev)
    K, kx = block_kernel(ev, select_blocks(ev, 2))
    rho = 0.05 / np.linalg.eigvalsh(K)[-1]
    assert rep.theory.rho == pytest.approx(rho, rel=1e-9)
    step = rep.measured.prediction[1] - rep.measured.prediction[0]
    assert step == pytest.approx(rho * kx @ ev.residuals, rel=0.05)
    assert f"{rho:.4g}" in rep.measured.engine


def test_linearised_curves_match_explicit_iteration():
    K, r, kx = _problem()
    grid = np.arange(9.0)
    tc = theory_curves(K, r, kx, 0.3, 0.8, 0.4, grid)
    rho = 0.4 / np.linalg.eigvalsh(K)[-1]
    assert tc.rho == pytest.approx(rho)
    acc, v = np.zeros_like(r), r.copy()
    for T in range(9):
        pred = 0.3 + kx @ (rho * acc)                       # k_xᵀ q_T(K) r, q_T(K) = ρ Σ_{t<T} (I − ρK)^t
        assert tc.linear_prediction[T] == pytest.approx(pred, rel=1e-10, abs=1e-12)
        assert tc.linear_error[T] == pytest.approx((pred - 0.8) ** 2, rel=1e-9, abs=1e-12)
        assert tc.linear_prompt_mse[T] == pytest.approx(v @ v / r.size, rel=1e-9)   # ‖(I − ρK)^T r‖²/n
        acc, v = acc + v, v - rho * K @ v
    lam, U = theory.eigh_psd(K)
    np.testing.assert_allclose(tc.ell_fixed, theory.evidence_scores(lam, U.T @ r, rho, grid, "fixed"))
    np.testing.assert_allclose(tc.ell_profiled, theory.profiled_scores(lam, U.T @ r, rho, grid))
    assert tc.t_map_fixed == int(np.argmin(tc.ell_fixed)) and tc.t_map_profiled == int(np.argmin(tc.ell_profiled))


# ------------------------------------------------------------------ bound structure
def test_bound_structure():
    K, r, kx = _problem(1)
    grid = np.arange(31.0)
    tc = theory_curves(K, r, kx, 0.0, None, 0.3, grid)
    parts = {d: bound_part(tc.lam, tc.r_tilde, tc.rho, grid, d, 1.0, tc.tau2, tc.sigma2, tc.ell_fixed)
             for d in (0.01, 0.05, 0.2, 0.5)}
    for d, b in parts.items():
        assert b.plug_in is True
        assert np.all(b.bound >= tc.ell_fixed)
        np.testing.assert_allclose(b.bound - tc.ell_fixed, b.slack, rtol=1e-12)   # point mass: constant in T
        assert b.slack == pytest.approx(np.sqrt(b.v_bar * (np.log(31) + np.log(1 / d)) / r.size))
        assert b.v_bar == pytest.approx(b.v_T.max())
    slacks = [parts[d].slack for d in (0.01, 0.05, 0.2, 0.5)]
    assert all(a > b for a, b in zip(slacks, slacks[1:]))                          # slack decreases in δ
    # Gibbs posterior: sums to 1, peaks at T_MAP for every β (uniform prior), concentrates as β grows
    peaks, ents = [], []
    for beta in (0.01, 0.1, 1.0, 10.0, 100.0):
        nu = bound_part(tc.lam, tc.r_tilde, tc.rho, grid, 0.05, beta, tc.tau2, tc.sigma2, tc.ell_fixed).gibbs
        assert nu.sum() == pytest.approx(1.0) and np.all(nu >= 0)
        assert int(np.argmax(nu)) == tc.t_map_fixed
        peaks.append(nu.max())
        ents.append(-(nu[nu > 0] * np.log(nu[nu > 0])).sum())
    assert all(a <= b + 1e-15 for a, b in zip(peaks, peaks[1:])) and peaks[-1] > peaks[0]
    assert all(a >= b - 1e-12 for a, b in zip(ents, ents[1:]))


def test_report_with_bounds_only_changes_the_bound_part(tiny, clean):
    rep = compute_steps(tiny, clean, StepsSettings(subspace="v", grid_max=6, delta=0.05, beta=1.0))
    rep2 = rep.with_bounds(0.2, 10.0)
    assert rep2.bounds.slack < rep.bounds.slack
    assert rep2.bounds.gibbs.max() >= rep.bounds.gibbs.max()
    assert rep2.theory is rep.theory and rep2.measured is rep.measured
    d = rep2.to_dict()
    assert d["pac_bayes"]["plug_in"] is True and d["pac_bayes"]["label"] == PLUG_IN_LABEL
    assert d["pac_bayes"]["delta"] == 0.2 and d["settings"]["beta"] == 10.0
    assert len(d["T_grid"]) == len(d["evidence"]["ell_fixed"]) == len(d["measured"]["error"]) == 7


# ------------------------------------------------------------------ what cannot be drawn
def test_unavailable_curves_are_reported(tiny, clean):
    no_answer = FewShotPrompt(demos=clean.demos, query_x=clean.query_x, query_y=None, sep=clean.sep, spaced=clean.spaced)
    rep = compute_steps(tiny, no_answer, StepsSettings(subspace="q", grid_max=3))
    assert rep.theory.linear_error is None and rep.measured.error is None
    assert rep.theory.linear_prediction is not None and np.all(np.isfinite(rep.measured.prediction))
    assert "query error (measured and linearised)" in rep.unavailable

    free = parse_prompt(load_example("Free text (no question)"))
    rep = compute_steps(tiny, free, StepsSettings(subspace="q", grid_max=3))
    assert rep.measured is None and rep.theory.linear_prediction is None
    assert {"linearised query prediction", "measured trajectory"} <= set(rep.unavailable)
    assert rep.verdict["criterion"].startswith("prompt-value")

    rep = compute_steps(tiny, clean, StepsSettings(subspace="o", grid_max=3))
    assert rep.measured is None and "W_V or W_Q" in rep.unavailable["measured trajectory"]


def test_long_context_records_qttt_answer_nll(tiny):
    needle = parse_prompt(load_example("Needle in a haystack, short"))
    rep = compute_steps(tiny, needle, StepsSettings(subspace="q", grid_max=3, last_layers=1))
    m = rep.measured
    assert m is not None and not m.comparable and np.all(np.isfinite(m.nll)) and m.nll.shape == (4,)
    assert rep.theory.linear_error is not None
    assert rep.theory.linear_error[0] == pytest.approx((1 - rep.f0) ** 2)
    figs = all_figures(rep)
    assert "measured qTTT answer NLL" in [t.name for t in figs["error"].data]
