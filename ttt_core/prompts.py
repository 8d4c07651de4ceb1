"""Prompt kinds of DESIGN §7 and the parser that turns a pasted prompt into one of them.

Pasted formats
--------------
**Few-shot** (§7.1): one demonstration per line, ``x -> y`` (or ``x: y`` / ``x:y``), then a query
line with an empty label, ``x ->``. Lines starting with ``#`` are comments, except
``# answer: y``, which gives the query's true label (needed for the query error).
Example::

    3 -> 5
    8 -> 0
    1 -> 3
    6 ->
    # answer: 8

**Long context + question** (§7.2): any text; a line starting with ``Question:`` starts the
question, an optional line starting with ``Answer:`` gives the expected answer. A needle span may
be marked in the context with ``<needle>…</needle>`` (the markers are removed; the span is kept
for the needle-attention view). Without ``Question:`` the whole text is context (free text: the
supervised positions are its next-token predictions; there is no query).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Union

FEWSHOT_LINE = re.compile(r"^(?P<x>.*?\S)\s*(?P<sep>->|=>|:)\s*(?P<y>.*)$")
# The answer is the rest of the line, stripped (not a lazy `.+?\s*$` group: that backtracks
# quadratically over long whitespace runs).
ANSWER_COMMENT = re.compile(r"^#\s*answer\s*[:=]", re.IGNORECASE)
NEEDLE_OPEN, NEEDLE_CLOSE = "<needle>", "</needle>"
#: parse_prompt's default character limit (the CLI and the app check it before anything else).
MAX_PROMPT_CHARS = 400_000


class PromptParseError(ValueError):
    """The pasted prompt cannot be parsed; the message says which line and why."""


@dataclass
class FewShotPrompt:
    """Few-shot regression/classification prompt (DESIGN §7.1).

    demos: list of (x, y) strings; query_x; query_y (true label or None); sep: "->", "=>" or ":";
    spaced: whether spaces surround an arrow / follow a colon ("x -> y", "x: y") or not ("x->y",
    "x:y", the paper's templates 0 and 1).
    """

    demos: list[tuple[str, str]]
    query_x: str
    query_y: str | None = None
    sep: str = "->"
    spaced: bool = True
    kind: Literal["few_shot"] = "few_shot"

    @property
    def n(self) -> int:
        return len(self.demos)

    @property
    def labels(self) -> list[str]:
        """The label set: the distinct demonstration labels (DESIGN §7.1), numerically sorted when
        numeric; single-digit labels use all ten digits 0–9 (the paper's digit-shift setting).
        The query's true label is never added: that would leak the answer into the restricted
        softmax."""
        ys = {y for _, y in self.demos}
        if ys and all(len(y) == 1 and y.isdigit() for y in ys):
            return [str(d) for d in range(10)]
        return sorted(ys, key=lambda s: (float(s), s)) if self.numeric_labels(ys) else sorted(ys)

    @staticmethod
    def numeric_labels(ys: Any) -> bool:
        try:
            [float(y) for y in ys]
            return True
        except ValueError:
            return False

    @property
    def numeric(self) -> bool:
        return self.numeric_labels(self.labels)

    @property
    def frame(self) -> str:
        """How a demonstration becomes a scalar output (DESIGN §7.1): "expected_value" for numeric
        labels (the expected label value under the softmax restricted to the label tokens),
        "probability" for categorical labels (the probability of the demonstration's own label
        under the full softmax, target 1) — nothing then depends on an order of the labels."""
        return "expected_value" if self.numeric else "probability"

    def label_values(self) -> dict[str, float]:
        """Label → target value in [0, 1]. Numeric labels: single digits y ↦ y/9 (the paper's
        scaling), other numbers min-max scaled over the label set. Categorical labels: every
        label ↦ 1 (the target of p(own label)); no order is imposed."""
        labels = self.labels
        if self.numeric:
            vals = [float(y) for y in labels]
            if all(len(y) == 1 and y.isdigit() for y in labels):
                return {y: float(y) / 9.0 for y in labels}
            lo, hi = min(vals), max(vals)
            return {y: (float(y) - lo) / (hi - lo) if hi > lo else 0.0 for y in labels}
        return {y: 1.0 for y in labels}

    def target_value(self, y: str | None) -> float | None:
        """Target of the query output for true label y. Categorical: 1 for any answer (the
        probability of the true label, whether or not a demonstration shows it). Numeric: the
        label value; a number outside the label set uses the same affine scaling; None when y
        cannot be placed on the label scale (`query_note` says why)."""
        if y is None:
            return None
        if not self.numeric:
            return 1.0
        values = self.label_values()
        if y in values:
            return values[y]
        if self.numeric_labels([y]):
            nums = [float(v) for v in self.labels]
            lo, hi = min(nums), max(nums)
            return (float(y) - lo) / (hi - lo) if hi > lo else None
        return None

    def query_note(self) -> str | None:
        """Why the query has no error, or None when it has one."""
        if self.query_y is None:
            return "No '# answer:' line: the query error is unknown."
        if self.target_value(self.query_y) is None:
            return (f"The answer {self.query_y!r} cannot be placed on the numeric label scale of "
                    f"{', '.join(self.labels)}: the query error is unknown.")
        return None

    def line(self, x: str, y: str | None) -> str:
        gap = " " if self.spaced else ""
        lead = gap if self.sep in ("->", "=>") else ""
        if y is None:
            return f"{x}{lead}{self.sep}"
        return f"{x}{lead}{self.sep}{gap}{y}"

    def label_prefix(self) -> str:
        """Text between the separator and the label ("" or " "): the label token follows it."""
        return " " if self.spaced else ""

    def render(self, exclude: int | None = None, query_x: str | None = None) -> str:
        """Prompt text: all demonstrations (except index `exclude`, for leave-one-out) and the
        query line ending in the separator. With `query_x` given, that x is the query."""
        lines = [self.line(x, y) for i, (x, y) in enumerate(self.demos) if i != exclude]
        lines.append(self.line(self.query_x if query_x is None else query_x, None))
        return "\n".join(lines)

    def loo_prompts(self) -> list[str]:
        """The n leave-one-out prompts: demonstration i removed, x_i as the query (DESIGN §7.1)."""
        return [self.render(exclude=i, query_x=x) for i, (x, _) in enumerate(self.demos)]

    def to_text(self) -> str:
        text = self.render()
        if self.query_y is not None:
            text += f"\n# answer: {self.query_y}"
        return text


@dataclass
class LongContextPrompt:
    """Long context plus an optional question and expected answer (DESIGN §7.2).

    needle_spans: character spans (start, end) of marked needles inside `context`.
    """

    context: str
    question: str | None = None
    answer: str | None = None
    needle_spans: list[tuple[int, int]] = field(default_factory=list)
    kind: Literal["long_context"] = "long_context"

    def query_text(self) -> str:
        """The text after the context that ends where the answer starts ("" when no question)."""
        if self.question is None:
            return ""
        return f"\n\nQuestion: {self.question}\nAnswer:"

    def full_text(self) -> str:
        return self.context + self.query_text()

    def to_text(self) -> str:
        ctx = self.context
        for start, end in sorted(self.needle_spans, reverse=True):
            ctx = ctx[:start] + "<needle>" + ctx[start:end] + "</needle>" + ctx[end:]
        text = ctx
        if self.question is not None:
            text += f"\nQuestion: {self.question}"
        if self.answer is not None:
            text += f"\nAnswer: {self.answer}"
        return text


Prompt = Union[FewShotPrompt, LongContextPrompt]


def too_long_message(n_chars: int, max_chars: int = MAX_PROMPT_CHARS) -> str:
    """The one sentence for a prompt over the character limit: its length, the limit, the outcome."""
    return (f"The prompt has {n_chars:,} characters ({n_chars / 1e6:.1f} MB); the limit is {max_chars:,} characters, "
            "so it was refused and nothing was analysed: paste a shorter prompt (a long context is then cut "
            "to the token limit, keeping its end).")


def parse_prompt(text: str, max_chars: int = MAX_PROMPT_CHARS) -> Prompt:
    """Detect the kind of a pasted prompt and parse it (see module docstring for the formats).

    Raises PromptParseError with a readable message — and no other exception, whatever the text —
    for an empty prompt, an over-long one (checked first, before any other work), or text that
    does not parse. Runs in time linear in the length of the text.
    """
    if text is not None and not isinstance(text, str):
        raise PromptParseError(f"The prompt must be text (str), not {type(text).__name__}.")
    if text is not None and len(text) > max_chars:
        raise PromptParseError(too_long_message(len(text), max_chars))
    if text is None or not text.strip():
        raise PromptParseError("The prompt is empty: paste a few-shot list (x -> y lines) or a context with a question.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: no tokenizer accepts it (TypeError deep inside)
        raise PromptParseError(f"The prompt contains an invalid character (lone surrogate U+{ord(text[exc.start]):04X} "
                               f"at position {exc.start:,}): paste it again as plain text.") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text files are read
    fs = _try_few_shot(text)
    if fs is not None:
        return fs
    return _parse_long_context(text)


def _try_few_shot(text: str) -> FewShotPrompt | None:
    raw = [ln.rstrip() for ln in text.split("\n")]
    numbered = [(i + 1, ln.strip()) for i, ln in enumerate(raw) if ln.strip()]
    answer = None
    body: list[tuple[int, str]] = []
    for no, ln in numbered:
        m = ANSWER_COMMENT.match(ln)
        if m and ln[m.end():].strip():
            answer = ln[m.end():].strip()
        elif not ln.startswith("#"):
            body.append((no, ln))
    if len(body) < 2 or any(ln.lower().startswith("question:") for _, ln in body):
        return None
    parsed = [(no, ln, FEWSHOT_LINE.match(ln)) for no, ln in body]
    matches = [p for p in parsed if p[2] is not None]
    # Short lines that all look like "x SEP y" mean few-shot; mostly-prose text means long context.
    short = [p for p in matches if len(p[2].group("x")) <= 80 and len(p[2].group("y")) <= 40]
    if len(short) < max(2, 0.6 * len(body)):
        return None
    short_lines = {no for no, _, _ in short}  # a set: a list here made this quadratic in the line count
    bad = [(no, ln) for no, ln, m in parsed if m is None or no not in short_lines]
    if bad:
        shown = "; ".join(f"line {no}: {ln[:60]!r}" for no, ln in bad[:3])
        raise PromptParseError(f"This looks like a few-shot prompt, but {len(bad)} line(s) are not 'x -> y': {shown}.")
    seps = {m.group("sep") for _, _, m in parsed}
    if len(seps) > 1:
        raise PromptParseError(f"Mixed separators {sorted(seps)}: use one of '->', '=>' or ':' on every line.")
    sep = seps.pop()
    *demo_lines, (qno, qline, qm) = parsed
    if qm.group("y").strip():
        raise PromptParseError(f"The last line (line {qno}: {qline!r}) must be the query with an empty label, e.g. '{qm.group('x')} {sep}'.")
    demos = []
    for no, ln, m in demo_lines:
        y = m.group("y").strip()
        if not y:
            raise PromptParseError(f"Line {no} ({ln!r}) has no label; only the last line may be the query.")
        demos.append((m.group("x").strip(), y))
    # Spaced when whitespace follows the line's own separator (a "sep + space" inside a label,
    # e.g. the label "b: c" of "a:b: c", does not count).
    spaced = any(m.start("y") > m.end("sep") for _, _, m in demo_lines)
    return FewShotPrompt(demos=demos, query_x=qm.group("x").strip(), query_y=answer, sep=sep, spaced=spaced)


def _parse_long_context(text: str) -> LongContextPrompt:
    question = answer = None
    lines = text.split("\n")
    q_idx = next((i for i, ln in enumerate(lines) if ln.strip().lower().startswith("question:")), None)
    if q_idx is not None:
        rest = lines[q_idx:]
        a_idx = next((i for i, ln in enumerate(rest) if ln.strip().lower().startswith("answer:")), None)
        q_lines = rest if a_idx is None else rest[:a_idx]
        question = " ".join(ln.strip() for ln in q_lines).split(":", 1)[1].strip()
        if a_idx is not None:
            answer = " ".join(ln.strip() for ln in rest[a_idx:]).split(":", 1)[1].strip() or None
        context = "\n".join(lines[:q_idx]).rstrip()
        if not question:
            raise PromptParseError("The 'Question:' line is empty.")
    else:
        context = text.rstrip()
    # <needle>…</needle> pairs, leftmost first, not nested (a linear scan: the lazy regex used
    # before rescanned to the end of the text for every unclosed <needle>).
    spans: list[tuple[int, int]] = []
    out, pos, length = [], 0, 0
    while True:
        i = context.find(NEEDLE_OPEN, pos)
        j = context.find(NEEDLE_CLOSE, i + len(NEEDLE_OPEN)) if i >= 0 else -1
        if j < 0:
            break
        out.append(context[pos:i])
        length += i - pos
        inner = context[i + len(NEEDLE_OPEN):j]
        out.append(inner)
        spans.append((length, length + len(inner)))
        length += len(inner)
        pos = j + len(NEEDLE_CLOSE)
    out.append(context[pos:])
    clean = "".join(out)
    if NEEDLE_OPEN in clean or NEEDLE_CLOSE in clean:
        raise PromptParseError("Unbalanced <needle> markers: each <needle> needs a matching </needle>.")
    if not clean.strip():
        raise PromptParseError("The context is empty: put the text before the 'Question:' line.")
    return LongContextPrompt(context=clean, question=question, answer=answer, needle_spans=spans)


def fit_to_token_limit(prompt: Prompt, tokenizer: object, limit: int) -> tuple[Prompt, str | None]:
    """Apply the token limit: returns (prompt, note). Never silent:

    * a few-shot prompt over the limit is refused (PromptParseError) — dropping demonstrations
      would change the task;
    * a long context over the limit keeps its *last* tokens (the question stays) and `note`
      says how many tokens were cut. Needle spans that fall outside are dropped (noted).
    """
    text = prompt.render() if isinstance(prompt, FewShotPrompt) else prompt.full_text()
    n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    if n_tokens <= limit:
        return prompt, None
    if isinstance(prompt, FewShotPrompt):
        raise PromptParseError(f"The few-shot prompt has {n_tokens:,} tokens, over the limit of {limit:,}; "
                               "remove demonstrations or raise the limit.")
    budget = limit - len(tokenizer(prompt.query_text(), add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    if budget < 16:
        raise PromptParseError(f"The question alone uses almost all of the {limit:,}-token limit.")
    enc = tokenizer(prompt.context, add_special_tokens=False, return_offsets_mapping=True)  # type: ignore[operator]
    offsets = enc["offset_mapping"]
    cut_tokens = len(offsets) - budget
    cut_char = offsets[cut_tokens][0] if cut_tokens > 0 else 0
    spans = [(s - cut_char, e - cut_char) for s, e in prompt.needle_spans if s >= cut_char]
    dropped = len(prompt.needle_spans) - len(spans)
    new = LongContextPrompt(context=prompt.context[cut_char:], question=prompt.question, answer=prompt.answer,
                            needle_spans=spans)
    note = (f"The prompt has {n_tokens:,} tokens, over the limit of {limit:,}: the first {max(cut_tokens, 0):,} "
            f"context tokens were cut (the end of the context and the question are kept).")
    if dropped:
        note += f" {dropped} marked needle span(s) fell in the cut part and were dropped."
    return new, note
