"""AppTest: links that reopen a view (GitHub issue 11, point 3). Tiny random models only.

A session started with query parameters shows the link's model, prompt and page settings; the
"Copy link" of one session, opened as a new session, shows the same numbers; a bad link opens the
default view with a message; a prompt too long for a link is refused with the file download."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from streamlit.testing.v1 import AppTest

from pages.links import FIELDS, LIVE_LRS, STEPS_BETAS
from tests.app.test_spectrum_page import FEWSHOT
from ttt_core.examples import DEFAULT_EXAMPLE, load_example
from ttt_core.models import load_model
from ttt_core.prompt_kernel import SUBSPACES, compute_prompt_kernel
from ttt_core.prompts import parse_prompt
from ttt_core.share import MAX_PROMPT_CHARS, encode_prompt
from ttt_core.spectrum import kernel_spectrum

APP = str(Path(__file__).resolve().parents[2] / "app.py")
MODEL = "tiny-random-llama"
WIDGETS = ("selectbox", "number_input", "slider", "select_slider", "checkbox", "radio", "multiselect")


def open_link(params: dict, page: str | None) -> AppTest:
    """A fresh session whose URL carries `params`, on `page` (None: Home)."""
    at = AppTest.from_file(APP, default_timeout=300)
    at.query_params.update(params)
    at.run()
    if page:
        at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def copied_link(at: AppTest) -> str:
    at.button(key="link_copy").click().run()
    assert not at.exception, at.exception
    codes = [c.value for c in at.code if "?" in c.value]
    assert len(codes) == 1, [c.value for c in at.code]
    return codes[0]


def link_params(link: str) -> dict:
    return {k: v[0] if len(v) == 1 else v for k, v in parse_qs(urlsplit(link).query, keep_blank_values=True).items()}


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def widget_keys(at: AppTest) -> set[str]:
    return {w.key for kind in WIDGETS for w in getattr(at, kind) if w.key}


def test_session_started_with_query_params_shows_the_prompt_and_settings():
    params = {"model": MODEL, "p": encode_prompt(FEWSHOT), "spec_subspace": SUBSPACES["v"], "spec_T": "12",
              "spec_c": "0.25", "spec_block": "L1.vH0"}
    at = open_link(params, "pages/spectrum.py")
    assert at.session_state["model_name"] == MODEL and at.session_state["prompt_text"] == FEWSHOT
    assert [t.value for t in at.text_area if t.label == "Prompt"] == [FEWSHOT]   # the sidebar shows the prompt
    assert at.selectbox(key="model_preset").value == MODEL
    assert at.selectbox(key="spec_subspace").value == "v"
    assert at.number_input(key="spec_T").value == 12
    assert at.slider(key="spec_c").value == pytest.approx(0.25)
    assert at.selectbox(key="spec_block").value == "L1.vH0"
    rep = kernel_spectrum(compute_prompt_kernel(load_model(MODEL), parse_prompt(FEWSHOT), "v"), (1, 0), T=12, c=0.25)
    m = metrics(at)
    assert m["λ⋆ = σ²/τ²"] == f"{rep.lam_star:.3g}" and m["P(TTT beats ICL at T=12)"] == f"{rep.prob:.2f}"
    assert not at.warning or all("could not be opened" not in w.value for w in at.warning)


def test_copied_link_reopens_the_same_numbers_on_spectrum_and_heads():
    at = open_link({"model": MODEL, "ex": "Digit shift, noisy labels (p = 0.55)"}, "pages/spectrum.py")
    at.selectbox(key="spec_subspace").set_value("v").run()
    at.number_input(key="spec_T").set_value(5).run()
    at.session_state["prompt_text"] = FEWSHOT   # an edited prompt (not an example) must travel too
    at.run()
    assert not at.exception, at.exception
    before = metrics(at)
    link = copied_link(at)
    assert urlsplit(link).path == "/spectrum"
    params = link_params(link)
    assert params["model"] == MODEL and params["p"].startswith("1.") and "ex" not in params
    assert params["spec_subspace"] == SUBSPACES["v"] and params["spec_T"] == "5"
    again = open_link(params, "pages/spectrum.py")
    assert metrics(again) == before
    assert again.session_state["prompt_text"] == FEWSHOT
    # Heads: the drill-down pick travels, and the ranking is the same
    at.switch_page("pages/heads.py").run()
    at.selectbox(key="heads_pick").set_value("L1.qH2").run()
    at.number_input(key="heads_budget").set_value(2).run()
    link = copied_link(at)
    params = link_params(link)
    assert params["heads_pick"] == "L1.qH2" and params["heads_budget"] == "2"
    again = open_link(params, "pages/heads.py")
    assert again.selectbox(key="heads_pick").value == "L1.qH2"
    assert [s.value for s in again.success] == [s.value for s in at.success]
    assert metrics(again) == metrics(at)
    assert again.dataframe[0].value.equals(at.dataframe[0].value)


def test_example_travels_by_name():
    at = open_link({"model": MODEL, "ex": "Key–value recall"}, None)
    assert at.session_state["example"] == "Key–value recall"
    assert at.session_state["prompt_text"] == load_example("Key–value recall")
    assert at.query_params["ex"] == "Key–value recall" and at.query_params["model"] == MODEL
    params = link_params(copied_link(at))
    assert params["ex"] == "Key–value recall" and "p" not in params


def test_bad_link_opens_the_default_view_with_a_message(monkeypatch):
    monkeypatch.setenv("TTT_LENS_MODEL", MODEL)   # the default model this link falls back to: tiny
    at = open_link({"model": "/etc/passwd", "p": "1.not-a-prompt!!", "spec_T": "zz", "tok": "-3"},
                   "pages/spectrum.py")
    text = "\n".join(w.value for w in at.warning)
    assert "This link could not be opened as it was" in text
    assert "local folders do not travel" in text and "showing the default example" in text
    assert "spec_T='zz' is ignored" in text and "token limit" in text
    assert at.session_state["prompt_text"] == load_example(DEFAULT_EXAMPLE)
    assert at.session_state["max_tokens"] == 2048
    assert "p" not in at.query_params                            # the URL shows the view actually open
    at.button(key="link_dismiss").click().run()
    assert not any("could not be opened" in w.value for w in at.warning)


def test_too_long_prompt_is_refused_with_the_file_download():
    at = open_link({"model": MODEL}, None)
    at.session_state["prompt_text"] = FEWSHOT + "\n# " + "x" * MAX_PROMPT_CHARS
    at.run()
    link = copied_link(at)
    assert any("too long for a link" in w.value and "file download" in w.value for w in at.warning)
    assert at.get("download_button")
    assert "p" not in link_params(link) and "p" not in at.query_params


def test_fields_match_the_page_widgets():
    """Every FIELDS key is a widget on its page, and the option lists mirrored here agree."""
    at = open_link({"model": MODEL, "p": encode_prompt(FEWSHOT)}, "pages/spectrum.py")
    assert set(FIELDS["spectrum"]) - {"spec_maxpos"} <= widget_keys(at)   # max positions: long context only
    at.switch_page("pages/heads.py").run()
    assert set(FIELDS["heads"]) <= widget_keys(at)
    at.switch_page("pages/live_qttt.py").run()
    assert at.select_slider(key="qttt_lr").options == [f"{v:.0e}" for v in LIVE_LRS]
    qttt_keys = widget_keys(at)
    at.radio(key="qttt_mode").set_value("Paper mode (LOO gradient descent)").run()
    at.radio(key="qttt_head_mode").set_value("Manual").run()
    assert set(FIELDS["live_qttt"]) - {"qttt_topk", "qttt_manual_q"} <= qttt_keys | widget_keys(at)
    steps = open_link({"model": MODEL, "p": encode_prompt(FEWSHOT), "steps_measure": "false", "steps_grid": "3"},
                      "pages/steps_bounds.py")
    assert set(FIELDS["steps_bounds"]) <= widget_keys(steps)
    assert steps.number_input(key="steps_grid").value == 3 and steps.checkbox(key="steps_measure").value is False
    assert steps.select_slider(key="steps_beta").options == [str(b) for b in STEPS_BETAS]
