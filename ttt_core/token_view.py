"""Token-level facts about a prompt for the Home page: its tokens as the engines and the kernel see
them (`encoding.encode`), which tokens a needle covers, and the base model's greedy answer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ttt_core.encoding import FewShotEncoding, decoded_tokens, encode
from ttt_core.engine import greedy_decode
from ttt_core.models import LoadedModel
from ttt_core.prompts import Prompt


@dataclass
class TokenisedPrompt:
    """text: what the model reads; ids (N,): the model input's ids (few-shot: the full prompt with
    the labels' shared lead tokens; long context: context ‖ question); tokens: each id decoded
    alone; needle_tokens: indices of tokens overlapping a marked needle span."""

    text: str
    ids: list[int]
    tokens: list[str]
    needle_tokens: set[int]


def tokenise(lm: LoadedModel, prompt: Prompt) -> TokenisedPrompt:
    """The model input of `prompt` as `encoding.encode` tokenises it."""
    enc = encode(lm, prompt)
    if isinstance(enc, FewShotEncoding):
        ids, needle = list(enc.ids), set()
    else:
        ids, needle = enc.prompt_ids, set(enc.needle)
    return TokenisedPrompt(text=enc.text, ids=ids, tokens=decoded_tokens(lm, ids), needle_tokens=needle)


def greedy_answer(lm: LoadedModel, prompt: Prompt, max_new_tokens: int = 16) -> str:
    """The base model's greedy continuation of the prompt (no adaptation), first line only."""
    ids = torch.tensor([tokenise(lm, prompt).ids], device=lm.device)
    return greedy_decode(lm, ids, None, None if ids.shape[1] < 2 else _base_cache(lm, ids), max_new_tokens)


@torch.no_grad()
def _base_cache(lm: LoadedModel, ids: torch.Tensor):
    return lm.model.get_decoder()(input_ids=ids[:, :-1], use_cache=True).past_key_values
