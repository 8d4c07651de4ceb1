"""Kernel tests run the Triton kernels under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, i.e. before the first import
of kernels.triton_attention / kernels.triton_grams, so it is set here at conftest import time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

BACKENDS = ("torch", "triton")


@pytest.fixture
def backend(request, monkeypatch):
    """Force a backend through TTT_LENS_KERNELS for one test (parametrize indirectly)."""
    monkeypatch.setenv("TTT_LENS_KERNELS", request.param)
    return request.param


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _single_thread():
    """The kernel tests use tiny tensors: intra-op threads only add spin/wait overhead (badly so
    on a shared 2-core machine). Restore the caller's setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
