"""Adapter tests on tiny random models of the three families (no downloads)."""

from __future__ import annotations

import threading

import pytest
import torch

from ttt_core.adapter import KINDS, ModelAdapter, UnsupportedArchitectureError
from ttt_core.models import build_tiny_model

FAMILIES = ["llama", "gpt2", "neox"]


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
    return build_tiny_model(request.param, seed=1)


def _ids(lm, text="The quick brown fox jumps over the lazy dog."):
    return lm.tokenizer(text, return_tensors="pt").input_ids


def _reference_projection(lm, layer, kind, x):
    """Logical projection output computed from the module's stored weights by hand."""
    a = lm.adapter
    w = a.logical_weight(layer, kind)
    spec = a.spec(layer, kind)
    bias = a.module(layer, kind).bias
    y = x @ w.t()
    if bias is not None:
        b = bias.detach()
        if spec.out_index is not None:
            b = b[torch.tensor(spec.out_index)]
        y = y + b
    return y


def test_structure(lm):
    a = lm.adapter
    assert a.n_layers == 3 and a.n_heads == 4 and a.head_dim == 16
    assert a.n_kv_heads == (2 if a.family == "llama" else 4)
    assert [a.kv_head_of(h) for h in range(4)] == ([0, 0, 1, 1] if a.family == "llama" else [0, 1, 2, 3])
    for kind in ("q", "k", "v", "o"):
        w = a.logical_weight(0, kind)
        spec = a.spec(0, kind)
        assert tuple(w.shape) == (spec.out_features, spec.in_features)


@pytest.mark.parametrize("kind", ["q", "k", "v", "o", "mlp_up", "mlp_down"])
def test_logical_layout_matches_module_output(lm, kind):
    """Captured logical outputs equal x Wᵀ + b from the logical weight: the slicing is right."""
    keys = {(1, kind)}
    with lm.adapter.apply(capture=keys) as st, torch.no_grad():
        lm.model(_ids(lm))
    x, y = st.capture_in[(1, kind)], st.capture_out[(1, kind)]
    torch.testing.assert_close(y, _reference_projection(lm, 1, kind, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["q", "k", "v", "o"])
def test_head_delta_changes_only_that_head(lm, kind):
    a = lm.adapter
    layer, head = 1, a.heads_of(kind) - 1
    keys = {(l, k) for l in range(a.n_layers) for k in ("q", "k", "v", "o")}
    ids = _ids(lm)
    with a.apply(capture=keys) as base, torch.no_grad():
        lm.model(ids)
    block = torch.randn_like(a.head_weight(layer, kind, head)) * 0.5
    delta = a.head_delta(layer, kind, head, block)
    with a.apply(deltas={(layer, kind): delta}, capture=keys) as new, torch.no_grad():
        lm.model(ids)
    # layers before are untouched
    for l in range(layer):
        for k in ("q", "k", "v", "o"):
            torch.testing.assert_close(new.capture_out[(l, k)], base.capture_out[(l, k)], rtol=0, atol=0)
    y0, y1 = base.capture_out[(layer, kind)], new.capture_out[(layer, kind)]
    if kind in ("q", "k", "v"):
        s = a.head_slice(kind, head)
        changed = (y1 - y0).abs().amax(dim=(0, 1))
        assert changed[s].min() > 1e-6, "the head's own outputs must change"
        mask = torch.ones_like(changed, dtype=torch.bool)
        mask[s] = False
        assert changed[mask].max() == 0, "other heads' outputs must not change"
        # exact: the change equals x Δᵀ
        torch.testing.assert_close(y1 - y0, new.capture_in[(layer, kind)] @ delta.t(), rtol=1e-5, atol=1e-6)
    else:
        # for W_O the head block acts on head h's input columns only: change = x_h Δ_hᵀ
        x = new.capture_in[(layer, kind)]
        s = a.head_slice(kind, head)
        torch.testing.assert_close(y1 - y0, x[..., s] @ block.t(), rtol=1e-5, atol=1e-6)


def test_base_model_bit_for_bit_unchanged(lm):
    before = {n: p.clone() for n, p in lm.model.named_parameters()}
    a = lm.adapter
    delta = torch.randn(a.spec(0, "q").out_features, a.spec(0, "q").in_features, requires_grad=True)
    with a.apply(deltas={(0, "q"): delta}):
        out = lm.model(_ids(lm)).logits.sum()
    out.backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None


def test_delta_equals_weight_edit(lm):
    """Running with ΔW through hooks equals running a copy whose weights were edited by ΔW."""
    import copy

    a = lm.adapter
    ids = _ids(lm)
    delta = torch.randn(a.spec(2, "v").out_features, a.spec(2, "v").in_features) * 0.3
    with a.apply(deltas={(2, "v"): delta}), torch.no_grad():
        hooked = lm.model(ids).logits
    edited = copy.deepcopy(lm.model)
    spec = a.spec(2, "v")
    mod = dict(edited.named_modules())[spec.module_name]
    full = delta if spec.layout == "linear" else delta
    with torch.no_grad():
        if spec.out_index is None:
            w = mod.weight
            w += full if spec.layout == "linear" else full.t()
        else:
            idx = torch.tensor(spec.out_index)
            if spec.layout == "linear":
                mod.weight[idx] += full
            else:
                mod.weight[:, idx] += full.t()
    with torch.no_grad():
        direct = edited(ids).logits
    torch.testing.assert_close(hooked, direct, rtol=1e-5, atol=1e-5)


def test_threads_do_not_see_each_others_deltas(lm):
    a = lm.adapter
    ids = _ids(lm)
    with torch.no_grad():
        clean = lm.model(ids).logits
    spec = a.spec(0, "q")
    results: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(2)

    def run(i: int) -> None:
        d = torch.full((spec.out_features, spec.in_features), 0.05 * (i + 1))
        with a.apply(deltas={(0, "q"): d}), torch.no_grad():
            barrier.wait()
            results[i] = lm.model(ids).logits
            solo = lm.model(ids).logits
        assert torch.equal(results[i], solo)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not torch.allclose(results[0], results[1])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, clean, rtol=0, atol=0)


