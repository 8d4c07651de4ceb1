"""AppTest of the Live qTTT page through app.py: Run streams steps into the charts, the stored
result survives reruns, Reset clears it, paper mode runs on a few-shot prompt."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from tests.app.plotly_json import decode
from ttt_core.scores import HeadScores

APP = str(Path(__file__).resolve().parents[2] / "app.py")
NEEDLE = ("The river bends twice before it reaches the old mill. Farmers in the valley grow barley. "
          "<needle>The secret number is 4821.</needle> The market sells bread, cheese, apples and wool. "
          "Sheep graze on the slopes above the orchard.\nQuestion: What is the secret number?\nAnswer: 4821")
FEW_SHOT = "1 -> 2\n4 -> 5\n6 -> 7\n2 -> 3\n7 -> 8\n3 ->\n# answer: 4"


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP's
    spin-waiting makes 2-thread runs ~15× slower; restore the setting afterwards."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def charts(at: AppTest) -> dict[str, dict]:
    """Chart specs by key prefix (keys carry the record count: qttt_loss_fig_<n>)."""
    out = {}
    for el in at.get("plotly_chart"):
        key = el.proto.id if not getattr(el, "key", None) else el.key
        out[key.rsplit("_", 1)[0] if key[-1].isdigit() else key] = json.loads(el.proto.spec)
    return out


def _app(prompt: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["model_name"] = "tiny-random-llama"
    at.session_state["model_preset"] = "tiny-random-llama"
    at.session_state["prompt_text"] = prompt
    at.switch_page("pages/live_qttt.py")
    return at.run()


def test_run_streams_steps_into_charts_and_reset_clears():
    at = _app(NEEDLE)
    assert not at.exception
    assert any("Kernel: PyTorch reference on CPU" in m.value for m in at.markdown)  # st.badge
    assert any("frozen prefill ones (DESIGN §2)" in c.value for c in at.caption)
    at.number_input(key="qttt_steps").set_value(3)
    at.number_input(key="qttt_span").set_value(32)
    at.select_slider(key="qttt_lr").set_value(1e-3)
    at.button(key="qttt_run").click().run()
    assert not at.exception
    res = at.session_state["qttt_result"]
    assert res["status"] == "done" and len(res["records"]) == 4
    figs = charts(at)
    assert {"qttt_loss_fig", "qttt_quality_fig", "qttt_delta_fig", "qttt_needle_fig", "qttt_time_fig"} <= set(figs)
    loss_y = decode(figs["qttt_loss_fig"]["data"][0]["y"])
    np.testing.assert_allclose(loss_y, [r["loss_per_token"] for r in res["records"][1:]], rtol=1e-6)
    prob_y = decode(figs["qttt_quality_fig"]["data"][0]["y"])
    np.testing.assert_allclose(prob_y, [r["answer_prob"] for r in res["records"]], rtol=1e-6)
    z = decode(figs["qttt_delta_fig"]["data"][0]["z"])
    assert np.asarray(z).shape == (3, 4) and np.all(np.asarray(z)[:, 0] == 0) and np.all(np.asarray(z)[:, -1] > 0)
    assert len(decode(figs["qttt_needle_fig"]["data"][0]["y"])) == 4
    assert any("Answer before adaptation" in m.value for m in at.markdown)
    assert any("Answer after adaptation" in m.value for m in at.markdown)
    assert any("Finished 3 steps" in s.value for s in at.success)
    # the result stays on reruns (e.g. another widget), and Reset clears it
    at.run()
    assert at.session_state["qttt_result"]["status"] == "done"
    at.button(key="qttt_reset").click().run()
    assert not at.exception and "qttt_result" not in at.session_state
    assert not [k for k in charts(at) if k.startswith("qttt_loss")]


def test_paper_mode_on_few_shot_and_long_context_explains():
    at = _app(FEW_SHOT)
    assert not at.exception
    at.radio(key="qttt_mode").set_value("Paper mode (LOO gradient descent)").run()
    assert not at.exception
    at.number_input(key="paper_steps").set_value(2)
    at.button(key="qttt_run").click().run()
    assert not at.exception
    res = at.session_state["qttt_result"]
    assert res["status"] == "done" and res["settings"]["mode"] == "paper" and res["settings"]["rho"] > 0
    figs = charts(at)
    assert "qttt_labels_fig" in figs and len(figs["qttt_labels_fig"]["data"]) == 2
    err = decode(figs["qttt_quality_fig"]["data"][0]["y"])
    assert len(err) == 3 and np.all(err >= 0)
    # a long context offers qTTT only, and says why
    at.session_state["prompt_text"] = NEEDLE
    at.run()
    assert not at.exception
    assert at.radio(key="qttt_mode").options == ["qTTT"]
    assert any("Paper mode needs a few-shot prompt" in c.value for c in at.caption)


def test_manual_heads_and_missing_scores():
    at = _app(NEEDLE)
    at.radio(key="qttt_head_mode").set_value("Top-k by head scores").run()
    assert not at.exception and any("No head scores" in i.value for i in at.info)
    at.session_state["head_scores"] = HeadScores("q", "Query-Aware", {(2, 1): 3.0, (0, 0): 1.0, (1, 3): 2.0})
    at.run()
    at.slider(key="qttt_topk").set_value(2).run()
    assert any("L2.qH1, L1.qH3" in c.value for c in at.caption)
    at.radio(key="qttt_head_mode").set_value("Manual").run()
    at.multiselect(key="qttt_manual_q").set_value(["L1.qH2"]).run()
    at.number_input(key="qttt_steps").set_value(2)
    at.number_input(key="qttt_span").set_value(16)
    at.button(key="qttt_run").click().run()
    assert not at.exception
    res = at.session_state["qttt_result"]
    assert res["settings"]["heads"] == [(1, 2)]
    norms = np.array([r["delta_norms"] for r in res["records"]])
    assert np.all(norms[:, [0, 2]] == 0) and np.all(norms[1:, 1] > 0)
