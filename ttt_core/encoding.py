"""One encoding of a prompt into token ids (DESIGN §1 "One encoding").

`encode(lm, prompt)` is the only place a prompt becomes token ids. The prompt kernel, the qTTT
engine, paper-mode GD, the experiments and the Home token view all read their ids from it, so they
see the same tokens (tested for every prompt kind and model family, a tokenizer that adds BOS
included).

Few-shot (DESIGN §7.1)
----------------------
* ``seqs``: the n leave-one-out prompts (demonstration i removed, x_i as the query) and then the
  full prompt, each ``tok(text)`` (special tokens as the tokenizer adds them) followed by the
  ``lead`` tokens.
* Label token = first token of ``label_prefix() + y``. Whitespace-only leading tokens that *every*
  label shares (SmolLM2 writes " 5" as [" ", "5"]) are appended to every prompt instead (``lead``),
  so the label token is the first token that can differ; two labels sharing it is an error. For
  categorical labels the true answer counts as a label here (it is scored even when no
  demonstration shows it).
* ``frame`` (`FewShotPrompt.frame`): "expected_value" (numeric labels) or "probability"
  (categorical); ``target_ids`` (n,): each demonstration's own label token; ``query_target_id``:
  the true answer's token (None without an answer). See `ttt_core.readout`.
* ``ids`` = ``seqs[-1]`` (the full prompt); its last position predicts the query's label.

Long context + question (DESIGN §7.2)
-------------------------------------
* ``context_ids`` = ``tok(context)`` (special tokens as the tokenizer adds them, e.g. a BOS),
  ``question_ids`` = ``tok(query_text, add_special_tokens=False)``, ``answer_ids`` =
  ``tok(" " + answer.strip(), add_special_tokens=False)``; each piece is tokenised on its own, so
  no token merges across a boundary and every consumer sees the same boundaries.
* ``prompt_ids`` = context ‖ question (what the model reads before answering; ``n_prompt`` tokens);
  ``train_ids`` = prompt ‖ answer (what qTTT prefills: spans live in the context rows
  0 … n_context − 2, the answer rows are scored); ``ids`` = prompt ‖ the answer's leading
  whitespace tokens (what the kernel differentiates: its query output at the last row is the
  probability of the answer's first non-space token ``query_token``). ``ids`` is a prefix of
  ``train_ids``.
* Supervised positions p (the output at p predicts ids[p + 1]) are the last ``max_positions``
  next-token predictions inside the context.
* ``needle``: indices of context tokens that overlap a marked needle span (character offsets).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import numpy as np
import torch

from ttt_core.models import LoadedModel
from ttt_core.prompts import FewShotPrompt, LongContextPrompt, Prompt

DEFAULT_MAX_POSITIONS = 256


class EncodingError(ValueError):
    """The prompt cannot be encoded for this model; the message says why, for the UI."""


def _is_space(tok: Any, tid: int) -> bool:
    return tok.decode([tid]).strip() == ""


@dataclass(frozen=True)
class FewShotEncoding:
    """Token ids and targets of a few-shot prompt (module docstring).

    seqs: n LOO prompts then the full prompt (lists of ids, lead tokens appended); labels (k,) and
    their token ids label_ids (k,) and values label_values (k,); targets (n,) the demonstrations'
    label values (all 1 in the probability frame); query_target: the query's target or None, with
    query_note saying why; lead: shared whitespace ids; text: the rendered full prompt; frame,
    target_ids (n,), query_target_id: see the module docstring."""

    seqs: list[list[int]]
    label_ids: list[int]
    label_values: list[float]
    labels: list[str]
    targets: np.ndarray
    query_target: float | None
    lead: list[int]
    text: str
    frame: str = "expected_value"
    target_ids: list[int] = field(default_factory=list)
    query_target_id: int | None = None
    query_note: str | None = None
    kind: str = "few_shot"

    @property
    def ids(self) -> list[int]:
        """The full prompt's ids (its last position predicts the query's label)."""
        return self.seqs[-1]

    @property
    def loo_seqs(self) -> list[list[int]]:
        return self.seqs[:-1]

    @property
    def n(self) -> int:
        return len(self.seqs) - 1


@dataclass(frozen=True)
class LongContextEncoding:
    """Token ids and boundaries of a long-context prompt (module docstring).

    context_ids / question_ids / answer_ids: the three pieces; positions: supervised positions
    (ascending) and targets ids[p + 1]; query_position / query_token: the answer's first non-space
    token after the question (None without an answer) and query_note saying why when there is none;
    needle: context token indices overlapping a marked needle."""

    context_ids: list[int]
    question_ids: list[int]
    answer_ids: list[int]
    answer_lead: int
    positions: list[int]
    targets: list[int]
    query_position: int | None
    query_token: int | None
    query_note: str | None
    needle: list[int] = field(default_factory=list)
    text: str = ""
    kind: str = "long_context"

    @property
    def n_context(self) -> int:
        return len(self.context_ids)

    @property
    def prompt_ids(self) -> list[int]:
        return self.context_ids + self.question_ids

    @property
    def n_prompt(self) -> int:
        return len(self.context_ids) + len(self.question_ids)

    @property
    def ids(self) -> list[int]:
        """The kernel's ids: prompt ‖ the answer's leading whitespace tokens."""
        return self.prompt_ids + self.answer_ids[: self.answer_lead]

    @property
    def train_ids(self) -> list[int]:
        """The engine's ids: prompt ‖ the whole expected answer."""
        return self.prompt_ids + self.answer_ids


