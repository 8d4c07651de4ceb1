"""AppTest of the GP lab page: the numbers in its figures equal what ttt_core computes (DESIGN §3-§5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from streamlit.testing.v1 import AppTest

from tests.app.plotly_json import charts, decode
from ttt_core import gp_lab, theory

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "pages" / "gp_lab.py"  # AppTest resolves relative paths against this test file

DEFAULT = gp_lab.LabSettings(
    kernel="rbf", n=48, d=1, lengthscale=0.2, alpha=1.5, tau2=1.0, sigma2=0.05, c=0.5, T_max=30,
    x_query=0.5, n_draws=300, seed=0, delta=0.05, sigma2_b=2.0, projector_rank=8, floor_rank=8,
)


def close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-12) -> None:
    np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-12 * max(1.0, float(np.nanmax(np.abs(b)))))


def check_page(at: AppTest, s: gp_lab.LabSettings) -> None:
    assert not at.exception, at.exception
    figs = charts(at)
    expected = {"gp_fig_spectrum", "gp_fig_filters", "gp_fig_query_gap", "gp_fig_prompt_risk", "gp_fig_gain",
                "gp_fig_evidence", "gp_fig_tmap_hist", "gp_fig_pac", "gp_fig_bayes_gap"}
    if s.sigma2_b is not None:
        expected |= {"gp_fig_shift", "gp_fig_projector"}
    assert set(figs) == expected
    prob = gp_lab.problem_from_settings(s)
    lam, U = theory.eigh_psd(prob.K)
    kt = U.T @ prob.k_x
    rho = theory.rho_from_c(lam, s.c)
    grid = np.arange(s.T_max + 1, dtype=float)

    # spectrum
    spec = figs["gp_fig_spectrum"]["data"]
    close(decode(spec[0]["y"]), np.where(lam > 0, lam, np.nan))

    # filters g_T(λ) and the Bayes filter
    data = figs["gp_fig_filters"]["data"]
    for tr, T in zip(data[:3], [1, 5, 30], strict=True):
        assert tr["name"] == f"g_T, T = {T}"
        x = decode(tr["x"])
        close(decode(tr["y"]), theory.gd_filter(x, rho, float(T)))
    bayes = data[3]
    close(decode(bayes["y"]), theory.bayes_filter(decode(bayes["x"]), s.sigma2 / s.tau2))

    # risks: closed-form curves are the theory's; MC points are the simulator's
    lab = gp_lab.run_lab(s)
    qd = figs["gp_fig_query_gap"]["data"]
    close(decode(qd[0]["x"]), grid)
    close(decode(qd[0]["y"]), theory.query_bayes_gap(lam, kt, s.tau2, s.sigma2, theory.gd_query_filter(lam, rho, grid)),
          rtol=1e-9)
    close(decode(qd[1]["y"]), lab.risks.query_gap_mc, rtol=1e-9)
    close(decode(qd[1]["error_y"]["array"]), lab.risks.query_gap_se, rtol=1e-9)
    pd_ = figs["gp_fig_prompt_risk"]["data"]
    close(decode(pd_[0]["y"]), theory.prompt_risk(lam, s.tau2, s.sigma2, theory.gd_filter(lam, rho, grid)), rtol=1e-9)

    # signed gain heat map
    hm = figs["gp_fig_gain"]["data"][0]
    s2_grid = decode(hm["y"])
    z = decode(hm["z"]).reshape(s2_grid.size, grid.size)
    q = theory.gd_query_filter(lam, rho, grid)
    for i, s2 in enumerate(s2_grid):
        gaps = theory.query_bayes_gap(lam, kt, s.tau2, s2, q)
        close(z[i], 1.0 - gaps / gaps[0], rtol=1e-8)
    assert hm["zmid"] == 0

    # evidence curves of the first draw
    ev = figs["gp_fig_evidence"]["data"]
    rt = U.T @ lab.evidence.r_first
    fixed = theory.evidence_scores(lam, rt, rho, grid, "fixed")
    mle = theory.evidence_scores(lam, rt, rho, grid, "mle")
    close(decode(ev[0]["y"]), fixed - fixed.min(), rtol=1e-9)
    close(decode(ev[1]["y"]), (mle - mle.min()) / 2, rtol=1e-9)
    assert decode(ev[2]["x"])[0] == grid[np.argmin(fixed)]
    assert decode(ev[3]["x"])[0] == grid[np.argmin(mle)]

    # T_MAP histogram counts sum to the number of draws
    hist = figs["gp_fig_tmap_hist"]["data"]
    assert decode(hist[0]["y"]).sum() == s.n_draws == decode(hist[1]["y"]).sum()

    # PAC-Bayes scatter: x = ℓ_{T_MAP} + slack with the theory's slack
    _, slack = theory.pac_bayes_slack(lam, rho, grid, s.sigma2, s.tau2, s.sigma2, s.delta)
    pac = figs["gp_fig_pac"]["data"]
    xs = np.concatenate([decode(pac[0]["x"]), decode(pac[1]["x"]) if pac[1].get("x") is not None else []])
    close(np.sort(xs), np.sort(lab.evidence.ell_at_map + slack), rtol=1e-9)
    text = " ".join(m.value for m in at.markdown)
    assert "Empirical coverage" in text and f"1 − δ = {1 - s.delta:.3f}" in text

    # Bayes gap from evidence (DESIGN §5): bound and closed form recomputed from posterior_verdict; the MC
    # points recomputed from the risk experiment's draws (replayed from its seed: first child of
    # SeedSequence(seed)), f̂_T = G_T r by a dense matrix power and f_Bayes by a dense solve.
    # Would catch: a missing or mislabelled figure, wrong curves, ±1 SE bars drawn as ±2 SE (or the
    # reverse), MC from other draws than the lab's, and a bound that a plotted MC point exceeds.
    from ttt_core import gp_sim
    from ttt_core.posterior_verdict import bayes_gap_bound
    bgd = figs["gp_fig_bayes_gap"]["data"]
    assert [tr["name"] for tr in bgd] == ["bound 4σ²·KL(N(0,Σ⋆) ‖ N(0,Σ_T))", "closed form E‖f̂_T − f_Bayes‖²",
                                          "Monte Carlo ± 2 SE"]
    ref = bayes_gap_bound(lam, rho, grid, s.tau2, s.sigma2)
    for tr in bgd:
        close(decode(tr["x"]), grid)
    close(decode(bgd[0]["y"]), ref.bound, rtol=1e-9)
    close(decode(bgd[1]["y"]), ref.expected_gap, rtol=1e-9)
    draws = gp_sim.draw_benchmark(prob, s.tau2, s.sigma2, s.n_draws,
                                  np.random.default_rng(np.random.SeedSequence(s.seed).spawn(4)[0]))
    fb = gp_sim.bayes_prompt(prob, draws.r, s.tau2, s.sigma2)
    step = np.eye(prob.n) - rho * prob.K
    G, err = np.zeros((prob.n, prob.n)), []
    for _ in grid:  # G_T = I − (I − ρK)^T for T = 0, 1, …
        err.append(np.sum((draws.r @ G - fb) ** 2, axis=1))
        G = np.eye(prob.n) - step @ (np.eye(prob.n) - G)
    err = np.array(err)
    mc, se = err.mean(axis=1), err.std(axis=1, ddof=1) / np.sqrt(s.n_draws)
    close(decode(bgd[2]["y"]), mc, rtol=1e-7)
    close(decode(bgd[2]["error_y"]["array"]), 2 * se, rtol=1e-6)
    assert np.all(decode(bgd[2]["y"]) <= decode(bgd[0]["y"]))
    assert figs["gp_fig_bayes_gap"]["layout"]["meta"] == {"figure": "bayes_gap"}
    assert any(f"at {grid.size} of {grid.size} T values" in t and "Monte Carlo against the closed form" in t
               for t in (m.value for m in at.markdown))

    if s.sigma2_b is not None:
        sh = figs["gp_fig_shift"]["data"]
        g = theory.gd_filter(lam, rho, grid)
        for j, s2 in enumerate([s.sigma2, s.sigma2_b]):
            close(decode(sh[j]["y"]), theory.prompt_excess_risk(lam, s.tau2, s2, g), rtol=1e-9)


def fresh_app() -> AppTest:
    at = AppTest.from_file(str(PAGE), default_timeout=60)
    at.run()
    return at


def test_default_settings() -> None:
    check_page(fresh_app(), DEFAULT)


def test_changed_kernel_noise_grid_and_shift_off() -> None:
    app = fresh_app()
    app.selectbox(key="gp_kernel").set_value("matern52")
    app.number_input(key="gp_sigma2").set_value(0.5)
    app.slider(key="gp_tmax").set_value(20)
    app.checkbox(key="gp_shift").uncheck()
    app.run()
    s = gp_lab.LabSettings(**{**DEFAULT.__dict__, "kernel": "matern52", "sigma2": 0.5, "T_max": 20,
                              "sigma2_b": None})
    check_page(app, s)
    assert any("Second noise level" in i.value for i in app.info)


def test_power_law_kernel_query_seed_and_shift() -> None:
    app = fresh_app()
    app.selectbox(key="gp_kernel").set_value("powerlaw").run()
    app.slider(key="gp_alpha").set_value(2.0)
    app.slider(key="gp_xq").set_value(0.3)
    app.number_input(key="gp_seed").set_value(4)
    app.number_input(key="gp_sigma2_b").set_value(1.5)
    app.number_input(key="gp_draws").set_value(200)
    app.run()
    s = gp_lab.LabSettings(**{**DEFAULT.__dict__, "kernel": "powerlaw", "alpha": 2.0, "x_query": 0.3,
                              "seed": 4, "sigma2_b": 1.5, "n_draws": 200})
    check_page(app, s)
