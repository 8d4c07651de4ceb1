"""ttt_core.share: prompts and views in links (GitHub issue 11, point 3). Pure, no Streamlit."""

from __future__ import annotations

import base64
import random
import zlib

import pytest

from ttt_core.share import (
    BLOCK_LABEL,
    BOOL,
    MAX_ENCODED_CHARS,
    MAX_PROMPT_CHARS,
    PROMPT_VERSION,
    Field,
    PromptTooLong,
    ShareError,
    View,
    check_model,
    choice_field,
    decode_prompt,
    encode_prompt,
    float_field,
    format_number,
    int_field,
    make_link,
    read_view,
    view_params,
)

FEWSHOT = "6->5\n6->5\n8->7\n5->4\n7->6\n2->1\n0->9\n3->2\n2->\n# answer: 1"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _prose(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["river", "mill", "orchard", "sheep", "secret", "number", "Question:", "the", "of", "bends", "4821",
             "Answer:", "needle", "haystack", "ünïcödé", "→", "λ⋆", "\n"]
    out = []
    while sum(len(w) + 1 for w in out) < n:
        out.append(rng.choice(words))
    return " ".join(out)[:n]


@pytest.mark.parametrize("text", [FEWSHOT, "", "x", "Ω≈ç√∫ 漢字 🙂\n\ttabs and\r\nCRLF", _prose(2500), _prose(MAX_PROMPT_CHARS)])
def test_round_trip(text):
    value = encode_prompt(text)
    assert value.startswith(PROMPT_VERSION + ".")
    assert len(value) <= MAX_ENCODED_CHARS
    assert all(c.isalnum() or c in "._-" for c in value)      # nothing a URL must escape
    assert decode_prompt(value) == text
    assert encode_prompt(text) == value                         # deterministic: same prompt, same link


def test_a_few_thousand_characters_travel_compressed():
    text = _prose(4000)
    value = encode_prompt(text)
    assert len(value) < len(text)


def test_too_many_characters_are_refused_with_the_file_download_hint():
    with pytest.raises(PromptTooLong, match="file download"):
        encode_prompt("a" * (MAX_PROMPT_CHARS + 1))


def test_incompressible_prompt_over_the_encoded_limit_is_refused():
    rng = random.Random(1)
    text = "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(3000))  # 9 kB of UTF-8, random
    with pytest.raises(PromptTooLong, match="once compressed"):
        encode_prompt(text)


@pytest.mark.parametrize("value, match", [
    ("", "empty"),
    ("eNoz07Uz5TIDERa6", "no version prefix"),
    ("2." + _b64(zlib.compress(b"hi")), "format version '2'"),
    ("1.abc$%^", "not URL-safe base64"),
    ("1.A", "not valid base64"),
    ("1." + _b64(b"not zlib at all"), "not valid compressed data"),
    ("1." + _b64(zlib.compress(b"6->5\n" * 100))[:-12], "incomplete|not valid"),
    ("1." + _b64(zlib.compress(b"\xff\xfe\xfa")), "not UTF-8"),
    ("1." + "A" * (MAX_ENCODED_CHARS + 10), "at most"),
])
def test_garbage_is_refused_with_a_reason(value, match):
    with pytest.raises(ShareError, match=match):
        decode_prompt(value)


def test_zip_bomb_is_cut_off_not_inflated():
    bomb = "1." + _b64(zlib.compress(b"\0" * (50 * 1024 * 1024), 9))  # 50 MB of zeros in ~70 kB
    assert len(bomb) > MAX_ENCODED_CHARS
    with pytest.raises(ShareError):
        decode_prompt(bomb)
    small_bomb = "1." + _b64(zlib.compress(b"a" * (MAX_PROMPT_CHARS * 4 + 100), 9))  # fits the length limit
    assert len(small_bomb) < MAX_ENCODED_CHARS
    with pytest.raises(ShareError, match="unpacks to more than"):
        decode_prompt(small_bomb)


def test_check_model():
    presets = ["SmolLM2-135M-Instruct (embedded)", "tiny-random-llama"]
    assert check_model("tiny-random-llama", presets) == "tiny-random-llama"
    assert check_model(" HuggingFaceTB/SmolLM2-360M ", presets) == "HuggingFaceTB/SmolLM2-360M"
    for bad in ["/etc/passwd", "../models/x", "a/../b", "./local", "~/m", "C:\\models", "x" * 300, "", "a/b/c"]:
        with pytest.raises(ShareError):
            check_model(bad, presets)


def test_fields():
    assert int_field(1, 200).check("12") is None
    assert "whole number from 1 to 200" in int_field(1, 200).check("201")
    assert int_field(1, 200).check("1e9") and int_field(1, 200).check("12.5") and int_field(1, 200).check("")
    assert float_field(0.05, 0.95).check("0.30000000000000004") is None
    assert float_field(0.05, 0.95).check("nan") and float_field(0.05, 0.95).check("inf")
    assert float_field(0.05, 0.95).check("zz") and float_field(0.05, 0.95).check("1.5")
    sub = choice_field({"q": "W_Q per head", "v": "W_V per kv head"})
    assert sub.to_url("v") == "W_V per kv head" and sub.check("W_V per kv head") is None and sub.check("v")
    lr = choice_field([1e-4, 1e-3], lambda v: f"{v:.0e}")
    assert lr.to_url(1e-3) == "1e-03" and lr.check("1e-03") is None
    assert BOOL.to_url(False) == "false" and BOOL.check("TRUE") is None and BOOL.check("yes")
    block = Field("label", pattern=BLOCK_LABEL)
    for ok in ["Full kernel", "L1.vH2", "L12.qH0", "L3 mlp_up", "L3.mlp_down"]:
        assert block.check(ok) is None, ok
    for bad in ["L1.vH2; DROP", "<script>", "L1.vH2" + "0" * 300]:
        assert block.check(bad)
    heads = Field("labels", pattern=BLOCK_LABEL)
    assert heads.to_url(["L0.qH1", "L1.qH2"]) == ["L0.qH1", "L1.qH2"] and heads.check(["L0.qH1", "L1.qH2"]) is None
    assert int_field(1, 9).check(["1", "2"]) == "given more than once"
    assert [format_number(x) for x in (5.0, 0.25, 12, True, 0.1 + 0.2)] == ["5", "0.25", "12", "true",
                                                                              "0.30000000000000004"]


FIELDS = {"spec_T": int_field(1, 200), "spec_subspace": choice_field({"q": "W_Q", "v": "W_V"})}
EXAMPLES = ["Digit shift, clean labels", "Key–value recall"]
PRESETS = ["SmolLM2-135M-Instruct (embedded)", "tiny-random-llama"]


def test_view_round_trip_through_params():
    view = View(model="tiny-random-llama", prompt=FEWSHOT, max_tokens=512,
                settings={"spec_T": "12", "spec_subspace": "W_V"})
    params = view_params(view)
    assert list(params)[:3] == ["model", "p", "tok"]
    back, problems = read_view(params, examples=EXAMPLES, presets=PRESETS, fields=FIELDS)
    assert problems == [] and back == view
    ex = View(model="tiny-random-llama", example="Key–value recall")
    assert read_view(view_params(ex), examples=EXAMPLES, presets=PRESETS, fields=FIELDS) == (ex, [])
    link = make_link("http://host:8501/spectrum", params)
    assert link.startswith("http://host:8501/spectrum?model=tiny-random-llama&p=1.")


def test_read_view_keeps_what_it_can_and_says_what_it_cannot():
    params = {"model": "/etc", "p": "1.garbage!", "tok": "99999999", "spec_T": "zz", "spec_subspace": "W_V",
              "unrelated": "x"}
    view, problems = read_view(params, examples=EXAMPLES, presets=PRESETS, fields=FIELDS)
    assert view == View(settings={"spec_subspace": "W_V"})
    text = "\n".join(problems)
    assert len(problems) == 4
    assert "local folders do not travel" in text and "showing the default example" in text
    assert "token limit" in text and "spec_T='zz' is ignored (expected a whole number from 1 to 200)" in text
    view, problems = read_view({"ex": "No such example"}, examples=EXAMPLES, presets=PRESETS, fields=FIELDS)
    assert view == View() and "not one of the curated examples" in problems[0]


def test_too_long_prompt_refused_by_view_params():
    with pytest.raises(PromptTooLong):
        view_params(View(prompt="x" * (MAX_PROMPT_CHARS + 1)))
