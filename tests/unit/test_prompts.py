"""Prompt parsing and generators."""

from __future__ import annotations

import numpy as np
import pytest

from ttt_core.generators import digit_shift_task, kv_recall, needle_haystack
from ttt_core.prompts import FewShotPrompt, LongContextPrompt, PromptParseError, parse_prompt


def test_parse_few_shot_arrow():
    p = parse_prompt("3 -> 5\n8 -> 0\n1 -> 3\n6 ->\n# answer: 8\n")
    assert isinstance(p, FewShotPrompt)
    assert p.demos == [("3", "5"), ("8", "0"), ("1", "3")]
    assert p.query_x == "6" and p.query_y == "8" and p.sep == "->" and p.spaced
    assert p.render() == "3 -> 5\n8 -> 0\n1 -> 3\n6 ->"
    assert p.loo_prompts()[1] == "3 -> 5\n1 -> 3\n8 ->"
    assert p.label_values()["8"] == pytest.approx(8 / 9)


def test_parse_few_shot_colon_words():
    p = parse_prompt("great movie: positive\nawful plot: negative\nloved it: positive\nboring:")
    assert isinstance(p, FewShotPrompt) and p.sep == ":"
    assert p.labels == ["negative", "positive"] and not p.numeric and p.frame == "probability"
    # categorical labels carry no order: every output's target is its own label's probability, 1
    assert p.label_values() == {"negative": 1.0, "positive": 1.0}
    assert p.query_y is None


def test_few_shot_round_trip_of_generated_task():
    for seed in range(5):
        t = digit_shift_task(seed)
        p2 = parse_prompt(t.prompt.to_text())
        assert isinstance(p2, FewShotPrompt)
        assert p2.demos == t.prompt.demos and p2.query_x == t.prompt.query_x and p2.query_y == t.prompt.query_y
        assert p2.render() == t.prompt.render()


@pytest.mark.parametrize(
    "text, msg",
    [
        ("", "empty"),
        ("   \n  ", "empty"),
        ("3 -> 5\n8 -> 0\nthis line is broken\n1 -> 3\n6 ->", "line 3"),
        ("3 -> 5\n8 : 0\n1 -> 3\n6 ->", "Mixed separators"),
        ("3 -> 5\n8 -> 0\n1 -> 3\n6 -> 2", "query"),
        ("3 -> 5\n8 ->\n1 -> 3\n6 ->", "no label"),
        ("Some context.\nQuestion:\n", "empty"),
        ("a <needle>b\nQuestion: what?", "Unbalanced"),
    ],
)
def test_parse_errors_are_clear(text, msg):
    with pytest.raises(PromptParseError, match=msg):
        parse_prompt(text)


def test_parse_huge_prompt_refused():
    with pytest.raises(PromptParseError, match="limit"):
        parse_prompt("word " * 100, max_chars=100)


def test_parse_long_context_with_needle_and_answer():
    text = "Filler one. <needle>The secret number is 4242.</needle> Filler two.\nQuestion: What is the secret number?\nAnswer: 4242"
    p = parse_prompt(text)
    assert isinstance(p, LongContextPrompt)
    assert p.question == "What is the secret number?" and p.answer == "4242"
    (s, e), = p.needle_spans
    assert p.context[s:e] == "The secret number is 4242."
    assert p.full_text().endswith("Question: What is the secret number?\nAnswer:")
    again = parse_prompt(p.to_text())
    assert again == p


def test_free_text_is_long_context_without_question():
    p = parse_prompt("Once upon a time there was a village.\nIt had a mill: old and grey, by the river and the road.")
    assert isinstance(p, LongContextPrompt) and p.question is None and p.query_text() == ""


def test_digit_shift_generator_statistics():
    rng = np.random.default_rng(0)
    clean = [digit_shift_task(rng, noise=0.0) for _ in range(50)]
    for t in clean:
        assert all((int(x) + t.shift) % 10 == int(y) for x, y in t.prompt.demos)
        assert int(t.prompt.query_y) == (int(t.prompt.query_x) + t.shift) % 10
        assert len(t.prompt.demos) == 10
    noisy = [digit_shift_task(rng, noise=0.55) for _ in range(200)]
    wrong = np.mean([(int(x) + t.shift) % 10 != int(y) for t in noisy for x, y in t.prompt.demos])
    assert 0.40 < wrong < 0.60  # 0.55 · 9/10 ≈ 0.495 of labels differ from the clean label
    templates = {digit_shift_task(s).template for s in range(40)}
    assert templates == {0, 1}
    assert digit_shift_task(3, template=1).prompt.render().count(":") == 11  # 10 demos + query
    assert digit_shift_task(3, template=0).prompt.render().splitlines()[0].count("->") == 1
    assert " " not in digit_shift_task(3, template=0).prompt.render()


def test_needle_and_kv_generators():
    p = needle_haystack(1, n_words=200, position=0.25)
    (s, e), = p.needle_spans
    assert p.context[s:e] == f"The secret number is {p.answer}."
    assert 0.1 < s / len(p.context) < 0.4
    assert len(p.context.split()) >= 200
    assert needle_haystack(1, n_words=200, position=1.0).context.endswith(f"{needle_haystack(1, n_words=200, position=1.0).answer}.")
    kv = kv_recall(2, n_pairs=8)
    (s, e), = kv.needle_spans
    assert kv.context[s:e].endswith(kv.answer) and kv.context.count("\n") == 7
    with pytest.raises(ValueError):
        needle_haystack(0, position=1.5)


def test_label_set_never_contains_only_the_query_answer():
    """The query's true label must not enter the label set (it would leak into the restricted
    softmax); digit labels use all ten digits as in the paper."""
    p = parse_prompt("great -> positive\nawful -> negative\nmeh ->\n# answer: neutral")
    assert p.labels == ["negative", "positive"]
    # a categorical answer no demonstration shows is still scored: p(true answer), target 1
    assert p.target_value("neutral") == 1.0 and p.target_value("positive") == 1.0 and p.query_note() is None
    d = parse_prompt("1 -> 3\n2 -> 4\n5 ->\n# answer: 7")
    assert d.labels == [str(i) for i in range(10)]
    assert d.target_value("7") == pytest.approx(7 / 9)
    n = parse_prompt("1 -> 10\n2 -> 20\n3 -> 40\n4 ->\n# answer: 25")
    assert n.labels == ["10", "20", "40"] and n.target_value("25") == pytest.approx(0.5)
    # the one case left without a query error: a numeric answer that cannot be placed on the scale
    w = parse_prompt("1 -> 10\n2 -> 20\n3 ->\n# answer: thirty")
    assert w.target_value("thirty") is None and "cannot be placed on the numeric label scale" in w.query_note()