Encoding = Union[FewShotEncoding, LongContextEncoding]


def encode_few_shot(lm: LoadedModel, prompt: FewShotPrompt) -> FewShotEncoding:
    """Tokenise the LOO prompts and the full prompt and resolve the label tokens (module docstring).

    Raises EncodingError when two labels share their first distinguishing token or n < 2."""
    tok = lm.tokenizer
    if prompt.n < 2:
        raise EncodingError("A few-shot prompt needs at least 2 demonstrations for leave-one-out residuals.")
    labels = prompt.labels
    values = prompt.label_values()
    frame = prompt.frame
    answer = prompt.query_y if frame == "probability" and prompt.query_y is not None else None
    scored = labels + ([answer] if answer is not None and answer not in labels else [])
    label_seqs = [tok(prompt.label_prefix() + y, add_special_tokens=False).input_ids for y in scored]
    if any(len(s) == 0 for s in label_seqs):
        raise EncodingError("A label tokenises to nothing.")
    lead: list[int] = []
    while (all(len(s) > len(lead) + 1 for s in label_seqs) and len({s[len(lead)] for s in label_seqs}) == 1
           and _is_space(tok, label_seqs[0][len(lead)])):
        lead.append(label_seqs[0][len(lead)])
    first_of = {y: s[len(lead)] for y, s in zip(scored, label_seqs)}
    first = [first_of[y] for y in labels]
    seen: dict[int, str] = {}
    for y, t in zip(labels, first):
        if t in seen:
            raise EncodingError(
                f"Labels {seen[t]!r} and {y!r} share their first token {tok.decode([t])!r}: the "
                "restricted softmax over label tokens cannot tell them apart. Use labels that start "
                "with different tokens (e.g. single words or digits).")
        seen[t] = y
    texts = prompt.loo_prompts() + [prompt.render()]
    seqs = [list(tok(t).input_ids) + lead for t in texts]
    targets = np.array([values[y] for _, y in prompt.demos], dtype=float)
    return FewShotEncoding(seqs=seqs, label_ids=first, label_values=[values[y] for y in labels], labels=labels,
                           targets=targets, query_target=prompt.target_value(prompt.query_y), lead=lead,
                           text=texts[-1], frame=frame, target_ids=[first_of[y] for _, y in prompt.demos],
                           query_target_id=None if answer is None else first_of[answer],
                           query_note=prompt.query_note())


