"""The packed leave-one-out forward (`partial_forward.PackedLoo`, DESIGN §7.1) against the
right-padded batch it replaces: same logits and the same gradients in the deltas."""

from __future__ import annotations

import pytest
import torch

from ttt_core.encoding import encode_few_shot
from ttt_core.experiments.paper_tasks import paper_task
from ttt_core.models import build_tiny_model
from ttt_core.paper_gd import LooBatch


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model("llama", seed=0)


def _logits_and_grad(lm, batch, key):
    spec = lm.adapter.spec(*key)
    g = torch.Generator().manual_seed(0)
    delta = (1e-2 * torch.randn(spec.out_features, spec.in_features, generator=g)).requires_grad_(True)
    logits = batch.logits({key: delta})
    w = torch.randn(logits.shape, generator=g)
    (grad,) = torch.autograd.grad((logits * w).sum(), [delta])
    return logits.detach(), grad


@pytest.mark.parametrize("first_layer,kind", [(0, "v"), (1, "q"), (1, "v")])
def test_packed_equals_the_padded_batch(tiny, first_layer, kind):
    enc = encode_few_shot(tiny, paper_task(3, 1).prompt)
    packed = LooBatch(tiny, enc, first_layer)
    padded = LooBatch(tiny, enc, first_layer, partial=False)
    assert packed.path == "packed" and padded.path == "full"
    # every LOO prompt shares a prefix with the query prompt; the last one IS a prefix of it
    seqs = enc.seqs
    assert packed.packed.n_tokens < sum(len(s) for s in seqs)
    assert seqs[-2] == seqs[-1][: len(seqs[-2])]
    key = (tiny.adapter.n_layers - 1, kind)
    a, ga = _logits_and_grad(tiny, packed, key)
    b, gb = _logits_and_grad(tiny, padded, key)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ga, gb, atol=2e-5, rtol=1e-4)
    assert ga.abs().max() > 0


def test_packed_mask_never_lets_a_row_see_another_rows_suffix(tiny):
    enc = encode_few_shot(tiny, paper_task(3, 2).prompt)
    pk = LooBatch(tiny, enc, 1).packed
    r, p = pk.rows, pk.cols
    m = pk.mask4[0, 0]
    n = len(enc.seqs) - 1
    cross = (r[:, None] != r[None, :]) & (r[None, :] != n)
    assert not bool((m & cross).any())
    # a LOO row sees exactly positions 0 … its own position: prefix from the query row, the rest its own
    for a in range(len(r)):
        seen = sorted(int(x) for x in p[m[a]])
        assert seen == list(range(int(p[a]) + 1))