def test_unsupported_architecture_message():
    from transformers import BertConfig, BertForMaskedLM

    m = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="Supported: Llama"):
        ModelAdapter(m)


def test_bad_inputs(lm):
    a = lm.adapter
    with pytest.raises(ValueError):
        a.spec(0, "z")
    with pytest.raises(IndexError):
        a.spec(99, "q")
    with pytest.raises(IndexError):
        a.head_slice("q", 99)
    with pytest.raises(ValueError, match="shape"):
        with a.apply(deltas={(0, "q"): torch.zeros(3, 3)}):
            pass
    assert set(KINDS) >= {"q", "k", "v", "o"}


def test_folded_delta_equals_hooked_delta(lm, monkeypatch):
    """Plain fp32 Linear projections fold ΔW into the weight (one matmul); the logits and the
    gradient with respect to ΔW equal those of the unfolded hook path (x ΔWᵀ added to W x)."""
    import ttt_core.adapter as adapter_mod

    a = lm.adapter
    ids = _ids(lm)
    keys = [(0, "q"), (1, "mlp_down")]
    g = torch.Generator().manual_seed(3)
    init = {k: torch.randn(a.spec(*k).out_features, a.spec(*k).in_features, generator=g) * 0.05 for k in keys}

    def run():
        leaves = {k: v.clone().requires_grad_(True) for k, v in init.items()}
        with a.apply(deltas=leaves):
            logits = lm.model(ids).logits
        grads = torch.autograd.grad(logits.square().mean(), list(leaves.values()))
        return logits.detach(), grads

    folded_keys: list = []
    real_folds = adapter_mod._folds

    def spy(module, state, key, delta):
        ok = real_folds(module, state, key, delta)
        if ok:
            folded_keys.append(key)
        return ok

    monkeypatch.setattr(adapter_mod, "_folds", spy)
    folded_logits, folded_grads = run()
    expected = {"llama": set(keys), "neox": {(1, "mlp_down")}, "gpt2": set()}[a.family]
    assert set(folded_keys) == expected                             # Conv1D / fused qkv never fold
    monkeypatch.setattr(adapter_mod, "_FOLD_DTYPES", ())           # disable folding
    folded_keys.clear()
    plain_logits, plain_grads = run()
    assert folded_keys == []
    torch.testing.assert_close(folded_logits, plain_logits, rtol=1e-5, atol=1e-6)
    for gf, gp in zip(folded_grads, plain_grads):
        torch.testing.assert_close(gf, gp, rtol=1e-4, atol=1e-7)
