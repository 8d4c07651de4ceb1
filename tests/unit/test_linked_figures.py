"""Linked Altair views (ttt_core.figures.linked): the spec carries one interval selection that
every sub-chart uses, the data are the report's arrays, and the brush helpers pick the right rows.
Reports are built from synthetic kernels (no model)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ttt_core.figures import linked
from ttt_core.measured import Measured
from ttt_core.spectrum import compute_spectrum
from ttt_core.steps import StepsReport, StepsSettings, bound_part, theory_curves, verdict


def _kernel(n: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = 2.0 ** -np.arange(n, dtype=float)
    lam[-1] = 0.0                                   # a zero mode: must not break the log charts
    K = (Q * lam) @ Q.T
    r = Q @ (np.sqrt(lam + 0.05) * rng.standard_normal(n))
    k_x = Q @ (lam * rng.standard_normal(n))
    return K, r, k_x


@pytest.fixture(scope="module")
def rep():
    K, r, k_x = _kernel()
    return compute_spectrum(K, r, k_x, T=6, c=0.5)


@pytest.fixture(scope="module")
def rep_noquery():
    K, r, _ = _kernel(seed=1)
    return compute_spectrum(K, r, None, T=6, c=0.5)


def _steps_report(measured: bool = True, query: bool = True) -> StepsReport:
    K, r, k_x = _kernel(n=10, seed=2)
    grid = np.arange(9, dtype=float)
    tc = theory_curves(K, r, k_x if query else None, 0.3 if query else None, 1.0 if query else None, 0.5, grid)
    b = bound_part(tc.lam, tc.r_tilde, tc.rho, grid, 0.05, 1.0, tc.tau2, tc.sigma2, tc.ell_fixed, tc.posterior)
    m = None
    if measured and query:
        m = Measured(engine="test", comparable=True, note="", prediction=tc.linear_prediction * 1.01,
                     error=tc.linear_error * 1.02, prompt_mse=tc.linear_prompt_mse, steps_run=8)
        m.error[-1] = np.nan                        # a step after a divergence
    return StepsReport(prompt_kind="fewshot", subspace="v", model_name="none", blocks=[(0, 0)], blocks_label="test",
                       n=10, settings=StepsSettings(grid_max=8), theory=tc, bounds=b, measured=m, has_query=query,
                       query_target=1.0 if query else None, f0=0.3 if query else None, query_label=None,
                       verdict=verdict(tc, gibbs_mean_T=b.gibbs_mean_T))


# --------------------------------------------------------------------------------------------
# spec inspection helpers
# --------------------------------------------------------------------------------------------


def _units(spec: dict):
    """Every unit (mark-bearing) view of a Vega-Lite spec, depth first."""
    if "mark" in spec:
        yield spec
    for k in ("layer", "vconcat", "hconcat", "concat"):
        for child in spec.get(k, []):
            yield from _units(child)


def _uses(obj, param: str) -> bool:
    """True when `obj` (an encoding/transform subtree) refers to the selection `param`."""
    if isinstance(obj, dict):
        if obj.get("param") == param:
            return True
        return any(_uses(v, param) for v in obj.values())
    if isinstance(obj, list):
        return any(_uses(v, param) for v in obj)
    return False


def _dataset(spec: dict) -> list[dict]:
    (values,) = spec["datasets"].values()          # one shared table for every sub-chart
    return values


def _col(values: list[dict], key: str) -> np.ndarray:
    return np.array([math.nan if v.get(key) is None else v[key] for v in values], dtype=float)


def _check_linked(spec: dict, param: str, field: str, marks: tuple[str, ...]) -> None:
    # exactly one selection parameter, an x interval, defined in one view
    (p,) = spec["params"]
    assert p["name"] == param and p["select"]["type"] == "interval" and p["select"]["encodings"] == ["x"]
    assert len(p["views"]) == 1
    assert spec["usermeta"] == {"embedOptions": {"renderer": "svg"}}
    assert spec["data"]["name"] in spec["datasets"]
    names = {u.get("name") for u in _units(spec)}
    # the brush lives on the first chart's highlight layer
    brush_view = p["views"][0]
    assert brush_view.startswith(marks[0])
    (bv,) = [u for u in _units(spec["vconcat"][0]) if u.get("name") == brush_view]
    assert bv["encoding"]["x"]["field"] == field
    # an explicit scale "domain" on the brushed axis makes Streamlit's CSP-safe vega-interpreter
    # throw at load (seen in Chromium); domainMin/domainMax do not
    assert "domain" not in bv["encoding"]["x"]["scale"] and "domainMin" in bv["encoding"]["x"]["scale"]
    assert any(u.get("name") == brush_view for u in _units(spec["vconcat"][0]))
    for i, sub in enumerate(spec["vconcat"]):
        units = list(_units(sub))
        hl = [u for u in units if _uses(u.get("encoding", {}), param)]
        assert hl, f"sub-chart {i} does not use {param} in its encoding"
        for u in hl:                                  # a colour condition: series colour in, grey out
            cond = u["encoding"]["color"]["condition"]
            cond = cond[0] if isinstance(cond, list) else cond
            assert cond["param"] == param and cond.get("empty", True) is True
            assert u["encoding"]["color"]["value"] == linked.MUTED
        assert any((u.get("name") or "").startswith(marks[i]) for u in hl), (i, names)
    # every view reads the shared table, which has the brushed field
    assert field in _dataset(spec)[0]


# --------------------------------------------------------------------------------------------
# spectrum
# --------------------------------------------------------------------------------------------


def test_spectrum_spec_shares_one_interval_selection(rep):
    spec = linked.spectrum_linked_chart(rep).to_dict()
    assert len(spec["vconcat"]) == 4                  # spectrum, SNR, alignment, filter match
    _check_linked(spec, linked.MODE_BRUSH, "mode", linked.SPECTRUM_MARKS)
    spec_x = [u["encoding"]["x"] for u in _units(spec["vconcat"][0]) if "field" in u.get("encoding", {}).get("x", {})]
    assert len(spec_x) == 2 and all(x["field"] == "mode" for x in spec_x)   # line and points
    y = next(u["encoding"]["y"] for u in _units(spec["vconcat"][0]) if u.get("name", "").startswith("spec_pts"))
    assert y["field"] == "lam" and y["scale"]["type"] == "log"
    # the SNR chart draws its 90 % band from snr_lo to snr_hi
    band = next(u for u in _units(spec["vconcat"][1]) if u["mark"]["type"] == "area")
    assert band["encoding"]["y"]["field"] == "snr_lo" and band["encoding"]["y2"]["field"] == "snr_hi"
    # the filter chart folds g_T and g_star and plots them against λ
    f = next(u for u in _units(spec["vconcat"][3]) if u.get("name", "").startswith("filter_pts"))
    assert f["encoding"]["x"]["field"] == "lam"
    assert any(t.get("fold") == ["g_T", "g_star"] for t in f.get("transform", []) + spec["vconcat"][3].get("transform", []))
    json.dumps(spec)                                  # JSON-able as Streamlit sends it


def test_spectrum_data_are_the_report_arrays(rep):
    values = _dataset(linked.spectrum_linked_chart(rep).to_dict())
    assert len(values) == rep.n
    np.testing.assert_array_equal(_col(values, "mode"), np.arange(1, rep.n + 1))
    for key, arr in [("lam", rep.lam), ("snr", rep.snr), ("snr_lo", rep.snr_lo), ("snr_hi", rep.snr_hi),
                     ("alignment", rep.alignment), ("g_T", rep.g_T), ("g_star", rep.g_star),
                     ("gap_ttt", rep.gap_contrib), ("gap_icl", rep.icl_contrib)]:
        np.testing.assert_allclose(_col(values, key), arr, rtol=1e-12, atol=0, err_msg=key)


def test_spectrum_without_query_drops_the_alignment_chart(rep_noquery):
    spec = linked.spectrum_linked_chart(rep_noquery).to_dict()
    assert rep_noquery.alignment is None and len(spec["vconcat"]) == 3
    _check_linked(spec, linked.MODE_BRUSH, "mode", ("spec_pts", "snr_pts", "filter_pts"))
    values = _dataset(spec)
    assert np.isnan(_col(values, "alignment")).all() and np.isnan(_col(values, "gap_ttt")).all()
    idx = linked.brushed_mode_index(rep_noquery, (1, 3))
    sh = linked.brushed_shares(rep_noquery, idx)
    assert sh["alignment"] is None and sh["gap_ttt"] is None and sh["gap_icl"] is None
    assert sh["energy"] == pytest.approx(rep_noquery.lam[:3].sum() / rep_noquery.lam.sum())
    assert (linked.brushed_modes_table(rep_noquery, idx)["alignment (uᵢᵀkₓ)²"] == "—").all()


def test_brush_range_reads_streamlit_selection_state():
    f = linked.MODE_BRUSH
    assert linked.brush_range({"selection": {f: {"mode": [4.2, 1.5]}}}, f, "mode") == (1.5, 4.2)
    assert linked.brush_range({f: {"mode": [1, 2]}}, f, "mode") == (1.0, 2.0)
    for empty in (None, {}, {"selection": {f: {}}}, {"selection": {f: {"mode": [1]}}},
                  {"selection": {f: {"other": [1, 2]}}}, {"selection": {f: {"mode": ["a", 2]}}},
                  {"selection": {f: {"mode": [float("nan"), 2]}}}):
        assert linked.brush_range(empty, f, "mode") is None

    class State:                                      # attribute access, as VegaLiteState allows
        selection = {f: {"mode": [2, 3]}}

    assert linked.brush_range(State(), f, "mode") == (2.0, 3.0)


def test_brushed_modes_table_and_shares(rep):
    idx = linked.brushed_mode_index(rep, (1.6, 4.2))
    np.testing.assert_array_equal(idx, [1, 2, 3])     # modes 2, 3, 4
    assert linked.brushed_mode_index(rep, None).size == 0
    assert linked.brushed_mode_index(rep, (0.1, 0.4)).size == 0
    tab = linked.brushed_modes_table(rep, idx)
    assert list(tab["mode"]) == [2, 3, 4]
    assert list(tab.columns) == ["mode", "λ", "SNR median [90 %]", "alignment (uᵢᵀkₓ)²", "g_T", "g⋆"]
    assert tab["λ"].iloc[0] == f"{rep.lam[1]:.3g}"
    assert tab["SNR median [90 %]"].iloc[1] == f"{rep.snr[2]:.3g} [{rep.snr_lo[2]:.3g}, {rep.snr_hi[2]:.3g}]"
    assert tab["g⋆"].iloc[2] == f"{rep.g_star[3]:.3f}"
    sh = linked.brushed_shares(rep, idx)
    assert sh["alignment"] == pytest.approx(rep.alignment[1:4].sum() / rep.alignment.sum())
    assert sh["gap_ttt"] == pytest.approx(rep.gap_contrib[1:4].sum() / rep.gap_contrib.sum())
    assert sh["gap_icl"] == pytest.approx(rep.icl_contrib[1:4].sum() / rep.icl_contrib.sum())
    everything = linked.brushed_shares(rep, linked.brushed_mode_index(rep, (0, rep.n + 1)))
    assert all(v == pytest.approx(1.0) for v in everything.values())


# --------------------------------------------------------------------------------------------
# steps & bounds
# --------------------------------------------------------------------------------------------


def test_steps_spec_shares_one_interval_selection():
    srep = _steps_report()
    spec = linked.steps_linked_chart(srep).to_dict()
    assert len(spec["vconcat"]) == 3                  # evidence, query error, Gibbs
    _check_linked(spec, linked.STEPS_BRUSH, "T", linked.STEPS_MARKS)
    ev = next(u for u in _units(spec["vconcat"][0]) if (u.get("name") or "").startswith("evid_pts"))
    assert ev["encoding"]["x"]["field"] == "T"
    fold = next(t["fold"] for t in ev["transform"] if "fold" in t)
    assert fold == list(linked.EVIDENCE_SERIES)
    err = next(u for u in _units(spec["vconcat"][1]) if (u.get("name") or "").startswith("err_pts"))
    assert next(t["fold"] for t in err["transform"] if "fold" in t) == ["err_measured", "err_linear"]


def test_steps_data_are_the_report_arrays():
    srep = _steps_report()
    values = _dataset(linked.steps_linked_chart(srep).to_dict())
    tc, b, m = srep.theory, srep.bounds, srep.measured
    np.testing.assert_array_equal(_col(values, "T"), srep.T_grid)
    for key, arr in [("ell_fixed", tc.ell_fixed), ("ell_profiled", tc.ell_profiled), ("bound", b.bound),
                     ("pop_risk", b.population_risk), ("err_measured", m.error), ("err_linear", tc.linear_error),
                     ("pred_measured", m.prediction), ("pred_linear", tc.linear_prediction), ("gibbs", b.gibbs)]:
        np.testing.assert_allclose(_col(values, key), arr, rtol=1e-12, atol=0, equal_nan=True, err_msg=key)
    assert np.isnan(_col(values, "err_measured")[-1]) and np.isnan(_col(values, "nll_measured")).all()


def test_steps_without_query_has_no_error_chart_and_brush_helpers():
    srep = _steps_report(measured=False, query=False)
    spec = linked.steps_linked_chart(srep).to_dict()
    assert len(spec["vconcat"]) == 2
    _check_linked(spec, linked.STEPS_BRUSH, "T", ("evid_pts", "gibbs_bars"))
    full = _steps_report()
    idx = linked.brushed_steps_index(full, (1.5, 4.4))
    np.testing.assert_array_equal(full.T_grid[idx], [2, 3, 4])
    s = linked.brushed_steps_summary(full, idx)
    assert s["gibbs_mass"] == pytest.approx(full.bounds.gibbs[2:5].sum())
    assert s["best_T"] == int(2 + np.argmin(full.theory.ell_fixed[2:5]))
    assert s["contains_t_map"] == (2 <= full.theory.t_map_fixed <= 4)
    assert linked.brushed_steps_summary(full, np.array([], dtype=int)) == \
        {"gibbs_mass": 0.0, "best_T": None, "contains_t_map": False}
    tab = linked.brushed_steps_table(full, linked.brushed_steps_index(full, (6.5, 8)))
    assert list(tab["T"]) == [7, 8]
    assert list(tab.columns) == ["T", "ℓ_T fixed σ̂", "plug-in bound", "measured error", "linearised error", "ν_β(T)"]
    assert tab["measured error"].iloc[1] == "—"       # NaN after the divergence
    assert tab["ν_β(T)"].iloc[0] == f"{full.bounds.gibbs[7]:.4g}"
