"""ttt_core.cpu_threads: inside `gemm_threads_only` this thread's ATen loops run inline while MKL keeps
the intra-op threads; nothing leaks to other threads or past the block; a qTTT run inside it gives
the numbers of a run outside it (float32 round-off of whole-tensor reductions at most)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from ttt_core import cpu_threads

needs = pytest.mark.skipif(not cpu_threads.available(), reason="this torch build has no GNU OpenMP + MKL")


@pytest.fixture()
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@needs
def test_the_block_changes_only_this_thread_and_is_undone(two_threads):
    _, mkl = cpu_threads._libs()
    seen: dict[str, tuple[int, int]] = {}
    with cpu_threads.gemm_threads_only() as n:
        assert n == 2
        assert torch.get_num_threads() == 1 and mkl.mkl_get_max_threads() == 2
        t = threading.Thread(target=lambda: seen.update(other=(torch.get_num_threads(), mkl.mkl_get_max_threads())))
        t.start()
        t.join()
    assert seen["other"] == (2, 2)                       # another session's thread keeps its two threads
    assert torch.get_num_threads() == 2 and mkl.mkl_get_max_threads() == 2


@needs
def test_one_thread_or_switched_off_changes_nothing(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with cpu_threads.gemm_threads_only() as n:
            assert n == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv(cpu_threads.ENV, "0")
        with cpu_threads.gemm_threads_only() as n:
            assert n == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@needs
def test_matrix_products_inside_equal_those_outside(two_threads):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(133, 576, generator=g), torch.randn(576, 1536, generator=g)
    out = a @ b
    with cpu_threads.gemm_threads_only():
        inside = a @ b
        x = torch.randn(133, 1536, generator=torch.Generator().manual_seed(1))
        silu_in = torch.nn.functional.silu(x) * out
    assert torch.equal(inside, out)
    assert torch.equal(silu_in, torch.nn.functional.silu(x) * out)          # element-wise: bit-identical


@needs
@pytest.mark.smollm2
def test_a_qttt_run_inside_matches_one_outside(two_threads, monkeypatch):
    """The engine's step loop runs in the block; switched off, the same run gives the same curve."""
    from ttt_core.generators import needle_haystack
    from ttt_core.models import load_model
    from ttt_core.qttt import QTTTConfig, QTTTRun

    lm = load_model()
    prompt = needle_haystack(np.random.default_rng(3), n_words=200)

    def curve():
        run = QTTTRun(lm, prompt, QTTTConfig(steps=3, span=64, seed=0))
        recs = [run.prepare()] + run.run_to_end()
        return np.array([[r.answer_nll, r.loss] for r in recs], dtype=float), run.deltas

    on, d_on = curve()
    monkeypatch.setenv(cpu_threads.ENV, "0")
    off, d_off = curve()
    assert np.allclose(on, off, rtol=1e-6, atol=1e-6), np.abs(on - off).max()
    assert max(float((d_on[k] - d_off[k]).abs().max()) for k in d_on) < 1e-6
