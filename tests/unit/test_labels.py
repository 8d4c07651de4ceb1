"""Categorical labels in the probability frame (DESIGN §7.1): nothing depends on an order of the
label set, residuals are 1 − p(own label) under the full softmax, and an answer that no
demonstration shows is scored.

What these would catch: the ordinal value i/(k−1) in alphabetical order that categorical labels
used to get (K, r and the verdict then move when the label set is merely re-ordered); a residual
computed from the restricted softmax or from another label's token; an unscored unseen answer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ttt_core.encoding import encode_few_shot
from ttt_core.models import build_tiny_model
from ttt_core.prompt_kernel import compute_prompt_kernel
from ttt_core.prompts import FewShotPrompt, parse_prompt
from ttt_core.spectrum import compute_spectrum

ANIMALS = ("stripes -> zebra\nwhiskers -> cat\nmane -> lion\ntrunk -> elephant\npurr -> cat\n"
           "roar -> lion\nhooves -> zebra\nbark ->\n# answer: dog")


class ReorderedPrompt(FewShotPrompt):
    """The same prompt with its label set in another internal order."""

    order: tuple[str, ...] = ()

    @property
    def labels(self) -> list[str]:  # type: ignore[override]
        return list(self.order)


def _reordered(p: FewShotPrompt, order: list[str]) -> ReorderedPrompt:
    q = ReorderedPrompt(demos=list(p.demos), query_x=p.query_x, query_y=p.query_y, sep=p.sep, spaced=p.spaced)
    q.order = tuple(order)
    return q


@pytest.fixture(scope="module")
def lm64():
    lm = build_tiny_model("llama", seed=3)
    lm.model.double()
    return lm


def test_label_order_changes_nothing(lm64):
    p = parse_prompt(ANIMALS)
    assert p.frame == "probability" and p.labels == ["cat", "elephant", "lion", "zebra"]
    base = compute_prompt_kernel(lm64, p, "q")
    rep0 = compute_spectrum(base.K, base.residuals, base.k_x, T=8)
    rng = np.random.default_rng(0)
    for _ in range(3):
        order = list(rng.permutation(p.labels))
        ev = compute_prompt_kernel(lm64, _reordered(p, order), "q")
        assert np.max(np.abs(ev.K - base.K)) <= 1e-6 * max(1.0, np.abs(base.K).max())
        assert np.max(np.abs(ev.residuals - base.residuals)) <= 1e-6
        assert np.max(np.abs(ev.k_x - base.k_x)) <= 1e-6 * max(1.0, np.abs(base.k_x).max())
        rep = compute_spectrum(ev.K, ev.residuals, ev.k_x, T=8)
        assert rep.verdict == rep0.verdict


def test_residual_is_one_minus_own_label_probability(lm64):
    p = parse_prompt(ANIMALS)
    ev = compute_prompt_kernel(lm64, p, "q")
    tok = lm64.tokenizer
    lead = encode_few_shot(lm64, p).lead
    for i, (x, y) in enumerate(p.demos):       # independent: plain tokenizer calls and one forward each
        ids = list(tok(p.render(exclude=i, query_x=x)).input_ids) + lead
        with torch.no_grad():
            logits = lm64.model(input_ids=torch.tensor([ids])).logits[0, -1]
        y_tok = tok(" " + y, add_special_tokens=False).input_ids[len(lead)]
        p_y = float(torch.softmax(logits.double(), -1)[y_tok])
        assert ev.residuals[i] == pytest.approx(1.0 - p_y, abs=1e-9)
    assert np.all(ev.targets == 1.0)


def test_unseen_answer_is_scored(lm64):
    p = parse_prompt(ANIMALS)     # "dog" is the answer; no demonstration shows it
    assert "dog" not in p.labels
    ev = compute_prompt_kernel(lm64, p, "q")
    q = ev.query
    assert q is not None and q.target == 1.0 and q.error == pytest.approx((1.0 - q.value) ** 2)
    assert ev.query_note is None and ev.k_x is not None
    # without an answer there is no categorical query output, and the note says exactly why
    ev2 = compute_prompt_kernel(lm64, parse_prompt(ANIMALS.rsplit("\n", 1)[0]), "q")
    assert ev2.query is None and ev2.k_x is None and "probability of the true answer" in ev2.query_note


@pytest.mark.parametrize("sub", ["mlp_gate", "norm_attn", "norm_mlp_bias", "lora:q:8", "lora:mlp_up:16"])
def test_per_layer_targets_have_per_layer_labels_that_parse_back(sub):
    from ttt_core.types import block_label, parse_block_label

    label = block_label(3, 0, sub)
    assert label == f"L3.{sub}" and "H" not in label.split(".", 1)[1]
    assert parse_block_label(label) == (3, 0, sub)
