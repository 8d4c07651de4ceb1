"""Long prompts (issue 15): the model's position limit, the chunked frozen-KV route, fp32 Gram
products, and (SmolLM2) an 8,192-token context through the kernel and qTTT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ttt_core import memory_guard as mg
from ttt_core.kernel_factors import FP32_GRAM_MIN_ROWS, RowFactors
from ttt_core.models import build_tiny_model
from ttt_core.prompt_kernel import KernelContextLengthError, PromptKernelError, compute_prompt_kernel
from ttt_core.prompts import LongContextPrompt, fit_to_token_limit
from ttt_core.qttt import QTTTConfig, QTTTRun

WORDS = ("river mill barley oats rye farmer bridge stone water field wheat road hill valley cart "
         "market bread flour wind sail").split()


def words(n: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(len(WORDS), size=n)) + "."


def rel(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ------------------------------------------------------------------ the position limit


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_over_the_position_limit_is_a_clear_error(family):
    over = {"llama": {"max_position_embeddings": 64}, "gpt2": {"n_positions": 64}}[family]
    lm = build_tiny_model(family, seed=0, **over)
    prompt = LongContextPrompt(context="a b c d " * 20, question="Which letter?", answer="a")
    with pytest.raises(KernelContextLengthError) as info:
        compute_prompt_kernel(lm, prompt, "q", max_positions=16)
    assert isinstance(info.value, PromptKernelError) and isinstance(info.value, mg.ContextLengthError)
    msg = str(info.value)
    assert "at most 64 positions" in msg and "token limit" in msg and "fit_to_token_limit" in msg
    with pytest.raises(mg.ContextLengthError, match="at most 64 positions"):
        QTTTRun(lm, prompt, QTTTConfig(steps=1, span=8)).prepare()
    fitted, note = fit_to_token_limit(prompt, lm.tokenizer, 56)                # the UI's truncation
    assert note is not None
    ev = compute_prompt_kernel(lm, fitted, "q", max_positions=16)
    assert ev.n == 16 and np.isfinite(ev.K).all()
    run = QTTTRun(lm, fitted, QTTTConfig(steps=1, span=8))
    run.prepare()
    assert len(run.run_to_end()) == 1


# ------------------------------------------------------------------ chunked route, fp32 Grams


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_chunked_route_equals_one_pass_on_a_long_prompt(family):
    """600 supervised rows: chunks of 128 rows against the growing cache vs all rows in one pass
    (same frozen-KV features; the Grams take the fp32 path, n ≥ FP32_GRAM_MIN_ROWS)."""
    lm = build_tiny_model(family, seed=2)
    prompt = LongContextPrompt(context=words(180), question="What grows?", answer="barley")
    n = 600
    assert n >= FP32_GRAM_MIN_ROWS
    one = compute_prompt_kernel(lm, prompt, "q", max_positions=n, row_chunk=4096)
    chunked = compute_prompt_kernel(lm, prompt, "q", max_positions=n)        # > row_chunk rows → chunks
    assert one.n == chunked.n == n
    np.testing.assert_allclose(chunked.values, one.values, rtol=1e-5, atol=1e-7)
    assert rel(chunked.K, one.K) <= 1e-5
    assert rel(chunked.k_x, one.k_x) <= 1e-5
    assert rel(chunked.head_kernel(1, 2), one.head_kernel(1, 2)) <= 1e-5


def _factors(N: int, dtype, n_heads: int = 4, seed: int = 0) -> RowFactors:
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(N, n_heads * 16, generator=g, dtype=dtype)
    O = torch.randn(N, 40, generator=g, dtype=dtype)
    return RowFactors(H=H, O=O, n_heads=n_heads, n=N)


def test_fp32_grams_match_float64():
    N = FP32_GRAM_MIN_ROWS + 88
    f32 = _factors(N, torch.float32)
    f64 = RowFactors(H=f32.H.double(), O=f32.O.double(), n_heads=4, n=N)
    assert f32._fp32_grams and not f64._fp32_grams
    K32, K64 = f32.layer_kernel(), f64.layer_kernel()
    assert K32.dtype == torch.float64 and rel(K32, K64) <= 1e-6
    hk32, hk64 = f32.head_kernels(), f64.head_kernels()
    assert rel(hk32, hk64) <= 1e-6 and rel(hk32.sum(0), K32) <= 1e-6
    M = torch.eye(N, dtype=torch.float64) + 0.01
    assert rel(f32.trace_scores(M), f64.trace_scores(M)) <= 1e-6
    for f in (f32, f64):                                   # symmetric blocking = unblocked
        K0, hk0 = f.layer_kernel(), f.head_kernels([0, 3])
        f.block_rows = 150
        f.__post_init__()
        tol = 1e-6 if f is f32 else 1e-12
        assert rel(f.layer_kernel(), K0) <= tol and rel(f.head_kernels([0, 3]), hk0) <= tol
        assert torch.equal(f.layer_kernel(), f.layer_kernel().T)


def test_small_fp32_factors_stay_float64():
    f = _factors(FP32_GRAM_MIN_ROWS - 1, torch.float32)
    assert not f._fp32_grams
    f64 = RowFactors(H=f.H.double(), O=f.O.double(), n_heads=4, n=f.n)
    assert rel(f.layer_kernel(), f64.layer_kernel()) <= 1e-13


# ------------------------------------------------------------------ SmolLM2, 8,192 positions


@pytest.fixture(scope="module")
def smol():
    from ttt_core.models import load_model

    return load_model()


def _smol_context(lm, tokens: int) -> str:
    text = words(int(tokens * 1.3) + 50, seed=5)
    offs = lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(offs) > tokens
    return text[:offs[tokens][0]]


@pytest.mark.smollm2
def test_smollm2_over_8192_positions_is_refused(smol):
    assert mg.max_positions_of(smol) == 8192
    prompt = LongContextPrompt(context=_smol_context(smol, 8300), question="What grows?", answer="barley")
    with pytest.raises(KernelContextLengthError, match=r"at most 8,192 positions.*token limit"):
        compute_prompt_kernel(smol, prompt, "q", max_positions=256)
    with pytest.raises(mg.ContextLengthError, match="8,192"):
        QTTTRun(smol, prompt, QTTTConfig(steps=1)).prepare()


@pytest.mark.smollm2
def test_smollm2_8192_token_context_kernel_and_qttt(smol):
    """A context filling SmolLM2's 8,192 positions: the kernel at 64 positions (the prefix runs
    without a graph) and two qTTT steps against the frozen cache of all tokens."""
    prompt = LongContextPrompt(context=_smol_context(smol, 8160), question="What grows?", answer="barley")
    ev = compute_prompt_kernel(smol, prompt, "q", max_positions=64)
    assert ev.n == 64 and len(ev.ids) > 8100 and np.isfinite(ev.K).all() and ev.k_x is not None
    run = QTTTRun(smol, prompt, QTTTConfig(steps=2, span=32))
    base = run.prepare()
    recs = run.run_to_end()
    assert run.enc.ids.shape[1] > 8100 and len(recs) == 2
    assert np.isfinite([base.answer_nll, recs[-1].answer_nll]).all()
