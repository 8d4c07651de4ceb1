"""AppTest: the Heads & blocks page, run through app.py so the shared sidebar runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from tests.app.plotly_json import chart, decode
from tests.app.test_spectrum_page import FEWSHOT
from ttt_core.prompt_kernel import compute_prompt_kernel
from ttt_core.models import load_model
from ttt_core.prompts import parse_prompt
from ttt_core.scores import score_blocks
from ttt_core.spectrum import compute_spectrum

APP = str(Path(__file__).resolve().parents[2] / "app.py")


def run_page(model: str, prompt: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["model_name"] = model
    at.session_state["model_preset"] = model if model.startswith("tiny-random-") else "Other: hub id or local folder…"
    at.session_state["prompt_text"] = prompt
    at.run()
    at.switch_page("pages/heads.py").run()
    assert not at.exception, at.exception
    return at


def heat(at: AppTest, name: str) -> np.ndarray:
    return decode(chart(at, f"heads_heat_{name}")["data"][0]["z"])


def test_heads_page_heatmaps_match_scores_tiny():
    at = run_page("tiny-random-llama", FEWSHOT)
    lm = load_model("tiny-random-llama")
    ev = compute_prompt_kernel(lm, parse_prompt(FEWSHOT), "q")
    sc = score_blocks(ev, greedy_budget=4)
    np.testing.assert_allclose(heat(at, "Query-Aware"), sc.query_aware, rtol=1e-6)
    np.testing.assert_allclose(heat(at, "Trace"), sc.trace, rtol=1e-6)
    np.testing.assert_allclose(heat(at, "Kernel share"), sc.share, rtol=1e-6)
    greedy = heat(at, "Greedy rank")
    assert np.nansum(greedy > 0) == 4
    assert [tuple(map(int, np.argwhere(greedy == k)[0])) for k in (1, 2, 3, 4)] == [s.block for s in sc.greedy]
    # ranked table + recommendation
    df = at.dataframe[0].value
    assert list(df["block"][:3]) == [r["block"] for r in sc.ranked("Query-Aware", 3)]
    at.number_input(key="heads_topk").set_value(2).run()
    assert any("Recommended 2 block(s)" in s.value for s in at.success)


def test_heads_page_drill_down_by_selectbox():
    at = run_page("tiny-random-llama", FEWSHOT)
    at.selectbox(key="heads_pick").set_value("L2.qH3").run()
    assert not at.exception
    lm = load_model("tiny-random-llama")
    ev = compute_prompt_kernel(lm, parse_prompt(FEWSHOT), "q")
    rep = compute_spectrum(ev.head_kernel(2, 3), ev.residuals, ev.head_couplings[2, 3])
    lam_plot = decode(chart(at, "heads_block_spectrum")["data"][0]["y"])
    np.testing.assert_allclose(lam_plot, np.where(rep.lam > 1e-300, rep.lam, np.nan), rtol=1e-6, equal_nan=True)
    att = chart(at, "heads_attention")["data"][0]
    assert len(att["x"]) == len(ev.tokens)  # the whole short prompt, tokens labelled
    P = decode(att["z"])
    np.testing.assert_allclose(P.sum(1), 1.0, atol=1e-5)
    # selected block highlighted on the heatmaps
    sel = chart(at, "heads_heat_Trace")["data"][2]          # [heatmap, clickable cells, selected]
    assert (decode(sel["x"])[0], decode(sel["y"])[0]) == (3, 2)
    share = decode(chart(at, "heads_share")["data"][0]["y"])
    sc = score_blocks(ev)
    np.testing.assert_allclose(share, sc.share[2], rtol=1e-6)


def test_heads_page_mlp_and_errors():
    at = run_page("tiny-random-neox", FEWSHOT)
    at.selectbox(key="heads_subspace").set_value("mlp_down").run()
    assert not at.exception
    assert any("no attention pattern" in i.value for i in at.info)
    at = run_page("tiny-random-llama", "good film: good\ngreat film: great\nbad film: bad\nnice film:")
    assert any("share their first token" in e.value for e in at.error)


@pytest.mark.smollm2
def test_heads_page_smollm2_default_model():
    at = run_page("SmolLM2-135M-Instruct (embedded)", FEWSHOT)
    qa = heat(at, "Query-Aware")
    assert qa.shape == (30, 9)
    lm = load_model()
    sc = score_blocks(compute_prompt_kernel(lm, parse_prompt(FEWSHOT), "q"))
    np.testing.assert_allclose(qa, sc.query_aware, rtol=1e-4)


def test_heads_page_publishes_scores_for_live_qttt():
    """The ranked scores reach Live qTTT's top-k head selection through this session's state."""
    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["model_name"] = "tiny-random-llama"
    at.session_state["model_preset"] = "tiny-random-llama"
    at.run()
    at.switch_page("pages/heads.py").run()
    assert not at.exception
    hs = at.session_state["head_scores"]
    assert hs.subspace == "q" and len(hs.scores) == 3 * 4
    assert all(isinstance(k, tuple) and len(k) == 2 for k in hs.scores)
