"""AppTest of the exports (issue 11): the downloaded numbers are the plotted ones (read from the
download button's stored file and from the chart's spec of the same run), the diagnosis downloads
are `ttt-lens diagnose`'s report, and Live qTTT / Steps & bounds runs save, load back (bad files
refused in words) and overlay."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from tests.app.downloads import download_keys, media, payload  # noqa: F401 (media: fixture)
from tests.app.plotly_json import chart, decode
from tests.app.test_spectrum_page import FEWSHOT
from ttt_core import export
from ttt_core.diagnosis import diagnose_markdown, diagnose_report
from ttt_core.export import SavedRun
from ttt_core.models import load_model
from ttt_core.prompts import parse_prompt

pytestmark = pytest.mark.usefixtures("media")   # records the download buttons' stored files
APP = str(Path(__file__).resolve().parents[2] / "app.py")
MODEL = "tiny-random-llama"
NEEDLE = ("The river bends twice before it reaches the old mill. Farmers in the valley grow barley. "
          "<needle>The secret number is 4821.</needle> The market sells bread, cheese, apples and wool.\n"
          "Question: What is the secret number?\nAnswer: 4821")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def page(name: str, prompt: str = FEWSHOT) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["model_name"] = MODEL
    at.session_state["model_preset"] = MODEL
    at.session_state["prompt_text"] = prompt
    at.run()
    at.switch_page(f"pages/{name}.py").run()
    assert not at.exception, at.exception
    return at


def csv_of(at: AppTest, key: str):
    f = payload(at, key)
    assert f.mimetype == "text/csv"
    return f, *export.read_export_csv(f.content)


def table_with(at: AppTest, column: str):
    """The (first) st.dataframe with a column named `column` (unselectable tables carry no key)."""
    for el in at.dataframe:
        if column in el.value.columns:
            return el.value
    raise AssertionError(f"no dataframe with a column {column!r}")


def sha(prompt: str) -> str:
    return export.prompt_sha256(parse_prompt(prompt).to_text())


def test_spectrum_scree_download_is_the_plotted_data():
    at = page("spectrum")
    f, meta, df = csv_of(at, "dl_spec_scree_csv")
    assert f.filename == "ttt_lens_spec_scree.csv"
    spec = chart(at, "spec_scree")
    assert list(df.columns) == ["mode", "eigenvalue", "cumulative_energy_fraction"]
    np.testing.assert_array_equal(df["mode"], decode(spec["data"][0]["x"]))
    np.testing.assert_array_equal(df["eigenvalue"], decode(spec["data"][0]["y"]))
    np.testing.assert_array_equal(df["cumulative_energy_fraction"], decode(spec["data"][1]["y"]))
    assert meta["model"] == MODEL and meta["prompt_sha256"] == sha(FEWSHOT) and meta["prompt_kind"] == "few_shot"
    assert meta["settings"]["spec_T"] == 8 and meta["settings"]["spec_subspace"] == "q"
    assert any(k.startswith("line") and "λ⋆" in str(v) for k, v in meta.items())
    # the SNR band's columns, and the JSON envelope of the same chart
    _, _, snr = csv_of(at, "dl_spec_snr_csv")
    assert list(snr.columns) == ["mode", "snr_median", "snr_ci90_hi", "snr_ci90_lo"]
    np.testing.assert_array_equal(snr["snr_ci90_lo"], decode(chart(at, "spec_snr")["data"][2]["y"]))
    j = payload(at, "dl_spec_scree_json")
    assert j.mimetype == "application/json" and j.filename == "ttt_lens_spec_scree.json"
    env = json.loads(j.content)
    assert env["ttt_lens_export"] == 1 and env["kind"] == "figure" and env["data"]["figure"] == "spec_scree"
    assert set(env["versions"]) == {"torch", "transformers", "ttt_lens", "plotly", "streamlit"}
    np.testing.assert_array_equal(np.array(env["data"]["traces"][1]["y"], dtype=float), df["cumulative_energy_fraction"])
    # every chart of the page has its CSV and JSON
    assert {f"dl_{k}_{e}" for k in ("spec_scree", "spec_posterior", "spec_snr", "spec_align", "spec_filter",
                                     "spec_gap", "spec_gap_T") for e in ("csv", "json")} <= set(download_keys(at))


def test_steps_curves_download_is_the_plotted_data():
    at = page("steps_bounds")
    traces = {t["name"]: t for t in chart(at, "steps_fig_error")["data"]}
    _, meta, df = csv_of(at, "dl_steps_fig_error_csv")
    assert meta["settings"]["grid_max"] == 30 and meta["settings"]["subspace"] == "q"
    np.testing.assert_array_equal(df["T_steps"], decode(traces["measured error"]["x"]))
    np.testing.assert_array_equal(df["measured_query_sq_error"], decode(traces["measured error"]["y"]))
    np.testing.assert_array_equal(df["linearised_query_sq_error"], decode(traces["linearised error"]["y"]))
    icl = df["icl_T0"].to_numpy()   # the ICL line's two ends, at T = 0 and the grid end
    assert np.isfinite(icl[[0, -1]]).all() and np.isnan(icl[1:-1]).all()
    ev = chart(at, "steps_fig_evidence")["data"]
    _, _, dfe = csv_of(at, "dl_steps_fig_evidence_csv")
    for i, col in enumerate(["ell_T_fixed_sigma", "ell_T_profiled_sigma", "plug_in_bound", "plug_in_population_risk"]):
        np.testing.assert_array_equal(dfe[col], decode(ev[i]["y"]))
    _, _, dfg = csv_of(at, "dl_steps_fig_gibbs_csv")
    np.testing.assert_array_equal(dfg["gibbs_posterior_mass"], decode(chart(at, "steps_fig_gibbs")["data"][0]["y"]))


def test_heads_heatmap_download_is_the_plotted_data():
    at = page("heads")
    spec = chart(at, "heads_heat_Query-Aware")
    z = decode(spec["data"][0]["z"])
    f, meta, df = csv_of(at, "dl_heads_heat_Query-Aware_csv")
    assert f.filename == "ttt_lens_heads_heat_Query-Aware.csv" and list(df.columns) == ["layer", "block", "Query_Aware"]
    L, H = z.shape
    np.testing.assert_array_equal(df["Query_Aware"].to_numpy().reshape(L, H), z)
    np.testing.assert_array_equal(df["layer"], np.repeat(np.arange(L), H))
    np.testing.assert_array_equal(df["block"], np.tile(np.arange(H), L))
    assert meta["settings"]["heads_subspace"] == "q"
    _, _, att = csv_of(at, "dl_heads_attention_csv")
    P = decode(chart(at, "heads_attention")["data"][0]["z"])
    np.testing.assert_array_equal(att["attention_prob"].to_numpy().reshape(P.shape), P)


def test_home_token_table_and_diagnosis_downloads():
    at = page("home")
    _, meta, tok = csv_of(at, "dl_home_tokens_csv")
    table = table_with(at, "token")
    assert tok["token"].tolist() == table["token"].tolist() and tok["id"].tolist() == table["id"].tolist()
    assert meta["kind"] == "table" and meta["prompt_sha256"] == sha(FEWSHOT)
    assert "dl_home_diag_json" not in download_keys(at)   # computed only when asked
    assert any("ttt-lens diagnose prompt.txt --model tiny-random-llama --subspace q" in c.value for c in at.code)
    at.button(key="home_diag_prepare").click().run()
    assert not at.exception, at.exception
    (report, created), = at.session_state["_ttt_diagnoses"].values()
    env = json.loads(payload(at, "dl_home_diag_json").content)
    assert {k: env[k] for k in report} == json.loads(json.dumps(report))          # the report's keys, unchanged
    assert env["prompt_sha256"] == sha(FEWSHOT) and env["created"] == created and env["ttt_lens_export"] == 1
    md = payload(at, "dl_home_diag_md")
    assert md.filename == "ttt_lens_diagnosis.md" and md.content.decode() == diagnose_markdown(report)
    # what the CLI computes for the same prompt, model and (default) flags — timings aside
    # (the CLI, like the page, adds the optional "calibration" field when a saved calibration exists)
    from ttt_core.experiments.calibration_advice import attach_calibration

    lm, pr = load_model(MODEL), parse_prompt(FEWSHOT)
    direct = attach_calibration(diagnose_report(lm, pr), lm, pr)
    assert ("calibration" in direct) == ("calibration" in report)
    strip = lambda r: {k: v for k, v in r.items() if k != "timings"}  # noqa: E731
    assert json.loads(json.dumps(strip(direct))) == json.loads(json.dumps(strip(report)))
    at.run()   # kept in the session: the buttons stay without recomputing
    assert "dl_home_diag_json" in download_keys(at)


def _run_live(at: AppTest, steps: int) -> None:
    at.number_input(key="qttt_steps").set_value(steps)
    at.number_input(key="qttt_span").set_value(16)
    at.select_slider(key="qttt_lr").set_value(1e-3)
    at.button(key="qttt_run").click().run()
    assert not at.exception, at.exception


def test_live_qttt_save_load_and_overlay():
    at = page("live_qttt", NEEDLE)
    assert "dl_qttt_save" not in download_keys(at)
    _run_live(at, 2)
    res = at.session_state["qttt_result"]
    saved = payload(at, "dl_qttt_save")
    assert saved.filename == "ttt_lens_qttt_run.json"
    run = SavedRun.from_json(saved.content, kind="qttt_run")
    assert run.data["records"] == json.loads(export.dumps(res["records"])) and run.settings["steps"] == 2
    assert run.prompt_sha256 == sha(NEEDLE) and run.model == MODEL
    assert run.data["backend_label"] == res["records"][-1]["backend_label"]
    _, _, loss = csv_of(at, "dl_qttt_loss_csv")   # chart downloads once the run is over
    np.testing.assert_array_equal(loss["span_nll_per_token"], [r["loss_per_token"] for r in res["records"][1:]])
    # a garbled file is refused in words; the page stays up
    up = at.file_uploader(key="qttt_upload")
    up.set_value([("broken.json", b"{not json", "application/json"),
                  ("steps.json", json.dumps({**json.loads(run.to_json()), "kind": "steps_run"}).encode(), "application/json")])
    at.run()
    assert not at.exception
    errors = " ".join(e.value for e in at.error)
    assert "broken.json" in errors and "not valid JSON" in errors and "a Steps & bounds result" in errors
    # the saved file loads back and overlays this run
    at.file_uploader(key="qttt_upload").set_value(("earlier.json", saved.content, "application/json"))
    at.run()
    assert not at.exception
    over = chart(at, "qttt_cmp_fig_0")
    assert [t["name"] for t in over["data"]] == ["this run", "earlier.json"]
    diff = chart(at, "qttt_cmp_diff_0")
    assert [t["name"] for t in diff["data"]] == ["this run − earlier.json"]
    np.testing.assert_array_equal(decode(diff["data"][0]["y"]), 0.0)   # the same run: no difference
    # a new run keeps the previous one for comparison
    at.file_uploader(key="qttt_upload").set_value(None)
    _run_live(at, 3)
    at.run()
    assert len(at.session_state["_qttt_previous_runs"]) == 1
    over = chart(at, "qttt_cmp_fig_1")   # the query measure: answer probability on this prompt
    names = [t["name"] for t in over["data"]]
    assert names[0] == "this run" and names[1].startswith("previous run")
    a = at.session_state["qttt_result"]["records"]
    prev = at.session_state["_qttt_previous_runs"][0].data["records"]
    diff = chart(at, "qttt_cmp_diff_1")
    common = [r["step"] for r in prev]
    ya = np.array([r["answer_prob"] for r in a if r["step"] in common])
    yb = np.array([r["answer_prob"] for r in prev])
    np.testing.assert_allclose(decode(diff["data"][0]["y"]), ya - yb, rtol=1e-12, atol=0)
    table = table_with(at, "metric")
    row = table[table["metric"] == "steps run"].iloc[0]
    assert row["this run"] == 3 and row.iloc[-1] == 1.0


def test_steps_keep_and_compare():
    at = page("steps_bounds")
    saved = payload(at, "dl_steps_save")
    run = SavedRun.from_json(saved.content, kind="steps_run")
    assert run.settings["c"] == pytest.approx(0.1) and run.prompt_sha256 == sha(FEWSHOT)
    at.button(key="steps_keep_result").click().run()
    at.slider(key="steps_c").set_value(0.2).run()
    assert not at.exception, at.exception
    over = chart(at, "steps_cmp_fig_0")
    assert len(over["data"]) == 2 and over["data"][1]["name"].startswith("kept")
    now = SavedRun.from_json(payload(at, "dl_steps_save").content)
    cur = {t["name"]: t for t in chart(at, "steps_fig_error")["data"]}
    np.testing.assert_array_equal(decode(over["data"][0]["y"]), decode(cur["measured error"]["y"]))
    assert now.settings["c"] == pytest.approx(0.2)
    # a Live qTTT file is not a Steps & bounds result
    bad = json.dumps({**json.loads(run.to_json()), "kind": "qttt_run"}).encode()
    at.file_uploader(key="steps_upload").set_value(("run.json", bad, "application/json"))
    at.run()
    assert not at.exception and any("run.json" in e.value and "not loaded" in e.value for e in at.error)


def test_every_gp_lab_chart_has_its_downloads():
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    at.switch_page("pages/gp_lab.py").run()
    assert not at.exception, at.exception
    keys = set(download_keys(at))
    ids = [c.proto.id.split("-", 2)[-1] for c in at.get("plotly_chart")]
    assert len(ids) >= 10
    for cid in ids:
        assert {f"dl_{cid}_csv", f"dl_{cid}_json"} <= keys, cid
        f = payload(at, f"dl_{cid}_json")
        assert f.mimetype == "application/json" and f.filename == f"ttt_lens_{cid}.json"
        env = json.loads(f.content)
        assert env["model"] is None and env["prompt_sha256"] is None and env["settings"]["n"] == 48
    _, meta, gain = csv_of(at, "dl_gp_fig_gain_csv")
    z = decode(chart(at, "gp_fig_gain")["data"][0]["z"])
    assert len(gain.columns) == 3   # one row per cell: y, x, then the heatmap's value
    np.testing.assert_array_equal(gain[gain.columns[-1]].to_numpy().reshape(z.shape), z)
