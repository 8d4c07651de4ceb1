"""One encoding (DESIGN §1): the ids the prompt kernel differentiates are the ids the engines train
on, for every prompt kind and model family — a tokenizer that prepends BOS (Llama-style) included.

The ids are read where they enter the model (a forward hook on the input embedding), not from the
encoding object, so a consumer that tokenised on its own would be caught: e.g. a kernel that
tokenises the context with special tokens while the engine tokenises the joined text without them
(a missing or extra BOS, a token merged across the context/question join).
"""

from __future__ import annotations

import pytest
import torch

from ttt_core.encoding import EncodingError, encode, encode_few_shot, encode_long_context
from ttt_core.models import build_tiny_model, load_model
from ttt_core.paper_gd import PaperConfig, PaperRun
from ttt_core.prompt_kernel import compute_prompt_kernel
from ttt_core.prompts import parse_prompt
from ttt_core.qttt import QTTTConfig, QTTTRun
from ttt_core.token_view import tokenise

FEW_SHOT = "3 -> 5\n1 -> 3\n4 -> 6\n0 -> 2\n2 ->\n# answer: 4"
LONG = ("The lighthouse keeper wrote in the log every night. <needle>The boat is painted teal.</needle> "
        "Storms came and went; the lamp never failed.\nQuestion: What colour is the boat?\nAnswer: teal")
FREE = "Rivers carve valleys over thousands of years, and the valleys guide the rivers in turn."


def _embedded_ids(lm, fn) -> list[torch.Tensor]:
    """Every input-id tensor that reaches the model's input embedding while fn() runs."""
    seen: list[torch.Tensor] = []
    hook = lm.model.get_input_embeddings().register_forward_hook(lambda m, a, o: seen.append(a[0].detach().cpu()))
    try:
        fn()
    finally:
        hook.remove()
    return seen


FAMILIES = ["llama", "gpt2", "neox", "llama-bos"]


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
    fam = request.param
    return build_tiny_model(fam.split("-")[0], add_bos=fam.endswith("bos"))


def _check_few_shot(lm):
    p = parse_prompt(FEW_SHOT)
    kernel_in = _embedded_ids(lm, lambda: compute_prompt_kernel(lm, p, "v"))
    ev = compute_prompt_kernel(lm, p, "v")
    paper_in = _embedded_ids(lm, lambda: PaperRun(lm, p, PaperConfig(steps=1, rho=1e-3, kind="v")).prepare())
    qttt_in = _embedded_ids(lm, lambda: QTTTRun(lm, p, QTTTConfig(steps=1, span=4)).prepare())
    # the kernel's one batch (n LOO prompts + the query prompt) is paper mode's batch, token for token
    assert torch.equal(kernel_in[0], paper_in[0])
    # qTTT prefills exactly the kernel's query prompt, which is the kernel's reported ids
    assert qttt_in[0][0].tolist() == ev.ids == kernel_in[0][-1, : len(ev.ids)].tolist()
    assert tokenise(lm, p).ids == ev.ids
    return ev


def _check_long(lm, text):
    p = parse_prompt(text)
    enc = encode_long_context(lm, p)
    kernel_in = _embedded_ids(lm, lambda: compute_prompt_kernel(lm, p, "q"))
    ev = compute_prompt_kernel(lm, p, "q")
    run = QTTTRun(lm, p, QTTTConfig(steps=1, span=8))
    qttt_in = _embedded_ids(lm, run.prepare)
    engine_ids = qttt_in[0][0].tolist()          # the prefill: every token the spans train against
    kernel_ids = torch.cat(kernel_in, dim=1)[0].tolist()  # prefill before the rows, then the rows
    assert engine_ids == enc.train_ids
    assert kernel_ids == engine_ids[: len(kernel_ids)]   # the kernel's rows are the engine's rows
    assert ev.ids == engine_ids[: len(ev.ids)]
    assert run.enc.n_ctx == enc.n_context and run.enc.n_prompt == enc.n_prompt
    assert max(enc.positions) + 1 < enc.n_context     # supervised rows predict context tokens only
    assert tokenise(lm, p).ids == enc.prompt_ids == engine_ids[: enc.n_prompt]
    return p, enc, ev


def test_few_shot_ids_agree(lm):
    ev = _check_few_shot(lm)
    bos = lm.tokenizer.bos_token_id
    if bos is not None:   # the Llama-style tokenizer: BOS opens every prompt the kernel and engines see
        assert ev.ids[0] == bos


def test_long_context_ids_agree(lm):
    p, enc, ev = _check_long(lm, LONG)
    bos = lm.tokenizer.bos_token_id
    if bos is not None:
        assert enc.context_ids[0] == bos and ev.ids[0] == bos
        assert bos not in enc.question_ids + enc.answer_ids   # only the context opens with BOS
    needle = lm.tokenizer.decode([enc.context_ids[i] for i in enc.needle])
    assert "boat is painted teal" in needle
    assert enc.query_token == enc.answer_ids[enc.answer_lead]
    assert run_answer_rows_score_answer(lm, p, enc)


def run_answer_rows_score_answer(lm, p, enc) -> bool:
    """The engine scores exactly the expected answer's tokens after the prompt."""
    run = QTTTRun(lm, p, QTTTConfig(steps=1, span=8))
    run.prepare()
    ids = run.enc.ids[0].tolist()
    return ids[run.enc.n_prompt:] == enc.answer_ids and run.enc.answer_len == len(enc.answer_ids)


def test_free_text_ids_agree(lm):
    _, enc, ev = _check_long(lm, FREE)
    assert enc.question_ids == [] and enc.answer_ids == [] and ev.query is None


@pytest.mark.smollm2
def test_smollm2_ids_agree_for_every_kind():
    smollm2 = load_model()
    _check_few_shot(smollm2)
    _check_long(smollm2, LONG)
    _check_long(smollm2, FREE)


def test_encoding_errors_are_clear():
    lm = build_tiny_model("llama")
    with pytest.raises(EncodingError, match="at least 2 demonstrations"):
        encode_few_shot(lm, parse_prompt("1 -> 2\n3 ->"))
    with pytest.raises(EncodingError, match="fewer than 2 tokens"):
        encode(lm, parse_prompt("a"))
