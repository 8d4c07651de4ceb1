"""Prompt generators for teaching, examples and experiments (DESIGN §7).

* `digit_shift_task`: the decision-theoretic paper's task — hidden shift s ~ U{0..9}, digits
  x ~ U{0..9}, y = (x + s) mod 10, n = 10 pairs, label noise p (each label replaced by a uniform
  digit with probability p), templates "x->y" (0) and "x:y" (1).
* `needle_haystack`: a filler context of about `n_words` words with one "needle" sentence holding
  a secret number at a chosen relative position, and the question that asks for it.
* `kv_recall`: a list of "key: value" pairs and a question asking for one key's value.
All take a numpy Generator (or a seed) so every draw is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ttt_core.prompts import FewShotPrompt, LongContextPrompt

PAPER_NOISE_LEVELS = (0.0, 0.55)

FILLER = [
    "The river bends twice before it reaches the old mill.",
    "Farmers in the valley grow barley, oats and a little rye.",
    "The library opens at nine and closes when the last reader leaves.",
    "A narrow road climbs the hill behind the station.",
    "In winter the lake freezes thick enough to walk across.",
    "The market sells bread, cheese, apples and wool.",
    "Most houses in the village have red tile roofs.",
    "The bell in the tower rings every hour during the day.",
    "Children walk to the school along the canal path.",
    "An old bridge of grey stone crosses the stream.",
    "The baker starts work long before sunrise.",
    "Sheep graze on the slopes above the orchard.",
    "The post arrives by van every morning except Sunday.",
    "A small museum keeps maps of the region from long ago.",
    "Fog often covers the fields in early autumn.",
    "The blacksmith's shop is now a cafe with blue chairs.",
]
KEYS = ["amber", "birch", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
        "kestrel", "lumen", "maple", "nickel", "onyx", "pepper", "quartz", "raven", "saffron", "tundra"]


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


@dataclass
class DigitShiftTask:
    """One digit-shift task: the prompt plus what generated it."""

    prompt: FewShotPrompt
    shift: int
    noise: float
    template: int
    clean_query_y: int


def digit_shift_task(
    rng: np.random.Generator | int | None = None,
    n: int = 10,
    noise: float | None = None,
    template: int | None = None,
    shift: int | None = None,
) -> DigitShiftTask:
    """Draw a digit-shift task (DESIGN §7.1). `noise=None` draws the regime from {0, 0.55} with
    equal probability, `template=None` draws "x->y" or "x:y". The query label is always the
    clean (x + s) mod 10: the error is measured against the task, not a noisy label."""
    g = _rng(rng)
    s = int(g.integers(10)) if shift is None else int(shift)
    p = float(g.choice(PAPER_NOISE_LEVELS)) if noise is None else float(noise)
    tpl = int(g.integers(2)) if template is None else int(template)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {p}")
    xs = g.integers(10, size=n)
    ys = (xs + s) % 10
    flip = g.random(n) < p
    ys = np.where(flip, g.integers(10, size=n), ys)
    qx = int(g.integers(10))
    qy = (qx + s) % 10
    sep, spaced = ("->", False) if tpl == 0 else (":", False)
    demos = [(str(int(x)), str(int(y))) for x, y in zip(xs, ys)]
    prompt = FewShotPrompt(demos=demos, query_x=str(qx), query_y=str(qy), sep=sep, spaced=spaced)
    return DigitShiftTask(prompt=prompt, shift=s, noise=p, template=tpl, clean_query_y=qy)


def needle_haystack(
    rng: np.random.Generator | int | None = None,
    n_words: int = 300,
    position: float = 0.5,
) -> LongContextPrompt:
    """Filler text of about `n_words` words with a needle sentence at relative `position` ∈ [0, 1];
    the needle span is marked, the question asks for the secret number, the answer is it."""
    if not 0.0 <= position <= 1.0:
        raise ValueError(f"position must be in [0, 1], got {position}")
    if n_words < 10:
        raise ValueError("n_words must be at least 10")
    g = _rng(rng)
    sentences: list[str] = []
    words = 0
    while words < n_words:
        s = FILLER[int(g.integers(len(FILLER)))]
        sentences.append(s)
        words += len(s.split())
    secret = int(g.integers(1000, 10000))
    needle = f"The secret number is {secret}."
    at = int(round(position * len(sentences)))
    before = " ".join(sentences[:at])
    after = " ".join(sentences[at:])
    start = len(before) + (1 if before else 0)
    context = (before + " " if before else "") + needle + (" " + after if after else "")
    return LongContextPrompt(context=context, question="What is the secret number?", answer=str(secret),
                             needle_spans=[(start, start + len(needle))])


def kv_recall(rng: np.random.Generator | int | None = None, n_pairs: int = 12) -> LongContextPrompt:
    """`n_pairs` lines "key: value" (3-digit values) and a question for one key; that pair is
    marked as the needle."""
    if not 1 <= n_pairs <= len(KEYS):
        raise ValueError(f"n_pairs must be in 1..{len(KEYS)}")
    g = _rng(rng)
    keys = list(g.choice(KEYS, size=n_pairs, replace=False))
    values = [int(v) for v in g.integers(100, 1000, size=n_pairs)]
    target = int(g.integers(n_pairs))
    lines, spans, pos = [], [], 0
    for i, (k, v) in enumerate(zip(keys, values)):
        line = f"{k}: {v}"
        if i == target:
            spans.append((pos, pos + len(line)))
        lines.append(line)
        pos += len(line) + 1
    return LongContextPrompt(context="\n".join(lines), question=f"What is the value of {keys[target]}?",
                             answer=str(values[target]), needle_spans=spans)
