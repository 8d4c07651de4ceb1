"""AppTest: the linked Altair views at the end of Spectrum & SNR ("Linked view of the modes") and
Steps & bounds ("Linked view over T") render, carry the report's numbers, and turn a brush into
the table and shares the pure helpers compute.

A brush is what the browser sends back: the chart's widget state, a JSON string
{"selection": {<param>: {<field>: [lo, hi]}}}. AppTest has no setter for Vega-Lite charts, so
`brush()` adds that state to the next run's widget states (the same proto the frontend sends;
streamlit is pinned in requirements.txt)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df
from streamlit.testing.v1 import AppTest

from ttt_core.examples import load_example
from ttt_core.figures import linked
from ttt_core.models import load_model
from ttt_core.prompt_kernel import compute_prompt_kernel
from ttt_core.prompts import parse_prompt
from ttt_core.spectrum import DEFAULT_C, kernel_spectrum
from ttt_core.steps import DEFAULT_C as STEPS_C
from ttt_core.steps import StepsSettings, compute_steps

APP = str(Path(__file__).resolve().parents[2] / "app.py")
MODEL = "tiny-random-llama"
FEWSHOT = "6->5\n6->5\n8->7\n5->4\n7->6\n2->1\n0->9\n3->2\n2->\n# answer: 1"
CLEAN = load_example("Digit shift, clean labels")
GRID = 6


def app(page: str, prompt: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["model_name"] = MODEL
    at.session_state["model_preset"] = MODEL
    at.session_state["prompt_text"] = prompt
    at.run()
    at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def vega(at: AppTest, key: str):
    """The (one) Vega-Lite chart element whose id carries `key`."""
    found = [el for el in at.get("vega_lite_chart") if el.proto.id.endswith(key)]
    assert len(found) == 1, [el.proto.id for el in at.get("vega_lite_chart")]
    return found[0]


def table_of(el) -> "object":
    (ds,) = el.proto.datasets
    return convert_arrow_bytes_to_pandas_df(ds.data.data)


def brush(at: AppTest, key: str, param: str, field: str, lo: float, hi: float) -> AppTest:
    """Rerun as if the user had dragged the brush `param` over [lo, hi] on chart `key`."""
    ws = at._tree.get_widget_states()
    w = ws.widgets.add()
    w.id = vega(at, key).proto.id
    w.string_value = json.dumps({"selection": {param: {field: [lo, hi]}}})
    at._run(widget_state=ws)
    assert not at.exception, at.exception
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


@pytest.fixture(scope="module")
def lm():
    return load_model(MODEL)


def test_spectrum_linked_view_renders_and_follows_the_brush(lm):
    at = app("pages/spectrum.py", FEWSHOT)
    assert any(s.value == "Linked view of the modes" for s in at.subheader)
    el = vega(at, "spec_linked")
    assert list(el.proto.selection_mode) == [linked.MODE_BRUSH]
    spec = json.loads(el.proto.spec)
    assert [p["name"] for p in spec["params"]] == [linked.MODE_BRUSH]
    assert len(spec["vconcat"]) == 4
    rep = kernel_spectrum(compute_prompt_kernel(lm, parse_prompt(FEWSHOT), "q"), T=8, c=DEFAULT_C)
    df = table_of(el)
    np.testing.assert_array_equal(df["mode"], np.arange(1, rep.n + 1))
    for col, arr in [("lam", rep.lam), ("snr", rep.snr), ("snr_lo", rep.snr_lo), ("snr_hi", rep.snr_hi),
                     ("alignment", rep.alignment), ("g_T", rep.g_T), ("g_star", rep.g_star)]:
        np.testing.assert_allclose(df[col].to_numpy(dtype=float), arr, rtol=1e-9, err_msg=col)
    assert any("No modes brushed yet" in i.value for i in at.info)
    assert not at.table
    # a brush over modes 2…4
    brush(at, "spec_linked", linked.MODE_BRUSH, "mode", 1.6, 4.3)
    m = metrics(at)
    assert m["Brushed modes"] == "2–4"
    idx = np.array([1, 2, 3])
    sh = linked.brushed_shares(rep, idx)
    assert m["Share of query alignment"] == f"{100 * sh['alignment']:.3g} %"
    assert m["Share of TTT gap"] == f"{100 * sh['gap_ttt']:.3g} %"
    assert m["Share of ICL gap"] == f"{100 * sh['gap_icl']:.3g} %"
    assert m["Share of the trace"] == f"{100 * sh['energy']:.3g} %"
    (tab,) = at.table
    shown = tab.value
    assert list(shown["mode"]) == [2, 3, 4]
    expect = linked.brushed_modes_table(rep, idx)
    for col in expect.columns:
        assert list(shown[col]) == list(expect[col]), col
    assert not any("No modes brushed yet" in i.value for i in at.info)
    # the rest of the page is still there (the plotly figures above the section)
    assert len(at.get("plotly_chart")) >= 7


def test_steps_linked_view_renders_and_follows_the_brush(lm):
    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["model_name"] = MODEL
    at.session_state["model_preset"] = MODEL
    at.session_state["prompt_text"] = CLEAN
    at.run()
    at.switch_page("pages/steps_bounds.py").run()
    at.number_input(key="steps_grid").set_value(GRID).run()
    assert not at.exception, at.exception
    assert any(s.value == "Linked view over T" for s in at.subheader)
    el = vega(at, "steps_linked")
    assert list(el.proto.selection_mode) == [linked.STEPS_BRUSH]
    spec = json.loads(el.proto.spec)
    assert len(spec["vconcat"]) == 3                    # evidence, query error, Gibbs
    settings = StepsSettings(subspace="q", c=STEPS_C, grid_max=GRID, last_layers=min(4, lm.adapter.n_layers))
    rep = compute_steps(lm, parse_prompt(CLEAN), settings)
    df = table_of(el)
    np.testing.assert_array_equal(df["T"], np.arange(GRID + 1))
    np.testing.assert_allclose(df["ell_fixed"], rep.theory.ell_fixed, rtol=1e-9)
    np.testing.assert_allclose(df["gibbs"], rep.bounds.gibbs, rtol=1e-9)
    np.testing.assert_allclose(df["err_linear"], rep.theory.linear_error, rtol=1e-6)
    np.testing.assert_allclose(df["err_measured"], rep.measured.error, rtol=1e-5, atol=1e-9)
    assert any("No steps brushed yet" in i.value for i in at.info)
    brush(at, "steps_linked", linked.STEPS_BRUSH, "T", 0.6, 3.2)
    m = metrics(at)
    assert m["Brushed T"] == "1–3"
    idx = np.array([1, 2, 3])
    assert m["Gibbs mass on the brushed T"] == f"{rep.bounds.gibbs[idx].sum():.3g}"
    (tab,) = at.table
    assert list(tab.value["T"]) == [1, 2, 3]
    assert list(tab.value["ν_β(T)"]) == [f"{g:.4g}" for g in rep.bounds.gibbs[idx]]
