"""Fuzzing the input paths (issue 15.5): `parse_prompt` on any text, the few-shot round trip, and
`python -m ttt_core diagnose` on files that are not a usable prompt.

Property tests use Hypothesis with a bounded `max_examples` and no deadline (2 shared CPU cores).
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ttt_core.cli import main
from ttt_core.prompts import MAX_PROMPT_CHARS, FewShotPrompt, LongContextPrompt, PromptParseError, parse_prompt

ROOT = Path(__file__).resolve().parents[2]
TINY = "tiny-random-llama"
# database=None: no example database is kept between runs (a failure prints its example instead)
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------

# Every code point str allows, lone surrogates included.
ANY_CHAR = st.one_of(st.characters(), st.characters(categories=["Cs"]))
# Pieces that steer the parser into its branches: separators, comments, the answer comment,
# Question/Answer lines, needle markers (open, close, nested), line breaks of every kind,
# control characters, digits and letters.
PIECES = st.sampled_from([
    "->", "=>", ":", " -> ", "->\n", ":\n", "\n", "\r\n", "\r", "\n\n", " ", "\t", "\x0b", "\x0c", "\x1c", "\x85",
    "\u2028", "\u2029", "\x00", "\ud800", "\udfff", "#", "# ", "# answer:", "# answer: 3", "# ANSWER = x\n",
    "Question:", "question: why?\n", "\nQuestion:", "Answer:", "\nAnswer: 42", "<needle>", "</needle>",
    "<needle>a<needle>b</needle>c</needle>", "<needle></needle>", "<nee", "dle>", "0", "1", "9", "x", "é", "İ",
    "\u212a", "²", "١", "nan", "inf", "-1e400", "1e308", "  ", "a b", "😀",
])
STRUCTURED = st.lists(st.one_of(PIECES, st.text(ANY_CHAR, max_size=6)), max_size=60).map("".join)
RANDOM_TEXT = st.text(ANY_CHAR, max_size=300)


def _parse_or_error(text):
    """parse_prompt's contract: a prompt, or PromptParseError with a short one-paragraph message.
    Any other exception escapes and fails the calling test."""
    try:
        p = parse_prompt(text)
    except PromptParseError as exc:
        msg = str(exc)
        # would catch an error that echoes the whole input (a 400k-character message in the app / CLI)
        assert 0 < len(msg) < 1000, msg[:200]
        return None
    assert isinstance(p, (FewShotPrompt, LongContextPrompt))
    p.to_text().encode("utf-8")  # would catch: a prompt no tokenizer accepts (lone surrogates → TypeError)
    return p


def _exercise(p) -> None:
    """What the pages read of a parsed prompt must not raise either (Home shows labels, values, …)."""
    p.to_text()
    if isinstance(p, FewShotPrompt):
        assert p.n >= 1 and p.demos and all(x and y for x, y in p.demos)
        p.labels, p.numeric, p.frame, p.label_values(), p.query_note(), p.loo_prompts()
        p.target_value(p.query_y)
    else:
        p.full_text()
        assert p.context.strip()
        for s, e in p.needle_spans:
            assert 0 <= s <= e <= len(p.context)


# ------------------------------------------------------------------------------------------
# parse_prompt: any text → a prompt or PromptParseError
# ------------------------------------------------------------------------------------------


@FUZZ
@given(RANDOM_TEXT)
def test_parse_random_unicode_only_raises_prompt_parse_error(text):
    # would catch: IndexError/TypeError/… from the parser on arbitrary Unicode (surrogates, controls)
    p = _parse_or_error(text)
    if p is not None:
        _exercise(p)


@FUZZ
@given(STRUCTURED)
def test_parse_structured_garbage_only_raises_prompt_parse_error(text):
    # would catch: crashes on separators everywhere, '# answer' variants, 'Question:' alone,
    # unclosed / nested <needle> markers, odd line breaks (the parser's branches)
    p = _parse_or_error(text)
    if p is not None:
        _exercise(p)


@FUZZ
@given(st.one_of(STRUCTURED, RANDOM_TEXT))
@example("\r\r\n->")  # found by Hypothesis: one CRLF pass left a CRLF ('\r' + '\n' after the replace)
def test_parse_is_idempotent_through_to_text(text):
    # would catch: to_text() writing something parse_prompt reads back differently (e.g. the
    # 'spaced' flag read from a ': ' inside a label, needle spans shifted, the answer lost,
    # line breaks normalised differently on the second read)
    p = _parse_or_error(text)
    if p is not None:
        assert parse_prompt(p.to_text()) == p


@pytest.mark.parametrize("value", [None, b"1 -> 2\n3 ->", 12, ["a -> 1"]])
def test_parse_non_text_raises_prompt_parse_error(value):
    # would catch: AttributeError/TypeError for bytes or other non-str input (None reads as empty)
    with pytest.raises(PromptParseError):
        parse_prompt(value)


@pytest.mark.parametrize("text", ["", " \n\t\r\n", "->", "-> -> ->", "Question:", "\nQuestion:\nAnswer:", "#",
                                  "# answer: 3", "<needle>", "</needle>", "a <needle>b", "<needle>x</needle>",
                                  ":", ":\n:\n:", "x ->\ny ->", "a -> 1\nb -> 2", "\ud800 -> \udfff\n\ud800 ->"])
def test_parse_edge_cases_only_raise_prompt_parse_error(text):
    # would catch: the named shapes from the issue crashing instead of a readable PromptParseError
    p = _parse_or_error(text)
    if p is not None:
        _exercise(p)


def test_parse_refuses_lone_surrogates_with_their_position():
    # would catch: a lone surrogate parsed into a prompt that then crashes the tokenizer
    # (tokenizers raise TypeError 'TextEncodeInput must be …' on it)
    with pytest.raises(PromptParseError, match=r"U\+D800 at position 4"):
        parse_prompt("abc \ud800 def\nQuestion: why?")


# Over-long inputs. Before the fix, three of these shapes were quadratic (at 20–200k characters:
# 2.5 s, 27 s and 59 s): the lazy '# answer:' regex over a whitespace run, the needle regex
# rescanning the text for every unclosed <needle>, and a list-membership test per few-shot line.
LIMIT = MAX_PROMPT_CHARS
HUGE = {
    "answer comment with a long whitespace run": "a -> 1\nb -> 2\nc ->\n# answer: x" + " " * (LIMIT - 64) + "y",
    "unclosed needles": "<needle>" * (LIMIT // 8 - 1) + "x",
    "many closed needles": "<needle>a</needle>" * (LIMIT // 18 - 1),
    "many few-shot lines": "a->b\n" * (LIMIT // 5 - 1) + "c->",
    "one huge line": "x" * (LIMIT - 1),
    "one huge line of spaces between words": "a" + " " * (LIMIT - 3) + "b",
    "arrows everywhere": "->" * (LIMIT // 2 - 1),
    "only separators and newlines": ":\n" * (LIMIT // 2 - 1),
    "alternating word and space": "a " * (LIMIT // 2 - 1),
    "huge question": "ctx\nQuestion: " + "why " * (LIMIT // 4 - 10),
}


@pytest.mark.parametrize("name", list(HUGE))
def test_parse_huge_inputs_are_linear(name):
    # would catch: super-linear (regex backtracking / quadratic loop) parsing of a prompt just
    # under the character limit; the app parses the prompt on every rerun
    text = HUGE[name]
    assert len(text) <= LIMIT
    t0 = time.perf_counter()
    _parse_or_error(text)
    assert time.perf_counter() - t0 < 10.0, f"{name}: {time.perf_counter() - t0:.1f} s"  # linear: ~0.5 s


def test_parse_over_the_limit_is_refused_before_any_work():
    # would catch: a refusal message without the length and the limit, or parsing 10 MB before
    # refusing it (the length check must come first: 10 MB of unclosed needles was minutes)
    text = "<needle>" * 1_250_000
    t0 = time.perf_counter()
    with pytest.raises(PromptParseError) as info:
        parse_prompt(text)
    assert time.perf_counter() - t0 < 1.0
    msg = str(info.value)
    assert "10,000,000 characters" in msg and f"{LIMIT:,}" in msg and "refused" in msg


# ------------------------------------------------------------------------------------------
# Round trip of well-formed few-shot prompts
# ------------------------------------------------------------------------------------------

_SEPS = ("->", "=>", ":")
# Text of an x or a label: any printable character except line breaks (str.splitlines' set)
_FIELD_CHARS = st.characters(exclude_categories=["Cs", "Cc", "Zl", "Zp"], exclude_characters="\x1c\x1d\x1e\x85")


def _field(max_size: int):
    return st.text(_FIELD_CHARS, min_size=1, max_size=max_size).map(str.strip).filter(bool)


def _ok_x(x: str) -> bool:
    """An x is well-formed when it holds no separator (the first one on a line ends x), is not a
    comment and does not start the question of a long context."""
    return not any(s in x for s in _SEPS) and not x.startswith("#") and not x.lower().startswith("question:")


@st.composite
def fewshot_prompts(draw):
    sep = draw(st.sampled_from(_SEPS))
    spaced = draw(st.booleans())
    # Separator-like pieces next to the separator probe where x ends and the label begins
    # ('a-' + '->', labels such as '>b' or 'b: c').
    tricky = st.lists(st.sampled_from(["a", "b", "-", "=", ">", ":", "->", "=>", " ", "#", "7"]), min_size=1,
                      max_size=6).map("".join).map(str.strip).filter(bool)
    xs = st.one_of(st.integers(-999, 999).map(str), _field(30), tricky).filter(_ok_x)
    ys = st.one_of(st.integers(0, 9).map(str), st.sampled_from(["good", "bad", "A", "B", "-1.5", "1e3"]), _field(12),
                   tricky)
    n = draw(st.integers(1, 12))
    demos = [(draw(xs), draw(ys)) for _ in range(n)]
    query_y = draw(st.one_of(st.none(), ys))
    return FewShotPrompt(demos=demos, query_x=draw(xs), query_y=query_y, sep=sep, spaced=spaced)


@settings(max_examples=300, deadline=None, database=None)
@given(fewshot_prompts())
def test_fewshot_to_text_round_trips(p):
    # would catch: to_text/parse_prompt disagreeing on a well-formed prompt — e.g. an unspaced
    # ':' prompt with a label such as 'b: c' read back as spaced (fixed: the flag now looks only
    # right after each line's own separator), a label or x altered, the answer line lost
    text = p.to_text()
    q = parse_prompt(text)
    assert q == p, text
    assert q.to_text() == text


def test_fewshot_round_trip_regression_label_with_colon_space():
    # the case Hypothesis found: unspaced 'x:y' lines whose label contains ': '
    p = FewShotPrompt(demos=[("a", "b: c"), ("d", "e")], query_x="f", sep=":", spaced=False)
    assert parse_prompt(p.to_text()) == p


# ------------------------------------------------------------------------------------------
# diagnose on unusable files: exit 2, ONE line on stderr naming the problem, no traceback
# ------------------------------------------------------------------------------------------


def _diagnose(path: Path, capsys, *extra: str) -> tuple[int, str, str]:
    code = main(["diagnose", str(path), "--model", TINY, *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error_line(err: str, path: Path) -> str:
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err[:2000]
    assert lines[0].startswith("error: ") and str(path) in lines[0] and "Traceback" not in err
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """The size/encoding checks must come before the model is loaded: loading it fails the test."""
    import ttt_core.cli as cli

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the prompt file was checked")

    monkeypatch.setattr(cli, "load_model", boom)


def test_diagnose_random_bytes(tmp_path, capsys, no_model):
    # would catch: a UnicodeDecodeError traceback, or a message without the path, byte and offset
    data = bytes(random.Random(15).randrange(256) for _ in range(4096))
    data = b"3 -> 5\nab" + b"\xff" + data  # first invalid byte: 0xff at offset 9
    f = tmp_path / "random.bin"
    f.write_bytes(data)
    code, out, err = _diagnose(f, capsys)
    assert code == 2 and out == ""
    line = _one_error_line(err, f)
    assert "is not UTF-8 text" in line and "0xff" in line and "position 9" in line


def test_diagnose_binary_that_happens_to_be_utf8_is_refused(tmp_path, capsys, no_model):
    # would catch: NUL-laden binary data (valid UTF-8) going on to the model instead of a clear refusal
    f = tmp_path / "zeros.bin"
    f.write_bytes(b"a -> 1\n" + b"\x00" * 100)
    code, _, err = _diagnose(f, capsys)
    assert code == 2
    line = _one_error_line(err, f)
    assert "NUL" in line and "binary" in line


def test_diagnose_empty_and_blank_files(tmp_path, capsys, no_model):
    # would catch: an empty file reaching the parser/model, or a message that does not name the file
    for name, data in (("empty.txt", b""), ("blank.txt", b" \n\t\r\n")):
        f = tmp_path / name
        f.write_bytes(data)
        code, out, err = _diagnose(f, capsys)
        assert code == 2 and out == ""
        assert "is empty" in _one_error_line(err, f)


def test_diagnose_5mb_file_refused_by_size(tmp_path, capsys, no_model):
    # would catch: reading/decoding/parsing a 5 MB file (or loading the model) before refusing it,
    # and a message without the size and the limit
    f = tmp_path / "big.txt"
    f.write_bytes(b"word " * 1_000_000)
    code, out, err = _diagnose(f, capsys)
    assert code == 2 and out == ""
    line = _one_error_line(err, f)
    assert "5.0 MB" in line and f"{MAX_PROMPT_CHARS:,} characters" in line


def test_diagnose_over_char_limit_but_small_in_bytes(tmp_path, capsys, no_model):
    # would catch: a file under the byte cap but over the character limit slipping through
    f = tmp_path / "long.txt"
    f.write_text("x" * (MAX_PROMPT_CHARS + 1), encoding="utf-8")
    code, _, err = _diagnose(f, capsys)
    assert code == 2
    line = _one_error_line(err, f)
    assert f"{MAX_PROMPT_CHARS + 1:,} characters" in line and f"{MAX_PROMPT_CHARS:,}" in line


def test_diagnose_unparseable_prompt_names_the_file(tmp_path, capsys, no_model):
    # would catch: a parse error printed without the file it came from, or over several lines
    f = tmp_path / "bad.txt"
    f.write_text("3 -> 5\n8 -> 0\nthis line is broken\n1 -> 3\n6 ->\n", encoding="utf-8")
    code, _, err = _diagnose(f, capsys)
    assert code == 2
    assert "line 3" in _one_error_line(err, f)


def test_diagnose_missing_file_and_directory(tmp_path, capsys, no_model):
    # would catch: a traceback for a missing path or a directory given as the prompt file
    for f in (tmp_path / "nope.txt", tmp_path):
        code, _, err = _diagnose(f, capsys)
        assert code == 2
        _one_error_line(err, f)


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=512))
def test_diagnose_fuzz_bytes_before_the_model(tmp_path, capsys, monkeypatch, data):
    # would catch: any input file making the checks before the model raise (a traceback) instead
    # of one 'error:' line; files that pass every check reach the (stubbed) model loader
    import ttt_core.cli as cli

    class Reached(BaseException):  # not an Exception: main's catch-all must not swallow it
        pass

    def reached(*a, **k):
        raise Reached

    monkeypatch.setattr(cli, "load_model", reached)
    f = tmp_path / "fuzz.bin"
    f.write_bytes(data)
    try:
        code = main(["diagnose", str(f), "--model", TINY])
    except Reached:
        capsys.readouterr()
        return
    err = capsys.readouterr().err
    assert code == 2
    _one_error_line(err, f)


def test_diagnose_random_unicode_on_the_tiny_model(tmp_path, capsys):
    # would catch: random (valid UTF-8) Unicode crashing past the parser — in the encoder, the
    # kernel or the report — with a traceback. Such text is free text (a long context without a
    # question): either a report (exit 0) or one 'error:' line with exit 2.
    rng = random.Random(156)
    pool = [chr(c) for c in range(0x20, 0x2FFF) if not (0xD800 <= c <= 0xDFFF)]
    text = "".join(rng.choice(pool) for _ in range(600))
    f = tmp_path / "unicode.txt"
    f.write_text(text, encoding="utf-8")
    code, out, err = _diagnose(f, capsys, "--grid", "4", "--max-positions", "16")
    assert "Traceback" not in err
    if code == 0:
        assert out.lstrip().startswith("{")
    else:
        assert code == 2
        _one_error_line(err, f)


def test_diagnose_subprocess_random_bytes_no_traceback(tmp_path):
    # would catch: an error path that works through main() but prints a traceback in a real
    # process (e.g. an exception raised while importing or decoding outside the try blocks)
    f = tmp_path / "random.bin"
    f.write_bytes(bytes(random.Random(2).randrange(128, 256) for _ in range(2048)))
    res = subprocess.run([sys.executable, "-m", "ttt_core", "diagnose", str(f), "--model", TINY],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert re.fullmatch(r"error: .*is not UTF-8 text \(invalid byte 0x[0-9a-f]{2} at position \d+\)\n", res.stderr), res.stderr


def test_unexpected_error_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    # would catch: an unexpected exception deep in the report escaping main() as a traceback, or
    # a multi-line message printed as several lines
    import ttt_core.cli as cli

    def boom(*a, **k):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(cli, "diagnose_report", boom)
    monkeypatch.delenv("TTT_LENS_DEBUG", raising=False)
    f = tmp_path / "p.txt"
    f.write_text("3 -> 5\n8 -> 0\n1 -> 3\n6 ->\n", encoding="utf-8")
    code = main(["diagnose", str(f), "--model", TINY, "--grid", "3"])
    err = capsys.readouterr().err
    assert code == 1
    (line,) = err.strip("\n").split("\n")
    assert line.startswith("error: internal error (RuntimeError): kernel exploded second line")
