"""Token-level facts about a prompt for the Home page: the model input text, its tokens, which
tokens a needle covers, and the model's greedy answer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ttt_core.models import LoadedModel
from ttt_core.prompts import FewShotPrompt, Prompt


@dataclass
class TokenisedPrompt:
    """text: what the model reads; ids (N,); tokens: each id decoded alone; needle_tokens:
    indices of tokens overlapping a marked needle span."""

    text: str
    ids: list[int]
    tokens: list[str]
    needle_tokens: set[int]


def model_input_text(prompt: Prompt) -> str:
    """The exact text fed to the model: the rendered few-shot prompt, or context + question."""
    return prompt.render() if isinstance(prompt, FewShotPrompt) else prompt.full_text()


def tokenise(lm: LoadedModel, prompt: Prompt) -> TokenisedPrompt:
    text = model_input_text(prompt)
    enc = lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    needle: set[int] = set()
    if not isinstance(prompt, FewShotPrompt):
        for i, (s, e) in enumerate(enc["offset_mapping"]):
            if any(s < ne and e > ns for ns, ne in prompt.needle_spans):
                needle.add(i)
    tokens = [lm.tokenizer.decode([t]) for t in ids]
    return TokenisedPrompt(text=text, ids=ids, tokens=tokens, needle_tokens=needle)


@torch.no_grad()
def greedy_answer(lm: LoadedModel, prompt: Prompt, max_new_tokens: int = 16) -> str:
    """The base model's greedy continuation of the prompt (no adaptation), first line only."""
    ids = torch.tensor([tokenise(lm, prompt).ids], device=lm.device)
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)
    text = lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return text.strip().split("\n")[0].strip()
