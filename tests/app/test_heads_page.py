"""AppTest: the Heads & blocks page, run through app.py so the shared sidebar runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from tests.app.plotly_json import chart, decode
from tests.app.test_spectrum_page import FEWSHOT
from ttt_core.models import load_model
from ttt_core.prompt_kernel import compute_prompt_kernel
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


@pytest.mark.parametrize("patched_c", [None, 0.37])
def test_heads_page_greedy_help_names_the_c_and_T_used(monkeypatch, patched_c):
    """The greedy budget's help text names the step fraction c and horizon T that score_blocks gets.

    Would catch: a hard-coded c or T in the help (it said c = 0.5 while GREEDY_C is 0.1; with c patched
    to 0.37 any literal fails), and a page that relies on score_blocks' defaults instead of passing the c
    it names (the spy then sees no greedy_c, or its default bound at import time, 0.1 ≠ 0.37)."""
    import re

    import ttt_core.scores as scores

    if patched_c is not None:
        monkeypatch.setattr(scores, "GREEDY_C", patched_c)
    calls: list[dict] = []
    real = scores.score_blocks

    def spy(ev, *args, **kwargs):
        calls.append(kwargs)
        return real(ev, *args, **kwargs)

    monkeypatch.setattr(scores, "score_blocks", spy)
    at = run_page("tiny-random-llama", FEWSHOT)
    text = at.number_input(key="heads_budget").help
    c_shown = re.search(r"c = ([0-9.eE+-]+)", text)
    T_shown = re.search(r"T = (\d+)", text)
    assert c_shown and T_shown, text
    greedy = [kw for kw in calls if kw.get("greedy_budget", 0) > 0]
    assert greedy, calls
    assert float(c_shown.group(1)) == greedy[-1]["greedy_c"] == scores.GREEDY_C
    assert int(T_shown.group(1)) == greedy[-1]["greedy_T"] == scores.GREEDY_T


def _check_table(at: AppTest):
    tables = [d.value for d in at.dataframe if "subset" in d.value.columns]
    return tables[0] if tables else None


def test_heads_page_check_these_scores_button():
    """The "Check these scores" button runs the real-TTT check on the page's kernel and scores. Catches:
    an exception in the section, the page passing other settings/scores than it shows (the table
    must equal check_scores on the same kernel), no figure or summary, and a stale result shown
    for another subspace (results are keyed by prompt/subspace/settings in the session)."""
    from ttt_core.score_check import check_scores

    at = run_page("tiny-random-llama", FEWSHOT)
    assert _check_table(at) is None and any("Not run yet" in c.value for c in at.caption)
    at.button(key="heads_check_run").click().run()
    assert not at.exception, at.exception
    df = _check_table(at)
    assert df is not None and list(df["subset"]) == ["top-k", "bottom-k"] + [f"random {i}" for i in range(1, 6)]
    lm = load_model("tiny-random-llama")
    prompt = parse_prompt(FEWSHOT)
    ev = compute_prompt_kernel(lm, prompt, "q")
    ref = check_scores(lm, prompt, ev, score_blocks(ev), k=3, steps=4, random_subsets=5)
    assert list(df["blocks"]) == [", ".join(s.blocks) for s in ref.subsets]
    measured = [c for c in df.columns if c.startswith("measured")][0]
    np.testing.assert_allclose(df[measured].to_numpy(float), [s.measured for s in ref.subsets], rtol=1e-5)
    fig = chart(at, "heads_check_fig")
    assert {t["name"] for t in fig["data"]} >= {"top-k", "bottom-k", "random k-subsets", "y = x"}
    assert any(ref.summary == m.value for m in list(at.success) + list(at.info))
    # another subspace: not shown (stale); back to q: this session's result again, without a rerun of TTT
    at.selectbox(key="heads_subspace").set_value("v").run()
    assert not at.exception and _check_table(at) is None
    at.selectbox(key="heads_subspace").set_value("q").run()
    assert _check_table(at) is not None


def test_heads_page_check_not_possible_shows_the_note():
    """W_O cannot be updated by paper GD: the button shows the reason, no table, no exception."""
    at = run_page("tiny-random-llama", FEWSHOT)
    at.selectbox(key="heads_subspace").set_value("o").run()
    at.button(key="heads_check_run").click().run()
    assert not at.exception, at.exception
    assert _check_table(at) is None
    assert any("W_V or W_Q" in w.value for w in at.warning)
