"""The fused LM-head NLL (`ttt_core.fused_head`) against plain autograd through the logits.

`head_nll` forms the softmax in vocabulary chunks and returns ∂nll/∂h precomputed in its forward;
these tests hold it to `naive_head_nll` (F.cross_entropy of hidden @ Wᵀ, autograd) in float64 for
the values and for the gradient of arbitrary functions of the NLLs, on ragged chunkings, several
row blocks and a real model's head; `HeadPath` must give the model's own logits, NLLs and
probabilities on the fused and the plain path alike."""

from __future__ import annotations

import copy

import pytest
import torch

from ttt_core.fused_head import HeadPath, head_nll, naive_head_nll, plain_head
from ttt_core.models import build_tiny_model, load_model


def _data(V=1000, d=24, m=70, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, d, generator=g, dtype=dtype) * 0.4
    h = torch.randn(m, d, generator=g, dtype=dtype)
    t = torch.randint(0, V, (m,), generator=g)
    return W, h, t


@pytest.mark.parametrize("chunk,block_rows", [(1000, 256), (333, 256), (128, 17), (4096, 1)])
def test_values_and_gradients_equal_autograd_float64(chunk, block_rows):
    W, h, t = _data()
    w = torch.linspace(-1.0, 2.0, h.shape[0], dtype=torch.float64)
    hf = h.clone().requires_grad_()
    a = head_nll(hf, W, t, chunk=chunk, block_rows=block_rows)
    hn = h.clone().requires_grad_()
    b = naive_head_nll(hn, W, t)
    assert a.dtype == torch.float64 and a.shape == (h.shape[0],)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # two different functions of the NLLs: a weighted sum (the qTTT loss is the unweighted one)
    # and Σ exp(−nll) (the kernel's supervised outputs s_i = p(y_i))
    for f in (lambda x: (w * x).sum(), lambda x: torch.exp(-x).sum()):
        (ga,) = torch.autograd.grad(f(head_nll(hf, W, t, chunk=chunk, block_rows=block_rows)), hf)
        (gb,) = torch.autograd.grad(f(naive_head_nll(hn, W, t)), hn)
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


def test_one_row_gradient_touches_only_that_row():
    """The per-output backward of the exact route reads one s_j at a time: its gradient must be
    D_j on row j and exactly zero elsewhere."""
    W, h, t = _data(m=9)
    hf = h.clone().requires_grad_()
    s = torch.exp(-head_nll(hf, W, t, chunk=300))
    (g,) = torch.autograd.grad(s[4], hf)
    assert torch.count_nonzero(g[torch.arange(9) != 4]) == 0
    hn = h.clone().requires_grad_()
    (gn,) = torch.autograd.grad(torch.exp(-naive_head_nll(hn, W, t))[4], hn)
    torch.testing.assert_close(g, gn, rtol=1e-10, atol=1e-13)


def test_fp32_is_at_least_as_accurate_as_plain_fp32_autograd():
    """In fp32 neither path is exact; measured against a float64 reference the fused one must not
    be worse (it avoids the fp32 log-softmax backward)."""
    W, h, t = _data(V=20000, d=64, m=40, dtype=torch.float32, seed=1)
    W = W * 3.0                                           # logits of magnitude ~20, as in a real LM head
    ref_h = h.double().requires_grad_()
    ref = naive_head_nll(ref_h, W.double(), t)
    (gref,) = torch.autograd.grad(torch.exp(-ref).sum(), ref_h)
    ref = ref.detach()
    errs = {}
    for name, fn in (("fused", head_nll), ("plain", naive_head_nll)):
        x = h.clone().requires_grad_()
        v = fn(x, W, t)
        assert v.dtype == torch.float32
        (g,) = torch.autograd.grad(torch.exp(-v).sum(), x)
        errs[name] = (float((v.detach().double() - ref).abs().max()), float((g.double() - gref).norm() / gref.norm()))
    assert errs["fused"][0] <= 2 * errs["plain"][0] + 1e-6, errs
    assert errs["fused"][1] <= 2 * errs["plain"][1] + 1e-6, errs
    assert errs["fused"][1] < 1e-4, errs


