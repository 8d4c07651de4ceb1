"""Forcing either backend works for every caller (DESIGN §9), under the Triton interpreter on CPU.

Callers: the prompt kernel (per-head Gram build through `kernels.head_grams`, and the qTTT frozen-KV
route's attention), and a qTTT step (frozen-cache attention forward + dQ-only backward). Each is run
with TTT_LENS_KERNELS=torch and =triton and must agree. What this catches: a caller that hands the
Triton kernels float64 factors (a TypeError inside Triton, as the evidence path did), or one whose
forced backend silently falls back to the other.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels import triton_grams
from ttt_core.models import build_tiny_model
from ttt_core.prompt_kernel import compute_prompt_kernel
from ttt_core.prompts import parse_prompt
from ttt_core.qttt import QTTTConfig, QTTTRun

FEW = "3 -> 5\n1 -> 3\n4 -> 6\n0 -> 2\n2 ->\n# answer: 4"
LONG = "The cat sat on the mat while the dog slept by the door all day.\nQuestion: Where was the cat?\nAnswer: mat"


@pytest.fixture(scope="module")
def lm():
    return build_tiny_model("llama", seed=1)


def _kernels(lm, monkeypatch, backend, text, subspace):
    monkeypatch.setenv("TTT_LENS_KERNELS", backend)
    calls: list[torch.dtype] = []
    orig = triton_grams.head_grams
    monkeypatch.setattr(triton_grams, "head_grams", lambda *a, **k: calls.append(a[0].dtype) or orig(*a, **k))
    ev = compute_prompt_kernel(lm, parse_prompt(text), subspace, max_positions=12)
    monkeypatch.setattr(triton_grams, "head_grams", orig)
    monkeypatch.setattr(triton_grams, "head_grams", lambda *a, **k: calls.append(a[0].dtype) or orig(*a, **k))
    heads = np.stack([ev.factors[l].head_kernels().cpu().numpy() for l in range(ev.n_layers)])
    monkeypatch.setattr(triton_grams, "head_grams", orig)
    return ev, heads, calls


@pytest.mark.parametrize("text,subspace", [(FEW, "v"), (LONG, "q")])
def test_prompt_kernel_with_each_forced_backend(lm, monkeypatch, text, subspace):
    ev_t, heads_t, calls_t = _kernels(lm, monkeypatch, "torch", text, subspace)
    ev_x, heads_x, calls_x = _kernels(lm, monkeypatch, "triton", text, subspace)
    assert not calls_t and calls_x and all(d == torch.float32 for d in calls_x)  # Triton got fp32 factors
    np.testing.assert_allclose(heads_x, heads_t, rtol=1e-4, atol=1e-6 * np.abs(heads_t).max())
    np.testing.assert_allclose(ev_x.residuals, ev_t.residuals, rtol=1e-5, atol=1e-6)


def test_qttt_steps_with_each_forced_backend(lm, monkeypatch):
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("TTT_LENS_KERNELS", backend)
        run = QTTTRun(lm, parse_prompt(LONG), QTTTConfig(steps=2, span=8, lr=1e-3))
        recs = run.run_to_end()
        out[backend] = (np.array([r.loss for r in recs]), run.backend)
    assert out["torch"][1] == "torch" and out["triton"][1] == "triton"
    np.testing.assert_allclose(out["triton"][0], out["torch"][0], rtol=1e-4)


def test_forced_triton_on_float64_inputs(monkeypatch):
    """The exact tests' float64 factors: forced Triton computes on fp32 copies, no TypeError."""
    import kernels

    monkeypatch.setenv("TTT_LENS_KERNELS", "triton")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, dtype=torch.float64, generator=g), torch.randn(7, 6, dtype=torch.float64, generator=g)
    got = kernels.head_grams(a, b, 3)
    monkeypatch.setenv("TTT_LENS_KERNELS", "torch")
    np.testing.assert_allclose(got.double().numpy(), kernels.head_grams(a, b, 3).numpy(), rtol=1e-5, atol=1e-6)
    q = torch.randn(1, 2, 3, 16, dtype=torch.float64, generator=g)
    k = torch.randn(1, 1, 5, 16, dtype=torch.float64, generator=g)
    monkeypatch.setenv("TTT_LENS_KERNELS", "triton")
    o, _ = kernels.attention_with_cache(q, k, k, 2)
    assert o.dtype == torch.float64
    monkeypatch.setenv("TTT_LENS_KERNELS", "torch")
    o_ref, _ = kernels.attention_with_cache(q, k, k, 2)
    np.testing.assert_allclose(o.numpy(), o_ref.numpy(), rtol=1e-4, atol=1e-5)
