"""AppTest: the shell (navigation, sidebar) and the Home page."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[2] / "app.py")


def _app(model: str = "tiny-random-llama", prompt: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    at.session_state["model_name"] = model
    at.session_state["model_preset"] = model if model.startswith("tiny-random-") else "Other: hub id or local folder…"
    if prompt is not None:
        at.session_state["prompt_text"] = prompt
    return at.run()


def test_home_shows_model_card_kind_and_tokens():
    at = _app()
    assert not at.exception
    labels = [m.label for m in at.metric]
    assert labels[:6] == ["Parameters", "Layers", "Heads", "KV heads", "dtype", "Device"]
    assert [m.value for m in at.metric][1:4] == ["3", "4", "2"]
    assert any("few-shot" in m.value for m in at.markdown)
    token_html = at.get("html")[0].proto.body
    assert 'class="token-view"' in token_html and token_html.count('class="tok"') > 20


def test_example_picker_switches_prompt_and_kind():
    at = _app()
    at.selectbox(key="example").set_value("Needle in a haystack, short").run()
    assert not at.exception
    box = next(t for t in at.text_area if t.label == "Prompt")
    assert "secret number" in box.value and "secret number" in at.session_state["prompt_text"]
    assert any("long context + question" in m.value for m in at.markdown)
    assert any(m.label == "Marked needles" and m.value == "1" for m in at.metric)
    # needle tokens are outlined in the token view
    assert "2px solid" in at.get("html")[0].proto.body


def test_editing_the_prompt_box_changes_the_prompt_and_outside_changes_refresh_the_box():
    at = _app()
    box = next(t for t in at.text_area if t.label == "Prompt")
    box.set_value("a -> 1\nb -> 2\nc ->").run()
    assert not at.exception and at.session_state["prompt_text"] == "a -> 1\nb -> 2\nc ->"
    assert any("few-shot" in m.value for m in at.markdown)
    at.session_state["prompt_text"] = "x -> 3\ny -> 4\nz ->"       # as the tour / a test sets it
    at.run()
    box = next(t for t in at.text_area if t.label == "Prompt")
    assert box.value == "x -> 3\ny -> 4\nz ->"                    # a new box shows the new text


@pytest.mark.parametrize(
    "prompt, message",
    [("", "empty"), ("1 -> 2\n3 -> 4\nnot a demo line\n5 -> 6\n7 ->", "not 'x -> y'")],
)
def test_bad_prompts_show_errors_and_app_stays_up(prompt, message):
    at = _app(prompt=prompt)
    assert not at.exception
    assert any(message in e.value for e in at.error)
    assert [m.label for m in at.metric][:1] == ["Parameters"]  # the model card still shows


def test_unloadable_model_shows_readable_error():
    at = _app(model="/no/such/model/folder")
    assert not at.exception
    assert any("No folder" in e.value for e in at.error)


def test_over_limit_long_prompt_is_cut_with_visible_warning():
    at = _app(prompt=("word " * 3000) + "\nQuestion: what?\nAnswer: word")
    assert not at.exception
    assert any("over the limit" in w.value for w in at.warning)


def test_sessions_are_independent():
    a = _app(prompt="1 -> 2\n2 -> 3\n3 ->")
    b = _app(prompt="Some context here.\nQuestion: what?")
    assert any("few-shot" in m.value for m in a.markdown)
    assert any("long context" in m.value for m in b.markdown)
    a.run()
    assert any("few-shot" in m.value for m in a.markdown)


def test_answer_button_generates():
    at = _app()
    at.button(key="answer_btn").click().run()
    assert not at.exception
    assert any(m.value.startswith("**Model's answer:**") for m in at.markdown)


def test_tour_loads_examples():
    at = _app()
    assert any("Guided tour" in e.label for e in at.expander)
    at.button(key="tour_load_1").click().run()
    assert not at.exception
    assert at.session_state["example"] == "Digit shift, noisy labels (p = 0.55)"
    assert at.session_state["prompt_text"].startswith(open(Path(APP).parent / "assets/examples/digit_shift_noisy.txt").read()[:20])
    at.button(key="tour_load_4").click().run()
    assert any("long context + question" in m.value for m in at.markdown)