def test_no_head_gradient_and_shape_errors():
    W, h, t = _data(m=3)
    with pytest.raises(ValueError, match="head weight"):
        head_nll(h, W.clone().requires_grad_(), t)
    with pytest.raises(ValueError, match=r"\(m, d\)"):
        head_nll(h[None], W, t)
    assert head_nll(h[:0], W, t[:0]).shape == (0,)
    with torch.no_grad():                                  # no gradient wanted: no backward state kept
        assert head_nll(h.clone().requires_grad_(), W, t).grad_fn is None


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
def test_head_path_matches_the_model_logits(family):
    lm = build_tiny_model(family, seed=2)
    lm.model.double()
    ids = torch.tensor([[5, 80, 33, 120, 7, 200, 64, 99, 12]])
    tg = ids[0, 1:]
    rows = torch.tensor([0, 3, 7])
    ref_logits = lm.model(input_ids=ids).logits
    ref_nll = torch.nn.functional.cross_entropy(ref_logits[0, :-1], tg, reduction="none")
    for fused in (True, False):
        hp = HeadPath(lm.model, fused=fused)
        assert hp.fused is fused
        out = hp.module(input_ids=ids)
        torch.testing.assert_close(hp.logits(out, slice(None)), ref_logits[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(hp.nll(out, slice(0, 8), tg), ref_nll, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(hp.prob(out, rows, tg[rows]), torch.exp(-ref_nll[rows]), rtol=1e-11, atol=1e-13)


def test_plain_head_refuses_heads_it_cannot_reproduce(monkeypatch):
    lm = build_tiny_model("llama", seed=2)
    assert plain_head(lm.model) is lm.model.get_output_embeddings().weight
    capped = copy.deepcopy(lm.model)
    capped.config.final_logit_softcapping = 30.0
    assert plain_head(capped) is None and not HeadPath(capped).fused
    biased = copy.deepcopy(lm.model)
    old = biased.get_output_embeddings()
    new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    biased.set_output_embeddings(new)
    assert plain_head(biased) is None
    monkeypatch.setenv("TTT_LENS_FUSED_HEAD", "0")
    assert not HeadPath(lm.model).fused


def test_smollm2_head_nll_equals_autograd_in_float64():
    """The embedded model's real head (49,152 × 576, tied to the embeddings), chunked as by default."""
    lm = load_model()
    W = lm.model.get_output_embeddings().weight.detach().double()
    ids = lm.tokenizer("The capital of France is Paris, and the capital of Spain is Madrid.",
                       return_tensors="pt").input_ids
    with torch.no_grad():
        h = lm.model.get_decoder()(input_ids=ids).last_hidden_state[0, :-1].double()
    t = ids[0, 1:]
    hf, hn = h.clone().requires_grad_(), h.clone().requires_grad_()
    a, b = head_nll(hf, W, t), naive_head_nll(hn, W, t)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    (ga,) = torch.autograd.grad(torch.exp(-a).sum(), hf)
    (gb,) = torch.autograd.grad(torch.exp(-b).sum(), hn)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-13)


def test_lm_head_mode_overrides_the_environment_and_nests(monkeypatch):
    """`lm_head_mode` decides what a HeadPath without `fused=` does (a saved result's recorded
    mode), over TTT_LENS_FUSED_HEAD; the outer mode comes back on exit; bad modes are refused."""
    from ttt_core.fused_head import fused_by_default, lm_head_mode

    monkeypatch.setenv("TTT_LENS_FUSED_HEAD", "0")
    assert fused_by_default() is False
    with lm_head_mode("fused"):
        assert fused_by_default() is True
        with lm_head_mode("logits"):
            assert fused_by_default() is False
        assert fused_by_default() is True
    monkeypatch.delenv("TTT_LENS_FUSED_HEAD")
    assert fused_by_default() is True
    with pytest.raises(ValueError, match="lm_head"):
        with lm_head_mode("bogus"):
            pass
