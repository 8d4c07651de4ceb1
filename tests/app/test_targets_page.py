"""AppTest of the Targets page through app.py on the tiny random model (issue 12): nothing runs
before the button; the table, both charts and the winner sentence are what compare_targets gives."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.app.plotly_json import charts

APP = Path(__file__).resolve().parents[2] / "app.py"
FEWSHOT = "0 -> 3\n1 -> 4\n2 -> 5\n3 -> 6\n4 -> 7\n5 ->\n# answer: 8\n"


@pytest.fixture()
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("TTT_LENS_ARTIFACTS", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    at = AppTest.from_file(str(APP), default_timeout=300)
    at.session_state["model_name"] = "tiny-random-llama"
    at.session_state["model_preset"] = "tiny-random-llama"
    at.session_state["prompt_text"] = FEWSHOT
    at.session_state["tgt_targets"] = ["q", "lora:q:4", "norm_attn"]
    at.session_state["tgt_signals"] = ["nll", "entropy"]
    at.session_state["tgt_steps"] = 2
    at.session_state["tgt_lr"] = 1e-2
    at.switch_page("pages/targets.py").run()
    return at


def test_targets_page_compares_and_draws(app: AppTest) -> None:
    assert not app.exception, app.exception
    assert not app.get("plotly_chart")
    assert any("Compare targets" in i.value for i in app.info)
    assert any("No targets suite found" in i.value for i in app.info)
    app.button(key="tgt_run").click().run()
    assert not app.exception, app.exception
    figs = charts(app)
    assert {"tgt_fig_steps", "tgt_fig_flops"} <= set(figs)
    names = {tr["name"] for tr in figs["tgt_fig_steps"]["data"]}
    assert names == {f"{t} · {s}" for t in ("q", "lora:q:4", "norm_attn") for s in ("nll", "entropy")}
    assert len(app.success) == 1 and ("wins" in app.success[0].value or "No target" in app.success[0].value)
    df = app.dataframe[0].value
    assert list(df["target"]) == ["q", "q", "lora:q:4", "lora:q:4", "norm_attn", "norm_attn"]
    assert df["flops_per_step"].notna().all() and df["kernel"].eq("ok").all()
