"""AppTest: the Reliability page through app.py (issue 16; DESIGN §10) — no result yet, a small
saved result in a temporary artifacts root (its tables, figures and recommendation are exactly the
saved numbers, with how it was made), the published fallback, and a small fresh run beside it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from tests.app.plotly_json import charts, decode
from tests.unit.experiments.test_calibration_report import SETTINGS, synthetic_records
from ttt_core.experiments import calibration_suite as CS
from ttt_core.experiments.calibration_report import POOLED, calibration_report, recommended_rule
from ttt_core.experiments.store import provenance, write_json

APP = str(Path(__file__).resolve().parents[2] / "app.py")
MODEL = "tiny-random-llama"


@pytest.fixture
def roots(tmp_path, monkeypatch):
    monkeypatch.setenv("TTT_LENS_ARTIFACTS", str(tmp_path / "art"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    published = tmp_path / "published"
    monkeypatch.setattr(CS, "published_calibration_dir", lambda: published)
    return tmp_path / "art" / "calibration", published


def app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["model_name"] = MODEL
    at.session_state["model_preset"] = MODEL
    at.run()
    return at.switch_page("pages/reliability.py").run()


def saved_summary(folder: Path, created: str = "2026-01-01T00:00:00+00:00", heads: int = 20) -> dict:
    recs = synthetic_records({"train": 20, "val": 8, "test": 24}, heads=heads)
    report = calibration_report(recs, SETTINGS, n_boot=200)
    prov = {**provenance("ttt-lens calibrate --prompts 52 (test)"), "created": created}
    summary = {"kind": "calibration", "format": "ttt_lens_calibration/1", "created": created, "provenance": prov,
               "settings": asdict(SETTINGS), "model": SETTINGS.model, "n_prompts": len(recs), "n_head_prompts": heads,
               "backend": "serial", "workers": 1, "wall_seconds": 123.0, "report": report}
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"calibration-{created[:10]}.json", summary, indent=1)
    return summary


def test_no_result_says_so(roots):
    at = app()
    assert not at.exception, at.exception
    text = " ".join(i.value for i in at.info)
    assert "No calibration result yet" in text and "python -m ttt_core calibrate" in text
    assert not at.dataframe and not at.get("plotly_chart")


def test_saved_result_shows_its_numbers(roots):
    saved, _ = roots
    summary = saved_summary(saved)
    rep = summary["report"]
    at = app()
    assert not at.exception, at.exception
    # the default family is the one the sidebar's prompt (the digit-shift example) resembles
    assert at.selectbox(key="rel_level").value == "shift_clean_arrow"
    at.selectbox(key="rel_level").set_value(POOLED).run()
    text = " ".join(m.value for m in at.markdown)
    assert recommended_rule(rep, POOLED)["sentence"] in text
    assert any("ttt-lens calibrate --prompts 52 (test)" in c.value for c in at.caption)   # how it was made
    assert any("ttt-lens recheck " in c.value and ".json --records 3" in c.value for c in at.caption)  # how to check it
    figs = charts(at)
    assert {"rel_fig_regret", "rel_fig_reliability", "rel_fig_heads"} <= set(figs)
    rows = [r for r in rep["regret"]["test"] if r["level"] == POOLED]
    bar = figs["rel_fig_regret"]["data"][0]
    np.testing.assert_allclose(decode(bar["x"]), [r["regret"] for r in rows], rtol=1e-12)
    assert list(bar["y"]) == [r["rule"] for r in rows]
    table = at.dataframe[0].value
    np.testing.assert_allclose(table["mean regret"].to_numpy(), [r["regret"] for r in rows], rtol=1e-12)
    bins = [b for b in rep["verdict"][POOLED]["bins"] if b["count"]]
    freq = next(t for t in figs["rel_fig_reliability"]["data"] if t["name"] == "measured frequency")
    np.testing.assert_allclose(decode(freq["y"]), [b["freq"] for b in bins], rtol=1e-12)
    assert "learned controller" in " ".join(list(bar["y"]))
    assert rep["controller"]["comparison"]["sentence"] in text
    # the recalibrated verdict: the summary's test-split Brier scores and both reliability lines
    rl = rep["verdict_recalibration"]["levels"][POOLED]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Test Brier, posterior P"] == f"{rl['brier_raw']:.3f}"
    assert metrics["Test Brier, recalibrated"] == f"{rl['brier_recalibrated']:.3f}"
    lines = {t["name"]: t for t in figs["rel_fig_recalibration"]["data"]}
    got = decode(lines["recalibrated P' (Platt, train split)"]["y"])
    np.testing.assert_allclose(got, [b["freq"] for b in rl["bins_recalibrated"] if b["count"]], rtol=1e-12)
    # another family: its own recommendation and rows
    at.selectbox(key="rel_level").set_value("trap_noise").run()
    assert not at.exception, at.exception
    assert recommended_rule(rep, "trap_noise")["sentence"] in " ".join(m.value for m in at.markdown)
    at.radio(key="rel_split").set_value("all").run()
    assert not at.exception, at.exception
    rows = [r for r in rep["regret"]["all"] if r["level"] == "trap_noise"]
    np.testing.assert_allclose(decode(charts(at)["rel_fig_regret"]["data"][0]["x"]), [r["regret"] for r in rows])


def test_published_result_is_the_fallback(roots):
    _, published = roots
    saved_summary(published, created="2025-06-01T00:00:00+00:00", heads=0)
    at = app()
    assert not at.exception, at.exception
    assert "published" in at.selectbox(key="rel_result").options[0]
    assert any("No head-choice runs" in i.value for i in at.info)


def test_fresh_run_is_added_beside_the_saved_one(roots):
    saved, _ = roots
    saved_summary(saved)
    at = app()
    assert len(at.selectbox(key="rel_result").options) == 1
    at.number_input(key="rel_fresh_prompts").set_value(12)
    at.number_input(key="rel_fresh_heads").set_value(2)
    at.button(key="rel_fresh_run").click().run()
    assert not at.exception, at.exception
    opts = at.selectbox(key="rel_result").options
    assert len(opts) == 2 and MODEL in opts[0] and "12 prompts" in opts[0]
    assert len(list(saved.glob("calibration-*.json"))) == 2