def _needle_tokens(lm: LoadedModel, prompt: LongContextPrompt, n_ids: int) -> list[int]:
    """Context token indices overlapping a needle span (character offsets of a fast tokenizer)."""
    if not prompt.needle_spans:
        return []
    enc = lm.tokenizer(prompt.context, return_offsets_mapping=True)
    offs = enc["offset_mapping"]
    if len(offs) != n_ids:  # pragma: no cover - offsets always align with the same call's ids
        raise EncodingError("the tokenizer's offsets do not match its ids; needle tokens cannot be located")
    return [i for i, (s, e) in enumerate(offs) if e > s and any(s < ne and e > ns for ns, ne in prompt.needle_spans)]


def encode_long_context(lm: LoadedModel, prompt: LongContextPrompt,
                        max_positions: int = DEFAULT_MAX_POSITIONS) -> LongContextEncoding:
    """Tokenise context, question and answer separately and choose the last `max_positions`
    supervised positions (module docstring). Raises EncodingError for a context under 2 tokens."""
    tok = lm.tokenizer
    ctx = list(tok(prompt.context).input_ids)
    if len(ctx) < 2:
        raise EncodingError("No supervised positions: the context has fewer than 2 tokens.")
    q_ids: list[int] = []
    answer: list[int] = []
    k = 0
    note = None
    if prompt.question is None:
        note = "Free text without a question: there is no query output, so k_x (query alignment) is unavailable."
    else:
        q_ids = list(tok(prompt.query_text(), add_special_tokens=False).input_ids)
        if not prompt.answer or not prompt.answer.strip():
            note = ("The question has no 'Answer:' line: the query output (probability of the answer's first "
                    "token) has no target, so k_x is unavailable.")
        else:
            answer = list(tok(" " + prompt.answer.strip(), add_special_tokens=False).input_ids)
            while k < len(answer) - 1 and _is_space(tok, answer[k]):
                k += 1
    qtok = answer[k] if answer else None
    qpos = len(ctx) + len(q_ids) + k - 1 if answer else None
    m = max(1, int(max_positions))
    positions = list(range(max(0, len(ctx) - 1 - m), len(ctx) - 1))
    return LongContextEncoding(context_ids=ctx, question_ids=q_ids, answer_ids=answer, answer_lead=k,
                               positions=positions, targets=[ctx[p + 1] for p in positions], query_position=qpos,
                               query_token=qtok, query_note=note, needle=_needle_tokens(lm, prompt, len(ctx)),
                               text=prompt.full_text())


def encode(lm: LoadedModel, prompt: Prompt, max_positions: int = DEFAULT_MAX_POSITIONS) -> Encoding:
    """The encoding of `prompt` for `lm` (module docstring); `max_positions` caps a long context's
    supervised positions."""
    if isinstance(prompt, FewShotPrompt):
        return encode_few_shot(lm, prompt)
    if isinstance(prompt, LongContextPrompt):
        return encode_long_context(lm, prompt, max_positions)
    raise EncodingError(f"Unsupported prompt type {type(prompt).__name__}.")


def padded_batch(lm: LoadedModel, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`seqs` right-padded into one batch on the model's device: ids (B, N) (pad = the tokenizer's
    pad id, else EOS, else 0), attention mask (B, N) and each row's last real position (B,).
    Causal attention makes right padding harmless for every real position."""
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    last = torch.tensor([len(s) - 1 for s in seqs])
    return ids.to(lm.device), mask.to(lm.device), last.to(lm.device)


def decoded_tokens(lm: LoadedModel, ids: Sequence[int]) -> list[str]:
    """Each id decoded on its own (the token view)."""
    return [lm.tokenizer.decode([int(t)]) for t in ids]
