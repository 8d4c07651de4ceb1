"""AppTest: the sidebar survives a 1 MB paste (issue 15.5). The prompt is refused from its length
alone, with a message giving its length, the limit and the outcome, on Home and on Spectrum & SNR;
nothing parses or tokenises it on any rerun, and a shorter prompt works again afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import pages.common as common
from ttt_core.prompts import MAX_PROMPT_CHARS

APP = str(Path(__file__).resolve().parents[2] / "app.py")
TINY = "tiny-random-llama"
MB = 1 << 20
# 1 MiB of a long context that would otherwise be valid (a question at the end)
QUESTION = "\nQuestion: Which mill?"
BIG = ("The river bends twice before it reaches the old mill. " * (MB // 50))[: MB - len(QUESTION)] + QUESTION
SHORT = "a -> 1\nb -> 2\nc ->"


@pytest.fixture
def calls(monkeypatch):
    """Counts the parses and tokenisations get_prompt does (pages.common's own names)."""
    n = {"parse": 0, "fit": 0}
    real_parse, real_fit = common.parse_prompt, common.fit_to_token_limit

    def parse(*a, **k):
        n["parse"] += 1
        return real_parse(*a, **k)

    def fit(*a, **k):
        n["fit"] += 1
        return real_fit(*a, **k)

    monkeypatch.setattr(common, "parse_prompt", parse)
    monkeypatch.setattr(common, "fit_to_token_limit", fit)
    return n


def _app(prompt: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["model_name"] = TINY
    at.session_state["model_preset"] = TINY
    if prompt is not None:
        at.session_state["prompt_text"] = prompt
    return at


def _refusals(at: AppTest) -> list[str]:
    return [e.value for e in at.error if "characters" in e.value and "refused" in e.value]


def _assert_refused(at: AppTest) -> None:
    assert not at.exception, at.exception
    msgs = _refusals(at)
    # the page's message (get_prompt) and the one under the box (sidebar)
    assert len(msgs) >= 2, [e.value for e in at.error]
    for m in msgs:
        assert f"{len(BIG):,} characters" in m and f"{MAX_PROMPT_CHARS:,}" in m and "1.0 MB" in m
    assert any(e.value in msgs for e in at.sidebar.error)                 # next to the box


def test_1mb_prompt_on_home_is_refused_with_a_message_and_not_tokenised(calls):
    # would catch: a traceback or an unclear message for a 1 MB prompt, or parsing / tokenising it
    # on each rerun instead of refusing it from its length
    at = _app(BIG).run()
    assert len(BIG) == MB
    _assert_refused(at)
    assert not at.get("html")                       # no token view of the refused prompt
    at.run()                                        # a rerun (any widget click) does no work on it either
    _assert_refused(at)
    assert calls == {"parse": 0, "fit": 0}


def test_1mb_prompt_on_spectrum_page_is_refused(calls):
    # would catch: the Spectrum & SNR page crashing or computing a kernel on a refused prompt
    at = _app(BIG).run()
    at.switch_page("pages/spectrum.py").run()
    _assert_refused(at)
    assert not at.metric and calls["fit"] == 0


def test_1mb_paste_into_the_box_then_a_short_prompt_works_again(calls):
    # would catch: the paste path (the text area's on_change) failing differently from a prompt set
    # elsewhere, or the app staying stuck after the refusal
    at = _app().run()
    assert not at.exception
    box = next(t for t in at.text_area if t.label == "Prompt")
    box.set_value(BIG).run()
    _assert_refused(at)
    assert at.session_state["prompt_text"] == BIG   # kept in the box, so the user can see what was refused
    box = next(t for t in at.text_area if t.label == "Prompt")
    box.set_value(SHORT).run()
    assert not at.exception and not _refusals(at)
    assert any("few-shot" in m.value for m in at.markdown)
    assert calls["parse"] >= 1 and calls["fit"] >= 1  # the counters see get_prompt's calls (not vacuous)


def test_long_but_allowed_prompt_is_tokenised_once_across_reruns(calls):
    # would catch: a long context under the character limit being tokenised again on every rerun
    # (~0.75 s per rerun for 380k characters with the tiny model), and the cut warning disappearing
    text = BIG[: MAX_PROMPT_CHARS - 100] + QUESTION
    at = _app(text).run()
    assert not at.exception and not _refusals(at)
    warn = [w.value for w in at.warning if "over the limit" in w.value and "were cut" in w.value]
    assert warn, [w.value for w in at.warning]
    n_fit = calls["fit"]
    assert n_fit == 1
    at.run()
    assert not at.exception and calls["fit"] == n_fit
    assert [w.value for w in at.warning if "were cut" in w.value] == warn
    at.session_state["max_tokens"] = 1024             # a new limit: fitted again, once
    at.run()
    assert not at.exception and calls["fit"] == n_fit + 1


def test_a_token_limit_above_the_models_positions_is_capped_with_a_message():
    """The sidebar cannot know the model's maximum positions before it loads: get_prompt caps the
    limit at max_position_embeddings (2,048 for the tiny models) and says so."""
    long_ctx = "The mill stands by the river. " * 400 + "\nQuestion: Where is the mill?"
    at = _app(long_ctx)
    at.session_state["max_tokens"] = 32768
    at.run()
    assert not at.exception, at.exception
    infos = [i.value for i in at.info if "positions" in i.value]
    assert infos and "2,048" in infos[0] and "32,768" in infos[0]
    # the prompt was fitted to 2,048 tokens: the truncation is shown
    assert any("2,048" in w.value or "2048" in w.value for w in at.warning), [w.value for w in at.warning]
